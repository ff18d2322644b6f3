"""The UDAT / UDAT-AS trainer: one method, one seed, with exact resume.

Each step draws 64 labelled images (source, or target for the train-on-target line) and, for the
adversarial methods, 64 unlabelled target images; G_f sees both, G_y the labelled ones, G_d all of
them with domain labels 0 (source) and 1 (target). The GRL in G_d's first layer makes one backward
pass give θ_f the gradient of L_y − λ·L_r, θ_y that of L_y and θ_r that of L_r (paper eqs. 19–21).

Determinism: every random draw of step k (batch order, crops, flips, dropout) comes from seeds
derived from (seed, k), and the batch streams' positions are saved, so a run resumed from any
checkpoint reaches the same weights and metrics as an uninterrupted one (same device and threads;
on CUDA with `deterministic`).

Run folder: last.pt (resumable state, rewritten atomically at the end of each epoch and every
`checkpoint_every` steps), best.pt (the weights of the epoch the run's validator chose),
log.jsonl (one JSON record per line), result.json (the summary, written at the end). A folder
that holds a run is never overwritten unless asked (`overwrite`); `resume` continues it only
when its result-changing fields (`udat_kernels.udat.runkey`) are those of the command.

Data parallel (`ranks`, `udat_kernels.udat.training.parallel`; docs/distributed.md,
"Data-parallel training"): every rank draws the same global batch indices and augmentation and
trains on its contiguous part of them (batch_size / N labelled and as many target images);
DistributedDataParallel averages the gradients and BatchNorm uses the global batch's
statistics, so that N ranks take the steps one process would. Step losses are averaged over
the ranks; the evaluation predicts a part of each image set on each rank and rank 0 computes
the metrics from the gathered outputs and sends the epoch's record to every rank. Rank 0 alone
prints and writes the run files; the others wait for it at a barrier, and every rank reads
last.pt on resume.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from udat_kernels import __version__
from udat_kernels.schedules import ConstantLambda, GaninLambda, WarmStartLambda

from ..config import RunConfig, TrainConfig
from ..data import Domain, ImageSet, to_input
from ..data.imageset import stratified_split
from ..models import UDATVGG, load_pretrained
from ..runkey import differences, result_fields, run_key
from .checkpoint import (CheckpointError, append_line, atomic_save, atomic_write_json,
                         atomic_write_text, load_checkpoint)
from .evaluate import accuracy_report, autocast_context, mean_entropy, predict
from .parallel import SINGLE, Ranks, part, synchronize_batch_norm
from .streams import BatchStream, derive_seed
from .validators import (dev_risk, evenly_spaced, importance_weights,
                         information_maximization, selection_key, soft_neighbourhood_density)

__all__ = ["Trainer", "RunExistsError", "ResumeError", "LogError", "RUN_FILES",
           "check_run_folder", "validation_split_problem"]

VAL_SPLIT_SEED = 0  # the held-out validation images never depend on the training seed
LOG_EVERY = 20
VALIDATOR_SAMPLE = 2000  # images per domain that the DEV and SND validators look at
RUN_FILES = ("last.pt", "best.pt", "result.json", "log.jsonl")


class RunExistsError(RuntimeError):
    """The run folder already holds a run, and neither resume nor overwrite was asked for."""


class ResumeError(RuntimeError):
    """A run cannot be resumed with the command's settings."""


class LogError(RuntimeError):
    """log.jsonl is damaged before its last line."""


def check_run_folder(out_dir, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run over a folder that holds one, unless resuming or overwriting."""
    out_dir = Path(out_dir)
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not (resume or overwrite):
        raise RunExistsError(f"{out_dir} already holds a run ({', '.join(existing)}): pass "
                             f"--resume to continue it (a finished run is then reused), or "
                             f"--overwrite to delete it and train again")


def validation_split_problem(n: int, num_classes: int, fraction: float, name: str) -> str | None:
    """Why a stratified validation split of `fraction` of n images cannot hold every class in
    both parts (None when it can)."""
    n_val = math.ceil(fraction * n)
    if n_val >= num_classes and n - n_val >= num_classes:
        return None
    need = num_classes / n
    return (f"{fraction:g} of the {n} labelled training images of {name} is {n_val} "
            f"validation images (and {n - n_val} for training); each part needs at least one "
            f"image of each of its {num_classes} classes: use a value in "
            f"[{need:.3g}, {1 - need:.3g}]")


class _StepLosses(torch.nn.Module):
    """The training step's forward as one module call, for DistributedDataParallel, whose
    gradient hooks are armed by its forward: (L_y on the labelled rows, L_d or None)."""

    def __init__(self, model: UDATVGG):
        super().__init__()
        self.model = model

    def forward(self, x, labels, domains=None):
        features = self.model.extract(x)
        loss_y = self.model.label_loss(features[:len(labels)], labels)
        if domains is None:
            return (loss_y,)
        return loss_y, self.model.domain_loss(features, domains)


def _make_schedule(config: TrainConfig):
    if config.schedule == "constant":
        return ConstantLambda(config.lambda_max)
    if config.schedule == "warm_start":
        return WarmStartLambda(hi=config.lambda_max)
    return GaninLambda(config.lambda_max)


class Trainer:
    """Trains `run.train.method` on (source, target) into `out_dir`.

    progress: tqdm bars and one console line per epoch (rank 0 only). prints: the data
    fingerprints (`udat_kernels.udat.runkey.fingerprints`) when the caller has them already.
    `on_step(trainer)` is called after every optimiser step (tests use it to interrupt a run).
    ranks: the data-parallel processes (`parallel.from_environment`); one process by default.
    """

    def __init__(self, run: RunConfig, source: Domain, target: Domain, out_dir, *,
                 progress: bool = True, on_step=None, prints: dict | None = None,
                 ranks: Ranks = SINGLE):
        if source.classes != target.classes:
            raise ValueError(f"source and target classes differ: {source.classes} vs "
                             f"{target.classes}")
        self.run = run
        self.config = config = run.train
        self.ranks = ranks
        if config.batch_size % ranks.size:
            raise ValueError(f"batch_size: {config.batch_size} images per domain do not split "
                             f"evenly over {ranks.size} processes; give a multiple of "
                             f"{ranks.size}")
        # this rank's rows of each global batch
        self.rows = part(config.batch_size, ranks.rank, ranks.size)
        self.source, self.target = source, target
        self.out_dir = Path(out_dir)
        self.progress, self.on_step = progress and ranks.main, on_step
        self.key_fields = result_fields(run, prints, processes=ranks.size)
        self.key = run_key(self.key_fields)
        self.device = ranks.device(config.device)
        if config.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device; use 'bf16' on the CPU")
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        spec = config.spec
        self.labelled_domain = target if spec.labelled == "target" else source
        labels = self.labelled_domain.train.labels
        problem = validation_split_problem(len(labels), len(labels.unique()),
                                           run.data.val_fraction, self.labelled_domain.name)
        if problem:
            raise ValueError(f"val_fraction: {problem}")
        train_index, val_index = stratified_split(labels.numpy(), run.data.val_fraction,
                                                  VAL_SPLIT_SEED)
        self.labelled = self.labelled_domain.train.subset(train_index)
        self.val = self.labelled_domain.train.subset(val_index)
        self.model = self._build_model()
        self._losses = self._step_module()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr,
                                         momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16")
        self.adversarial = spec.domain_head is not None
        # An epoch is one pass over the larger training set, whatever the method, so that every
        # method takes the same number of steps.
        self.steps_per_epoch = math.ceil(max(len(source.train), len(target.train))
                                         / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.labelled_stream = BatchStream(len(self.labelled), config.batch_size, config.seed, 0)
        self.target_stream = (BatchStream(len(target.train), config.batch_size, config.seed, 1)
                              if self.adversarial else None)
        self.step, self.epoch = 0, 0
        self.history: list[dict] = []
        self.best: dict = {"epoch": None, "key": None}
        self._sums = {"loss_y": 0.0, "loss_d": 0.0, "steps": 0}

    def _build_model(self):
        config, spec, arch = self.config, self.config.spec, self.run.model
        torch.manual_seed(derive_seed(config.seed, 0))  # the initial weights
        model = UDATVGG(len(self.source.classes), arch.architecture(),
                        domain_head=spec.domain_head, domain_scale=arch.scale,
                        domain_margin=spec.margin, lambda_=_make_schedule(config))
        size = model.config.input_size
        for domain in (self.source, self.target):
            if domain.train.images.shape[-1] != size:
                raise ValueError(f"{domain.name} images are {domain.train.images.shape[-1]}px, "
                                 f"the model takes {size}px: load the domain with size={size}")
        self.init_report = load_pretrained(model, arch.init) if arch.init else None
        model.to(self.device)
        if self.device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        return synchronize_batch_norm(model, self.ranks, self.device)

    def _step_module(self):
        """The step's losses as a module: under DistributedDataParallel with several ranks
        (every parameter is used in every step; the BatchNorm buffers are the same on every
        rank, computed from the global statistics, so they are not broadcast)."""
        losses = _StepLosses(self.model)
        if not self.ranks.distributed:
            return losses
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.device.type == "cuda"
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers"
                   in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})  # the keyword of older releases
        with self.ranks.collective("the model's start (DistributedDataParallel)"):
            return DistributedDataParallel(losses, device_ids=[self.device] if cuda else None,
                                           **no_sync)

    @property
    def label(self) -> str:
        lam = f" λ {self.config.lambda_max:g}" if self.adversarial else ""
        return f"{self.config.method}{lam} seed {self.config.seed}"

    # --- state --------------------------------------------------------------------------------

    def _identity(self) -> dict:
        """What every checkpoint carries to be read on its own (udat-evaluate, t-SNE)."""
        return {"config": self.run.to_dict(), "key": self.key, "key_fields": self.key_fields,
                "classes": list(self.source.classes), "version": __version__}

    def state_dict(self) -> dict:
        return {**self._identity(), "kind": "last", "step": self.step, "epoch": self.epoch,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "labelled_stream": self.labelled_stream.state_dict(),
                "target_stream": self.target_stream.state_dict() if self.target_stream else None,
                "history": self.history, "best": self.best, "sums": dict(self._sums)}

    def _check_same_run(self, fields: dict, what: str) -> None:
        changed = differences(fields, self.key_fields)
        if changed:
            raise ResumeError(
                f"cannot resume {self.out_dir}: {what} was made with other settings that change "
                f"the result ({'; '.join(changed)}). Give the run's settings again, or train "
                f"into another folder, or pass --overwrite to delete the run and train again")

    def load_state_dict(self, state: dict) -> None:
        missing = {"key_fields", "model", "optimizer", "step", "history"} - set(state)
        if missing:
            raise CheckpointError(f"{self.out_dir / 'last.pt'} is not a resumable checkpoint of "
                                  f"this version (it lacks {', '.join(sorted(missing))}); pass "
                                  f"--overwrite to train the run again")
        self._check_same_run(state["key_fields"], "last.pt")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.labelled_stream.load_state_dict(state["labelled_stream"])
        if self.target_stream:
            self.target_stream.load_state_dict(state["target_stream"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.history, self.best, self._sums = state["history"], state["best"], state["sums"]

    def _save(self) -> None:
        """last.pt, written by rank 0 while the others wait."""
        if self.ranks.main:
            atomic_save(self.state_dict(), self.out_dir / "last.pt")
        self.ranks.barrier("waiting for rank 0 to write last.pt", self.step)

    def _log(self, record: dict) -> None:
        if self.ranks.main:
            append_line(json.dumps(record), self.out_dir / "log.jsonl")

    def _truncate_log(self) -> None:
        """Drop log records written after the checkpoint we resume from, and a last line torn
        by a crash; a damaged line before the last one is an error."""
        path = self.out_dir / "log.jsonl"
        if not path.exists():
            return
        lines = path.read_text(errors="replace").split("\n")
        numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
        kept = []
        for n, (line_no, line) in enumerate(numbered):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if n == len(numbered) - 1:
                    continue  # torn by the crash we resume from
                raise LogError(f"{path}, line {line_no}: not a JSON record ({error.msg}); the log "
                               f"is damaged before its last line. Delete that line (or the log, "
                               f"which resuming does not need) and resume again") from None
            if record.get("step", 0) <= self.step:
                kept.append(line)
        atomic_write_text("".join(line + "\n" for line in kept), path)

    # --- training -----------------------------------------------------------------------------

    def _batch(self, images: ImageSet, index: torch.Tensor, flip: bool, generator):
        """This rank's rows of the global batch `index`, augmented as one process would."""
        augment = self.run.data.augment != "none"
        lo, hi = self.rows
        x = to_input(images.images[index[lo:hi]], self.device,
                     generator=generator if augment else None, flip=flip,
                     of_batch=(lo, len(index)))
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train_step(self) -> dict:
        """One optimiser step; returns {"loss_y", "loss_d", "lambda"}."""
        config, model = self.config, self.model
        model.train()
        torch.manual_seed(derive_seed(config.seed, 1, self.step))  # dropout
        generator = torch.Generator().manual_seed(derive_seed(config.seed, 2, self.step))
        index = self.labelled_stream.next()  # the global batch: the same on every rank
        lo, hi = self.rows
        x = self._batch(self.labelled, index, self.labelled_domain.flip, generator)
        y = self.labelled.labels[index[lo:hi]].to(self.device)
        lam, domains = 0.0, None
        if self.adversarial:
            target_index = self.target_stream.next()
            xt = self._batch(self.target.train, target_index, self.target.flip, generator)
            x = torch.cat([x, xt])
            domains = torch.cat([torch.zeros(len(y), dtype=torch.long),
                                 torch.ones(len(xt), dtype=torch.long)]).to(self.device)
            lam = model.domain_classifier.set_progress(self.step, self.total_steps)
        with self.ranks.collective("the training step (gradients, BatchNorm statistics)",
                                   self.step):
            with autocast_context(self.device, config.amp):
                loss_y, *rest = self._losses(x, y, domains)
            loss_d = rest[0] if rest else None
            loss = loss_y if loss_d is None else loss_y + loss_d
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        # every rank's mean over its rows; their mean is the global batch's mean (equal parts)
        loss_y, loss_d = self.ranks.mean(
            [loss_y.item(), loss_d.item() if loss_d is not None else 0.0],
            "the step's losses", self.step)
        return {"loss_y": loss_y, "loss_d": loss_d, "lambda": lam}

    def _outputs(self) -> dict | None:
        """The model's outputs on the evaluation sets: {name: logits or (logits, features)}.
        With several ranks each predicts its part of every set, and rank 0 receives them all
        (the others get None)."""
        unlabelled = self.target.train
        sets = {"val": (self.val, True), "target": (unlabelled, True),
                "source": (self.labelled.subset(evenly_spaced(len(self.labelled),
                                                              VALIDATOR_SAMPLE)), True),
                "source_test": (self.source.test, False), "target_test": (self.target.test, False)}
        ranks, out = self.ranks, {}
        for name, (images, features) in sets.items():
            lo, hi = part(len(images), ranks.rank, ranks.size)
            if ranks.distributed:
                images = images.subset(range(lo, hi))
            out[name] = predict(self.model, images, self.device, self.config.amp,
                                features=features)
        if not ranks.distributed:
            return out
        every = ranks.gather(out, "the evaluation's outputs")
        if not ranks.main:
            return None

        def joined(name):
            pieces = [e[name] for e in every]
            if isinstance(pieces[0], tuple):
                return tuple(torch.cat(p) for p in zip(*pieces))
            return torch.cat(pieces)

        return {name: joined(name) for name in sets}

    def evaluate(self) -> dict:
        """Metrics and validator scores of the current weights (no randomness; leaves the model
        in eval mode). Only the `target_test` entry uses target labels. With several ranks,
        rank 0 computes them from every rank's outputs and every rank returns rank 0's."""
        outputs = self._outputs()
        metrics = self._metrics(outputs) if outputs is not None else None
        return self.ranks.broadcast(metrics, "the evaluation's metrics")

    def _metrics(self, outputs: dict) -> dict:
        n = len(self.source.classes)
        val_logits, val_features = outputs["val"]
        unlabelled = self.target.train
        target_logits, target_features = outputs["target"]
        _, source_features = outputs["source"]
        target_index = evenly_spaced(len(unlabelled), VALIDATOR_SAMPLE)
        val_losses = torch.nn.functional.cross_entropy(val_logits.double(), self.val.labels,
                                                       reduction="none").numpy()
        weights = importance_weights(source_features.numpy(),
                                     target_features[target_index].numpy(),
                                     val_features.numpy())
        val = accuracy_report(val_logits, self.val.labels, n)
        entropy = mean_entropy(target_logits)
        scores = {"source_val": val["acc"], "entropy": -entropy,
                  "dev": -dev_risk(val_losses, weights),
                  "im": information_maximization(target_logits),
                  "snd": soft_neighbourhood_density(target_logits[target_index])}
        source, target = outputs["source_test"], outputs["target_test"]
        return {"val_acc": val["acc"], "val_loss": float(np.mean(val_losses)),
                "target_entropy": entropy, "scores": scores,
                "dev_effective_n": float(weights.sum() ** 2 / (weights ** 2).sum())
                if np.isfinite(weights).all() and weights.any() else None,
                "source_test": accuracy_report(source, self.source.test.labels, n),
                "target_test": accuracy_report(target, self.target.test.labels, n)}

    def _end_epoch(self, started: float) -> None:
        steps = max(self._sums["steps"], 1)
        record = {"event": "epoch", "epoch": self.epoch + 1, "step": self.step,
                  "loss_y": self._sums["loss_y"] / steps, "loss_d": self._sums["loss_d"] / steps,
                  "lambda": self.model.domain_classifier.last_lambda if self.adversarial else 0.0,
                  **self.evaluate(), "seconds": round(time.perf_counter() - started, 3)}
        record = self.ranks.broadcast(record, "the epoch's record")  # rank 0's time
        self.epoch += 1
        self.history.append(record)
        self._sums = {"loss_y": 0.0, "loss_d": 0.0, "steps": 0}
        key = list(selection_key(record, self.config.select))
        if self.best["key"] is None or key > self.best["key"]:
            self.best = {"epoch": self.epoch, "key": key}
            if self.ranks.main:
                atomic_save({**self._identity(), "kind": "best", "epoch": self.epoch,
                             "validator": self.config.select, "model": self.model.state_dict()},
                            self.out_dir / "best.pt")
        self._log(record)
        self._save()
        if self.progress:
            tqdm.write(self._epoch_line(record))

    def _epoch_line(self, r: dict) -> str:
        lam = f" λ {r['lambda']:.3f}" if self.adversarial else ""
        loss_d = f" loss_d {r['loss_d']:.3f}" if self.adversarial else ""
        return (f"{self.label} epoch {r['epoch']}/{self.config.epochs}: loss_y {r['loss_y']:.3f}"
                f"{loss_d}{lam} | {self.config.spec.labelled} val {100 * r['val_acc']:.1f}% | "
                f"target acc {100 * r['target_test']['acc']:.1f}% entropy "
                f"{r['target_entropy']:.3f} | {r['seconds']:.1f} s")

    def fit(self, resume: bool = False, overwrite: bool = False) -> dict:
        """Train to the last epoch and return the result.

        resume: continue from last.pt (or return the result of a finished run) when the run
        folder holds a run with the same result-changing fields; overwrite: delete a run the
        folder holds and train again. Without either, a folder holding a run is refused.
        """
        check_run_folder(self.out_dir, resume, overwrite)
        done = self.out_dir / "result.json"
        reuse = resume and done.exists() and not overwrite
        start = ("result.json" if reuse else "last.pt"
                 if resume and (self.out_dir / "last.pt").exists() and not overwrite else "new")
        # every rank has looked at the folder before rank 0 changes it, and saw the same
        self._same_folder_everywhere(start)
        if self.ranks.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if reuse:
            try:
                result = json.loads(done.read_text())
            except json.JSONDecodeError as error:
                raise ResumeError(f"{done}: not a JSON file ({error.msg}); pass --overwrite to "
                                  f"train the run again") from None
            self._check_same_run(result.get("key_fields", {}), "result.json")
            self.ranks.barrier("reading result.json")
            return result
        if start == "last.pt":
            self.load_state_dict(load_checkpoint(
                self.out_dir / "last.pt",
                remedy="delete it to train the run from its beginning (or pass --overwrite)"))
            if self.ranks.main:
                self._truncate_log()
        elif self.ranks.main:
            for name in RUN_FILES:
                (self.out_dir / name).unlink(missing_ok=True)
            self._log({"event": "start", "step": 0, "config": self.run.to_dict(),
                       "key": self.key, "version": __version__,
                       "init": self.init_report.format() if self.init_report else None,
                       **({"processes": self.ranks.size} if self.ranks.distributed else {})})
        self.ranks.barrier("waiting for rank 0 to prepare the run folder")
        while self.epoch < self.config.epochs:
            self._run_epoch()
        result = self.result()
        if self.ranks.main:
            atomic_write_json(result, done)
            keep = self.config.keep
            if keep != "both":
                (self.out_dir / ("last.pt" if keep == "best" else "best.pt")).unlink(
                    missing_ok=True)
        self.ranks.barrier("waiting for rank 0 to write result.json")
        return result

    def _same_folder_everywhere(self, start: str) -> None:
        """Every rank must start from the same files (one folder, or a shared file system
        across machines): how each rank would start, compared."""
        views = self.ranks.gather(start, "comparing the run folder across ranks")
        if len(set(views)) > 1:
            seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(views))
            raise ResumeError(f"{self.out_dir}: the ranks see different run folders (would start "
                              f"from {seen}); every rank must see the same folder — across "
                              f"machines, put it on a shared file system")

    def _run_epoch(self) -> None:
        started = time.perf_counter()
        first = self.step - self.epoch * self.steps_per_epoch
        bar = tqdm(total=self.steps_per_epoch, initial=first, leave=False,
                   disable=not self.progress, dynamic_ncols=True,
                   desc=f"{self.label} epoch {self.epoch + 1}/{self.config.epochs}")
        with bar:
            for _ in range(first, self.steps_per_epoch):
                out = self.train_step()
                self._sums["loss_y"] += out["loss_y"]
                self._sums["loss_d"] += out["loss_d"]
                self._sums["steps"] += 1
                bar.update()
                bar.set_postfix(loss_y=f"{out['loss_y']:.3f}", lam=f"{out['lambda']:.3f}",
                                refresh=False)
                if self.step % LOG_EVERY == 0:
                    self._log({"event": "step", "step": self.step, **out})
                at_epoch_end = self.step % self.steps_per_epoch == 0
                if (self.config.checkpoint_every and not at_epoch_end
                        and self.step % self.config.checkpoint_every == 0):
                    self._save()
                if self.on_step is not None:
                    self.on_step(self)
        self._end_epoch(started)

    def result(self) -> dict:
        """The run's summary: the epoch chosen by its validator and its target metrics, with
        every epoch's record (all validators' scores) for the experiment's selection."""
        chosen = self.history[self.best["epoch"] - 1]
        return {**self._identity(), "selected_epoch": self.best["epoch"],
                "selection": self.config.select, "target_test": chosen["target_test"],
                "source_test": chosen["source_test"],
                "oracle_acc": max(r["target_test"]["acc"] for r in self.history),
                "history": self.history}
