"""pytorch-metric-learning's ArcFaceLoss and CosFaceLoss, computed by the fused op.

    from pytorch_metric_learning.losses import ArcFaceLoss    # before
    from udat_kernels.compat.pml import ArcFaceLoss           # after

The classes subclass pytorch-metric-learning's own, so the constructor (`num_classes`,
`embedding_size`, `margin` — in degrees for ArcFace —, `scale`, and the keyword arguments of its
base classes: reducer, distance, regularizers, weight_init_func, collect_stats), the parameter
`W` of shape (embedding_size, num_classes), the state_dict, `forward(embeddings, labels,
indices_tuple)`, `get_logits` and its place in the trainers are pytorch-metric-learning's. Only
the loss is computed differently: by `udat_kernels.angular_margin_cross_entropy`, without the
(B, C) cosine, mask and logit tensors, and without copying W (docs/compat.md).

W keeps pytorch-metric-learning's shape and values but is stored class-major: its storage is a
contiguous (num_classes, embedding_size) buffer and W is the transposed view of it (strides
(1, embedding_size)). `W.t()` is then the contiguous (C, D) class-centre matrix the op reads, and
the op's (C, D) gradient, transposed back by autograd, already has W's strides, so autograd
takes it as `W.grad` without a copy. `.to()`, optimizers, deepcopy and `torch.save` keep strides;
a W replaced by other means (`load_state_dict(assign=True)`, `W.data = ...`) is put back into
this layout once, on the next forward or load.

Differences from pytorch-metric-learning, all documented in docs/compat.md:
- float16/bfloat16 embeddings: pytorch-metric-learning casts W to the embeddings' dtype on every
  forward (outside autocast) and computes cosines, logits and the cross-entropy in that dtype;
  here W keeps its dtype (moved to the embeddings' device only), the op accumulates in float32
  and the loss is float32 (docs/math.md, "Dtypes and accumulation").
- `ref_emb` and `ref_labels` raise a ValueError naming them (pytorch-metric-learning rejects
  `ref_emb` too, and silently ignores `ref_labels` given alone); labels must be integers in
  [0, num_classes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    from pytorch_metric_learning import losses as _pml_losses
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.reducers import MeanReducer, MultipleReducers
    from pytorch_metric_learning.utils import common_functions as c_f
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("udat_kernels.compat.pml needs pytorch-metric-learning "
                      "(pip install pytorch-metric-learning)") from e

from .. import reference
from ..ops import angular_logits, angular_margin_cross_entropy

__all__ = ["ArcFaceLoss", "CosFaceLoss", "SubCenterArcFaceLoss"]

# Names of the op's arguments in its error messages, and what this interface calls them.
_ARG_NAMES = {"x": "embeddings", "weight": "W", "target": "labels",
              "sample_weight": "indices_tuple"}


def is_class_major(w: torch.Tensor) -> bool:
    """True when the (D, C) tensor w is the transpose of a contiguous (C, D) one."""
    return w.dim() == 2 and w.t().is_contiguous()


def class_major(w: torch.Tensor) -> torch.Tensor:
    """w (D, C) itself when class-major, else a class-major copy of it (same values)."""
    return w if is_class_major(w) else w.t().contiguous().t()


def _check_distance(distance) -> None:
    # The op computes plain cosines: pytorch-metric-learning's default CosineSimilarity().
    if not (type(distance) is CosineSimilarity and distance.power == 1 and distance.p == 2
            and distance.normalize_embeddings and distance.is_inverted):
        raise ValueError(f"distance: the fused loss computes plain cosine similarities; only "
                         f"CosineSimilarity() with p=2 and power=1 is supported, got {distance!r}")


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
            math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite positive number, got {scale!r}")


def _mean_reducer_of_loss(reducer) -> bool:
    """True when the main loss term is reduced by a plain MeanReducer without statistics: then
    the op's own reduction gives the same number and the reducer passes it through."""
    if isinstance(reducer, MultipleReducers):
        reducer = reducer.reducers["loss"] if "loss" in reducer.reducers else \
            reducer.default_reducer
    return type(reducer) is MeanReducer and not reducer.collect_stats


class _FusedMarginLoss:
    """What ArcFaceLoss and CosFaceLoss share; mixed in before pytorch-metric-learning's class.

    Subclasses set `_margins()` -> (margin m2 in radians, cos_margin m3).
    """

    def _adopt_pml_state(self) -> None:
        """After pytorch-metric-learning's __init__: check what the op can serve, store W
        class-major (the values pytorch-metric-learning's initialisation drew, unchanged)."""
        _check_distance(self.distance)
        _check_scale(self.scale)
        self.W = torch.nn.Parameter(class_major(self.W.detach()),
                                    requires_grad=self.W.requires_grad)
        self.register_load_state_dict_post_hook(_restore_layout_after_load)

    def _keep_layout(self, device=None) -> None:
        w = self.W
        if (device is not None and w.device != device) or not is_class_major(w):
            with torch.no_grad():
                self.W.data = class_major(w.data.to(device if device is not None else w.device))

    def cast_types(self, dtype, device):
        # pytorch-metric-learning moves W to the embeddings' device *and dtype* here; we move it
        # to the device only (the op reads any float dtype and accumulates in float32) and keep
        # it class-major.
        self._keep_layout(device)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None):
        for name, value in (("ref_emb", ref_emb), ("ref_labels", ref_labels)):
            if value is not None:
                raise ValueError(f"{name}: {type(self).__name__} compares embeddings with its "
                                 f"class centres W only; {name} is not supported")
        if labels is None:
            raise ValueError(f"labels: {type(self).__name__} needs labels")
        return super().forward(embeddings, labels, indices_tuple)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        self.cast_types(embeddings.dtype, embeddings.device)
        labels = self._checked_labels(labels)
        B = embeddings.shape[0]
        weights = None
        if indices_tuple is not None and not all(len(t) == 0 for t in indices_tuple):
            # a miner's tuples weigh each row by how often it appears (pytorch-metric-learning's
            # convert_to_weights); the mean is still over all B rows
            weights = lmu.convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
        if self.collect_stats or self.distance.collect_stats:
            self._record_stats(embeddings, labels)
        if _mean_reducer_of_loss(self.reducer):
            # the op's reduction is the reducer's mean: one scalar, gradient formed in the forward
            if weights is None:
                loss = self._fused(embeddings, labels, reduction="mean")
            else:
                loss = self._fused(embeddings, labels, sample_weight=weights / max(B, 1),
                                   reduction="sum")
            entry = {"losses": loss, "indices": None, "reduction_type": "already_reduced"}
        else:
            losses = self._fused(embeddings, labels, sample_weight=weights, reduction="none")
            entry = {"losses": losses, "indices": c_f.torch_arange_from_size(embeddings),
                     "reduction_type": "element"}
        loss_dict = {"loss": entry}
        self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
        return loss_dict

    def _checked_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels: expected integer class indices, got {labels.dtype}")
        labels = labels.long()
        if labels.numel() > 0 and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(labels)
            if int(lo) < 0 or int(hi) >= self.num_classes:
                bad = int(lo) if int(lo) < 0 else int(hi)
                raise ValueError(f"labels: value {bad} is outside [0, {self.num_classes})")
        return labels

    def _fused(self, embeddings, labels, **kwargs):
        margin, cos_margin = self._margins()
        try:
            return angular_margin_cross_entropy(embeddings, self.W.t(), labels,
                                                scale=self.scale, margin=margin,
                                                cos_margin=cos_margin, **kwargs)
        except (ValueError, TypeError) as e:
            # say it in this interface's names (embeddings, W, labels), not the op's
            name, sep, rest = str(e).partition(":")
            if sep and name in _ARG_NAMES:
                raise type(e)(f"{_ARG_NAMES[name]}:{rest}") from e
            raise

    @torch.no_grad()
    def _record_stats(self, embeddings, labels):
        """pytorch-metric-learning's statistics for record-keeping (collect_stats=True): the
        mean target angle, and the distance's norm statistics (the latter normalizes all of W,
        a (C, D) pass, only when asked for)."""
        w_t = self.W.t()
        if self.distance.collect_stats:
            self.distance.reset_stats()
            self.distance.set_default_stats(embeddings, w_t,
                                            self.distance.maybe_normalize(embeddings),
                                            self.distance.maybe_normalize(w_t))
        if self.collect_stats:
            x_hat = F.normalize(embeddings.float(), dim=1, eps=reference.NORM_EPS)
            w_hat = F.normalize(w_t[labels].float(), dim=1, eps=reference.NORM_EPS)
            self.get_angles((x_hat * w_hat).sum(1))  # sets avg_angle

    def get_logits(self, embeddings):
        """scale·cos(θ) (B, C) without margin, as pytorch-metric-learning's get_logits; computed
        in float32 (float64 for float64 inputs) and returned in the promoted input dtype."""
        logits = angular_logits(embeddings, self.W.t(), scale=self.scale)
        return logits.to(torch.promote_types(embeddings.dtype, self.W.dtype))


def _restore_layout_after_load(module, incompatible_keys) -> None:
    # load_state_dict copies into W in place (layout kept); assign=True installs the loaded
    # tensor itself, which is put back class-major here.
    module._keep_layout()


class ArcFaceLoss(_FusedMarginLoss, _pml_losses.ArcFaceLoss):
    """pytorch-metric-learning's ArcFaceLoss (margin in degrees, W (embedding_size,
    num_classes)) computed by the fused op with the exact margin gradient.

    Its fallback past θ + m > π is the op's ψ (docs/math.md, "The margin ψ"):
    cos θ − m·sin m there, as pytorch-metric-learning computes.
    """

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, **kwargs):
        super().__init__(num_classes, embedding_size, margin=margin, scale=scale, **kwargs)
        if not 0.0 <= float(self.margin) < math.pi:
            raise ValueError(f"margin: expected an angle in degrees in [0, 180), got {margin!r}")
        self._adopt_pml_state()

    def _margins(self):
        return float(self.margin), 0.0


class CosFaceLoss(_FusedMarginLoss, _pml_losses.CosFaceLoss):
    """pytorch-metric-learning's CosFaceLoss (additive cosine margin) computed by the fused op."""

    def __init__(self, *args, margin=0.35, scale=64, **kwargs):
        super().__init__(*args, margin=margin, scale=scale, **kwargs)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (
                math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin: expected a finite cosine margin >= 0, got {margin!r}")
        self._adopt_pml_state()

    def _margins(self):
        return 0.0, float(self.margin)


class SubCenterArcFaceLoss:
    """Not served by the fused op (docs/compat.md): use pytorch-metric-learning's own.

    Sub-centre ArcFace takes, for every class, the largest cosine over its K sub-centres before
    the softmax. The op's softmax runs over its rows of W directly: treating the C·K sub-centres
    as classes would put all of them in the denominator, a different loss. Serving it needs a
    max over groups of K columns inside the kernels' epilogue (and the gradient routed to the
    arg-max), which the op does not have.
    """

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            "SubCenterArcFaceLoss: the fused op cannot take the max over sub-centres before its "
            "softmax; use pytorch_metric_learning.losses.SubCenterArcFaceLoss (docs/compat.md)")
