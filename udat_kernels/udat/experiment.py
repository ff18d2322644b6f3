"""`udat-experiment`: the paper's five-row table over seeds, with λ selection by a declared
label-free validator, every validator's regret, paired differences, t-SNE and curves.

    udat-experiment --source mnist5k --target digits --out runs/demo

Each (method, λ, seed) trains in RUNS/<method>_lambda<λ>_seed<seed>_<key>, where the key hashes
everything that changes the run's result (`udat_kernels.udat.runkey`): a run is resumed or
reused only by a command that would produce the same result, and never overwritten. RUNS is
OUT/runs unless --runs names a folder that experiments share. OUT receives results.json (every
number and the whole configuration), results.md, results.csv, selection.csv, confusion.csv,
curves.png, tsne.png and confusion_<method>.png.

Under torchrun every run trains data-parallel over the processes (`training.parallel`;
docs/distributed.md, "Data-parallel training"); rank 0 prints and writes the run folders and
the experiment's files, the other ranks return once the last run is trained.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from udat_kernels import __version__

from .arguments import check_loaded_split, parse_experiment
from .config import LAMBDA_SWEEP, METHODS, VALIDATORS, ExperimentConfig, RunConfig
from .data import load_domains
from .models import UDATVGG
from .plots import plot_confusion, plot_curves, plot_tsne
from .report import (METHOD_TITLES, format_confusion_csv, format_csv, format_markdown,
                     format_selection_csv)
from .runkey import fingerprints, result_fields, run_key
from .selection import (epoch_regret, method_choices, paired_difference, regret_summary,
                        t_interval, verdict)
from .training import Trainer, predict
from .training.parallel import SINGLE, Ranks, from_environment
from .training.checkpoint import atomic_write_json, atomic_write_text, load_checkpoint

__all__ = ["main", "run_experiment", "plan_runs", "disk_estimate", "LAMBDA_SWEEP"]

TSNE_METHODS = ("source_only", "udat", "udat_as_margin")
ADVERSARIAL = tuple(m for m, spec in METHODS.items() if spec.domain_head is not None)


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "udat_kernels": __version__}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")


def plan_runs(experiment: ExperimentConfig, prints: dict, processes: int = 1) -> list[dict]:
    """Every run of the grid: {"method", "lambda", "seed", "run", "key", "folder"};
    processes: the data-parallel world size (in the key when above one)."""
    plan = []
    for method in experiment.methods:
        for lam in experiment.lambdas_of(method):
            for seed in experiment.seeds:
                run = experiment.run(method, lam, seed)
                key = run_key(result_fields(run, prints, processes))
                name = (f"{method}_lambda{lam:g}_seed{seed}_{key}" if run.train.adversarial
                        else f"{method}_seed{seed}_{key}")
                plan.append({"method": method, "lambda": lam, "seed": seed, "run": run,
                             "key": key, "folder": Path(experiment.runs_dir) / name})
    return plan


def _parameters(run: RunConfig, num_classes: int) -> int:
    with torch.device("meta"):
        model = UDATVGG(num_classes, run.model.architecture(),
                        domain_head=run.train.spec.domain_head)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def disk_estimate(plan: list[dict], num_classes: int) -> dict:
    """Bytes the runs still to train will leave on disk (by --keep), and the most a run in
    progress holds (best.pt + last.pt with the optimizer's momentum)."""
    kept, peak = 0, 0
    for item in plan:
        if (item["folder"] / "result.json").exists():
            continue
        train = item["run"].train
        weights = 4 * _parameters(item["run"], num_classes)
        last = weights * (2 if train.momentum > 0 else 1)
        kept += {"best": weights, "last": last, "both": weights + last}[train.keep]
        peak = max(peak, weights + last)
    return {"kept": kept, "peak": peak}


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _load_result(folder: Path) -> dict | None:
    path = folder / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def _tsne_features(experiment: ExperimentConfig, source, target, folder: Path):
    """Pre-GRL features of source and target test images from the run's best.pt (or last.pt
    when --keep last removed it); -> (source features, target features, epoch)."""
    path = folder / "best.pt" if (folder / "best.pt").exists() else folder / "last.pt"
    state = load_checkpoint(path)
    run = RunConfig.from_dict(state["config"])
    model = UDATVGG(len(source.classes), run.model.architecture())
    model.load_state_dict({k: v for k, v in state["model"].items()
                           if not k.startswith("domain_classifier.")})
    device = torch.device(run.train.device)
    model.to(device)
    out, limit = [], experiment.tsne_points
    for images in (source.test, target.test):
        # evenly spaced, so that every class is present whatever the file's order
        images = images.subset(torch.linspace(0, len(images) - 1, min(limit, len(images))).long())
        out.append(predict(model, images, device, run.train.amp, features=True)[1].numpy())
    return out[0], out[1], state.get("epoch", len(state.get("history", [])))


def _method_row(runs: dict[float, dict[int, dict]], seeds, validator: str, adversarial: bool,
                chance: float) -> dict:
    """The table row of one method: each seed's model chosen by `validator` over every epoch
    and λ, and the oracle's."""
    chosen = method_choices(runs, seeds, validator)
    oracle = method_choices(runs, seeds, "oracle")
    acc = [c["acc"] for c in chosen]
    tests = [c["record"]["target_test"] for c in chosen]
    summary = t_interval(acc)
    return {"selection": validator, "target_acc": acc, "mean": summary["mean"],
            "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
            "lo": summary["lo"], "hi": summary["hi"],
            "balanced_acc": [t["balanced_acc"] for t in tests],
            "per_class": [t["per_class"] for t in tests],
            "confusion": [t["confusion"] for t in tests],
            "lambda": [c["lambda"] for c in chosen] if adversarial else None,
            "selected_epoch": [c["epoch"] for c in chosen],
            "oracle_acc": [c["acc"] for c in oracle],
            "oracle_lambda": [c["lambda"] for c in oracle] if adversarial else None,
            "oracle_epoch": [c["epoch"] for c in oracle],
            "below_twice_chance": bool(summary["mean"] < 2 * chance)}


def _differences(rows: dict) -> list[dict]:
    """Each adversarial method against source only, and the adversarial methods against each
    other: paired over seeds, at each method's own chosen λ and epoch."""
    pairs = [(a, "source_only") for a in ADVERSARIAL]
    pairs += [(a, b) for i, a in enumerate(ADVERSARIAL) for b in ADVERSARIAL[i + 1:]]
    out = []
    for a, b in pairs:
        if a in rows and b in rows:
            stats = paired_difference(rows[a]["target_acc"], rows[b]["target_acc"])
            out.append({"a": a, "b": b, **stats,
                        "verdict": verdict(METHOD_TITLES.get(a, a), METHOD_TITLES.get(b, b),
                                           stats)})
    return out


def _mean_over_adversarial(selection: dict, seeds) -> dict:
    """Per validator (and the random pick): the regret averaged over the adversarial methods
    seed by seed, with its interval."""
    methods = [m for m in ADVERSARIAL if m in selection]
    if not methods:
        return {}
    out = {}
    for name in [*VALIDATORS, "random"]:
        per_seed = [float(np.mean([(selection[m]["random"] if name == "random" else
                                    selection[m]["validators"][name])["regret"][i]
                                   for m in methods])) for i in range(len(seeds))]
        out[name] = {"regret": per_seed, **t_interval(per_seed)}
    return out


def _by_lambda(runs: dict[float, dict[int, dict]], seeds, validator: str) -> dict:
    """Mean target accuracy over seeds at each λ: at the epoch `validator` chose, and the
    best epoch."""
    out = {}
    for lam in sorted(runs):
        single = {lam: runs[lam]}
        out[f"{lam:g}"] = {
            "acc": float(np.mean([c["acc"] for c in method_choices(single, seeds, validator)])),
            "oracle": float(np.mean([c["acc"] for c in method_choices(single, seeds, "oracle")]))}
    return out


def run_experiment(experiment: ExperimentConfig, progress: bool = True, log=None,
                   domains=None, ranks: Ranks = SINGLE) -> dict | None:
    """Train (or resume, or reuse) every method × λ × seed, then write the tables and figures;
    returns the results (None on the ranks other than 0). `log`: where the progress lines go
    (stderr); domains: the (source, target) pair when the caller loaded it already; ranks: the
    data-parallel processes."""
    log = log or sys.stderr
    if not ranks.main:
        log, progress = open(os.devnull, "w"), False  # noqa: SIM115 - rank 0 speaks
    started = time.perf_counter()
    source, target = domains or load_domains(experiment.data, experiment.model.size)
    prints = fingerprints(experiment.data, experiment.model)
    plan = plan_runs(experiment, prints, ranks.size)
    classes = list(source.classes)
    todo = [p for p in plan if not (p["folder"] / "result.json").exists()]
    disk = disk_estimate(plan, len(classes))
    folder = Path(experiment.runs_dir).resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    print(f"{len(plan)} runs ({len(plan) - len(todo)} finished, {len(todo)} to train) in "
          f"{experiment.runs_dir}; disk: about {_mib(disk['kept'])} kept "
          f"(--keep {experiment.train.keep}) + {_mib(disk['peak'])} while a run trains; "
          f"{_mib(free)} free", file=log)
    if disk["kept"] + disk["peak"] > free:
        print("warning: the runs may not fit on that disk", file=log)
    results_by = {}
    trained, train_seconds = 0, 0.0
    for k, item in enumerate(plan, start=1):
        result = _load_result(item["folder"])
        reused = result is not None
        if not reused:
            left = len(todo) - trained
            eta = (f", about {_duration(train_seconds / trained * left)} left" if trained
                   else "")
            lam = f" λ {item['lambda']:g}" if item["run"].train.adversarial else ""
            print(f"[run {k}/{len(plan)}] {item['method']}{lam} seed {item['seed']} "
                  f"(elapsed {_duration(time.perf_counter() - started)}{eta})", file=log)
            t0 = time.perf_counter()
            trainer = Trainer(item["run"], source, target, item["folder"], progress=progress,
                              prints=prints, ranks=ranks)
            result = trainer.fit(resume=True)
            trained += 1
            train_seconds += time.perf_counter() - t0
        item["reused"] = reused
        results_by.setdefault(item["method"], {}).setdefault(item["lambda"], {})[
            item["seed"]] = result
    if not ranks.main:
        return None  # the tables and figures are rank 0's
    validator = experiment.train.select
    chance = 1.0 / len(classes)
    results = {"source": experiment.data.source, "target": experiment.data.target,
               "seeds": list(experiment.seeds), "classes": classes, "chance": chance,
               "config": experiment.to_dict(), "validator": validator,
               "version": __version__, "versions": _versions(), "commit": _commit(),
               "methods": {}, "selection": {}, "epoch_selection": {}, "by_lambda": {}}
    for method, runs in results_by.items():
        adversarial = METHODS[method].domain_head is not None
        row = _method_row(runs, experiment.seeds, validator, adversarial, chance)
        results["methods"][method] = row
        results["selection"][method] = regret_summary(runs, experiment.seeds, VALIDATORS)
        results["epoch_selection"][method] = epoch_regret(runs, experiment.seeds, VALIDATORS)
        if adversarial and len(runs) > 1:
            results["by_lambda"][method] = _by_lambda(runs, experiment.seeds, validator)
        if progress:
            flag = "  << below twice chance" if row["below_twice_chance"] else ""
            print(f"{method}: target acc {100 * row['mean']:.1f} ± {100 * row['std']:.1f} %"
                  f"{flag}", file=log)
        if row["below_twice_chance"]:
            print(f"warning: {method} stays below twice chance ({100 * row['mean']:.1f} % < "
                  f"{200 * chance:.1f} %): it did not train; check the learning rate and "
                  f"epochs", file=log)
    results["selection_adversarial"] = _mean_over_adversarial(results["selection"],
                                                              experiment.seeds)
    results["differences"] = _differences(results["methods"])
    results["runs"] = [{"method": p["method"], "lambda": p["lambda"], "seed": p["seed"],
                        "key": p["key"], "folder": str(p["folder"]), "reused": p["reused"]}
                       for p in plan]
    out = Path(experiment.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for method, row in results["methods"].items():
        lambdas = row["lambda"] or [0.0] * len(experiment.seeds)
        curves[method] = [results_by[method][lam][s]["history"]
                          for s, lam in zip(experiment.seeds, lambdas)]
        plot_confusion(row["confusion"], classes, METHOD_TITLES.get(method, method),
                       out / f"confusion_{method}.png")
    plot_curves(curves, out / "curves.png")
    first = experiment.seeds[0]
    tsne = {}
    for method in TSNE_METHODS:
        if method in results["methods"]:
            lam = (results["methods"][method]["lambda"] or [0.0])[0]
            folder = next(p["folder"] for p in plan if p["method"] == method
                          and p["lambda"] == lam and p["seed"] == first)
            tsne[method] = _tsne_features(experiment, source, target, folder)
    if tsne:
        plot_tsne(tsne, out / "tsne.png")
    results["trained"] = trained  # runs trained by this invocation (the others were reused)
    results["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(results, out / "results.json")
    atomic_write_text(format_markdown(results), out / "results.md")
    atomic_write_text(format_csv(results), out / "results.csv")
    atomic_write_text(format_selection_csv(results), out / "selection.csv")
    atomic_write_text(format_confusion_csv(results), out / "confusion.csv")
    return results


def main(argv=None) -> int:
    command = parse_experiment(argv)
    if command.threads:
        torch.set_num_threads(command.threads)
    experiment = command.experiment
    source, target = load_domains(experiment.data, experiment.model.size)
    labelled = {METHODS[m].labelled for m in experiment.methods}
    check_loaded_split("udat-experiment", experiment.data,
                       {side: {"source": source, "target": target}[side] for side in labelled})
    ranks = from_environment(experiment.train.device)
    results = run_experiment(experiment, progress=command.progress, domains=(source, target),
                             ranks=ranks)
    if results is None:
        return 0
    print(format_markdown(results), end="")
    print(f"({results['seconds']:.0f} s; results in {command.experiment.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
