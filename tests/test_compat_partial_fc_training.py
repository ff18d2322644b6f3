"""A real client of PartialFC_V2: arcface_torch's training loop on two gloo processes
(docs/compat.md, "PartialFC_V2").

A tiny backbone (Linear, PReLU, Linear) under DistributedDataParallel, PartialFC_V2 as its
head, one SGD over both (momentum 0.9, weight decay 5e-4), the backbone's gradient clipped at
norm 5 — arcface_torch's train script — trains five steps on two ranks; a single process trains
the same five global batches with the whole head and the unsharded fused op
(CombinedMarginLoss.fused_loss). After the steps, the backbone's parameters, every rank's shard
of the head and the per-step losses match (float32 closeness rule of docs/math.md), for ArcFace
and CosFace, with every centre and with sampled centres (the single process then uses the
centres the ranks sampled). With every centre the same loop with arcface_torch's eager head
(tests/partial_fc_workers.py) lands on the same parameters too, and a single process with a
margin of 0.45 instead of 0.5 lands far outside the tolerance — the comparison can fail.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is not available")

WORLD = 2
RUNS = ["arcface_sample_rate_1.0", "arcface_sample_rate_0.5", "cosface_sample_rate_1.0",
        "cosface_sample_rate_0.5"]


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    from partial_fc_workers import launch

    codes, logs, results = launch("training", WORLD, tmp_path_factory.mktemp("pfc_train"),
                                  timeout_s=120)
    assert codes == [0] * WORLD and all(r is not None for r in results), "\n".join(logs)
    return results


def _run(results, rank, run):
    got = results[rank][run]
    assert "exception" not in got, f"rank {rank}:\n{got.get('exception')}"
    return got


@pytest.mark.parametrize("run", RUNS)
def test_two_ranks_train_as_one_process(training, run):
    for rank in range(WORLD):
        got = _run(training, rank, run)
        for name, (err, bound) in got["vs_single_process"].items():
            assert err <= bound, f"{run}, rank {rank}: {name} error {err:.3e} > {bound:.3e}"
        assert got["losses"] == _run(training, 0, run)["losses"]  # the same on every rank
        if "sample_rate_0.5" in run:
            assert all(n < 11 for n in got["classes_sampled"]), got["classes_sampled"]


@pytest.mark.parametrize("run", ["arcface_sample_rate_1.0", "cosface_sample_rate_1.0"])
def test_trains_as_arcface_torch_does(training, run):
    for rank in range(WORLD):
        got = _run(training, rank, run)
        for name, (err, bound) in got["vs_arcface_torch"].items():
            assert err <= bound, f"{run}, rank {rank}: {name} error {err:.3e} > {bound:.3e}"


def test_the_comparison_can_fail(training):
    for rank in range(WORLD):
        got = _run(training, rank, "arcface_sample_rate_1.0")
        for name, (err, bound) in got["other_margin"].items():
            assert err > 10 * bound, f"rank {rank}: {name} {err:.3e} vs {bound:.3e}"
