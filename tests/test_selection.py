"""Label-free validators, the choice among epochs and λ, regret, intervals, paired differences
and the tables that report them."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from udat_kernels.udat.config import DEFAULT_VALIDATOR, VALIDATORS
from udat_kernels.udat.report import format_markdown
from udat_kernels.udat.selection import (choose, epoch_regret, method_choices, paired_difference,
                                         regret_summary, t_interval, verdict)
from udat_kernels.udat.training.validators import (dev_risk, importance_weights,
                                                   information_maximization, selection_key,
                                                   soft_neighbourhood_density)


def test_dev_risk_with_equal_weights_is_the_mean_loss():
    losses = np.array([0.1, 2.0, 0.5, 0.7])
    assert dev_risk(losses, np.ones(4)) == pytest.approx(losses.mean())


def test_dev_control_variate_removes_the_weights_noise():
    """With losses constant the weighted mean is off by the weights' sampling error; the
    control variate takes it back out exactly (η = −loss)."""
    rng = np.random.default_rng(0)
    weights = rng.exponential(size=200)
    assert dev_risk(np.full(200, 0.3), weights) == pytest.approx(0.3)
    assert abs(np.mean(0.3 * weights) - 0.3) > 1e-3


def test_a_diverged_model_gets_no_dev_estimate():
    features = np.ones((4, 2))
    bad = features.copy()
    bad[0, 0] = np.nan
    assert np.isnan(importance_weights(bad, features, features)).all()
    assert math.isnan(dev_risk(np.array([1.0, np.inf]), np.ones(2)))
    assert selection_key(record(1, 0.5, dev=math.nan), "dev") == (-math.inf,)


def test_importance_weights_favour_target_like_points():
    rng = np.random.default_rng(1)
    source = rng.normal(0, 1, (400, 3))
    target = rng.normal(0, 1, (200, 3)) + np.array([1.5, 0, 0])
    val = np.array([[-2.0, 0, 0], [0.0, 0, 0], [2.0, 0, 0]])
    w = importance_weights(source, target, val)
    assert w[0] < w[1] < w[2]
    # the true ratio p_t / p_s at x = 0 is exp(−1.5² / 2) ≈ 0.32
    assert 0.15 < w[1] < 0.6


def test_dev_ranks_the_model_that_errs_off_the_target_better():
    """Two models with the same source validation loss: one errs on the target-like images,
    the other on the source-like ones; DEV's estimate of the target risk tells them apart."""
    rng = np.random.default_rng(2)
    val = rng.normal(0, 1, (300, 2))
    weights = importance_weights(rng.normal(0, 1, (500, 2)), rng.normal(0, 1, (500, 2)) + 1.5,
                                 val)
    near_target = (val[:, 0] > 0).astype(float)
    bad_on_target = dev_risk(near_target, weights)
    bad_on_source = dev_risk(1 - near_target, weights)
    assert bad_on_source < bad_on_target


def test_snd_prefers_clusters_and_is_maximal_for_a_collapsed_model():
    torch.manual_seed(0)
    n = 60
    collapsed = torch.zeros(n, 5)  # every target image gets the same prediction
    clusters = torch.full((n, 5), -10.0)
    clusters[torch.arange(n), torch.arange(n) % 5] = 10.0
    noise = torch.randn(n, 5) * 3
    assert soft_neighbourhood_density(collapsed) == pytest.approx(math.log(n - 1))
    assert soft_neighbourhood_density(clusters) > soft_neighbourhood_density(noise)


def test_im_rewards_confident_predictions_spread_over_the_classes():
    n, c = 50, 5
    spread = torch.full((n, c), -20.0)
    spread[torch.arange(n), torch.arange(n) % c] = 20.0
    collapsed = torch.full((n, c), -20.0)
    collapsed[:, 0] = 20.0
    unsure = torch.zeros(n, c)
    assert information_maximization(spread) == pytest.approx(math.log(c), abs=1e-6)
    assert information_maximization(collapsed) == pytest.approx(0.0, abs=1e-6)
    assert information_maximization(unsure) == pytest.approx(0.0, abs=1e-9)


def record(epoch, acc, source_val=0.5, val_loss=1.0, **scores):
    return {"epoch": epoch, "val_acc": source_val, "val_loss": val_loss,
            "target_test": {"acc": acc},
            "scores": {"source_val": source_val, "entropy": 0.0, "dev": 0.0, "im": 0.0,
                       "snd": 0.0, **scores}}


def test_selection_keys_and_ties():
    a = record(1, 0.5, source_val=0.9, val_loss=0.5)
    b = record(2, 0.7, source_val=0.9, val_loss=0.4)  # same accuracy, lower loss: wins
    c = record(3, 0.9, source_val=0.8, val_loss=0.1)
    assert choose([(0.0, a), (0.0, b), (0.0, c)], "source_val")[1] is b
    assert choose([(0.0, a), (0.0, b), (0.0, c)], "oracle")[1] is c
    assert selection_key(record(1, 0.5, dev=math.nan), "dev") == (-math.inf,)
    # equal scores: the smaller λ, then the earlier epoch
    assert choose([(0.1, a), (0.2, a), (0.1, b)], "dev") == (0.1, a)


def runs_grid():
    """Two λ × two seeds × three epochs with known accuracies and validator scores."""
    def history(accs, devs):
        return {"history": [record(e + 1, a, dev=d) for e, (a, d) in enumerate(zip(accs, devs))]}

    return {0.0: {0: history([0.5, 0.6, 0.55], [3, 2, 1]), 1: history([0.4, 0.5, 0.6], [1, 2, 3])},
            0.5: {0: history([0.7, 0.9, 0.8], [0, 5, 9]), 1: history([0.8, 0.6, 0.7], [9, 0, 0])}}


def test_regret_over_epochs_and_lambdas():
    runs = runs_grid()
    summary = regret_summary(runs, [0, 1], ["dev"])
    assert [o["acc"] for o in summary["oracle"]] == [0.9, 0.8]
    chosen = summary["validators"]["dev"]["choices"]
    assert [(c["lambda"], c["epoch"], c["acc"]) for c in chosen] == [(0.5, 3, 0.8), (0.5, 1, 0.8)]
    assert summary["validators"]["dev"]["regret"] == pytest.approx([0.1, 0.0])
    random = summary["random"]
    assert random["acc"] == pytest.approx([np.mean([0.5, 0.6, 0.55, 0.7, 0.9, 0.8]),
                                           np.mean([0.4, 0.5, 0.6, 0.8, 0.6, 0.7])])
    epochs = epoch_regret(runs, [0, 1], ["dev"])
    # seed 0: λ 0 picks epoch 1 (0.5, best 0.6), λ 0.5 picks epoch 3 (0.8, best 0.9)
    assert epochs["dev"]["regret"][0] == pytest.approx(0.1)
    assert [c["lambda"] for c in method_choices(runs, [0, 1], "oracle")] == [0.5, 0.5]


def test_t_interval_matches_scipy():
    values = [0.1, 0.4, 0.35, 0.2]
    got = t_interval(values)
    lo, hi = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    assert (got["lo"], got["hi"]) == pytest.approx((lo, hi))
    assert t_interval([0.3])["lo"] is None


def test_paired_difference_and_what_it_supports():
    clear = paired_difference([0.8, 0.82, 0.81], [0.6, 0.61, 0.59])
    assert clear["mean"] == pytest.approx(0.21) and verdict("A", "B", clear) == "A > B"
    assert verdict("A", "B", paired_difference([0.6, 0.61, 0.62], [0.8, 0.85, 0.83])) == "A < B"
    mixed = paired_difference([0.8, 0.6, 0.7], [0.7, 0.7, 0.7])
    assert verdict("A", "B", mixed).startswith("not resolved")


def results_for_report():
    def row(accs, flag):
        return {"selection": "dev", "target_acc": accs, "mean": float(np.mean(accs)),
                "std": 0.0, "lo": 0.1, "hi": 0.2, "balanced_acc": accs,
                "per_class": [[a, None] for a in accs], "confusion": [[[1, 0], [0, 1]]] * 2,
                "lambda": None, "selected_epoch": [1, 1], "oracle_acc": accs,
                "oracle_lambda": None, "oracle_epoch": [1, 1], "below_twice_chance": flag}

    rows = {"target": row([0.99, 0.98], False), "source_only": row([0.5, 0.6], True)}
    rows["target"].update(lo=0.95, hi=1.02)  # a t-interval may pass 100 %: cut in the table
    return {"source": "a", "target": "b", "seeds": [0, 1], "classes": ["x", "y"], "chance": 0.5,
            "validator": "dev", "config": {"lambdas": [0.1]},
            "methods": rows}


def test_rows_below_twice_chance_are_flagged():
    md = format_markdown(results_for_report())
    lines = md.splitlines()
    assert "⚠" not in next(line for line in lines if "| 1 | Target" in line)
    assert "⚠" in next(line for line in lines if "| 2 | Source only" in line)
    assert "below twice chance (100 %)" in md
    assert "| [95.0, 100.0] |" in md


def test_a_validator_is_declared_and_is_the_default():
    from udat_kernels.udat.config import TrainConfig

    assert DEFAULT_VALIDATOR in VALIDATORS and TrainConfig().select == DEFAULT_VALIDATOR
