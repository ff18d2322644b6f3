"""Loads the compiled extension once; `import udat_kernels` never fails when it is missing.

A missing or broken build turns into a reason that the C++ backends report when asked to serve
(see dispatch.py), instead of an ImportError at import time.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

_module = None
_error: str | None = None

try:
    from . import _C as _module  # registers torch.ops.udat_kernels.margin_ce_{fwd,bwd}
except ImportError as exc:  # not built, or built against another torch
    _error = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    return _module is not None


def error() -> str | None:
    return _error


def build_info() -> dict:
    if _module is None:
        return {"version": None, "torch": None, "cpu": False, "cuda": False, "cuda_archs": ""}
    return dict(_module.build_info())


def cpu_kernels() -> dict:
    """What the C++ CPU kernels run on this machine (row loops, bf16 GEMM, float32 GEMM)."""
    if _module is None or not hasattr(_module, "cpu_kernels"):
        return {}
    return dict(_module.cpu_kernels())
