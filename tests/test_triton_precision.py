"""float32 inputs get float32 arithmetic in the Triton backend whatever torch's precision
switches say (docs/math.md, "Precision policy for float32"): with every switch at its fastest
value the results are bitwise those of the default settings, and within the float32 tolerance
of the reference. On a GPU the same test runs the compiled kernels, where the switches would
make cuBLAS use TF32.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import udat_kernels as uk  # noqa: E402
from helpers import check_against_reference, make_inputs, run_loss  # noqa: E402

pytestmark = pytest.mark.skipif(not uk._C_loader.available(),
                                reason="the Triton ops take their schema from the extension")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def fastest_switches():
    """Every fp32 precision switch at its fastest value; restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # the CPU's reduced fp32 GEMM
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
        torch.backends.mkldnn.matmul.fp32_precision = saved[3]


def _cpu_has_bf16_units() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_switches_change_a_plain_product():
    # The switches are live here: otherwise the test below could not fail.
    if DEVICE == "cpu" and not _cpu_has_bf16_units():
        pytest.skip("this CPU has no bf16 units: the fp32 switches change nothing here")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 512, generator=g).to(DEVICE)
    b = torch.randn(512, 64, generator=g).to(DEVICE)
    plain = a @ b
    with fastest_switches():
        fast = a @ b
    assert not torch.equal(plain, fast)


@pytest.mark.parametrize("path", ["small_c", "tiled"])
def test_fp32_ignores_precision_switches(path, monkeypatch):
    from udat_kernels.triton_backend import small_c, tiled

    if path == "tiled":
        monkeypatch.setattr(small_c, "SMALL_C_MAX", 0)
        monkeypatch.setattr(tiled, "LOGITS_BUDGET_BYTES", 1)  # several chunks: accumulated
    x, w, t = make_inputs(40, 48, 7, device=DEVICE, seed=21)
    kw = dict(label_smoothing=0.1, grl_lambda=0.5)
    fn = uk.angular_margin_cross_entropy
    default = run_loss(fn, x, w, t, backend="triton", **kw)
    with fastest_switches():
        fast = run_loss(fn, x, w, t, backend="triton", **kw)
        check_against_reference(fn, x, w, t, backend="triton", **kw)
    for u, v in zip(default, fast):
        assert torch.equal(u, v)
