"""float32 inputs get float32 arithmetic whatever torch's global precision switches say
(docs/math.md, "Precision policy for float32").

Each test first sets every switch to its fastest value and shows that this changes a plain
torch.mm on the device at hand (on the CPU through oneDNN's bfloat16 path, which this machine's
CPU has units for; on a GPU through TF32), so that the check after it can fail: the backend's
result must still meet the float32 tolerance against the float64 reference. The CUDA backend is
also checked on the CPU, under the emulator, whose GEMM stand-in rejects a float32 GEMM asked for
a reduced compute type (tests/cuda_emu/test_emu_precision.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import udat_kernels as uk
from helpers import check_against_reference, make_inputs, run_loss

# (object, attribute, fastest value): every global switch torch has for float32 matmuls.
SWITCHES = [
    (torch.backends.cuda.matmul, "allow_tf32", True),
    (torch.backends.cudnn, "allow_tf32", True),
    (torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", True),
    (torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", True),
    (torch.backends, "fp32_precision", "bf16"),
    (torch.backends.mkldnn, "fp32_precision", "bf16"),
    (torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
    (torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    (torch.backends.cudnn, "fp32_precision", "tf32"),
]


@contextlib.contextmanager
def fastest_switches():
    """Every float32 precision switch at its fastest value; all restored afterwards."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in SWITCHES if hasattr(obj, name)]
    saved_precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        for obj, name, value in SWITCHES:
            if hasattr(obj, name):
                setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        torch.set_float32_matmul_precision(saved_precision)


def _plain_mm_changes(device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 512, generator=g).to(device)
    b = torch.randn(512, 256, generator=g).to(device)
    exact = a @ b
    with fastest_switches():
        fast = a @ b
    return not torch.equal(exact, fast)


def _gpu_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not uk._C_loader.available() or not uk._C_loader.build_info()["cuda"]:
        return "the extension was built without its CUDA sources"
    return None


pytestmark = pytest.mark.skipif(not uk._C_loader.available(),
                                reason=f"extension not built: {uk._C_loader.error()}")

# Row blocks of the GEMM path (C = 3000) and a small head; angular and linear.
CASES = [(256, 512, 3000, True), (256, 512, 3000, False), (300, 96, 7, True)]


def _check(backend, device, B, D, C, angular):
    x, w, t = make_inputs(B, D, C, seed=C, device=device)
    fn = uk.angular_margin_cross_entropy if angular else uk.linear_cross_entropy
    bias = None if angular else torch.randn(C, generator=torch.Generator().manual_seed(1)).to(device)
    with fastest_switches():
        check_against_reference(fn, x, w, t, angular=angular, bias=bias, backend=backend)


def test_switches_change_a_plain_cpu_mm():
    """Otherwise the tests below could not fail on this machine."""
    assert _plain_mm_changes("cpu"), (
        "the float32 precision switches do not change torch.mm on this CPU (no bfloat16 "
        "units?): the CPU precision test below checks nothing here")


@pytest.mark.parametrize("B,D,C,angular", CASES)
def test_cpu_backend_keeps_float32(B, D, C, angular):
    assert _plain_mm_changes("cpu")
    _check("cpu", "cpu", B, D, C, angular)


def test_cpu_backend_ignores_the_switches_bitwise():
    """The CPU row blocks call the BLAS sgemm directly (docs/design.md, "The GEMMs of the row
    blocks"): no switch reaches them, so the results do not move at all."""
    x, w, t = make_inputs(256, 512, 3000, seed=0)
    base = run_loss(uk.angular_margin_cross_entropy, x, w, t, backend="cpu")
    with fastest_switches():
        fast = run_loss(uk.angular_margin_cross_entropy, x, w, t, backend="cpu")
    for a, b in zip(base, fast):
        assert torch.equal(a, b)


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
@pytest.mark.parametrize("B,D,C,angular", CASES)
def test_cuda_backend_keeps_float32(B, D, C, angular):
    assert _plain_mm_changes("cuda"), "TF32 does not change torch.mm on this GPU"
    _check("cuda", "cuda", B, D, C, angular)
    # The GEMMs ask for float32 compute on a handle in default math mode: bitwise unchanged.
    x, w, t = make_inputs(B, D, C, seed=C, device="cuda")
    fn = uk.angular_margin_cross_entropy if angular else uk.linear_cross_entropy
    base = run_loss(fn, x, w, t, backend="cuda", validate=False)
    with fastest_switches():
        fast = run_loss(fn, x, w, t, backend="cuda", validate=False)
    for a, b in zip(base, fast):
        assert torch.equal(a, b)
