"""Data-parallel training (docs/distributed.md, "Data-parallel training") on 2 gloo processes:
the same parameters as one process, only rank 0 writes the run folder, every rank resumes from
last.pt, and a rank that raises, dies or stalls makes the other fail with a clear error within
the timeout. The ranks run tests/train_workers.py through distributed_workers.launch.
"""

from __future__ import annotations

import json

import pytest
import torch

from distributed_workers import launch
from train_workers import STEPS, config, domains
from udat_kernels.udat.runkey import result_fields
from udat_kernels.udat.training import Trainer
from udat_kernels.udat.training.parallel import part

pytestmark = pytest.mark.usefixtures("one_thread")

# Not bitwise: DistributedDataParallel sums the ranks' gradients of their halves (and the
# BatchNorm statistics are sums of the ranks' sums), where one process reduces the whole batch
# in another order; float32 rounding then differs in the last bits and three SGD steps with
# momentum carry it. Observed: at most 7e-6 of a tensor's norm (the small BatchNorm shifts).
#
# Conditioning: how far the last bits travel is the run's own property, not the ranks'. In ONE
# process, a relative perturbation of 1e-7 of the initial weights of this tiny model moves some
# parameters after 3 steps by 4e-6 of their norm with the settings of train_workers.config
# (softmax domain head, no augmentation), by 6e-5 with the angular domain head (s = 64), and by
# 0.2 to 0.7 with the shift-and-flip augmentation (the zero-padded borders make near-ties in
# the max-pools, whose gradient jumps). No float tolerance separates the ranks' rounding from
# that, so the comparison uses the well-conditioned settings; the augmentation's draws are
# checked on their own (test_ranks_augment_their_rows_as_one_process).
RTOL = 1e-5


def _close(a: dict, b: dict) -> list[str]:
    """Names of the state-dict entries of a and b whose difference exceeds RTOL of their norm,
    plus a floor of 1e-6 per element: the biases of the convolutions before BatchNorm have no
    gradient (BatchNorm removes the mean), so they hold rounding noise of about 1e-7."""
    bad = []
    for name in a:
        x, y = a[name].double(), b[name].double()
        if not torch.is_floating_point(a[name]):
            if not torch.equal(a[name], b[name]):
                bad.append(name)
            continue
        if (x - y).norm() > RTOL * y.norm() + 1e-6 * y.numel() ** 0.5:
            bad.append(f"{name}: {float((x - y).norm() / y.norm().clamp_min(1e-30)):.2e}")
    return bad


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    codes, logs, results = launch("fit", 2, out, timeout_s=120,
                                  script=str(__import__("train_workers").__file__))
    assert codes == [0, 0], "\n".join(logs)
    return out, results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    source, target = domains()
    trainer = Trainer(config(), source, target, tmp_path_factory.mktemp("one"), progress=False)
    result = trainer.fit()
    return trainer, result


def test_two_ranks_reach_the_parameters_of_one_process(two_ranks, one_process):
    _, results = two_ranks
    trainer, result = one_process
    assert trainer.step == STEPS and [r["steps"] for r in results] == [STEPS, STEPS]
    assert [r["rows"] for r in results] == [(0, 24), (24, 48)]  # disjoint halves of each batch
    one = trainer.model.state_dict()
    for r in results:
        assert _close(r["state"], one) == []
    # the ranks hold the same parameters, bit for bit (every rank applies the same averaged
    # gradient)
    for name in one:
        assert torch.equal(results[0]["state"][name], results[1]["state"][name]), name
    # the reduced step losses and the metrics are those of one process
    got, want = results[0]["result"]["history"][0], result["history"][0]
    assert got["loss_y"] == pytest.approx(want["loss_y"], rel=1e-5)
    assert got["loss_d"] == pytest.approx(want["loss_d"], rel=1e-5) and want["loss_d"] > 0
    assert got["val_acc"] == want["val_acc"]
    assert got["target_test"]["confusion"] == want["target_test"]["confusion"]
    for name in ("entropy", "im", "snd"):
        assert got["scores"][name] == pytest.approx(want["scores"][name], rel=1e-4), name


def test_ranks_augment_their_rows_as_one_process():
    """Each rank draws the crops and flips of the whole global batch and keeps its rows."""
    from udat_kernels.udat.data import to_input

    images = domains()[0].train.images[:12]
    seed = 7
    whole = to_input(images, generator=torch.Generator().manual_seed(seed), flip=True)
    for lo, hi in (part(12, r, 3) for r in range(3)):
        mine = to_input(images[lo:hi], generator=torch.Generator().manual_seed(seed), flip=True,
                        of_batch=(lo, 12))
        assert torch.equal(mine, whole[lo:hi])
    alone = to_input(images[4:8], generator=torch.Generator().manual_seed(seed), flip=True)
    assert not torch.equal(alone, whole[4:8])  # the draws are not those of a 4-image batch


def test_only_rank_0_writes_and_every_rank_resumes(two_ranks, one_process):
    out, results = two_ranks
    assert {rank for rank, _ in results[0]["writes"]} == {0}
    assert results[1]["writes"] == []
    names = {name for _, name in results[0]["writes"]}
    assert names == {"last.pt", "best.pt", "log.jsonl", "result.json"}
    assert sorted(p.name for p in (out / "full").iterdir()) == sorted(names)
    assert not list(out.rglob("*.tmp"))
    log = [json.loads(line) for line in (out / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log] == ["start", "epoch"]  # one line each, not one per rank
    assert log[0]["processes"] == 2
    # stopped after step 2, resumed from last.pt on both ranks: the uninterrupted run's weights
    for r in results:
        for name, value in r["state"].items():
            assert torch.equal(r["resumed_state"][name], value), name
        assert r["resumed_result"]["history"][0]["loss_y"] == \
            r["result"]["history"][0]["loss_y"]
    # a finished run asked again: every rank reads result.json, nobody writes
    assert results[0]["writes_again"] == [] and results[1]["writes_again"] == []
    assert results[1]["again_result"] == results[0]["result"]
    # the run key records the number of processes; one process keeps its old key
    run = config()
    assert results[0]["result"]["key_fields"] == result_fields(run, processes=2)
    assert "processes" not in one_process[1]["key_fields"]["train"]


@pytest.mark.parametrize("scenario", ["raises", "dies", "stalls"])
def test_a_failed_rank_fails_the_other_with_a_clear_error(tmp_path, scenario):
    # one after the other: launched together, the six processes starve on two busy cores
    codes, logs, results = launch(scenario, 2, tmp_path, timeout_s=150,
                                  script=str(__import__("train_workers").__file__))
    assert codes[1] != 0, logs[1]  # the stalled rank fails too, when it comes back
    r = results[0]
    assert r is not None, logs[0]
    assert r["type"] == "DistributedTrainingError", r
    assert "rank 0 of 2" in r["message"] and "another rank died, raised, or did not reach" \
        in r["message"], r["message"]
    assert r["step"] <= 2
    # seconds rank 0 waited after its step 1: a dead rank is noticed when its connections
    # close; a stalled one when the timeout (20 s here) passes, not gloo's 30 minutes
    if scenario == "stalls":
        assert 19 <= r["seconds"] < 50, r
    else:
        assert r["seconds"] < 15, r


def test_uneven_batch_is_refused():
    from udat_kernels.udat.training.parallel import Ranks

    source, target = domains()
    with pytest.raises(ValueError, match="batch_size: 48 .* 5 processes"):
        Trainer(config(), source, target, "unused", progress=False, ranks=Ranks(0, 5))
    assert part(48, 1, 5) == (10, 20) and part(7, 3, 4) == (6, 7)


def test_udat_train_refuses_a_batch_that_does_not_split(monkeypatch, tmp_path, capsys):
    """Under torchrun (WORLD_SIZE > 1) the usage error names --batch-size, before anything
    is loaded or any process group is started."""
    from udat_kernels.udat.arguments import parse_train

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        parse_train(["--out", str(tmp_path / "run"), "--batch-size", "64"])
    assert "argument --batch-size: 64 images per domain do not split evenly over the 3 " \
        "processes" in capsys.readouterr().err
    assert parse_train(["--out", str(tmp_path / "run"), "--batch-size", "63"]).run.train \
        .batch_size == 63
