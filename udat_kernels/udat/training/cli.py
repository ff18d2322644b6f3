"""`udat-train`: one run of one method, with checkpoints and exact resume.

    udat-train --method udat_as_margin --lambda 0.1 --out runs/one
    torchrun --nproc_per_node 4 -m udat_kernels.udat.training.cli --device cuda --out runs/one

Under torchrun it trains data-parallel, one process per device (`parallel`; docs/distributed.md,
"Data-parallel training"); rank 0 prints and writes the run folder.
"""

from __future__ import annotations

import json
import sys

import torch

from ..arguments import check_loaded_split, parse_train
from ..data import load_domains
from .parallel import from_environment
from .trainer import Trainer

__all__ = ["main"]


def main(argv=None) -> int:
    command = parse_train(argv)
    if command.threads:
        torch.set_num_threads(command.threads)
    run = command.run
    ranks = from_environment(run.train.device)
    progress = command.progress and ranks.main
    if progress and command.overrides:
        print(f"recipe {command.recipe}; set on the command line instead: "
              f"{', '.join(command.overrides)}", file=sys.stderr)
    source, target = load_domains(run.data, run.model.size)
    labelled = "target" if run.train.spec.labelled == "target" else "source"
    check_loaded_split("udat-train", run.data, {labelled: {"source": source,
                                                           "target": target}[labelled]})
    trainer = Trainer(run, source, target, command.out, progress=progress, ranks=ranks)
    if trainer.init_report is not None and ranks.main:
        print(trainer.init_report.format(), file=sys.stderr)
    result = trainer.fit(resume=command.resume, overwrite=command.overwrite)
    summary = {"method": run.train.method, "seed": run.train.seed,
               "selected_epoch": result["selected_epoch"], "selection": result["selection"],
               "target_acc": result["target_test"]["acc"], "oracle_acc": result["oracle_acc"],
               "key": result["key"], **({"processes": ranks.size} if ranks.distributed else {})}
    if ranks.main:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
