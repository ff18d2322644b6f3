"""The CUDA C++ backend against the float64 reference (docs/math.md), for both public functions,
every dtype and keyword, on each of its paths: the fused small-C kernel in one block (small batches)
and over several blocks with partials, and the GEMM row blocks of the large-C path (forced on
small shapes, in one block and in several). Also: CUDA-graph capture with validate=False, no host
synchronization, reproducible grad W, bad targets that never read out of bounds.

Without a GPU only the registration check runs (the extension must still have been built with
its CUDA sources where a CUDA toolkit was found); everything else skips with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import udat_kernels as uk
from helpers import (KEYWORDS, check_against_reference, cuda_kernels_unavailable, make_inputs,
                     materialize_keywords, run_loss)

ANGULAR = uk.angular_margin_cross_entropy
LINEAR = uk.linear_cross_entropy


REASON = cuda_kernels_unavailable()
gpu = pytest.mark.skipif(REASON is not None, reason=str(REASON))


def test_cuda_kernels_registered():
    """Runs without a GPU: a CUDA build registers the CUDA kernels of both ops."""
    if not uk._C_loader.available() or not uk._C_loader.build_info()["cuda"]:
        pytest.skip("extension not built with CUDA sources")
    for op in ("margin_ce_fwd", "margin_ce_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"udat_kernels::{op}", "CUDA")


def fn(angular):
    return ANGULAR if angular else LINEAR


def _ids(v):
    return str(v).split(".")[-1]


# Paths: B decides between one block (B <= 128) and several; the environment forces the GEMM
# path and, with a tiny budget, several row blocks.
PATHS = {
    "fused-1block": (37, {}),
    "fused-blocks": (300, {}),
    "gemm": (37, {"UDAT_CUDA_FORCE_GEMM": "1"}),
    "gemm-blocks": (37, {"UDAT_CUDA_FORCE_GEMM": "1", "UDAT_CUDA_BLOCK_BYTES": "200"}),
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    B, env = PATHS[request.param]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return B


def _inputs(B, D, C, x_dtype=torch.float32, w_dtype=None, **kw):
    return make_inputs(B, D, C, x_dtype=x_dtype, w_dtype=w_dtype or x_dtype, device="cuda", **kw)


def _check(angular, x, w, t, **kw):
    return check_against_reference(fn(angular), x, w, t, angular=angular, backend="cuda",
                                   validate=False, **kw)


DTYPE_PAIRS = [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16),
    (torch.float16, torch.bfloat16), (torch.float16, torch.float64),
]


@gpu
@pytest.mark.parametrize("x_dtype,w_dtype", DTYPE_PAIRS, ids=_ids)
@pytest.mark.parametrize("C", [1, 2, 7])
@pytest.mark.parametrize("D", [33, 256])  # scalar loads / 16-byte vector loads
def test_angular_dtypes(path, D, C, x_dtype, w_dtype):
    x, w, t = _inputs(path, D, C, x_dtype, w_dtype, seed=C + D)
    _check(True, x, w, t)


@gpu
@pytest.mark.parametrize("x_dtype,w_dtype", DTYPE_PAIRS, ids=_ids)
def test_linear_dtypes(path, x_dtype, w_dtype):
    x, w, t = _inputs(path, 64, 7, x_dtype, w_dtype, seed=3)
    bias = torch.randn(7, device="cuda").to(w_dtype)
    _check(False, x, w, t, bias=bias)


@gpu
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("name", list(KEYWORDS))
@pytest.mark.parametrize("C", [7, 1000])
def test_keywords(path, C, name, angular):
    x, w, t = _inputs(path, 40, C, seed=11)
    kwargs = materialize_keywords(KEYWORDS[name], t.shape[0], C, angular, t, device="cuda")
    bias = None if angular else torch.randn(C, device="cuda")
    _check(angular, x, w, t, bias=bias, **kwargs)


@gpu
@pytest.mark.parametrize("B,D,C", [(64, 1024, 2), (64, 1024, 7), (1000, 2048, 8),
                                   (129, 2052, 5), (4096, 128, 3), (65, 8, 9), (257, 96, 3000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_sizes(B, D, C, dtype):
    """The paper's heads, the limits of the fused kernel (D = 2048 for two classes, 1024 for
    up to eight) and past them (the GEMM path)."""
    x, w, t = _inputs(B, D, C, dtype, seed=B + C)
    for angular in (True, False):
        _check(angular, x, w, t, label_smoothing=0.1, grl_lambda=0.5)


@gpu
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_in_forward_matches_backward_op(path, reduction, angular):
    """compute_grad=True of margin_ce_fwd equals margin_ce_bwd with an upstream of one, λ and all."""
    B, C, D = path, 7, 48
    x, w, t = _inputs(B, D, C, seed=2)
    cw = torch.rand(C, device="cuda") + 0.5
    lam = torch.tensor(0.25, device="cuda")
    bias = None if angular else torch.randn(C, device="cuda")
    red = {"none": 0, "mean": 1, "sum": 2}[reduction]
    head = (64.0, 0.5) if angular else (1.0, 0.0)  # scale, margin
    fwd = torch.ops.udat_kernels.margin_ce_fwd
    bwd = torch.ops.udat_kernels.margin_ce_bwd
    common = (bias, cw, None)
    loss, lse, gx, gw, gb = fwd(x, w, t, *common, lam, angular, *head, 0.0, 0.1, -100, red,
                                False, True)
    loss2, lse2, *_ = fwd(x, w, t, *common, lam, angular, *head, 0.0, 0.1, -100, red, False,
                          False)
    torch.testing.assert_close(loss, loss2, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse2, rtol=0, atol=0)
    bx, bw, bb = bwd(torch.ones_like(loss), x, w, t, *common, lse, lam, angular, *head, 0.0,
                     0.1, -100, red, False)
    torch.testing.assert_close(gx, bx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, bw, rtol=1e-5, atol=1e-6)
    if not angular:
        torch.testing.assert_close(gb, bb, rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("c", [1.0, 0.9999, -1.0, -0.9999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_ids)
def test_cosine_extremes(path, c, dtype):
    x, w, t = _inputs(path, 12, 5, dtype, seed=3, target_cos=c)
    out = run_loss(ANGULAR, x, w, t, backend="cuda")
    assert all(torch.isfinite(o).all() for o in out), "non-finite result at |c| = 1"
    _check(True, x, w, t, margin_grad="straight_through", check_grads=abs(c) < 1)
    _check(True, x, w, t, check_grads=False)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_ids)
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_zero_vectors(path, dtype, angular):
    x, w, t = _inputs(path, 6, 5, dtype, seed=2)
    x[2] = 0
    w[t[4]] = 0  # a zero class centre that is somebody's target
    w[(t[0] + 1) % 5] = 0
    _check(angular, x, w, t)


@gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_empty_batch_matches_torch(reduction, angular):
    x = torch.zeros(0, 8, device="cuda", requires_grad=True)
    w = torch.randn(5, 8, device="cuda", requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device="cuda")
    loss = fn(angular)(x, w, t, reduction=reduction, backend="cuda")
    expected = F.cross_entropy(torch.zeros(0, 5, device="cuda"), t, reduction=reduction)
    assert loss.shape == expected.shape
    assert torch.equal(torch.isnan(loss), torch.isnan(expected))
    if reduction != "none":
        loss.backward()
        assert torch.count_nonzero(w.grad) == 0


@gpu
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_all_ignored_is_nan_with_zero_grads(path, angular):
    x, w, t = _inputs(path, 4, 3, seed=4)
    t[:] = -100
    out = run_loss(fn(angular), x, w, t, backend="cuda")
    assert torch.isnan(out[0])
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[2]) == 0


@gpu
@pytest.mark.parametrize("bad", [7, -1, 1 << 40])
def test_bad_target_without_validation_is_nan_not_a_crash(path, bad):
    """validate=False skips the range check: the row is NaN, the others are right, and nothing
    is read out of bounds (compute-sanitizer memcheck in the GPU script checks that part)."""
    x, w, t = _inputs(path, 16, 7, seed=6)
    t[3] = bad
    loss = ANGULAR(x, w, t, backend="cuda", validate=False, reduction="none")
    torch.cuda.synchronize()
    assert torch.isnan(loss[3])
    keep = torch.arange(len(t), device="cuda") != 3
    ref = uk.reference.angular_margin_cross_entropy(x.double(), w.double(), t.clamp(0, 6),
                                                    reduction="none")
    torch.testing.assert_close(loss[keep].double(), ref[keep], rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_reproducible(path, angular):
    """grad W comes from partials added in a fixed order: bitwise the same on every run."""
    x, w, t = _inputs(path, 96, 7, seed=8)
    first = run_loss(fn(angular), x, w, t, backend="cuda", validate=False)
    for _ in range(3):
        again = run_loss(fn(angular), x, w, t, backend="cuda", validate=False)
        for a, b in zip(first, again):
            if a is not None:
                assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("C", [2, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_no_host_sync(C, dtype):
    x, w, t = _inputs(64, 1024, C, dtype, seed=1)
    x.requires_grad_()
    w.requires_grad_()
    lam = torch.tensor(0.5, device="cuda")
    ANGULAR(x, w, t, backend="cuda", validate=False, grl_lambda=lam).backward()  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for angular in (True, False):
            fn(angular)(x, w, t, backend="cuda", validate=False, grl_lambda=lam).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("C", [2, 7, 300])
def test_cuda_graph_capture(C, angular):
    """validate=False makes forward + backward capturable; replays match eager."""
    x, w, t = _inputs(64, 1024, C, seed=C)
    x.requires_grad_()
    w.requires_grad_()
    lam = torch.tensor(0.3, device="cuda")
    f = fn(angular)

    def step():
        loss = f(x, w, t, backend="cuda", validate=False, grl_lambda=lam, label_smoothing=0.1)
        gx, gw = torch.autograd.grad(loss, (x, w))
        return loss, gx, gw

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        x.mul_(1.5)  # new inputs in place: the replay must see them
        lam.fill_(0.6)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(static, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@gpu
def test_opcheck():
    x, w, t = _inputs(16, 24, 5, seed=1)
    args = (x, w, t, None, None, None, None, True, 64.0, 0.5, 0.0, 0.0, -100, 1, False, True)
    torch.library.opcheck(torch.ops.udat_kernels.margin_ce_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
