"""The dispatch point of the shard mode: one function per direction, by backend.

The shard mode is one shard's part of the loss and of its gradient (docs/math.md, "Class
shards"); `udat_kernels.reference.shard_forward` / `shard_backward` define it. Every backend is
served by that reference for now: the compiled shard modes (C++ CPU, CUDA, Triton) replace it
here, and only here, when they land — the sharded loss calls nothing else.
"""

from __future__ import annotations

from .. import reference

# Rows per block of the reference's logits: a block holds at most this many bytes of logits of
# the shard (in the loss dtype); the reference keeps a few temporaries of that size alive.
CHUNK_BYTES = 128 * 2**20


def default_chunk_rows(num_local: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (max(num_local, 1) * itemsize))


def shard_forward(backend, x, weight_shard, target, *, class_offset, num_classes, normalize,
                  scale, margin, cos_margin, bias_shard, class_weight, sample_weight,
                  label_smoothing, ignore_index, straight_through, chunk_rows):
    """(lse_local (B,), partial (B,)) of this shard, in the loss dtype; see
    `reference.shard_forward` for the contract. `backend` is the name `dispatch.select` chose."""
    # The compiled shard modes plug in here (by backend name); until then every backend is
    # served by the reference, in blocks of `chunk_rows` rows.
    del backend
    return reference.shard_forward(
        x, weight_shard, target, class_offset=class_offset, num_classes=num_classes,
        normalize=normalize, scale=scale, margin=margin, cos_margin=cos_margin,
        bias_shard=bias_shard, class_weight=class_weight, sample_weight=sample_weight,
        label_smoothing=label_smoothing, ignore_index=ignore_index,
        straight_through=straight_through, chunk_rows=chunk_rows)


def shard_backward(backend, grad_rows, x, weight_shard, target, lse, *, class_offset,
                   num_classes, normalize, scale, margin, cos_margin, bias_shard, class_weight,
                   sample_weight, label_smoothing, ignore_index, straight_through, grl_lambda,
                   chunk_rows):
    """(grad_x_part (B, D) in the loss dtype, grad_weight_shard (C_l, D), grad_bias_shard or
    None) of this shard, from the global lse and ∂L/∂loss_i; see `reference.shard_backward`."""
    # The compiled shard modes plug in here (by backend name); until then every backend is
    # served by the reference, in blocks of `chunk_rows` rows.
    del backend
    return reference.shard_backward(
        grad_rows, x, weight_shard, target, lse, class_offset=class_offset,
        num_classes=num_classes, normalize=normalize, scale=scale, margin=margin,
        cos_margin=cos_margin, bias_shard=bias_shard, class_weight=class_weight,
        sample_weight=sample_weight, label_smoothing=label_smoothing, ignore_index=ignore_index,
        straight_through=straight_through, grl_lambda=grl_lambda, chunk_rows=chunk_rows)
