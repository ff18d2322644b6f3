"""What a run's result depends on: the one list of result-changing fields, and the run key.

`udat-experiment` keeps one run folder per key (so a finished run is reused only when nothing
that changes its result differs, and is never overwritten), and `--resume` refuses to continue a
run whose result-changing fields differ from the command's. Both use `result_fields`.

Result-changing (`RESULT_FIELDS`, in the key):
  data:  source, target, their roots (absolute) and a fingerprint of their files (relative
         path, size and modification time of every file), the FER2013 test split (when FER2013
         is one of the domains), val_fraction, augment;
  model: the resolved architecture (preset with its overrides applied), the --init file (path
         and fingerprint), the angular head's scale (angular methods only);
  train: method, seed, epochs, batch_size, lr, momentum, weight_decay, amp, the device *type*
         (cpu or cuda), and lambda_max and schedule (adversarial methods only);
  the number of data-parallel processes, when there are more than one (`processes`; absent
  for one process, so that one-process keys do not depend on it): N processes reach the
  parameters of one within float rounding only under the conditions of docs/distributed.md
  ("Data-parallel training"), and dropout draws other masks.
Not result-changing (`OTHER_FIELDS`, not in the key): the validator that picks best.pt
(`select`; every epoch records every validator's score), checkpoint_every, keep, deterministic,
the device's spelling ("cuda" and "cuda:0"), and the process options (threads, progress).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .config import DataConfig, ModelConfig, RunConfig

__all__ = ["RESULT_FIELDS", "OTHER_FIELDS", "data_files", "fingerprint", "fingerprints",
           "result_fields", "run_key", "differences"]

RESULT_FIELDS = {
    "data": ("source", "target", "source_root", "target_root", "fer_test", "val_fraction",
             "augment"),
    "model": ("preset", "width", "input_size", "batch_norm", "dropout", "init", "scale"),
    "train": ("method", "seed", "lambda_max", "epochs", "batch_size", "lr", "momentum",
              "weight_decay", "schedule", "amp", "device"),
}
OTHER_FIELDS = {
    "data": (),
    "model": (),
    "train": ("select", "checkpoint_every", "keep", "deterministic"),
}


def data_files(name: str, root) -> list[Path]:
    """The files a domain is read from."""
    if root is None:
        if name == "mnist5k":
            from .data.digits import mnist5k_path

            return [mnist5k_path()]
        if name == "digits":
            import sklearn.datasets

            return [Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"]
        return []
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def fingerprint(files: list[Path], root=None) -> dict:
    """{"files", "bytes", "sha256"} over each file's path (relative to `root`), size and
    modification time: cheap (no file is read) and changed by any rewrite of the data."""
    digest, total = hashlib.sha256(), 0
    for path in files:
        stat = path.stat()
        name = path.relative_to(root).as_posix() if root is not None and Path(root).is_dir() \
            else path.name
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        total += stat.st_size
    return {"files": len(files), "bytes": total, "sha256": digest.hexdigest()[:16]}


def fingerprints(data: DataConfig, model: ModelConfig) -> dict:
    """Fingerprints of the source and target data and of the --init file."""
    out = {side: fingerprint(data_files(getattr(data, side), getattr(data, f"{side}_root")),
                             getattr(data, f"{side}_root"))
           for side in ("source", "target")}
    out["init"] = fingerprint([Path(model.init)]) if model.init else None
    return out


def _absolute(path) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def result_fields(run: RunConfig, prints: dict | None = None, processes: int = 1) -> dict:
    """The result-changing fields of `run`, normalized so that a setting that cannot change
    the result (λ without a domain classifier, the FER2013 split without FER2013, the device
    index) does not change the key. `prints`: `fingerprints(run.data, run.model)`, computed
    here when not given; processes: the data-parallel world size."""
    data, model, train = run.data, run.model, run.train
    prints = fingerprints(data, model) if prints is None else prints
    spec = train.spec
    fields = {
        "data": {"source": data.source, "target": data.target,
                 "source_root": _absolute(data.source_root),
                 "target_root": _absolute(data.target_root),
                 "source_files": prints["source"], "target_files": prints["target"],
                 "fer_test": (data.fer_test if "fer2013" in (data.source, data.target)
                              else None),
                 "val_fraction": data.val_fraction, "augment": data.augment},
        "model": {**model.architecture().to_dict(),
                  "init": _absolute(model.init), "init_file": prints["init"],
                  "scale": model.scale if spec.domain_head == "angular" else None},
        "train": {"method": train.method, "seed": train.seed, "epochs": train.epochs,
                  "batch_size": train.batch_size, "lr": train.lr, "momentum": train.momentum,
                  "weight_decay": train.weight_decay, "amp": train.amp,
                  "device": torch.device(train.device).type,
                  "lambda_max": train.lambda_max if spec.domain_head else None,
                  "schedule": train.schedule if spec.domain_head else None},
    }
    if processes > 1:
        fields["train"]["processes"] = processes
    return json.loads(json.dumps(fields))  # as stored in the run's files (tuples as lists)


def run_key(fields: dict) -> str:
    """A short hash of the result-changing fields (16 hex digits)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(old: dict, new: dict) -> list[str]:
    """'part.field: old -> new' for each result-changing field that differs."""
    out = []
    for part in sorted(set(old) | set(new)):
        a, b = old.get(part, {}), new.get(part, {})
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                out.append(f"{part}.{name}: {a.get(name)!r} -> {b.get(name)!r}")
    return out
