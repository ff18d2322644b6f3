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


# ---------------------------------------------------------------------------------------------
# Shard mode (docs/math.md, "Class shards"): one shard's part of the loss and of its gradient.
# A shard holds the class centres [class_offset, class_offset + C_l) of num_classes in all and
# sees every row with its global target. These are the reference of the shard mode that the
# compiled backends implement; udat_kernels.distributed combines their outputs across processes.
# ---------------------------------------------------------------------------------------------


class _ShardRows:
    """The per-row pieces that every shard forms alike from the global targets and weights
    (docs/math.md, "Class shards"): which rows count, their coefficients a_i and v_i, and the
    global b = ε/C and W = Σ_j w_j."""

    def __init__(self, target, *, num_classes, class_weight, sample_weight, label_smoothing,
                 ignore_index, dtype, device):
        B = target.shape[0]
        ignored = target == ignore_index
        in_range = (target >= 0) & (target < num_classes)
        self.valid = in_range & ~ignored
        # A target outside [0, C) that is not ignore_index: the row's loss is NaN
        # (docs/math.md, "Non-finite inputs").
        self.bad = ~in_range & ~ignored
        self.safe_target = torch.where(self.valid, target, torch.zeros_like(target))
        self.w = (torch.ones(num_classes, dtype=dtype, device=device) if class_weight is None
                  else class_weight.to(dtype))
        self.v = (torch.ones(B, dtype=dtype, device=device) if sample_weight is None
                  else sample_weight.to(dtype))
        self.eps = float(label_smoothing)
        w_y = self.w[self.safe_target] if num_classes > 0 else torch.zeros(B, dtype=dtype,
                                                                            device=device)
        self.w_y = w_y
        self.a = (1.0 - self.eps) * w_y
        self.b = self.eps / num_classes if num_classes > 0 else 0.0
        self.W = self.w.sum()

    def mask(self, values):
        """values on the valid rows, 0 on ignored rows, NaN on rows with a bad target."""
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        nan = torch.full((), float("nan"), dtype=values.dtype, device=values.device)
        return torch.where(self.valid, values, torch.where(self.bad, nan, zero))


def _shard_ownership(target, valid, class_offset, num_local):
    """(owned (B,) bool, local target (B,)): the rows whose target class this shard holds."""
    owned = valid & (target >= class_offset) & (target < class_offset + num_local)
    local = torch.where(owned, target - class_offset, torch.zeros_like(target))
    return owned, local


def _shard_centres(weight_shard, normalize, acc):
    """The class centres as the logits use them: ŵ (normalized) for the angular head, W
    itself for the linear one, in the accumulation dtype."""
    w = weight_shard.to(acc)
    return F.normalize(w, dim=1, eps=NORM_EPS) if normalize else w


def _shard_logits(x, centres, owned, local, *, normalize, scale, margin, cos_margin, bias,
                  straight_through):
    """z (rows, C_l) of one block of rows over this shard's classes, the margin applied at the
    target column only where the shard owns the row's target (docs/math.md, "Logits")."""
    acc = centres.dtype
    if not normalize:
        z = x.to(acc) @ centres.t()
        return z + bias.to(acc) if bias is not None else z
    c = F.normalize(x.to(acc), dim=1, eps=NORM_EPS) @ centres.t()
    if c.shape[0] > 0 and c.shape[1] > 0:
        c_y = c.gather(1, local[:, None])
        psi = _TargetMargin.apply(c_y, margin, cos_margin, straight_through)
        is_target = torch.zeros_like(c, dtype=torch.bool).scatter_(1, local[:, None],
                                                                   owned[:, None])
        c = torch.where(is_target, psi.expand_as(c), c)
    return scale * c


def _row_blocks(B, chunk_rows):
    step = B if not chunk_rows else int(chunk_rows)
    return [slice(i, min(i + step, B)) for i in range(0, B, max(step, 1))]


def shard_forward(x, weight_shard, target, *, class_offset, num_classes, normalize=True,
                  scale=64.0, margin=0.5, cos_margin=0.0, bias_shard=None, class_weight=None,
                  sample_weight=None, label_smoothing=0.0, ignore_index=-100,
                  straight_through=False, chunk_rows=None):
    """One shard's forward (docs/math.md, "Class shards"): per row, lse_i^(r) and q_i^(r).

    x (B, D) every row; weight_shard (C_l, D) the centres [class_offset, class_offset + C_l) of
    num_classes; target (B,) global class indices (or ignore_index); bias_shard (C_l,) (linear
    head only); class_weight the whole (C,) vector; sample_weight (B,). `normalize` picks the
    angular head (scale, margin, cos_margin, straight_through) or the linear head (bias).
    Rows are taken `chunk_rows` at a time (None: all at once), so no more than a chunk of logits
    is ever held.

    Returns (lse_local, partial), both (B,) in the loss dtype, no gradient: lse_local is the
    log-sum-exp of the row's logits over this shard's classes, margin included where the shard
    owns the target (−inf for a shard without classes); partial is
    q_i = −v_i·[a_i·z_iy·[owned] + b·Σ_{j in shard} w_j·z_ij], 0 on ignored rows and NaN on rows
    whose target is outside [0, num_classes) and not ignore_index.
    """
    acc = _acc_dtype(x, weight_shard, *([bias_shard] if bias_shard is not None else []))
    B, C_l = x.shape[0], weight_shard.shape[0]
    with torch.no_grad():
        rows = _ShardRows(target, num_classes=num_classes, class_weight=class_weight,
                          sample_weight=sample_weight, label_smoothing=label_smoothing,
                          ignore_index=ignore_index, dtype=acc, device=x.device)
        owned, local = _shard_ownership(target, rows.valid, class_offset, C_l)
        w_shard = rows.w[class_offset:class_offset + C_l]
        centres = _shard_centres(weight_shard, normalize, acc)
        lse = torch.full((B,), -math.inf, dtype=acc, device=x.device)
        partial = torch.zeros(B, dtype=acc, device=x.device)
        if C_l > 0:
            for rs in _row_blocks(B, chunk_rows):
                z = _shard_logits(x[rs], centres, owned[rs], local[rs], normalize=normalize,
                                  scale=scale, margin=margin, cos_margin=cos_margin,
                                  bias=bias_shard, straight_through=straight_through)
                lse[rs] = torch.logsumexp(z, dim=1)
                z_y = z.gather(1, local[rs, None]).squeeze(1)
                q = torch.where(owned[rs], rows.a[rs] * z_y, torch.zeros_like(z_y))
                if rows.eps != 0.0:
                    q = q + rows.b * (z * w_shard[None, :]).sum(1)
                partial[rs] = -rows.v[rs] * q
        partial = rows.mask(partial)
    return lse, partial


def shard_combine(lse_parts, partial_parts, target, *, num_classes, class_weight=None,
                  sample_weight=None, label_smoothing=0.0, ignore_index=-100):
    """The rows' loss from every shard's forward (docs/math.md, "Class shards").

    lse_parts, partial_parts: (S, B), shard by shard (the order of the shards does not change
    the result beyond rounding). Returns (loss_rows (B,), lse (B,)):
    lse_i = log Σ_r exp(lse_i^(r)) and loss_i = v_i·(a_i + b·W)·lse_i + Σ_r q_i^(r), 0 on ignored
    rows and NaN on rows with a bad target — the per-row loss of the whole problem (reduction
    none).
    """
    lse = torch.logsumexp(lse_parts, dim=0)
    rows = _ShardRows(target, num_classes=num_classes, class_weight=class_weight,
                      sample_weight=sample_weight, label_smoothing=label_smoothing,
                      ignore_index=ignore_index, dtype=lse.dtype, device=lse.device)
    coef = rows.v * (rows.a + rows.b * rows.W)
    return rows.mask(coef * lse + partial_parts.sum(0)), lse


def shard_mean_denominator(target, *, num_classes, class_weight=None, sample_weight=None,
                           ignore_index=-100, dtype=torch.float32):
    """Σ_i v_i·w_{y_i} over the rows not ignored: what reduction "mean" divides by
    (docs/math.md, "Cross-entropy"), formed from the global targets alone."""
    rows = _ShardRows(target, num_classes=num_classes, class_weight=class_weight,
                      sample_weight=sample_weight, label_smoothing=0.0,
                      ignore_index=ignore_index, dtype=dtype, device=target.device)
    counted = target != ignore_index
    return torch.where(counted, rows.v * rows.w_y, torch.zeros_like(rows.v)).sum()


def shard_reduce(loss_rows, reduction, denominator=None):
    """The reduction of the combined rows: none, sum, or mean (loss_rows.sum() / denominator,
    NaN when the denominator is 0, as torch gives)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / denominator


def shard_grad_rows(grad_loss, B, reduction, denominator=None):
    """The upstream gradient of each row's loss, ∂L/∂loss_i (B,), from the gradient of the
    reduced loss: itself for none, broadcast for sum, divided by the denominator for mean."""
    if reduction == "none":
        return grad_loss
    g = grad_loss if reduction == "sum" else grad_loss / denominator
    return g.expand(B)


def shard_backward(grad_rows, x, weight_shard, target, lse, *, class_offset, num_classes,
                   normalize=True, scale=64.0, margin=0.5, cos_margin=0.0, bias_shard=None,
                   class_weight=None, sample_weight=None, label_smoothing=0.0,
                   ignore_index=-100, straight_through=False, grl_lambda=None,
                   chunk_rows=None):
    """One shard's backward (docs/math.md, "Class shards" and "The gradient").

    grad_rows (B,): ∂L/∂loss_i, the upstream of each row's loss (the mean's denominator already
    applied; the sample weight v_i is applied here); lse (B,): the combined log-sum-exp of every
    row over all classes. The other arguments as in `shard_forward`.

    With p_ij = exp(z_ij − lse_i) and k_i = v_i·grad_rows_i, this shard's logit gradient is
    δ_ij = k_i·[p_ij·(a_i + b·W) − a_i·[j = y_i, owned] − b·w_j] (0 on ignored rows, NaN on rows
    with a bad target), taken back through the margin, the normalization (angular head) or the
    linear map. Returns (grad_x_part (B, D) in the loss dtype — this shard's part of grad x,
    summed over the shards by the caller, already multiplied by −λ when grl_lambda is given —,
    grad_weight_shard (C_l, D) in weight's dtype, grad_bias_shard (C_l,) in bias's dtype or
    None without a bias).
    """
    acc = _acc_dtype(x, weight_shard, *([bias_shard] if bias_shard is not None else []))
    B, D = x.shape
    C_l = weight_shard.shape[0]
    grad_x = torch.zeros(B, D, dtype=acc, device=x.device)
    grad_centres = torch.zeros(C_l, D, dtype=acc, device=x.device)
    grad_bias = (torch.zeros(C_l, dtype=acc, device=x.device) if bias_shard is not None
                 else None)
    with torch.enable_grad():
        weight_acc = weight_shard.detach().to(acc).requires_grad_(normalize)
        centres = _shard_centres(weight_acc, normalize, acc)
        # The blocks differentiate into the centres as used (ŵ or W); the normalization of W is
        # differentiated once at the end.
        centres_leaf = centres.detach().requires_grad_()
        bias_leaf = (bias_shard.detach().to(acc).requires_grad_() if bias_shard is not None
                     else None)
        with torch.no_grad():
            rows = _ShardRows(target, num_classes=num_classes, class_weight=class_weight,
                              sample_weight=sample_weight, label_smoothing=label_smoothing,
                              ignore_index=ignore_index, dtype=acc, device=x.device)
            owned, local = _shard_ownership(target, rows.valid, class_offset, C_l)
            w_shard = rows.w[class_offset:class_offset + C_l]
            # k_i = v_i·∂L/∂loss_i: 0 on ignored rows, NaN on rows with a bad target.
            k = rows.mask(rows.v * grad_rows.to(acc))
            coef = rows.a + rows.b * rows.W
        for rs in _row_blocks(B, chunk_rows) if C_l > 0 else []:
            x_block = x[rs].detach().to(acc).requires_grad_()
            z = _shard_logits(x_block, centres_leaf, owned[rs], local[rs], normalize=normalize,
                              scale=scale, margin=margin, cos_margin=cos_margin, bias=bias_leaf,
                              straight_through=straight_through)
            with torch.no_grad():
                p = torch.exp(z - lse[rs, None].to(acc))
                delta = p * coef[rs, None]
                if rows.eps != 0.0:
                    delta = delta - rows.b * w_shard[None, :]
                target_term = torch.where(owned[rs], rows.a[rs], torch.zeros_like(coef[rs]))
                delta.scatter_add_(1, local[rs, None], -target_term[:, None])
                # Ignored rows give exactly 0, even where their logits are not finite.
                delta = torch.where(rows.valid[rs, None] | rows.bad[rs, None],
                                    k[rs, None] * delta, torch.zeros_like(delta))
            inputs = [x_block, centres_leaf] + ([bias_leaf] if bias_leaf is not None else [])
            grads = torch.autograd.grad(z, inputs, delta)
            grad_x[rs] = grads[0]
            grad_centres += grads[1]
            if bias_leaf is not None:
                grad_bias += grads[2]
        if normalize:
            (grad_weight,) = torch.autograd.grad(centres, weight_acc, grad_centres)
        else:
            grad_weight = grad_centres
    if grl_lambda is not None:
        lam = grl_lambda.to(device=x.device, dtype=acc) if isinstance(grl_lambda, torch.Tensor) \
            else float(grl_lambda)
        grad_x = grad_x * (-lam)
    return (grad_x, grad_weight.to(weight_shard.dtype),
            grad_bias.to(bias_shard.dtype) if grad_bias is not None else None)
