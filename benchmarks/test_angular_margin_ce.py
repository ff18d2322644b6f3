"""pytest-benchmark suite: angular_margin_cross_entropy (ArcFace, CosFace) against the baselines."""

import pytest

from benchmarks.suite import DEVICE, FULL, impls
from benchmarks.harness import Case

if FULL:
    SHAPES = ([(B, 512, C) for B in (256, 1024) for C in (10_000, 100_000)]
              + [(B, 1024, C) for B in (64, 4096) for C in (2, 7)])
    DTYPES, MODES = ("fp32", "bf16"), ("fwd", "fwd+bwd")
else:
    SHAPES = [(64, 1024, 2), (64, 1024, 7), (256, 512, 1000), (256, 512, 10_000)]
    DTYPES, MODES = ("fp32",), ("fwd+bwd",)

CASES = [Case(op, B, D, C, dt, mode, DEVICE) for op in ("arcface", "cosface") for dt in DTYPES
         for mode in MODES for (B, D, C) in SHAPES]


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("case", CASES, ids=Case.slug)
def test_angular_margin_ce(run_case, case, impl):
    run_case(case, impl)
