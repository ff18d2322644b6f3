"""The dispatch point of the shard mode: one function per direction, by backend.

The shard mode is one shard's part of the loss and of its gradient (docs/math.md, "Class
shards"); `udat_kernels.reference.shard_forward` / `shard_backward` define it. A backend whose
compiled shard mode has landed runs the op pair `udat_kernels::margin_ce_shard_fwd[_<impl>]` /
`margin_ce_shard_bwd[_<impl>]` (docs/design.md, "Shard mode"); the others are served by the
reference. The sharded loss calls nothing else.
"""

from __future__ import annotations

import torch

from .. import _C_loader, dispatch, reference
from ..ops import _as_lambda_tensor

# Backends whose compiled shard mode serves them, with the suffix of their op pair's names (as
# `dispatch.Backend.impl`): "" is the C++ pair (its CPU kernels, and the CUDA kernels registered
# for the CUDA dispatch key of the same ops), "triton" margin_ce_shard_{fwd,bwd}_triton (the
# Triton backend's large-C kernels). A backend not listed here is served by the reference shard
# mode.
COMPILED = {"cpu": "", "cuda": "", "triton": "triton"}

# The dispatch key under which a C++ backend registers its kernels of the pair "": a build without
# them (CPU only, or older than the backend's shard mode) is told to rebuild.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

# Rows per block of the reference's logits: a block holds at most this many bytes of logits of
# the shard (in the loss dtype); the reference keeps a few temporaries of that size alive. The
# compiled modes use their own blocking (the CPU's: UDAT_CPU_BLOCK_BYTES, 256 MiB of logits).
CHUNK_BYTES = 128 * 2**20


def default_chunk_rows(num_local: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (max(num_local, 1) * itemsize))


def _pair(backend):
    """The compiled (forward, backward) shard ops of `backend`, or None for the reference."""
    if backend not in COMPILED:
        return None
    suffix = f"_{COMPILED[backend]}" if COMPILED[backend] else ""
    if suffix:
        dispatch.get_backend(backend)  # registers a Python backend's ops (imported lazily)
    ops = torch.ops.udat_kernels
    key = _DISPATCH_KEYS.get(backend) if not suffix else None
    if (not _C_loader.available() or not hasattr(ops, "margin_ce_shard_fwd" + suffix)
            or (key and not torch._C._dispatch_has_kernel_for_dispatch_key(
                "udat_kernels::margin_ce_shard_fwd", key))):
        where = f" for the {key} dispatch key" if key else ""
        raise RuntimeError(f"backend: the {backend!r} shard mode needs the op pair "
                           f"udat_kernels::margin_ce_shard_{{fwd,bwd}}{suffix}, which is not "
                           f"registered{where} (the {backend!r} backend is not usable here, or "
                           f"this build of udat_kernels._C predates the shard mode: rebuild it)")
    return (getattr(ops, "margin_ce_shard_fwd" + suffix).default,
            getattr(ops, "margin_ce_shard_bwd" + suffix).default)


def shard_forward(backend, x, weight_shard, target, *, class_offset, num_classes, normalize,
                  scale, margin, cos_margin, bias_shard, class_weight, sample_weight,
                  label_smoothing, ignore_index, straight_through, chunk_rows):
    """(lse_local (B,), partial (B,)) of this shard, in the loss dtype; see
    `reference.shard_forward` for the contract. `backend` is the name `dispatch.select` chose;
    `chunk_rows` is the reference's block height (the compiled modes block by themselves)."""
    pair = _pair(backend)
    if pair is None:
        return reference.shard_forward(
            x, weight_shard, target, class_offset=class_offset, num_classes=num_classes,
            normalize=normalize, scale=scale, margin=margin, cos_margin=cos_margin,
            bias_shard=bias_shard, class_weight=class_weight, sample_weight=sample_weight,
            label_smoothing=label_smoothing, ignore_index=ignore_index,
            straight_through=straight_through, chunk_rows=chunk_rows)
    return pair[0](x, weight_shard, target, bias_shard, class_weight, sample_weight,
                   int(class_offset), int(num_classes), bool(normalize), float(scale),
                   float(margin), float(cos_margin), float(label_smoothing), int(ignore_index),
                   bool(straight_through))


def shard_backward(backend, grad_rows, x, weight_shard, target, lse, *, class_offset,
                   num_classes, normalize, scale, margin, cos_margin, bias_shard, class_weight,
                   sample_weight, label_smoothing, ignore_index, straight_through, grl_lambda,
                   chunk_rows):
    """(grad_x_part (B, D) in the loss dtype, grad_weight_shard (C_l, D), grad_bias_shard or
    None) of this shard, from the global lse and ∂L/∂loss_i; see `reference.shard_backward`."""
    pair = _pair(backend)
    if pair is None:
        return reference.shard_backward(
            grad_rows, x, weight_shard, target, lse, class_offset=class_offset,
            num_classes=num_classes, normalize=normalize, scale=scale, margin=margin,
            cos_margin=cos_margin, bias_shard=bias_shard, class_weight=class_weight,
            sample_weight=sample_weight, label_smoothing=label_smoothing,
            ignore_index=ignore_index, straight_through=straight_through,
            grl_lambda=grl_lambda, chunk_rows=chunk_rows)
    gx, gw, gb = pair[1](grad_rows, x, weight_shard, target, bias_shard, class_weight,
                         sample_weight, lse, _as_lambda_tensor(grl_lambda, x, weight_shard),
                         int(class_offset), int(num_classes), bool(normalize), float(scale),
                         float(margin), float(cos_margin), float(label_smoothing),
                         int(ignore_index), bool(straight_through))
    return gx, gw, (gb if bias_shard is not None else None)
