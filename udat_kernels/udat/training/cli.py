"""Command-line pieces shared by `udat-train` (one run, defined here) and `udat-experiment`."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..data import DOMAINS, load_domain
from ..models import PRESETS, build_model
from .config import AMP_MODES, METHODS, SCHEDULES, SELECTIONS, TrainConfig
from .trainer import Trainer

__all__ = ["add_common_args", "config_from_args", "load_domains", "main"]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Data, model and optimisation options (defaults: the paper's optimiser, offline data)."""
    d = TrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--source", choices=DOMAINS, default=d.source)
    data.add_argument("--target", choices=DOMAINS, default=d.target)
    data.add_argument("--source-root", help="folder (or file) holding the source data")
    data.add_argument("--target-root", help="folder (or file) holding the target data")
    data.add_argument("--fer-test", choices=("PrivateTest", "PublicTest"), default="PrivateTest",
                      help="FER2013 usage used as its test split")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=tuple(PRESETS), default=d.model)
    model.add_argument("--width", type=float, help="conv width multiplier (preset's if unset)")
    model.add_argument("--input-size", type=int, help="input side, a multiple of 32")
    model.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None)
    model.add_argument("--init", help="VGG16 state dict (torchvision or VGG-Face naming)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=d.epochs)
    train.add_argument("--batch-size", type=int, default=d.batch_size,
                       help="images per domain per step")
    train.add_argument("--lr", type=float, default=d.lr)
    train.add_argument("--momentum", type=float, default=d.momentum)
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                       help="λ schedule: Ganin's ramp to λ_max, constant, or warm start")
    train.add_argument("--scale", type=float, default=d.scale, help="angular head's s")
    train.add_argument("--select", choices=SELECTIONS, default=d.select,
                       help="criterion choosing the reported epoch (oracle = target test "
                            "accuracy, as the paper did)")
    train.add_argument("--amp", choices=AMP_MODES, default=d.amp,
                       help="autocast: bf16 (CPU or CUDA) or fp16 with loss scaling (CUDA)")
    train.add_argument("--device", default=d.device)
    train.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    train.add_argument("--checkpoint-every", type=int, default=0,
                       help="also checkpoint every N steps (0: at the end of each epoch only)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args, method: str, seed: int, lambda_max: float) -> TrainConfig:
    return TrainConfig(method=method, source=args.source, target=args.target, model=args.model,
                       width=args.width, input_size=args.input_size, batch_norm=args.batch_norm,
                       init=args.init, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                       lambda_max=lambda_max, schedule=args.schedule, scale=args.scale,
                       amp=args.amp, device=args.device, seed=seed, select=args.select,
                       checkpoint_every=args.checkpoint_every)


def load_domains(args):
    """(source, target) Domains at the model's input size."""
    size = build_model(2, args.model, width=args.width,
                       input_size=args.input_size).config.input_size
    options = {"fer2013": {"test_usage": args.fer_test}}
    source = load_domain(args.source, args.source_root, size, **options.get(args.source, {}))
    target = load_domain(args.target, args.target_root, size, **options.get(args.target, {}))
    return source, target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="udat-train", description="Train one UDAT / UDAT-AS method with checkpoints.")
    parser.add_argument("--method", choices=tuple(METHODS), default="udat_as_margin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambda", dest="lambda_max", type=float, default=1.0,
                        help="λ_max (the schedule's final λ)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/last.pt to the same result as an uninterrupted run")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args, args.method, args.seed, args.lambda_max)
    source, target = load_domains(args)
    trainer = Trainer(config, source, target, args.out, progress=not args.quiet)
    if trainer.init_report is not None:
        print(trainer.init_report.format(), file=sys.stderr)
    result = trainer.fit(resume=args.resume)
    summary = {"method": config.method, "seed": config.seed,
               "selected_epoch": result["selected_epoch"], "selection": result["selection"],
               "target_acc": result["target_test"]["acc"], "oracle_acc": result["oracle_acc"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
