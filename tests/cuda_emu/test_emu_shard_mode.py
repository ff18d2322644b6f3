"""The CUDA shard mode (`margin_ce_shard_fwd` / `margin_ce_shard_bwd` for the CUDA dispatch key,
docs/design.md, "Shard mode") run from its own sources under the checking emulator, served here
as the op pair `..._emu` (register.cpp) through `shard_mode.COMPILED`.

Shard by shard (tests/shard_helpers.py), lse^(r), q^(r), the part of grad x, grad W and grad b
against the float64 reference shard mode (docs/math.md, "Class shards"; the closeness rule and
tolerances of "Closeness and tolerances") and against the compiled CPU shard mode. One split,
[2, 5, 0, 18] of C = 25, covers both paths at once: the fused small-C kernel with two and with
eight weight rows (offsets 0 and 2), an empty shard, and the GEMM row blocks (offset 7, several
blocks); every row's target is owned by one shard and seen by the others. Sizes are tiny: these
run under ctest for the emulation build (labels: emu), and the AddressSanitizer build takes one
case (CMakeLists.txt)."""

from __future__ import annotations

import math

import pytest
import torch

import shard_helpers
from helpers import (KEYWORDS, assert_close_spec, make_inputs, materialize_keywords, run_loss,
                     tolerance)
from shard_helpers import (SPLITS, as_double, cuts_of, shard_bwd_args, shard_fwd_args,
                           sharded_loss)
from udat_kernels import reference
from udat_kernels.distributed import shard_mode

OPS = torch.ops.udat_kernels
SIZES = [2, 5, 0, 18]  # fused NC = 2 at offset 0, fused NC = 8 at 2, empty, GEMM blocks at 7
C = sum(SIZES)


@pytest.fixture
def shards(emu, monkeypatch):
    """The CUDA backend's shard mode served by the emulated op pair; the GEMM shard's rows in
    blocks of 4 (its logits: 4 × 18 float32)."""
    monkeypatch.setitem(shard_mode.COMPILED, "cuda", "emu")
    monkeypatch.setenv("UDAT_CUDA_BLOCK_BYTES", str(4 * 18 * 4))
    return emu


def check(*args, **kwargs):
    return shard_helpers.check_shards("cuda", *args, **kwargs)


def _rich(B, seed=6):
    """Label smoothing, class and sample weights, a cosine margin and the fused GRL."""
    g = torch.Generator().manual_seed(seed)
    return dict(label_smoothing=0.1, class_weight=torch.rand(C, generator=g) + 0.2,
                sample_weight=torch.rand(B, generator=g) + 0.2, cos_margin=0.1,
                grl_lambda=0.5)


def test_both_paths_run(shards):
    """The split runs the kernels it is meant to: the fused kernel for the two small shards,
    the epilogue over several row blocks for the wide one, nothing for the empty one."""
    x, w, t = make_inputs(13, 10, C, seed=1)
    check(x, w, t, SIZES)
    names = [k["name"].split("<")[0] for k in shards.kernels()]
    assert names.count("small_c_kernel") == 4, names  # two shards, forward and backward
    assert names.count("epilogue_kernel") >= 2 * 4, names  # 13 rows in blocks of 4, twice


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
          (torch.float64, torch.float64)]


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_dtypes_on_both_paths(shards, dtypes):
    """Every dtype: the loss dtype's lse^(r), q^(r) and grad x part (float32 for half inputs,
    widened from x on the fused path), grad W in weight's dtype; an ignored row and a target
    outside [0, C) (NaN on every shard holding classes, zeros from the empty one)."""
    B = 13
    x, w, t = make_inputs(B, 10, C, x_dtype=dtypes[0], w_dtype=dtypes[1], seed=C + B)
    t[3] = -100
    t[8] = C + 2
    got = check(x, w, t, SIZES, **_rich(B))
    for r, n in enumerate(SIZES):
        assert torch.isnan(got[r][1][8]) and got[r][1][3] == 0, f"shard {r}"
        assert bool(torch.isnan(got[r][2][8]).all()) == (n > 0), f"shard {r}"
        assert torch.count_nonzero(got[r][2][3]) == 0, f"shard {r}: an ignored row"
    assert torch.all(got[2][0] == -math.inf) and torch.count_nonzero(got[2][2]) == 0


# Every keyword of the op in turn on the splits of the CPU and Triton shard tests: C = 7 whole,
# 2 over three shards, 7 over two and four (the fused kernel, empty shards) and 33 over three (the
# GEMM row blocks). The reductions are the caller's in the shard mode: those cases are left out.
# C = 1 over four shards is test_one_class_over_four_shards: there the exact gradient is zero and
# a given float64 lse rounded to float32 makes any float32 backward rounding noise of z − lse
# (the CUDA kernels' cosines, x·W_j times two reciprocal norms, are noisier than PyTorch's by
# 1.4× on average over 12 seeds, above the rule's 2× on 2 of them).
EMU_SPLITS = [s for s in SPLITS if s[0] > 1]
KEYWORD_CASES = [(case, EMU_SPLITS[i % len(EMU_SPLITS)])
                 for i, case in enumerate(c for c in sorted(KEYWORDS) if c not in ("sum", "none"))]


@pytest.mark.parametrize("case,split", KEYWORD_CASES,
                         ids=[f"{c}-C{s[0]}x{s[1]}" for c, s in KEYWORD_CASES])
def test_keywords(shards, case, split):
    c, n = split
    B, D = 11, 9
    x, w, t = make_inputs(B, D, c, seed=c * 31 + n)
    kwargs = materialize_keywords(KEYWORDS[case], B, c, True, t)
    kwargs.pop("reduction", None)
    check(x, w, t, cuts_of(c, n, seed=c + 7 * n), **kwargs)


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_one_class_over_four_shards(shards, angular):
    """C = 1 over four shards (three without classes), combined as the sharded loss combines
    them: the combined lse is the one shard's own, so the gradients are exactly zero, as the
    single-device op's; the loss against the float64 reference op."""
    B = 11
    x, w, t = make_inputs(B, 9, 1, seed=35)
    t[2] = -100
    bias = None if angular else torch.randn(1, generator=torch.Generator().manual_seed(2))
    fn = reference.angular_margin_cross_entropy if angular else reference.linear_cross_entropy
    got = sharded_loss(x, w, t, [0, 1, 0, 0], angular=angular, bias=bias, grl_lambda=0.3,
                       backend="cuda")
    want = run_loss(fn, x.double(), w.double(), t, grl_lambda=0.3,
                    bias=bias.double() if bias is not None else None)
    rtol, atol = tolerance(torch.float32)
    assert_close_spec(got[0], want[0], rtol, atol, "loss")
    for g in got[1:]:
        if g is not None:
            assert torch.count_nonzero(g) == 0


def test_linear_head_with_bias(shards):
    """The linear head: bias (C_l,) of each shard, grad b; an ignored row with an infinite
    feature gets exactly zero in its part of grad x on both paths."""
    B = 12
    x, w, t = make_inputs(B, 8, C, seed=3)
    bias = torch.randn(C, generator=torch.Generator().manual_seed(4))
    kw = _rich(B)
    kw.pop("cos_margin")
    check(x, w, t, SIZES, angular=False, bias=bias, **kw)
    x[4, 1] = math.inf
    t[4] = -100
    got = check(x, w, t, SIZES, angular=False, bias=bias)
    assert all(torch.count_nonzero(got[r][2][4]) == 0 for r in range(len(SIZES)))


@pytest.mark.parametrize("case,sizes", [("smoothing_weights", SIZES), ("grl_tensor", [25]),
                                        ("ignore_index", [0, 9, 16])])
def test_against_the_cpu_shard_mode(shards, case, sizes):
    """The same inputs through the compiled CPU shard mode (in float64) and the emulated CUDA
    one, the whole head included (one shard: the GEMM path at offset 0)."""
    B = 14
    x, w, t = make_inputs(B, 10, C, seed=14)
    kwargs = materialize_keywords(KEYWORDS[case], B, C, True, t)
    check(x, w, t, sizes, against="cpu", **kwargs)


def test_forced_gemm_on_tiny_shards(shards, monkeypatch):
    """The GEMM path on shards of one and two classes (forced), fp16 and bf16 rows."""
    monkeypatch.setenv("UDAT_CUDA_FORCE_GEMM", "1")
    for dtype in (torch.float16, torch.bfloat16):
        x, w, t = make_inputs(9, 6, 4, x_dtype=dtype, w_dtype=dtype, seed=2)
        check(x, w, t, [1, 2, 0, 1], label_smoothing=0.05, grl_lambda=0.3)
    launched = {k["name"].split("<")[0] for k in shards.kernels()}
    assert "small_c_kernel" not in launched and "epilogue_kernel" in launched


def test_the_ordinary_op_is_the_shard_mode_of_one_shard(shards):
    """o = 0 and C_l = C: the shard mode's lse and gradients are the ordinary CUDA op's (reduction
    none, the same upstream per row) bit for bit, on both paths (one kernel family)."""
    B = 10
    for c in (7, 25):
        x, w, t = make_inputs(B, 8, c, seed=c)
        g = torch.Generator().manual_seed(1)
        cw = torch.rand(c, generator=g) + 0.2
        up = torch.randn(B, generator=g)
        args = (x, w, t, None, cw, None)
        opts = (True, 64.0, 0.5, 0.1, 0.1, -100)
        lse_s, partial = OPS.margin_ce_shard_fwd_emu(*args, 0, c, *opts, False)
        loss, lse_o, *_ = OPS.margin_ce_fwd_emu(*args, None, *opts, 0, False, False)
        assert torch.equal(lse_s, lse_o)
        # loss_i = v_i·(a_i + b·W)·lse_i + q_i (docs/math.md, "Class shards")
        rows = reference._ShardRows(t, num_classes=c, class_weight=cw, sample_weight=None,
                                    label_smoothing=0.1, ignore_index=-100,
                                    dtype=torch.float32, device=x.device)
        combined = rows.v * (rows.a + rows.b * rows.W) * lse_s + partial
        torch.testing.assert_close(combined, loss, rtol=1e-5, atol=1e-5)
        lam = torch.tensor(0.5)
        gs = OPS.margin_ce_shard_bwd_emu(up, *args, lse_o, lam, 0, c, *opts, False)
        go = OPS.margin_ce_bwd_emu(up, *args, lse_o, lam, *opts, 0, False)
        for a, b in zip(gs, go):
            assert torch.equal(a, b)


def test_a_whole_problem_shard_by_shard(shards):
    """The split combined as the sharded loss combines it: loss and gradients against the
    float64 ordinary reference op."""
    B = 13
    x, w, t = make_inputs(B, 10, C, seed=17)
    t[4] = -100
    kwargs = _rich(B)
    got = sharded_loss(x, w, t, SIZES, backend="cuda", **kwargs)
    want = run_loss(reference.angular_margin_cross_entropy, x.double(), w.double(), t,
                    **as_double(kwargs))
    own = run_loss(reference.angular_margin_cross_entropy, x, w, t, **kwargs)
    rtol, atol = tolerance(torch.float32)
    for name, a, b, o in zip(("loss", "grad_x", "grad_weight"), got, want, own):
        assert_close_spec(a, b, rtol, atol, name, torch_own=o)


def test_empty_batch_and_argument_errors(shards):
    lse, partial = OPS.margin_ce_shard_fwd_emu(*shard_fwd_args(
        x=torch.empty(0, 5), target=torch.empty(0, dtype=torch.int64),
        sample_weight=None).values())
    assert lse.shape == partial.shape == (0,) and lse.dtype == torch.float32
    gx, gw, gb = OPS.margin_ce_shard_bwd_emu(*shard_bwd_args(
        x=torch.empty(0, 5), target=torch.empty(0, dtype=torch.int64), sample_weight=None,
        grad_rows=torch.empty(0), lse=torch.empty(0)).values())
    assert gx.shape == (0, 5) and gx.dtype == torch.float32 and gb.shape == (0,)
    assert gw.shape == (4, 5) and torch.count_nonzero(gw) == 0
    for change, name in shard_helpers.BAD_ARGUMENTS[:3] + shard_helpers.BAD_BACKWARD_INPUTS:
        with pytest.raises((ValueError, TypeError), match=name):
            OPS.margin_ce_shard_bwd_emu(*shard_bwd_args(**change).values())
