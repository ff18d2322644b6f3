"""Shared by the shard-mode tests (docs/math.md, "Class shards"; docs/design.md, "Shard mode"):
how the classes are cut into shards, each shard's outputs through the shard mode of a backend
and their comparison with the float64 reference shard mode (`check_shards`), and a whole problem
computed shard by shard the way udat_kernels.distributed combines the shards (on one process
here). A compiled shard mode is tested by `check_shards(backend, ...)`, and against another
backend's by comparing `shard_outputs` of both."""

from __future__ import annotations

import torch

from udat_kernels import reference
from udat_kernels.distributed import shard_mode
from helpers import assert_close_spec, make_inputs, tolerance

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
    grad_x = torch.zeros(x.shape, dtype=loss.dtype, device=x.device)
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


def as_double(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in kw.items()}


def shard_outputs(backend, x, w, t, sizes, kw, grad_rows, lse, grl, bias=None):
    """Per shard of `sizes`: (lse^(r), q^(r), grad x part, grad W shard, grad b shard or None)
    from the shard mode of `backend`, every shard's backward given the combined `lse` and the
    per-row upstream `grad_rows`."""
    out = []
    for r, n in enumerate(sizes):
        o = sum(sizes[:r])
        b = bias[o:o + n] if bias is not None else None
        fwd = shard_mode.shard_forward(backend, x, w[o:o + n], t, class_offset=o, bias_shard=b,
                                       chunk_rows=4, **kw)
        bwd = shard_mode.shard_backward(backend, grad_rows, x, w[o:o + n], t, lse,
                                        class_offset=o, bias_shard=b, grl_lambda=grl,
                                        chunk_rows=4, **kw)
        out.append((*fwd, *bwd))
    return out


def close_with_infinities(a, b, rtol, atol, what, own=None):
    """The closeness rule, with infinities (an empty shard's lse^(r) = −inf) required exactly."""
    assert a.shape == b.shape, what
    inf = torch.isinf(b.double())
    assert torch.equal(a.double()[inf], b.double()[inf]), f"{what}: infinities differ"
    keep = ~inf
    assert_close_spec(a[keep], b[keep], rtol, atol, what,
                      torch_own=own[keep] if own is not None else None)


def _on(device, *values):
    return [v.to(device) if isinstance(v, torch.Tensor) else
            ({k: _on(device, u)[0] for k, u in v.items()} if isinstance(v, dict) else v)
            for v in values]


def check_shards(backend, x, w, t, sizes, *, angular=True, bias=None, upstream_seed=3,
                 against="reference", **kwargs):
    """The shard mode of `backend` on (x, w) against the shard mode of `against` ("reference",
    or "cpu": the compiled CPU shard mode, on the CPU) on the same inputs in float64
    (docs/math.md, "Closeness and tolerances"; where the problem is ill-conditioned, twice the
    reference's own error in the inputs' dtype), shard by shard: lse^(r), q^(r), grad x part,
    grad W, grad b, with their dtypes and shapes. Every shard gets the combined lse of the whole
    problem and a random per-row upstream gradient. `kwargs` are the op's keywords (no
    reduction). Returns the backend's outputs (`shard_outputs`)."""
    C, B = w.shape[0], x.shape[0]
    _, grl, kw = shard_keywords(C, angular=angular, **kwargs)
    kw64 = as_double(kw)
    x64, w64 = x.double(), w.double()
    b64 = bias.double() if bias is not None else None
    lse = reference.shard_forward(x64.cpu(), w64.cpu(), t.cpu(), class_offset=0,
                                  bias_shard=b64.cpu() if b64 is not None else None,
                                  **{k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                     for k, v in kw64.items()})[0].to(x.device)
    g = torch.Generator().manual_seed(upstream_seed)
    grad_rows = torch.randn(B, generator=g, dtype=torch.float64).to(x.device)
    got = shard_outputs(backend, x, w, t, sizes, kw, grad_rows, lse, grl, bias)
    truth = "cpu" if against == "cpu" else x.device
    want = shard_outputs(against, *_on(truth, x64, w64, t), sizes,
                         *_on(truth, kw64, grad_rows, lse, grl, b64))
    low = torch.float64 not in (x.dtype, w.dtype)
    own = (shard_outputs("reference", x, w, t, sizes, kw, grad_rows, lse, grl, bias) if low
           else None)
    rtol, atol = tolerance(x.dtype, w.dtype)
    acc = torch.float32 if low else torch.float64
    names = ("lse", "partial", "grad_x", "grad_weight", "grad_bias")
    for r, n in enumerate(sizes):
        lse_r, q_r, gx_r, gw_r, gb_r = got[r]
        assert lse_r.dtype == acc and q_r.dtype == acc and gx_r.dtype == acc, f"shard {r}"
        assert lse_r.shape == q_r.shape == (B,) and gx_r.shape == x.shape, f"shard {r}"
        assert gw_r.dtype == w.dtype and gw_r.shape == (n, x.shape[1]), f"shard {r}"
        if bias is None:
            assert gb_r is None, f"shard {r}: grad_bias"
        else:
            assert gb_r.dtype == bias.dtype and gb_r.shape == (n,), f"shard {r}: grad_bias"
        for i, name in enumerate(names):
            if want[r][i] is None:
                continue
            close_with_infinities(got[r][i], want[r][i], rtol, atol,
                                  f"{backend} shard {r} of {sizes}: {name}",
                                  own=own[r][i] if own is not None else None)
    return got


def shard_fwd_args(**change):
    """The shard forward's arguments in schema order (a shard [3, 7) of 10 classes, 6 rows, an
    ignored row), with `change` applied: for argument errors and opcheck."""
    x, w, t = make_inputs(6, 5, 10, seed=22)
    t[2] = -100
    g = torch.Generator().manual_seed(1)
    args = dict(x=x, weight=w[3:7], target=t, bias=None, class_weight=torch.rand(10, generator=g),
                sample_weight=torch.rand(6, generator=g), class_offset=3, num_classes=10,
                normalize=True, scale=16.0, margin=0.3, cos_margin=0.1, label_smoothing=0.05,
                ignore_index=-100, straight_through=False)
    args.update(change)
    return args


def shard_bwd_args(**change):
    """The shard backward's arguments in schema order, as `shard_fwd_args`."""
    rows = {k: change.pop(k) for k in ("grad_rows", "lse", "grl_lambda") if k in change}
    fwd = list(shard_fwd_args(**change).items())
    return dict(grad_rows=rows.get("grad_rows", torch.randn(6)), **dict(fwd[:6]),
                lse=rows.get("lse", torch.randn(6) + 3),
                grl_lambda=rows.get("grl_lambda", torch.tensor(0.4)), **dict(fwd[6:]))


# (change to shard_fwd_args, the argument the error must name), for both directions.
BAD_ARGUMENTS = [
    (dict(class_offset=7), "class_offset"), (dict(class_offset=-1), "class_offset"),
    (dict(num_classes=0), "num_classes"), (dict(class_weight=torch.ones(4)), "class_weight"),
    (dict(weight=torch.ones(4, 6)), "weight"),
    (dict(target=torch.zeros(6, dtype=torch.int32)), "target"),
    (dict(sample_weight=torch.ones(5)), "sample_weight"),
    (dict(bias=torch.zeros(4)), "bias"),
    (dict(normalize=False, bias=torch.zeros(10)), "bias"),
]
BAD_ARGUMENT_IDS = ["offset_past_the_end", "negative_offset", "no_classes",
                    "class_weight_of_the_shard", "weight_width", "int32_target",
                    "sample_weight_length", "bias_on_the_angular_head", "bias_of_the_whole_head"]
# The backward's own inputs.
BAD_BACKWARD_INPUTS = [(dict(grad_rows=torch.ones(5)), "grad_rows"),
                       (dict(lse=torch.ones(6, 1)), "lse"),
                       (dict(lse=torch.ones(6, dtype=torch.int64)), "lse"),
                       (dict(grl_lambda=torch.ones(2)), "grl_lambda")]
