"""Every CUDA kernel and host path, run from its own sources under the checking emulator
(emulator.h), against the float64 reference with the tolerances of docs/math.md ("Closeness and
tolerances"). Any race, out-of-bounds or misaligned access fails the test that makes it.

Paths: the fused small-C kernel over a small batch spread in blocks of 8 rows, over few blocks
that each take several row tiles (few emulated multiprocessors), and over enough blocks for a
three-level tree of last-block-done partials; and the GEMM row blocks of the large-C path (forced
on small shapes, in one block and, with a tiny budget, in several). The GEMMs run on the
emulator's CPU stand-in of cuBLAS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import udat_kernels as uk
from helpers import (KEYWORDS, assert_close_spec, check_against_reference, make_inputs,
                     materialize_keywords, reference_fn, run_loss, tolerance)
from udat_kernels import reference

ANGULAR = uk.angular_margin_cross_entropy
LINEAR = uk.linear_cross_entropy
INF, NAN = float("inf"), float("nan")

# name: (B, environment, emulator settings)
PATHS = {
    "fused-small": (37, {}, {}),
    "fused-blocks": (150, {}, {"sm_count": 1, "max_blocks_per_sm": 2}),
    "fused-tree": (300, {}, {"sm_count": 10}),
    "gemm": (37, {"UDAT_CUDA_FORCE_GEMM": "1"}, {}),
    "gemm-blocks": (37, {"UDAT_CUDA_FORCE_GEMM": "1", "UDAT_CUDA_BLOCK_BYTES": "400"}, {}),
}


def _enter(name, emu, monkeypatch):
    B, env, settings = PATHS[name]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    emu.config(**settings)
    return B


@pytest.fixture(params=list(PATHS))
def path(request, emu, monkeypatch):
    """Every path."""
    return _enter(request.param, emu, monkeypatch)


@pytest.fixture(params=["fused-small", "fused-tree", "gemm-blocks"])
def some_path(request, emu, monkeypatch):
    """One fused path of each shape of tree, and the GEMM row blocks: for the long matrices."""
    return _enter(request.param, emu, monkeypatch)


@pytest.fixture(params=["fused-blocks", "gemm-blocks"])
def multi_block_path(request, emu, monkeypatch):
    """Several blocks of each path (partials, row blocks): for the keyword matrix."""
    return _enter(request.param, emu, monkeypatch)


def fn(angular):
    return ANGULAR if angular else LINEAR


def _ids(v):
    return str(v).split(".")[-1]


def _check(angular, x, w, t, **kw):
    return check_against_reference(fn(angular), x, w, t, angular=angular, backend="cuda",
                                   validate=False, **kw)


KERNELS = {  # what each path launches (besides the divisor and loss reductions)
    "fused-small": {"small_c_kernel"},
    "fused-blocks": {"small_c_kernel"},
    "fused-tree": {"small_c_kernel"},
    "gemm": {"row_sumsq_kernel", "epilogue_kernel", "finish_grad_x_kernel",
             "finish_grad_w_kernel"},
    "gemm-blocks": {"row_sumsq_kernel", "epilogue_kernel", "finish_grad_x_kernel",
                    "finish_grad_w_kernel"},
}


@pytest.mark.parametrize("name", list(PATHS))
def test_paths_run_their_kernels(emu, monkeypatch, name):
    """The emulated backend runs the kernels each path is meant to, with several blocks where
    meant to: the matrix below covers what it thinks it covers."""
    B, env, settings = PATHS[name]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    emu.config(**settings)
    x, w, t = make_inputs(B, 40, 7, seed=1)
    run_loss(ANGULAR, x, w, t, backend="cuda", validate=False)
    launched = {k["name"].split("<")[0] for k in emu.kernels()}
    assert KERNELS[name] <= launched, launched
    grids = [k["grid"][0] for k in emu.kernels() if k["name"].startswith("small_c_kernel")]
    if name == "fused-small":
        assert grids == [5, 5], "a small batch spreads over blocks of 8 rows"
    if name == "fused-blocks":
        assert grids == [2, 2], "expected two blocks, each taking several tiles"
    if name == "fused-tree":
        assert grids == [38, 38], "expected a backward tree of three levels (38, 3, 1)"
    if name == "gemm-blocks":
        assert len([k for k in emu.kernels() if k["name"].startswith("epilogue")]) > 2
        assert len(emu.gemms()) > 6


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("C", [1, 2, 7, 8, 16, 17])
def test_classes(path, C, angular):
    """C up to 8 takes the fused kernel (NC = 2 or 8 rows of weights), 16 and 17 the GEMMs."""
    x, w, t = make_inputs(path, 40, C, seed=C)
    bias = None if angular else torch.randn(C, generator=torch.Generator().manual_seed(C))
    _check(angular, x, w, t, bias=bias, label_smoothing=0.1, grl_lambda=0.5)


DTYPE_PAIRS = [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
]


@pytest.mark.parametrize("x_dtype,w_dtype", DTYPE_PAIRS, ids=_ids)
@pytest.mark.parametrize("D", [36, 33, 64])  # D % 8 != 0 but D % 4 == 0; odd; 16-byte rows
def test_dtypes(some_path, D, x_dtype, w_dtype):
    x, w, t = make_inputs(some_path, D, 7, x_dtype=x_dtype, w_dtype=w_dtype, seed=D)
    _check(True, x, w, t)


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1), (torch.float32, 2),
                                          (torch.bfloat16, 1), (torch.float16, 1)],
                         ids=["float32-1", "float32-2", "bfloat16-1", "float16-1"])
def test_unaligned_storage(path, offset, dtype, angular):
    """x and W at a storage offset that breaks 16-byte alignment, handed to the op as they are
    (views of one buffer each): the host side must not choose vector loads for them (the
    emulator fails a misaligned one)."""
    B, D, C = path, 64, 7
    x0, w0, t = make_inputs(B, D, C, x_dtype=dtype, w_dtype=dtype, seed=offset)
    xs = torch.cat([torch.zeros(offset, dtype=dtype), x0.flatten()]).requires_grad_()
    ws = torch.cat([torch.zeros(offset, dtype=dtype), w0.flatten()]).requires_grad_()
    x, w = xs[offset:].view(B, D), ws[offset:].view(C, D)
    assert x.data_ptr() % 16 != 0 and w.data_ptr() % 16 != 0
    loss = fn(angular)(x, w, t, backend="cuda", validate=False)
    loss.backward()
    xr, wr = x0.double().requires_grad_(), w0.double().requires_grad_()
    reference_fn(angular)(xr, wr, t).backward()
    rtol, atol = tolerance(dtype)
    assert_close_spec(loss, reference_fn(angular)(x0.double(), w0.double(), t), rtol, atol, "loss")
    assert_close_spec(xs.grad[offset:].view(B, D), xr.grad, rtol, atol, "grad_x")
    assert_close_spec(ws.grad[offset:].view(C, D), wr.grad, rtol, atol, "grad_weight")


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("name", list(KEYWORDS))
def test_keywords(multi_block_path, name, angular):
    x, w, t = make_inputs(multi_block_path, 24, 7, seed=11)
    kwargs = materialize_keywords(KEYWORDS[name], t.shape[0], 7, angular, t)
    bias = None if angular else torch.randn(7, generator=torch.Generator().manual_seed(1))
    _check(angular, x, w, t, bias=bias, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_large_c_row_blocks(emu, monkeypatch, reduction):
    """Row blocks of 3 rows over 1000 classes: the grad W accumulation crosses every boundary."""
    monkeypatch.setenv("UDAT_CUDA_BLOCK_BYTES", str(3 * 1000 * 4))
    x, w, t = make_inputs(29, 20, 1000, seed=5)
    for angular in (True, False):
        _check(angular, x, w, t, reduction=reduction, label_smoothing=0.05, grl_lambda=0.25)


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_paper_head_many_blocks(emu, angular):
    """The paper's small heads at a batch that spreads over many blocks and row groups."""
    emu.config(sm_count=2)
    x, w, t = make_inputs(700, 64, 7, seed=3)
    _check(angular, x, w, t, label_smoothing=0.1, grl_lambda=0.5)


@pytest.mark.parametrize("c", [1.0, -1.0, 0.9999])
def test_cosine_extremes(path, c):
    x, w, t = make_inputs(path, 12, 5, seed=3, target_cos=c)
    out = run_loss(ANGULAR, x, w, t, backend="cuda", validate=False)
    assert all(torch.isfinite(o).all() for o in out), "non-finite result at |c| = 1"
    _check(True, x, w, t, margin_grad="straight_through", check_grads=abs(c) < 1)


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_zero_vectors(path, angular):
    x, w, t = make_inputs(path, 6, 5, seed=2)
    x[2] = 0
    w[t[4]] = 0
    w[(t[0] + 1) % 5] = 0
    _check(angular, x, w, t)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_empty_batch(emu, reduction, angular):
    x = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    loss = fn(angular)(x, w, t, reduction=reduction, backend="cuda")
    expected = F.cross_entropy(torch.zeros(0, 5), t, reduction=reduction)
    assert loss.shape == expected.shape
    assert torch.equal(torch.isnan(loss), torch.isnan(expected))
    if reduction != "none":
        loss.backward()
        assert torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_all_ignored(path, angular):
    x, w, t = make_inputs(path, 4, 3, seed=4)
    t[:] = -100
    out = run_loss(fn(angular), x, w, t, backend="cuda", validate=False)
    assert torch.isnan(out[0])
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[2]) == 0


@pytest.mark.parametrize("bad", [7, -1, 1 << 40])
def test_bad_target_is_nan_and_in_bounds(path, bad):
    """validate=False: the row's loss is NaN, the others are right, and no kernel reads out of
    bounds (the emulator checks every access)."""
    x, w, t = make_inputs(path, 16, 7, seed=6)
    t[3] = bad
    loss = ANGULAR(x, w, t, backend="cuda", validate=False, reduction="none")
    assert torch.isnan(loss[3])
    keep = torch.arange(len(t)) != 3
    ref = reference.angular_margin_cross_entropy(x.double(), w.double(), t.clamp(0, 6),
                                                 reduction="none")
    torch.testing.assert_close(loss[keep].double(), ref[keep], rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    ANGULAR(x, w, t, backend="cuda", validate=False).backward()
    assert torch.isnan(x.grad[3]).all()


# ---- non-finite inputs (docs/math.md, "Non-finite inputs") ---------------------------------------

def _rows_match(got, expected):
    got = got.detach().double()
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), (got, expected)
    assert torch.equal(torch.isposinf(got), torch.isposinf(expected)), (got, expected)
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected)), (got, expected)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=1e-5)


def _expected(angular, x, w, t, **kw):
    f = reference.angular_margin_cross_entropy if angular else reference.linear_cross_entropy
    return f(x.double(), w.double(), t, reduction="none",
             **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_nan_in_x_and_in_a_non_target_row_of_w(path, angular):
    x, w, t = make_inputs(path, 24, 7, seed=8)
    x[1, 5] = NAN
    t[:] = torch.where(t == 6, 0, t)  # class 6 is nobody's target
    w[6, 3] = NAN
    got = fn(angular)(x, w, t, reduction="none", backend="cuda", validate=False)
    _rows_match(got, _expected(angular, x, w, t))
    assert torch.isnan(got).all()  # class 6's NaN logit reaches every row


@pytest.mark.parametrize("C", [2, 7, 40])
def test_inf_and_nan_bias(path, C):
    x, w, t = make_inputs(path, 5, C, seed=C)
    t[:3] = 1  # target logit +inf: NaN
    t[3:] = 0  # target finite, a +inf logit in the row: +inf
    bias = torch.zeros(C)
    bias[1] = INF
    got = LINEAR(x, w, t, bias=bias, reduction="none", backend="cuda", validate=False)
    _rows_match(got, _expected(False, x, w, t, bias=bias))
    bias2 = torch.zeros(C)
    bias2[1] = INF
    bias2[0] = INF  # two +inf logits: +inf (lse), not NaN
    t2 = torch.full_like(t, C - 1)
    got = LINEAR(x, w, t2, bias=bias2, reduction="none", backend="cuda", validate=False)
    _rows_match(got, _expected(False, x, w, t2, bias=bias2))
    bias3 = torch.zeros(C)
    bias3[C - 1] = NAN
    got = LINEAR(x, w, t, bias=bias3, reduction="none", backend="cuda", validate=False)
    assert torch.isnan(got).all()


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("path_name", ["fused-blocks", "fused-tree", "gemm-blocks"])
def test_results_do_not_depend_on_thread_order(emu, monkeypatch, path_name, angular):
    """Every reduction has a fixed order: bitwise the same results under other seeds of the
    emulator's thread and block order."""
    B, env, settings = PATHS[path_name]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    emu.config(**settings)
    x, w, t = make_inputs(B, 40, 7, seed=9)
    first = None
    for seed in range(3):
        emu.config(seed=seed)
        out = run_loss(fn(angular), x, w, t, backend="cuda", validate=False,
                       label_smoothing=0.1)
        if first is None:
            first = out
            continue
        for a, b in zip(first, out):
            if a is not None:
                assert torch.equal(a, b)
