"""udat-kernels: fused angular-margin cross-entropy with gradient reversal, for PyTorch.

    loss = udat_kernels.angular_margin_cross_entropy(x, weight, target, scale=64.0, margin=0.5)

See README.md for the API and docs/design.md for how the backends fit together.
"""

from ._version import __version__
from . import _C_loader
from .ops import angular_logits, angular_margin_cross_entropy, linear_cross_entropy
from .grl import grad_reverse
from . import nn, schedules


def build_info() -> dict:
    """How this installation was built: version, torch, cpu, cuda, cuda_archs, triton."""
    info = _C_loader.build_info()
    info["version"] = __version__
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


__all__ = [
    "__version__",
    "angular_logits",
    "angular_margin_cross_entropy",
    "build_info",
    "grad_reverse",
    "linear_cross_entropy",
    "nn",
    "schedules",
]
