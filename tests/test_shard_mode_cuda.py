"""The CUDA shard mode on the device (`udat_kernels::margin_ce_shard_fwd` / `margin_ce_shard_bwd`
for the CUDA dispatch key, docs/design.md, "Shard mode").

Shard by shard (tests/shard_helpers.py), lse^(r), q^(r), the part of grad x, grad W and grad b
against the float64 reference shard mode (docs/math.md, "Class shards") under the closeness rule
of docs/math.md, and against the compiled CPU shard mode: every keyword on the splits of the CPU
tests, a split that takes the fused small-C kernel and the GEMM row blocks at once, every dtype,
the linear head with bias, non-finite rows and bad targets; the ordinary op is the shard mode of
one shard bit for bit. The same cases run on the CPU under the CUDA emulator
(tests/cuda_emu/test_emu_shard_mode.py); without a GPU only the registration check runs.
"""

from __future__ import annotations

import math

import pytest
import torch

import udat_kernels as uk
import shard_helpers
from helpers import (KEYWORDS, assert_close_spec, cuda_kernels_unavailable, make_inputs,
                     materialize_keywords, run_loss, tolerance)
from shard_helpers import (BAD_ARGUMENT_IDS, BAD_ARGUMENTS, SPLITS, cuts_of, shard_bwd_args,
                           shard_fwd_args, sharded_loss)
from udat_kernels import reference
from udat_kernels.distributed import shard_mode

OPS = torch.ops.udat_kernels
SIZES = [2, 5, 0, 18]  # fused NC = 2, fused NC = 8, empty, GEMM row blocks
C = sum(SIZES)


REASON = cuda_kernels_unavailable()
gpu = pytest.mark.skipif(REASON is not None, reason=str(REASON))


def test_cuda_shard_kernels_registered():
    """Runs without a GPU: a CUDA build registers the shard pair for the CUDA dispatch key, and
    the sharded loss runs it for the CUDA backend."""
    assert shard_mode.COMPILED.get("cuda") == ""
    if not uk._C_loader.available() or not uk._C_loader.build_info()["cuda"]:
        pytest.skip("extension not built with CUDA sources")
    for op in ("margin_ce_shard_fwd", "margin_ce_shard_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"udat_kernels::{op}", "CUDA")


@pytest.fixture
def row_blocks(monkeypatch):
    """The GEMM shard's rows in blocks of 4."""
    monkeypatch.setenv("UDAT_CUDA_BLOCK_BYTES", str(4 * 18 * 4))


def check(*args, **kwargs):
    return shard_helpers.check_shards("cuda", *args, **kwargs)


def _inputs(B, D, c, dtype=torch.float32, w_dtype=None, seed=0):
    return make_inputs(B, D, c, x_dtype=dtype, w_dtype=w_dtype or dtype, seed=seed,
                       device="cuda")


# C = 1 over four shards is test_one_class_over_four_shards (tests/cuda_emu/test_emu_shard_mode.py
# says why).
SPLITS_WIDER = [s for s in SPLITS if s[0] > 1]
KEYWORD_CASES = [(case, SPLITS_WIDER[i % len(SPLITS_WIDER)])
                 for i, case in enumerate(sorted(KEYWORDS))]


@gpu
@pytest.mark.parametrize("case,split", KEYWORD_CASES,
                         ids=[f"{c}-C{s[0]}x{s[1]}" for c, s in KEYWORD_CASES])
def test_every_keyword_on_the_splits(case, split, row_blocks):
    c, shards = split
    B, D = 11, 9
    x, w, t = _inputs(B, D, c, seed=c * 31 + shards)
    kwargs = materialize_keywords(KEYWORDS[case], B, c, True, t, device="cuda")
    kwargs.pop("reduction", None)
    check(x, w, t, cuts_of(c, shards, seed=c + 7 * shards), **kwargs)
    x, w, t = _inputs(B, D, C, seed=len(case))
    kwargs = materialize_keywords(KEYWORDS[case], B, C, True, t, device="cuda")
    kwargs.pop("reduction", None)
    check(x, w, t, SIZES, **kwargs)


@gpu
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_one_class_over_four_shards(angular):
    """C = 1 over four shards combined as the sharded loss combines them: the combined lse is
    the one shard's own, so the gradients are exactly zero, as the single-device op's."""
    B = 11
    x, w, t = _inputs(B, 9, 1, seed=35)
    t[2] = -100
    bias = None if angular else torch.randn(1, generator=torch.Generator().manual_seed(2)).cuda()
    fn = reference.angular_margin_cross_entropy if angular else reference.linear_cross_entropy
    got = sharded_loss(x, w, t, [0, 1, 0, 0], angular=angular, bias=bias, grl_lambda=0.3,
                       backend="cuda")
    want = run_loss(fn, x.double(), w.double(), t, grl_lambda=0.3,
                    bias=bias.double() if bias is not None else None)
    rtol, atol = tolerance(torch.float32)
    assert_close_spec(got[0], want[0], rtol, atol, "loss")
    assert all(torch.count_nonzero(g) == 0 for g in got[1:] if g is not None)


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
          (torch.float64, torch.float64)]


@gpu
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("force_gemm", [False, True], ids=["paths", "gemm"])
def test_dtypes(dtypes, force_gemm, row_blocks, monkeypatch):
    if force_gemm:
        monkeypatch.setenv("UDAT_CUDA_FORCE_GEMM", "1")
    B = 13
    x, w, t = _inputs(B, 10, C, dtype=dtypes[0], w_dtype=dtypes[1], seed=C + B)
    t[3] = -100
    t[8] = C + 2
    g = torch.Generator().manual_seed(6)
    kw = dict(label_smoothing=0.1, class_weight=(torch.rand(C, generator=g) + 0.2).cuda(),
              sample_weight=(torch.rand(B, generator=g) + 0.2).cuda(), cos_margin=0.1,
              grl_lambda=0.5)
    got = check(x, w, t, SIZES, **kw)
    for r, n in enumerate(SIZES):
        assert torch.isnan(got[r][1][8]) and got[r][1][3] == 0, f"shard {r}"
        assert bool(torch.isnan(got[r][2][8]).all()) == (n > 0), f"shard {r}"
        assert torch.count_nonzero(got[r][2][3]) == 0, f"shard {r}: an ignored row"
    assert torch.all(got[2][0] == -math.inf)


@gpu
def test_linear_head_with_bias(row_blocks):
    B = 12
    x, w, t = _inputs(B, 8, C, seed=3)
    bias = torch.randn(C, generator=torch.Generator().manual_seed(4)).cuda()
    check(x, w, t, SIZES, angular=False, bias=bias, label_smoothing=0.1, grl_lambda=0.5)
    x[4, 1] = math.inf
    t[4] = -100
    got = check(x, w, t, SIZES, angular=False, bias=bias)
    assert all(torch.count_nonzero(got[r][2][4]) == 0 for r in range(len(SIZES)))


@gpu
@pytest.mark.parametrize("case,sizes", [("smoothing_weights", SIZES), ("grl_tensor", [25]),
                                        ("ignore_index", [0, 9, 16])])
def test_against_the_cpu_shard_mode(case, sizes, row_blocks):
    B = 14
    x, w, t = _inputs(B, 10, C, seed=14)
    kwargs = materialize_keywords(KEYWORDS[case], B, C, True, t, device="cuda")
    check(x, w, t, sizes, against="cpu", **kwargs)


@gpu
@pytest.mark.parametrize("c", [7, 300])
def test_the_ordinary_op_is_the_shard_mode_of_one_shard(c):
    B = 19
    x, w, t = _inputs(B, 12, c, seed=12)
    t[4] = -100
    g = torch.Generator().manual_seed(8)
    cw = (torch.rand(c, generator=g) + 0.2).cuda()
    sw = (torch.rand(B, generator=g) + 0.2).cuda()
    up = torch.randn(B, generator=g).cuda()
    lam = torch.tensor(0.4, device="cuda")
    head = (True, 30.0, 0.3, 0.1, 0.1, -100)
    _, lse, *_ = OPS.margin_ce_fwd(x, w, t, None, cw, sw, None, *head, 0, False, False)
    gx, gw, _ = OPS.margin_ce_bwd(up, x, w, t, None, cw, sw, lse, lam, *head, 0, False)
    s_lse, _ = OPS.margin_ce_shard_fwd(x, w, t, None, cw, sw, 0, c, *head, False)
    s_gx, s_gw, _ = OPS.margin_ce_shard_bwd(up, x, w, t, None, cw, sw, lse, lam, 0, c, *head,
                                            False)
    assert torch.equal(lse, s_lse) and torch.equal(gx, s_gx) and torch.equal(gw, s_gw)


@gpu
def test_empty_batch_and_shard():
    def on(args):
        return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    lse, partial = OPS.margin_ce_shard_fwd(*on(shard_fwd_args(
        weight=torch.empty(0, 5), class_offset=10)).values())
    assert torch.all(lse == -math.inf) and torch.count_nonzero(partial) == 0
    gx, gw, gb = OPS.margin_ce_shard_bwd(*on(shard_bwd_args(
        x=torch.empty(0, 5), target=torch.empty(0, dtype=torch.int64), sample_weight=None,
        grad_rows=torch.empty(0), lse=torch.empty(0))).values())
    assert gx.shape == (0, 5) and gw.shape == (4, 5) and torch.count_nonzero(gw) == 0


@gpu
@pytest.mark.parametrize("change,name", BAD_ARGUMENTS, ids=BAD_ARGUMENT_IDS)
def test_bad_arguments_are_named(change, name):
    def on(args):
        return [v.cuda() if isinstance(v, torch.Tensor) and k != "grl_lambda" else v
                for k, v in args.items()]
    with pytest.raises((ValueError, TypeError), match=name):
        OPS.margin_ce_shard_fwd(*on(shard_fwd_args(**change)))
    with pytest.raises((ValueError, TypeError), match=name):
        OPS.margin_ce_shard_bwd(*on(shard_bwd_args(**change)))
