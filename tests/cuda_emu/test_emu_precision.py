"""The CUDA backend's float32 GEMMs run in float32 whatever torch's switches say (docs/math.md,
"Precision policy for float32"), checked on the CPU: the emulator's cuBLAS stand-in rejects a
float32 GEMM asked for a reduced compute type or run on a handle in TF32 math mode (the mode
torch leaves its handle in when TF32 is allowed), and the emulated GEMM path, with every switch
at its fastest, passes the float32 tolerance with results bitwise equal to the default ones."""

from __future__ import annotations

import pytest
import torch

import udat_kernels as uk
from helpers import check_against_reference, make_inputs, run_loss
from test_precision_fp32 import fastest_switches


@pytest.mark.parametrize("case,expected", [
    ("gemm_ok", None),
    ("gemm_tf32_compute", r"float32 GEMM with a reduced compute type|f32 GEMM with a reduced"),
    ("gemm_tf32_handle", r"float32 GEMM on a handle in TF32 math mode"),
])
def test_stand_in_rejects_reduced_precision(emu, case, expected):
    if expected is None:
        torch.ops.udat_cuda_emu.selftest(case)
    else:
        with pytest.raises(RuntimeError, match=expected):
            torch.ops.udat_cuda_emu.selftest(case)


@pytest.mark.parametrize("angular", [True, False], ids=["angular", "linear"])
def test_gemm_path_keeps_float32(emu, monkeypatch, angular):
    monkeypatch.setenv("UDAT_CUDA_BLOCK_BYTES", str(40 * 500 * 4))  # several row blocks
    x, w, t = make_inputs(97, 48, 500, seed=4)
    fn = uk.angular_margin_cross_entropy if angular else uk.linear_cross_entropy
    base = run_loss(fn, x, w, t, backend="cuda", validate=False)
    emu.clear()
    with fastest_switches():
        assert torch.backends.cuda.matmul.allow_tf32
        check_against_reference(fn, x, w, t, angular=angular, backend="cuda", validate=False)
        fast = run_loss(fn, x, w, t, backend="cuda", validate=False)
    for a, b in zip(base, fast):
        assert torch.equal(a, b)
    gemms = emu.gemms()
    assert gemms and all(g["compute"] == 68 and g["math_mode"] & 0xF == 0 for g in gemms), gemms
