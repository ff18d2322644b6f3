"""Shared test helpers: inputs with controlled target cosines, the closeness rule of docs/math.md
("Closeness and tolerances"), and running a loss function forward and backward against the
float64 reference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from udat_kernels import reference

# (rtol, atol) per input dtype, the lower precision of x and weight deciding (docs/math.md,
# "Closeness and tolerances").
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-2, 1e-4),
    torch.float16: (2e-3, 1e-5),
}
_PRECISION_ORDER = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def tolerance(*dtypes):
    """The tolerance of the least precise dtype among the inputs."""
    for dt in _PRECISION_ORDER:
        if dt in dtypes:
            return TOLERANCES[dt]
    raise ValueError(dtypes)


def spec_error(actual, expected, rtol, atol, what=""):
    """(error, bound) of the closeness rule: ‖a − b‖ ≤ rtol·‖b‖ + atol·sqrt(numel), with NaN
    required exactly where b is NaN."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().to(torch.float64).cpu()
    b = expected.detach().to(torch.float64).cpu()
    nan = torch.isnan(b)
    assert torch.equal(torch.isnan(a), nan), f"{what}: NaN pattern differs"
    a, b = a[~nan], b[~nan]
    err = torch.linalg.vector_norm(a - b).item()
    bound = rtol * torch.linalg.vector_norm(b).item() + atol * math.sqrt(max(b.numel(), 1))
    return err, bound


def assert_close_spec(actual, expected, rtol, atol, what="", torch_own=None):
    """The closeness rule. Where the problem itself is ill-conditioned (a softmax gradient that
    cancels over 10^4+ classes), PyTorch's own result in the same dtype misses the bound too; then
    `torch_own` (that result) allows twice its error, the second look flash-attention takes."""
    err, bound = spec_error(actual, expected, rtol, atol, what)
    if err <= bound:
        return
    if torch_own is not None:
        own, _ = spec_error(torch_own, expected, rtol, atol, what)
        if err <= 2 * own:
            return
        bound = f"{bound:.3e} and twice PyTorch's own error {2 * own:.3e}"
    else:
        bound = f"{bound:.3e}"
    raise AssertionError(f"{what}: error {err:.3e} > bound {bound} (rtol={rtol}, atol={atol})")


# Target cosines used by the random tests: |c| <= 0.95 and away from the margin's jump at
# cos(pi - m) (m = 0.5 by default) so that the exact gradient is well conditioned (docs/math.md,
# "ψ′ and its guard").
def safe_cosines(n, generator, margin=0.5, gap=0.06):
    jump = math.cos(math.pi - margin)
    c = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        while True:
            v = float(torch.rand((), generator=generator, dtype=torch.float64)) * 1.9 - 0.95
            if abs(v - jump) > gap:
                c[i] = v
                break
    return c


def make_inputs(B, D, C, *, x_dtype=torch.float32, w_dtype=torch.float32, seed=0,
                target_cos=None, margin=0.5, ignore_rows=(), device="cpu"):
    """Random (x, weight, target) with random norms. With D >= 2 the target cosines are placed
    (values away from |c| = 1 and the margin's jump by default, or the given `target_cos`)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    w = w * (0.5 + torch.rand(C, 1, generator=g, dtype=torch.float64) * 2)
    target = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    if D >= 2 and B > 0:
        w_hat = F.normalize(w, dim=1)[target]
        ortho = x - (x * w_hat).sum(1, keepdim=True) * w_hat
        ortho = F.normalize(ortho, dim=1)
        c = safe_cosines(B, g, margin) if target_cos is None else torch.as_tensor(
            target_cos, dtype=torch.float64).expand(B)
        x = c[:, None] * w_hat + (1 - c[:, None] ** 2).clamp_min(0).sqrt() * ortho
    x = x * (0.5 + torch.rand(B, 1, generator=g, dtype=torch.float64) * 3)
    for r in ignore_rows:
        target[r] = -100
    return x.to(x_dtype).to(device), w.to(w_dtype).to(device), target.to(device)


def run_loss(fn, x, weight, target, *, upstream_seed=1, bias=None, **kwargs):
    """loss, grad x, grad weight (and grad bias) of fn for a random upstream gradient."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    params = [x, weight]
    if bias is not None:
        bias = bias.detach().clone().requires_grad_()
        params.append(bias)
        kwargs["bias"] = bias
    loss = fn(x, weight, target, **kwargs)
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss)
    grads = torch.autograd.grad(loss, params, upstream, allow_unused=True)
    return (loss, *grads)


def reference_fn(angular):
    return reference.angular_margin_cross_entropy if angular else reference.linear_cross_entropy


def check_against_reference(fn, x, weight, target, *, angular=True, bias=None,
                            check_grads=True, grad_tol=None, **kwargs):
    """Run fn and the float64 reference on the same (dtype-rounded) inputs; compare everything.
    `grad_tol` overrides (rtol, atol) for the gradients."""
    rtol, atol = tolerance(x.dtype, weight.dtype)
    out = run_loss(fn, x, weight, target, bias=bias, **kwargs)
    ref_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                      and k != "grl_lambda" else v) for k, v in kwargs.items()
                  if k not in ("backend", "validate")}
    ref = run_loss(reference_fn(angular), x.double(), weight.double(), target,
                   bias=None if bias is None else bias.double(), **ref_kwargs)
    torch_own = None
    if torch.float64 not in (x.dtype, weight.dtype):
        # The same reference on the inputs as given (PyTorch's own float32 arithmetic).
        own_kwargs = {k: v for k, v in kwargs.items()
                      if k not in ("backend", "validate", "grad_tol")}
        torch_own = run_loss(reference_fn(angular), x, weight, target, bias=bias, **own_kwargs)
    names = ["loss", "grad_x", "grad_weight", "grad_bias"]
    assert out[0].dtype == (torch.float64 if torch.float64 in (x.dtype, weight.dtype)
                            else torch.float32), f"loss dtype {out[0].dtype}"
    assert out[1].dtype == x.dtype and out[2].dtype == weight.dtype
    for i, (a, b) in enumerate(zip(out, ref)):
        if i > 0 and not check_grads:
            break
        tol = grad_tol if (i > 0 and grad_tol is not None) else (rtol, atol)
        own = torch_own[i] if torch_own is not None else None
        assert_close_spec(a, b, *tol, names[i], torch_own=own)
    return out, ref


# Keyword cases of the correctness matrix: "C"/"B" become random class/sample weights, "tensor"
# a 0-dim λ on the test's device, "host" a 0-dim λ on the CPU; "_ignore" marks every third row
# with ignore_index.
KEYWORDS = {
    "default": {},
    "arcface_m0": {"margin": 0.0},
    "cosface": {"margin": 0.0, "cos_margin": 0.35},
    "both_margins": {"margin": 0.3, "cos_margin": 0.2},
    "scale30": {"scale": 30.0},
    "class_weight": {"class_weight": "C"},
    "sample_weight": {"sample_weight": "B"},
    "smoothing": {"label_smoothing": 0.1},
    "smoothing_weights": {"label_smoothing": 0.2, "class_weight": "C", "sample_weight": "B"},
    "ignore_index": {"ignore_index": 3, "_ignore": True},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "none_weighted": {"reduction": "none", "class_weight": "C", "label_smoothing": 0.05},
    "grl_float": {"grl_lambda": 0.7},
    "grl_tensor": {"grl_lambda": "tensor"},
    "grl_host_tensor": {"grl_lambda": "host"},
    "grl_none_reduction": {"grl_lambda": 0.3, "reduction": "none"},
    "straight_through": {"margin_grad": "straight_through"},
}
ANGULAR_ONLY = ("margin", "cos_margin", "scale", "margin_grad")


def materialize_keywords(case, B, C, angular, target, device="cpu"):
    """The keyword arguments of a KEYWORDS case as tensors (ignored rows set in `target`)."""
    g = torch.Generator().manual_seed(5)
    out = {}
    for k, v in case.items():
        if k == "_ignore":
            target[::3] = case.get("ignore_index", -100)
            continue
        if v == "C":
            v = (torch.rand(C, generator=g) + 0.2).to(device)
        elif v == "B":
            v = (torch.rand(B, generator=g) + 0.2).to(device)
        elif v == "tensor":
            v = torch.tensor(0.45, device=device)
        elif v == "host":
            v = torch.tensor(0.45)
        out[k] = v
    if not angular:
        for k in ANGULAR_ONLY:
            out.pop(k, None)
    return out


def cuda_kernels_unavailable() -> str | None:
    """Why the compiled CUDA kernels cannot run here (the skip reason of the device tests), or
    None when they can."""
    import udat_kernels as uk

    if not uk._C_loader.available():
        return f"extension not built: {uk._C_loader.error()}"
    if not uk._C_loader.build_info()["cuda"]:
        return "the extension was built without its CUDA sources"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None
