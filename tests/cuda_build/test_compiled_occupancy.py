"""Compiler evidence: every CUDA kernel instantiation that ptxas compiled for sm_90 in the CMake
CUDA build has no spill and reaches the occupancy it is designed for
(benchmarks/cuda_design_occupancy.json) at every feature size its design covers.

ctest runs this with UDAT_PTXAS_DIR set to the build's object folder, where
tests/cuda_build/record_ptxas.py kept ptxas's report next to each object; without it only the
parser's own test runs."""

from __future__ import annotations

import os

import pytest

from benchmarks import cuda_occupancy as co

PTXAS_DIR = os.environ.get("UDAT_PTXAS_DIR")
needs_build = pytest.mark.skipif(
    not PTXAS_DIR, reason="no CMake CUDA build's ptxas reports (UDAT_PTXAS_DIR; ctest sets it)")

SAMPLE = """\
ptxas info    : Compiling entry function '_ZN4udat4cuda14small_c_kernelIffLi2EEEvNS0_9SmallArgsIT_T0_EE' for 'sm_80'
ptxas info    : Used 12 registers
ptxas info    : Compiling entry function '_ZN4udat4cuda16row_sumsq_kernelIfEEvPKvNS0_5DTypeEllPT_S6_' for 'sm_90'
ptxas info    : Function properties for _ZN4udat4cuda16row_sumsq_kernelIfEEvPKvNS0_5DTypeEllPT_S6_
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 100 registers, used 1 barriers, 128 bytes smem
"""


def test_parser_and_occupancy_arithmetic():
    (k,) = co.parse_ptxas(SAMPLE)  # the sm_80 entry is not ours to judge
    assert k.base == "row_sumsq_kernel" and k.args == ("float",)
    assert (k.registers, k.spill_stores, k.spill_loads, k.static_smem) == (100, 8, 4, 128)
    rows, problems = co.evidence([k])
    assert any("spills 8 bytes" in p for p in problems)
    assert any("below the design" in p for p in problems)  # 100 registers: 2 blocks of 256
    assert co.blocks_per_sm(128, 512, 0) == 1 and co.blocks_per_sm(64, 512, 0) == 2
    assert co.blocks_per_sm(32, 256, 0) == 8 and co.blocks_per_sm(32, 256, 100_000) == 2


@needs_build
def test_every_kernel_has_no_spill_and_its_design_occupancy():
    kernels = co.load(PTXAS_DIR)
    assert kernels, f"no ptxas report for {co.ARCH} under {PTXAS_DIR}"
    rows, problems = co.evidence(kernels)
    print(co.table(rows))
    assert not problems, "\n".join(problems)
    # every kernel of the design was compiled (and so checked)
    assert {k.base for k in kernels} >= set(co.DESIGN["kernels"])
