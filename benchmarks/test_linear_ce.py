"""pytest-benchmark suite: linear_cross_entropy (softmax heads) against the baselines."""

import pytest

from benchmarks.suite import DEVICE, FULL, impls
from benchmarks.harness import Case

if FULL:
    SHAPES = [(64, 1024, 2), (4096, 1024, 7), (1024, 512, 10_000), (1024, 512, 100_000)]
    DTYPES, MODES = ("fp32", "bf16"), ("fwd", "fwd+bwd")
else:
    SHAPES = [(64, 1024, 7), (256, 512, 10_000)]
    DTYPES, MODES = ("fp32",), ("fwd+bwd",)

CASES = [Case("linear", B, D, C, dt, mode, DEVICE) for dt in DTYPES for mode in MODES
         for (B, D, C) in SHAPES]


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("case", CASES, ids=Case.slug)
def test_linear_ce(run_case, case, impl):
    run_case(case, impl)
