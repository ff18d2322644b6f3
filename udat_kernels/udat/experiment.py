"""`udat-experiment`: the paper's five-row table over seeds, with λ selection, t-SNE and curves.

    udat-experiment --source mnist5k --target digits --seeds 0 1 2 --out runs/demo

Each (method, λ, seed) trains in DIR/runs/<method>/lambda_<λ>/seed_<seed> and is resumed or
reused when the experiment is run again with the same settings. DIR receives results.json,
results.md, results.csv, tsne.png and curves.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .models import build_model
from .plots import plot_curves, plot_tsne
from .report import format_csv, format_markdown
from .training import METHODS, Trainer, predict, select_score
from .training.checkpoint import atomic_write_json, atomic_write_text
from .training.cli import add_common_args, config_from_args, load_domains

__all__ = ["main", "run_experiment", "LAMBDA_SWEEP"]

LAMBDA_SWEEP = tuple(round(0.1 * i, 1) for i in range(11))  # the paper's 0.0, 0.1, …, 1.0
TSNE_METHODS = ("source_only", "udat", "udat_as_margin")


def _versions() -> dict:
    import udat_kernels

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "udat_kernels": udat_kernels.__version__}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _run(args, source, target, method: str, lam: float, seed: int) -> tuple[dict, Path]:
    """Train (or resume, or reuse) one run; returns its result and folder."""
    config = config_from_args(args, method, seed, lam)
    out = Path(args.out) / "runs" / method / f"lambda_{lam:.1f}" / f"seed_{seed}"
    done = out / "result.json"
    if done.exists():
        result = json.loads(done.read_text())
        if result["config"] == config.to_dict():
            return result, out
    trainer = Trainer(config, source, target, out, progress=not args.quiet)
    return trainer.fit(resume=True), out


def _method_row(runs: dict[float, list[dict]], select: str, adversarial: bool) -> dict:
    """Pick λ by the mean selection score over seeds and report that λ's runs; the oracle
    column picks λ and epoch by target test accuracy (what the paper did)."""
    def mean_score(results):
        return np.mean([select_score(r["history"][r["selected_epoch"] - 1], select)
                        for r in results])

    lam = max(runs, key=lambda k: mean_score(runs[k]))
    oracle_lam = max(runs, key=lambda k: np.mean([r["oracle_acc"] for r in runs[k]]))
    chosen = runs[lam]
    acc = [r["target_test"]["acc"] for r in chosen]
    return {"target_acc": acc, "mean": float(np.mean(acc)),
            "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
            "balanced_acc": [r["target_test"]["balanced_acc"] for r in chosen],
            "per_class": [r["target_test"]["per_class"] for r in chosen],
            "lambda": lam if adversarial else None, "selection": select,
            "selected_epoch": [r["selected_epoch"] for r in chosen],
            "oracle_acc": [r["oracle_acc"] for r in runs[oracle_lam]],
            "oracle_lambda": oracle_lam if adversarial else None}


def _tsne_features(args, source, target, method: str, run_dir: Path, limit: int):
    """Pre-GRL features of source and target test images from the run's selected epoch."""
    result = json.loads((run_dir / "result.json").read_text())
    config = result["config"]
    model = build_model(len(source.classes), config["model"], width=config["width"],
                        input_size=config["input_size"], batch_norm=config["batch_norm"])
    state = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict({k: v for k, v in state.items()
                           if not k.startswith("domain_classifier.")})
    model.to(args.device)
    device = torch.device(args.device)
    out = []
    for images in (source.test, target.test):
        # evenly spaced, so that every class is present whatever the file's order
        images = images.subset(torch.linspace(0, len(images) - 1, min(limit, len(images))).long())
        out.append(predict(model, images, device, args.amp, features=True)[1].numpy())
    return tuple(out)


def run_experiment(args) -> dict:
    """Train every method × λ × seed, then write the tables and figures; returns results."""
    started = time.perf_counter()
    source, target = load_domains(args)
    lambdas = LAMBDA_SWEEP if args.lambda_sweep else (args.lambda_max,)
    shared = {k: v for k, v in config_from_args(args, "target", 0, 0.0).to_dict().items()
              if k not in ("method", "seed", "lambda_max")}  # the settings all runs share
    results = {"source": args.source, "target": args.target, "seeds": list(args.seeds),
               "config": {**shared, "methods": args.methods, "lambdas": list(lambdas)},
               "versions": _versions(), "commit": _commit(), "methods": {}}
    curves, run_dirs = {}, {}
    for method in args.methods:
        adversarial = METHODS[method].domain_head is not None
        runs = {}
        for lam in (lambdas if adversarial else (0.0,)):
            runs[lam] = []
            for seed in args.seeds:
                result, out = _run(args, source, target, method, lam, seed)
                runs[lam].append(result)
                run_dirs[method, lam, seed] = out
        row = _method_row(runs, args.select, adversarial)
        results["methods"][method] = row
        curves[method] = [r["history"] for r in runs[row["lambda"] or 0.0]]
        if not args.quiet:
            print(f"{method}: target acc {100 * row['mean']:.1f} ± {100 * row['std']:.1f} %",
                  file=sys.stderr)
    out = Path(args.out)
    results["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(results, out / "results.json")
    atomic_write_text(format_markdown(results), out / "results.md")
    atomic_write_text(format_csv(results), out / "results.csv")
    plot_curves(curves, out / "curves.png")
    tsne = {m: _tsne_features(args, source, target, m,
                              run_dirs[m, results["methods"][m]["lambda"] or 0.0, args.seeds[0]],
                              args.tsne_points)
            for m in TSNE_METHODS if m in results["methods"]}
    if tsne:
        plot_tsne(tsne, out / "tsne.png")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udat-experiment",
        description="Run the paper's five methods over seeds and write results.json/.md/.csv, "
                    "tsne.png and curves.png.")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    lam = parser.add_mutually_exclusive_group()
    lam.add_argument("--lambda", dest="lambda_max", type=float, default=1.0,
                     help="λ_max of the adversarial methods")
    lam.add_argument("--lambda-sweep", action="store_true",
                     help="try λ_max = 0.0, 0.1, …, 1.0 and choose by --select")
    parser.add_argument("--tsne-points", type=int, default=500,
                        help="test images per domain in the t-SNE figure")
    parser.add_argument("--out", required=True, help="output folder")
    add_common_args(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_experiment(args)
    print(format_markdown(results), end="")
    print(f"({results['seconds']:.0f} s; results in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
