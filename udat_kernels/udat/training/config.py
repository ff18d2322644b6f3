"""What one training run is: the method, the data, the model and the optimisation settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

__all__ = ["Method", "METHODS", "TrainConfig", "SELECTIONS", "AMP_MODES", "SCHEDULES"]


class Method(NamedTuple):
    """labelled: the domain whose labels train G_y; domain_head: None (no G_d), "softmax" or
    "angular"; margin: the angular head's additive angular margin."""

    labelled: str
    domain_head: str | None
    margin: float = 0.0


# The paper's five table rows, in its order.
METHODS = {
    "target": Method("target", None),               # train on labelled target: the upper line
    "source_only": Method("source", None),          # λ = 0: no domain classifier
    "udat": Method("source", "softmax"),            # conventional UDAT (Ganin & Lempitsky)
    "udat_as": Method("source", "angular", 0.0),    # UDAT-AS, s = 64, m = 0
    "udat_as_margin": Method("source", "angular", 0.5),  # UDAT-AS, s = 64, m = 0.5
}

SELECTIONS = ("source_val", "entropy", "oracle")
AMP_MODES = ("off", "bf16", "fp16")
SCHEDULES = ("ganin", "constant", "warm_start")


@dataclass
class TrainConfig:
    """One run. Defaults follow the paper's optimiser (SGD, lr 0.001, batch 64 + 64, s = 64).

    model / width / input_size / batch_norm: a preset of `udat_kernels.udat.models.PRESETS` and
    overrides of its fields (None keeps the preset's value).
    lambda_max, schedule: λ reaches lambda_max (Ganin's ramp), or is constant.
    select: the criterion choosing the reported epoch — source_val (accuracy on a held-out
    `val_fraction` of the labelled training set), entropy (mean prediction entropy on the
    unlabelled target training images, lower is better) or oracle (target test accuracy).
    """

    method: str = "udat_as_margin"
    source: str = "mnist5k"
    target: str = "digits"
    model: str = "vgg16-compact"
    width: float | None = None
    input_size: int | None = None
    batch_norm: bool | None = None
    init: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.001
    momentum: float = 0.0
    weight_decay: float = 0.0
    lambda_max: float = 1.0
    schedule: str = "ganin"
    scale: float = 64.0
    amp: str = "off"
    device: str = "cpu"
    seed: int = 0
    select: str = "source_val"
    val_fraction: float = 0.1
    checkpoint_every: int = 0

    def __post_init__(self):
        checks = [
            ("method", self.method in METHODS, f"one of {', '.join(METHODS)}"),
            ("epochs", self.epochs > 0, "> 0"),
            ("batch_size", self.batch_size > 0, "> 0"),
            ("lr", self.lr > 0, "> 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("lambda_max", self.lambda_max >= 0, ">= 0"),
            ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("scale", self.scale > 0, "> 0"),
            ("amp", self.amp in AMP_MODES, f"one of {', '.join(AMP_MODES)}"),
            ("select", self.select in SELECTIONS, f"one of {', '.join(SELECTIONS)}"),
            ("val_fraction", 0 < self.val_fraction < 1, "in (0, 1)"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
