"""The application's typed configurations: what data, which model, how to train, what to run.

The command lines parse their arguments once, at the edge (`udat_kernels.udat.arguments`), into
these frozen dataclasses; the trainer, the experiment runner and the results files use nothing
else. Each class checks its fields when it is built and a bad value raises `ConfigError`, which
names the field (the command lines turn it into an error about the matching option).

- `DataConfig`: the source and target data sets and how the labelled one is split;
- `ModelConfig`: the model preset, its overrides and the pre-trained initialisation;
- `TrainConfig`: one run's method, seed, λ and optimisation settings;
- `RunConfig`: the three above, everything one training run needs;
- `ExperimentConfig`: the methods × λ × seeds grid of `udat-experiment` around shared settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

from .data import DOMAINS
from .models import PRESETS, VGGConfig

__all__ = ["ConfigError", "Method", "METHODS", "VALIDATORS", "DEFAULT_VALIDATOR", "SELECTIONS",
           "AMP_MODES", "SCHEDULES", "AUGMENTATIONS", "KEEP", "FER_TEST_SPLITS", "DOMAINS_WITH_ROOT", "LAMBDA_SWEEP",
           "RECIPES", "RECIPE_FIELDS", "PAPER_STATES", "PAPER_OURS",
           "DataConfig", "ModelConfig", "TrainConfig", "RunConfig", "ExperimentConfig"]


class ConfigError(ValueError):
    """A configuration field with a bad value; `field` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


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

# The label-free validators (`udat_kernels.udat.training.validators`); `select` may also be
# "oracle", the target test accuracy, which uses the target labels.
VALIDATORS = ("source_val", "entropy", "dev", "im", "snd")
# Declared before measuring (docs/experiments.md, "The declared validator").
DEFAULT_VALIDATOR = "im"
SELECTIONS = VALIDATORS + ("oracle",)
AMP_MODES = ("off", "bf16", "fp16")
SCHEDULES = ("ganin", "constant", "warm_start")
# none: images as they are; shift-flip: each training image shifted by up to 1/8 of its side
# (random crop of the zero-padded image) and, where the domain allows it, mirrored.
AUGMENTATIONS = ("shift-flip", "none")
KEEP = ("best", "last", "both")  # the weights a finished run keeps on disk
FER_TEST_SPLITS = ("PrivateTest", "PublicTest")
DOMAINS_WITH_ROOT = ("fer2013", "rafdb", "folder")  # the others ship with installed packages
LAMBDA_SWEEP = tuple(round(0.1 * i, 1) for i in range(11))  # the paper's 0.0, 0.1, …, 1.0


# `--recipe paper`: what the paper states, and our choices where it leaves a setting open
# (docs/experiments.md, "The paper recipe"). Keys are "section.field"; the other fields keep
# the defaults of the classes below (the "compact" recipe, which trains the compact model).
PAPER_STATES = {
    "model.preset": "vgg16",        # the modified VGG16 ...
    "model.input_size": 224,        # ... at 224×224×3
    "model.scale": 64.0,            # s = 64 (m = 0.5 is the udat_as_margin method's)
    "train.lr": 0.001,              # SGD, lr 0.001
    "train.batch_size": 64,         # batch 64
    "experiment.lambdas": LAMBDA_SWEEP,  # λ from 0 to 1 in steps of 0.1 (+ the oracle column)
}
PAPER_OURS = {
    "train.momentum": 0.9,          # momentum: not stated
    "train.epochs": 30,             # epochs: not stated
    "train.weight_decay": 5e-4,     # weight decay: not stated (VGG's usual value)
    "train.schedule": "ganin",      # λ ramped from 0 to λ_max (Ganin & Lempitsky), not constant
    "data.augment": "shift-flip",   # augmentation: not stated
}
RECIPES = {"compact": {}, "paper": {**PAPER_STATES, **PAPER_OURS}}
# The fields a recipe decides (the others name the data and the process): a command line that
# sets one of them to another value is recorded as overriding the recipe.
RECIPE_FIELDS = (*PAPER_STATES, *PAPER_OURS, "model.width", "model.batch_norm",
                 "model.dropout", "train.lambda_max")


def _check(obj, rules) -> None:
    """rules: (field, ok, expected) triples; the first failing one raises ConfigError."""
    for name, ok, expected in rules:
        if not ok:
            raise ConfigError(name, f"must be {expected}, got {getattr(obj, name)!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _from_dict(cls, data: dict):
    """Build `cls` from a dict, ignoring keys it does not know (files written by other
    versions); lists become tuples where the field holds a tuple."""
    known = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
    return cls(**values)


@dataclass(frozen=True)
class DataConfig:
    """The two domains and the split of the labelled training set.

    source / target: names from `udat_kernels.udat.data.DOMAINS`; *_root: the folder (or file)
    holding it, needed for fer2013, rafdb and folder (mnist5k may take a CSV in its layout).
    fer_test: the FER2013 Usage that serves as its test split.
    val_fraction: share of the labelled training set held out for source validation.
    augment: the training images' augmentation (`AUGMENTATIONS`).
    """

    source: str = "mnist5k"
    target: str = "digits"
    source_root: str | None = None
    target_root: str | None = None
    fer_test: str = "PrivateTest"
    val_fraction: float = 0.1
    augment: str = "shift-flip"

    def __post_init__(self):
        _check(self, [
            ("source", self.source in DOMAINS, f"one of {', '.join(DOMAINS)}"),
            ("target", self.target in DOMAINS, f"one of {', '.join(DOMAINS)}"),
            ("fer_test", self.fer_test in FER_TEST_SPLITS, f"one of {', '.join(FER_TEST_SPLITS)}"),
            ("val_fraction", _is_number(self.val_fraction) and 0 < self.val_fraction < 1,
             "a number in (0, 1)"),
            ("augment", self.augment in AUGMENTATIONS, f"one of {', '.join(AUGMENTATIONS)}"),
        ])
        for side in ("source", "target"):
            name, root = getattr(self, side), getattr(self, f"{side}_root")
            if name in DOMAINS_WITH_ROOT and root is None:
                raise ConfigError(f"{side}_root", f"{name} needs a root (the folder or file "
                                                  f"holding the data)")
            if name == "digits" and root is not None:
                raise ConfigError(f"{side}_root", "digits ships with scikit-learn and takes no "
                                                  "root")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class ModelConfig:
    """The modified VGG16: a preset of `udat_kernels.udat.models.PRESETS` with overrides of
    its fields (None keeps the preset's value: width, input_size, batch_norm, dropout — the
    probability of the dropout after FC1 and FC2, 0 for none), VGG16 weights to start from, and
    the angular domain head's scale s."""

    preset: str = "vgg16-compact"
    width: float | None = None
    input_size: int | None = None
    batch_norm: bool | None = None
    dropout: float | None = None
    init: str | None = None
    scale: float = 64.0

    def __post_init__(self):
        _check(self, [
            ("preset", self.preset in PRESETS, f"one of {', '.join(PRESETS)}"),
            ("width", self.width is None or (_is_number(self.width) and self.width > 0),
             "a number > 0"),
            ("input_size", self.input_size is None
             or (_is_int(self.input_size) and self.input_size > 0 and self.input_size % 32 == 0),
             "a positive multiple of 32"),
            ("batch_norm", self.batch_norm in (None, True, False), "true or false"),
            ("dropout", self.dropout is None
             or (_is_number(self.dropout) and 0 <= self.dropout < 1), "a number in [0, 1)"),
            ("scale", _is_number(self.scale) and self.scale > 0, "a number > 0"),
        ])

    def architecture(self) -> VGGConfig:
        """The preset with the overrides applied."""
        overrides = {k: v for k, v in (("width", self.width), ("input_size", self.input_size),
                                       ("batch_norm", self.batch_norm),
                                       ("dropout", self.dropout)) if v is not None}
        return replace(PRESETS[self.preset], **overrides)

    @property
    def size(self) -> int:
        """The side of the model's square input, to which the images are resized."""
        return self.architecture().input_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """One run's method, seed and optimisation. The defaults (the "compact" recipe) train the
    default compact model: SGD with lr 0.03 and momentum 0.9, batch 64 + 64, 10 epochs,
    λ_max = 0.1 on Ganin's ramp. `--recipe paper` gives the paper's optimiser (`PAPER_STATES`).

    lambda_max, schedule: λ reaches lambda_max (Ganin's ramp), is constant, or warm-starts.
    select: the criterion choosing the reported epoch (and best.pt) — one of the label-free
    `VALIDATORS` (`udat_kernels.udat.training.validators`) or oracle (target test accuracy).
    checkpoint_every: also write last.pt every N steps (0: at the end of each epoch only).
    keep: the weights a finished run keeps — best.pt (the selected epoch), last.pt (the final
    training state) or both.
    deterministic: deterministic algorithms only (exact resume on CUDA; no effect on the CPU,
    where runs are deterministic anyway).
    """

    method: str = "udat_as_margin"
    seed: int = 0
    lambda_max: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "ganin"
    amp: str = "off"
    device: str = "cpu"
    select: str = DEFAULT_VALIDATOR
    checkpoint_every: int = 0
    keep: str = "best"
    deterministic: bool = False

    def __post_init__(self):
        _check(self, [
            ("method", self.method in METHODS, f"one of {', '.join(METHODS)}"),
            ("seed", _is_int(self.seed) and self.seed >= 0, "an integer >= 0"),
            ("lambda_max", _is_number(self.lambda_max) and self.lambda_max >= 0, "a number >= 0"),
            ("epochs", _is_int(self.epochs) and self.epochs > 0, "an integer > 0"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size > 0, "an integer > 0"),
            ("lr", _is_number(self.lr) and self.lr > 0, "a number > 0"),
            ("momentum", _is_number(self.momentum) and 0 <= self.momentum < 1,
             "a number in [0, 1)"),
            ("weight_decay", _is_number(self.weight_decay) and self.weight_decay >= 0,
             "a number >= 0"),
            ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("amp", self.amp in AMP_MODES, f"one of {', '.join(AMP_MODES)}"),
            ("device", isinstance(self.device, str) and self.device != "", "a device name"),
            ("select", self.select in SELECTIONS, f"one of {', '.join(SELECTIONS)}"),
            ("checkpoint_every", _is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
             "an integer >= 0"),
            ("keep", self.keep in KEEP, f"one of {', '.join(KEEP)}"),
            ("deterministic", isinstance(self.deterministic, bool), "true or false"),
        ])

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def adversarial(self) -> bool:
        return self.spec.domain_head is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"data": self.data.to_dict(), "model": self.model.to_dict(),
                "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return cls(DataConfig.from_dict(data["data"]), ModelConfig.from_dict(data["model"]),
                   TrainConfig.from_dict(data["train"]))


@dataclass(frozen=True)
class ExperimentConfig:
    """The grid of `udat-experiment`: every method, at every λ of `lambdas` for the adversarial
    methods (λ = 0 for the others), for every seed, with the shared data, model and training
    settings (`train`'s method, seed and lambda_max are replaced per run).

    out: the folder receiving results.json/.md/.csv and the figures; runs: the folder holding
    one folder per run (default OUT/runs; experiments may share one, since a run's folder is
    named by its key); tsne_points: test images per domain in the t-SNE figure.
    """

    out: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    lambdas: tuple[float, ...] = (0.1,)
    tsne_points: int = 500
    runs: str | None = None
    recipe: str = "compact"
    overrides: tuple[str, ...] = ()

    def __post_init__(self):
        _check(self, [
            ("out", isinstance(self.out, str) and self.out != "", "a folder name"),
            ("runs", self.runs is None or (isinstance(self.runs, str) and self.runs != ""),
             "a folder name"),
            ("methods", len(self.methods) > 0 and all(m in METHODS for m in self.methods)
             and len(set(self.methods)) == len(self.methods),
             f"distinct names from {', '.join(METHODS)}"),
            ("seeds", len(self.seeds) > 0 and all(_is_int(s) and s >= 0 for s in self.seeds)
             and len(set(self.seeds)) == len(self.seeds), "distinct integers >= 0"),
            ("lambdas", len(self.lambdas) > 0
             and all(_is_number(v) and v >= 0 for v in self.lambdas)
             and len(set(self.lambdas)) == len(self.lambdas), "distinct numbers >= 0"),
            ("tsne_points", _is_int(self.tsne_points) and self.tsne_points >= 2,
             "an integer >= 2"),
            ("recipe", self.recipe in RECIPES, f"one of {', '.join(RECIPES)}"),
        ])

    @property
    def runs_dir(self) -> str:
        return self.runs if self.runs is not None else f"{self.out}/runs"

    def lambdas_of(self, method: str) -> tuple[float, ...]:
        """The λ values `method` is trained at: the grid, or 0 without a domain classifier."""
        return self.lambdas if METHODS[method].domain_head is not None else (0.0,)

    def run(self, method: str, lambda_max: float, seed: int) -> RunConfig:
        """The configuration of one run of the grid."""
        train = replace(self.train, method=method, seed=seed, lambda_max=lambda_max)
        return RunConfig(self.data, self.model, train)

    def to_dict(self) -> dict:
        shared = {k: v for k, v in self.train.to_dict().items()
                  if k not in ("method", "seed", "lambda_max")}
        return {"out": self.out, "data": self.data.to_dict(), "model": self.model.to_dict(),
                "train": shared, "methods": list(self.methods), "seeds": list(self.seeds),
                "lambdas": list(self.lambdas), "tsne_points": self.tsne_points,
                "runs": self.runs, "recipe": self.recipe, "overrides": list(self.overrides)}

    @classmethod
    def from_dict(cls, data: dict) -> "ExperimentConfig":
        return cls(out=data["out"], data=DataConfig.from_dict(data["data"]),
                   model=ModelConfig.from_dict(data["model"]),
                   train=TrainConfig.from_dict(data["train"]), methods=tuple(data["methods"]),
                   seeds=tuple(data["seeds"]), lambdas=tuple(data["lambdas"]),
                   tsne_points=data["tsne_points"], runs=data.get("runs"),
                   recipe=data.get("recipe", "compact"),
                   overrides=tuple(data.get("overrides", ())))
