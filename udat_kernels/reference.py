"""Reference implementation of the fused losses, in plain PyTorch, straight from docs/math.md.

This is the ground truth that every backend is tested against (in float64) and the eager baseline
that benchmarks compare with. It forms the full (B, C) logits, so it is for tests and small sizes.
Autograd through it gives the gradient of docs/math.md, except that the margin's derivative is the
exact one written by hand below, so that `margin_grad="straight_through"` can be expressed too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .grl import grad_reverse

NORM_EPS = 1e-12
SIN_FLOOR = 1e-12


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (the loss dtype of docs/math.md)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def margin_psi(c: torch.Tensor, margin: float, cos_margin: float) -> torch.Tensor:
    """psi(c) (docs/math.md, "The margin ψ") on clamped cosines (no gradient attached)."""
    c = c.clamp(-1.0, 1.0)
    angular = c * math.cos(margin) - (1.0 - c * c).clamp_min(0.0).sqrt() * math.sin(margin)
    linear = c - margin * math.sin(margin)
    return torch.where(c > math.cos(math.pi - margin), angular, linear) - cos_margin


def margin_dpsi(c: torch.Tensor, margin: float, straight_through: bool) -> torch.Tensor:
    """psi'(c) (docs/math.md, "ψ′ and its guard"); ones for the straight-through gradient."""
    if straight_through:
        return torch.ones_like(c)
    c = c.clamp(-1.0, 1.0)
    angular = math.cos(margin) + c * math.sin(margin) / (1.0 - c * c).clamp_min(SIN_FLOOR).sqrt()
    return torch.where(c > math.cos(math.pi - margin), angular, torch.ones_like(c))


class _TargetMargin(torch.autograd.Function):
    """c -> psi(c) with the derivative of docs/math.md (the clamp is identity for the gradient)."""

    @staticmethod
    def forward(ctx, c, margin, cos_margin, straight_through):
        ctx.save_for_backward(c)
        ctx.margin, ctx.straight_through = margin, straight_through
        return margin_psi(c, margin, cos_margin)

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        return grad * margin_dpsi(c, ctx.margin, ctx.straight_through), None, None, None


def cosine_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """c_ij = x_i/max(|x_i|, eps) . W_j/max(|W_j|, eps), in the accumulation dtype."""
    acc = _acc_dtype(x, weight)
    x_hat = F.normalize(x.to(acc), dim=1, eps=NORM_EPS)
    w_hat = F.normalize(weight.to(acc), dim=1, eps=NORM_EPS)
    return x_hat @ w_hat.t()


def _cross_entropy_from_logits(z, target, *, class_weight, sample_weight, label_smoothing,
                               ignore_index, reduction):
    """The weighted, smoothed cross-entropy of logits z (B, C)."""
    B, C = z.shape
    acc = z.dtype
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    w = (torch.ones(C, dtype=acc, device=z.device) if class_weight is None
         else class_weight.to(acc))
    v = (torch.ones(B, dtype=acc, device=z.device) if sample_weight is None
         else sample_weight.to(acc))
    lse = torch.logsumexp(z, dim=1) if C > 0 else torch.zeros(B, dtype=acc, device=z.device)
    z_y = z.gather(1, safe_target[:, None]).squeeze(1) if B > 0 else lse
    w_y = w[safe_target]
    eps = label_smoothing
    loss = (1.0 - eps) * w_y * (lse - z_y)
    if eps != 0.0:
        loss = loss + (eps / C) * ((lse[:, None] - z) * w[None, :]).sum(1)
    zero = torch.zeros((), dtype=acc, device=z.device)
    loss = torch.where(valid, v * loss, zero)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    denom = torch.where(valid, v * w_y, zero).sum()
    return loss.sum() / denom


def angular_margin_cross_entropy(x, weight, target, *, scale=64.0, margin=0.5, cos_margin=0.0,
                                 class_weight=None, sample_weight=None, label_smoothing=0.0,
                                 ignore_index=-100, reduction="mean", grl_lambda=None,
                                 margin_grad="exact"):
    """Eager ArcFace/CosFace cross-entropy (docs/math.md) over the full (B, C) logits.

    x (B, D), weight (C, D), target (B,) int64. Returns the loss in float32 (float64 when an input
    is float64); reduction "none" gives (B,).
    """
    if grl_lambda is not None:
        x = grad_reverse(x, grl_lambda)
    c = cosine_logits(x, weight)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    if c.shape[0] > 0 and c.shape[1] > 0:
        c_y = c.gather(1, safe_target[:, None])
        psi = _TargetMargin.apply(c_y, margin, cos_margin, margin_grad == "straight_through")
        is_target = torch.zeros_like(c, dtype=torch.bool).scatter_(1, safe_target[:, None], True)
        c = torch.where(is_target, psi.expand_as(c), c)
    z = scale * c
    return _cross_entropy_from_logits(z, target, class_weight=class_weight,
                                      sample_weight=sample_weight,
                                      label_smoothing=label_smoothing, ignore_index=ignore_index,
                                      reduction=reduction)


def linear_cross_entropy(x, weight, target, *, bias=None, class_weight=None, sample_weight=None,
                         label_smoothing=0.0, ignore_index=-100, reduction="mean",
                         grl_lambda=None):
    """Eager softmax cross-entropy of x·Wᵀ + b (docs/math.md, linear head), fp32/fp64
    accumulation."""
    if grl_lambda is not None:
        x = grad_reverse(x, grl_lambda)
    acc = _acc_dtype(x, weight, *([bias] if bias is not None else []))
    z = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(acc)
    return _cross_entropy_from_logits(z, target, class_weight=class_weight,
                                      sample_weight=sample_weight,
                                      label_smoothing=label_smoothing, ignore_index=ignore_index,
                                      reduction=reduction)


def insightface_arcface(x, weight, target, *, scale=64.0, margin=0.5, ignore_index=-100):
    """The common eager ArcFace of face-recognition code bases (an insightface-style baseline).

    The margin is applied with arccos/cos in place under no_grad, so its gradient is straight
    through; no second branch, no class or sample weights. Mean reduction.
    """
    acc = _acc_dtype(x, weight)
    logits = F.linear(F.normalize(x.to(acc), eps=NORM_EPS), F.normalize(weight.to(acc), eps=NORM_EPS))
    logits = logits.clamp(-1, 1)
    index = torch.where(target != ignore_index)[0]
    with torch.no_grad():
        target_logit = logits[index, target[index]]
        logits.arccos_()
        final = target_logit.arccos() + margin  # the cos_ below takes the cosine of every logit
        logits[index, target[index]] = final
        logits.cos_()
    logits = logits * scale
    return F.cross_entropy(logits, target, ignore_index=ignore_index)
