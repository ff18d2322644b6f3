"""λ schedules for gradient reversal (docs/math.md, "λ schedules").

A schedule is a small object with `lambda_at(step, total_steps) -> float`. Modules that hold one
(`udat_kernels.nn.GradientReversal`, `ReversedLinear`, `DomainClassifier`) are told the training
progress through `set_progress(step, total_steps)` and apply the λ it gives.
"""

from __future__ import annotations

import math

__all__ = ["Schedule", "ConstantLambda", "GaninLambda", "WarmStartLambda", "as_schedule"]


def _finite(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_progress(step, total_steps) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")


class Schedule:
    """Base class: λ as a function of the training step."""

    def lambda_at(self, step: int, total_steps: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ConstantLambda(Schedule):
    """λ fixed for the whole run."""

    def __init__(self, value: float):
        self.value = _finite("value", value)

    def lambda_at(self, step: int, total_steps: int) -> float:
        _check_progress(step, total_steps)
        return self.value


class GaninLambda(Schedule):
    """Ganin & Lempitsky's ramp: λ = λ_max·(2 / (1 + exp(−γ·p)) − 1), p = step / total_steps.

    λ starts at 0, so the domain classifier's noisy early gradient does not disturb the features,
    and approaches λ_max (≈ 0.9999·λ_max at p = 1 for γ = 10).
    """

    def __init__(self, lambda_max: float = 1.0, gamma: float = 10.0):
        self.lambda_max = _finite("lambda_max", lambda_max)
        self.gamma = _finite("gamma", gamma)

    def lambda_at(self, step: int, total_steps: int) -> float:
        _check_progress(step, total_steps)
        p = min(step / total_steps, 1.0)
        return self.lambda_max * (2.0 / (1.0 + math.exp(-self.gamma * p)) - 1.0)


class WarmStartLambda(Schedule):
    """tllib's WarmStartGradientReverseLayer coefficient:

    λ = 2·(hi − lo) / (1 + exp(−α·i / N)) − (hi − lo) + lo, i = step (total_steps is not used).
    """

    def __init__(self, alpha: float = 1.0, max_iters: int = 1000, lo: float = 0.0,
                 hi: float = 1.0):
        self.alpha = _finite("alpha", alpha)
        self.lo = _finite("lo", lo)
        self.hi = _finite("hi", hi)
        if not isinstance(max_iters, int) or max_iters <= 0:
            raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
        self.max_iters = max_iters

    def lambda_at(self, step: int, total_steps: int) -> float:
        _check_progress(step, total_steps)
        span = self.hi - self.lo
        return 2.0 * span / (1.0 + math.exp(-self.alpha * step / self.max_iters)) - span + self.lo


def as_schedule(lambda_, name: str = "lambda_") -> Schedule:
    """A schedule as given, or a ConstantLambda for a number."""
    if isinstance(lambda_, Schedule):
        return lambda_
    if isinstance(lambda_, bool) or lambda_ is None:
        raise TypeError(f"{name} must be a number or a Schedule, got {lambda_!r}")
    return ConstantLambda(_finite(name, lambda_))
