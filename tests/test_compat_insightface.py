"""udat_kernels.compat.insightface against arcface_torch's formulas (docs/compat.md).

arcface_torch (insightface's training code) is not part of any installable package, so the
comparison here is an eager re-implementation written from its published formulas:

- ArcFace branch (m1 = 1, m3 = 0): every cosine c becomes θ = arccos c, the target's angle gets
  + m2, and all of them go back through cos — outside autograd, so the gradient with respect to
  the cosines is straight-through — then times s; no second branch past θ + m2 > π.
- CosFace branch (m3 > 0): the target cosine minus m3 (under autograd), then times s.
- Rows labelled -1 get no margin. The head feeds it cosines normalize(x)·normalize(W)ᵀ clamped to
  [-1, 1], and takes the mean cross-entropy.

Where θ + m2 ≤ π ours equals it (closeness rule of docs/math.md, "Closeness and tolerances");
beyond, ours keeps ψ decreasing in θ (docs/math.md, "The margin ψ") and the two differ.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_spec, make_inputs

from udat_kernels import angular_margin_cross_entropy, reference
from udat_kernels.compat.insightface import CombinedMarginLoss
from udat_kernels.nn import AngularMarginLoss

F32 = (1e-5, 1e-6)
ARC = (64.0, 1.0, 0.5, 0.0)
COS = (64.0, 1.0, 0.0, 0.35)


def eager_combined_margin(logits, labels, s, m1, m2, m3):
    """arcface_torch's CombinedMarginLoss.forward (ArcFace and CosFace branches), re-derived
    from its formulas; works on a copy instead of writing into `logits`."""
    labels = labels.reshape(-1)
    rows = torch.nonzero(labels != -1).squeeze(1)
    cols = labels[rows]
    out = logits.clone()
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            theta = out.arccos()
            theta[rows, cols] += m2
            out.copy_(theta.cos())
        return out * s
    if m3 > 0:
        out = out.index_put((rows, cols), out[rows, cols] - m3)
        return out * s
    raise ValueError("not a branch of arcface_torch")


def eager_head_loss(x, weight, labels, s, m1, m2, m3):
    """arcface_torch's single-device head: clamped cosines, the margin, mean cross-entropy."""
    cosines = F.linear(F.normalize(x), F.normalize(weight)).clamp(-1, 1)
    return F.cross_entropy(eager_combined_margin(cosines, labels, s, m1, m2, m3),
                           labels.reshape(-1), ignore_index=-1)


def cosine_logits(B, C, target_cos, seed=0, ignore_rows=()):
    """(B, C) cosines in (-1, 1) with the target cosines given, labels (B,) (-1 in ignore_rows)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(B, C, generator=g, dtype=torch.float64) * 1.9 - 0.95
    labels = torch.randint(0, C, (B,), generator=g)
    logits[torch.arange(B), labels] = torch.as_tensor(target_cos, dtype=torch.float64)
    for r in ignore_rows:
        labels[r] = -1
    return logits, labels


def region_cosines(n, m2, beyond=False, seed=0, gap=0.05):
    """n target cosines with θ + m2 < π (or > π when beyond), away from the jump."""
    jump = math.cos(math.pi - m2)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if beyond:
        return -0.99 + u * (jump - gap + 0.99)
    return jump + gap + u * (0.99 - jump - gap)


# ---------------------------------------------------------------------------------------------
# Constructor
# ---------------------------------------------------------------------------------------------


def test_signature_is_arcface_torch():
    params = inspect.signature(CombinedMarginLoss).parameters
    assert list(params) == ["s", "m1", "m2", "m3", "interclass_filtering_threshold"]
    assert params["interclass_filtering_threshold"].default == 0
    loss = CombinedMarginLoss(64, 1, 0.5, 0)
    assert (loss.s, loss.m1, loss.m2, loss.m3, loss.interclass_filtering_threshold) == (
        64, 1, 0.5, 0, 0)
    CombinedMarginLoss(s=30.0, m1=1.0, m2=0.0, m3=0.4, interclass_filtering_threshold=-1)


@pytest.mark.parametrize("args,name", [
    ((64, 0.9, 0.5, 0.0), "m1"),            # SphereFace's multiplicative margin
    ((64, 2.0, 0.0, 0.0), "m1"),
    ((64, 1.0, 0.3, 0.2), "m2, m3"),        # the combined margin
    ((64, 1.0, 0.0, -0.1), "m3"),
    ((64, 1.0, -0.1, 0.0), "m2"),
    ((64, 1.0, math.pi, 0.0), "m2"),
    ((0.0, 1.0, 0.5, 0.0), "s"),
    ((math.inf, 1.0, 0.5, 0.0), "s"),
])
def test_unsupported_margins_raise_naming_the_argument(args, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        CombinedMarginLoss(*args)


def test_interclass_filtering_raises_naming_it():
    with pytest.raises(ValueError, match="^interclass_filtering_threshold:"):
        CombinedMarginLoss(64, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.2)
    with pytest.raises(TypeError, match="^m2:"):
        CombinedMarginLoss(64, 1.0, "0.5", 0.0)


# ---------------------------------------------------------------------------------------------
# forward: the modified, scaled logits
# ---------------------------------------------------------------------------------------------


def _forward_and_grad(fn, logits, labels, upstream):
    logits = logits.detach().clone().requires_grad_()
    out = fn(logits, labels)
    out.backward(upstream.to(out.dtype))
    return out, logits.grad


@pytest.mark.parametrize("args", [ARC, COS, (30.0, 1.0, 1.2, 0.0), (64.0, 1.0, 0.0, 0.0)],
                         ids=["arcface", "cosface", "arcface_m1.2", "no_margin"])
@pytest.mark.parametrize("label_shape", ["(B,)", "(B, 1)"])
def test_forward_matches_arcface_torch_where_theta_plus_m2_le_pi(args, label_shape):
    B, C = 37, 23
    logits, labels = cosine_logits(B, C, region_cosines(B, args[2], seed=1), seed=1,
                                   ignore_rows=(0, 5, 17))
    if label_shape == "(B, 1)":
        labels = labels[:, None]
    upstream = torch.randn(B, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mine = CombinedMarginLoss(*args)
    x32 = logits.float()
    before = x32.clone()
    got = _forward_and_grad(mine, x32, labels, upstream)
    assert torch.equal(x32, before)  # the input is not written to
    ref = _forward_and_grad(lambda z, y: eager_combined_margin(z, y, *args), logits, labels,
                            upstream)
    own = _forward_and_grad(lambda z, y: eager_combined_margin(z, y, *args), x32, labels,
                            upstream)
    for name, a, b, o in zip(("logits", "grad"), got, ref, own):
        assert_close_spec(a, b, *F32, name, torch_own=o)
    # straight-through: the gradient is s·upstream everywhere, target entries included
    assert torch.allclose(got[1].double(), args[0] * upstream, rtol=1e-6)
    # rows labelled -1 are s·logits, untouched
    assert torch.equal(got[0][[0, 5, 17]], (x32 * args[0])[[0, 5, 17]])


def test_forward_past_theta_plus_m2_eq_pi_keeps_psi_decreasing():
    """Beyond θ + m2 = π arcface_torch's cos(θ + m2) rises again with θ; ours is
    cos θ − m2·sin m2 there (decreasing). Same gradient (straight-through) in both."""
    s, m2 = 64.0, 1.2
    B, C = 40, 9
    target = region_cosines(B, m2, beyond=True, seed=3)
    logits, labels = cosine_logits(B, C, target, seed=3)
    upstream = torch.randn(B, C, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mine = CombinedMarginLoss(s, 1.0, m2, 0.0)
    got, grad = _forward_and_grad(mine, logits, labels, upstream)
    ref, ref_grad = _forward_and_grad(lambda z, y: eager_combined_margin(z, y, s, 1.0, m2, 0.0),
                                      logits, labels, upstream)
    rows = torch.arange(B)
    theta = target.arccos()
    assert torch.allclose(got[rows, labels], s * (target - m2 * math.sin(m2)), rtol=1e-12)
    assert torch.allclose(ref[rows, labels], s * (theta + m2).cos(), rtol=1e-12)
    assert (got[rows, labels] < ref[rows, labels] - 1e-3).all()  # they really differ there
    torch.testing.assert_close(grad, ref_grad)
    # monotonic in θ across the whole range for ours, not for arcface_torch's
    c = torch.linspace(0.999, -0.999, 2001, dtype=torch.float64)[:, None]
    y = torch.zeros(c.shape[0], dtype=torch.long)
    ours_t = mine(c, y)[:, 0]
    theirs_t = eager_combined_margin(c, y, s, 1.0, m2, 0.0)[:, 0]
    assert (ours_t.diff() <= 0).all()
    assert (theirs_t.diff() > 0).any()


def test_forward_bad_labels_raise_naming_them():
    mine = CombinedMarginLoss(*ARC)
    logits = torch.rand(4, 5)
    with pytest.raises(ValueError, match="^labels:"):
        mine(logits, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="^labels:"):
        mine(logits, torch.tensor([0, 1, -2, 2]))
    with pytest.raises(ValueError, match="^labels:"):
        mine(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="^labels:"):
        mine(logits, torch.tensor([0.0, 1, 2, 3]))
    with pytest.raises(ValueError, match="^logits:"):
        mine(logits[0], torch.tensor([0]))


# ---------------------------------------------------------------------------------------------
# The fused op with arcface_torch's margins
# ---------------------------------------------------------------------------------------------


def _loss_and_grads(fn, x, w, y):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(x, w, y)
    loss.backward()
    return loss, x.grad, w.grad


@pytest.mark.parametrize("args", [ARC, COS, (30.0, 1.0, 0.3, 0.0)],
                         ids=["arcface", "cosface", "arcface_s30"])
@pytest.mark.parametrize("B,D,C", [(1, 3, 1), (6, 5, 2), (33, 16, 7), (64, 40, 515)])
def test_fused_loss_matches_arcface_torch_head(args, B, D, C):
    m2 = args[2]
    x, w, y = make_inputs(B, D, C, seed=B + C,
                          target_cos=region_cosines(B, max(m2, 1e-3), seed=B) if B else None)
    mine = CombinedMarginLoss(*args)
    got = _loss_and_grads(mine.fused_loss, x, w, y)
    ref = _loss_and_grads(lambda a, b, t: eager_head_loss(a, b, t, *args), x.double(),
                          w.double(), y)
    own = _loss_and_grads(lambda a, b, t: eager_head_loss(a, b, t, *args), x, w, y)
    for name, a, b, o in zip(("loss", "grad x", "grad weight"), got, ref, own):
        assert_close_spec(a, b, *F32, name, torch_own=o)


def test_fused_loss_is_forward_then_cross_entropy_in_both_regions():
    """Our forward and our fused path agree everywhere, past θ + m2 = π too, where both differ
    from arcface_torch's; labels of shape (B, 1) and -1 rows (ignored) accepted."""
    args = (16.0, 1.0, 1.2, 0.0)
    B, D, C = 24, 8, 5
    cos = torch.cat([region_cosines(B // 2, 1.2, seed=5), region_cosines(B // 2, 1.2, True, 6)])
    x, w, y = make_inputs(B, D, C, seed=9, target_cos=cos)
    y[3] = -1
    mine = CombinedMarginLoss(*args)

    def via_forward(a, b, t):
        cosines = reference.cosine_logits(a, b).clamp(-1, 1)
        return F.cross_entropy(mine(cosines, t), t.reshape(-1), ignore_index=-1)

    got = _loss_and_grads(mine.fused_loss, x, w, y[:, None])
    ref = _loss_and_grads(via_forward, x.double(), w.double(), y)
    for name, a, b in zip(("loss", "grad x", "grad weight"), got, ref):
        assert_close_spec(a, b, *F32, name)
    theirs = eager_head_loss(x.double(), w.double(), y, *args)
    assert abs(float(theirs) - float(ref[0].detach())) > 1e-3


def test_margin_kwargs_drive_the_op_and_the_module():
    mine = CombinedMarginLoss(*COS)
    x, w, y = make_inputs(16, 8, 11, seed=2)
    kwargs = mine.margin_kwargs()
    assert kwargs == {"scale": 64.0, "margin": 0.0, "cos_margin": 0.35,
                      "margin_grad": "straight_through"}
    head = AngularMarginLoss(11, 8, **kwargs)
    with torch.no_grad():
        head.weight.copy_(w)
    expected = angular_margin_cross_entropy(x, w, y, ignore_index=-1, **kwargs)
    torch.testing.assert_close(head(x, y), expected)
    torch.testing.assert_close(mine.fused_loss(x, w, y), expected)
    with pytest.raises(TypeError, match="^scale:"):
        mine.fused_loss(x, w, y, scale=30.0)
    with pytest.raises(ValueError, match="^label_smoothing:"):
        mine.fused_loss(x, w, y, label_smoothing=2.0)
