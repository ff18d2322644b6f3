"""The Triton shard mode (`udat_kernels::margin_ce_shard_fwd_triton` / `margin_ce_shard_bwd_triton`,
docs/design.md, "Shard mode"), on CUDA or, without a GPU, on CPU tensors through the Triton
interpreter.

Shard by shard (tests/shard_helpers.py), the Triton op's lse^(r), q^(r), part of grad x, grad W
and grad b must match the float64 reference shard mode (docs/math.md, "Class shards") under the
closeness rule of docs/math.md: every keyword of the op on the splits of the CPU tests (uneven
and empty shards, C = 1, 2, 7, shards that own no target), the linear head with bias, every input
dtype, several class tiles and row chunks, non-finite rows and bad targets; and the compiled CPU
shard mode on the same inputs. The ordinary op is the shard mode of one shard, bit for bit (one
kernel family); argument errors name the argument; opcheck covers the schema and the fakes. The
interpreter is slow: the sizes are tiny and every case runs once.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import library

if not torch.cuda.is_available():
    # Must precede the first import of triton (kernels are bound to the interpreter then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import udat_kernels as uk  # noqa: E402
from udat_kernels import reference  # noqa: E402
from udat_kernels.distributed import shard_mode  # noqa: E402
from udat_kernels.triton_backend import registration, small_c, tiled  # noqa: E402
import shard_helpers  # noqa: E402
from helpers import (KEYWORDS, assert_close_spec, make_inputs, materialize_keywords,  # noqa: E402
                     run_loss, tolerance)
from shard_helpers import (BAD_ARGUMENT_IDS, BAD_ARGUMENTS, BAD_BACKWARD_INPUTS,  # noqa: E402
                           SPLITS, as_double, cuts_of, shard_bwd_args, shard_fwd_args,
                           sharded_loss)

pytestmark = pytest.mark.skipif(
    not uk._C_loader.available() or not hasattr(torch.ops.udat_kernels,
                                                registration.SHARD_FWD_NAME),
    reason="the Triton shard ops take their schema from the compiled extension's shard ops, "
           f"which are not built: {uk._C_loader.error()}")

OPS = torch.ops.udat_kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """16×16×16 tiles (the interpreter's; on a GPU forced), so that tiny heads span several."""
    if DEVICE == "cuda":
        monkeypatch.setattr(tiled, "TILE", (16, 16, 16, 4, 1))


def check_shards(*args, **kwargs):
    return shard_helpers.check_shards("triton", *args, **kwargs)


def _inputs(B, D, C, dtype=torch.float32, w_dtype=None, seed=0):
    return make_inputs(B, D, C, x_dtype=dtype, w_dtype=w_dtype or dtype, seed=seed,
                       device=DEVICE)


def _on_device(args):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


# Every keyword once, the splits taken in turn (each split several times).
KEYWORD_CASES = [(case, SPLITS[i % len(SPLITS)]) for i, case in enumerate(sorted(KEYWORDS))]


@pytest.mark.parametrize("case,split", KEYWORD_CASES,
                         ids=[f"{c}-C{s[0]}x{s[1]}" for c, s in KEYWORD_CASES])
def test_every_keyword_on_the_splits(case, split):
    C, shards = split
    B, D = 11, 9
    x, w, t = _inputs(B, D, C, seed=C * 31 + shards)
    kwargs = materialize_keywords(KEYWORDS[case], B, C, True, t, device=DEVICE)
    kwargs.pop("reduction", None)  # the shard mode has none: per-row partials
    check_shards(x, w, t, cuts_of(C, shards, seed=C + 7 * shards), **kwargs)


@pytest.mark.parametrize("case,sizes", [("default", [3, 0, 4]), ("smoothing_weights", [7]),
                                        ("ignore_index", [1, 2, 2, 2]),
                                        ("grl_float", [7, 0, 0, 0])])
def test_linear_head_with_bias(case, sizes):
    B, D, C = 10, 6, 7
    x, w, t = _inputs(B, D, C, seed=3)
    bias = torch.randn(C, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    kwargs = materialize_keywords(KEYWORDS[case], B, C, False, t, device=DEVICE)
    kwargs.pop("reduction", None)
    check_shards(x, w, t, sizes, angular=False, bias=bias, **kwargs)


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float16), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_dtypes_over_several_tiles_and_chunks(dtypes, monkeypatch):
    """C = 40 in shards of 23, 0 and 17 classes (two class tiles each), 23 rows in chunks of
    one 16-row tile (two chunks: grad W accumulated), D = 20 (two feature steps)."""
    monkeypatch.setattr(tiled, "LOGITS_BUDGET_BYTES", 1)
    B, D, C = 23, 20, 40
    x, w, t = _inputs(B, D, C, dtype=dtypes[0], w_dtype=dtypes[1], seed=C + B)
    t[[2, 9]] = -100
    g = torch.Generator().manual_seed(6)
    kwargs = dict(label_smoothing=0.1, class_weight=(torch.rand(C, generator=g) + 0.2).to(DEVICE),
                  sample_weight=(torch.rand(B, generator=g) + 0.2).to(DEVICE), cos_margin=0.1,
                  grl_lambda=0.5)
    check_shards(x, w, t, [23, 0, 17], **kwargs)


def test_float64_weight_vectors():
    """The sharded loss gathers sample weights in float64: the weight vectors may be float64
    (read as float32) beside float32 inputs."""
    B, D, C = 12, 9, 20
    x, w, t = _inputs(B, D, C, seed=5)
    g = torch.Generator().manual_seed(2)
    check_shards(x, w, t, [8, 12], label_smoothing=0.1,
                 class_weight=(torch.rand(C, generator=g, dtype=torch.float64) + 0.2).to(DEVICE),
                 sample_weight=(torch.rand(B, generator=g, dtype=torch.float64) + 0.2).to(DEVICE))


def test_non_finite_rows_follow_the_reference():
    """A NaN feature row; a NaN in a target's class centre; a target outside [0, C) (q^(r) NaN
    on every shard, its gradient NaN, the empty shard's part of grad x zero); (linear head) an ignored row with an infinite
    feature (its part of grad x exactly 0) and a +inf bias."""
    B, D, C, sizes = 9, 5, 7, [3, 4, 0]
    x, w, t = _inputs(B, D, C, seed=9)
    x[1, 0] = float("nan")
    t[3] = -100
    got = check_shards(x, w, t, sizes)
    assert torch.isnan(got[0][0][1]) and not torch.isnan(got[0][0][[0, 2]]).any()
    x[1, 0] = 0.5
    w[t[0], 2] = float("nan")  # the centre of a target class: NaN on its own shard only
    check_shards(x, w, t, sizes, label_smoothing=0.1)
    w[t[0], 2] = 0.5
    t[5] = C + 4
    got = check_shards(x, w, t, sizes, label_smoothing=0.1)
    for r, n in enumerate(sizes):
        assert torch.isnan(got[r][1][5]) and got[r][1][3] == 0
        assert bool(torch.isnan(got[r][2][5]).all()) == (n > 0)
    assert torch.count_nonzero(got[-1][2]) == 0
    x, w, t = _inputs(B, D, C, seed=11)
    x[3, 0] = math.inf
    t[3] = -100
    got = check_shards(x, w, t, sizes, angular=False, bias=torch.zeros(C, device=DEVICE))
    assert all(torch.count_nonzero(got[r][2][3]) == 0 for r in range(len(sizes)))
    x, w, t = _inputs(B, D, C, seed=10)
    bias = torch.zeros(C, device=DEVICE)
    bias[C - 1] = math.inf
    t[:] = 0
    got = check_shards(x, w, t, sizes[:2], angular=False, bias=bias)
    assert torch.all(got[-1][0] == math.inf)


def test_empty_batch():
    args = _on_device(shard_fwd_args(x=torch.empty(0, 5), target=torch.empty(0, dtype=torch.int64),
                                     sample_weight=None))
    lse, partial = OPS.margin_ce_shard_fwd_triton(*args.values())
    assert lse.shape == partial.shape == (0,) and lse.dtype == torch.float32
    b = _on_device(shard_bwd_args(x=torch.empty(0, 5), target=torch.empty(0, dtype=torch.int64),
                                  sample_weight=None, grad_rows=torch.empty(0),
                                  lse=torch.empty(0)))
    gx, gw, gb = OPS.margin_ce_shard_bwd_triton(*b.values())
    assert gx.shape == (0, 5) and gx.dtype == torch.float32 and gb.shape == (0,)
    assert gw.shape == (4, 5) and torch.count_nonzero(gw) == 0


@pytest.mark.parametrize("case,sizes", [("smoothing_weights", [12, 0, 18]),
                                        ("ignore_index", [30]), ("grl_tensor", [5, 25])])
def test_against_the_cpu_shard_mode(case, sizes, monkeypatch):
    """The same inputs through the compiled CPU shard mode (in float64) and the Triton one."""
    monkeypatch.setattr(tiled, "LOGITS_BUDGET_BYTES", 1)
    B, D, C = 20, 10, 30
    x, w, t = _inputs(B, D, C, seed=14)
    kwargs = materialize_keywords(KEYWORDS[case], B, C, True, t, device=DEVICE)
    kwargs.pop("reduction", None)
    check_shards(x, w, t, sizes, against="cpu", **kwargs)


def test_a_whole_problem_shard_by_shard(monkeypatch):
    """C = 50 over three uneven shards, combined as the sharded loss combines them: the loss and
    gradients against the float64 ordinary reference op."""
    monkeypatch.setattr(tiled, "LOGITS_BUDGET_BYTES", 1)
    B, D, C = 21, 12, 50
    sizes = [20, 3, 27]
    x, w, t = _inputs(B, D, C, seed=17)
    t[4] = -100
    g = torch.Generator().manual_seed(7)
    kwargs = dict(label_smoothing=0.1, class_weight=(torch.rand(C, generator=g) + 0.2).to(DEVICE),
                  margin=0.3, cos_margin=0.1)
    got = sharded_loss(x, w, t, sizes, backend="triton", **kwargs)
    want = run_loss(reference.angular_margin_cross_entropy, x.double(), w.double(), t,
                    **as_double(kwargs))
    own = run_loss(reference.angular_margin_cross_entropy, x, w, t, **kwargs)
    rtol, atol = tolerance(torch.float32)
    for name, a, b, o in zip(("loss", "grad_x", "grad_weight"), got, want, own):
        assert_close_spec(a, b, rtol, atol, name, torch_own=o)


def test_the_ordinary_op_is_the_shard_mode_of_one_shard(monkeypatch):
    """o = 0, num_classes = C on the tiled path: the ordinary op's lse and gradients (reduction
    none, the same upstream) are the shard mode's, bit for bit — one family of kernels."""
    monkeypatch.setattr(small_c, "SMALL_C_MAX", 0)
    monkeypatch.setattr(tiled, "LOGITS_BUDGET_BYTES", 1)
    B, D, C = 19, 12, 20
    x, w, t = _inputs(B, D, C, seed=12)
    t[4] = -100
    g = torch.Generator().manual_seed(8)
    cw = (torch.rand(C, generator=g) + 0.2).to(DEVICE)
    sw = (torch.rand(B, generator=g) + 0.2).to(DEVICE)
    up = torch.randn(B, generator=g).to(DEVICE)
    lam = torch.tensor(0.4, device=DEVICE)
    head = (True, 30.0, 0.3, 0.1, 0.1, -100)
    loss, lse, *_ = OPS.margin_ce_fwd_triton(x, w, t, None, cw, sw, None, *head, 0, False, False)
    gx, gw, _ = OPS.margin_ce_bwd_triton(up, x, w, t, None, cw, sw, lse, lam, *head, 0, False)
    s_lse, partial = OPS.margin_ce_shard_fwd_triton(x, w, t, None, cw, sw, 0, C, *head, False)
    s_gx, s_gw, _ = OPS.margin_ce_shard_bwd_triton(up, x, w, t, None, cw, sw, lse, lam, 0, C,
                                                   *head, False)
    assert torch.equal(lse, s_lse) and torch.equal(gx, s_gx) and torch.equal(gw, s_gw)
    # loss_i = v_i·(a_i + b·W)·lse_i + q_i (docs/math.md, "Class shards")
    rows = reference._ShardRows(t, num_classes=C, class_weight=cw, sample_weight=sw,
                                label_smoothing=0.1, ignore_index=-100, dtype=torch.float32,
                                device=x.device)
    combined = rows.mask(rows.v * (rows.a + rows.b * rows.W) * lse + partial)
    torch.testing.assert_close(combined, loss, rtol=1e-5, atol=1e-5)


def test_the_triton_backend_runs_the_compiled_ops():
    assert shard_mode.COMPILED.get("triton") == "triton"
    x, w, t = _inputs(6, 4, 9, seed=13)
    kw = dict(class_offset=2, num_classes=9, normalize=True, scale=64.0, margin=0.5,
              cos_margin=0.0, bias_shard=None, class_weight=None, sample_weight=None,
              label_smoothing=0.0, ignore_index=-100, straight_through=False, chunk_rows=None)
    got = shard_mode.shard_forward("triton", x, w[2:5], t, **kw)
    direct = OPS.margin_ce_shard_fwd_triton(x, w[2:5], t, None, None, None, 2, 9, True, 64.0,
                                            0.5, 0.0, 0.0, -100, False)
    assert all(torch.equal(a, b) for a, b in zip(got, direct))


@pytest.mark.parametrize("change,name", BAD_ARGUMENTS + [
    (dict(x=torch.randn(6, 5, dtype=torch.float64)), "x"),
    (dict(label_smoothing=1.0), "label_smoothing"), (dict(scale=-1.0), "scale"),
], ids=BAD_ARGUMENT_IDS + ["float64_x", "smoothing_of_one", "negative_scale"])
def test_bad_arguments_are_named(change, name):
    with pytest.raises((ValueError, TypeError), match=name):
        OPS.margin_ce_shard_fwd_triton(*_on_device(shard_fwd_args(**change)).values())
    with pytest.raises((ValueError, TypeError), match=name):
        OPS.margin_ce_shard_bwd_triton(*_on_device(shard_bwd_args(**change)).values())


@pytest.mark.parametrize("change,name", BAD_BACKWARD_INPUTS)
def test_bad_backward_inputs_are_named(change, name):
    with pytest.raises((ValueError, TypeError), match=name):
        OPS.margin_ce_shard_bwd_triton(*_on_device(shard_bwd_args(**change)).values())


@pytest.mark.parametrize("change", [
    {}, dict(weight=torch.empty(0, 5), class_offset=10),
    dict(normalize=False, bias=torch.randn(4), class_weight=None, sample_weight=None),
], ids=["angular", "empty_shard", "linear"])
def test_opcheck(change):
    args = _on_device(shard_fwd_args(**change))
    library.opcheck(OPS.margin_ce_shard_fwd_triton.default, tuple(args.values()))
    b = _on_device(shard_bwd_args(**change))
    library.opcheck(OPS.margin_ce_shard_bwd_triton.default, tuple(b.values()))
