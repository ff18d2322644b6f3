"""Label-free validators: scores that rank a run's epochs (and the runs of a λ sweep) without
target labels. Higher is better for every score.

- `source_val`: accuracy on the held-out source validation images (ties, which are common
  on a few hundred images, go to the lower validation cross-entropy).
- `entropy`: minus the mean prediction entropy on the unlabelled target training images.
- `dev`: deep embedded validation (You et al., ICML 2019): the source validation loss weighted
  by the density ratio p_target(x) / p_source(x) of each image's pre-GRL features, estimated by
  a logistic-regression domain classifier fitted on labelled source training features against
  unlabelled target features, with the control variate of the paper; the score is minus that
  estimate of the target risk.
- `im`: information maximization — the mutual information between the unlabelled target
  training images and their predicted classes: the entropy of the mean prediction (high when
  the predictions spread over the classes) minus the mean prediction entropy (low when each
  prediction is confident); confident predictions that collapse onto a few classes score low.
- `snd`: soft neighbourhood density (Saito et al., ICCV 2021): the mean entropy of each unlabelled
  target image's softmax-similarity distribution over the other target images, computed on
  L2-normalized class probabilities with temperature 0.05.

`oracle` (target test accuracy) is not a validator: it uses the target labels, and is reported
beside the validators as the bound they are measured against.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["importance_weights", "dev_risk", "information_maximization",
           "soft_neighbourhood_density", "selection_key",
           "evenly_spaced", "SND_TEMPERATURE", "DEV_C"]

SND_TEMPERATURE = 0.05  # the paper's τ
DEV_C = 1.0  # inverse L2 strength of the logistic-regression domain classifier
_MAX_LOGIT = 50.0  # caps a density ratio at e^50: finite, and still dominating


def evenly_spaced(n: int, limit: int) -> torch.Tensor:
    """min(n, limit) indices spread evenly over range(n) (every part of a sorted file)."""
    return torch.linspace(0, n - 1, min(n, limit)).round().long() if n else torch.zeros(0).long()


def importance_weights(source_features: np.ndarray, target_features: np.ndarray,
                       val_features: np.ndarray) -> np.ndarray:
    """Density ratios p_t(x) / p_s(x) at the validation features, from a logistic-regression
    domain classifier fitted on standardized source (0) and target (1) features:
    w = (n_s / n_t) · P(t | x) / P(s | x) = (n_s / n_t) · exp(logit)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([source_features, target_features]).astype(np.float64)
    val = val_features.astype(np.float64)
    if not (np.isfinite(x).all() and np.isfinite(val).all()):
        return np.full(len(val), np.nan)  # a diverged model: no estimate
    y = np.concatenate([np.zeros(len(source_features)), np.ones(len(target_features))])
    scaler = StandardScaler().fit(x)
    with warnings.catch_warnings():
        # separable domains (no adaptation) stop at max_iter; the fit is still usable
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier = LogisticRegression(C=DEV_C, max_iter=1000).fit(scaler.transform(x), y)
    logit = classifier.decision_function(scaler.transform(val))
    return len(source_features) / len(target_features) * np.exp(np.minimum(logit, _MAX_LOGIT))


def dev_risk(losses: np.ndarray, weights: np.ndarray) -> float:
    """DEV's estimate of the target risk: mean(w·l) + η·mean(w) − η with the control variate
    η = −Cov(w·l, w) / Var(w) (η = 0 when the weights do not vary)."""
    losses, weights = np.asarray(losses, np.float64), np.asarray(weights, np.float64)
    if not (np.isfinite(losses).all() and np.isfinite(weights).all()):
        return float("nan")
    weighted = weights * losses
    if len(weights) < 2:
        return float(weighted.mean())
    cov = np.cov(weighted, weights)
    eta = -cov[0, 1] / cov[1, 1] if cov[1, 1] > 0 else 0.0
    return float(weighted.mean() + eta * weights.mean() - eta)


def information_maximization(logits: torch.Tensor) -> float:
    """IM of the predictions `logits` (N, C): H(mean p) − mean H(p), in nats."""
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    mean = p.mean(0)
    diversity = -(mean * torch.log(mean.clamp_min(1e-300))).sum()
    return float(diversity + (p * logp).sum(1).mean())


def soft_neighbourhood_density(logits: torch.Tensor,
                               temperature: float = SND_TEMPERATURE) -> float:
    """SND of the target predictions `logits` (N, C): higher means denser neighbourhoods."""
    if len(logits) < 2:
        return math.nan
    p = torch.nn.functional.normalize(torch.softmax(logits.double(), dim=1), dim=1)
    similarity = p @ p.T
    similarity.fill_diagonal_(-math.inf)  # a point is not its own neighbour
    logq = torch.log_softmax(similarity / temperature, dim=1)
    q = logq.exp()
    entropy = -(q * logq.masked_fill(q == 0, 0.0)).sum(1)
    return float(entropy.mean())


def selection_key(record: dict, name: str) -> tuple:
    """The key an epoch record is ranked by under validator `name` (or "oracle"); the largest
    key wins. A score that is not a finite number ranks last."""
    def finite(value):
        return value if value is not None and math.isfinite(value) else -math.inf

    if name == "oracle":
        return (finite(record["target_test"]["acc"]),)
    if name == "source_val":
        loss = record.get("val_loss")
        return (finite(record["val_acc"]), finite(-loss if loss is not None else None))
    return (finite(record["scores"][name]),)
