"""`udat-evaluate`: score a saved checkpoint on any supported data set and split.

    udat-evaluate runs/demo/runs/udat_lambda0.1_seed0_<key>/best.pt --data digits --split test

The checkpoint (best.pt or last.pt of a run folder) carries the run's configuration and class
names, so the model is rebuilt as it was trained and the images are resized to its input. The
data set must have the same classes in the same order (the expression data sets share one
order, so a FER2013 model scores on RAF-DB and the other way round).
"""

from __future__ import annotations

import sys

import torch

from .arguments import parse_evaluate, usage_error
from .config import RunConfig
from .data import load_domain
from .models import UDATVGG
from .training.checkpoint import CheckpointError, atomic_write_json, load_checkpoint
from .training.evaluate import accuracy_report, predict

__all__ = ["main", "evaluate_checkpoint", "format_report"]


def evaluate_checkpoint(path, data: str, root=None, split: str = "test",
                        fer_test: str = "PrivateTest", device: str = "cpu",
                        amp: str = "off") -> dict:
    """{"checkpoint", "data", "split", "images", "classes", "acc", "balanced_acc",
    "per_class", "confusion", "epoch", "config"} of the checkpoint at `path`."""
    state = load_checkpoint(path, remedy="pass the best.pt or last.pt of a finished run")
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of udat-train or udat-experiment (it "
                              f"lacks the run's configuration); pass a run's best.pt or last.pt")
    run = RunConfig.from_dict(state["config"])
    classes = tuple(state["classes"])
    options = {"test_usage": fer_test} if data == "fer2013" else {}
    domain = load_domain(data, root, run.model.size, **options)
    if tuple(domain.classes) != classes:
        raise ValueError(f"{data} has the classes {list(domain.classes)}, the checkpoint was "
                         f"trained on {list(classes)}")
    images = domain.test if split == "test" else domain.train
    model = UDATVGG(len(classes), run.model.architecture())
    model.load_state_dict({k: v for k, v in state["model"].items()
                           if not k.startswith("domain_classifier.")})
    dev = torch.device(device)
    model.to(dev)
    logits = predict(model, images, dev, amp)
    report = accuracy_report(logits, images.labels, len(classes))
    return {"checkpoint": str(path), "data": data, "root": root,
            "split": (fer_test if split == "test" else "Training") if data == "fer2013" else split,
            "images": len(images), "classes": list(classes), **report,
            "epoch": state.get("epoch"), "config": state["config"]}


def format_report(report: dict) -> str:
    classes = report["classes"]
    lines = [f"{report['checkpoint']} (epoch {report['epoch']}) on {report['data']} "
             f"{report['split']} ({report['images']} images): accuracy "
             f"{100 * report['acc']:.2f} %, balanced accuracy "
             f"{100 * report['balanced_acc']:.2f} %", "",
             "| class | accuracy (%) | images |", "|---|---|---|"]
    for name, acc, row in zip(classes, report["per_class"], report["confusion"]):
        lines.append(f"| {name} | {'–' if acc is None else f'{100 * acc:.1f}'} | {sum(row)} |")
    lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
              "| true \\ predicted | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |"
              for name, row in zip(classes, report["confusion"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    command = parse_evaluate(argv)
    if command.threads:
        torch.set_num_threads(command.threads)
    try:
        report = evaluate_checkpoint(command.checkpoint, command.data, command.root,
                                     command.split, command.fer_test, command.device,
                                     command.amp)
    except (CheckpointError, ValueError) as error:
        usage_error("udat-evaluate", str(error))
    print(format_report(report), end="")
    if command.json:
        atomic_write_json(report, command.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
