"""Gradient reversal (docs/math.md, "Fused gradient reversal"): the plain layer, and one fused
into a linear layer's backward GEMM.

`grad_reverse(x, λ)` is the GRL of Ganin & Lempitsky: identity forward, −λ·grad backward.
`reversed_linear(x, W, b, λ)` is x·Wᵀ + b whose input gradient is formed directly as
−λ·grad·W by the backward GEMM (alpha = −λ), so reversing costs no extra pass over the
activations; the weight and bias gradients are the ordinary ones.
"""

from __future__ import annotations

import torch

from ._validate import check_lambda

__all__ = ["grad_reverse", "reversed_linear"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        lam = ctx.lambda_
        if isinstance(lam, torch.Tensor):
            return grad * (-lam).to(device=grad.device, dtype=grad.dtype), None
        return grad * (-lam), None


def grad_reverse(x: torch.Tensor, lambda_) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by −λ in the backward pass.

    x: any shape. lambda_: a float or a 0-dim tensor (read when the backward runs, so a tensor
    may be updated in place between steps).
    """
    return _GradReverse.apply(x, check_lambda(lambda_, "lambda_"))


class _ReversedLinear(torch.autograd.Function):
    """y = x·Wᵀ + b; grad_x = −λ·grad·W in one GEMM (addmm with beta = 0, alpha = −λ)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lambda_):
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Run as autocast would run a linear layer, and keep the backward in the same dtype.
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device, enabled=False):
            out = torch.nn.functional.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.lambda_ = lambda_
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        lam = ctx.lambda_
        alpha = -(float(lam) if isinstance(lam, torch.Tensor) else lam)
        grad2 = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            out = torch.empty((grad2.shape[0], weight.shape[1]), dtype=weight.dtype,
                              device=grad.device)
            grad_x = torch.addmm(out, grad2, weight, beta=0, alpha=alpha).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad2.t().mm(x2.to(grad2.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b, None


def reversed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lambda_) -> torch.Tensor:
    """x (..., in) · weight (out, in)ᵀ + bias (out,) -> (..., out), with the input gradient
    reversed and scaled by λ inside the backward GEMM. A tensor λ is read once per backward."""
    return _ReversedLinear.apply(x, weight, bias, check_lambda(lambda_, "lambda_"))
