"""The launches a call would make on a GPU, planned on the CPU without running anything.

`plan(B, D, C, dtype)` runs the op bodies of launch.py on meta tensors inside a dry run
(_runtime.planning) with a stand-in for the device (an H200 by default), and returns the
Recorder: every launch's kernel and grid, and the distinct specializations. The grid test, the
ahead-of-time compile (the GPU target shapes) and the performance model read it.
`plan_shard` plans one shard's step of the shard mode alike.
"""

from __future__ import annotations

import torch

from . import launch
from ._runtime import H200, DeviceInfo, Recorder, planning

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def plan(B: int, D: int, C: int, dtype="bf16", *, w_dtype=None, normalize: bool = True,
         margin: float = 0.5, reduction: int = 1, grad_in_forward: bool | None = None,
         grl: bool = True, info: DeviceInfo = H200) -> Recorder:
    """The launches of one training step (forward + backward) of the loss at (B, D, C).

    grad_in_forward None: the backend's own choice (the gradient in the forward for the tiled
    path, recomputed in the backward for small heads), as the loss op makes it.
    """
    dt = _DTYPES.get(dtype, dtype)
    wdt = _DTYPES.get(w_dtype, w_dtype) if w_dtype is not None else dt
    if grad_in_forward is None:
        grad_in_forward = not launch.use_small_c(C)
    x, w = _meta(B, D, dtype=dt), _meta(C, D, dtype=wdt)
    t = _meta(B, dtype=torch.int64)
    bias = None if normalize else _meta(C, dtype=wdt)
    lam = _meta(dtype=torch.float32) if grl else None
    margin_args = (normalize, 64.0, margin, 0.0, 0.0, -100, reduction, False)
    with planning(info) as rec:
        loss, lse, *_ = launch.margin_ce_fwd(x, w, t, bias, None, None, lam, *margin_args,
                                             grad_in_forward)
        if not grad_in_forward:
            launch.margin_ce_bwd(torch.ones_like(loss), x, w, t, bias, None, None, lse, lam,
                                 *margin_args)
    return rec


def plan_shard(B: int, D: int, C_l: int, num_classes: int | None = None, dtype="bf16", *,
               w_dtype=None, normalize: bool = True, class_offset: int = 0,
               info: DeviceInfo = H200) -> Recorder:
    """The launches of one shard's step in the shard mode (docs/design.md, "Shard mode"): its
    forward and its backward, with C_l classes of num_classes (default 2·C_l) and every
    optional input that changes a launch (class weights, sample weights, λ)."""
    dt = _DTYPES.get(dtype, dtype)
    wdt = _DTYPES.get(w_dtype, w_dtype) if w_dtype is not None else dt
    NC = num_classes if num_classes is not None else max(1, 2 * C_l)
    x, w = _meta(B, D, dtype=dt), _meta(C_l, D, dtype=wdt)
    t = _meta(B, dtype=torch.int64)
    bias = None if normalize else _meta(C_l, dtype=wdt)
    cw, sw = _meta(NC), _meta(B)
    head = (normalize, 64.0, 0.5, 0.0, 0.1, -100, False)
    with planning(info) as rec:
        lse, _ = launch.margin_ce_shard_fwd(x, w, t, bias, cw, sw, class_offset, NC, *head)
        launch.margin_ce_shard_bwd(torch.ones_like(lse), x, w, t, bias, cw, sw, lse,
                                   _meta(dtype=torch.float32), class_offset, NC, *head)
    return rec
