"""Ranks of the data-parallel training tests (tests/test_train_parallel.py), started by
`distributed_workers.launch(..., script=__file__)` as
`python tests/train_workers.py SCENARIO RANK WORLD PORT OUT`.

Each rank sets torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
starts its process group through `parallel.from_environment`, the function `udat-train` calls,
then runs the scenario and saves what it returns to OUT/rank<r>.pt.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

STEPS = 3  # one epoch of ceil(128 / 48) steps


def domains():
    """The two small digit domains of tests/test_train.py (128 training images each)."""
    from udat_kernels.udat.data import Domain, load_digits

    digits = load_digits(size=32)
    source = Domain("a", digits.train.subset(range(128)), digits.test.subset(range(40)), False)
    bright = digits.train.subset(range(128, 256))
    bright.images = (bright.images.int() * 2).clamp(max=255).to(torch.uint8)
    target = Domain("b", bright, digits.test.subset(range(40, 80)), False)
    return source, target


def config(**train):
    """The tiny compact model (with BatchNorm) without dropout, conventional UDAT (softmax
    domain head) without augmentation, one epoch of STEPS steps of a global batch of 48 per
    domain. Why these settings: tests/test_train_parallel.py, "Conditioning"."""
    from udat_kernels.udat.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    base = dict(method="udat", epochs=1, batch_size=48, lr=0.01, momentum=0.9, seed=3,
                keep="both")
    return RunConfig(data=DataConfig(augment="none"),
                     model=ModelConfig(width=1 / 16, dropout=0.0),
                     train=TrainConfig(**{**base, **train}))


def _record_writes(rank):
    """Wrap the trainer's file writers: the list of (rank, file name) each call writes."""
    from udat_kernels.udat.training import trainer

    writes = []
    for name in ("atomic_save", "atomic_write_json", "atomic_write_text", "append_line"):
        original = getattr(trainer, name)

        def wrapped(obj, path, _original=original):
            writes.append((rank, Path(path).name))
            return _original(obj, path)

        setattr(trainer, name, wrapped)
    return writes


class Stop(Exception):
    """Raised by every rank at the same step: an interrupted run."""


def scenario_fit(rank, world, out, ranks):
    """An uninterrupted run, a run stopped after step 2 and resumed (every rank reads last.pt),
    and a finished run asked again (every rank reads result.json)."""
    from udat_kernels.udat.training import Trainer

    writes = _record_writes(rank)
    source, target = domains()
    full = Trainer(config(), source, target, out / "full", progress=False, ranks=ranks)
    result = full.fit()

    def stop_at_2(trainer):
        if trainer.step == 2:
            raise Stop

    stopped = Trainer(config(checkpoint_every=1), source, target, out / "resumed",
                      progress=False, on_step=stop_at_2, ranks=ranks)
    try:
        stopped.fit()
    except Stop:
        pass
    resumed = Trainer(config(checkpoint_every=1), source, target, out / "resumed",
                      progress=False, ranks=ranks)
    resumed_result = resumed.fit(resume=True)
    before = len(writes)
    again = Trainer(config(), source, target, out / "full", progress=False, ranks=ranks)
    again_result = again.fit(resume=True)
    return {"state": full.model.state_dict(), "result": result, "steps": full.step,
            "resumed_state": resumed.model.state_dict(), "resumed_result": resumed_result,
            "again_result": again_result, "writes": writes, "writes_again": writes[before:],
            "rows": full.rows}


def _failing(rank, ranks, fail):
    """Rank 1 fails after step 1 with `fail`; rank 0 reports what it raised, and how long
    after its own step 1 (the time it waited for the failed rank)."""
    from udat_kernels.udat.training import Trainer

    source, target = domains()
    marks = {}

    def on_step(trainer):
        if trainer.step == 1:
            marks["step 1"] = time.monotonic()
            if rank == 1:
                fail()

    trainer = Trainer(config(), source, target, Path(os.environ["UDAT_TEST_OUT"]) / "run",
                      progress=False, on_step=on_step, ranks=ranks)
    t0 = time.monotonic()
    if rank != 0:
        trainer.fit()  # the failure leaves this rank uncaught (a stalled rank fails later)
        return {"type": None}
    try:
        trainer.fit()
    except Exception as error:  # noqa: BLE001 - reported to the test
        return {"type": type(error).__name__, "message": str(error), "step": trainer.step,
                "seconds": time.monotonic() - marks.get("step 1", t0)}
    return {"type": None, "seconds": time.monotonic() - t0, "step": trainer.step}


def scenario_raises(rank, world, out, ranks):
    def fail():
        raise RuntimeError("rank 1 fails on purpose")
    return _failing(rank, ranks, fail)


def scenario_dies(rank, world, out, ranks):
    return _failing(rank, ranks, lambda: os.kill(os.getpid(), signal.SIGKILL))


def scenario_stalls(rank, world, out, ranks):
    """Rank 1 stays alive but does not come back for 1.5 timeouts (the timeout is 20 s here:
    shorter than the library's, long enough for a busy machine's start-up skew)."""
    return _failing(rank, ranks, lambda: time.sleep(1.5 * ranks.timeout_s))


SCENARIOS = {"fit": scenario_fit, "raises": scenario_raises, "dies": scenario_dies,
             "stalls": scenario_stalls}
TIMEOUTS = {"stalls": 20.0}  # seconds; the others keep the library's timeout


def main(argv):
    scenario, rank, world, port, out = argv[1], int(argv[2]), int(argv[3]), argv[4], Path(argv[5])
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), UDAT_TEST_OUT=str(out))
    torch.set_num_threads(1)
    from udat_kernels.distributed import DEFAULT_TIMEOUT_S
    from udat_kernels.udat.training.parallel import from_environment

    ranks = from_environment("cpu", timeout_s=TIMEOUTS.get(scenario, DEFAULT_TIMEOUT_S))
    result = SCENARIOS[scenario](rank, world, out, ranks)
    torch.save(result, out / f"rank{rank}.pt")
    sys.stdout.flush()
    # Leave without tearing the process group down: after a failed collective its destructor
    # may abort, and a peer may already be gone.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
