"""Autograd and PyTorch integration of the fused ops: gradcheck, opcheck, torch.compile,
retain_graph, double backward, autocast, and both ways to a gradient (docs/design.md)."""

from __future__ import annotations

import pytest
import torch

import udat_kernels as uk
from helpers import assert_close_spec, check_against_reference, make_inputs, tolerance

pytestmark = pytest.mark.skipif(not uk._C_loader.available(),
                                reason=f"extension not built: {uk._C_loader.error()}")

FUNCS = {"angular": uk.angular_margin_cross_entropy, "linear": uk.linear_cross_entropy}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", list(FUNCS))
def test_gradcheck_float64(kind, reduction):
    x, w, t = make_inputs(5, 4, 3, x_dtype=torch.float64, w_dtype=torch.float64, seed=21)
    x.requires_grad_()
    w.requires_grad_()
    inputs = [x, w]
    # No grl_lambda: the reversal makes the analytic gradient differ from the numerical one.
    kwargs = dict(reduction=reduction, label_smoothing=0.1, sample_weight=torch.rand(5, dtype=torch.float64) + 0.5,
                  class_weight=torch.rand(3, dtype=torch.float64) + 0.5, backend="cpu")
    if kind == "linear":
        bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
        inputs.append(bias)
        f = lambda x, w, b: uk.linear_cross_entropy(x, w, t, bias=b, **kwargs)  # noqa: E731
    else:
        f = lambda x, w: uk.angular_margin_cross_entropy(x, w, t, scale=8.0, **kwargs)  # noqa
    assert torch.autograd.gradcheck(f, inputs)


def _sample_args(compute_grad, with_bias, lam):
    x, w, t = make_inputs(6, 5, 4, seed=22)
    t[2] = -100
    bias = torch.randn(4) if with_bias else None
    lam_t = torch.tensor(lam) if lam is not None else None
    return (x.requires_grad_(), w.requires_grad_(), t, bias, torch.rand(4) + 0.5,
            torch.rand(6) + 0.5, lam_t, not with_bias, 16.0 if not with_bias else 1.0,
            0.3 if not with_bias else 0.0, 0.1 if not with_bias else 0.0, 0.05, -100, 1,
            False, compute_grad)


@pytest.mark.parametrize("with_bias", [True, False], ids=["linear", "angular"])
def test_opcheck_loss_op(with_bias):
    """The differentiable op: autograd registration, fake, and AOT dispatch with gradients."""
    args = _sample_args(True, with_bias, 0.5)[:15] + (True, "")
    torch.library.opcheck(torch.ops.udat_kernels.margin_ce.default, args)


@pytest.mark.parametrize("compute_grad", [True, False])
@pytest.mark.parametrize("with_bias", [True, False], ids=["linear", "angular"])
def test_opcheck_forward_op(compute_grad, with_bias):
    args = _sample_args(compute_grad, with_bias, 0.5)
    args = (args[0].detach(), args[1].detach()) + args[2:]
    torch.library.opcheck(torch.ops.udat_kernels.margin_ce_fwd.default, args)


def test_op_pair_is_not_differentiable_by_itself():
    """Gradients flow through margin_ce; the pair's outputs (gradients among them) do not
    require grad, so a direct call cannot silently give a wrong gradient."""
    args = _sample_args(True, False, None)
    assert not any(out.requires_grad for out in torch.ops.udat_kernels.margin_ce_fwd(*args))


def test_loss_op_names_an_unknown_impl():
    args = _sample_args(True, False, None)[:15] + (True, "nonexistent")
    with pytest.raises(ValueError, match="impl"):
        torch.ops.udat_kernels.margin_ce(*args)


def test_opcheck_backward_op():
    x, w, t = make_inputs(6, 5, 4, seed=23)
    args = (torch.tensor(1.5), x, w, t, None, None, None, torch.randn(6), torch.tensor(0.4),
            True, 16.0, 0.3, 0.0, 0.0, -100, 1, False)
    torch.library.opcheck(torch.ops.udat_kernels.margin_ce_bwd.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static"))


@pytest.mark.parametrize("kind", list(FUNCS))
def test_torch_compile_fullgraph(kind):
    x, w, t = make_inputs(9, 7, 5, seed=24)
    f = FUNCS[kind]
    kwargs = dict(label_smoothing=0.1, grl_lambda=0.5)

    def step(x, w, t):
        return f(x, w, t, **kwargs)

    compiled = torch.compile(step, fullgraph=True)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    eager = step(xa, wa, t)
    eager.backward()
    got = compiled(xb, wb, t)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(wb.grad, wa.grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_twice(reduction):
    """Repeated backward must not be disturbed by the saved gradient (docs/math.md, "What is
    differentiable")."""
    x, w, t = make_inputs(7, 6, 4, seed=25)
    x.requires_grad_()
    w.requires_grad_()
    loss = uk.angular_margin_cross_entropy(x, w, t, reduction=reduction, grl_lambda=0.5)
    upstream = torch.full(loss.shape, 2.0)
    g1 = torch.autograd.grad(loss, [x, w], upstream, retain_graph=True)
    g2 = torch.autograd.grad(loss, [x, w], upstream * 3, retain_graph=True)
    loss.backward(upstream, retain_graph=True)
    loss.backward(upstream)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, 3 * a)
    torch.testing.assert_close(x.grad, 2 * g1[0])
    torch.testing.assert_close(w.grad, 2 * g1[1])


def test_upstream_of_one_keeps_saved_gradient_apart_from_grad():
    """loss.backward() hands the saved gradient over as is: with the graph retained, .grad must
    still be a copy (zeroing it in place must not change the next backward)."""
    x, w, t = make_inputs(7, 6, 4, seed=31)
    x.requires_grad_()
    w.requires_grad_()
    (ref_x,) = torch.autograd.grad(uk.angular_margin_cross_entropy(x, w, t), x)
    loss = uk.angular_margin_cross_entropy(x, w, t, grl_lambda=0.5)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, -0.5 * ref_x)
    x.grad.zero_()
    w.grad.mul_(3.0)
    first_w = w.grad.clone() / 3.0
    loss.backward()
    torch.testing.assert_close(x.grad, -0.5 * ref_x)
    torch.testing.assert_close(w.grad, 4.0 * first_w)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_raises(reduction):
    x, w, t = make_inputs(4, 3, 2, seed=26)
    x.requires_grad_()
    w.requires_grad_()
    loss = uk.angular_margin_cross_entropy(x, w, t, reduction=reduction).sum()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_both_gradient_paths_agree():
    """Gradient formed in the forward (three GEMMs) == recomputed in the backward op."""
    x, w, t = make_inputs(11, 9, 6, seed=27)
    for kw in ({}, {"grl_lambda": 0.3, "label_smoothing": 0.2}):
        x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
        uk.angular_margin_cross_entropy(x1, w1, t, reduction="sum", **kw).backward()
        x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
        rows = uk.angular_margin_cross_entropy(x2, w2, t, reduction="none", **kw)
        rows.backward(torch.ones_like(rows))
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(w1.grad, w2.grad)


def test_no_grad_skips_gradient_work():
    x, w, t = make_inputs(5, 4, 3, seed=28)
    with torch.no_grad():
        loss = uk.angular_margin_cross_entropy(x.requires_grad_(), w, t)
    assert loss.grad_fn is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_region(dtype):
    """Under autocast the op runs on the dtypes it is given, in fp32 arithmetic (docs/math.md,
    "Dtypes and accumulation")."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 10)
    head = torch.randn(5, 10, requires_grad=True)
    inp = torch.randn(9, 12)
    t = torch.randint(0, 5, (9,))
    with torch.autocast("cpu", dtype=dtype):
        feats = layer(inp)
        loss = uk.angular_margin_cross_entropy(feats, head, t, grl_lambda=0.5)
    assert feats.dtype == dtype and loss.dtype == torch.float32
    loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    ref = uk.reference.angular_margin_cross_entropy(feats.detach().double(), head.double(), t)
    assert_close_spec(loss, ref, *tolerance(dtype), "loss")


def test_float_and_tensor_lambda_agree():
    x, w, t = make_inputs(8, 6, 4, seed=29)
    out_f = check_against_reference(uk.angular_margin_cross_entropy, x, w, t, grl_lambda=0.25)[0]
    out_t = check_against_reference(uk.angular_margin_cross_entropy, x, w, t,
                                    grl_lambda=torch.tensor(0.25))[0]
    for a, b in zip(out_f, out_t):
        torch.testing.assert_close(a, b)


def test_grl_reverses_only_features():
    x, w, t = make_inputs(8, 6, 4, seed=30)
    plain = check_against_reference(uk.angular_margin_cross_entropy, x, w, t)[0]
    rev = check_against_reference(uk.angular_margin_cross_entropy, x, w, t, grl_lambda=0.5)[0]
    torch.testing.assert_close(rev[1], -0.5 * plain[1])
    torch.testing.assert_close(rev[2], plain[2])
