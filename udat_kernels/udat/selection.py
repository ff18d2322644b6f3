"""Choosing one model per method and seed from an experiment's runs, and measuring the choice.

The candidates of a method and seed are every epoch of every λ it was trained at. A validator
(`udat_kernels.udat.training.validators`) picks the candidate with the largest score (ties go to
the smaller λ, then the earlier epoch); the oracle picks the one with the best target test
accuracy. The *regret* of a validator is oracle accuracy minus chosen accuracy, per seed; a
*random pick* is the mean accuracy over the candidates (the expected accuracy of a uniformly
random choice). Means over seeds come with a 95 % Student-t interval; paired differences between
methods use the same seeds (the same initial weights and batch order) on both sides.
"""

from __future__ import annotations

import math

import numpy as np

from .training.validators import selection_key

__all__ = ["t_interval", "candidates", "choose", "method_choices", "regret_summary",
           "epoch_regret", "paired_difference", "verdict"]


def t_interval(values, confidence: float = 0.95) -> dict:
    """{"mean", "lo", "hi", "n"}: the mean and its Student-t interval (lo = hi = None for one
    value)."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "lo": None, "hi": None, "n": 0}
    mean = float(values.mean())
    if n == 1:
        return {"mean": mean, "lo": None, "hi": None, "n": 1}
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def candidates(runs: dict[float, dict[int, dict]], seed: int) -> list[tuple[float, dict]]:
    """(λ, epoch record) for every epoch of every λ of one seed, λ ascending."""
    return [(lam, record) for lam in sorted(runs) for record in runs[lam][seed]["history"]]


def choose(cands: list[tuple[float, dict]], validator: str) -> tuple[float, dict]:
    """The candidate `validator` (or "oracle") ranks first; the first of equals wins."""
    best, best_key = None, None
    for cand in cands:
        key = selection_key(cand[1], validator)
        if best_key is None or key > best_key:
            best, best_key = cand, key
    return best


def _acc(record: dict) -> float:
    return record["target_test"]["acc"]


def method_choices(runs: dict[float, dict[int, dict]], seeds, validator: str) -> list[dict]:
    """Per seed: {"seed", "lambda", "epoch", "acc", "record"} of `validator`'s choice."""
    out = []
    for seed in seeds:
        lam, record = choose(candidates(runs, seed), validator)
        out.append({"seed": seed, "lambda": lam, "epoch": record["epoch"], "acc": _acc(record),
                    "record": record})
    return out


def regret_summary(runs: dict[float, dict[int, dict]], seeds, validators) -> dict:
    """Every validator's choice and regret over all candidates (epochs × λ), with the oracle
    and a random pick: {"oracle": [...], "validators": {name: {...}}, "random": {...}}."""
    oracle = method_choices(runs, seeds, "oracle")
    best = [c["acc"] for c in oracle]
    out = {"oracle": [{k: c[k] for k in ("seed", "lambda", "epoch", "acc")} for c in oracle],
           "validators": {}}
    for name in validators:
        chosen = method_choices(runs, seeds, name)
        regret = [b - c["acc"] for b, c in zip(best, chosen)]
        out["validators"][name] = {
            "choices": [{k: c[k] for k in ("seed", "lambda", "epoch", "acc")} for c in chosen],
            "regret": regret, **t_interval(regret)}
    random_acc = [float(np.mean([_acc(r) for _, r in candidates(runs, s)])) for s in seeds]
    regret = [b - a for b, a in zip(best, random_acc)]
    out["random"] = {"acc": random_acc, "regret": regret, **t_interval(regret)}
    return out


def epoch_regret(runs: dict[float, dict[int, dict]], seeds, validators) -> dict:
    """Regret of choosing the epoch only, each λ's run on its own: per seed, the mean over λ
    of (best epoch's accuracy − chosen epoch's accuracy); {name: {"regret", mean, lo, hi}},
    with "random" for a random epoch."""
    out = {}
    for name in [*validators, "random"]:
        regret = []
        for seed in seeds:
            per_lambda = []
            for lam in sorted(runs):
                history = runs[lam][seed]["history"]
                best = max(_acc(r) for r in history)
                if name == "random":
                    got = float(np.mean([_acc(r) for r in history]))
                else:
                    got = _acc(choose([(lam, r) for r in history], name)[1])
                per_lambda.append(best - got)
            regret.append(float(np.mean(per_lambda)))
        out[name] = {"regret": regret, **t_interval(regret)}
    return out


def paired_difference(a: list[float], b: list[float]) -> dict:
    """a − b seed by seed, with its mean and 95 % interval."""
    diff = [x - y for x, y in zip(a, b)]
    return {"diff": diff, **t_interval(diff)}


def verdict(name_a: str, name_b: str, stats: dict) -> str:
    """The ordering the interval supports: 'A > B', 'A < B', or that it resolves none."""
    lo, hi = stats["lo"], stats["hi"]
    if lo is None:
        return "one seed: no interval"
    if lo > 0:
        return f"{name_a} > {name_b}"
    if hi < 0:
        return f"{name_a} < {name_b}"
    return "not resolved (the interval contains 0)"
