"""Host side of the Triton ops: argument checks, path choice, and the op bodies.

`margin_ce_fwd` / `margin_ce_bwd` here take the arguments of the C++ ops' schema (docs/design.md)
and return what those ops return, so the two backends are interchangeable behind one autograd
formula. Heads with C <= small_c.SMALL_C_MAX run the single-pass kernel; larger heads the tiled
path. `margin_ce_shard_fwd` / `margin_ce_shard_bwd` are the shard mode (docs/design.md, "Shard
mode"), always on the tiled path: shards are the large-C use case.
"""

from __future__ import annotations

import math

import torch

from . import small_c, tiled
from ._common import MarginConsts
from ._runtime import Cost, device_guard, torch_kernel

_HALF_OR_SINGLE = (torch.float32, torch.float16, torch.bfloat16)


def use_small_c(C: int) -> bool:
    return C <= small_c.SMALL_C_MAX


def _check(x, weight, target, bias, class_weight, sample_weight, grl_lambda, normalize,
           num_classes=None):
    """The checks the C++ ops share, plus the Triton backend's own dtype limits.

    num_classes: the shard mode's whole class count (weight is then a shard, possibly empty,
    class_weight the whole vector, and the weight vectors may also be float64, as the
    sharded loss gathers sample weights); None for the ordinary op."""
    for name, t in (("x", x), ("weight", weight)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if t.dtype not in _HALF_OR_SINGLE:
            raise TypeError(f"{name}: the Triton backend takes float32/float16/bfloat16, got "
                            f"{t.dtype} (float64 runs on the cpu, cuda and reference backends)")
    B, D = x.shape
    C = weight.shape[0]
    if num_classes is None and (weight.shape[1] != D or C < 1):
        raise ValueError(f"weight: expected (C >= 1, {D}) to match x, got {tuple(weight.shape)}")
    if num_classes is not None and weight.shape[1] != D:
        raise ValueError(f"weight: expected (C_l, {D}) to match x's feature size, got "
                         f"{tuple(weight.shape)}")
    if target.dtype != torch.int64 or tuple(target.shape) != (B,):
        raise ValueError(f"target: expected int64 of shape ({B},), got {target.dtype} "
                         f"{tuple(target.shape)}")
    whole = C if num_classes is None else num_classes
    vector_dtypes = _HALF_OR_SINGLE if num_classes is None else _HALF_OR_SINGLE + (torch.float64,)
    for name, t, n in (("bias", bias, C), ("class_weight", class_weight, whole),
                       ("sample_weight", sample_weight, B)):
        dtypes = _HALF_OR_SINGLE if name == "bias" else vector_dtypes
        if t is not None and (tuple(t.shape) != (n,) or t.dtype not in dtypes):
            names = "/".join(str(d).split(".")[1] for d in dtypes)
            raise ValueError(f"{name}: expected a {names} tensor of shape ({n},), got "
                             f"{t.dtype} {tuple(t.shape)}")
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


# ----------------------------------------------------------------------------------------------
# the shard mode (docs/math.md, "Class shards"; docs/design.md, "Shard mode")
# ----------------------------------------------------------------------------------------------


def _check_shard(x, weight, target, bias, class_weight, sample_weight, grl_lambda, class_offset,
                 num_classes, normalize, scale, margin, cos_margin, label_smoothing):
    """check_shard_inputs of the C++ ops (csrc/udat_ce.h), with the Triton dtype limits."""
    if num_classes < 1:
        raise ValueError(f"num_classes: expected at least one class, got {num_classes}")
    _check(x, weight, target, bias, class_weight, sample_weight, grl_lambda, normalize,
           num_classes=num_classes)
    C_l = weight.shape[0]
    if not 0 <= class_offset <= num_classes - C_l:
        raise ValueError(f"class_offset: the shard's classes [class_offset, class_offset + {C_l})"
                         f" must lie in [0, num_classes = {num_classes}), got class_offset "
                         f"{class_offset}")
    if normalize:
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a finite positive number, got {scale}")
        if not 0 <= margin < math.pi:
            raise ValueError(f"margin: expected 0 <= margin < pi (radians), got {margin}")
        if not (math.isfinite(cos_margin) and cos_margin >= 0):
            raise ValueError(f"cos_margin: expected a finite number >= 0, got {cos_margin}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing: expected 0 <= label_smoothing < 1, got "
                         f"{label_smoothing}")


def _check_rows(x, grad_rows, lse):
    """check_shard_rows of the C++ ops: grad_rows and lse floating point, (B,), on x's device."""
    for name, t in (("grad_rows", grad_rows), ("lse", lse)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != (x.shape[0],):
            raise ValueError(f"{name}: expected shape ({x.shape[0]},) (one per row of x), got "
                             f"{tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} like x, got {t.device}")


def _single(t):
    """A float64 weight vector as float32 (the kernels read weights in fp32)."""
    return t.to(torch.float32) if t is not None and t.dtype == torch.float64 else t


def margin_ce_shard_fwd(x, weight, target, bias, class_weight, sample_weight, class_offset,
                        num_classes, normalize, scale, margin, cos_margin, label_smoothing,
                        ignore_index, straight_through):
    """One shard's forward: (lse^(r), q^(r)), both (B,) fp32; see docs/design.md."""
    _check_shard(x, weight, target, bias, class_weight, sample_weight, None, class_offset,
                 num_classes, normalize, scale, margin, cos_margin, label_smoothing)
    B, C_l = x.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    if B == 0:
        return torch.empty((0,), **f32), torch.empty((0,), **f32)
    if C_l == 0:
        # No classes: lse^(r) = −inf, q^(r) = 0, NaN where the target is outside [0, C).
        torch_kernel("fill", Cost(bytes=B * 4))
        torch_kernel("where", Cost(bytes=B * 12))
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        return (torch.full((B,), -math.inf, **f32),
                torch.where(bad, torch.full((), math.nan, **f32), torch.zeros((), **f32)))
    with device_guard(x.device):
        x, weight, target, bias, cw, sw = _contiguous(x, weight, target, bias,
                                                      _single(class_weight),
                                                      _single(sample_weight))
        consts = MarginConsts(normalize, scale, margin, cos_margin)
        partial, lse, *_ = tiled.tiled_launch(
            x, weight, target, bias, cw, sw, None, None, None, consts, normalize,
            float(label_smoothing), int(ignore_index), 0, bool(straight_through), True, False,
            shard=(int(class_offset), int(num_classes)))
    return lse, partial


def margin_ce_shard_bwd(grad_rows, x, weight, target, bias, class_weight, sample_weight, lse,
                        grl_lambda, class_offset, num_classes, normalize, scale, margin,
                        cos_margin, label_smoothing, ignore_index, straight_through):
    """One shard's backward from the combined lse and ∂L/∂loss_i: (grad x part in fp32,
    grad W of the shard, grad b of the shard or an empty (0,) tensor)."""
    _check_shard(x, weight, target, bias, class_weight, sample_weight, grl_lambda, class_offset,
                 num_classes, normalize, scale, margin, cos_margin, label_smoothing)
    _check_rows(x, grad_rows, lse)
    B, C_l = x.shape[0], weight.shape[0]
    if B == 0 or C_l == 0:
        torch_kernel("fill", Cost(bytes=x.numel() * 4 + weight.numel() * weight.element_size()))
        return (torch.zeros(x.shape, dtype=torch.float32, device=x.device),
                torch.zeros_like(weight),
                torch.zeros_like(bias) if bias is not None
                else x.new_empty((0,), dtype=torch.float32))
    with device_guard(x.device):
        x, weight, target, bias, cw, sw = _contiguous(x, weight, target, bias,
                                                      _single(class_weight),
                                                      _single(sample_weight))
        consts = MarginConsts(normalize, scale, margin, cos_margin)
        _, _, gx, gw, gb = tiled.tiled_launch(
            x, weight, target, bias, cw, sw, _lambda_on(grl_lambda, x.device),
            grad_rows.to(torch.float32).contiguous(), lse.to(torch.float32).contiguous(),
            consts, normalize, float(label_smoothing), int(ignore_index), 0,
            bool(straight_through), False, True, shard=(int(class_offset), int(num_classes)))
    if gb is None:
        gb = x.new_empty((0,), dtype=torch.float32)
    return gx, gw, gb
