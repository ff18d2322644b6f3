"""The C++ CPU shard mode (`udat_kernels::margin_ce_shard_fwd` / `margin_ce_shard_bwd`,
docs/design.md, "Shard mode") against the reference shard mode (docs/math.md, "Class shards").

Shard by shard, on the splits of tests/test_distributed_reference.py (uneven and empty shards,
C = 1, 2, 7, shards that own no target), the CPU op's lse^(r), q^(r), part of grad x, grad W and
grad b must match the float64 reference shard mode under the closeness rule of docs/math.md, for
every keyword of the op, both heads, every input dtype, the small-C pass and the row blocks
(several blocks forced by a small UDAT_CPU_BLOCK_BYTES), and non-finite rows. The ordinary op is
the shard mode of one shard, bit for bit; opcheck covers the schema and the fakes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import library

import udat_kernels as uk
from udat_kernels import reference
from udat_kernels.distributed import shard_mode
import shard_helpers
from helpers import (KEYWORDS, assert_close_spec, make_inputs, materialize_keywords, run_loss,
                     tolerance)
from shard_helpers import (BAD_ARGUMENT_IDS, BAD_ARGUMENTS, BAD_BACKWARD_INPUTS, SPLITS,
                           as_double, cuts_of, shard_bwd_args, shard_fwd_args, sharded_loss)

pytestmark = pytest.mark.skipif(not uk._C_loader.available(),
                                reason=f"extension not built: {uk._C_loader.error()}")

OPS = torch.ops.udat_kernels


def check_shards(*args, **kwargs):
    return shard_helpers.check_shards("cpu", *args, **kwargs)


@pytest.mark.parametrize("C,shards", SPLITS)
@pytest.mark.parametrize("case", sorted(KEYWORDS))
def test_every_keyword_on_the_splits_float64(case, shards, C):
    B, D = 11, 9
    x, w, t = make_inputs(B, D, C, x_dtype=torch.float64, w_dtype=torch.float64,
                          seed=C * 31 + shards)
    kwargs = as_double(materialize_keywords(KEYWORDS[case], B, C, True, t))
    kwargs.pop("reduction", None)  # the shard mode has none: per-row partials
    check_shards(x, w, t, cuts_of(C, shards, seed=C + 7 * shards), **kwargs)


@pytest.mark.parametrize("sizes", [[7], [0, 7], [3, 0, 4], [1, 2, 2, 2], [7, 0, 0, 0]])
@pytest.mark.parametrize("case", ["default", "smoothing_weights", "ignore_index", "grl_float"])
def test_linear_head_with_bias(case, sizes):
    B, D, C = 10, 6, 7
    x, w, t = make_inputs(B, D, C, x_dtype=torch.float64, w_dtype=torch.float64, seed=3)
    bias = torch.randn(C, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kwargs = as_double(materialize_keywords(KEYWORDS[case], B, C, False, t))
    check_shards(x, w, t, sizes, angular=False, bias=bias, **kwargs)


# (x dtype, weight dtype); bf16 with bf16 takes the bf16 GEMMs in the row blocks where the CPU
# has them (UDAT_CPU_BF16_GEMM=0: widened to float32).
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float16), (torch.bfloat16, torch.float32)]
# (C, shard sizes, logits bytes a row block may hold, small-C pass allowed): shards of a few
# classes (the small-C pass), and a wider head whose shards take several row blocks each, the
# last also with the small-C pass off (every shard through the row blocks).
PATHS = {
    "small": (7, [3, 0, 4], None, True),
    "blocks": (90, [40, 0, 17, 33], 5 * 40 * 4, True),
    "blocks_no_small": (30, [12, 5, 13], 3 * 13 * 4, False),
}


def _env(monkeypatch, block_bytes, small, bf16_gemm=True):
    if block_bytes is not None:
        monkeypatch.setenv("UDAT_CPU_BLOCK_BYTES", str(block_bytes))
    monkeypatch.setenv("UDAT_CPU_SMALL_C", "16" if small else "0")
    monkeypatch.setenv("UDAT_CPU_BF16_GEMM", "1" if bf16_gemm else "0")


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_dtypes_and_paths(dtypes, path, monkeypatch):
    C, sizes, block_bytes, small = PATHS[path]
    B, D = 23, 16
    _env(monkeypatch, block_bytes, small)
    x, w, t = make_inputs(B, D, C, x_dtype=dtypes[0], w_dtype=dtypes[1], seed=C + B)
    t[[2, 9]] = -100
    g = torch.Generator().manual_seed(6)
    kwargs = dict(label_smoothing=0.1, class_weight=torch.rand(C, generator=g) + 0.2,
                  sample_weight=torch.rand(B, generator=g) + 0.2, cos_margin=0.1,
                  grl_lambda=0.5)
    check_shards(x, w, t, sizes, **kwargs)


def test_bf16_without_the_bf16_gemm(monkeypatch):
    C, sizes, block_bytes, small = PATHS["blocks"]
    _env(monkeypatch, block_bytes, small, bf16_gemm=False)
    x, w, t = make_inputs(19, 16, C, x_dtype=torch.bfloat16, w_dtype=torch.bfloat16, seed=2)
    check_shards(x, w, t, sizes, label_smoothing=0.2)


def test_a_large_head_through_many_row_blocks(monkeypatch):
    """C = 3000 over three uneven shards, two rows of logits a block: the combined loss and
    gradients against the float64 ordinary reference op."""
    B, D, C = 21, 24, 3000
    sizes = [1400, 3, 1597]
    _env(monkeypatch, 2 * 1600 * 4, True)
    x, w, t = make_inputs(B, D, C, seed=17)
    t[4] = -100
    g = torch.Generator().manual_seed(7)
    kwargs = dict(label_smoothing=0.1, class_weight=torch.rand(C, generator=g) + 0.2,
                  margin=0.3, cos_margin=0.1)
    got = sharded_loss(x, w, t, sizes, backend="cpu", **kwargs)
    want = run_loss(reference.angular_margin_cross_entropy, x.double(), w.double(), t,
                    **as_double(kwargs))
    own = run_loss(reference.angular_margin_cross_entropy, x, w, t, **kwargs)
    rtol, atol = tolerance(torch.float32)
    for name, a, b, o in zip(("loss", "grad_x", "grad_weight"), got, want, own):
        assert_close_spec(a, b, rtol, atol, name, torch_own=o)


def test_more_rows_than_a_shard_block(monkeypatch):
    """The shard mode's blocks hold at most 256 rows, whatever the byte budget."""
    monkeypatch.delenv("UDAT_CPU_BLOCK_BYTES", raising=False)
    x, w, t = make_inputs(600, 8, 40, x_dtype=torch.float64, w_dtype=torch.float64, seed=4)
    t[::7] = -100
    check_shards(x, w, t, [23, 17], label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["small", "blocks_no_small"])
def test_non_finite_rows_follow_the_reference(path, dtype, monkeypatch):
    """A NaN feature row, a target outside [0, C) (q^(r) NaN on every shard, its gradient NaN,
    the empty shard's part of grad x zero), and (linear head) a +inf bias."""
    C, sizes, block_bytes, small = PATHS[path]
    _env(monkeypatch, block_bytes, small)
    B, D = 9, 5
    x, w, t = make_inputs(B, D, C, x_dtype=dtype, w_dtype=dtype, seed=9)
    x[1, 0] = float("nan")
    t[3] = -100
    got = check_shards(x, w, t, sizes + [0])
    assert torch.isnan(got[0][0][1]) and not torch.isnan(got[0][0][[0, 2]]).any()
    t[5] = C + 4
    got = check_shards(x, w, t, sizes + [0], label_smoothing=0.1)
    for r in range(len(sizes) + 1):
        assert torch.isnan(got[r][1][5]) and got[r][1][3] == 0
        has_classes = (sizes + [0])[r] > 0
        assert bool(torch.isnan(got[r][2][5]).all()) == has_classes
    assert torch.count_nonzero(got[-1][2]) == 0
    x, w, t = make_inputs(B, D, C, x_dtype=dtype, w_dtype=dtype, seed=10)
    bias = torch.zeros(C, dtype=dtype)
    bias[C - 1] = math.inf
    t[:] = 0
    got = check_shards(x, w, t, sizes, angular=False, bias=bias)
    assert torch.all(got[-1][0] == math.inf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["small", "blocks"])
def test_the_ordinary_op_is_the_shard_mode_of_one_shard(path, dtype, monkeypatch):
    """o = 0, num_classes = C: the ordinary op's lse and gradients (reduction none, the same
    upstream) are the shard mode's, bit for bit — one family of kernels."""
    C, _, block_bytes, small = PATHS[path]
    _env(monkeypatch, block_bytes, small)
    B, D = 13, 16
    x, w, t = make_inputs(B, D, C, x_dtype=dtype, w_dtype=dtype, seed=12)
    t[4] = -100
    g = torch.Generator().manual_seed(8)
    cw = (torch.rand(C, generator=g) + 0.2).to(dtype)
    sw = (torch.rand(B, generator=g) + 0.2).to(dtype)
    up = torch.randn(B, generator=g, dtype=dtype)
    lam = torch.tensor(0.4, dtype=dtype)
    head = (True, 30.0, 0.3, 0.1, 0.1, -100)
    loss, lse, *_ = OPS.margin_ce_fwd(x, w, t, None, cw, sw, None, *head, 0, False, False)
    gx, gw, _ = OPS.margin_ce_bwd(up, x, w, t, None, cw, sw, lse, lam, *head, 0, False)
    s_lse, partial = OPS.margin_ce_shard_fwd(x, w, t, None, cw, sw, 0, C, *head, False)
    s_gx, s_gw, _ = OPS.margin_ce_shard_bwd(up, x, w, t, None, cw, sw, lse, lam, 0, C, *head,
                                            False)
    assert torch.equal(lse, s_lse) and torch.equal(gx, s_gx) and torch.equal(gw, s_gw)
    # loss_i = v_i·(a_i + b·W)·lse_i + q_i (docs/math.md, "Class shards")
    rows = reference._ShardRows(t, num_classes=C, class_weight=cw, sample_weight=sw,
                                label_smoothing=0.1, ignore_index=-100, dtype=dtype,
                                device=x.device)
    combined = rows.mask(rows.v * (rows.a + rows.b * rows.W) * lse + partial)
    torch.testing.assert_close(combined, loss, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("case", ["smoothing_weights", "grl_tensor"])
def test_the_float64_cpu_shard_mode_as_ground_truth(case):
    """check_shards(..., against="cpu"), as a CUDA or Triton shard mode uses it: here the
    float32 reference shard mode against the float64 CPU shard mode."""
    B, D, C = 12, 10, 30
    x, w, t = make_inputs(B, D, C, seed=14)
    kwargs = materialize_keywords(KEYWORDS[case], B, C, True, t)
    shard_helpers.check_shards("reference", x, w, t, [12, 0, 18], against="cpu", **kwargs)


def test_the_cpu_backend_runs_the_compiled_ops():
    assert shard_mode.COMPILED.get("cpu") == ""
    x, w, t = make_inputs(6, 4, 9, seed=13)
    kw = dict(class_offset=2, num_classes=9, normalize=True, scale=64.0, margin=0.5,
              cos_margin=0.0, bias_shard=None, class_weight=None, sample_weight=None,
              label_smoothing=0.0, ignore_index=-100, straight_through=False, chunk_rows=None)
    got = shard_mode.shard_forward("cpu", x, w[2:5], t, **kw)
    direct = OPS.margin_ce_shard_fwd(x, w[2:5], t, None, None, None, 2, 9, True, 64.0, 0.5, 0.0,
                                     0.0, -100, False)
    assert all(torch.equal(a, b) for a, b in zip(got, direct))


@pytest.mark.parametrize("change,name", BAD_ARGUMENTS, ids=BAD_ARGUMENT_IDS)
def test_bad_arguments_are_named(change, name):
    with pytest.raises((ValueError, TypeError), match=name):
        OPS.margin_ce_shard_fwd(*shard_fwd_args(**change).values())
    with pytest.raises((ValueError, TypeError), match=name):
        OPS.margin_ce_shard_bwd(*shard_bwd_args(**change).values())


@pytest.mark.parametrize("change,name", BAD_BACKWARD_INPUTS)
def test_bad_backward_inputs_are_named(change, name):
    with pytest.raises((ValueError, TypeError), match=name):
        OPS.margin_ce_shard_bwd(*shard_bwd_args(**change).values())


@pytest.mark.parametrize("args", [
    shard_fwd_args(), shard_fwd_args(weight=torch.empty(0, 5), class_offset=10),
    shard_fwd_args(normalize=False, bias=torch.randn(4), class_weight=None, sample_weight=None),
], ids=["angular", "empty_shard", "linear"])
def test_opcheck(args):
    library.opcheck(OPS.margin_ce_shard_fwd.default, tuple(args.values()))
    fwd = list(args.items())
    b = dict(grad_rows=torch.randn(6), **dict(fwd[:6]), lse=torch.randn(6) + 3,
             grl_lambda=torch.tensor(0.4), **dict(fwd[6:]))
    library.opcheck(OPS.margin_ce_shard_bwd.default, tuple(b.values()))
