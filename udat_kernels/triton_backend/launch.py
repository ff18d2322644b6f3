"""Host side of the Triton ops: argument checks, path choice, and the op bodies.

`margin_ce_fwd` / `margin_ce_bwd` here take the arguments of the C++ ops' schema (docs/design.md)
and return what those ops return, so the two backends are interchangeable behind one autograd
formula. Heads with C <= small_c.SMALL_C_MAX run the single-pass kernel; larger heads the tiled
path.
"""

from __future__ import annotations

import torch

from . import small_c, tiled
from ._common import MarginConsts
from ._runtime import device_guard

_HALF_OR_SINGLE = (torch.float32, torch.float16, torch.bfloat16)


def use_small_c(C: int) -> bool:
    return C <= small_c.SMALL_C_MAX


def _check(x, weight, target, bias, class_weight, sample_weight, grl_lambda, normalize):
    """The checks the C++ ops share, plus the Triton backend's own dtype limits."""
    for name, t in (("x", x), ("weight", weight)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if t.dtype not in _HALF_OR_SINGLE:
            raise TypeError(f"{name}: the Triton backend takes float32/float16/bfloat16, got "
                            f"{t.dtype} (float64 runs on the cpu, cuda and reference backends)")
    B, D = x.shape
    C = weight.shape[0]
    if weight.shape[1] != D or C < 1:
        raise ValueError(f"weight: expected (C >= 1, {D}) to match x, got {tuple(weight.shape)}")
    if target.dtype != torch.int64 or tuple(target.shape) != (B,):
        raise ValueError(f"target: expected int64 of shape ({B},), got {target.dtype} "
                         f"{tuple(target.shape)}")
    for name, t, n in (("bias", bias, C), ("class_weight", class_weight, C),
                       ("sample_weight", sample_weight, B)):
        if t is not None and (tuple(t.shape) != (n,) or t.dtype not in _HALF_OR_SINGLE):
            raise ValueError(f"{name}: expected a float32/float16/bfloat16 tensor of shape "
                             f"({n},), got {t.dtype} {tuple(t.shape)}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias),
                    ("class_weight", class_weight), ("sample_weight", sample_weight)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} like x, got {t.device}")
    if bias is not None and normalize:
        raise ValueError("bias: the angular head has no bias (normalize=True)")
    if grl_lambda is not None and grl_lambda.dim() != 0:
        raise ValueError(f"grl_lambda: expected a 0-dim tensor, got shape "
                         f"{tuple(grl_lambda.shape)}")


def _contiguous(*tensors):
    return [t.contiguous() if t is not None else None for t in tensors]


def _lambda_on(grl_lambda, device):
    # λ may live on any device; the kernel reads it from x's device as fp32.
    if grl_lambda is None:
        return None
    return grl_lambda.to(device=device, dtype=torch.float32)


def _empty_batch(x, weight, bias, reduction, compute_grad, lse_dtype=torch.float32):
    """What torch's cross_entropy gives for B = 0: NaN mean, zero sum, zero gradients."""
    loss = (x.new_empty((0,), dtype=lse_dtype) if reduction == 0 else
            x.new_full((), float("nan") if reduction == 1 else 0.0, dtype=lse_dtype))
    grads = _zero_grads(x, weight, bias) if compute_grad else _no_grads(x, weight, bias)
    return (loss, x.new_empty((0,), dtype=lse_dtype)) + grads


def _zero_grads(x, weight, bias):
    return (torch.zeros_like(x), torch.zeros_like(weight),
            torch.zeros_like(bias) if bias is not None else x.new_empty((0,), dtype=torch.float32))


def _no_grads(x, weight, bias):
    return (x.new_empty((0,)), weight.new_empty((0,)),
            bias.new_empty((0,)) if bias is not None else x.new_empty((0,), dtype=torch.float32))


def margin_ce_fwd(x, weight, target, bias, class_weight, sample_weight, grl_lambda, normalize,
                  scale, margin, cos_margin, label_smoothing, ignore_index, reduction,
                  straight_through, compute_grad):
    """The forward op: (loss, lse, grad_x, grad_weight, grad_bias); see docs/design.md."""
    _check(x, weight, target, bias, class_weight, sample_weight, grl_lambda, normalize)
    with device_guard(x.device):
        return _fwd(x, weight, target, bias, class_weight, sample_weight, grl_lambda, normalize,
                    scale, margin, cos_margin, label_smoothing, ignore_index, reduction,
                    straight_through, compute_grad)


def _fwd(x, weight, target, bias, class_weight, sample_weight, grl_lambda, normalize, scale,
         margin, cos_margin, label_smoothing, ignore_index, reduction, straight_through,
         compute_grad):
    if x.shape[0] == 0:
        return _empty_batch(x, weight, bias, reduction, compute_grad)
    x, weight, target, bias, cw, sw = _contiguous(x, weight, target, bias, class_weight,
                                                  sample_weight)
    consts = MarginConsts(normalize, scale, margin, cos_margin)
    lam = _lambda_on(grl_lambda, x.device) if compute_grad else None
    common = (consts, normalize, float(label_smoothing), int(ignore_index), int(reduction),
              bool(straight_through), True, bool(compute_grad))
    if use_small_c(weight.shape[0]):
        out = small_c.small_c_launch(x, weight, target, bias, cw, sw, lam, None, *common)
    else:
        out = tiled.tiled_launch(x, weight, target, bias, cw, sw, lam, None, None, *common)
    loss, lse, gx, gw, gb = out
    if not compute_grad:
        gx, gw, gb = _no_grads(x, weight, bias)
    elif gb is None:
        gb = x.new_empty((0,), dtype=torch.float32)
    return loss, lse, gx, gw, gb


def margin_ce_bwd(grad_loss, x, weight, target, bias, class_weight, sample_weight, lse,
                  grl_lambda, normalize, scale, margin, cos_margin, label_smoothing,
                  ignore_index, reduction, straight_through):
    """The backward op: (grad_x, grad_weight, grad_bias) for the upstream grad_loss."""
    _check(x, weight, target, bias, class_weight, sample_weight, grl_lambda, normalize)
    with device_guard(x.device):
        return _bwd(grad_loss, x, weight, target, bias, class_weight, sample_weight, lse,
                    grl_lambda, normalize, scale, margin, cos_margin, label_smoothing,
                    ignore_index, reduction, straight_through)


def _bwd(grad_loss, x, weight, target, bias, class_weight, sample_weight, lse, grl_lambda,
         normalize, scale, margin, cos_margin, label_smoothing, ignore_index, reduction,
         straight_through):
    if x.shape[0] == 0:
        return _zero_grads(x, weight, bias)
    x, weight, target, bias, cw, sw = _contiguous(x, weight, target, bias, class_weight,
                                                  sample_weight)
    # An expanded upstream gradient (stride 0) is made dense; the kernels index it per row.
    grad_loss = grad_loss.to(torch.float32).contiguous()
    consts = MarginConsts(normalize, scale, margin, cos_margin)
    lam = _lambda_on(grl_lambda, x.device)
    common = (consts, normalize, float(label_smoothing), int(ignore_index), int(reduction),
              bool(straight_through), False, True)
    if use_small_c(weight.shape[0]):
        # The row's logits are recomputed in registers; the saved lse is not needed.
        out = small_c.small_c_launch(x, weight, target, bias, cw, sw, lam, grad_loss, *common)
    else:
        out = tiled.tiled_launch(x, weight, target, bias, cw, sw, lam, grad_loss,
                                 lse.to(torch.float32).contiguous(), *common)
    _, _, gx, gw, gb = out
    if gb is None:
        gb = x.new_empty((0,), dtype=torch.float32)
    return gx, gw, gb
