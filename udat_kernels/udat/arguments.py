"""The command lines' arguments, parsed once into typed configurations.

This is the only module that sees an argparse namespace: `parse_train` and `parse_experiment`
turn the arguments of `udat-train` and `udat-experiment` into a `RunConfig` or an
`ExperimentConfig` (`udat_kernels.udat.config`) plus the options that only steer the process
(output folder, threads, progress bars). A configuration field with a bad value is reported as
an argparse error about its option.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .config import (AMP_MODES, FER_TEST_SPLITS, LAMBDA_SWEEP, METHODS, SCHEDULES, SELECTIONS,
                     ConfigError, DataConfig, ExperimentConfig, ModelConfig, RunConfig,
                     TrainConfig)
from .data import DOMAINS
from .models import PRESETS

__all__ = ["TrainCommand", "ExperimentCommand", "parse_train", "parse_experiment",
           "train_parser", "experiment_parser"]

# The option that sets each configuration field (for error messages).
OPTIONS = {"preset": "--model", "lambda_max": "--lambda", "lambdas": "--lambda"}


def _option(field_name: str) -> str:
    return OPTIONS.get(field_name, "--" + field_name.replace("_", "-"))


@dataclass(frozen=True)
class TrainCommand:
    """`udat-train`: the run, its folder and how to run it."""

    run: RunConfig
    out: str
    resume: bool
    threads: int | None
    progress: bool


@dataclass(frozen=True)
class ExperimentCommand:
    """`udat-experiment`: the grid and how to run it."""

    experiment: ExperimentConfig
    threads: int | None
    progress: bool


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Data, model and optimisation options shared by both commands."""
    d, m, t = DataConfig(), ModelConfig(), TrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--source", choices=DOMAINS, default=d.source)
    data.add_argument("--target", choices=DOMAINS, default=d.target)
    data.add_argument("--source-root", help="folder (or file) holding the source data")
    data.add_argument("--target-root", help="folder (or file) holding the target data")
    data.add_argument("--fer-test", choices=FER_TEST_SPLITS, default=d.fer_test,
                      help="FER2013 usage used as its test split")
    data.add_argument("--val-fraction", type=float, default=d.val_fraction,
                      help="share of the labelled training set held out for source validation")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=tuple(PRESETS), default=m.preset)
    model.add_argument("--width", type=float, help="conv width multiplier (preset's if unset)")
    model.add_argument("--input-size", type=int, help="input side, a multiple of 32")
    model.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None)
    model.add_argument("--init", help="VGG16 state dict (torchvision or VGG-Face naming)")
    model.add_argument("--scale", type=float, default=m.scale, help="angular head's s")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=t.epochs)
    train.add_argument("--batch-size", type=int, default=t.batch_size,
                       help="images per domain per step")
    train.add_argument("--lr", type=float, default=t.lr)
    train.add_argument("--momentum", type=float, default=t.momentum)
    train.add_argument("--weight-decay", type=float, default=t.weight_decay)
    train.add_argument("--schedule", choices=SCHEDULES, default=t.schedule,
                       help="λ schedule: Ganin's ramp to λ_max, constant, or warm start")
    train.add_argument("--select", choices=SELECTIONS, default=t.select,
                       help="criterion choosing the reported epoch (oracle = target test "
                            "accuracy, as the paper did)")
    train.add_argument("--amp", choices=AMP_MODES, default=t.amp,
                       help="autocast: bf16 (CPU or CUDA) or fp16 with loss scaling (CUDA)")
    train.add_argument("--device", default=t.device)
    train.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every,
                       help="also checkpoint every N steps (0: at the end of each epoch only)")
    run = parser.add_argument_group("process")
    run.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def _shared_configs(args) -> tuple[DataConfig, ModelConfig, dict]:
    data = DataConfig(source=args.source, target=args.target, source_root=args.source_root,
                      target_root=args.target_root, fer_test=args.fer_test,
                      val_fraction=args.val_fraction)
    model = ModelConfig(preset=args.model, width=args.width, input_size=args.input_size,
                        batch_norm=args.batch_norm, init=args.init, scale=args.scale)
    train = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                 amp=args.amp, device=args.device, select=args.select,
                 checkpoint_every=args.checkpoint_every)
    return data, model, train


def _check_threads(parser, args) -> None:
    if args.threads is not None and args.threads <= 0:
        parser.error(f"argument --threads: must be an integer > 0, got {args.threads}")


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udat-train", description="Train one UDAT / UDAT-AS method with checkpoints.")
    parser.add_argument("--method", choices=tuple(METHODS), default=TrainConfig.method)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--lambda", dest="lambda_max", type=float, default=TrainConfig.lambda_max,
                        help="λ_max (the schedule's final λ)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/last.pt to the same result as an uninterrupted run")
    _add_run_options(parser)
    return parser


def parse_train(argv=None) -> TrainCommand:
    """`udat-train`'s arguments -> a TrainCommand (exits with a usage error on a bad value)."""
    parser = train_parser()
    args = parser.parse_args(argv)
    _check_threads(parser, args)
    try:
        data, model, train = _shared_configs(args)
        run = RunConfig(data, model, TrainConfig(method=args.method, seed=args.seed,
                                                 lambda_max=args.lambda_max, **train))
    except ConfigError as error:
        parser.error(f"argument {_option(error.field)}: {error.reason}")
    return TrainCommand(run, args.out, args.resume, args.threads, not args.quiet)


def experiment_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udat-experiment",
        description="Run the paper's five methods over seeds and write results.json/.md/.csv, "
                    "tsne.png and curves.png.")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    lam = parser.add_mutually_exclusive_group()
    lam.add_argument("--lambda", dest="lambda_max", type=float, default=TrainConfig.lambda_max,
                     help="λ_max of the adversarial methods")
    lam.add_argument("--lambda-sweep", action="store_true",
                     help="try λ_max = 0.0, 0.1, …, 1.0 and choose by --select")
    parser.add_argument("--tsne-points", type=int, default=500,
                        help="test images per domain in the t-SNE figure")
    parser.add_argument("--out", required=True, help="output folder")
    _add_run_options(parser)
    return parser


def parse_experiment(argv=None) -> ExperimentCommand:
    """`udat-experiment`'s arguments -> an ExperimentCommand."""
    parser = experiment_parser()
    args = parser.parse_args(argv)
    _check_threads(parser, args)
    try:
        data, model, train = _shared_configs(args)
        experiment = ExperimentConfig(
            out=args.out, data=data, model=model, train=TrainConfig(**train),
            methods=tuple(args.methods), seeds=tuple(args.seeds),
            lambdas=LAMBDA_SWEEP if args.lambda_sweep else (args.lambda_max,),
            tsne_points=args.tsne_points)
    except ConfigError as error:
        parser.error(f"argument {_option(error.field)}: {error.reason}")
    return ExperimentCommand(experiment, args.threads, not args.quiet)
