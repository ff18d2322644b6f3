"""The public fused losses: validation, backend dispatch, and the autograd of the fused ops.

Every fused backend implements the op pair of docs/design.md (`margin_ce_fwd`, `margin_ce_bwd`);
this module gives each pair its fake (meta) implementation and its autograd formula, once, through
`register_op_pair`. The C++ pair is registered here; the Triton pair by udat_kernels.triton_backend.
"""

from __future__ import annotations

import torch

from . import _C_loader, _validate, dispatch, reference

_FWD_ARGS = ("x", "weight", "target", "bias", "class_weight", "sample_weight", "grl_lambda",
             "normalize", "scale", "margin", "cos_margin", "label_smoothing", "ignore_index",
             "reduction", "straight_through", "compute_grad")
_DOUBLE_BACKWARD = (b"udat_kernels: double backward through the fused cross-entropy is not "
                    b"supported (its gradient is computed in closed form)")


def _loss_dtype(x, weight):
    return torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32


def _fwd_fake(x, weight, target, bias, class_weight, sample_weight, grl_lambda, normalize, scale,
              margin, cos_margin, label_smoothing, ignore_index, reduction, straight_through,
              compute_grad):
    torch._check(x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1],
                 lambda: "x (B, D) and weight (C, D) must share D")
    torch._check(target.dim() == 1 and target.shape[0] == x.shape[0],
                 lambda: "target must be (B,)")
    acc = _loss_dtype(x, weight)
    B = x.shape[0]
    loss = x.new_empty((B,) if reduction == 0 else (), dtype=acc)
    lse = x.new_empty((B,), dtype=acc)
    no_bias = x.new_empty((0,), dtype=acc)
    if not compute_grad:
        return (loss, lse, x.new_empty((0,)), weight.new_empty((0,)),
                bias.new_empty((0,)) if bias is not None else no_bias)
    return (loss, lse, x.new_empty(x.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else no_bias)


def _bwd_fake(grad_loss, x, weight, target, bias, class_weight, sample_weight, lse, grl_lambda,
              normalize, scale, margin, cos_margin, label_smoothing, ignore_index, reduction,
              straight_through):
    no_bias = x.new_empty((0,), dtype=_loss_dtype(x, weight))
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else no_bias)


def _once_differentiable(grads):
    """Gradients that raise a clear error if anyone differentiates them again (create_graph)."""
    if not torch.is_grad_enabled():
        return grads
    slots = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor) and g.is_floating_point()]
    if not slots:
        return grads
    err = torch._C._functions.DelayedError(_DOUBLE_BACKWARD, len(slots))
    outs = err(*[grads[i].detach().requires_grad_() for i in slots])
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = list(grads)
    for i, out in zip(slots, outs):
        grads[i] = out
    return tuple(grads)


def _save_for_loss_backward(ctx, inputs, output):
    """What the backward needs: the forward's gradients, or the inputs to recompute them."""
    args = dict(zip(_FWD_ARGS, inputs))
    _, lse, grad_x, grad_w, grad_b = output
    ctx.compute_grad = args["compute_grad"]
    ctx.has_bias = args["bias"] is not None
    ctx.scalars = tuple(args[k] for k in ("normalize", "scale", "margin", "cos_margin",
                                          "label_smoothing", "ignore_index", "reduction",
                                          "straight_through"))
    if ctx.compute_grad:
        ctx.save_for_backward(grad_x, grad_w, grad_b)
    else:
        ctx.save_for_backward(args["x"], args["weight"], args["target"], args["bias"],
                              args["class_weight"], args["sample_weight"], lse,
                              args["grl_lambda"])


def _loss_backward(ctx, bwd_op, grad_loss):
    """(grad x, grad weight, grad bias or None) for the upstream gradient of the loss."""
    if ctx.compute_grad:
        # The gradient was formed in the forward for an upstream gradient of one: rescale into
        # new tensors, leaving the saved ones as they are (retain_graph stays correct).
        gx, gw, gb = ctx.saved_tensors
        g = grad_loss.to(gx.dtype)
        grad_x, grad_w = gx * g, gw * g.to(gw.dtype)
        grad_b = gb * g.to(gb.dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b
    x, weight, target, bias, cw, sw, lse, lam = ctx.saved_tensors
    grad_x, grad_w, grad_b = bwd_op(grad_loss, x, weight, target, bias, cw, sw, lse, lam,
                                    *ctx.scalars)
    return grad_x, grad_w, (grad_b if ctx.has_bias else None)


class _FusedLoss(torch.autograd.Function):
    """The same autograd formula as the registered one, for eager calls: an autograd.Function
    costs a fraction of the registered op's Python autograd wrapper, which dominates small heads.
    (torch.compile and direct op calls use the registered formula.)"""

    @staticmethod
    def forward(ctx, fwd_op, bwd_op, *inputs):
        output = fwd_op(*inputs)
        ctx.bwd_op = bwd_op
        _save_for_loss_backward(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, grad_b = _loss_backward(ctx, ctx.bwd_op, grad_loss)
        grads = (None, None, grad_x, grad_w, None, grad_b) + (None,) * (len(_FWD_ARGS) - 4)
        return _once_differentiable(grads)


def register_op_pair(fwd_name: str, bwd_op) -> None:
    """Register fake implementations and the autograd formula of a (forward, backward) op pair.

    fwd_name: "udat_kernels::margin_ce_fwd" or another op with the same schema; bwd_op: the
    matching backward OpOverload (schema of margin_ce_bwd).
    """
    bwd_name = bwd_op.name()
    torch.library.register_fake(fwd_name)(_fwd_fake)
    torch.library.register_fake(bwd_name)(_bwd_fake)

    def setup_context(ctx, inputs, output):
        args = dict(zip(_FWD_ARGS, inputs))
        _, lse, grad_x, grad_w, grad_b = output
        # Only the loss is differentiable; without this autograd would hand backward a zero
        # (C, D) tensor for grad_w's gradient on every call.
        ctx.mark_non_differentiable(lse, grad_x, grad_w, grad_b)
        ctx.set_materialize_grads(False)
        _save_for_loss_backward(ctx, inputs, output)

    def backward(ctx, grad_loss, _grad_lse, _grad_gx, _grad_gw, _grad_gb):
        if grad_loss is None:  # grads are not materialized: nothing flows into the loss
            return (None,) * len(_FWD_ARGS)
        grad_x, grad_w, grad_b = _loss_backward(ctx, bwd_op, grad_loss)
        grads = (grad_x, grad_w, None, grad_b) + (None,) * (len(_FWD_ARGS) - 4)
        return _once_differentiable(grads)

    def backward_of_backward(ctx, *grads):
        raise RuntimeError(_DOUBLE_BACKWARD.decode())

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
    torch.library.register_autograd(bwd_name, backward_of_backward)


if _C_loader.available():
    register_op_pair("udat_kernels::margin_ce_fwd", torch.ops.udat_kernels.margin_ce_bwd.default)


def _as_lambda_tensor(grl_lambda, x, weight):
    """A float λ becomes a 0-dim tensor made on x's device (a fill, not a host copy), in the
    accumulation dtype (float64 inputs keep λ exact)."""
    if grl_lambda is None or isinstance(grl_lambda, torch.Tensor):
        return grl_lambda
    return torch.full((), float(grl_lambda), dtype=_loss_dtype(x, weight), device=x.device)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fused(x, weight, target, *, normalize, bias, class_weight, sample_weight, scale, margin,
           cos_margin, label_smoothing, ignore_index, reduction, grl_lambda, margin_grad,
           backend, validate):
    if validate:
        angular = (scale, margin, cos_margin, margin_grad) if normalize else None
        red = _validate.check_call(x, weight, target, bias=bias, class_weight=class_weight,
                                   sample_weight=sample_weight, label_smoothing=label_smoothing,
                                   ignore_index=ignore_index, reduction=reduction,
                                   grl_lambda=grl_lambda, angular=angular)
    else:
        red = _validate.reduction_code(reduction)
    chosen = dispatch.select(backend, x, weight)
    if validate:  # the CPU kernels check the targets themselves, at no extra pass
        _validate.check_data(target, weight.shape[0], ignore_index, grl_lambda,
                             targets=chosen.name != "cpu")
    if chosen.name == "reference":
        if normalize:
            return reference.angular_margin_cross_entropy(
                x, weight, target, scale=scale, margin=margin, cos_margin=cos_margin,
                class_weight=class_weight, sample_weight=sample_weight,
                label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction,
                grl_lambda=grl_lambda, margin_grad=margin_grad)
        return reference.linear_cross_entropy(
            x, weight, target, bias=bias, class_weight=class_weight, sample_weight=sample_weight,
            label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction,
            grl_lambda=grl_lambda)
    B, D = x.shape
    C = weight.shape[0]
    compute_grad = (_needs_grad(x, weight, bias) and red != 0
                    and chosen.grad_in_forward(B, D, C))
    lam = _as_lambda_tensor(grl_lambda, x, weight)
    inputs = (x, weight, target, bias, class_weight, sample_weight, lam, normalize, float(scale),
              float(margin), float(cos_margin), float(label_smoothing), int(ignore_index), red,
              margin_grad == "straight_through", compute_grad)
    if torch.compiler.is_compiling() or not _needs_grad(x, weight, bias):
        return chosen.fwd_op(*inputs)[0]
    return _FusedLoss.apply(chosen.fwd_op, chosen.bwd_op, *inputs)


def angular_margin_cross_entropy(x, weight, target, *, scale=64.0, margin=0.5, cos_margin=0.0,
                                 class_weight=None, sample_weight=None, label_smoothing=0.0,
                                 ignore_index=-100, reduction="mean", grl_lambda=None,
                                 margin_grad="exact", backend="auto", validate=True):
    """Fused ArcFace/CosFace cross-entropy over cosine logits (SPEC §2).

    Args:
        x: (B, D) features; weight: (C, D) class centres (float32/float16/bfloat16/float64,
            independently); target: (B,) int64 classes in [0, C) or ignore_index.
        scale: s; margin: additive angular margin m2 (radians, ArcFace); cos_margin: additive
            cosine margin m3 (CosFace).
        class_weight: (C,) per-class rescaling as in torch's cross_entropy; sample_weight: (B,).
        label_smoothing: ε in [0, 1). reduction: "mean" | "sum" | "none".
        grl_lambda: None, a float or a 0-dim tensor: grad x is multiplied by -λ (gradient
            reversal fused into the kernel; grad weight is never reversed).
        margin_grad: "exact" or "straight_through" (ψ' = 1, insightface's behaviour).
        backend: "auto" | "reference" | "cpu" | "triton" | "cuda".
        validate: check arguments and target range (the latter syncs on CUDA).

    Returns the loss: float32 (float64 when an input is float64); (B,) for reduction "none".
    """
    return _fused(x, weight, target, normalize=True, bias=None, class_weight=class_weight,
                  sample_weight=sample_weight, scale=scale, margin=margin, cos_margin=cos_margin,
                  label_smoothing=label_smoothing, ignore_index=ignore_index,
                  reduction=reduction, grl_lambda=grl_lambda, margin_grad=margin_grad,
                  backend=backend, validate=validate)


def linear_cross_entropy(x, weight, target, *, bias=None, class_weight=None, sample_weight=None,
                         label_smoothing=0.0, ignore_index=-100, reduction="mean",
                         grl_lambda=None, backend="auto", validate=True):
    """Fused softmax cross-entropy of the plain logits x·Wᵀ + b (SPEC §2, linear head).

    The same keywords as angular_margin_cross_entropy, plus `bias` (C,), minus the margins.
    """
    return _fused(x, weight, target, normalize=False, bias=bias, class_weight=class_weight,
                  sample_weight=sample_weight, scale=1.0, margin=0.0, cos_margin=0.0,
                  label_smoothing=label_smoothing, ignore_index=ignore_index,
                  reduction=reduction, grl_lambda=grl_lambda, margin_grad="exact",
                  backend=backend, validate=validate)


def angular_logits(x, weight, scale=64.0):
    """s · cos(x_i, W_j): (B, C) logits for prediction and verification (no margin).

    Computed in float32 (float64 when an input is float64), whatever the input dtypes.
    """
    _validate.check_features(x, weight)
    s = _validate._number("scale", scale)
    acc = _loss_dtype(x, weight)
    x_hat = torch.nn.functional.normalize(x.to(acc), dim=1, eps=reference.NORM_EPS)
    w_hat = torch.nn.functional.normalize(weight.to(acc), dim=1, eps=reference.NORM_EPS)
    return (x_hat @ w_hat.t()) * s
