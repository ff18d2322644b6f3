"""Backend selection: each backend says whether it can serve a call, and if not, why.

A backend is an object with
  name                       "reference" | "cpu" | "cuda" | "triton"
  reasons(x, weight)         list of reasons it cannot serve these tensors (empty: it can)
  grad_in_forward(B, D, C)   True to form the gradient during the forward (three GEMMs),
                             False to recompute it in the backward (see docs/design.md)
  impl                       the suffix of the op pair's names that the loss op
                             `udat_kernels::margin_ce` calls ("" for the compiled pair
                             margin_ce_fwd/_bwd; None for the reference backend)

`backend="auto"` (or the UDAT_BACKEND environment variable) takes the first backend of the
device's priority list that can serve; an explicit backend that cannot serve raises, listing why.
The reference backend is never chosen by "auto": it is only used when asked for by name.
"""

from __future__ import annotations

import os

import torch

from . import _C_loader

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


class ReferenceBackend:
    name = "reference"
    impl = None

    def reasons(self, x, weight):
        return []

    def grad_in_forward(self, B, D, C):
        return False


class CppBackend:
    """The compiled C++ ops, for the CPU or the CUDA dispatch key of the same op."""

    impl = ""

    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_type = device_type

    def reasons(self, x, weight):
        why = []
        if not _C_loader.available():
            why.append(f"the compiled extension udat_kernels._C is not importable "
                       f"({_C_loader.error()})")
        elif self.device_type == "cuda" and not _C_loader.build_info()["cuda"]:
            why.append("the extension was built without CUDA sources (CPU-only torch or "
                       "UDAT_FORCE_CPU=1)")
        if x.device.type != self.device_type:
            why.append(f"x is on {x.device.type}, the {self.name} backend serves "
                       f"{self.device_type} tensors")
        return why

    def grad_in_forward(self, B, D, C):
        if self.device_type == "cpu":
            # Three GEMMs beat four on the CPU at every size.
            return True
        # On the GPU small heads are bandwidth-bound: recomputing reads x once more but avoids
        # writing and re-reading a saved grad x (three passes over B×D instead of four).
        return C > 64


_REFERENCE = ReferenceBackend()
_CPU = CppBackend("cpu", "cpu")
_CUDA = CppBackend("cuda", "cuda")


def _triton():
    from . import triton_backend  # imported lazily: Triton is optional and slow to import

    return triton_backend.BACKEND


def get_backend(name: str):
    if name == "reference":
        return _REFERENCE
    if name == "cpu":
        return _CPU
    if name == "cuda":
        return _CUDA
    if name == "triton":
        return _triton()
    raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS}")


def _auto_order(x, weight):
    if x.device.type == "cuda":
        return [_CUDA, _triton()]
    return [_CPU]


def select(backend: str, x: torch.Tensor, weight: torch.Tensor):
    """Resolve a backend name for these tensors, or raise with every reason it cannot serve."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get("UDAT_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"backend: UDAT_BACKEND={backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        chosen = get_backend(backend)
        why = chosen.reasons(x, weight)
        if why:
            raise RuntimeError(f"backend: {backend!r} cannot serve this call: " + "; ".join(why))
        return chosen
    tried = []
    for candidate in _auto_order(x, weight):
        why = candidate.reasons(x, weight)
        if not why:
            return candidate
        tried.append(f"{candidate.name}: " + "; ".join(why))
    raise RuntimeError("backend: no fused backend can serve this call (" + " | ".join(tried)
                       + "); pass backend='reference' for the eager implementation")
