"""The Triton backend: fused margin cross-entropy kernels run by Triton (docs/design.md,
"Dispatch").

Read top-down: `_common` (margin math, shared jit helpers), `small_c` (the single-pass kernel for
heads of up to 16 classes), `tiled` (tl.dot tiles, for larger heads up to 10^7 classes), `launch`
(the op bodies), `registration` (the torch.library ops); `aot` builds every kernel for a GPU
architecture without a GPU. `BACKEND` is what udat_kernels.dispatch asks whether it can serve a
call. Importing this package never fails: without Triton, BACKEND says why.
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    _IMPORT_ERROR = None
except Exception as exc:  # not installed, or no usable driver
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

if _IMPORT_ERROR is None:
    from . import launch, registration

    _REGISTER_ERROR = registration.register()
else:
    launch = None
    _REGISTER_ERROR = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend:
    """dispatch.py's Backend protocol for the Triton ops."""

    name = "triton"
    impl = "triton"

    def reasons(self, x, weight):
        why = []
        if _IMPORT_ERROR is not None:
            why.append(f"triton is not importable ({_IMPORT_ERROR})")
        elif _REGISTER_ERROR is not None:
            why.append(_REGISTER_ERROR)
        if torch.float64 in (x.dtype, weight.dtype):
            why.append("the Triton kernels take float32/float16/bfloat16, not float64 (use "
                       "backend='cpu', 'cuda' or 'reference' for float64)")
        if x.device.type == "cpu":
            if not _interpreting():
                why.append("x is on the CPU: the Triton backend serves CUDA tensors (CPU "
                           "tensors only under TRITON_INTERPRET=1)")
        elif x.device.type != "cuda":
            why.append(f"x is on {x.device.type}, the Triton backend serves CUDA tensors")
        return why

    def grad_in_forward(self, B, D, C, reduction=None):
        # Small heads are bandwidth-bound: recomputing in the backward reads x once more but
        # never writes and re-reads a saved grad x (three passes over B×D instead of four).
        # Large heads are GEMM-bound: forming the gradient in the forward saves the fourth GEMM.
        return launch is not None and not launch.use_small_c(C)


BACKEND = TritonBackend()
