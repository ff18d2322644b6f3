"""bfloat16 x and W on the C++ CPU backend (docs/design.md, "bfloat16 inputs on the CPU").

Heads of more than 16 classes take bf16 GEMMs with float32 sums (our AVX-512 BF16 kernel) where
the CPU has the instruction, and float32 GEMMs otherwise; both routes run here on the same inputs
(UDAT_CPU_BF16_GEMM=0 forces the second) and are checked against the float64 reference at the
bf16 tolerance of docs/math.md. The shapes put every GEMM of the row blocks (logits, grad x,
grad W) across the edges of its register tile (14 × 32), of its packed blocks (256 pairs of k,
504 rows, 512 columns), an odd k, and its split over threads along k.
"""

from __future__ import annotations

import pytest
import torch

import udat_kernels as uk
from helpers import KEYWORDS, check_against_reference, make_inputs, materialize_keywords
from udat_kernels import reference

pytestmark = pytest.mark.skipif(not uk._C_loader.available(),
                                reason=f"extension not built: {uk._C_loader.error()}")

BF16 = torch.bfloat16
HAS_KERNEL = uk._C_loader.cpu_kernels().get("bf16_gemm") == "avx512_bf16"
FUNCS = {True: uk.angular_margin_cross_entropy, False: uk.linear_cross_entropy}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.fixture(params=[
    pytest.param("kernel", marks=pytest.mark.skipif(
        not HAS_KERNEL, reason="this CPU has no AVX-512 BF16: bf16 inputs take float32 GEMMs")),
    "float32",
])
def route(request, monkeypatch):
    monkeypatch.setenv("UDAT_CPU_BF16_GEMM", "1" if request.param == "kernel" else "0")
    return request.param


def test_reports_the_kernel_it_picks(monkeypatch):
    """The backend says what it runs, and says it truthfully for this CPU."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    wanted = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}
    info = uk._C_loader.cpu_kernels()
    assert info["bf16_gemm"] == ("avx512_bf16" if wanted <= flags else "none")
    monkeypatch.setenv("UDAT_CPU_BF16_GEMM", "0")
    assert uk._C_loader.cpu_kernels()["bf16_gemm"] == "none"


# (B, D, C): what each case puts across an edge of the three GEMMs
SHAPES = [
    (1, 1, 17),       # one row, one feature (every cosine ±1: straight-through gradient)
    (15, 3, 33),      # odd k in all three GEMMs, partial tiles everywhere
    (14, 32, 64),     # exactly one register tile of logits
    (29, 33, 5001),   # grad x: k = C split over threads
    (3, 64, 20000),   # logits split over classes, grad W over classes, grad x over k
    (13, 1030, 300),  # logits: k = D over several packed blocks of 256 pairs
    (600, 20, 2000),  # logits: rows over two packed blocks of 504
    (20, 600, 3000),  # grad W: columns over two packed blocks of 512
]


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("B,D,C", SHAPES, ids=lambda v: str(v))
def test_shapes(route, B, D, C, angular):
    x, w, t = make_inputs(B, D, C, x_dtype=BF16, w_dtype=BF16, seed=B * 7 + D * 3 + C)
    kwargs = {}
    if angular and D == 1:
        kwargs = {"margin_grad": "straight_through", "grad_tol": (1e-2, 1e-2)}
    gen = torch.Generator().manual_seed(C)
    bias = None if angular else torch.randn(C, generator=gen).to(BF16)
    out, _ = check_against_reference(FUNCS[angular], x, w, t, angular=angular, bias=bias,
                                     backend="cpu", **kwargs)
    assert out[1].dtype == BF16 and out[2].dtype == BF16
    if bias is not None:
        assert out[3].dtype == BF16


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
@pytest.mark.parametrize("name", list(KEYWORDS))
def test_keywords(route, name, angular):
    B, D, C = 33, 65, 1000
    x, w, t = make_inputs(B, D, C, x_dtype=BF16, w_dtype=BF16, seed=11)
    kwargs = materialize_keywords(KEYWORDS[name], B, C, angular, t)
    bias = None if angular else torch.randn(C, generator=torch.Generator().manual_seed(3))
    check_against_reference(FUNCS[angular], x, w, t, angular=angular, bias=bias, backend="cpu",
                            **kwargs)


@pytest.mark.parametrize("rows_per_block", [1, 7])
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_row_blocks(route, monkeypatch, rows_per_block, angular):
    """Many row blocks, a partial last one too: grad x per block, grad W summed over them."""
    B, D, C = 96, 40, 300
    monkeypatch.setenv("UDAT_CPU_BLOCK_BYTES", str(rows_per_block * C * 4))
    x, w, t = make_inputs(B, D, C, x_dtype=BF16, w_dtype=BF16, seed=rows_per_block)
    for kwargs in ({}, {"reduction": "none", "label_smoothing": 0.1, "grl_lambda": 0.5}):
        check_against_reference(FUNCS[angular], x, w, t, angular=angular, backend="cpu",
                                **kwargs)


def test_grad_weight_sums_row_blocks_in_float32(route, monkeypatch):
    """grad W is one float32 sum over the row blocks, rounded to bf16 once. Here the first row
    adds about -95 to grad W[0, 0] and each of the 511 others about -0.095, less than half a bf16
    step at 95: a sum rounded to bf16 after every block would stay at -95 instead of -143."""
    B, D, C = 512, 4, 20
    monkeypatch.setenv("UDAT_CPU_BLOCK_BYTES", str(C * 4))  # one row per block
    x = torch.zeros(B, D, dtype=BF16)
    x[0, 0] = 100.0
    x[1:, 0] = 0.1
    w = torch.zeros(C, D, dtype=BF16)  # uniform softmax: the gradient of class 0 is -0.95·x
    t = torch.zeros(B, dtype=torch.long)
    check_against_reference(uk.linear_cross_entropy, x, w, t, angular=False, backend="cpu",
                            reduction="sum")
    w.requires_grad_()
    uk.linear_cross_entropy(x, w, t, reduction="sum", backend="cpu").backward()
    assert w.grad.dtype == BF16
    assert abs(w.grad[0, 0].item() + 143.6) < 1.0


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(route, threads):
    """The GEMMs split over threads differently (along k for grad x here); every split holds."""
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x, w, t = make_inputs(29, 33, 5001, x_dtype=BF16, w_dtype=BF16, seed=9)
        check_against_reference(uk.angular_margin_cross_entropy, x, w, t, backend="cpu")
    finally:
        torch.set_num_threads(saved)


def test_strided_inputs(route):
    """Views (a transposed x, every other class of a larger W) are read as given."""
    xt, w2, t = make_inputs(40, 70, 400, x_dtype=BF16, w_dtype=BF16, seed=4)
    x = xt.t().contiguous().t()
    assert not x.is_contiguous()
    w = torch.cat([w2, w2], dim=1)[:, :70]
    assert not w.is_contiguous()
    check_against_reference(uk.angular_margin_cross_entropy, x, w, t, backend="cpu")


def _rows_match(got, expected):
    got = got.detach().double()
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), (got, expected)
    assert torch.equal(torch.isposinf(got), torch.isposinf(expected)), (got, expected)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-2, atol=1e-3)


def test_non_finite_inputs(route):
    """NaN and +inf through the bf16 GEMMs follow torch (docs/math.md, "Non-finite inputs")."""
    B, D, C = 12, 9, 40
    x, w, t = make_inputs(B, D, C, x_dtype=BF16, w_dtype=BF16, seed=6)
    t[:] = 0
    x[2, 4] = float("nan")  # that row's loss is NaN
    bias = torch.zeros(C, dtype=BF16)
    bias[5] = float("inf")  # every other row: +inf
    t[7] = 5  # a row whose target logit is +inf: NaN
    got = uk.linear_cross_entropy(x, w, t, bias=bias, reduction="none", backend="cpu")
    expected = reference.linear_cross_entropy(x.double(), w.double(), t, bias=bias.double(),
                                              reduction="none")
    assert torch.isnan(expected[[2, 7]]).all() and torch.isposinf(expected[0])
    _rows_match(got, expected)

    x, w, t = make_inputs(B, D, C, x_dtype=BF16, w_dtype=BF16, seed=7)
    x[3, 0] = float("nan")
    got = uk.angular_margin_cross_entropy(x, w, t, reduction="none", backend="cpu")
    expected = reference.angular_margin_cross_entropy(x.double(), w.double(), t,
                                                      reduction="none")
    _rows_match(got, expected)
    w[(t[0] + 1) % C, 2] = float("nan")  # a non-target class: every row NaN
    got = uk.angular_margin_cross_entropy(x, w, t, reduction="none", backend="cpu")
    assert torch.isnan(got).all()
