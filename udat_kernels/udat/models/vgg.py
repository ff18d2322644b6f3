"""The paper's modified VGG16 with a domain classifier on the second FC layer.

G_f (features): 13 conv layers (3×3, VGG16's five blocks) → FC1 → FC2; G_y (label classifier):
FC3 → the label head, whose loss is the fused `linear_cross_entropy` with bias; G_d: a
`udat_kernels.nn.DomainClassifier` (3 FC layers, GRL fused into the first) on FC2's output.

`VGGConfig` scales the network: `width` multiplies every conv width, `input_size` (a multiple of
32) sets the spatial size reaching FC1, `batch_norm` adds BatchNorm after each conv. The paper's
network is `PRESETS["vgg16"]`; `PRESETS["vgg16-compact"]` is the one that trains on two CPU cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from udat_kernels.nn import DomainClassifier
from udat_kernels.ops import linear_cross_entropy

__all__ = ["VGGConfig", "PRESETS", "UDATVGG", "build_model", "VGG16_CONV"]

# VGG16's conv widths; "M" is a 2×2 max-pool.
VGG16_CONV = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M")


@dataclass(frozen=True)
class VGGConfig:
    """Architecture of the modified VGG16.

    fc: widths of FC1, FC2, FC3 (the label head adds the fourth FC layer, one unit per class).
    domain_hidden: widths of the domain classifier's two hidden layers.
    """

    width: float = 1.0
    input_size: int = 224
    batch_norm: bool = False
    fc: tuple[int, int, int] = (4096, 4096, 1024)
    domain_hidden: tuple[int, int] = (1024, 1024)
    dropout: float = 0.5

    def __post_init__(self):
        if not self.width > 0:
            raise ValueError(f"width must be > 0, got {self.width}")
        if self.input_size <= 0 or self.input_size % 32:
            raise ValueError(f"input_size must be a positive multiple of 32, got {self.input_size}")
        if len(self.fc) != 3 or min(self.fc) <= 0:
            raise ValueError(f"fc must give three positive widths, got {self.fc}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def conv_widths(self) -> list:
        return [c if c == "M" else max(1, round(c * self.width)) for c in VGG16_CONV]

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "vgg16": VGGConfig(),
    "vgg16-bn": VGGConfig(batch_norm=True),
    # 1/8 of the conv widths, 32×32 input, BatchNorm (stable at a higher learning rate without
    # pre-training) and 256-wide FC layers: about 5 M multiply-adds per image.
    "vgg16-compact": VGGConfig(width=0.125, input_size=32, batch_norm=True, fc=(256, 256, 128),
                               domain_hidden=(256, 256), dropout=0.25),
}


def _make_features(config: VGGConfig) -> nn.Sequential:
    """Conv stack in torchvision's layout (same module indices as vgg16 / vgg16_bn)."""
    layers, channels = [], 3
    for c in config.conv_widths():
        if c == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        layers.append(nn.Conv2d(channels, c, 3, padding=1))
        if config.batch_norm:
            layers.append(nn.BatchNorm2d(c))
        layers.append(nn.ReLU(inplace=True))
        channels = c
    return nn.Sequential(*layers)


class UDATVGG(nn.Module):
    """The modified VGG16 of the paper; images (B, 3, S, S), S = config.input_size.

    domain_head: None (no domain classifier: source-only and train-on-target), "softmax"
    (conventional UDAT) or "angular" (UDAT-AS, with `domain_scale` and `domain_margin`).
    """

    def __init__(self, num_classes: int, config: VGGConfig = VGGConfig(),
                 domain_head: str | None = None, domain_scale: float = 64.0,
                 domain_margin: float = 0.5, lambda_=1.0):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be > 0, got {num_classes}")
        self.config, self.num_classes = config, num_classes
        self.features = _make_features(config)
        side = config.input_size // 32
        conv_out = [c for c in config.conv_widths() if c != "M"][-1] * side * side
        fc1, fc2, fc3 = config.fc
        self.fc1 = nn.Linear(conv_out, fc1)
        self.fc2 = nn.Linear(fc1, fc2)
        self.fc3 = nn.Linear(fc2, fc3)
        self.head = nn.Linear(fc3, num_classes)
        self.dropout = nn.Dropout(config.dropout)
        if domain_head is None:
            self.domain_classifier = None
        else:
            angular = {"scale": domain_scale, "margin": domain_margin}
            self.domain_classifier = DomainClassifier(
                fc2, hidden=config.domain_hidden, head=domain_head, lambda_=lambda_,
                **(angular if domain_head == "angular" else {}))
        self._init_weights()

    def _init_weights(self):
        # He initialisation for the convs (as torchvision) and for the hidden FC layers: the
        # N(0, 0.01) that torchvision uses for 4096-wide FCs starves narrow ones of signal.
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for m in (self.fc1, self.fc2, self.fc3):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, 0, 0.01)
        nn.init.zeros_(self.head.bias)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """G_f: images (B, 3, S, S) -> FC2 output (B, fc[1]), the features the GRL receives."""
        x = self.features(images).flatten(1)
        x = self.dropout(torch.relu(self.fc1(x)))
        return torch.relu(self.fc2(x))

    def label_hidden(self, features: torch.Tensor) -> torch.Tensor:
        """G_y up to the head: (B, fc[1]) -> (B, fc[2])."""
        return torch.relu(self.fc3(self.dropout(features)))

    def label_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_y: the fused softmax cross-entropy of the label head (mean over the batch)."""
        return linear_cross_entropy(self.label_hidden(features), self.head.weight, labels,
                                    bias=self.head.bias)

    def domain_loss(self, features: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """L_r (or L_d): the domain classifier's loss; its first layer reverses the gradient."""
        if self.domain_classifier is None:
            raise RuntimeError("this model has no domain classifier (domain_head=None)")
        return self.domain_classifier(features, domains)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.label_hidden(self.extract(images)))


def build_model(num_classes: int, preset: str = "vgg16", domain_head: str | None = None,
                **overrides) -> UDATVGG:
    """A UDATVGG from a preset name with field overrides (width, input_size, batch_norm, ...);
    the domain classifier's keyword arguments (domain_scale, domain_margin, lambda_) pass
    through."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model {preset!r}; choose from {', '.join(PRESETS)}")
    model_keys = {"domain_scale", "domain_margin", "lambda_"}
    model_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in model_keys}
    config = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    return UDATVGG(num_classes, config, domain_head=domain_head, **model_kwargs)
