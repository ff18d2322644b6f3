"""Argument checks of the public functions (the arguments of docs/math.md, "The op").

Every failure is a ValueError or TypeError whose message starts with the argument's name. The
static checks (shapes, dtypes, devices, scalar ranges) cost no device work. The data-dependent ones
(target range, a tensor λ's finiteness) read device memory, so they run only with validate=True
and outside torch.compile; the CPU kernels check target range themselves in any case.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
MARGIN_GRADS = ("exact", "straight_through")


def reduction_code(reduction) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {tuple(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction]


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    return float(value)


def _tensor(name: str, value, *, dims: int, shape=None, device=None, float_dtype=True):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if float_dtype and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32/float16/bfloat16/float64, got {value.dtype}")
    if value.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like x, got {value.device}")


def check_features(x, weight) -> None:
    """x (B, D) and weight (C, D): floating point, same device, matching D, C >= 1."""
    _tensor("x", x, dims=2)
    _tensor("weight", weight, dims=2, device=x.device)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight: expected (C, {x.shape[1]}) to match x's feature size, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight: needs at least one class, got shape {tuple(weight.shape)}")


def check_call(x, weight, target, *, bias=None, class_weight=None, sample_weight=None,
               label_smoothing=0.0, ignore_index=-100, reduction="mean", grl_lambda=None,
               angular=None) -> int:
    """Static checks of one call; returns the reduction code. `angular` holds the angular
    function's (scale, margin, cos_margin, margin_grad), None for the linear function."""
    check_features(x, weight)
    B, C = x.shape[0], weight.shape[0]
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a torch.Tensor of int64 class indices, "
                        f"got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target: expected int64 class indices, got {target.dtype}")
    _tensor("target", target, dims=1, shape=(B,), device=x.device, float_dtype=False)
    for name, value, n in (("bias", bias, C), ("class_weight", class_weight, C),
                           ("sample_weight", sample_weight, B)):
        if value is not None:
            _tensor(name, value, dims=1, shape=(n,), device=x.device)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    ls = _number("label_smoothing", label_smoothing)
    if not 0.0 <= ls < 1.0:
        raise ValueError(f"label_smoothing: expected 0 <= label_smoothing < 1, got {ls}")
    if angular is not None:
        scale, margin, cos_margin, margin_grad = angular
        s = _number("scale", scale)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scale: expected a finite positive number, got {s}")
        m = _number("margin", margin)
        if not 0.0 <= m < math.pi:
            raise ValueError(f"margin: expected 0 <= margin < pi (radians), got {m}")
        m3 = _number("cos_margin", cos_margin)
        if not (math.isfinite(m3) and m3 >= 0):
            raise ValueError(f"cos_margin: expected a finite number >= 0, got {m3}")
        if margin_grad not in MARGIN_GRADS:
            raise ValueError(f"margin_grad: expected one of {MARGIN_GRADS}, got {margin_grad!r}")
    if grl_lambda is not None:
        check_lambda(grl_lambda)
    return reduction_code(reduction)


def check_lambda(value, name: str = "grl_lambda"):
    """λ of a gradient reversal: a finite real number (returned as a float) or a 0-dim
    floating-point tensor (returned as it is; its value is checked here only on the CPU, where
    reading it costs no device sync)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"{name}: expected a 0-dim floating-point tensor, got "
                             f"shape {tuple(value.shape)} {value.dtype}")
        if (value.device.type == "cpu" and not torch.compiler.is_compiling()
                and not math.isfinite(float(value))):
            raise ValueError(f"{name}: expected a finite value, got {float(value)}")
        return value
    lam = _number(name, value)
    if not math.isfinite(lam):
        raise ValueError(f"{name}: expected a finite number, got {lam}")
    return lam


def check_data(target, num_classes: int, ignore_index: int, grl_lambda, *,
               targets: bool = True) -> None:
    """The checks that read tensor values (a device sync on CUDA). `targets=False` leaves the
    target range to a kernel that checks it itself."""
    if torch.compiler.is_compiling():
        return
    if targets:
        bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(f"target: value {value} is outside [0, {num_classes}) and is "
                             f"not ignore_index ({ignore_index})")
    if isinstance(grl_lambda, torch.Tensor) and not bool(torch.isfinite(grl_lambda)):
        raise ValueError(f"grl_lambda: expected a finite value, got {grl_lambda.item()}")
