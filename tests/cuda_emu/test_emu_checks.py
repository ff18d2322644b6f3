"""The emulator catches what it claims to (emulator.h): small kernels with one defect each, and
their correct twins (selftest.cpp). The kernels of csrc/cuda are held to the same checks in
test_emu_kernels.py, and the mutant builds (mutants.cmake) put known defects back into them."""

from __future__ import annotations

import pytest
import torch

# Checks made by the emulator's own calls (barriers, collectives, vector accesses): the rest come
# from the access instrumentation, which the AddressSanitizer build does without.
EXPLICIT = {"misaligned_vector", "shuffle_mask", "shuffle_divergent", "divergent_barrier"}
CASES = {
    # case: None when it must pass, else what the report must say
    "shared_sync": None,
    "shared_race": r"data race|never written",
    "in_bounds": None,
    "out_of_bounds": r"out-of-bounds read of 4 bytes: the address 0 bytes past the end of 'in'",
    "aligned_vector": None,
    "misaligned_vector": r"misaligned 16-byte vector access of 'in' at byte 4",
    "fence": None,
    "missing_fence": r"data race: a read after a write of 'parts'.*__threadfence \+ atomic",
    "blocks_collide": r"data race: a write after a write of 'out'",
    "shuffle_ok": None,
    "shuffle_mask": r"outside its mask|leaves out its own lane",
    "shuffle_divergent": r"waits for a lane that has exited",
    "divergent_barrier": r"__syncthreads reached after other threads of the block exited",
    "uninitialized_shared": r"read of shared memory never written",
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_selftest(emu, case, seed):
    emu.config(seed=seed)
    expected = CASES[case]
    if expected is not None and case not in EXPLICIT and not emu.get("instrumented"):
        pytest.skip("this build has no access instrumentation (the AddressSanitizer build)")
    if expected is None:
        torch.ops.udat_cuda_emu.selftest(case)
    else:
        with pytest.raises(RuntimeError, match=expected):
            torch.ops.udat_cuda_emu.selftest(case)


def test_launch_log_names_kernels(emu):
    torch.ops.udat_cuda_emu.selftest("fence")
    (launch,) = emu.kernels()
    assert launch["name"] == "last_block_sum" and launch["grid"] == [8, 1, 1]
