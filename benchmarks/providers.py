"""The implementations a benchmark compares, each turned into a zero-argument step.

Names (`impl`):
  ours:<backend>   udat_kernels.angular_margin_cross_entropy / linear_cross_entropy with that
                   backend ("cpu", "cuda", "triton")
  reference        the eager reference of udat_kernels.reference (exact margin gradient)
  insightface      udat_kernels.reference.insightface_arcface (straight-through margin, in-place
                   arccos/cos under no_grad; ArcFace only)
  compile          torch.compile of the eager reference
  pml              pytorch-metric-learning's ArcFaceLoss / CosFaceLoss (optional dependency)
  torch-lce        torch's F.linear_cross_entropy, chunked path, on inputs normalized and scaled
                   beforehand: no margin, so a lower bound of what the margin costs
  liger            Liger-Kernel's fused linear cross-entropy (GPU; no margin: a lower bound)
  cce              cut-cross-entropy (GPU; no margin: a lower bound)

Every implementation gets the same inputs for a case (same seed): x (B, D), weight (C, D) and
target (B,), in the case's dtype on the case's device. The lower bounds get x̂·s and ŵ computed
before the timed region. A missing optional dependency or a backend that cannot serve raises
`Unavailable` with the reason, which the report prints.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from udat_kernels import reference

from benchmarks.harness import Case

SCALE = 64.0
ARC_MARGIN = 0.5
COS_MARGIN = 0.35
OUR_BACKENDS = ("cpu", "cuda", "triton")
BASELINES = ("reference", "insightface", "compile", "pml", "torch-lce", "liger", "cce")

DESCRIPTIONS = {
    "ours:cpu": "udat-kernels, C++ CPU backend",
    "ours:cuda": "udat-kernels, CUDA C++ backend",
    "ours:triton": "udat-kernels, Triton backend",
    "reference": "eager reference (exact margin gradient)",
    "insightface": "insightface-style eager (straight-through margin)",
    "compile": "torch.compile(reference)",
    "pml": "pytorch-metric-learning ArcFaceLoss / CosFaceLoss",
    "torch-lce": "F.linear_cross_entropy, chunked, pre-normalized (no margin: lower bound)",
    "liger": "Liger-Kernel fused linear CE (no margin: lower bound)",
    "cce": "cut-cross-entropy (no margin: lower bound)",
}


class Unavailable(Exception):
    """This implementation cannot run this case here; the message says why."""


@dataclass
class Built:
    """A ready step. `clear` drops gradients left by earlier steps (before a memory measurement);
    `graph_step` is a CUDA-graph-capturable variant (gradients accumulate in place), or None."""

    step: Callable[[], object]
    clear: Callable[[], None]
    graph_step: Callable[[], object] | None = None
    notes: dict = field(default_factory=dict)


def inputs(case: Case, seed: int = 0):
    """x (B, D), weight (C, D), target (B,) for a case, the same for every implementation."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.B, case.D, generator=gen)
    weight = torch.randn(case.C, case.D, generator=gen) * (1.0 / math.sqrt(case.D))
    target = torch.randint(0, case.C, (case.B,), generator=gen)
    dt = case.torch_dtype
    return x.to(case.device, dt), weight.to(case.device, dt), target.to(case.device)


def _angular_kwargs(case: Case) -> dict:
    if case.op == "arcface":
        return {"scale": SCALE, "margin": ARC_MARGIN}
    if case.op == "cosface":
        return {"scale": SCALE, "margin": 0.0, "cos_margin": COS_MARGIN}
    raise ValueError(f"op: unknown {case.op!r}")


def _finish(loss_fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], case: Case,
            notes: dict | None = None) -> Built:
    """Wrap `loss_fn` (reading `leaves`) into the step that the case's mode asks for."""
    on_cuda = case.device.startswith("cuda")

    def clear():
        for t in leaves:
            t.grad = None

    if case.mode == "fwd":
        def forward():
            with torch.no_grad():
                return loss_fn()
        return Built(forward, clear, forward if on_cuda else None, notes or {})

    for t in leaves:
        t.requires_grad_(True)

    def step():
        clear()
        loss = loss_fn()
        loss.backward()
        return loss

    def capturable():
        # graph capture needs the gradients allocated before capture: accumulate in place
        for t in leaves:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        loss = loss_fn()
        loss.backward()
        return loss

    return Built(step, clear, capturable if on_cuda else None, notes or {})


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------


def _ours(backend: str, case: Case, seed: int) -> Built:
    try:
        import udat_kernels
        from udat_kernels import dispatch
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"udat_kernels does not import: {e}") from e
    fn_name = "linear_cross_entropy" if case.op == "linear" else "angular_margin_cross_entropy"
    fn = getattr(udat_kernels, fn_name, None)
    if fn is None:
        raise Unavailable(f"this udat_kernels has no {fn_name}")
    x, w, t = inputs(case, seed)
    why = dispatch.get_backend(backend).reasons(x, w)
    if why:
        raise Unavailable(f"backend {backend!r} cannot serve: " + "; ".join(why))
    kwargs = {} if case.op == "linear" else _angular_kwargs(case)
    # validate=False on CUDA: the target-range check syncs the host; the inputs here are valid by
    # construction and graph capture needs a sync-free step.
    validate = not case.device.startswith("cuda")
    return _finish(lambda: fn(x, w, t, backend=backend, validate=validate, **kwargs), [x, w],
                   case)


def _reference(case: Case, seed: int) -> Built:
    x, w, t = inputs(case, seed)
    if case.op == "linear":
        return _finish(lambda: reference.linear_cross_entropy(x, w, t), [x, w], case)
    kwargs = _angular_kwargs(case)
    return _finish(lambda: reference.angular_margin_cross_entropy(x, w, t, **kwargs), [x, w], case)


def _insightface(case: Case, seed: int) -> Built:
    if case.op != "arcface":
        raise Unavailable("the insightface-style baseline is ArcFace only")
    x, w, t = inputs(case, seed)
    return _finish(lambda: reference.insightface_arcface(x, w, t, scale=SCALE, margin=ARC_MARGIN),
                   [x, w], case)


@functools.lru_cache(maxsize=None)
def _compiled(op: str):
    if op == "linear":
        return torch.compile(reference.linear_cross_entropy, dynamic=False)
    return torch.compile(reference.angular_margin_cross_entropy, dynamic=False)


def _compile(case: Case, seed: int) -> Built:
    x, w, t = inputs(case, seed)
    fn = _compiled(case.op)
    kwargs = {} if case.op == "linear" else _angular_kwargs(case)
    return _finish(lambda: fn(x, w, t, **kwargs), [x, w], case)


def _pml(case: Case, seed: int) -> Built:
    if case.op == "linear":
        raise Unavailable("pytorch-metric-learning has no plain linear cross-entropy")
    try:
        losses = importlib.import_module("pytorch_metric_learning.losses")
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"pytorch-metric-learning is not installed ({type(e).__name__})") from e
    x, w, t = inputs(case, seed)
    if case.op == "arcface":
        # pytorch-metric-learning takes the angular margin in degrees
        loss_mod = losses.ArcFaceLoss(case.C, case.D, margin=math.degrees(ARC_MARGIN), scale=SCALE)
    else:
        loss_mod = losses.CosFaceLoss(case.C, case.D, margin=COS_MARGIN, scale=SCALE)
    # its weight is (D, C): the same classes as ours, transposed
    loss_mod.W.data = w.t().contiguous()
    loss_mod.to(case.device)
    return _finish(lambda: loss_mod(x, t), [x, loss_mod.W], case)


def _torch_lce(case: Case, seed: int) -> Built:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn,
                                                                "LinearCrossEntropyOptions"):
        raise Unavailable(f"torch {torch.__version__} has no chunked F.linear_cross_entropy "
                          "(2.13 and newer)")
    x, w, t = inputs(case, seed)
    if case.op != "linear":
        x = (F.normalize(x.float(), dim=1) * SCALE).to(x.dtype)
        w = F.normalize(w.float(), dim=1).to(w.dtype)
    options = torch.nn.LinearCrossEntropyOptions()
    return _finish(lambda: F.linear_cross_entropy(x, w, t, options=options), [x, w], case)


def _liger(case: Case, seed: int) -> Built:
    if not case.device.startswith("cuda"):
        raise Unavailable("Liger-Kernel runs on CUDA tensors only")
    try:
        mod = importlib.import_module("liger_kernel.transformers")
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"Liger-Kernel is not installed ({type(e).__name__})") from e
    x, w, t = inputs(case, seed)
    if case.op != "linear":
        x = (F.normalize(x.float(), dim=1) * SCALE).to(x.dtype)
        w = F.normalize(w.float(), dim=1).to(w.dtype)
    loss_mod = mod.LigerFusedLinearCrossEntropyLoss()
    return _finish(lambda: loss_mod(w, x, t), [x, w], case)


def _cce(case: Case, seed: int) -> Built:
    if not case.device.startswith("cuda"):
        raise Unavailable("cut-cross-entropy's kernels run on CUDA tensors only")
    try:
        mod = importlib.import_module("cut_cross_entropy")
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"cut-cross-entropy is not installed ({type(e).__name__})") from e
    if case.dtype not in ("bf16", "fp16"):
        raise Unavailable("cut-cross-entropy's kernel takes bf16/fp16 inputs")
    x, w, t = inputs(case, seed)
    if case.op != "linear":
        x = (F.normalize(x.float(), dim=1) * SCALE).to(x.dtype)
        w = F.normalize(w.float(), dim=1).to(w.dtype)
    return _finish(lambda: mod.linear_cross_entropy(x, w, t), [x, w], case)


_BUILDERS = {
    "reference": _reference,
    "insightface": _insightface,
    "compile": _compile,
    "pml": _pml,
    "torch-lce": _torch_lce,
    "liger": _liger,
    "cce": _cce,
}


def build(impl: str, case: Case, *, seed: int = 0) -> Built:
    """A ready step of `impl` on `case`, or Unavailable with the reason."""
    if impl.startswith("ours:"):
        return _ours(impl.split(":", 1)[1], case, seed)
    if impl not in _BUILDERS:
        raise ValueError(f"impl: unknown implementation {impl!r}")
    return _BUILDERS[impl](case, seed)


def our_impls(device: str) -> list[str]:
    """Our backends that serve tensors of this device type (built or not: the row says why)."""
    if device.startswith("cuda"):
        return ["ours:cuda", "ours:triton"]
    return ["ours:cpu"]
