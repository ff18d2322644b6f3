"""Every grid the Triton launchers compute fits CUDA's limits (docs/design.md, "The Triton
kernels"), at every size the backend serves: B up to 65536, C up to 2·10^7.

The interpreter has no grid limits, so this is the only check of them without a GPU. The grids
are the launchers' own: each launch is planned on meta tensors in a dry run (plan.py), and the
launch path's check (`_runtime.check_grid`) raises where CUDA would refuse the launch.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from udat_kernels.triton_backend import _runtime, plan, small_c, tiled  # noqa: E402

BS = (1, 64, 4097, 65536)
CS = (1, 2, 7, 16, 17, 1000, 100_000, 1_000_000, 10_000_000, 20_000_000)


def _check_all(rec):
    assert rec.launches, "nothing was launched"
    for name, grid in rec.launches:
        assert 1 <= len(grid) <= 3, (name, grid)
        assert 1 <= grid[0] < 2**31, (name, grid)
        assert all(1 <= g <= 65535 for g in grid[1:]), (name, grid)


@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("B", BS)
def test_grids_within_cuda_limits(B, C):
    for dtype in ("bf16", "fp32"):
        for D in (64, 1024):
            for grad_in_forward in (True, False):
                _check_all(plan.plan(B, D, C, dtype, grad_in_forward=grad_in_forward))
    _check_all(plan.plan(B, 512, C, "fp16", w_dtype="fp32", normalize=False))


def test_grids_with_test_tiles():
    # The interpreter tests' small tiles (16×16) make the most class tiles.
    tiny = _runtime.DeviceInfo(gpu=False, num_sms=2, free_bytes=8 << 30, total_bytes=8 << 30)
    _check_all(plan.plan(65536, 64, 20_000_000, "fp32", info=tiny))


def test_large_c_chunk_grid_covers_every_class_tile():
    # The grid of the logits kernel holds every (row tile, class tile) pair exactly once.
    bm, bn = 128, 128
    for rows, C in ((1, 1), (300, 10_000_000), (8192, 20_000_000)):
        (n,) = tiled._logits_grid(rows, C, bm, bn)
        assert n == -(-rows // bm) * -(-C // bn)


def test_check_grid_rejects_what_cuda_rejects():
    with pytest.raises(ValueError, match="limits"):
        _runtime.check_grid("k", (1, 65536))
    with pytest.raises(ValueError, match="limits"):
        _runtime.check_grid("k", (2**31,))
    with pytest.raises(ValueError, match="empty"):
        _runtime.check_grid("k", (0,))
    assert _runtime.check_grid("k", (2**31 - 1, 65535, 65535))


def test_launch_checks_the_grid_before_running():
    # launch() refuses the grid that crashed the old tiled path (C = 10^7, 64-wide tiles on a
    # second grid axis) before the kernel is called.
    with pytest.raises(ValueError, match="limits"):
        _runtime.launch(tiled._logits_kernel, (1, -(-10_000_000 // 64)), (), {}, 4, 3)


def test_small_c_grid_functions_used_by_the_launch():
    rec = plan.plan(65536, 1024, 7, "bf16")
    kernels = {k.split(":")[1] for k, _ in rec.launches}
    assert "_small_c_kernel" in kernels
    assert small_c._main_grid(5) == (5,)


@pytest.mark.parametrize("C_l", CS)
@pytest.mark.parametrize("B", BS)
def test_shard_mode_grids_within_cuda_limits(B, C_l):
    # One shard's forward and backward (the tiled kernels with a class offset), of 2·C_l classes.
    for dtype in ("bf16", "fp32"):
        _check_all(plan.plan_shard(B, 512, C_l, 2 * C_l, dtype, class_offset=C_l))
    _check_all(plan.plan_shard(B, 64, C_l, C_l, "fp16", w_dtype="fp32", normalize=False))


def test_shard_mode_without_classes_launches_nothing():
    # A shard without classes (C_l = 0) is answered on the host: −inf, zeros, NaN rows.
    assert plan.plan_shard(4097, 512, 0, 3, "bf16").launches == []
