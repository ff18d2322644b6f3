"""The Triton op pair as torch.library ops, with the C++ ops' schema under new names.

`udat_kernels::margin_ce_fwd_triton` and `udat_kernels::margin_ce_bwd_triton` take their schema
from the compiled `margin_ce_fwd` / `margin_ce_bwd`, so the two backends cannot drift apart; their
fake implementations come from udat_kernels.ops.register_fakes, and their autograd formula is the
loss op `udat_kernels::margin_ce` (impl "triton"), shared with the C++ pair. The kernels are
registered for CUDA, and for CPU when TRITON_INTERPRET=1 (the interpreter runs them on CPU
tensors). The shard mode's pair, `margin_ce_shard_fwd_triton` / `margin_ce_shard_bwd_triton`,
takes the schema of `margin_ce_shard_fwd` / `margin_ce_shard_bwd` alike, with the fakes of
udat_kernels.ops.register_shard_fakes (docs/design.md, "Shard mode").
"""

from __future__ import annotations

import torch

from .. import _C_loader
from .. import ops as _ops
from . import launch
from ._common import interpreting

FWD_NAME = "margin_ce_fwd_triton"
BWD_NAME = "margin_ce_bwd_triton"
SHARD_FWD_NAME = "margin_ce_shard_fwd_triton"
SHARD_BWD_NAME = "margin_ce_shard_bwd_triton"

_lib = None


def _renamed_schema(op, new_name: str) -> str:
    schema = str(op._schema)  # "udat_kernels::margin_ce_fwd(Tensor x, ...) -> (...)"
    args = schema[schema.index("("):]
    return new_name + args


def _registered() -> bool:
    return hasattr(torch.ops.udat_kernels, FWD_NAME)


def register() -> str | None:
    """Define and implement the Triton ops once; returns why they could not be, or None."""
    global _lib
    if _lib is not None or _registered():
        return None
    if not _C_loader.available():
        return (f"the Triton ops take their schema from the compiled extension, which is not "
                f"importable ({_C_loader.error()})")
    cpp = torch.ops.udat_kernels
    lib = torch.library.Library("udat_kernels", "FRAGMENT")
    lib.define(_renamed_schema(cpp.margin_ce_fwd.default, FWD_NAME))
    lib.define(_renamed_schema(cpp.margin_ce_bwd.default, BWD_NAME))
    kernels = {FWD_NAME: launch.margin_ce_fwd, BWD_NAME: launch.margin_ce_bwd}
    shard = hasattr(cpp, "margin_ce_shard_fwd")  # absent from an older build of the extension
    if shard:
        lib.define(_renamed_schema(cpp.margin_ce_shard_fwd.default, SHARD_FWD_NAME))
        lib.define(_renamed_schema(cpp.margin_ce_shard_bwd.default, SHARD_BWD_NAME))
        kernels.update({SHARD_FWD_NAME: launch.margin_ce_shard_fwd,
                        SHARD_BWD_NAME: launch.margin_ce_shard_bwd})
    keys = ["CUDA"] + (["CPU"] if interpreting() else [])
    for key in keys:
        for name, fn in kernels.items():
            lib.impl(name, fn, key)
    # Not differentiable by themselves: the ordinary pair through margin_ce, the shard pair
    # through the sharded loss (udat_kernels/distributed/loss.py).
    for name in kernels:
        lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
    _lib = lib
    _ops.register_fakes(f"udat_kernels::{FWD_NAME}", f"udat_kernels::{BWD_NAME}")
    if shard:
        _ops.register_shard_fakes(f"udat_kernels::{SHARD_FWD_NAME}",
                                  f"udat_kernels::{SHARD_BWD_NAME}")
    return None
