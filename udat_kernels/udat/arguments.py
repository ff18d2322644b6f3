"""The command lines' arguments, parsed once into typed configurations.

This is the only module that sees an argparse namespace: `parse_train`, `parse_experiment` and
`parse_evaluate` turn the arguments of `udat-train`, `udat-experiment` and `udat-evaluate` into
a `RunConfig` or an `ExperimentConfig` (`udat_kernels.udat.config`) plus the options that only
steer the process (output folder, threads, progress bars).

A recipe (`--recipe`, `udat_kernels.udat.config.RECIPES`) supplies the defaults; an option given
on the command line wins. Every problem that can be seen without reading the data is reported
here, as a usage error about its option, before anything is loaded: a field out of range, a
device that does not exist, fp16 on the CPU, an --init file that is missing or not VGG16
weights, a validation split too small for the classes, a run folder that already holds a run.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

import torch

from .config import (AMP_MODES, AUGMENTATIONS, FER_TEST_SPLITS, KEEP, LAMBDA_SWEEP, METHODS,
                     RECIPE_FIELDS, RECIPES, SCHEDULES, SELECTIONS, ConfigError, DataConfig, ExperimentConfig,
                     ModelConfig, RunConfig, TrainConfig)
from .data import DOMAINS, training_counts
from .models import PRESETS, check_pretrained

__all__ = ["TrainCommand", "ExperimentCommand", "EvaluateCommand", "parse_train",
           "parse_experiment", "parse_evaluate", "usage_error", "check_loaded_split"]

# The option that sets each configuration field, where it is not --field-name.
OPTIONS = {"preset": "--model", "lambda_max": "--lambda", "lambdas": "--lambdas"}
_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def _option(field_name: str) -> str:
    return OPTIONS.get(field_name, "--" + field_name.replace("_", "-"))


@dataclass(frozen=True)
class TrainCommand:
    """`udat-train`: the run, its folder and how to run it."""

    run: RunConfig
    out: str
    resume: bool
    overwrite: bool
    threads: int | None
    progress: bool
    recipe: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class ExperimentCommand:
    """`udat-experiment`: the grid and how to run it."""

    experiment: ExperimentConfig
    threads: int | None
    progress: bool


@dataclass(frozen=True)
class EvaluateCommand:
    """`udat-evaluate`: a checkpoint, a data set and split, and where to run."""

    checkpoint: str
    data: str
    root: str | None
    split: str
    fer_test: str
    device: str
    amp: str
    threads: int | None
    json: str | None


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Data, model and optimisation options shared by udat-train and udat-experiment. Their
    defaults are None here: the recipe fills what the command line leaves out."""
    d, m, t = DataConfig(), ModelConfig(), TrainConfig()
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="compact",
                        help="defaults: compact (trains the compact model on two CPU cores) or "
                             "paper (the paper's network and optimiser; docs/experiments.md)")
    data = parser.add_argument_group("data")
    data.add_argument("--source", choices=DOMAINS, help=f"source domain (default {d.source})")
    data.add_argument("--target", choices=DOMAINS, help=f"target domain (default {d.target})")
    data.add_argument("--source-root", help="folder (or file) holding the source data")
    data.add_argument("--target-root", help="folder (or file) holding the target data")
    data.add_argument("--fer-test", choices=FER_TEST_SPLITS,
                      help=f"FER2013 usage used as its test split (default {d.fer_test})")
    data.add_argument("--val-fraction", type=float,
                      help=f"share of the labelled training set held out for source validation "
                           f"(default {d.val_fraction})")
    data.add_argument("--augment", choices=AUGMENTATIONS,
                      help=f"training augmentation: random shifts of up to 1/8 of the side and, "
                           f"for faces, mirroring; or none (default {d.augment})")
    model = parser.add_argument_group("model")
    model.add_argument("--model", dest="preset", choices=tuple(PRESETS),
                       help=f"model preset (default {m.preset}; paper: vgg16)")
    model.add_argument("--width", type=float, help="conv width multiplier (preset's if unset)")
    model.add_argument("--input-size", type=int, help="input side, a multiple of 32")
    model.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None)
    model.add_argument("--dropout", type=float,
                       help="dropout probability after FC1 and FC2, 0 for none (preset's if "
                            "unset)")
    model.add_argument("--init", help="VGG16 state dict (torchvision or VGG-Face naming)")
    model.add_argument("--scale", type=float, help=f"angular head's s (default {m.scale:g})")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, help=f"default {t.epochs} (paper recipe: 30)")
    train.add_argument("--batch-size", type=int,
                       help=f"images per domain per step (default {t.batch_size})")
    train.add_argument("--lr", type=float, help=f"SGD learning rate (default {t.lr:g}; paper: "
                                                f"0.001)")
    train.add_argument("--momentum", type=float, help=f"default {t.momentum:g}")
    train.add_argument("--weight-decay", type=float, help=f"default {t.weight_decay:g}")
    train.add_argument("--schedule", choices=SCHEDULES,
                       help=f"λ schedule: Ganin's ramp to λ_max, constant, or warm start "
                            f"(default {t.schedule})")
    train.add_argument("--select", choices=SELECTIONS,
                       help=f"criterion choosing the reported epoch and λ: a label-free "
                            f"validator, or oracle (target test accuracy, as the paper did); "
                            f"default {t.select}, the declared validator")
    train.add_argument("--amp", choices=AMP_MODES,
                       help="autocast: bf16 (CPU or CUDA) or fp16 with loss scaling (CUDA)")
    train.add_argument("--device", help=f"cpu, cuda or cuda:N (default {t.device})")
    train.add_argument("--checkpoint-every", type=int,
                       help="also checkpoint every N steps (default 0: at the end of each "
                            "epoch only)")
    train.add_argument("--keep", choices=KEEP,
                       help=f"weights a finished run keeps: best.pt, last.pt or both "
                            f"(default {t.keep})")
    train.add_argument("--deterministic", action="store_true", default=None,
                       help="deterministic algorithms only: exact resume on CUDA")
    process = parser.add_argument_group("process")
    process.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    process.add_argument("--quiet", action="store_true",
                         help="no progress bars or per-epoch lines")


def usage_error(prog: str, message: str):
    """Print an argparse-style usage error for `prog` and exit with status 2."""
    parser = {"udat-train": train_parser, "udat-experiment": experiment_parser,
              "udat-evaluate": evaluate_parser}[prog]()
    parser.error(message)


def _resolve(args, recipe: str) -> tuple[dict, list[str]]:
    """{"section.field": value} for the run options: the command line's, else the recipe's;
    and the fields where the command line changed what the recipe would have used (its value,
    the default, or for width, input size, BatchNorm and dropout the preset's)."""
    values, overrides = {}, []
    recipe_values = RECIPES[recipe]
    preset = PRESETS[getattr(args, "preset", None) or recipe_values.get("model.preset")
                     or ModelConfig.preset]
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            name = f"{section}.{f.name}"
            if name in ("train.method", "train.seed"):
                continue  # chosen per run, never by a recipe
            if name in recipe_values:
                would = recipe_values[name]
            elif section == "model" and f.name in ("width", "input_size", "batch_norm",
                                                   "dropout"):
                would = getattr(preset, f.name)
            else:
                would = f.default
            given = getattr(args, f.name, None)
            if given is not None:
                values[name] = given
                if given != would and name in RECIPE_FIELDS:
                    overrides.append(name)
            elif name in recipe_values:
                values[name] = recipe_values[name]
    return values, overrides


def _section(values: dict, section: str, **extra) -> dict:
    prefix = section + "."
    return {**{k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}, **extra}


def _check_device(device: str, amp: str | None) -> tuple[str, str] | None:
    """(option, reason) of a device or amp setting this machine cannot run, else None."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return "--device", f"{device!r} is not a device name (cpu, cuda, cuda:N)"
    if dev.type not in ("cpu", "cuda"):
        return "--device", f"{device!r}: only cpu and cuda devices are supported"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "--device", f"{device!r}: no CUDA device is available here"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return "--device", (f"{device!r}: this machine has {torch.cuda.device_count()} "
                                f"CUDA device(s)")
    if amp == "fp16" and dev.type != "cuda":
        return "--amp", "fp16 needs a CUDA device (it scales the loss for CUDA's float16); use " \
                        "bf16 on the CPU"
    return None


def _split_problem(data: DataConfig, labelled: set[str]) -> str | None:
    from .training.trainer import validation_split_problem

    for side in sorted(labelled):
        name = getattr(data, side)
        counts = training_counts(name, getattr(data, f"{side}_root"))
        if counts is not None:
            problem = validation_split_problem(*counts, data.val_fraction, f"the {side} ({name})")
            if problem:
                return problem
    return None


def check_loaded_split(prog: str, data: DataConfig, domains: dict) -> None:
    """After loading: the exact validation-split check for the labelled domains whose size the
    metadata did not tell (FER2013, a CSV in mnist5k's layout). domains: {"source": Domain, ...}"""
    from .training.trainer import validation_split_problem

    for side, domain in domains.items():
        labels = domain.train.labels
        problem = validation_split_problem(len(labels), len(labels.unique()), data.val_fraction,
                                           f"the {side} ({domain.name})")
        if problem:
            usage_error(prog, f"argument --val-fraction: {problem}")


def _early_checks(parser, args, data: DataConfig, model: ModelConfig, train: TrainConfig,
                  labelled: set[str]) -> None:
    """Everything that can be checked before reading the data, as usage errors."""
    if args.threads is not None and args.threads <= 0:
        parser.error(f"argument --threads: must be an integer > 0, got {args.threads}")
    bad = _check_device(train.device, train.amp)
    if bad:
        parser.error(f"argument {bad[0]}: {bad[1]}")
    if model.init is not None:
        try:
            check_pretrained(model.init)
        except ValueError as error:
            parser.error(f"argument --init: {error}")
    problem = _split_problem(data, labelled)
    if problem:
        parser.error(f"argument --val-fraction: {problem}")
    _parallel_checks(parser, train)
    if train.deterministic:
        # cuBLAS reads this when it starts, so it is set before anything touches CUDA
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _parallel_checks(parser, train: TrainConfig) -> None:
    """Under torchrun (WORLD_SIZE > 1): the global batch must split evenly over the processes,
    and each process takes the CUDA device of its LOCAL_RANK (no index may be given)."""
    from .training.parallel import world_size

    size = world_size()
    if size == 1:
        return
    if train.batch_size % size:
        parser.error(f"argument --batch-size: {train.batch_size} images per domain do not "
                     f"split evenly over the {size} processes torchrun started (WORLD_SIZE="
                     f"{size}); the batch is the global one, each process takes batch/{size}: "
                     f"give a multiple of {size}")
    device = torch.device(train.device)
    if device.type == "cuda" and device.index is not None:
        parser.error(f"argument --device: {train.device!r} under torchrun: give --device cuda, "
                     f"each process then uses cuda:LOCAL_RANK")


def _labelled(methods) -> set[str]:
    return {"target" if METHODS[m].labelled == "target" else "source" for m in methods}


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udat-train", description="Train one UDAT / UDAT-AS method with checkpoints.")
    parser.add_argument("--method", choices=tuple(METHODS), default=TrainConfig.method)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--lambda", dest="lambda_max", type=float,
                        help=f"λ_max, the schedule's final λ (default {TrainConfig.lambda_max:g})")
    parser.add_argument("--out", required=True, help="run folder")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in OUT to the same result as an uninterrupted run "
                            "(a finished run is reused)")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the run OUT holds and train again")
    _add_run_options(parser)
    return parser


def parse_train(argv=None) -> TrainCommand:
    """`udat-train`'s arguments -> a TrainCommand (exits with a usage error on a bad value)."""
    from .training.trainer import RunExistsError, check_run_folder

    parser = train_parser()
    args = parser.parse_args(argv)
    values, overrides = _resolve(args, args.recipe)
    try:
        data = DataConfig(**_section(values, "data"))
        model = ModelConfig(**_section(values, "model"))
        train = TrainConfig(**_section(values, "train", method=args.method, seed=args.seed))
    except ConfigError as error:
        parser.error(f"argument {_option(error.field)}: {error.reason}")
    _early_checks(parser, args, data, model, train, _labelled([train.method]))
    try:
        check_run_folder(args.out, args.resume, args.overwrite)
    except RunExistsError as error:
        parser.error(str(error))
    return TrainCommand(RunConfig(data, model, train), args.out, args.resume, args.overwrite,
                        args.threads, not args.quiet, args.recipe, tuple(overrides))


def experiment_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udat-experiment",
        description="Run the paper's five methods over seeds (and λ) and write results.json/"
                    ".md/.csv, selection.csv, confusion.csv and the figures.")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    lam = parser.add_mutually_exclusive_group()
    lam.add_argument("--lambda", dest="lambda_max", type=float,
                     help=f"λ_max of the adversarial methods (default "
                          f"{TrainConfig.lambda_max:g})")
    lam.add_argument("--lambdas", nargs="+", type=float, help="λ_max values to try")
    lam.add_argument("--lambda-sweep", action="store_true",
                     help="try the paper's λ_max = 0.0, 0.1, …, 1.0 (the paper recipe's default)")
    parser.add_argument("--tsne-points", type=int, default=500,
                        help="test images per domain in the t-SNE figure")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--runs", help="folder of the run folders (default OUT/runs); "
                                       "experiments may share one")
    _add_run_options(parser)
    return parser


def parse_experiment(argv=None) -> ExperimentCommand:
    """`udat-experiment`'s arguments -> an ExperimentCommand."""
    parser = experiment_parser()
    args = parser.parse_args(argv)
    values, overrides = _resolve(args, args.recipe)
    values.pop("train.lambda_max", None)  # λ is the grid's, set per run
    overrides = [o for o in overrides if o != "train.lambda_max"]
    would = tuple(RECIPES[args.recipe].get("experiment.lambdas", (TrainConfig.lambda_max,)))
    if args.lambda_sweep:
        lambdas = LAMBDA_SWEEP
    elif args.lambdas is not None:
        lambdas = tuple(args.lambdas)
    elif args.lambda_max is not None:
        lambdas = (args.lambda_max,)
    else:
        lambdas = would
    if tuple(lambdas) != would:
        overrides.append("experiment.lambdas")
    try:
        data = DataConfig(**_section(values, "data"))
        model = ModelConfig(**_section(values, "model"))
        train = TrainConfig(**_section(values, "train"))
        experiment = ExperimentConfig(
            out=args.out, data=data, model=model, train=train, methods=tuple(args.methods),
            seeds=tuple(args.seeds), lambdas=tuple(lambdas), tsne_points=args.tsne_points,
            runs=args.runs, recipe=args.recipe, overrides=tuple(sorted(overrides)))
    except ConfigError as error:
        parser.error(f"argument {_option(error.field)}: {error.reason}")
    _early_checks(parser, args, data, model, train, _labelled(experiment.methods))
    return ExperimentCommand(experiment, args.threads, not args.quiet)


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udat-evaluate",
        description="Score a saved checkpoint (best.pt or last.pt of a run) on a data set: "
                    "accuracy, balanced accuracy, per-class accuracy and the confusion matrix.")
    parser.add_argument("checkpoint", help="best.pt or last.pt of a run folder")
    parser.add_argument("--data", required=True, choices=DOMAINS, help="data set")
    parser.add_argument("--root", help="folder (or file) holding it (fer2013, rafdb, folder)")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--fer-test", choices=FER_TEST_SPLITS, default="PrivateTest",
                        help="the FER2013 usage that is its test split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=AMP_MODES, default="off")
    parser.add_argument("--threads", type=int, help="CPU threads")
    parser.add_argument("--json", help="also write the report to this JSON file")
    return parser


def parse_evaluate(argv=None) -> EvaluateCommand:
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads <= 0:
        parser.error(f"argument --threads: must be an integer > 0, got {args.threads}")
    bad = _check_device(args.device, args.amp)
    if bad:
        parser.error(f"argument {bad[0]}: {bad[1]}")
    if not os.path.isfile(args.checkpoint):
        parser.error(f"argument checkpoint: no such file: {args.checkpoint}")
    try:
        DataConfig(source=args.data, source_root=args.root, fer_test=args.fer_test)
    except ConfigError as error:
        parser.error(f"argument {'--root' if error.field == 'source_root' else '--data'}: "
                     f"{error.reason}")
    return EvaluateCommand(args.checkpoint, args.data, args.root, args.split, args.fer_test,
                           args.device, args.amp, args.threads, args.json)
