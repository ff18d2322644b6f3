"""arcface_torch's `CombinedMarginLoss` and `PartialFC_V2` (insightface's training code).

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

`PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, fp16)` is arcface_torch's
class-parallel head over `udat_kernels.distributed.ShardedAngularMarginLoss`, with its shard
rule, parameter and state_dict, taking its margins from a CombinedMarginLoss:

    margin_loss = CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    module_partial_fc = PartialFC_V2(margin_loss, 512, num_classes, sample_rate=0.2)
    loss = module_partial_fc(local_embeddings, local_labels)   # the global batch's loss
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .. import reference
from ..distributed import ShardedAngularMarginLoss
from ..ops import angular_margin_cross_entropy

__all__ = ["CombinedMarginLoss", "PartialFC_V2"]

# The op's keywords that fused_loss sets itself from the margins.
_SET_BY_MARGINS = ("scale", "margin", "cos_margin", "margin_grad", "ignore_index")
# arcface_torch's CombinedMarginLoss keeps its constructor arguments under these names.
_COMBINED_ARGS = ("s", "m1", "m2", "m3", "interclass_filtering_threshold")


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


def _combined_margin(margin_loss) -> CombinedMarginLoss:
    """The CombinedMarginLoss whose margins PartialFC_V2 applies: this module's as it is, or
    arcface_torch's own (an object with its five constructor arguments as attributes) rebuilt
    here, which checks its margins."""
    if isinstance(margin_loss, CombinedMarginLoss):
        return margin_loss
    if callable(margin_loss) and all(hasattr(margin_loss, n) for n in _COMBINED_ARGS):
        return CombinedMarginLoss(*(getattr(margin_loss, n) for n in _COMBINED_ARGS))
    raise TypeError(
        f"margin_loss: expected a CombinedMarginLoss (this module's, or arcface_torch's own: "
        f"an object with attributes {', '.join(_COMBINED_ARGS)}), got "
        f"{type(margin_loss).__name__}; PartialFC_V2 applies the margin inside the fused loss, "
        f"so another margin callable cannot be served")


class PartialFC_V2(ShardedAngularMarginLoss):  # noqa: N801 - arcface_torch's class name
    """arcface_torch's `PartialFC_V2`: the class centres split over the ranks of the default
    process group, the margin-based softmax of the global batch, over the class-parallel loss.

    PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False)

    - margin_loss: a `CombinedMarginLoss` (this module's or arcface_torch's own), ArcFace or
      CosFace; its s, m2, m3 are read here, once.
    - Rank r of N holds `weight` (num_local, embedding_size), the classes [class_start,
      class_start + num_local) with num_local = C // N + (r < C % N) — arcface_torch's rule
      and parameter, so that its per-rank checkpoints (state_dict: `weight` alone) load here
      and ours there. Initialised N(0, 0.01²) as arcface_torch does (the same values for the
      same seed).
    - sample_rate < 1: each step keeps the centres of the batch's classes and a random share of
      the others, num_sample = int(sample_rate·num_local) a rank (more when the positives
      exceed it); `weight_index` holds the local indices of the last step's sample.
    - fp16: the embeddings enter the loss in float16 (arcface_torch computes its cosines under
      float16 autocast); the cosines accumulate in float32 either way.
    - timeout (keyword only, not in arcface_torch): seconds a collective of the loss waits for
      the other ranks (default 1800, torch's default for gloo groups).

    forward(local_embeddings (B_r, D), local_labels (B_r,) or (B_r, 1) integer class indices)
    -> the mean loss of the global batch, the same on every rank. Gradients: `weight` gets
    ∂L/∂weight, local_embeddings N·∂L/∂x_local (DistributedDataParallel's average over the
    backbone's replicas then gives the single-process gradient), as arcface_torch's.
    """

    _version = 2  # arcface_torch's, recorded in the state_dict's metadata

    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False,
                 *, timeout=1800.0):
        margin = _combined_margin(margin_loss)
        if fp16 not in (False, True) or not isinstance(fp16, numbers.Integral):
            raise TypeError(f"fp16: expected a bool, got {fp16!r}")
        # ignore_index=None: arcface_torch ignores no label, so a label outside [0, C) raises
        # instead of silently leaving its row out.
        super().__init__(num_classes, embedding_size, sample_rate=sample_rate, timeout=timeout,
                         ignore_index=None, reduction="mean", **margin.margin_kwargs())
        self.fp16 = bool(fp16)
        self.margin_softmax = margin
        self.num_sample = int(self.sample_rate * self.num_local)
        every = self._comm.all_gather_object(self.fp16, "the check of the settings")
        if any(v != every[0] for v in every):
            raise ValueError("PartialFC_V2: settings differ across ranks: fp16 ("
                             + ", ".join(f"rank {r}: {v}" for r, v in enumerate(every)) + ")")

    @property
    def weight_index(self) -> torch.Tensor | None:
        """Indices into this rank's `weight` of the centres sampled in the last step
        (sample_rate < 1; None before the first sampled step)."""
        ids = self.last_sampled_classes
        return None if ids is None else ids - self.class_start

    def forward(self, local_embeddings: torch.Tensor,
                local_labels: torch.Tensor) -> torch.Tensor:
        labels = local_labels
        if isinstance(labels, torch.Tensor):
            if labels.dim() == 2 and labels.shape[1] == 1:
                labels = labels.reshape(-1)
            if not (labels.is_floating_point() or labels.is_complex()
                    or labels.dtype == torch.bool):
                labels = labels.long()
        x = local_embeddings
        if self.fp16 and isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.to(torch.float16)
        return super().forward(x, labels)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp16={self.fp16}"
