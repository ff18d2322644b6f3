"""Settings shared by the pytest-benchmark suites (see conftest.py)."""

from __future__ import annotations

import os

from benchmarks import providers

DEVICE = os.environ.get("UDAT_BENCH_DEVICE", "cpu")
FULL = os.environ.get("UDAT_BENCH_SIZES", "quick") == "full"


def impls() -> list[str]:
    """Ours on the device, then every baseline (those that cannot run here skip with a reason)."""
    return providers.our_impls(DEVICE) + list(providers.BASELINES)
