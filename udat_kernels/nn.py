"""Drop-in modules over the fused losses: an ArcFace/CosFace loss, the GRL, the domain classifier.

- `AngularMarginLoss`: holds the class centres W (C, D); `forward(embeddings, labels)` is the fused
  angular-margin cross-entropy, `.logits(embeddings)` the s·cosine logits for prediction.
- `GradientReversal`, `ReversedLinear`: the GRL alone, or fused into a linear layer's backward.
- `DomainClassifier`: the paper's 3-FC domain classifier (ReversedLinear → ReLU → Linear → ReLU →
  angular or softmax head) returning the domain loss.

Modules that take `lambda_` accept a number or a `udat_kernels.schedules.Schedule`; the trainer
calls `set_progress(step, total_steps)` on them, and `last_lambda` is the λ the last forward
applied.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .grl import grad_reverse, reversed_linear
from .ops import angular_logits, angular_margin_cross_entropy, linear_cross_entropy
from .schedules import Schedule, as_schedule

__all__ = ["AngularMarginLoss", "GradientReversal", "ReversedLinear", "DomainClassifier"]

# Keyword arguments of the fused op that a loss module forwards on every call.
_OP_KWARGS = ("class_weight", "label_smoothing", "ignore_index", "reduction", "margin_grad",
              "backend", "validate", "grl_lambda")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _Scheduled:
    """Mixin: λ from a schedule, updated by `set_progress`, recorded in `last_lambda`."""

    def _init_lambda(self, lambda_) -> None:
        self.schedule: Schedule = as_schedule(lambda_)
        self.lambda_ = self.schedule.lambda_at(0, 1)
        self.last_lambda: float | None = None

    def set_progress(self, step: int, total_steps: int) -> float:
        """Set λ for training step `step` of `total_steps`; returns it."""
        self.lambda_ = self.schedule.lambda_at(step, total_steps)
        return self.lambda_

    def _apply_lambda(self) -> float:
        self.last_lambda = self.lambda_
        return self.lambda_


class AngularMarginLoss(nn.Module):
    """ArcFace (margin, m2) / CosFace (cos_margin, m3) loss with learnable class centres.

    weight: (num_classes, embedding_size). forward(embeddings (B, D), labels (B,) int64,
    sample_weight (B,) or None) -> the loss (a scalar, or (B,) for reduction="none").
    `op_kwargs` are passed to `udat_kernels.angular_margin_cross_entropy` on every call
    (class_weight, label_smoothing, ignore_index, reduction, margin_grad, backend, validate).
    """

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 64.0,
                 margin: float = 0.5, cos_margin: float = 0.0, **op_kwargs):
        super().__init__()
        _positive_int("num_classes", num_classes)
        _positive_int("embedding_size", embedding_size)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and positive, got {scale!r}")
        if not (isinstance(margin, (int, float)) and 0 <= margin < math.pi):
            raise ValueError(f"margin must be in [0, pi), got {margin!r}")
        if not (isinstance(cos_margin, (int, float)) and cos_margin >= 0):
            raise ValueError(f"cos_margin must be >= 0, got {cos_margin!r}")
        for key in op_kwargs:
            if key not in _OP_KWARGS:
                raise TypeError(f"AngularMarginLoss got an unexpected keyword argument {key!r}")
        class_weight = op_kwargs.pop("class_weight", None)
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight, dtype=torch.float32)
            if class_weight.shape != (num_classes,):
                raise ValueError(f"class_weight must have shape ({num_classes},), "
                                 f"got {tuple(class_weight.shape)}")
        self.register_buffer("class_weight", class_weight)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.scale, self.margin, self.cos_margin = float(scale), float(margin), float(cos_margin)
        self.op_kwargs = op_kwargs
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        return angular_margin_cross_entropy(
            embeddings, self.weight, labels, scale=self.scale, margin=self.margin,
            cos_margin=self.cos_margin, class_weight=self.class_weight,
            sample_weight=sample_weight, **self.op_kwargs)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """s·cos(θ) logits (B, C), no margin: for prediction and verification."""
        return angular_logits(embeddings, self.weight, scale=self.scale)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"scale={self.scale}, margin={self.margin}, cos_margin={self.cos_margin}")


class GradientReversal(_Scheduled, nn.Module):
    """Identity forward, −λ·grad backward; x of any shape."""

    def __init__(self, lambda_=1.0):
        super().__init__()
        self._init_lambda(lambda_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self._apply_lambda())

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}"


class ReversedLinear(_Scheduled, nn.Linear):
    """nn.Linear (same parameters and initialisation) whose input gradient is −λ× the plain one,
    formed by the backward GEMM itself. x (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features: int, out_features: int, lambda_=1.0, bias: bool = True):
        _positive_int("in_features", in_features)
        _positive_int("out_features", out_features)
        super().__init__(in_features, out_features, bias=bias)
        self._init_lambda(lambda_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reversed_linear(x, self.weight, self.bias, self._apply_lambda())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, schedule={self.schedule!r}"


class DomainClassifier(nn.Module):
    """The paper's domain classifier G_d with the GRL fused into its first layer.

    ReversedLinear(in, h1) → ReLU → Linear(h1, h2) → ReLU → head over `num_domains` domains:
    head="angular": the angular-margin softmax (s = `scale`, additive angular margin `margin`
    on the true domain; defaults 64 and 0.5); head="softmax": a linear layer with bias and
    softmax cross-entropy (conventional UDAT; `scale` and `margin` do not apply).

    forward(features (B, in_features), domain_labels (B,) int64) -> the mean domain loss.
    """

    def __init__(self, in_features: int, hidden=(1024, 1024), head: str = "angular",
                 scale: float | None = None, margin: float | None = None, lambda_=1.0,
                 num_domains: int = 2, backend: str = "auto"):
        super().__init__()
        _positive_int("in_features", in_features)
        _positive_int("num_domains", num_domains)
        hidden = tuple(hidden)
        if len(hidden) != 2:
            raise ValueError(f"hidden must give two layer widths, got {hidden!r}")
        for width in hidden:
            _positive_int("hidden", width)
        if head == "softmax":
            for name, value in (("scale", scale), ("margin", margin)):
                if value is not None:
                    raise TypeError(f"{name} belongs to the angular head; it cannot be passed "
                                    f"with head='softmax'")
        elif head == "angular":
            scale = 64.0 if scale is None else scale
            margin = 0.5 if margin is None else margin
            if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
                raise ValueError(f"scale must be finite and positive, got {scale!r}")
            if not (isinstance(margin, (int, float)) and 0 <= margin < math.pi):
                raise ValueError(f"margin must be in [0, pi), got {margin!r}")
        else:
            raise ValueError(f"head must be 'angular' or 'softmax', got {head!r}")
        self.head, self.scale, self.margin, self.backend = head, scale, margin, backend
        self.fc1 = ReversedLinear(in_features, hidden[0], lambda_)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.weight = nn.Parameter(torch.empty(num_domains, hidden[1]))
        if head == "angular":
            nn.init.normal_(self.weight, std=0.01)
            self.register_parameter("bias", None)
        else:
            bound = 1.0 / math.sqrt(hidden[1])
            nn.init.uniform_(self.weight, -bound, bound)
            self.bias = nn.Parameter(torch.zeros(num_domains))

    @property
    def schedule(self) -> Schedule:
        return self.fc1.schedule

    @property
    def last_lambda(self) -> float | None:
        return self.fc1.last_lambda

    def set_progress(self, step: int, total_steps: int) -> float:
        """Set the GRL's λ for training step `step` of `total_steps`; returns it."""
        return self.fc1.set_progress(step, total_steps)

    def hidden_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_features) -> (B, h2), the input of the head (GRL in the backward)."""
        return torch.relu(self.fc2(torch.relu(self.fc1(features))))

    def forward(self, features: torch.Tensor, domain_labels: torch.Tensor) -> torch.Tensor:
        h = self.hidden_features(features)
        if self.head == "angular":
            return angular_margin_cross_entropy(h, self.weight, domain_labels, scale=self.scale,
                                                margin=self.margin, backend=self.backend)
        return linear_cross_entropy(h, self.weight, domain_labels, bias=self.bias,
                                    backend=self.backend)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Domain logits (B, num_domains): s·cosine for the angular head, x·Wᵀ + b otherwise."""
        h = self.hidden_features(features)
        if self.head == "angular":
            return angular_logits(h, self.weight, scale=self.scale)
        return torch.nn.functional.linear(h, self.weight.to(h.dtype), self.bias.to(h.dtype))

    def extra_repr(self) -> str:
        if self.head == "angular":
            return f"head='angular', scale={self.scale}, margin={self.margin}"
        return "head='softmax'"
