"""The structure of the Triton kernels' design (docs/design.md, "The Triton kernels"), checked on
the launchers' own plans for an H200 (plan.py: meta tensors, no kernel runs): the paper batch is
spread over several programs, the small-C grid is one wave at the design occupancy, the large-C
chunks follow free device memory, every large-C kernel covers the SMs, and few bytes move per
logit. Plus the large-batch small-C configuration against the reference under the interpreter.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import udat_kernels as uk  # noqa: E402
from helpers import check_against_reference, make_inputs  # noqa: E402
from udat_kernels.triton_backend import _runtime, design, plan, small_c, tiled  # noqa: E402

H200 = _runtime.H200


def _grids(rec, name):
    return [math.prod(g) for k, g in rec.launches if k.endswith(":" + name)]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("C", [2, 7])
def test_paper_batch_runs_as_several_programs(C, dtype):
    rec = plan.plan(64, 1024, C, dtype)
    grids = _grids(rec, "_small_c_kernel")
    assert len(grids) == 2  # the forward, and the backward's recomputation
    assert all(g > 1 for g in grids), grids
    # no torch kernels beyond the loss op's own: the loss is reduced in the kernel
    assert not [k for k, *_ in rec.costs if k.startswith("torch:")]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_large_batch_is_one_wave_at_design_occupancy(dtype):
    rec = plan.plan(65536, 1024, 7, dtype)
    assert set(_grids(rec, "_small_c_kernel")) == {
        H200.num_sms * design.BLOCKS_PER_SM["small_c_kernel"]}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("C", [2, 7])
def test_large_batch_keeps_4kb_in_flight_per_program(C, dtype):
    # Little's law at the model's copy rate and DRAM latency: 1056 programs × 4 KB cover the
    # 2.3 MB the H200 needs in flight; the partials' reduction streams too.
    rec = plan.plan(65536, 1024, C, dtype)
    main = [c for k, _, c, _ in rec.costs if k.endswith(":_small_c_kernel")]
    assert len(main) == 2 and all(c.inflight == 4096 for c in main), [c.inflight for c in main]
    (gw,) = [(g, c) for k, g, c, _ in rec.costs if k.endswith(":_small_c_grad_weight_kernel")]
    assert math.prod(gw[0]) * gw[1].inflight >= 2 * 2**20 * C / 7


def _chunks(free_bytes, C=1_000_000, B=8192, D=512):
    info = _runtime.DeviceInfo(gpu=True, num_sms=132, free_bytes=free_bytes,
                               total_bytes=141 * 10**9)
    rec = plan.plan(B, D, C, "bf16", info=info)
    return len(_grids(rec, "_logits_kernel")), rec.peak


def test_large_c_chunks_follow_free_memory():
    # 141 GB device with 140 GB free: all 8192 rows in one chunk at C = 1e6.
    n, peak = _chunks(140 * 10**9)
    assert n == 1
    assert peak <= tiled.FREE_FRACTION * 140 * 10**9
    # Less free memory: more chunks, each within the share of free memory it may take.
    for free in (30 * 10**9, 12 * 10**9):
        n2, peak2 = _chunks(free)
        assert n2 > n and peak2 <= tiled.FREE_FRACTION * free
        n = n2
    # The extra-peak cap holds where eager fits: at most 25% of four B×C fp32 tensors.
    _, peak = _chunks(140 * 10**9, C=100_000)
    assert peak <= tiled.EAGER_PEAK_SHARE * 16 * 8192 * 100_000


@pytest.mark.parametrize("C", [100_000, 1_000_000])
def test_large_c_kernels_cover_the_sms_and_move_few_bytes(C):
    rec = plan.plan(8192, 512, C, "bf16")
    for name in ("_logits_kernel", "_row_lse_kernel", "_grad_x_kernel", "_grad_w_kernel",
                 "_project_kernel", "_row_norm_kernel"):
        assert all(g >= H200.num_sms for g in _grids(rec, name)), (name, _grids(rec, name))
    logit_bytes = sum(c.logits for _, _, c, _ in rec.costs)
    assert logit_bytes / (8192 * C) < 7  # P̃ in bf16 written once, read by two GEMMs


def test_large_batch_configuration_against_reference(monkeypatch):
    # Many row blocks over two programs, several blocks each (the grad W partials updated per
    # block), under the interpreter.
    monkeypatch.setattr(small_c, "BLOCK_ROWS", 8)
    x, w, t = make_inputs(530, 24, 7, seed=13, device="cuda" if torch.cuda.is_available()
                          else "cpu")
    check_against_reference(uk.angular_margin_cross_entropy, x, w, t, backend="triton",
                            label_smoothing=0.1, grl_lambda=0.5)
