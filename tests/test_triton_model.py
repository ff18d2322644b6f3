"""The Triton performance model (benchmarks/model_triton.py; docs/design.md, "The Triton model"):
its arithmetic on hand-made launches, and that it reads the launchers' own plans."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from benchmarks import model_triton as mt  # noqa: E402
from benchmarks.model_params import H200  # noqa: E402
from udat_kernels.triton_backend._runtime import Cost  # noqa: E402

K = "udat_kernels.triton_backend.tiled:_gemm_kernel"


def test_streaming_launch_at_the_copy_rate():
    # Enough programs with enough bytes in flight: bytes / (0.9 × 4.3 TB/s).
    t = mt.launch_time(K, (1320,), Cost(bytes=1e9, inflight=64 << 10), {"gemm_kernel": 2})
    assert t.memory_s == pytest.approx(1e9 / (0.9 * H200["hbm_bytes_per_s"]))
    assert t.waves == 5


def test_few_programs_are_latency_bound():
    # One program with 16 KB in flight: 16 KB per DRAM round trip.
    t = mt.launch_time(K, (1,), Cost(bytes=256 << 10, inflight=16 << 10), {"gemm_kernel": 1})
    assert t.memory_s == pytest.approx(16 * H200["dram_latency_s"])


def test_partial_last_wave_costs_compute():
    full = mt.launch_time(K, (264,), Cost(flops=1e12, dot="bf16"), {"gemm_kernel": 2})
    part = mt.launch_time(K, (265,), Cost(flops=1e12, dot="bf16"), {"gemm_kernel": 2})
    assert part.compute_s == pytest.approx(full.compute_s * 2 * 264 / 265)


def test_model_reads_the_plan():
    s = mt.step(64, 1024, 7, "bf16")
    assert s.triton_launches >= 1 and s.graph_s > 0
    rows = mt.targets()
    assert len(rows) == len(mt.PAPER) + len(mt.BANDWIDTH) + 3 * len(mt.LARGE)


def test_planning_device_is_the_models_h200():
    from udat_kernels.triton_backend import _runtime

    assert _runtime.H200.num_sms == H200["num_sms"]
    assert _runtime.H200.total_bytes == H200["hbm_bytes"]
    assert _runtime.H200.free_bytes < H200["hbm_bytes"]
