"""How every Triton kernel of this package is launched (docs/design.md, "The Triton kernels").

All launches go through `launch(kernel, grid, args, constexprs, num_warps, num_stages)`, which

- checks the grid against the CUDA limits (axis 0 < 2^31, axes 1 and 2 <= 65535): the
  interpreter has no limits, so this check is what keeps a CPU test run honest about them;
- records the launch's specialization when asked (`recording()`, or the environment variable
  UDAT_TRITON_LAUNCHES naming a JSON-lines file): the argument types and the 16-byte alignment and
  value specializations exactly as Triton's runtime computes them, the constexprs, num_warps and
  num_stages. udat_kernels.triton_backend.aot compiles exactly these for sm_90;
- in a dry run (`planning(device)`) records and does not run the kernel, so that the launchers
  can be planned at GPU sizes on meta tensors, with a stand-in for the GPU's properties.

The launchers read the device through `device_info`, which a dry run (or a test) replaces, and
run under `device_guard`, which makes the tensors' GPU the current one for the launch.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass

import torch

# CUDA's grid limits (every compute capability this package targets).
GRID_X_MAX = 2**31 - 1
GRID_YZ_MAX = 65535


@dataclass(frozen=True)
class DeviceInfo:
    """What the launchers need to know of the device they launch on."""

    gpu: bool  # compiled kernels on a CUDA device (False: the interpreter on CPU tensors)
    num_sms: int
    free_bytes: int  # free device memory now
    total_bytes: int


# The interpreter on CPU tensors: two "SMs" (so that several programs run) and memory enough.
INTERPRETER = DeviceInfo(gpu=False, num_sms=2, free_bytes=8 << 30, total_bytes=8 << 30)

# An H200 as the GPU performance model sees it (benchmarks/model_params.py: 132 SMs, 141 GB),
# with 1 GB taken: the device the launchers are planned for on the CPU.
H200 = DeviceInfo(gpu=True, num_sms=132, free_bytes=140 * 10**9, total_bytes=141 * 10**9)

_local = threading.local()


def device_info(device: torch.device) -> DeviceInfo:
    """The device's properties, or the stand-in of the dry run / test around this call."""
    stub = getattr(_local, "device", None)
    if stub is not None:
        return stub
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        return DeviceInfo(True, props.multi_processor_count, free, total)
    return INTERPRETER


@contextlib.contextmanager
def stub_device(info: DeviceInfo):
    """Make device_info return `info` in this thread (tests: free memory, SM count)."""
    old = getattr(_local, "device", None)
    _local.device = info
    try:
        yield info
    finally:
        _local.device = old


# ----------------------------------------------------------------------------------------------
# grid limits
# ----------------------------------------------------------------------------------------------


def check_grid(name: str, grid: tuple) -> tuple:
    """grid as given, or a ValueError when CUDA could not launch it."""
    if not 1 <= len(grid) <= 3 or any(int(g) < 1 for g in grid):
        raise ValueError(f"{name}: grid {grid} is empty or has more than three axes")
    if grid[0] > GRID_X_MAX or any(g > GRID_YZ_MAX for g in grid[1:]):
        raise ValueError(f"{name}: grid {grid} exceeds CUDA's limits (axis 0 < 2^31, axes 1 "
                         f"and 2 <= {GRID_YZ_MAX})")
    return grid


# ----------------------------------------------------------------------------------------------
# device guard
# ----------------------------------------------------------------------------------------------


def guard_index(device: torch.device, current: int | None) -> int | None:
    """The CUDA device to make current for a launch on `device`, or None when no switch is needed.

    Triton launches on the current device and its current stream; tensors on another GPU would
    be read through pointers that are not valid there.
    """
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else current
    return None if index == current else index


def device_guard(device: torch.device):
    """A context in which `device` (a CUDA device) is the current one; a no-op otherwise."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    index = guard_index(device, torch.cuda.current_device())
    return contextlib.nullcontext() if index is None else torch.cuda.device(index)


# ----------------------------------------------------------------------------------------------
# specializations: recording and dry runs
# ----------------------------------------------------------------------------------------------


# Integer arguments that are counts or offsets, not strides: the kernels are not specialized on
# their values (no recompilation when a count is 1 or a multiple of 16). Every launched kernel
# passes this to @triton.jit(do_not_specialize=...); the recorder follows it.
COUNTS = ("B", "C", "NC", "R", "NT", "n_denom", "row0", "ignore_index", "class_offset", "N", "P",
          "SPAN")


def _not_specialized(kernel) -> set:
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:  # the interpreter's function keeps the decorator's arguments
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    arg_names = list(kernel.arg_names)
    return {arg_names[n] if isinstance(n, int) else n for n in names}


def kernel_id(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}:{fn.__name__}"


def specialization(kernel, args: tuple, constexprs: dict, num_warps: int,
                   num_stages: int) -> dict:
    """The launch as Triton's runtime specializes it: per positional argument its type and its
    alignment / value key ("D": divisible by 16; ints equal to 1 become constexprs)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = list(kernel.arg_names)
    fixed = _not_specialized(kernel)
    sig = []
    for name, value in zip(names, args):
        ty, key = native_specialize_impl(BaseBackend, value, False, name not in fixed, True)
        if ty == "constexpr":
            sig.append([name, "constexpr", value])
        else:
            sig.append([name, ty, key])
    return {"kernel": kernel_id(kernel), "args": sig,
            "constexprs": {k: (v if isinstance(v, (bool, int, float)) or v is None else str(v))
                           for k, v in constexprs.items()},
            "num_warps": int(num_warps), "num_stages": int(num_stages)}


def spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


@dataclass(frozen=True)
class Cost:
    """What a launch moves and computes, as its launcher declares it: the input of the
    performance model (benchmarks/model_triton.py; docs/design.md, "Performance model")."""

    bytes: float = 0.0  # HBM bytes read + written by the whole launch (L2-resident data once)
    flops: float = 0.0  # flops of its dot products
    dot: str | None = None  # "bf16": tensor cores; "fp32": IEEE fp32 FMA; None: no dots
    inflight: float = 0.0  # bytes one program has in flight at once (one step's loads x stages)
    barriers: int = 0  # block-wide barriers on the longest program's path
    logits: float = 0.0  # of `bytes`, those that scale with B×C (bytes per logit)


class Recorder:
    """Distinct specializations, and every launch (kernel, grid, cost), made while active."""

    def __init__(self):
        self.specs: dict[str, dict] = {}
        self.launches: list[tuple[str, tuple]] = []  # (kernel, grid) in launch order
        self.costs: list[tuple[str, tuple, Cost, dict | None]] = []  # with spec (None: torch)
        self.allocated = 0  # bytes of the buffers the launchers noted (note_buffer)
        self.peak = 0

    def add(self, spec: dict, grid: tuple, cost: Cost) -> bool:
        self.launches.append((spec["kernel"], grid))
        self.costs.append((spec["kernel"], grid, cost, spec))
        key = spec_key(spec)
        if key in self.specs:
            return False
        self.specs[key] = spec
        return True


_recorders: list[Recorder] = []
_dry = threading.local()
_file_seen: set[str] = set()


@contextlib.contextmanager
def recording():
    """Record the launches made inside (a Recorder); the kernels still run."""
    rec = Recorder()
    _recorders.append(rec)
    try:
        yield rec
    finally:
        _recorders.remove(rec)


@contextlib.contextmanager
def planning(info: DeviceInfo):
    """A dry run: launches are recorded, not run, with `info` standing in for the device.

    Use with meta tensors to plan the launches of a GPU-size call on the CPU."""
    old = getattr(_dry, "on", False)
    _dry.on = True
    try:
        with stub_device(info), recording() as rec:
            yield rec
    finally:
        _dry.on = old


def dry_run() -> bool:
    return getattr(_dry, "on", False)


def _record_to_file(spec: dict) -> None:
    path = os.environ.get("UDAT_TRITON_LAUNCHES")
    if not path:
        return
    key = spec_key(spec)
    if key in _file_seen:
        return
    _file_seen.add(key)
    with open(path, "a") as f:
        f.write(key + "\n")


def torch_kernel(name: str, cost: Cost) -> None:
    """Note a kernel that torch launches for a launcher (a fill, a small reduction)."""
    for rec in _recorders:
        rec.costs.append((f"torch:{name}", (1,), cost, None))


def note_buffer(nbytes: float, freed: bool = False) -> None:
    """Note a large buffer a launcher allocates (or frees): the model's extra peak memory."""
    for rec in _recorders:
        rec.allocated += -nbytes if freed else nbytes
        rec.peak = max(rec.peak, rec.allocated)


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, num_warps: int,
           num_stages: int, cost: Cost = Cost()) -> None:
    """Launch `kernel` on `grid` (checked), recording its specialization where asked."""
    grid = tuple(int(g) for g in grid)
    check_grid(kernel_id(kernel), grid)
    if _recorders or os.environ.get("UDAT_TRITON_LAUNCHES"):
        spec = specialization(kernel, args, constexprs, num_warps, num_stages)
        for rec in _recorders:
            rec.add(spec, grid, cost)
        if not dry_run():
            _record_to_file(spec)
    if dry_run():
        return
    kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
