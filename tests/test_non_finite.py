"""NaN and ±inf inputs on every backend follow torch (docs/math.md, "Non-finite inputs").

The expected loss of each row is torch's `logsumexp(z) − z_y` on the same logits (the float64
reference): a NaN logit makes its row NaN, a +inf logit makes the row +inf when the target
logit is finite and NaN when the target logit is +inf. Each backend runs on each of its paths
(small heads and row blocks on the CPU; the small-C kernels and the tiled path in Triton).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import udat_kernels as uk  # noqa: E402
from udat_kernels import reference  # noqa: E402

INF, NAN = float("inf"), float("nan")


def _triton_reason():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the installation
        return f"triton not importable: {exc}"
    return None if uk._C_loader.available() else "the compiled extension is not built"


# (backend, device, path): the environment or module settings that force each path.
BACKENDS = [
    pytest.param(("cpu", "cpu", "small"), id="cpu-small_c"),
    pytest.param(("cpu", "cpu", "blocks"), id="cpu-row_blocks"),
    pytest.param(("triton", "cuda" if torch.cuda.is_available() else "cpu", "small"),
                 id="triton-small_c",
                 marks=pytest.mark.skipif(_triton_reason() is not None,
                                          reason=str(_triton_reason()))),
    pytest.param(("triton", "cuda" if torch.cuda.is_available() else "cpu", "tiled"),
                 id="triton-tiled",
                 marks=pytest.mark.skipif(_triton_reason() is not None,
                                          reason=str(_triton_reason()))),
    pytest.param(("cuda", "cuda", "auto"), id="cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    name, device, path = request.param
    if name == "cpu":
        # The small-C pass serves heads of up to 16 classes; 0 sends them to the row blocks.
        monkeypatch.setenv("UDAT_CPU_SMALL_C", "16" if path == "small" else "0")
    elif name == "triton" and path == "tiled":
        from udat_kernels.triton_backend import small_c

        monkeypatch.setattr(small_c, "SMALL_C_MAX", 0)
    return name, device


def _expected(fn, x, w, t, **kw):
    return fn(x.double().cpu(), w.double().cpu(), t.cpu(), reduction="none",
              **{k: (v.double().cpu() if isinstance(v, torch.Tensor) else v)
                 for k, v in kw.items()})


def _assert_rows_match(got, expected):
    """Same NaN rows, same infinite rows with the same sign, finite rows close."""
    got = got.detach().double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), (got, expected)
    assert torch.equal(torch.isposinf(got), torch.isposinf(expected)), (got, expected)
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected)), (got, expected)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=1e-5)


def _inputs(B, D, C, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    w = torch.randn(C, D, generator=g)
    t = torch.randint(0, C, (B,), generator=g)
    return x.to(device), w.to(device), t.to(device)


@pytest.mark.parametrize("C", [2, 7, 40])
def test_linear_inf_bias(backend, C):
    """+inf in the bias of one class: finite-target rows +inf, that class's rows NaN."""
    name, device = backend
    x, w, t = _inputs(9, 5, C, device, seed=C)
    t[:3] = 1  # rows whose target logit is +inf
    t[3:] = 0
    bias = torch.zeros(C, device=device)
    bias[1] = INF
    got = uk.linear_cross_entropy(x, w, t, bias=bias, reduction="none", backend=name)
    expected = _expected(reference.linear_cross_entropy, x, w, t, bias=bias)
    assert torch.isposinf(expected[3:]).all() and torch.isnan(expected[:3]).all()
    _assert_rows_match(got, expected)


@pytest.mark.parametrize("C", [2, 7, 40])
def test_linear_two_inf_logits(backend, C):
    """Two +inf logits in a row give lse = +inf (not inf − inf)."""
    name, device = backend
    x, w, t = _inputs(6, 4, C, device, seed=3)
    t[:] = 0
    bias = torch.zeros(C, device=device)
    bias[C - 1] = INF
    bias[C // 2] = INF
    got = uk.linear_cross_entropy(x, w, t, bias=bias, reduction="none", backend=name)
    _assert_rows_match(got, _expected(reference.linear_cross_entropy, x, w, t, bias=bias))


@pytest.mark.parametrize("C", [2, 7, 40])
@pytest.mark.parametrize("column", ["first", "last", "middle"])
def test_linear_nan_bias(backend, C, column):
    """A NaN logit in any column makes every row NaN, wherever it sits (any lane or tile)."""
    name, device = backend
    x, w, t = _inputs(5, 3, C, device, seed=4)
    bias = torch.randn(C, device=device)
    bias[{"first": 0, "last": C - 1, "middle": C // 2}[column]] = NAN
    got = uk.linear_cross_entropy(x, w, t, bias=bias, reduction="none", backend=name)
    _assert_rows_match(got, _expected(reference.linear_cross_entropy, x, w, t, bias=bias))
    assert torch.isnan(got).all()


@pytest.mark.parametrize("C", [2, 7, 40])
@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_nan_and_inf_in_x(backend, C, angular):
    """NaN or +inf in one row of x spoils that row only (an infinite feature has no direction:
    its cosines are NaN)."""
    name, device = backend
    x, w, t = _inputs(6, 5, C, device, seed=C + 1)
    x[1, 2] = NAN
    x[4, 0] = INF
    fn = uk.angular_margin_cross_entropy if angular else uk.linear_cross_entropy
    ref = reference.angular_margin_cross_entropy if angular else reference.linear_cross_entropy
    got = fn(x, w, t, reduction="none", backend=name)
    expected = _expected(ref, x, w, t)
    assert torch.isfinite(expected[[0, 2, 3, 5]]).all()
    _assert_rows_match(got, expected)


@pytest.mark.parametrize("C", [2, 7, 40])
def test_nan_in_a_non_target_class_centre(backend, C):
    """A NaN in a class centre that is no row's target still reaches every row's log-sum-exp."""
    name, device = backend
    x, w, t = _inputs(7, 6, C, device, seed=C + 2)
    t[:] = 0
    w[C - 1, 3] = NAN
    got = uk.angular_margin_cross_entropy(x, w, t, reduction="none", backend=name)
    _assert_rows_match(got, _expected(reference.angular_margin_cross_entropy, x, w, t))
    assert torch.isnan(got).all()
