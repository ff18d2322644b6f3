"""arcface_torch's `CombinedMarginLoss` (insightface's training code), single device.

    margin_loss = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)      # ArcFace, m2 = 0.5
    logits = margin_loss(cosines, labels)                      # as arcface_torch: s·logits with
                                                               # the target margin, (B, C)
    loss = margin_loss.fused_loss(embeddings, weight, labels)  # the same cross-entropy, fused:
                                                               # no (B, C) tensor at all

arcface_torch builds its head from `CombinedMarginLoss(s, m1, m2, m3,
interclass_filtering_threshold)`: cos(m1·θ + m2) − m3 on the target class, times s. Served here:
ArcFace (m1 = 1, m3 = 0) and CosFace (m1 = 1, m2 = 0); any other combination, and
`interclass_filtering_threshold > 0`, raise a ValueError naming the argument.

The margin's gradient is straight-through, as arcface_torch's: the target logit moves by the
margin but its derivative with respect to the cosine is taken as 1 (docs/math.md, "ψ′ and its
guard", `margin_grad="straight_through"`). The target logit is the op's ψ (docs/math.md, "The
margin ψ"): equal to arcface_torch's cos(θ + m2) wherever θ + m2 ≤ π; beyond, arcface_torch's
cosine rises again with θ, while ψ continues as cos θ − m2·sin m2, decreasing (docs/compat.md).

The distributed head `PartialFC_V2` is not here yet (docs/compat.md).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .. import reference
from ..ops import angular_margin_cross_entropy

__all__ = ["CombinedMarginLoss"]

# The op's keywords that fused_loss sets itself from the margins.
_SET_BY_MARGINS = ("scale", "margin", "cos_margin", "margin_grad", "ignore_index")


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


class CombinedMarginLoss(nn.Module):
    """arcface_torch's combined margin: ArcFace (m1 = 1, m3 = 0) or CosFace (m1 = 1, m2 = 0).

    forward(logits (B, C) cosines, labels (B,) or (B, 1), -1 for rows without a target here)
    -> s·logits with the target cosine of each labelled row replaced by ψ (new tensor; the input
    is not modified). Gradient with respect to logits: s everywhere (straight-through margin).
    """

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        s, m1, m2, m3 = (_real(n, v) for n, v in (("s", s), ("m1", m1), ("m2", m2), ("m3", m3)))
        threshold = _real("interclass_filtering_threshold", interclass_filtering_threshold)
        if s <= 0:
            raise ValueError(f"s: expected a positive scale, got {s}")
        if m1 != 1.0:
            raise ValueError(f"m1: only m1 = 1 (ArcFace, CosFace) is supported; the "
                             f"multiplicative margin m1 = {m1} (SphereFace) is not")
        if threshold > 0:
            raise ValueError(f"interclass_filtering_threshold: inter-class filtering is not "
                             f"supported (got {threshold}); pass 0")
        if not 0.0 <= m2 < math.pi:
            raise ValueError(f"m2: expected an additive angular margin in [0, pi), got {m2}")
        if m3 < 0:
            raise ValueError(f"m3: expected an additive cosine margin >= 0, got {m3}")
        if m2 != 0 and m3 != 0:
            raise ValueError(f"m2, m3: ArcFace (m3 = 0) or CosFace (m2 = 0), not both; got "
                             f"m2 = {m2}, m3 = {m3} (arcface_torch applies m3 alone then)")
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = threshold

    def margin_kwargs(self) -> dict:
        """The keywords of `udat_kernels.angular_margin_cross_entropy` (and of
        `udat_kernels.nn.AngularMarginLoss`) that apply these margins as arcface_torch does."""
        return {"scale": self.s, "margin": self.m2, "cos_margin": self.m3,
                "margin_grad": "straight_through"}

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() \
                or logits.dim() != 2:
            raise ValueError("logits: expected a (B, C) floating-point tensor of cosines, got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        labels = self._labels(labels, logits.shape[0], logits.shape[1], logits.device)
        out = logits * self.s
        rows = torch.nonzero(labels != -1).squeeze(1)
        cols = labels[rows]
        with torch.no_grad():
            # written under no_grad into the scaled logits: the gradient stays s·upstream
            # there (straight-through), as arcface_torch's in-place arccos/cos gives
            acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
            psi = reference.margin_psi(logits[rows, cols].to(acc), self.m2, self.m3)
            out[rows, cols] = (psi * self.s).to(out.dtype)
        return out

    def fused_loss(self, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   **op_kwargs) -> torch.Tensor:
        """The mean cross-entropy of forward's logits over the labelled rows, by the fused op:
        `F.cross_entropy(self(cosines, labels), labels, ignore_index=-1)` with cosines =
        normalize(embeddings)·normalize(weight)ᵀ (arcface_torch's head), without forming them.

        embeddings (B, D), weight (C, D), labels (B,) or (B, 1). `op_kwargs`: the other keywords
        of `udat_kernels.angular_margin_cross_entropy` (class_weight, label_smoothing, ...).
        """
        for key in _SET_BY_MARGINS:
            if key in op_kwargs:
                raise TypeError(f"{key}: set by this CombinedMarginLoss; it cannot be passed")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.reshape(-1)
        return angular_margin_cross_entropy(embeddings, weight, labels, ignore_index=-1,
                                            **self.margin_kwargs(), **op_kwargs)

    @staticmethod
    def _labels(labels, B: int, C: int, device) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point \
                or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError("labels: expected an integer tensor of class indices")
        if labels.numel() != B or labels.dim() not in (1, 2):
            raise ValueError(f"labels: expected shape ({B},) or ({B}, 1), got "
                             f"{tuple(labels.shape)}")
        if labels.device != device:
            raise ValueError(f"labels: expected a tensor on {device} like logits, got "
                             f"{labels.device}")
        labels = labels.reshape(-1).long()
        bad = ((labels < -1) | (labels >= C))
        if B > 0 and bool(bad.any()):
            raise ValueError(f"labels: value {int(labels[bad][0])} is outside [0, {C}) and is "
                             f"not -1")
        return labels

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}"
