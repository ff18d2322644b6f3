"""The traffic-and-launch model of the Triton backend on an H200 (docs/design.md, "Performance
model", "The Triton model").

    python -m benchmarks.model_triton            # the targets, modelled
    python -m benchmarks.model_triton --launches # and every launch of every target

Inputs, all committed: the parameters of benchmarks/model_params.py (measured ceilings, stated
assumptions; shared with the CUDA model, never tuned to these kernels), the occupancy each kernel
is designed for (udat_kernels/triton_backend/design.py, checked against the compiled code by the
aot check), and the launches the launchers plan at each target shape (plan.py: grids, and each
launch's declared bytes, flops, bytes in flight and barriers). Per launch of P programs with
design occupancy o (slots = SMs × o, waves = ceil(P / slots)):

  memory   bytes / min(stream_efficiency × HBM, bytes in flight / DRAM latency), the bytes in
           flight being min(P, slots) × each program's (Little's law: few or narrow programs
           cannot cover the latency);
  compute  flops / rate × waves × slots / P (a partly filled last wave, or fewer programs than
           slots, leaves tensor cores idle); rate = bf16 GEMM ceiling × GEMM efficiency for bf16
           dots, the fp32 FMA rate for IEEE fp32 dots;
  time     max(memory, compute) + waves × barriers × barrier cost + one graph node.

A step is the sum over its launches (torch's small kernels included); an eager step is also at
least its launches times the host's launch cost. The targets (docs/design.md) are then read off.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.model_params import H200  # noqa: E402

# The targets of the Triton backend (docs/design.md, "The Triton model").
PAPER = [(64, 1024, C, dt) for C in (2, 7) for dt in ("fp32", "bf16")]
BANDWIDTH = [(65536, 1024, C, dt) for C in (2, 7) for dt in ("fp32", "bf16")]
LARGE = [(8192, 512, C, "bf16") for C in (100_000, 1_000_000)]
PAPER_GRAPH_STEP_S = 30e-6
BANDWIDTH_FLOOR_FRACTION = 0.7
LARGE_GEMM_FRACTION = 0.5
LARGE_PEAK_FRACTION = 0.25

_ELEM = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class LaunchTime:
    kernel: str
    programs: int
    occupancy: int
    waves: int
    memory_s: float
    compute_s: float
    barrier_s: float
    node_s: float

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s) + self.barrier_s + self.node_s


def launch_time(kernel: str, grid: tuple, cost, design: dict, p=H200) -> LaunchTime:
    name = kernel.split(":")[1].lstrip("_")
    P = math.prod(grid)
    inflight_each = cost.inflight
    if kernel.startswith("torch:"):
        # torch's elementwise and reduction kernels (assumed): a grid over every SM with
        # enough bytes in flight to stream at the copy rate
        occ, P, inflight_each = 1, p["num_sms"], max(cost.inflight, 32 << 10)
    else:
        occ = design[name]
    slots = p["num_sms"] * occ
    waves = math.ceil(P / slots)
    stream = p["stream_efficiency"] * p["hbm_bytes_per_s"]
    inflight = min(P, slots) * max(inflight_each, 1.0)
    memory = cost.bytes / min(stream, inflight / p["dram_latency_s"]) if cost.bytes else 0.0
    compute = 0.0
    if cost.flops:
        rate = (p["bf16_gemm_flop_per_s"] * p["gemm_efficiency"] if cost.dot == "bf16"
                else p["fp32_gemm_flop_per_s"])
        compute = cost.flops / rate * waves * slots / P
    return LaunchTime(name if not kernel.startswith("torch:") else kernel, P, occ, waves,
                      memory, compute, waves * cost.barriers * p["barrier_s"],
                      p["graph_kernel_s"])


@dataclass
class Step:
    B: int
    D: int
    C: int
    dtype: str
    launches: list
    extra_peak_bytes: float
    logit_bytes: float

    @property
    def graph_s(self) -> float:
        """A CUDA-graph replay of the step: device time and one node per kernel."""
        return sum(t.seconds for t in self.launches)

    @property
    def eager_s(self) -> float:
        """An eager step: the device's time, or the host's launches if they take longer."""
        return max(self.graph_s, len(self.launches) * H200["eager_launch_s"])

    @property
    def bytes_per_logit(self) -> float:
        return self.logit_bytes / (self.B * self.C)

    @property
    def triton_launches(self) -> int:
        return sum(not t.kernel.startswith("torch:") for t in self.launches)


def step(B: int, D: int, C: int, dtype: str, info=None) -> Step:
    from udat_kernels.triton_backend import design, launch, plan
    from udat_kernels.triton_backend._runtime import H200 as H200_INFO
    from udat_kernels.triton_backend._runtime import Cost

    rec = plan.plan(B, D, C, dtype, info=info or H200_INFO)
    gif = not launch.use_small_c(C)
    costs = [(k, g, c) for k, g, c, _ in rec.costs]
    e = _ELEM[dtype]
    # What autograd adds around our ops (assumed; a GPU profile checks it): the seed
    # gradient's fill and, with the gradient formed in the forward, the rescaling of the saved
    # grad x and grad W into new tensors by the loss op's backward.
    costs.append(("torch:fill", (1,), Cost(bytes=4)))
    if gif:
        costs.append(("torch:mul", (1,), Cost(bytes=2 * B * D * e)))
        costs.append(("torch:mul", (1,), Cost(bytes=2 * C * D * e)))
    times = [launch_time(k, g, c, design.BLOCKS_PER_SM) for k, g, c in costs]
    logit_bytes = sum(c.logits for _, _, c in costs)
    return Step(B, D, C, dtype, times, rec.peak, logit_bytes)


# ----------------------------------------------------------------------------------------------
# the targets
# ----------------------------------------------------------------------------------------------


def three_pass_floor_s(B, D, dtype, p=H200) -> float:
    """Three passes over B×D (read x twice, write grad x once) at the measured copy rate."""
    return 3 * B * D * _ELEM[dtype] / p["hbm_bytes_per_s"]


def eager_peak_bytes(B, C) -> float:
    """The eager reference's extra peak at large C (assumed): it forms the cosines in fp32 and
    holds four B×C fp32 tensors at once (cosines, margin-substituted, scaled logits, and the
    softmax or its gradient) plus a B×C bool mask."""
    return B * C * (4 * 4 + 1)


def compile_lower_bound_s(B, D, C, p=H200) -> float:
    """torch.compile of the eager reference: at least its three fp32 GEMMs (the reference
    computes in fp32), at the fp32 FMA rate."""
    return 3 * 2 * B * C * D / p["fp32_gemm_flop_per_s"]


def targets() -> list[dict]:
    rows = []
    for B, D, C, dt in PAPER:
        s = step(B, D, C, dt)
        rows.append(dict(target="paper graph step <= 30 us", shape=(B, D, C, dt),
                         modelled=f"{s.graph_s * 1e6:.1f} us", met=s.graph_s <= PAPER_GRAPH_STEP_S,
                         launches=s.triton_launches, step=s))
    for B, D, C, dt in BANDWIDTH:
        s = step(B, D, C, dt)
        frac = three_pass_floor_s(B, D, dt) / s.eager_s
        rows.append(dict(target=">= 70% of the three-pass HBM floor", shape=(B, D, C, dt),
                         modelled=f"{frac:.0%} ({s.eager_s * 1e6:.0f} us)",
                         met=frac >= BANDWIDTH_FLOOR_FRACTION, launches=s.triton_launches,
                         step=s))
    for B, D, C, dt in LARGE:
        s = step(B, D, C, dt)
        frac = 3 * 2 * B * C * D / s.eager_s / H200["bf16_gemm_flop_per_s"]
        eager = eager_peak_bytes(B, C)
        fits = eager <= H200["hbm_bytes"]
        peak = s.extra_peak_bytes / eager
        faster = s.eager_s < compile_lower_bound_s(B, D, C)
        rows.append(dict(target=">= 50% of the bf16 GEMM rate", shape=(B, D, C, dt),
                         modelled=f"{frac:.0%} ({s.eager_s * 1e3:.2f} ms, "
                                  f"{s.bytes_per_logit:.1f} B/logit)",
                         met=frac >= LARGE_GEMM_FRACTION, launches=s.triton_launches, step=s))
        rows.append(dict(target="extra peak <= 25% of eager's (where eager fits)",
                         shape=(B, D, C, dt),
                         modelled=f"{s.extra_peak_bytes / 1e9:.2f} GB = {peak:.0%} of eager's "
                                  f"{eager / 1e9:.0f} GB" + ("" if fits else
                                                             " (eager does not fit)"),
                         met=(peak <= LARGE_PEAK_FRACTION) or not fits,
                         launches=s.triton_launches, step=s))
        rows.append(dict(target="faster than torch.compile of the eager loss",
                         shape=(B, D, C, dt),
                         modelled=f"{s.eager_s * 1e3:.2f} ms vs >= "
                                  f"{compile_lower_bound_s(B, D, C) * 1e3:.0f} ms",
                         met=faster, launches=s.triton_launches, step=s))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", action="store_true", help="print every launch of each target")
    args = p.parse_args(argv)
    print("| target | shape (B, D, C, dtype) | modelled | Triton launches | met |")
    print("|---|---|---|---:|---|")
    rows = targets()
    for r in rows:
        print(f"| {r['target']} | {r['shape']} | {r['modelled']} | {r['launches']} | "
              f"{'yes' if r['met'] else 'NO'} |")
    if args.launches:
        seen = set()
        for r in rows:
            if r["shape"] in seen:
                continue
            seen.add(r["shape"])
            print(f"\n{r['shape']}: graph {r['step'].graph_s * 1e6:.1f} us, eager "
                  f"{r['step'].eager_s * 1e6:.1f} us")
            print("| launch | programs | blocks/SM | waves | memory us | compute us | "
                  "barriers us | total us |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            merged = {}
            for t in r["step"].launches:
                m = merged.setdefault(t.kernel, [t, 0, 0.0])
                m[1] += 1
                m[2] += t.seconds
            for name, (t, n, total) in merged.items():
                print(f"| {name}{f' ×{n}' if n > 1 else ''} | {t.programs} | {t.occupancy} | "
                      f"{t.waves} | {t.memory_s * 1e6:.1f} | {t.compute_s * 1e6:.1f} | "
                      f"{t.barrier_s * 1e6:.1f} | {total * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
