"""Shared by the shard-mode tests (docs/math.md, "Class shards"): how the classes are cut into
shards, and a whole problem computed shard by shard through the shard mode of a backend, the
way udat_kernels.distributed combines the shards (on one process here)."""

from __future__ import annotations

import torch

from udat_kernels import reference
from udat_kernels.distributed import shard_mode

# (C, number of shards): one shard (the ordinary op), C = 1 with three empty shards, C = 2 over
# three shards, C = 7 over two and four, and a wider head over three.
SPLITS = [(7, 1), (1, 4), (2, 3), (7, 2), (7, 4), (33, 3)]


def cuts_of(C, shards, seed):
    """Contiguous shard sizes summing to C, random and uneven (empty shards allowed)."""
    g = torch.Generator().manual_seed(seed)
    points = sorted(torch.randint(0, C + 1, (shards - 1,), generator=g).tolist())
    bounds = [0, *points, C]
    return [bounds[i + 1] - bounds[i] for i in range(shards)]


def shard_keywords(C, *, angular=True, **kwargs):
    """(reduction, grl_lambda, keywords of the shard mode but class_offset, bias_shard and
    chunk_rows) from the keywords of the ordinary op."""
    reduction = kwargs.pop("reduction", "mean")
    grl = kwargs.pop("grl_lambda", None)
    margin_grad = kwargs.pop("margin_grad", "exact")
    kw = dict(num_classes=C, class_weight=kwargs.pop("class_weight", None),
              sample_weight=kwargs.pop("sample_weight", None),
              label_smoothing=kwargs.pop("label_smoothing", 0.0),
              ignore_index=kwargs.pop("ignore_index", -100), normalize=angular,
              scale=kwargs.pop("scale", 64.0), margin=kwargs.pop("margin", 0.5),
              cos_margin=kwargs.pop("cos_margin", 0.0),
              straight_through=margin_grad == "straight_through")
    if not angular:
        kw.update(scale=1.0, margin=0.0, cos_margin=0.0)
    assert not kwargs, kwargs
    return reduction, grl, kw


def sharded_loss(x, weight, target, sizes, *, angular=True, bias=None, upstream_seed=1,
                 chunk_rows=None, backend="reference", **kwargs):
    """(loss, grad x, grad W, grad b) of the problem computed shard by shard with the shard
    mode of `backend`, for the random upstream gradient that `run_loss` uses."""
    C = weight.shape[0]
    reduction, grl, kw = shard_keywords(C, angular=angular, **kwargs)
    common = {k: kw[k] for k in ("num_classes", "class_weight", "sample_weight",
                                 "label_smoothing", "ignore_index")}
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    parts = []
    for o, n in zip(offsets, sizes):
        b = bias[o:o + n] if bias is not None else None
        parts.append(shard_mode.shard_forward(backend, x, weight[o:o + n], target, class_offset=o,
                                              bias_shard=b, chunk_rows=chunk_rows, **kw))
    lse_parts = torch.stack([p[0] for p in parts])
    partial_parts = torch.stack([p[1] for p in parts])
    loss_rows, lse = reference.shard_combine(lse_parts, partial_parts, target, **common)
    denom = reference.shard_mean_denominator(target, num_classes=C,
                                             class_weight=common["class_weight"],
                                             sample_weight=common["sample_weight"],
                                             ignore_index=common["ignore_index"],
                                             dtype=loss_rows.dtype)
    loss = reference.shard_reduce(loss_rows, reduction, denom)
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss)
    grad_rows = reference.shard_grad_rows(upstream, x.shape[0], reduction, denom)
    grad_x = torch.zeros(x.shape, dtype=loss.dtype)
    grad_w, grad_b = [], []
    for o, n in zip(offsets, sizes):
        b = bias[o:o + n] if bias is not None else None
        gx, gw, gb = shard_mode.shard_backward(backend, grad_rows, x, weight[o:o + n], target,
                                               lse, class_offset=o, bias_shard=b,
                                               grl_lambda=grl, chunk_rows=chunk_rows, **kw)
        assert gx.dtype == loss.dtype and gw.dtype == weight.dtype and gw.shape == (n, x.shape[1])
        grad_x += gx
        grad_w.append(gw)
        if bias is not None:
            assert gb.dtype == bias.dtype and gb.shape == (n,)
            grad_b.append(gb)
        else:
            assert gb is None
    return (loss, grad_x.to(x.dtype), torch.cat(grad_w),
            torch.cat(grad_b) if bias is not None else None)
