"""The public fused losses: validation, backend dispatch, and the fake implementations of the ops.

Every fused backend implements the op pair of docs/design.md (`margin_ce_fwd`, `margin_ce_bwd`);
the differentiable loss op `margin_ce` calls a pair by name and holds the one autograd formula
(C++, csrc/margin_ce_autograd.cpp). This module gives each pair its fake (meta) implementation
through `register_fakes`: the C++ pair here, the Triton pair in udat_kernels.triton_backend.
The shard mode's pair (`margin_ce_shard_fwd`, `margin_ce_shard_bwd`; docs/design.md, "Shard
mode") gets its fakes through `register_shard_fakes` alike.
"""

from __future__ import annotations

import torch
from torch import library

from . import _C_loader, _validate, dispatch, reference


def _loss_dtype(x, weight):
    return torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32


def _loss_like(x, weight, reduction):
    """An empty loss: (B,) for reduction none (0), () otherwise, in the loss dtype."""
    return x.new_empty((x.shape[0],) if reduction == 0 else (), dtype=_loss_dtype(x, weight))


def _fwd_fake(x, weight, target, bias, class_weight, sample_weight, grl_lambda, normalize, scale,
              margin, cos_margin, label_smoothing, ignore_index, reduction, straight_through,
              compute_grad):
    torch._check(x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1],
                 lambda: "x (B, D) and weight (C, D) must share D")
    torch._check(target.dim() == 1 and target.shape[0] == x.shape[0],
                 lambda: "target must be (B,)")
    acc = _loss_dtype(x, weight)
    loss = _loss_like(x, weight, reduction)
    lse = x.new_empty((x.shape[0],), dtype=acc)
    no_bias = x.new_empty((0,), dtype=acc)
    if not compute_grad:
        return (loss, lse, x.new_empty((0,)), weight.new_empty((0,)),
                bias.new_empty((0,)) if bias is not None else no_bias)
    return (loss, lse, x.new_empty(x.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else no_bias)


def _bwd_fake(grad_loss, x, weight, target, bias, class_weight, sample_weight, lse, grl_lambda,
              normalize, scale, margin, cos_margin, label_smoothing, ignore_index, reduction,
              straight_through):
    no_bias = x.new_empty((0,), dtype=_loss_dtype(x, weight))
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else no_bias)


def _loss_fake(x, weight, target, bias, class_weight, sample_weight, grl_lambda, normalize,
               scale, margin, cos_margin, label_smoothing, ignore_index, reduction,
               straight_through, grad_in_forward, impl):
    return _loss_like(x, weight, reduction)


def _shard_fwd_fake(x, weight, target, bias, class_weight, sample_weight, class_offset,
                    num_classes, normalize, scale, margin, cos_margin, label_smoothing,
                    ignore_index, straight_through):
    torch._check(x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1],
                 lambda: "x (B, D) and weight_shard (C_l, D) must share D")
    torch._check(target.dim() == 1 and target.shape[0] == x.shape[0],
                 lambda: "target must be (B,)")
    acc = _loss_dtype(x, weight)
    return x.new_empty((x.shape[0],), dtype=acc), x.new_empty((x.shape[0],), dtype=acc)


def _shard_bwd_fake(grad_rows, x, weight, target, bias, class_weight, sample_weight, lse,
                    grl_lambda, class_offset, num_classes, normalize, scale, margin, cos_margin,
                    label_smoothing, ignore_index, straight_through):
    acc = _loss_dtype(x, weight)
    return (x.new_empty(x.shape, dtype=acc), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,), dtype=acc))


def register_shard_fakes(fwd_name: str, bwd_name: str) -> None:
    """Fake (meta) implementations of a shard-mode pair with the schema of
    margin_ce_shard_fwd/_bwd: (lse, partial) (B,) in the loss dtype; grad x (B, D) in the loss
    dtype, grad W like the shard, grad b like the bias (empty (0,) without one)."""
    library.register_fake(fwd_name)(_shard_fwd_fake)
    library.register_fake(bwd_name)(_shard_bwd_fake)


def register_fakes(fwd_name: str, bwd_name: str) -> None:
    """Fake (meta) implementations of an op pair with the schema of margin_ce_fwd/_bwd.

    Their autograd lives on the loss op `udat_kernels::margin_ce`, in C++
    (csrc/margin_ce_autograd.cpp), which calls the pair by name.
    """
    library.register_fake(fwd_name)(_fwd_fake)
    library.register_fake(bwd_name)(_bwd_fake)


_LOSS_OP = None
if _C_loader.available():
    register_fakes("udat_kernels::margin_ce_fwd", "udat_kernels::margin_ce_bwd")
    if hasattr(torch.ops.udat_kernels, "margin_ce_shard_fwd"):  # absent from an older build
        register_shard_fakes("udat_kernels::margin_ce_shard_fwd",
                             "udat_kernels::margin_ce_shard_bwd")
    library.register_fake("udat_kernels::margin_ce")(_loss_fake)
    _LOSS_OP = torch.ops.udat_kernels.margin_ce.default


def _as_lambda_tensor(grl_lambda, x, weight):
    """A float λ becomes a 0-dim tensor made on x's device (a fill, not a host copy), in the
    accumulation dtype (float64 inputs keep λ exact)."""
    if grl_lambda is None or isinstance(grl_lambda, torch.Tensor):
        return grl_lambda
    return torch.full((), float(grl_lambda), dtype=_loss_dtype(x, weight), device=x.device)


def _fused(x, weight, target, *, normalize, bias, class_weight, sample_weight, scale, margin,
           cos_margin, label_smoothing, ignore_index, reduction, grl_lambda, margin_grad,
           backend, validate):
    if validate:
        angular = (scale, margin, cos_margin, margin_grad) if normalize else None
        red = _validate.check_call(x, weight, target, bias=bias, class_weight=class_weight,
                                   sample_weight=sample_weight, label_smoothing=label_smoothing,
                                   ignore_index=ignore_index, reduction=reduction,
                                   grl_lambda=grl_lambda, angular=angular)
    else:
        red = _validate.reduction_code(reduction)
    chosen = dispatch.select(backend, x, weight)
    if validate:  # the CPU kernels check the targets themselves, at no extra pass
        _validate.check_data(target, weight.shape[0], ignore_index, grl_lambda,
                             targets=chosen.name != "cpu")
    if chosen.name == "reference":
        if normalize:
            return reference.angular_margin_cross_entropy(
                x, weight, target, scale=scale, margin=margin, cos_margin=cos_margin,
                class_weight=class_weight, sample_weight=sample_weight,
                label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction,
                grl_lambda=grl_lambda, margin_grad=margin_grad)
        return reference.linear_cross_entropy(
            x, weight, target, bias=bias, class_weight=class_weight, sample_weight=sample_weight,
            label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction,
            grl_lambda=grl_lambda)
    B, D = x.shape
    lam = _as_lambda_tensor(grl_lambda, x, weight)
    return _LOSS_OP(x, weight, target, bias, class_weight, sample_weight, lam, normalize,
                    float(scale), float(margin), float(cos_margin), float(label_smoothing),
                    int(ignore_index), red, margin_grad == "straight_through",
                    chosen.grad_in_forward(B, D, weight.shape[0]), chosen.impl)


def angular_margin_cross_entropy(x, weight, target, *, scale=64.0, margin=0.5, cos_margin=0.0,
                                 class_weight=None, sample_weight=None, label_smoothing=0.0,
                                 ignore_index=-100, reduction="mean", grl_lambda=None,
                                 margin_grad="exact", backend="auto", validate=True):
    """Fused ArcFace/CosFace cross-entropy over cosine logits (docs/math.md).

    Args:
        x: (B, D) features; weight: (C, D) class centres (float32/float16/bfloat16/float64,
            independently); target: (B,) int64 classes in [0, C) or ignore_index.
        scale: s; margin: additive angular margin m2 (radians, ArcFace); cos_margin: additive
            cosine margin m3 (CosFace).
        class_weight: (C,) per-class rescaling as in torch's cross_entropy; sample_weight: (B,).
        label_smoothing: ε in [0, 1). reduction: "mean" | "sum" | "none".
        grl_lambda: None, a float or a 0-dim tensor: grad x is multiplied by -λ (gradient
            reversal fused into the kernel; grad weight is never reversed).
        margin_grad: "exact" or "straight_through" (ψ' = 1, insightface's behaviour).
        backend: "auto" | "reference" | "cpu" | "triton" | "cuda".
        validate: check arguments and target range (the latter syncs on CUDA).

    Returns the loss: float32 (float64 when an input is float64); (B,) for reduction "none".
    """
    return _fused(x, weight, target, normalize=True, bias=None, class_weight=class_weight,
                  sample_weight=sample_weight, scale=scale, margin=margin, cos_margin=cos_margin,
                  label_smoothing=label_smoothing, ignore_index=ignore_index,
                  reduction=reduction, grl_lambda=grl_lambda, margin_grad=margin_grad,
                  backend=backend, validate=validate)


def linear_cross_entropy(x, weight, target, *, bias=None, class_weight=None, sample_weight=None,
                         label_smoothing=0.0, ignore_index=-100, reduction="mean",
                         grl_lambda=None, backend="auto", validate=True):
    """Fused softmax cross-entropy of the plain logits x·Wᵀ + b (docs/math.md, linear head).

    The same keywords as angular_margin_cross_entropy, plus `bias` (C,), minus the margins.
    """
    return _fused(x, weight, target, normalize=False, bias=bias, class_weight=class_weight,
                  sample_weight=sample_weight, scale=1.0, margin=0.0, cos_margin=0.0,
                  label_smoothing=label_smoothing, ignore_index=ignore_index,
                  reduction=reduction, grl_lambda=grl_lambda, margin_grad="exact",
                  backend=backend, validate=validate)


def angular_logits(x, weight, scale=64.0):
    """s · cos(x_i, W_j): (B, C) logits for prediction and verification (no margin).

    Computed in float32 (float64 when an input is float64), whatever the input dtypes.
    """
    _validate.check_features(x, weight)
    s = _validate._number("scale", scale)
    acc = _loss_dtype(x, weight)
    x_hat = torch.nn.functional.normalize(x.to(acc), dim=1, eps=reference.NORM_EPS)
    w_hat = torch.nn.functional.normalize(weight.to(acc), dim=1, eps=reference.NORM_EPS)
    return (x_hat @ w_hat.t()) * s
