"""The class-parallel loss on 2 and 3 gloo processes (docs/distributed.md).

Against the single-process op on the same global data: the loss (the same on every rank), every
shard's grad W and every rank's grad of its embeddings, N·∂L/∂x_local — with ignore_index, label
smoothing, class weights, sample weights, uneven shards, a rank without rows, a rank without
classes, sampled centres; settings that differ across ranks and a bad label on one rank raise
on every rank; a rank that dies, raises or stalls makes the others fail with the loss's error
within the timeout. The ranks are separate processes (tests/distributed_workers.py), each run
under a time limit.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed_workers import CASES, launch

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def equivalence(request, tmp_path_factory):
    world = request.param
    codes, logs, results = launch("equivalence", world, tmp_path_factory.mktemp(f"eq{world}"),
                                  timeout_s=90)
    assert codes == [0] * world and all(r is not None for r in results), "\n".join(logs)
    return world, results


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_single_process_op(equivalence, case):
    world, results = equivalence
    for rank, res in enumerate(results):
        got = res[case]
        assert "exception" not in got, f"rank {rank}:\n{got.get('exception')}"
        for name in ("loss", "grad_weight", "grad_embeddings"):
            err, bound = got[name]
            assert err <= bound, (f"{case}, rank {rank} of {world}: {name} error {err:.3e} > "
                                  f"bound {bound:.3e}")
        assert got["same_loss_everywhere"], f"{case}: the ranks returned different losses"
        assert all(got["grad_dtypes"]), f"{case}: gradient dtypes"
        if case == "sampled":  # the sampled problem must leave some centres out
            assert got["classes_used"] < CASES[case][0], got["classes_used"]


def test_ddp_average_gives_the_single_process_backbone_gradient(equivalence):
    """Partial FC's convention: the embeddings get N·∂L/∂x_local, DDP averages over N."""
    world, results = equivalence
    for rank, res in enumerate(results):
        got = res["ddp_backbone"]
        assert "exception" not in got, f"rank {rank}:\n{got.get('exception')}"
        for name, (err, bound) in got.items():
            assert err <= bound, f"rank {rank} of {world}: {name} error {err:.3e} > {bound:.3e}"


def test_settings_that_differ_are_named_on_every_rank(equivalence):
    world, results = equivalence
    for rank, res in enumerate(results):
        err = res["settings_mismatch"]
        assert err["type"] == "ValueError", err
        assert "margin (rank 0: 0.5" in err["message"], err["message"]
        assert "sample_rate (rank 0: 0.5, rank 1: 1.0" in err["message"], err["message"]
        assert "scale" not in err["message"]


def test_a_bad_label_on_one_rank_raises_on_every_rank(equivalence):
    world, results = equivalence
    for res in results:
        err = res["bad_label"]
        assert err["type"] == "ValueError", err
        assert "local_labels: rank 1 has 1 label(s) outside [0, 10)" in err["message"]
        assert "e.g. 15" in err["message"]


@pytest.mark.parametrize("scenario", ["dies", "raises", "stalls"])
def test_a_failed_rank_makes_the_others_fail_within_the_timeout(scenario, tmp_path):
    codes, logs, results = launch(scenario, 2, tmp_path, timeout_s=60)
    res = results[0]
    assert res is not None, "\n".join(logs)
    assert res["type"] == "DistributedLossError", res
    assert "failed on rank 0 of 2" in res["message"], res["message"]
    assert "another rank died, raised, or did not reach this collective" in res["message"]
    limit = 20 if scenario == "stalls" else 15
    assert res["seconds"] < limit, res
    if scenario == "stalls":
        assert "within 4 s" in res["message"] and res["seconds"] >= 3.5, res


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                    reason="needs a CUDA device and NCCL")
def test_one_host_sync_per_step_on_cuda(tmp_path):
    """The size exchange is the one host sync of a step; sampling adds one (docs/distributed.md,
    "What a step exchanges")."""
    codes, logs, results = launch("cuda_syncs", 1, tmp_path, timeout_s=120)
    res = results[0]
    assert res is not None, "\n".join(logs)
    assert res["syncs"] == 1, res["syncs_messages"]
    assert res["syncs_sampled"] == 2, res["syncs_sampled_messages"]
