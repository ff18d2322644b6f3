"""Shared fixture of the pytest-benchmark suites: time one (case, implementation) pair.

    pytest benchmarks/ --benchmark-json=bench.json     # then: python -m benchmarks.report --from-json bench.json

UDAT_BENCH_DEVICE=cuda runs the suites on the GPU; UDAT_BENCH_SIZES=full uses the full sizes
(docs/benchmarks.md) instead of the quick ones. Peak memory is measured in the test's own process and
stored in each benchmark's extra_info; `python -m benchmarks.report` measures it in a fresh
process per pair instead.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks import providers
from benchmarks.harness import Case, peak_growth, synchronize


@pytest.fixture
def run_case(benchmark):
    """run_case(case, impl): warm up, let pytest-benchmark time the step, record peak memory."""

    def run(case: Case, impl: str):
        if case.device.startswith("cuda") and not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        try:
            built = providers.build(impl, case)
        except providers.Unavailable as e:
            pytest.skip(str(e))
        built.step()  # compilation and first-touch costs stay out of the timing
        synchronize(case.device)

        def step():
            built.step()
            synchronize(case.device)

        benchmark.group = case.label()
        benchmark.extra_info["case"] = dataclasses.asdict(case)
        benchmark.extra_info["impl"] = impl
        benchmark(step)
        built.clear()
        mem, method = peak_growth(step, case.device)
        benchmark.extra_info["peak_mem_bytes"] = mem
        benchmark.extra_info["mem_method"] = method + " (in process)"

    return run
