"""The C++ CPU backend against the float64 reference (docs/math.md): shapes, dtypes, every
keyword, row-block boundaries, extremes of the cosine, zero vectors, empty and NaN inputs."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import udat_kernels as uk
from helpers import (KEYWORDS, assert_close_spec, check_against_reference, make_inputs,
                     materialize_keywords, run_loss, tolerance)

pytestmark = pytest.mark.skipif(not uk._C_loader.available(),
                                reason=f"extension not built: {uk._C_loader.error()}")

ANGULAR = uk.angular_margin_cross_entropy
LINEAR = uk.linear_cross_entropy


def fn(angular):
    return ANGULAR if angular else LINEAR


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("C", [1, 2, 7, 1000, 50000])
@pytest.mark.parametrize("D", [1, 3, 130])
@pytest.mark.parametrize("B", [1, 17, 64])
def test_shapes_float32(B, D, C, angular):
    x, w, t = make_inputs(B, D, C, seed=B * 7 + D * 3 + C)
    kwargs = {"backend": "cpu"}
    if angular and D == 1:
        # With one feature every cosine is ±1, where the exact margin derivative is unbounded
        # (docs/math.md, "ψ′ and its guard"): check the straight-through gradient, and the exact
        # one for finiteness. The
        # true gradient is 0 (the projection removes everything), so what remains is float32
        # cancellation of terms of size s/|v|: an absolute bound.
        out = run_loss(ANGULAR, x, w, t, backend="cpu")
        assert all(torch.isfinite(o).all() for o in out)
        kwargs["margin_grad"] = "straight_through"
        kwargs["grad_tol"] = (1e-5, 1e-4)
    # Seeded like the other inputs: an unseeded bias made this test flaky (see the note in
    # docs/benchmarks.md's caveats on the linear head at D = 1, C = 50000).
    gen = torch.Generator().manual_seed(B * 7 + D * 3 + C)
    bias = torch.randn(C, generator=gen) if not angular else None
    check_against_reference(fn(angular), x, w, t, angular=angular, bias=bias, **kwargs)


DTYPE_PAIRS = [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.float64),
]


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("x_dtype,w_dtype", DTYPE_PAIRS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("B,D,C", [(17, 130, 7), (64, 33, 1000)])
def test_dtypes(B, D, C, x_dtype, w_dtype, angular):
    x, w, t = make_inputs(B, D, C, x_dtype=x_dtype, w_dtype=w_dtype, seed=C + D)
    bias = None if angular else torch.randn(C).to(w_dtype)
    check_against_reference(fn(angular), x, w, t, angular=angular, bias=bias, backend="cpu")


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("name", list(KEYWORDS))
@pytest.mark.parametrize("B,D,C", [(17, 130, 7), (64, 3, 1000)])
def test_keywords(B, D, C, name, angular):
    x, w, t = make_inputs(B, D, C, seed=11)
    kwargs = materialize_keywords(KEYWORDS[name], B, C, angular, t)
    bias = None if angular else torch.randn(C)
    check_against_reference(fn(angular), x, w, t, angular=angular, bias=bias, backend="cpu",
                            **kwargs)


@pytest.mark.parametrize("rows_per_block", [1, 5, 16])
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_row_block_boundaries(monkeypatch, rows_per_block, angular):
    """Force several row blocks (a partial last one too) on a small problem."""
    B, D, C = 37, 65, 300
    monkeypatch.setenv("UDAT_CPU_BLOCK_BYTES", str(rows_per_block * C * 4))
    x, w, t = make_inputs(B, D, C, seed=rows_per_block)
    for reduction in ("mean", "none"):
        check_against_reference(fn(angular), x, w, t, angular=angular, backend="cpu",
                                reduction=reduction, label_smoothing=0.1, grl_lambda=0.5)


@pytest.mark.parametrize("c", [1.0, 0.9999, -1.0, -0.9999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_extremes(c, dtype):
    """At |c| -> 1 results are finite; the straight-through gradient still matches tightly."""
    x, w, t = make_inputs(9, 12, 5, seed=3, x_dtype=dtype, w_dtype=dtype, target_cos=c)
    out = run_loss(ANGULAR, x, w, t, backend="cpu")
    assert all(torch.isfinite(o).all() for o in out), "non-finite result at |c| = 1"
    check_against_reference(ANGULAR, x, w, t, backend="cpu", margin_grad="straight_through",
                            check_grads=abs(c) < 1)
    check_against_reference(ANGULAR, x, w, t, backend="cpu", check_grads=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_zero_vectors(dtype, angular):
    x, w, t = make_inputs(8, 6, 5, x_dtype=dtype, w_dtype=dtype, seed=2)
    x[2] = 0
    w[t[4]] = 0  # a zero class centre that is somebody's target
    w[(t[0] + 1) % 5] = 0
    check_against_reference(fn(angular), x, w, t, angular=angular, backend="cpu")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_empty_batch_matches_torch(reduction, angular):
    x = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    loss = fn(angular)(x, w, t, reduction=reduction, backend="cpu")
    expected = F.cross_entropy(torch.zeros(0, 5), t, reduction=reduction)
    assert loss.shape == expected.shape
    assert torch.equal(torch.isnan(loss), torch.isnan(expected))
    if reduction != "none":
        loss.backward()
        assert torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_all_ignored_is_nan_with_zero_grads(angular):
    x, w, t = make_inputs(6, 4, 3, seed=4)
    t[:] = -100
    out = run_loss(fn(angular), x, w, t, backend="cpu")
    assert torch.isnan(out[0])
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[2]) == 0


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_nan_features_match_torch(angular):
    x, w, t = make_inputs(4, 6, 3, seed=5)
    x[1, 2] = float("nan")
    loss = fn(angular)(x, w, t, backend="cpu", reduction="none")
    ref = F.cross_entropy(x @ w.t(), t, reduction="none")
    assert torch.equal(torch.isnan(loss), torch.isnan(ref))
    assert torch.isnan(fn(angular)(x, w, t, backend="cpu"))


def test_reference_without_margin_is_torch_cross_entropy():
    """The reference itself: with no margin it is torch's cross_entropy of s·cos."""
    x, w, t = make_inputs(13, 9, 6, seed=8, x_dtype=torch.float64, w_dtype=torch.float64)
    cw = torch.rand(6, dtype=torch.float64) + 0.1
    ours = uk.reference.angular_margin_cross_entropy(x, w, t, scale=10.0, margin=0.0,
                                                     class_weight=cw, label_smoothing=0.15)
    logits = 10.0 * F.normalize(x) @ F.normalize(w).t()
    torch.testing.assert_close(ours, F.cross_entropy(logits, t, weight=cw, label_smoothing=0.15))


def test_margin_lowers_target_logit():
    """A test that can fail: the margin must change the loss in the right direction."""
    x, w, t = make_inputs(16, 32, 4, seed=9)
    plain = ANGULAR(x, w, t, margin=0.0, backend="cpu")
    arc = ANGULAR(x, w, t, margin=0.5, backend="cpu")
    cos = ANGULAR(x, w, t, margin=0.0, cos_margin=0.3, backend="cpu")
    assert arc > plain and cos > plain


def test_angular_logits():
    x, w, _ = make_inputs(5, 7, 3, seed=1, x_dtype=torch.bfloat16)
    got = uk.angular_logits(x, w, scale=30.0)
    ref = 30.0 * F.normalize(x.double()) @ F.normalize(w.double()).t()
    assert got.dtype == torch.float32
    assert_close_spec(got, ref, *tolerance(torch.float32))


@pytest.mark.parametrize("small_c_limit", ["16", "0"], ids=["small_pass", "row_blocks"])
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("B,D,C", [(1, 7, 1), (33, 130, 2), (300, 64, 7), (17, 9, 16), (5, 16, 17)])
def test_small_heads_on_both_paths(monkeypatch, small_c_limit, angular, B, D, C):
    """Heads of up to 16 classes take the small-C pass; the same inputs through the row blocks
    (UDAT_CPU_SMALL_C=0) must agree with the reference too."""
    monkeypatch.setenv("UDAT_CPU_SMALL_C", small_c_limit)
    x, w, t = make_inputs(B, D, C, seed=B + C, ignore_rows=(0,))
    bias = None if angular else torch.randn(C)
    for kwargs in ({}, {"reduction": "none", "grl_lambda": 0.5, "label_smoothing": 0.1,
                        "class_weight": torch.rand(C) + 0.5, "sample_weight": torch.rand(B)}):
        check_against_reference(fn(angular), x, w, t, angular=angular, bias=bias,
                                backend="cpu", **kwargs)


def test_insightface_baseline_is_arcface():
    """The benchmark's insightface-style baseline computes the same ArcFace loss, and its
    straight-through gradient, where every target cosine is on the angular branch."""
    x, w, t = make_inputs(12, 16, 5, x_dtype=torch.float64, w_dtype=torch.float64, seed=12,
                          target_cos=0.4)
    ours = run_loss(uk.reference.angular_margin_cross_entropy, x, w, t, scale=30.0,
                    margin_grad="straight_through")
    base = run_loss(uk.reference.insightface_arcface, x, w, t, scale=30.0)
    for a, b in zip(base, ours):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("C", [2, 7, 16])
def test_small_pass_does_not_depend_on_thread_count(C):
    """Fixed chunks summed in a fixed order: 1 and 2 threads give the same bits. (The row-block
    path's GEMMs are the BLAS library's, which does not promise that.)"""
    x, w, t = make_inputs(157, 67, C, seed=5)
    args = (x, w, t, None, None, None, torch.tensor(0.5), True, 16.0, 0.3, 0.0, 0.1, -100, 1,
            False, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.udat_kernels.margin_ce_fwd(*args)
        torch.set_num_threads(2)
        two = torch.ops.udat_kernels.margin_ce_fwd(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@contextlib.contextmanager
def fastest_float32_switches():
    """Every float32 precision switch at its fastest value (restored afterwards): the legacy
    matmul precision, and the generic, oneDNN and oneDNN-matmul fp32_precision settings."""
    saved_legacy = torch.get_float32_matmul_precision()
    targets = [(torch.backends, "fp32_precision", "tf32")]
    mkldnn = torch.backends.mkldnn
    targets += [(mkldnn, "fp32_precision", "bf16")]
    if hasattr(mkldnn, "matmul"):
        targets += [(mkldnn.matmul, "fp32_precision", "bf16")]
    targets = [(obj, name, value) for obj, name, value in targets if hasattr(obj, name)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
    try:
        torch.set_float32_matmul_precision("medium")
        for obj, name, value in targets:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        torch.set_float32_matmul_precision(saved_legacy)


def test_float32_gemms_ignore_precision_switches():
    """float32 inputs get float32 GEMMs whatever the precision switches say (docs/math.md,
    "Precision policy for float32"). On this CPU the switches send a plain torch.mm to a bf16
    oneDNN GEMM (checked first); the backend's results must not change by a bit."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=g), torch.randn(512, 300, generator=g)
    plain = torch.mm(a, b)
    with fastest_float32_switches():
        switched = torch.mm(a, b)
    if torch.equal(plain, switched):
        pytest.skip("the float32 precision switches do not change torch.mm on this CPU")
    assert uk._C_loader.cpu_kernels()["fp32_gemm"] == "blas sgemm"
    cases = [(64, 130, 1000, True), (64, 130, 1000, False), (37, 65, 7, True),
             (300, 512, 3000, True)]
    for B, D, C, angular in cases:
        x, w, t = make_inputs(B, D, C, seed=B + C)
        bias = torch.randn(C, generator=g) if not angular else None
        kwargs = {"backend": "cpu", "bias": bias, "grl_lambda": 0.5}
        default = run_loss(fn(angular), x, w, t, **kwargs)
        with fastest_float32_switches():
            out, _ = check_against_reference(fn(angular), x, w, t, angular=angular, **kwargs)
        for a_, b_ in zip(default, out):
            assert torch.equal(a_, b_), (B, D, C, angular)


def test_avx2_row_loops():
    """The 8-lane row loops, which CPUs without AVX-512 run, in a process that asks for them
    (UDAT_CPU_ROW_LOOPS is read once): the small-C pass and the row blocks, float32 and bf16."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2" not in flags:
        pytest.skip("this CPU has no AVX2")
    script = textwrap.dedent("""
        import torch, udat_kernels as uk
        from helpers import check_against_reference, make_inputs
        assert uk._C_loader.cpu_kernels()["row_loops"] == "avx2+fma"
        for B, D, C, dt in [(33, 130, 7, torch.float32), (64, 33, 1000, torch.float32),
                            (64, 33, 1000, torch.bfloat16)]:
            for angular in (True, False):
                fn = uk.angular_margin_cross_entropy if angular else uk.linear_cross_entropy
                x, w, t = make_inputs(B, D, C, x_dtype=dt, w_dtype=dt, seed=C)
                check_against_reference(fn, x, w, t, angular=angular, backend="cpu",
                                        label_smoothing=0.1)
        """)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, UDAT_CPU_ROW_LOOPS="avx2",
               PYTHONPATH=os.pathsep.join([here, os.path.dirname(here),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
