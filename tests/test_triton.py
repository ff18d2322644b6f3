"""The Triton backend against the float64 reference (docs/math.md), on CUDA or, without a GPU, on
CPU tensors through the Triton interpreter. Three launch paths are forced in turn: one program with
grad weight written directly (the paper's batch), several programs with partials reduced by a
second kernel, and the tiled large-C path (in several row chunks)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton (kernels are bound to the interpreter then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import udat_kernels as uk  # noqa: E402
from helpers import check_against_reference, make_inputs, run_loss  # noqa: E402

try:
    import triton  # noqa: F401

    _TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the installation
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

pytestmark = [
    pytest.mark.skipif(_TRITON_ERROR is not None, reason=f"triton not importable: {_TRITON_ERROR}"),
    pytest.mark.skipif(not uk._C_loader.available(),
                       reason="the Triton ops take their schema from the compiled extension, "
                              f"which is not built: {uk._C_loader.error()}"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU every specialization of a kernel is a compilation of seconds: there the matrix is cut
# to what the GPU check has time for, unless UDAT_TRITON_FULL_MATRIX=1 (=0 on the CPU runs the
# GPU subset, e.g. to count its specializations).
FULL_MATRIX = os.environ.get("UDAT_TRITON_FULL_MATRIX", "1" if DEVICE == "cpu" else "0") == "1"
GPU_KEYWORDS = ("ignore", "weights_mean_smoothing", "grl_tensor_none")
ANGULAR = uk.angular_margin_cross_entropy
LINEAR = uk.linear_cross_entropy
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids(v):
    return str(v).split(".")[-1]


@pytest.fixture(params=["single", "multi", "tiled"])
def path(request, monkeypatch):
    """single: one program taking its row blocks in turn (grad W written directly where the
    batch is one block); multi: blocks spread over 2 programs, with partials and the loss
    reduced by the last program;
    tiled: the large-C kernels, 16×16×16 tiles in 16-row chunks."""
    from udat_kernels.triton_backend import small_c, tiled

    if request.param == "single":
        monkeypatch.setattr(small_c, "MAX_PROGRAMS", 1)
    elif request.param == "multi":
        monkeypatch.setattr(small_c, "MAX_PROGRAMS", 2)
    elif request.param == "tiled":
        monkeypatch.setattr(small_c, "SMALL_C_MAX", 0)
        monkeypatch.setattr(tiled, "LOGITS_BUDGET_BYTES", 1)  # one tile of rows per chunk
        if DEVICE == "cuda":
            monkeypatch.setattr(tiled, "TILE", (16, 16, 16, 4, 1))
    return request.param


def _inputs(B, D, C, dtype=torch.float32, w_dtype=None, **kw):
    return make_inputs(B, D, C, x_dtype=dtype, w_dtype=w_dtype or dtype, device=DEVICE, **kw)


def _check(angular, x, w, t, **kw):
    return check_against_reference(ANGULAR if angular else LINEAR, x, w, t, angular=angular,
                                   backend="triton", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("C", [1, 2, 7])
def test_angular_dtypes(path, C, dtype):
    if not FULL_MATRIX and C != 7:
        pytest.skip("GPU subset (UDAT_TRITON_FULL_MATRIX=1 runs it)")
    x, w, t = _inputs(37, 33, C, dtype, seed=C)
    _check(True, x, w, t)


@pytest.mark.parametrize("dtypes", ["float32", "bfloat16", "bfloat16-float32"])
@pytest.mark.parametrize("C", [2, 7, 12, 16])
def test_aligned_tiles(path, C, dtypes):
    # D a multiple of 16 elements: the small-C kernel's 16-byte vectors, several rows a block
    # and unrolled steps (docs/design.md, "The Triton kernels"); D = 48 leaves most of a step
    # masked. C = 12 pads to 16 classes with the ‖x‖² slot, C = 16 sums ‖x‖² on its own.
    if path == "tiled":
        pytest.skip("the tiled path has no vector tiles of its own")
    if path == "single" and C != 16:
        pytest.skip("one program looping over the blocks: run at C = 16 only")
    if not FULL_MATRIX and (C not in (7, 16) or dtypes != "bfloat16"):
        pytest.skip("GPU subset (UDAT_TRITON_FULL_MATRIX=1 runs it)")
    x_dtype, w_dtype = (getattr(torch, n) for n in (dtypes.split("-") * 2)[:2])
    x, w, t = _inputs(37, 48, C, x_dtype, w_dtype, seed=C)
    _check(True, x, w, t, label_smoothing=0.1, grl_lambda=0.5)
    if C in (7, 16):
        _check(False, x, w, t, bias=torch.randn(C, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_linear_dtypes(path, dtype):
    if not FULL_MATRIX and dtype != torch.bfloat16:
        pytest.skip("GPU subset (UDAT_TRITON_FULL_MATRIX=1 runs it)")
    x, w, t = _inputs(37, 33, 7, dtype, seed=3)
    bias = torch.randn(7, device=DEVICE).to(dtype)
    _check(False, x, w, t, bias=bias, label_smoothing=0.1)


KEYWORDS = {
    "none": dict(reduction="none"),
    "sum": dict(reduction="sum"),
    "ignore": dict(ignore_rows=(0, 5, 36)),
    "ignore_index_in_range": dict(ignore_index=2),
    "class_weight": dict(class_weight=True),
    "sample_weight": dict(sample_weight=True, reduction="sum"),
    "weights_mean_smoothing": dict(class_weight=True, sample_weight=True, label_smoothing=0.2),
    "grl_float": dict(grl_lambda=0.7),
    "grl_tensor_none": dict(grl_lambda="tensor", reduction="none"),
    "straight_through": dict(margin_grad="straight_through", cos_margin=0.2),
    "cosface": dict(margin=0.0, cos_margin=0.35, scale=30.0),
    "no_margin": dict(margin=0.0),
}


@pytest.mark.parametrize("case", list(KEYWORDS), ids=list(KEYWORDS))
def test_keywords(path, case):
    if not FULL_MATRIX and case not in GPU_KEYWORDS:
        pytest.skip("GPU subset (UDAT_TRITON_FULL_MATRIX=1 runs it)")
    kw = dict(KEYWORDS[case])
    B, D, C = 37, 19, 5
    x, w, t = _inputs(B, D, C, seed=11, ignore_rows=kw.pop("ignore_rows", ()),
                      margin=kw.get("margin", 0.5))
    if kw.get("ignore_index") is not None:
        t[::4] = kw["ignore_index"]
    if kw.pop("class_weight", False):
        kw["class_weight"] = torch.rand(C, device=DEVICE) + 0.5
    if kw.pop("sample_weight", False):
        kw["sample_weight"] = torch.rand(B, device=DEVICE) + 0.5
    if kw.get("grl_lambda") == "tensor":
        kw["grl_lambda"] = torch.tensor(0.3, device=DEVICE)
    _check(True, x, w, t, **kw)
    linear_kw = {k: v for k, v in kw.items() if k not in ("margin", "cos_margin", "scale",
                                                          "margin_grad")}
    _check(False, x, w, t, bias=torch.randn(C, device=DEVICE), **linear_kw)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float16)], ids=_ids)
def test_mixed_dtypes(path, x_dtype, w_dtype):
    if not FULL_MATRIX and x_dtype == torch.float32:
        pytest.skip("GPU subset (UDAT_TRITON_FULL_MATRIX=1 runs it)")
    x, w, t = _inputs(21, 24, 3, x_dtype, w_dtype, seed=5)
    _check(True, x, w, t)


@pytest.mark.parametrize("cos", [0.95, -0.95])
def test_target_cosines_near_one(path, cos):
    if not FULL_MATRIX and cos < 0:
        pytest.skip("GPU subset (UDAT_TRITON_FULL_MATRIX=1 runs it)")
    x, w, t = _inputs(18, 16, 7, seed=2, target_cos=cos)
    _check(True, x, w, t)


@pytest.mark.parametrize("cos", [1.0, -1.0])
def test_target_cosines_at_one(path, cos):
    # At |c| = 1 the exact derivative is unbounded (docs/math.md, "ψ′ and its guard"): finite
    # results; straight-through is checked against the reference.
    x, w, t = _inputs(18, 16, 7, seed=2, target_cos=cos)
    out = run_loss(ANGULAR, x, w, t, backend="triton")
    assert all(torch.isfinite(o).all() for o in out)
    _check(True, x, w, t, margin_grad="straight_through", grad_tol=(1e-5, 1e-4))


def test_zero_norm_rows(path):
    x, w, t = _inputs(17, 12, 7, seed=4)
    x[3] = 0
    w[2] = 0
    _check(True, x, w, t)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_gradient_tiles(monkeypatch, reduction):
    # The bf16 gradient GEMMs the GPU runs for bf16 inputs (on the CPU: bf16 operands, fp32
    # products and sums), in the forward (mean) and in the backward (none).
    from udat_kernels.triton_backend import tiled

    monkeypatch.setattr(tiled, "_gemm_dtype", lambda x, w: torch.bfloat16)
    monkeypatch.setattr(tiled, "LOGITS_BUDGET_BYTES", 1)
    x, w, t = _inputs(40, 33, 70, torch.bfloat16, seed=9)
    _check(True, x, w, t, reduction=reduction)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0/0 = NaN
@pytest.mark.parametrize("reduction,expected", [("mean", float("nan")), ("sum", 0.0)])
def test_empty_and_fully_ignored(path, reduction, expected):
    for B in (0, 5):
        x, w, t = _inputs(B, 8, 3, seed=1)
        t[:] = -100
        loss, gx, gw = run_loss(ANGULAR, x, w, t, backend="triton", reduction=reduction)
        assert torch.equal(torch.isnan(loss), torch.tensor(expected != expected))
        if expected == expected:
            assert loss.item() == expected
        assert not gx.any() and not gw.any()


def test_one_row_block(path):
    # A batch within one row block (D aligned: blocks of 4 rows): the small-C kernel's single
    # program writes grad W itself, without partials.
    x, w, t = _inputs(3, 16, 7, seed=7)
    _check(True, x, w, t, label_smoothing=0.1, grl_lambda=0.5)
    _check(False, x, w, t, bias=torch.randn(7, device=DEVICE))


def test_retain_graph_and_repeated_backward(path):
    x, w, t = _inputs(20, 16, 7, seed=6)
    x.requires_grad_()
    loss = ANGULAR(x, w, t, backend="triton", grl_lambda=0.5)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 2, x)
    torch.testing.assert_close(g2, 2 * g1)


def test_deterministic(path):
    x, w, t = _inputs(37, 33, 7, seed=8)
    a = run_loss(ANGULAR, x, w, t, backend="triton")
    b = run_loss(ANGULAR, x, w, t, backend="triton")
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_double_backward_raises():
    x, w, t = _inputs(8, 8, 3, seed=1)
    x.requires_grad_()
    (g,) = torch.autograd.grad(ANGULAR(x, w, t, backend="triton"), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_float64_raises_clearly():
    x, w, t = _inputs(4, 8, 3, torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        ANGULAR(x, w, t, backend="triton")


def test_reasons_and_auto(monkeypatch):
    from udat_kernels import dispatch
    from udat_kernels.triton_backend import BACKEND

    x = torch.randn(4, 8)
    w = torch.randn(3, 8)
    assert dispatch.select("auto", x, w).name != "triton"  # never on CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("CUDA" in r for r in BACKEND.reasons(x, w))
    with pytest.raises(RuntimeError, match="triton"):
        ANGULAR(x, w, torch.zeros(4, dtype=torch.long), backend="triton")
    assert BACKEND.grad_in_forward(64, 1024, 7) is False
    assert BACKEND.grad_in_forward(8192, 512, 100000) is True


def _op_args(normalize, compute_grad, B=9, D=10, C=5):
    x, w, t = _inputs(B, D, C, seed=3)
    bias = None if normalize else torch.randn(C, device=DEVICE)
    cw = torch.rand(C, device=DEVICE) + 0.5
    lam = torch.tensor(0.4, device=DEVICE)
    return (x.requires_grad_(), w.requires_grad_(), t, bias, cw, None, lam, normalize, 64.0,
            0.5, 0.0, 0.1, -100, 1, False, compute_grad)


@pytest.mark.parametrize("tiled_path", [False, True], ids=["small_c", "tiled"])
@pytest.mark.parametrize("normalize", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("compute_grad", [False, True], ids=["recompute", "grad_in_fwd"])
def test_opcheck(normalize, compute_grad, tiled_path, monkeypatch):
    if not FULL_MATRIX:
        pytest.skip("schema and fakes do not depend on the device: checked on the CPU")
    from udat_kernels.triton_backend import small_c  # registers the ops

    if tiled_path:
        monkeypatch.setattr(small_c, "SMALL_C_MAX", 0)

    ops = torch.ops.udat_kernels
    args = _op_args(normalize, compute_grad)
    # The differentiable loss op over the Triton pair, then the pair itself.
    torch.library.opcheck(ops.margin_ce.default, args[:15] + (compute_grad, "triton"),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    x, w, t, bias, cw, sw, lam = args[:7]
    args = (x.detach(), w.detach()) + args[2:]
    torch.library.opcheck(ops.margin_ce_fwd_triton.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    loss, lse, *_ = ops.margin_ce_fwd_triton(*args)
    bwd_args = (torch.ones_like(loss), x.detach(), w.detach(), t, bias, cw, sw, lse, lam,
                *args[7:15])
    torch.library.opcheck(ops.margin_ce_bwd_triton.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    x, w, t = _inputs(12, 16, 5, seed=1)
    x.requires_grad_()
    w.requires_grad_()

    def f(x, w, t):
        return ANGULAR(x, w, t, backend="triton", validate=False, grl_lambda=0.5)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, w, t)
    want = f(x, w, t)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x, w))):
        torch.testing.assert_close(a, b)
