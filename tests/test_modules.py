"""λ schedules, gradient reversal and the nn modules (docs/math.md, "Fused gradient reversal"
and "λ schedules")."""

import math

import pytest
import torch

from udat_kernels import reference
from udat_kernels.grl import grad_reverse, reversed_linear
from udat_kernels.nn import AngularMarginLoss, DomainClassifier, GradientReversal, ReversedLinear
from udat_kernels.schedules import ConstantLambda, GaninLambda, WarmStartLambda


def close(a, b, rtol=1e-5, atol=1e-6):
    """The closeness rule of docs/math.md: ‖a − b‖ ≤ rtol·‖b‖ + atol·sqrt(numel)."""
    a, b = a.double(), b.double()
    return (a - b).norm() <= rtol * b.norm() + atol * math.sqrt(b.numel())


# --- schedules -------------------------------------------------------------------------------

def test_constant_lambda():
    assert ConstantLambda(0.3).lambda_at(0, 10) == 0.3
    assert ConstantLambda(0.3).lambda_at(999, 10) == 0.3


@pytest.mark.parametrize("step,total", [(0, 100), (10, 100), (50, 100), (100, 100)])
def test_ganin_lambda_formula(step, total):
    p = step / total
    expected = 0.7 * (2 / (1 + math.exp(-10 * p)) - 1)
    assert GaninLambda(0.7).lambda_at(step, total) == pytest.approx(expected, rel=1e-12)


def test_ganin_lambda_endpoints():
    assert GaninLambda(1.0).lambda_at(0, 50) == 0.0
    assert GaninLambda(1.0).lambda_at(50, 50) == pytest.approx(1 - 2 / (1 + math.exp(10)))
    assert GaninLambda(1.0).lambda_at(25, 50) == pytest.approx(math.tanh(2.5))


@pytest.mark.parametrize("step", [0, 1, 500, 1000, 5000])
def test_warm_start_lambda_formula(step):
    lo, hi, alpha, n = 0.1, 0.9, 2.0, 1000
    expected = 2 * (hi - lo) / (1 + math.exp(-alpha * step / n)) - (hi - lo) + lo
    got = WarmStartLambda(alpha=alpha, max_iters=n, lo=lo, hi=hi).lambda_at(step, 1)
    assert got == pytest.approx(expected, rel=1e-12)


def test_warm_start_defaults():
    s = WarmStartLambda()
    assert s.lambda_at(0, 1) == 0.0
    assert s.lambda_at(1000, 1) == pytest.approx(2 / (1 + math.exp(-1)) - 1)


@pytest.mark.parametrize("make,match", [
    (lambda: ConstantLambda(float("nan")), "value"),
    (lambda: GaninLambda(float("inf")), "lambda_max"),
    (lambda: GaninLambda(1.0, gamma="x"), "gamma"),
    (lambda: WarmStartLambda(max_iters=0), "max_iters"),
    (lambda: GaninLambda().lambda_at(-1, 10), "step"),
    (lambda: GaninLambda().lambda_at(0, 0), "total_steps"),
])
def test_schedule_bad_args(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


# --- gradient reversal -----------------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.0, 0.35, torch.tensor(0.35, dtype=torch.float64), 2.0])
def test_grad_reverse_is_minus_lambda(lam):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 3, dtype=torch.float64)
    out = grad_reverse(x, lam)
    assert torch.equal(out, x)
    (gx,) = torch.autograd.grad(out, x, g)
    assert torch.equal(gx, -float(lam) * g)


def test_gradient_reversal_module_with_schedule():
    grl = GradientReversal(GaninLambda(1.0))
    x = torch.randn(4, 6, requires_grad=True)
    lam = grl.set_progress(30, 100)
    assert grl.last_lambda is None
    grl(x).sum().backward()
    assert grl.last_lambda == lam == GaninLambda(1.0).lambda_at(30, 100)
    assert torch.allclose(x.grad, torch.full_like(x, -lam))


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5)])
@pytest.mark.parametrize("lam", [0.5, torch.tensor(1.25, dtype=torch.float64)])
def test_reversed_linear_is_minus_lambda_times_plain(shape, lam):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape[:-1], 4, dtype=torch.float64)
    out = reversed_linear(x, w, b, lam)
    plain = torch.nn.functional.linear(x, w, b)
    assert torch.allclose(out, plain)
    got = torch.autograd.grad(out, (x, w, b), g)
    ref = torch.autograd.grad(plain, (x, w, b), g)
    assert torch.allclose(got[0], -float(lam) * ref[0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(got[1], ref[1], rtol=1e-12, atol=1e-12)
    assert torch.allclose(got[2], ref[2], rtol=1e-12, atol=1e-12)


def test_reversed_linear_module_matches_linear():
    torch.manual_seed(0)
    layer = ReversedLinear(6, 3, lambda_=0.4)
    plain = torch.nn.Linear(6, 3)
    plain.load_state_dict(layer.state_dict())
    x1 = torch.randn(8, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    layer(x1).square().sum().backward()
    plain(x2).square().sum().backward()
    assert layer.last_lambda == 0.4
    assert torch.allclose(x1.grad, -0.4 * x2.grad, atol=1e-6)
    assert torch.allclose(layer.weight.grad, plain.weight.grad, atol=1e-6)


def test_reversed_linear_under_autocast():
    layer = ReversedLinear(8, 4, lambda_=1.0)
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    expected = -layer.weight.detach().sum(0).expand(3, 8)
    assert torch.allclose(x.grad, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("lam,err", [(float("nan"), ValueError), ("x", TypeError),
                                     (torch.ones(2), (ValueError, TypeError)),
                                     (None, TypeError)])
def test_bad_lambda(lam, err):
    with pytest.raises(err, match="lambda_"):
        grad_reverse(torch.ones(2), lam)
    with pytest.raises(err, match="lambda_"):
        ReversedLinear(2, 2, lam)


# --- AngularMarginLoss -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"margin": 0.0, "cos_margin": 0.35, "scale": 30.0},
                                    {"label_smoothing": 0.1, "reduction": "sum"}])
def test_angular_margin_loss_matches_reference(kwargs):
    torch.manual_seed(0)
    loss_fn = AngularMarginLoss(7, 16, **kwargs)
    x = torch.randn(9, 16, requires_grad=True)
    y = torch.randint(0, 7, (9,))
    loss = loss_fn(x, y)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    w64 = loss_fn.weight.detach().double().requires_grad_()
    ref = reference.angular_margin_cross_entropy(x64, w64, y, **kwargs)
    ref.backward()
    assert close(loss, ref)
    assert close(x.grad, x64.grad)
    assert close(loss_fn.weight.grad, w64.grad)
    scale = kwargs.get("scale", 64.0)
    assert close(loss_fn.logits(x.detach()), scale * reference.cosine_logits(x64, w64))


def test_angular_margin_loss_class_weight_buffer():
    loss_fn = AngularMarginLoss(3, 4, class_weight=[1.0, 2.0, 0.5])
    assert "class_weight" in dict(loss_fn.named_buffers())
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    ref = reference.angular_margin_cross_entropy(
        x.double(), loss_fn.weight.detach().double(), y,
        class_weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    assert close(loss_fn(x, y), ref)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"num_classes": 0}, ValueError, "num_classes"),
    ({"embedding_size": -1}, ValueError, "embedding_size"),
    ({"scale": 0.0}, ValueError, "scale"),
    ({"scale": float("inf")}, ValueError, "scale"),
    ({"margin": 4.0}, ValueError, "margin"),
    ({"cos_margin": -0.1}, ValueError, "cos_margin"),
    ({"bias": torch.zeros(3)}, TypeError, "bias"),
    ({"class_weight": [1.0, 2.0]}, ValueError, "class_weight"),
])
def test_angular_margin_loss_bad_args(kwargs, err, match):
    args = {"num_classes": 3, "embedding_size": 4, **kwargs}
    with pytest.raises(err, match=match):
        AngularMarginLoss(**args)


# --- DomainClassifier ------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["angular", "softmax"])
def test_domain_classifier_adversarial_directions(head):
    """A descent step on the features' parameters raises L_r; one on G_d's parameters lowers it."""
    torch.manual_seed(0)
    feature = torch.nn.Linear(10, 12)
    kwargs = {"margin": 0.5} if head == "angular" else {}
    dc = DomainClassifier(12, hidden=(16, 16), head=head, lambda_=1.0, **kwargs)
    x = torch.randn(32, 10) + torch.arange(32).remainder(2)[:, None] * 0.5
    d = torch.arange(32).remainder(2)

    def domain_loss():
        with torch.no_grad():
            return dc(feature(x), d).item()

    before = domain_loss()
    loss = dc(feature(x), d)
    loss.backward()
    assert dc.last_lambda == 1.0
    lr = 1e-2
    with torch.no_grad():
        for p in feature.parameters():
            p -= lr * p.grad
    assert domain_loss() > before
    with torch.no_grad():
        for p in feature.parameters():
            p += lr * p.grad
        for p in dc.parameters():
            p -= lr * p.grad
    assert domain_loss() < before


def test_domain_classifier_schedule_and_logits():
    dc = DomainClassifier(6, hidden=(8, 8), head="softmax", lambda_=GaninLambda(0.5))
    assert dc.set_progress(5, 10) == pytest.approx(GaninLambda(0.5).lambda_at(5, 10))
    f = torch.randn(4, 6)
    assert dc.logits(f).shape == (4, 2)
    h = dc.hidden_features(f)
    expected = reference.linear_cross_entropy(h.double(), dc.weight.double(),
                                              torch.tensor([0, 1, 0, 1]), bias=dc.bias.double())
    assert close(dc(f, torch.tensor([0, 1, 0, 1])), expected)


def test_domain_classifier_angular_matches_reference():
    torch.manual_seed(1)
    dc = DomainClassifier(6, hidden=(8, 8), head="angular", scale=32.0, margin=0.3)
    f, d = torch.randn(5, 6), torch.tensor([0, 1, 1, 0, 1])
    h = dc.hidden_features(f).double()
    expected = reference.angular_margin_cross_entropy(h, dc.weight.double(), d, scale=32.0,
                                                      margin=0.3)
    assert close(dc(f, d), expected)
    assert close(dc.logits(f), 32.0 * reference.cosine_logits(h, dc.weight.double()))


@pytest.mark.parametrize("kwargs,err,match", [
    ({"head": "softmax", "scale": 64.0}, TypeError, "scale"),
    ({"head": "softmax", "margin": 0.5}, TypeError, "margin"),
    ({"head": "cosine"}, ValueError, "head"),
    ({"hidden": (8,)}, ValueError, "hidden"),
    ({"hidden": (8, 0)}, ValueError, "hidden"),
    ({"in_features": 0}, ValueError, "in_features"),
    ({"scale": -1.0}, ValueError, "scale"),
    ({"margin": -0.1}, ValueError, "margin"),
    ({"lambda_": float("inf")}, ValueError, "lambda_"),
])
def test_domain_classifier_bad_args(kwargs, err, match):
    args = {"in_features": 4, "hidden": (8, 8), **kwargs}
    with pytest.raises(err, match=match):
        DomainClassifier(**args)
