"""The one benchmark harness: timing, peak memory, isolated runs and result rows.

Every benchmark in this folder measures a *step*: a callable that runs one forward (or one forward
and backward) of one implementation on inputs made beforehand. This module times a step (warm-up,
then repeated samples of an auto-sized number of calls; median and spread), measures the extra
peak memory of one step, and runs a (case, implementation) pair in a fresh Python process on the
CPU, so that each measurement of peak RSS starts from a clean heap.

Peak memory
- CPU: peak RSS growth over the RSS just before the step. The kernel's high-water mark is reset
  (Linux /proc/self/clear_refs) and freed heap memory is returned to the OS (malloc_trim) before
  the step, and large blocks are forced to mmap, so memory freed by earlier steps cannot hide the
  step's own allocations. Elsewhere the growth of ru_maxrss is reported, which is only a lower bound.
- CUDA: torch.cuda.max_memory_allocated during the step minus the memory allocated before it.

Command line (used by report.py for isolated CPU runs):
    python -m benchmarks.harness '{"case": {...}, "impl": "reference", "budget_s": 20}'
prints one JSON result row on its last line.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# Cases and rows
# ---------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One problem: a loss head of B rows, D features and C classes.

    op: "arcface" (additive angular margin, s=64, m=0.5), "cosface" (s=64, m3=0.35) or
    "linear" (plain softmax cross-entropy of x·Wᵀ + b). mode: "fwd" (loss only, inputs without
    requires_grad) or "fwd+bwd" (loss.backward() into x and the weight).
    """

    op: str
    B: int
    D: int
    C: int
    dtype: str = "fp32"
    mode: str = "fwd+bwd"
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        return f"{self.op} B={self.B} D={self.D} C={self.C} {self.dtype} {self.mode}"

    def slug(self) -> str:
        """A test id: arcface-B64-D1024-C7-fp32-fwdbwd."""
        return (f"{self.op}-B{self.B}-D{self.D}-C{self.C}-{self.dtype}-"
                f"{self.mode.replace('+', '')}")


@dataclass
class Row:
    """One measured (case, implementation) pair; status "ok", "skipped" or "error"."""

    case: Case
    impl: str
    status: str = "ok"
    reason: str = ""
    median_s: float = math.nan
    min_s: float = math.nan
    max_s: float = math.nan
    q1_s: float = math.nan
    q3_s: float = math.nan
    samples: int = 0
    calls_per_sample: int = 0
    first_call_s: float = math.nan
    peak_mem_bytes: float = math.nan
    mem_method: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> "Row":
        d = dict(d)
        d["case"] = Case(**d["case"])
        for k, v in list(d.items()):
            if v is None and isinstance(getattr(cls, k, None), float):
                d[k] = math.nan
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    per_call_s: list[float]
    calls_per_sample: int
    first_call_s: float
    first_output: object = None

    @property
    def median(self) -> float:
        return statistics.median(self.per_call_s)

    def quartiles(self) -> tuple[float, float]:
        if len(self.per_call_s) < 2:
            return self.per_call_s[0], self.per_call_s[0]
        q = statistics.quantiles(self.per_call_s, n=4, method="inclusive")
        return q[0], q[2]


def time_step(step: Callable[[], object], *, device: str = "cpu", warmup: int = 2,
              min_samples: int = 3, max_samples: int = 15, budget_s: float = 10.0,
              min_sample_s: float = 0.02) -> Timing:
    """Time `step`: `warmup` calls, then up to `max_samples` samples within `budget_s`.

    Each sample runs `step` enough times to last at least `min_sample_s` (so microsecond steps
    are not dominated by timer resolution); the result is per call. At least `min_samples`
    samples are taken whatever the budget. The first call is timed on its own (it includes
    compilation for torch.compile); when it takes over a quarter of the budget it is the only
    warm-up call.
    """
    synchronize(device)
    t0 = time.perf_counter()
    out = step()
    synchronize(device)
    first = time.perf_counter() - t0
    est = first
    # a step slower than a quarter of the budget is warm after its first call
    for _ in range(max(warmup - 1, 0) if first < budget_s / 4 else 0):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        est = time.perf_counter() - t0
    inner = max(1, math.ceil(min_sample_s / max(est, 1e-9)))
    samples = int(max(min_samples, min(max_samples, budget_s // max(est * inner, 1e-9))))
    per_call = []
    for _ in range(samples):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            step()
        synchronize(device)
        per_call.append((time.perf_counter() - t0) / inner)
    return Timing(per_call, inner, first, out)


def time_cuda_graph(step: Callable[[], object], *, replays: int = 200,
                    samples: int = 7) -> Timing:
    """Per-step time of `step` captured once in a CUDA graph and replayed (no launch overhead).

    `step` must be capturable: no host synchronization (pass validate=False to our ops) and
    gradients accumulated into tensors that already exist (see `graph_safe_step`).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(samples):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / replays)
    return Timing(per_call, replays, math.nan)


# ---------------------------------------------------------------------------------------------
# Device ceilings (GPU): the floors that the targets are stated against
# ---------------------------------------------------------------------------------------------


def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_step(lambda: dst.copy_(src), device=device, budget_s=1.0, min_samples=5)
    return 2 * nbytes / t.median


def gemm_rate(dtype: torch.dtype = torch.bfloat16, n: int = 8192, device: str = "cuda") -> float:
    """Dense GEMM rate in flop/s for an n×n×n product in `dtype`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_step(lambda: a @ b, device=device, budget_s=1.0, min_samples=5)
    return 2 * n ** 3 / t.median


def three_gemms_time(B: int, D: int, C: int, dtype: torch.dtype, device: str = "cuda") -> float:
    """Seconds for the three GEMMs of a fused step: logits x·Wᵀ, grad x = G·W, grad W = Gᵀ·x.

    The (B, C) operand is formed in row blocks so that this runs where the full logits do not fit.
    """
    x = torch.randn(B, D, device=device).to(dtype)
    w = torch.randn(C, D, device=device).to(dtype)
    rows = max(1, min(B, (1 << 30) // max(C * torch.finfo(dtype).bits // 8, 1)))
    g = torch.empty(rows, C, device=device, dtype=dtype)
    gx = torch.empty(B, D, device=device, dtype=dtype)
    gw = torch.zeros(C, D, device=device, dtype=dtype)

    def step():
        for r0 in range(0, B, rows):
            xb = x[r0:r0 + rows]
            gb = g[: xb.shape[0]]
            torch.mm(xb, w.t(), out=gb)
            torch.mm(gb, w, out=gx[r0:r0 + rows])
            gw.addmm_(gb.t(), xb)

    return time_step(step, device=device, budget_s=2.0).median


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------

_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_rss_growth(step: Callable[[], object]) -> tuple[float, str]:
    """Bytes by which one call of `step` raises the RSS high-water mark above the RSS before it."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
    if _reset_rss_peak():
        before = _proc_status_kib("VmRSS")
        step()
        peak = _proc_status_kib("VmHWM")
        return float(peak - before) * 1024, "peak RSS growth"
    # ru_maxrss never goes down: the growth over it is a lower bound of the step's peak.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak - before) * 1024, "ru_maxrss growth (lower bound)"


def cuda_peak_growth(step: Callable[[], object]) -> tuple[float, str]:
    """Bytes of max_memory_allocated during one call of `step` over the allocated bytes before."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before), "cuda max allocated growth"


def peak_growth(step: Callable[[], object], device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        return cuda_peak_growth(step)
    return cpu_peak_rss_growth(step)


# ---------------------------------------------------------------------------------------------
# Measuring one (case, implementation) pair
# ---------------------------------------------------------------------------------------------


def measure(case: Case, impl: str, *, budget_s: float = 10.0, memory: bool = True,
            graph: bool = False, seed: int = 0) -> Row:
    """Time one implementation on one case (and its peak memory), in this process."""
    from benchmarks import providers

    row = Row(case, impl)
    try:
        built = providers.build(impl, case, seed=seed)
    except providers.Unavailable as e:
        row.status, row.reason = "skipped", str(e)
        return row
    step, clear = built.step, built.clear
    try:
        timing = time_step(step, device=case.device, budget_s=budget_s)
        row.median_s = timing.median
        row.q1_s, row.q3_s = timing.quartiles()
        row.min_s, row.max_s = min(timing.per_call_s), max(timing.per_call_s)
        row.samples, row.calls_per_sample = len(timing.per_call_s), timing.calls_per_sample
        row.first_call_s = timing.first_call_s
        if isinstance(timing.first_output, torch.Tensor) and timing.first_output.numel() == 1:
            row.extra["loss"] = float(timing.first_output.detach().float().cpu())
        if memory:
            clear()
            row.peak_mem_bytes, row.mem_method = peak_growth(step, case.device)
        if graph and case.device.startswith("cuda") and built.graph_step is not None:
            try:
                g = time_cuda_graph(built.graph_step)
                row.extra["graph_median_s"] = g.median
            except Exception as e:  # noqa: BLE001 - not every implementation is capturable
                row.extra["graph_error"] = _short(e)
        row.extra.update(built.notes)
    except torch.OutOfMemoryError as e:
        row.status, row.reason = "error", "out of memory: " + _short(e)
    except Exception as e:  # noqa: BLE001 - a failing baseline is a result, not a crash
        row.status, row.reason = "error", f"{type(e).__name__}: {_short(e)}"
    finally:
        del built, step, clear
        gc.collect()
        if case.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def measure_isolated(case: Case, impl: str, *, budget_s: float = 10.0, timeout_s: float = 300.0,
                     seed: int = 0) -> Row:
    """`measure` in a fresh Python process: peak RSS of this pair alone, nothing left behind."""
    spec = json.dumps({"case": dataclasses.asdict(case), "impl": impl, "budget_s": budget_s,
                       "seed": seed})
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", spec], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Row(case, impl, status="error", reason=f"timed out after {timeout_s:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        if proc.returncode < 0 or proc.returncode == 137:
            tail = f"killed (signal {-proc.returncode if proc.returncode < 0 else 9}); " + tail
        return Row(case, impl, status="error", reason=_short(RuntimeError(tail)))
    return Row.from_json(json.loads(lines[-1]))


def _main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    row = measure(Case(**spec["case"]), spec["impl"], budget_s=spec.get("budget_s", 10.0),
                  seed=spec.get("seed", 0))
    print(json.dumps(row.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
