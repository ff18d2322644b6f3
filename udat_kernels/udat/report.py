"""The experiment's tables: results.md (the paper's layout) and results.csv."""

from __future__ import annotations

import csv
import io

__all__ = ["METHOD_TITLES", "format_markdown", "format_csv"]

METHOD_TITLES = {
    "target": "Target (train on labelled target)",
    "source_only": "Source only",
    "udat": "UDAT (softmax)",
    "udat_as": "UDAT-AS (s = 64, m = 0)",
    "udat_as_margin": "UDAT-AS with margin (s = 64, m = 0.5)",
}


def _pct(values) -> str:
    """'mean ± std' in percent."""
    if not values:
        return "–"
    mean = sum(values) / len(values)
    n = len(values)
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0  # sample std
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def format_markdown(results: dict) -> str:
    """The five-row table: target accuracy under the label-free selection, balanced accuracy,
    the oracle accuracy (best target-test epoch and λ, what the paper reported) and λ."""
    selection = results["config"]["train"]["select"]
    label = "oracle" if selection == "oracle" else f"label-free ({selection})"
    lines = [f"S: {results['source']} → T: {results['target']}, seeds {results['seeds']}, "
             f"accuracy on the target test set (%), mean ± std over seeds",
             "",
             f"| # | Method | Target acc, {label} | Balanced acc | Oracle acc | λ |",
             "|---|---|---|---|---|---|"]
    for i, (name, row) in enumerate(results["methods"].items(), start=1):
        lam = "–" if row["lambda"] is None else f"{row['lambda']:.1f}"
        lines.append(f"| {i} | {METHOD_TITLES.get(name, name)} | {_pct(row['target_acc'])} | "
                     f"{_pct(row['balanced_acc'])} | {_pct(row['oracle_acc'])} | {lam} |")
    return "\n".join(lines) + "\n"


def format_csv(results: dict) -> str:
    """One row per method and seed."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "seed", "lambda", "selection", "target_acc", "balanced_acc",
                     "oracle_acc"])
    for name, row in results["methods"].items():
        for i, seed in enumerate(results["seeds"]):
            writer.writerow([name, seed, row["lambda"], row["selection"],
                             f"{row['target_acc'][i]:.6f}", f"{row['balanced_acc'][i]:.6f}",
                             f"{row['oracle_acc'][i]:.6f}"])
    return out.getvalue()
