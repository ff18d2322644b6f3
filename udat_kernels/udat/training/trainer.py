"""The UDAT / UDAT-AS trainer: one method, one seed, with exact resume.

Each step draws 64 labelled images (source, or target for the train-on-target line) and, for the
adversarial methods, 64 unlabelled target images; G_f sees both, G_y the labelled ones, G_d all of
them with domain labels 0 (source) and 1 (target). The GRL in G_d's first layer makes one backward
pass give θ_f the gradient of L_y − λ·L_r, θ_y that of L_y and θ_r that of L_r (paper eqs. 19–21).

Determinism: every random draw of step k (batch order, crops, flips, dropout) comes from seeds
derived from (seed, k), and the batch streams' positions are saved, so a run resumed from any
checkpoint reaches the same weights and metrics as an uninterrupted one (same device and threads).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import Domain, ImageSet, to_input
from ..data.imageset import stratified_split
from ..models import UDATVGG, load_pretrained
from udat_kernels.schedules import ConstantLambda, GaninLambda, WarmStartLambda
from .checkpoint import atomic_save, atomic_write_json, atomic_write_text, load_checkpoint
from ..config import RunConfig, TrainConfig
from .evaluate import accuracy_report, autocast_context, mean_entropy, predict
from .streams import BatchStream, derive_seed

__all__ = ["Trainer", "select_score"]

VAL_SPLIT_SEED = 0  # the held-out validation images never depend on the training seed
LOG_EVERY = 20


def select_score(record: dict, select: str) -> float:
    """The epoch-selection score of an epoch record: higher is better."""
    if select == "source_val":
        return record["val_acc"]
    if select == "entropy":
        return -record["target_entropy"]
    return record["target_test"]["acc"]


def _make_schedule(config: TrainConfig):
    if config.schedule == "constant":
        return ConstantLambda(config.lambda_max)
    if config.schedule == "warm_start":
        return WarmStartLambda(hi=config.lambda_max)
    return GaninLambda(config.lambda_max)


class Trainer:
    """Trains `config.train.method` on (source, target) into `out_dir`.

    Files: last.pt (resumable state, rewritten atomically each epoch and every
    `checkpoint_every` steps), best.pt (model weights of the best epoch under the `select`
    criterion),
    log.jsonl (one JSON record per line), result.json (the run's summary, written at the end).
    `on_step(trainer)` is called after every optimiser step (tests use it to interrupt a run).
    """

    def __init__(self, run: RunConfig, source: Domain, target: Domain, out_dir, *,
                 progress: bool = True, on_step=None):
        if source.classes != target.classes:
            raise ValueError(f"source and target classes differ: {source.classes} vs "
                             f"{target.classes}")
        self.run = run
        self.config = config = run.train
        self.source, self.target = source, target
        self.out_dir = Path(out_dir)
        self.progress, self.on_step = progress, on_step
        self.device = torch.device(config.device)
        if config.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device; use 'bf16' on the CPU")
        spec = config.spec
        self.labelled_domain = target if spec.labelled == "target" else source
        train_index, val_index = stratified_split(self.labelled_domain.train.labels.numpy(),
                                                  run.data.val_fraction, VAL_SPLIT_SEED)
        self.labelled = self.labelled_domain.train.subset(train_index)
        self.val = self.labelled_domain.train.subset(val_index)
        self.model = self._build_model()
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
        self.best: dict = {"epoch": None, "score": None}
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
        return model

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"config": self.run.to_dict(), "step": self.step, "epoch": self.epoch,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "labelled_stream": self.labelled_stream.state_dict(),
                "target_stream": self.target_stream.state_dict() if self.target_stream else None,
                "history": self.history, "best": self.best, "sums": dict(self._sums)}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.run.to_dict():
            ours = self.run.to_dict()
            changed = sorted(f"{part}.{k}" for part, values in state["config"].items()
                             for k, v in values.items() if ours.get(part, {}).get(k) != v)
            raise ValueError(f"cannot resume: the checkpoint was written with other settings "
                             f"({', '.join(changed)})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.labelled_stream.load_state_dict(state["labelled_stream"])
        if self.target_stream:
            self.target_stream.load_state_dict(state["target_stream"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.history, self.best, self._sums = state["history"], state["best"], state["sums"]

    def _save(self) -> None:
        atomic_save(self.state_dict(), self.out_dir / "last.pt")

    def _log(self, record: dict) -> None:
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_log(self) -> None:
        """Drop log records written after the checkpoint we resume from."""
        path = self.out_dir / "log.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            atomic_write_text("".join(line + "\n" for line in kept), path)

    # --- training -----------------------------------------------------------------------------

    def _batch(self, images: ImageSet, index: torch.Tensor, flip: bool, generator):
        x = to_input(images.images[index], self.device, generator=generator, flip=flip)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train_step(self) -> dict:
        """One optimiser step; returns {"loss_y", "loss_d", "lambda"}."""
        config, model = self.config, self.model
        model.train()
        torch.manual_seed(derive_seed(config.seed, 1, self.step))  # dropout
        generator = torch.Generator().manual_seed(derive_seed(config.seed, 2, self.step))
        index = self.labelled_stream.next()
        x = self._batch(self.labelled, index, self.labelled_domain.flip, generator)
        y = self.labelled.labels[index].to(self.device)
        lam = 0.0
        if self.adversarial:
            target_index = self.target_stream.next()
            xt = self._batch(self.target.train, target_index, self.target.flip, generator)
            x = torch.cat([x, xt])
            domains = torch.cat([torch.zeros(len(index), dtype=torch.long),
                                 torch.ones(len(target_index), dtype=torch.long)]).to(self.device)
            lam = model.domain_classifier.set_progress(self.step, self.total_steps)
        with autocast_context(self.device, config.amp):
            features = model.extract(x)
            loss_y = model.label_loss(features[:len(index)], y)
            loss_d = model.domain_loss(features, domains) if self.adversarial else None
        loss = loss_y if loss_d is None else loss_y + loss_d
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return {"loss_y": loss_y.item(), "loss_d": loss_d.item() if loss_d is not None else 0.0,
                "lambda": lam}

    def evaluate(self) -> dict:
        """Metrics of the current weights (no randomness; leaves the model in eval mode)."""
        config, n = self.config, len(self.source.classes)
        val = predict(self.model, self.val, self.device, config.amp)
        unlabelled = predict(self.model, self.target.train, self.device, config.amp)
        source = predict(self.model, self.source.test, self.device, config.amp)
        target = predict(self.model, self.target.test, self.device, config.amp)
        return {"val_acc": accuracy_report(val, self.val.labels, n)["acc"],
                "target_entropy": mean_entropy(unlabelled),
                "source_test": accuracy_report(source, self.source.test.labels, n),
                "target_test": accuracy_report(target, self.target.test.labels, n)}

    def _end_epoch(self, started: float) -> None:
        steps = max(self._sums["steps"], 1)
        record = {"event": "epoch", "epoch": self.epoch + 1, "step": self.step,
                  "loss_y": self._sums["loss_y"] / steps, "loss_d": self._sums["loss_d"] / steps,
                  "lambda": self.model.domain_classifier.last_lambda if self.adversarial else 0.0,
                  **self.evaluate(), "seconds": round(time.perf_counter() - started, 3)}
        self.epoch += 1
        self.history.append(record)
        self._sums = {"loss_y": 0.0, "loss_d": 0.0, "steps": 0}
        score = select_score(record, self.config.select)
        if self.best["score"] is None or score > self.best["score"]:
            self.best = {"epoch": self.epoch, "score": score}
            atomic_save(self.model.state_dict(), self.out_dir / "best.pt")
        self._log(record)
        self._save()

    def fit(self, resume: bool = False) -> dict:
        """Train to the last epoch (continuing from last.pt when `resume`); returns the result."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and (self.out_dir / "last.pt").exists():
            self.load_state_dict(load_checkpoint(self.out_dir / "last.pt"))
            self._truncate_log()
        else:
            for name in ("log.jsonl", "result.json", "best.pt", "last.pt"):
                (self.out_dir / name).unlink(missing_ok=True)
            self._log({"event": "start", "step": 0, "config": self.run.to_dict(),
                       "init": self.init_report.format() if self.init_report else None})
        while self.epoch < self.config.epochs:
            self._run_epoch()
        result = self.result()
        atomic_write_json(result, self.out_dir / "result.json")
        return result

    def _run_epoch(self) -> None:
        started = time.perf_counter()
        first = self.step - self.epoch * self.steps_per_epoch
        bar = tqdm(total=self.steps_per_epoch, initial=first, leave=False,
                   disable=not self.progress, dynamic_ncols=True,
                   desc=f"{self.config.method} seed {self.config.seed} "
                        f"epoch {self.epoch + 1}/{self.config.epochs}")
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
        """The run's summary: the epoch chosen by config.select and its target metrics."""
        chosen = self.history[self.best["epoch"] - 1]
        return {"config": self.run.to_dict(), "selected_epoch": self.best["epoch"],
                "selection": self.config.select, "target_test": chosen["target_test"],
                "source_test": chosen["source_test"],
                "oracle_acc": max(r["target_test"]["acc"] for r in self.history),
                "history": self.history}
