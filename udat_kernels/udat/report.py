"""The experiment's tables: results.md (the paper's layout and what the spread supports),
results.csv, selection.csv and confusion.csv."""

from __future__ import annotations

import csv
import io

from .config import DEFAULT_VALIDATOR, VALIDATORS

__all__ = ["METHOD_TITLES", "format_markdown", "format_csv", "format_selection_csv",
           "format_confusion_csv"]

METHOD_TITLES = {
    "target": "Target (train on labelled target)",
    "source_only": "Source only",
    "udat": "UDAT (softmax)",
    "udat_as": "UDAT-AS (s = 64, m = 0)",
    "udat_as_margin": "UDAT-AS with margin (s = 64, m = 0.5)",
}
FLAG = "⚠"


def _mean(values) -> float:
    return sum(values) / len(values)


def _pct(values) -> str:
    """'mean ± std' in percent (sample std)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean, n = _mean(values), len(values)
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _interval(stats: dict, scale: float = 100.0, clip: bool = False) -> str:
    """'[lo, hi]'; clip: an accuracy's interval, cut to the possible 0–100 %."""
    if stats.get("lo") is None:
        return "–"
    lo, hi = scale * stats["lo"], scale * stats["hi"]
    if clip:
        lo, hi = max(lo, 0.0), min(hi, scale)
    return f"[{lo:.1f}, {hi:.1f}]"


def _points(stats: dict) -> str:
    """'mean [lo, hi]' in points."""
    return f"{100 * stats['mean']:.1f} {_interval(stats)}".rstrip(" –")


def _lambdas(values) -> str:
    if values is None:
        return "–"
    if len(set(values)) == 1:
        return f"{values[0]:g}"
    return ", ".join(f"{v:g}" for v in values)


def _validator_label(name: str, used: str) -> str:
    tags = []
    if name == DEFAULT_VALIDATOR:
        tags.append("declared")
    if name == used and name != DEFAULT_VALIDATOR:
        tags.append("used here")
    return f"{name} ({', '.join(tags)})" if tags else name


def _main_table(results: dict) -> list[str]:
    validator = results["validator"]
    label = "oracle" if validator == "oracle" else f"label-free ({validator})"
    lines = [f"| # | Method | Target acc, {label} | 95 % interval | Balanced acc | Oracle acc "
             f"| λ |", "|---|---|---|---|---|---|---|"]
    for i, (name, row) in enumerate(results["methods"].items(), start=1):
        flag = f" {FLAG}" if row.get("below_twice_chance") else ""
        lines.append(f"| {i} | {METHOD_TITLES.get(name, name)}{flag} | {_pct(row['target_acc'])} "
                     f"| {_interval(row, clip=True)} | {_pct(row['balanced_acc'])} | "
                     f"{_pct(row['oracle_acc'])} | {_lambdas(row['lambda'])} |")
    return lines


def _differences(results: dict) -> list[str]:
    if not results.get("differences"):
        return []
    lines = ["", "Paired differences, seed by seed (points of target accuracy, each method at "
             "its own chosen λ and epoch):", "",
             "| Comparison | Mean difference | 95 % interval | What the interval supports |",
             "|---|---|---|---|"]
    for d in results["differences"]:
        a, b = METHOD_TITLES.get(d["a"], d["a"]), METHOD_TITLES.get(d["b"], d["b"])
        lines.append(f"| {a} − {b} | {100 * d['mean']:+.1f} | {_interval(d)} | {d['verdict']} |")
    return lines


def _selection(results: dict) -> list[str]:
    selection = results.get("selection")
    if not selection:
        return []
    used = results["validator"]
    names = list(VALIDATORS)
    several = bool(results.get("by_lambda"))  # adversarial methods at more than one λ
    scope = "every epoch and λ" if several else "every epoch"
    lines = ["", f"Label-free validators: regret = oracle − chosen target accuracy (points), "
                 f"mean over seeds [95 % interval], choosing among {scope} of each seed. "
                 f"The declared validator is {DEFAULT_VALIDATOR}, fixed before any measurement; "
                 f"choosing a validator by these regrets would itself use the target labels.",
             "", "| Method | " + " | ".join(_validator_label(n, used) for n in names)
             + " | random pick |", "|---|" + "---|" * (len(names) + 1)]
    for method, sel in selection.items():
        cells = [_points(sel["validators"][n]) for n in names] + [_points(sel["random"])]
        lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
    mean = results.get("selection_adversarial")
    if mean:
        cells = [_points(mean[n]) for n in names] + [_points(mean["random"])]
        lines.append("| **Mean over the adversarial methods** | " + " | ".join(cells) + " |")
    if several:
        lines += ["", "Choosing the epoch only (each λ's run on its own, mean over λ): regret "
                      "in points, mean over seeds [95 % interval].", "",
                  "| Method | " + " | ".join(names) + " | random epoch |",
                  "|---|" + "---|" * (len(names) + 1)]
        for method, sel in results["epoch_selection"].items():
            cells = [_points(sel[n]) for n in [*names, "random"]]
            lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
    lines += ["", "What each validator chose (λ, epoch: target accuracy %), per seed:", "",
              "| Method | Validator | " + " | ".join(f"seed {s}" for s in results["seeds"])
              + " |", "|---|---|" + "---|" * len(results["seeds"])]
    for method, sel in selection.items():
        adversarial = results["methods"][method]["lambda"] is not None
        for name in [*names, "oracle"]:
            choices = sel["oracle"] if name == "oracle" else sel["validators"][name]["choices"]
            cells = [(f"λ {c['lambda']:g}, " if adversarial else "") +
                     f"ep {c['epoch']}: {100 * c['acc']:.1f}" for c in choices]
            lines.append(f"| {METHOD_TITLES.get(method, method)} | {name} | "
                         + " | ".join(cells) + " |")
    return lines


def _by_lambda(results: dict) -> list[str]:
    by_lambda = results.get("by_lambda")
    if not by_lambda:
        return []
    lams = list(next(iter(by_lambda.values())))
    lines = ["", f"Target accuracy (%) by λ, mean over seeds, at the epoch {results['validator']} "
                 f"chose (best epoch in brackets):", "",
             "| Method | " + " | ".join(f"λ {lam}" for lam in lams) + " |",
             "|---|" + "---|" * len(lams)]
    for method, row in by_lambda.items():
        cells = [f"{100 * row[lam]['acc']:.1f} ({100 * row[lam]['oracle']:.1f})" for lam in lams]
        lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
    return lines


def _per_class(results: dict) -> list[str]:
    classes = results.get("classes")
    if not classes:
        return []
    lines = ["", "Per-class target accuracy (%) of the chosen models, mean over seeds:", "",
             "| Method | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for method, row in results["methods"].items():
        cells = []
        for c in range(len(classes)):
            values = [seed[c] for seed in row["per_class"] if seed[c] is not None]
            cells.append(f"{100 * _mean(values):.1f}" if values else "–")
        lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
    return lines


def _confusion(results: dict) -> list[str]:
    classes = results.get("classes")
    if not classes:
        return []
    lines = ["", "Confusion matrices of the chosen models, summed over seeds (rows: true class, "
                 "columns: predicted class; `confusion_<method>.png` shows them as images):"]
    for method, row in results["methods"].items():
        total = [[sum(seed[i][j] for seed in row["confusion"]) for j in range(len(classes))]
                 for i in range(len(classes))]
        lines += ["", f"{METHOD_TITLES.get(method, method)}:", "",
                  "| true \\ predicted | " + " | ".join(classes) + " |",
                  "|---|" + "---|" * len(classes)]
        lines += [f"| {classes[i]} | " + " | ".join(str(v) for v in total[i]) + " |"
                  for i in range(len(classes))]
    return lines


def format_markdown(results: dict) -> str:
    """The five-row table under the experiment's validator with intervals and the oracle column,
    the paired differences, every validator's regret, and per-class results."""
    chance = results.get("chance")
    lines = [f"S: {results['source']} → T: {results['target']}, seeds {results['seeds']}, "
             f"accuracy on the target test set (%), mean ± std over seeds with the 95 % interval "
             f"of the mean (cut to 0–100 %); each seed's model (epoch and λ) chosen by {results['validator']}, "
             f"the oracle column by the target test accuracy.", ""]
    lines += _main_table(results)
    if chance is not None and any(r.get("below_twice_chance")
                                  for r in results["methods"].values()):
        lines += ["", f"{FLAG} stays below twice chance ({200 * chance:.0f} %): the row did not "
                      f"train."]
    lines += _differences(results)
    lines += _selection(results)
    lines += _by_lambda(results)
    lines += _per_class(results)
    lines += _confusion(results)
    return "\n".join(lines) + "\n"


def format_csv(results: dict) -> str:
    """One row per method and seed, with the per-class accuracies."""
    classes = results.get("classes") or []
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "seed", "selection", "lambda", "epoch", "target_acc",
                     "balanced_acc", "oracle_acc", "oracle_lambda", "oracle_epoch",
                     *[f"acc_{c}" for c in classes]])
    for name, row in results["methods"].items():
        for i, seed in enumerate(results["seeds"]):
            per_class = ["" if a is None else f"{a:.6f}" for a in row["per_class"][i]]
            writer.writerow([name, seed, row["selection"],
                             "" if row["lambda"] is None else row["lambda"][i],
                             row["selected_epoch"][i], f"{row['target_acc'][i]:.6f}",
                             f"{row['balanced_acc'][i]:.6f}", f"{row['oracle_acc'][i]:.6f}",
                             "" if row["oracle_lambda"] is None else row["oracle_lambda"][i],
                             row["oracle_epoch"][i], *per_class])
    return out.getvalue()


def format_selection_csv(results: dict) -> str:
    """One row per method, validator (and oracle, random pick) and seed."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "validator", "declared", "seed", "lambda", "epoch", "target_acc",
                     "oracle_acc", "regret"])
    for method, sel in results.get("selection", {}).items():
        for name, entry in sel["validators"].items():
            for c, best, regret in zip(entry["choices"], sel["oracle"], entry["regret"]):
                writer.writerow([method, name, name == DEFAULT_VALIDATOR, c["seed"], c["lambda"],
                                 c["epoch"], f"{c['acc']:.6f}", f"{best['acc']:.6f}",
                                 f"{regret:.6f}"])
        for acc, best, regret in zip(sel["random"]["acc"], sel["oracle"], sel["random"]["regret"]):
            writer.writerow([method, "random", False, best["seed"], "", "", f"{acc:.6f}",
                             f"{best['acc']:.6f}", f"{regret:.6f}"])
    return out.getvalue()


def format_confusion_csv(results: dict) -> str:
    """method, seed, true class, predicted class, count."""
    classes = results.get("classes") or []
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "seed", "true", "predicted", "count"])
    for name, row in results["methods"].items():
        for seed, matrix in zip(results["seeds"], row["confusion"]):
            for i, counts in enumerate(matrix):
                for j, count in enumerate(counts):
                    writer.writerow([name, seed, classes[i], classes[j], count])
    return out.getvalue()
