"""`udat-train`: one run of one method, with checkpoints and exact resume.

    udat-train --method udat_as_margin --lambda 0.1 --out runs/one
"""

from __future__ import annotations

import json
import sys

import torch

from ..arguments import parse_train
from ..data import load_domains
from .trainer import Trainer

__all__ = ["main"]


def main(argv=None) -> int:
    command = parse_train(argv)
    if command.threads:
        torch.set_num_threads(command.threads)
    run = command.run
    source, target = load_domains(run.data, run.model.size)
    trainer = Trainer(run, source, target, command.out, progress=command.progress)
    if trainer.init_report is not None:
        print(trainer.init_report.format(), file=sys.stderr)
    result = trainer.fit(resume=command.resume)
    summary = {"method": run.train.method, "seed": run.train.seed,
               "selected_epoch": result["selected_epoch"], "selection": result["selection"],
               "target_acc": result["target_test"]["acc"], "oracle_acc": result["oracle_acc"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
