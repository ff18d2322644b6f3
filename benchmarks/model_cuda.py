"""A traffic-and-launch model of the CUDA backend (docs/design.md, "Performance model").

For each path of each design it counts the bytes moved, the GEMM FLOPs, the launches and the
blocks (waves per SM), and turns them into the time they predict on an H200 for each GPU target,
from the parameters of benchmarks/model_params.py and the design occupancy of
benchmarks/cuda_design_occupancy.json. Neither is tuned to the kernels: a model whose parameters
follow the kernels predicts nothing.

    python -m benchmarks.model_cuda                     # every design's targets
    python -m benchmarks.model_cuda --design current    # one design
    python -m benchmarks.model_cuda --json              # the same as JSON (gpu_cuda.py reads it)

How time is counted:
  streaming    bytes / (copy bandwidth x stream efficiency), the efficiency scaled down when the
               bytes in flight per SM (from the design occupancy) do not cover the DRAM latency;
  GEMM         max(2MNK / (rate x GEMM efficiency), operand and result bytes / copy bandwidth);
  few SMs      a block's own work on one SM: DRAM round trips, barriers, and its bytes at one
               SM's load rate (the paper batch, and the last block's reduction of partials);
  launches     each kernel costs one graph node (launch and drain) on the device; eager steps add
               nothing on the host side as long as the device is the slower of the two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.model_params import H200 as P  # noqa: E402

with open(os.path.join(ROOT, "benchmarks", "cuda_design_occupancy.json")) as _fh:
    OCC = json.load(_fh)["kernels"]

ELEM = {"fp32": 4, "bf16": 2, "fp16": 2}
HBM = P["hbm_bytes_per_s"]
SMS = P["num_sms"]
SM_BW = P["sm_bytes_per_s"]
LAT = P["dram_latency_s"]
BAR = P["barrier_s"]
NODE = P["graph_kernel_s"]
# bytes in flight per SM that cover one DRAM round trip at the copy bandwidth (Little's law)
NEEDED_IN_FLIGHT = HBM / SMS * LAT


def stream_s(nbytes: float, in_flight_per_sm: float | None = None) -> float:
    eff = P["stream_efficiency"]
    if in_flight_per_sm is not None:
        eff *= min(1.0, in_flight_per_sm / NEEDED_IN_FLIGHT)
    return nbytes / (HBM * eff)


def gemm_s(M: int, N: int, K: int, in_elem: int, out_elem: int, beta: bool = False,
           fp32: bool = False) -> float:
    """A GEMM (M×K)·(K×N): compute or memory bound, whichever is slower."""
    rate = P["fp32_gemm_flop_per_s"] if fp32 else P["bf16_gemm_flop_per_s"] * P["gemm_efficiency"]
    nbytes = (M * K + K * N) * in_elem + M * N * out_elem * (2 if beta else 1)
    return max(2.0 * M * N * K / rate, nbytes / HBM)


@dataclass
class Estimate:
    """What one forward + backward step of a path costs, in the model."""

    time_s: float = 0.0
    launches: int = 0
    max_blocks: int = 0     # the largest grid of the step's kernels
    hbm_bytes: float = 0.0  # bytes through HBM (streaming kernels and GEMM operands)
    gemm_flops: float = 0.0
    extra_bytes: float = 0.0  # extra peak memory (large C)
    parts: dict = field(default_factory=dict)  # seconds by part, for the report

    def add(self, name: str, seconds: float, launches: int = 0, blocks: int = 0,
            nbytes: float = 0.0, flops: float = 0.0) -> None:
        self.time_s += seconds
        self.launches += launches
        self.max_blocks = max(self.max_blocks, blocks)
        self.hbm_bytes += nbytes
        self.gemm_flops += flops
        self.parts[name] = self.parts.get(name, 0.0) + seconds


# ---------------------------------------------------------------------------------------------
# Small C: the fused kernel (csrc/cuda/small_c_kernels.cuh)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmallDesign:
    name: str
    rows_per_warp: dict        # NC -> rows a warp takes in phase 1
    single_block_rows: int     # up to this batch one block does everything
    small_batch_tile: int      # rows a block takes when the batch is small (0: a full tile)
    finalize: str              # "kernel": separate kernels; "last_block": counters, in-kernel
    fan_in: int                # last-block-done: partials a reducer adds (hierarchical above)
    divisor_in_block_rows: int  # mean backward: each block sums the divisor itself up to this B
    even_shares: bool = False  # blocks take even shares of the batch (else whole tiles in turn)


CURRENT_SMALL = SmallDesign("current", rows_per_warp={2: 4, 8: 2}, single_block_rows=128,
                            small_batch_tile=0, finalize="kernel", fan_in=0,
                            divisor_in_block_rows=128)
# One launch a pass at any batch: a small batch spread in blocks of 8 rows, partials reduced by a
# tree of last-block-done counters inside the kernel, the mean's divisor summed by every block up
# to 4096 rows (csrc/cuda/small_c_kernels.cuh).
REDESIGN_SMALL = SmallDesign("redesign", rows_per_warp={2: 4, 8: 2}, single_block_rows=0,
                             small_batch_tile=8, finalize="last_block", fan_in=16,
                             divisor_in_block_rows=4096, even_shares=True)


def _nc(C: int) -> int:
    return 2 if C <= 2 else 8


def small_c_kernel(est: Estimate, d: SmallDesign, B: int, D: int, C: int, dtype: str,
                   backward: bool, mean: bool) -> None:
    """One launch of the fused kernel (a forward or a backward pass) and what goes with it."""
    e = ELEM[dtype]
    NC, R = _nc(C), d.rows_per_warp[_nc(C)]
    warps = OCC["small_c_kernel"]["threads"] // 32
    per_sm = OCC["small_c_kernel"]["blocks_per_sm"]
    tile = warps * R
    if d.small_batch_tile:  # spread a small batch: tiles of at least small_batch_tile rows
        spread = max(d.small_batch_tile, math.ceil(B / (per_sm * SMS)))
        tile = min(tile, math.ceil(spread / R) * R)
    tiles = math.ceil(B / tile)
    single = B <= d.single_block_rows and d.finalize == "kernel"
    grid = 1 if single else min(tiles, per_sm * SMS)
    if d.even_shares:  # each block an even share of the rows, tiled
        rows_per_block = math.ceil(B / grid)
        tiles_per_block = math.ceil(rows_per_block / tile)
        wave = 1.0
    else:
        tiles_per_block = math.ceil(tiles / grid)
        rows_per_block = min(B, tiles_per_block * tile)
        wave = tiles_per_block * grid / tiles
    w_bytes = C * D * e
    part_bytes = C * D * 4  # a block's grad ŵ partial, float32

    # One block's own path: the weights, then its tiles, each a DRAM round trip plus its bytes.
    t = LAT + w_bytes / SM_BW + 3 * BAR
    if backward and mean and (single or B <= d.divisor_in_block_rows):
        t += LAT + B * 12 / SM_BW + 4 * BAR  # every block sums the divisor over all rows
    passes = 3 if backward else 1  # x; and x again (L2) with grad x written
    per_tile = LAT + tile * D * e * passes / SM_BW + 3 * BAR
    t_block = t + tiles_per_block * per_tile
    # Streaming over the whole machine, when the batch is large enough to fill it.
    in_flight = per_sm * warps * R * 16 * 32 * 2
    hbm = B * D * e * (2 if backward else 1) + grid * w_bytes
    t_stream = t + stream_s(hbm, in_flight) * wave
    est.add("small-C kernel", NODE + max(t_block, t_stream), launches=1, blocks=grid,
            nbytes=hbm)

    if (backward and mean and not single and B > d.divisor_in_block_rows
            and d.finalize != "grid_sync"):
        est.add("divisor kernel", NODE + LAT + stream_s(B * 12), launches=1,
                blocks=max(1, min(256, math.ceil(B / 2048))), nbytes=B * 12)
    if single:
        if backward:  # row-group partials through L2, then grad W
            groups = max(1, 512 // math.ceil(D / 4))
            est.add("in-block finalize", LAT + 2 * groups * part_bytes / SM_BW + w_bytes / SM_BW)
        return
    if d.finalize == "kernel":
        if backward:
            groups = max(1, 512 // math.ceil(D / 4))
            n_parts = grid * groups
            fblocks = math.ceil(D / 256) * C
            nbytes = n_parts * part_bytes
            est.add("finalize kernel", NODE + LAT + nbytes / min(HBM * P["stream_efficiency"],
                                                                  fblocks * SM_BW),
                    launches=1, blocks=fblocks, nbytes=nbytes)
        else:
            est.add("loss reduction kernel", NODE + LAT + grid * 8 / SM_BW, launches=1, blocks=1)
        return
    if d.finalize == "grid_sync":
        # Every block resident (a cooperative launch): a grid barrier after the divisor and one
        # after the partials, then each block adds its share of every partial's columns.
        tail = 2 * 2 * LAT + LAT + part_bytes / SM_BW if backward else 2 * LAT + LAT
        est.add("grid-wide reductions", tail)
        return
    # Last block done: a fence and an atomic per block, then reducers of `fan_in` partials each,
    # level by level, the last of them writing grad W (or, forward, the loss: one level, the
    # partials being two numbers).
    fan_in = d.fan_in if backward else max(2, grid)
    levels, n = 0, grid
    tail = 0.0
    if n == 1:
        tail += LAT + (part_bytes if backward else 8) / SM_BW  # its own partial, through L2
    while n > 1:
        k = min(n, fan_in)
        nbytes = k * (part_bytes if backward else 8)
        tail += 2 * LAT + LAT + nbytes / SM_BW
        n = math.ceil(n / fan_in)
        levels += 1
    if backward:
        tail += w_bytes / SM_BW
    est.add("last-block reductions", tail)


def small_c_step(d: SmallDesign, B: int, D: int, C: int, dtype: str, graph: bool) -> Estimate:
    """Forward + backward through autograd, the way dispatch.py runs small heads: the forward
    forms the loss only, the backward recomputes (three passes over B×D)."""
    est = Estimate()
    small_c_kernel(est, d, B, D, C, dtype, backward=False, mean=True)
    small_c_kernel(est, d, B, D, C, dtype, backward=True, mean=True)
    if not graph:  # eager: the host issues every launch; the device waits when it is faster
        host = est.launches * P["eager_launch_s"]
        if host > est.time_s:
            est.add("host launch overhead", host - est.time_s)
    return est


def three_pass_floor_s(B: int, D: int, dtype: str) -> float:
    """Reading x in the forward, reading it again and writing grad x in the backward."""
    return 3 * B * D * ELEM[dtype] / HBM


# ---------------------------------------------------------------------------------------------
# Large C: GEMM row blocks (csrc/cuda/large_c.cu)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LargeDesign:
    name: str
    block_rows: str        # "budget256": 256 MiB of logits + gradient; "memory": the memory rule
    grad_w: str            # "temp_add": per-block temporary + add; "beta1": accumulate in the GEMM
    logit_reads: int       # passes of the epilogue over the float32 logits
    epilogue_in_flight: int  # bytes a thread of the epilogue has in flight
    # free device memory when the loss runs (the benchmark leaves nine tenths of it free)
    free_bytes: float = 0.9 * P["hbm_bytes"]


CURRENT_LARGE = LargeDesign("current", block_rows="budget256", grad_w="temp_add", logit_reads=2,
                            epilogue_in_flight=16)
# Row blocks by the memory rule, grad W accumulated by the GEMM (beta = 1), the epilogue's two
# passes over the logits in 16-byte vectors (csrc/cuda/large_c.cu, large_c_kernels.cuh).
REDESIGN_LARGE = LargeDesign("redesign", block_rows="memory", grad_w="beta1", logit_reads=2,
                             epilogue_in_flight=32)


def eager_extra_bytes(B: int, C: int) -> float:
    return P["eager_extra_bytes_per_logit"] * B * C


def large_block_rows(d: LargeDesign, B: int, D: int, C: int, g_elem: int) -> int:
    per_row = C * (4 + g_elem) + (D * 4 if d.block_rows == "memory" else 0)
    if d.block_rows == "budget256":
        return max(1, min(B, (256 << 20) // per_row))
    # Memory rule: at most half the free memory; where eager fits, at most a quarter of its
    # extra peak; where it does not, everything else within one logits block (2× in all).
    fixed = C * D * (4 + 2) + B * D * 2 + 4 * (3 * B + 3 * C)
    budget = 0.5 * d.free_bytes
    if eager_extra_bytes(B, C) <= d.free_bytes:
        budget = min(budget, 0.25 * eager_extra_bytes(B, C))
    rows = max(1, min(B, int((budget - fixed) // per_row)))
    blocks = math.ceil(B / rows)
    return math.ceil(B / blocks)  # blocks of even size


def large_c_step(d: LargeDesign, B: int, D: int, C: int, dtype: str) -> Estimate:
    """Forward (all three GEMMs: the gradient is formed in the forward for C > 64) + backward
    (rescaling the saved gradients by the upstream gradient)."""
    est = Estimate()
    e = ELEM[dtype]
    g_elem = 2 if dtype == "bf16" else 4
    fp32 = dtype != "bf16"
    n = large_block_rows(d, B, D, C, g_elem)
    blocks = math.ceil(B / n)
    rows_occ = OCC["row_sumsq_kernel"]["blocks_per_sm"] * OCC["row_sumsq_kernel"]["threads"]
    # squared norms of x and W: a warp per row
    for rows in (B, C):
        nb = rows * D * e
        est.add("norms", NODE + LAT + stream_s(nb), launches=1,
                blocks=math.ceil(rows * 32 / 256), nbytes=nb)
    est.add("divisor kernel", NODE + LAT + stream_s(B * 12), launches=1, blocks=4)
    epi_in_flight = (OCC["epilogue_kernel"]["blocks_per_sm"] * OCC["epilogue_kernel"]["threads"]
                     * d.epilogue_in_flight)
    for b in range(blocks):
        m = min(n, B - b * n)
        t1 = gemm_s(m, C, D, e, 4, fp32=fp32)
        est.add("GEMM logits", t1, nbytes=m * C * 4, flops=2.0 * m * C * D)
        nb = m * C * (4 * d.logit_reads + g_elem)
        est.add("epilogue", NODE + LAT + stream_s(nb, epi_in_flight), launches=1, blocks=m,
                nbytes=nb)
        est.add("GEMM grad x", gemm_s(m, D, C, g_elem, 4, fp32=fp32), flops=2.0 * m * C * D)
        nb = m * D * (4 + 2 * e)
        est.add("finish grad x", NODE + LAT + stream_s(nb), launches=1,
                blocks=min(65536, math.ceil(m * D / 256)), nbytes=nb)
        accumulate = b > 0
        if d.grad_w == "beta1":
            t3 = gemm_s(C, D, m, g_elem, 4, beta=accumulate, fp32=fp32)
            est.add("GEMM grad W", t3, flops=2.0 * m * C * D)
        else:
            est.add("GEMM grad W", gemm_s(C, D, m, g_elem, 4, fp32=fp32), flops=2.0 * m * C * D)
            if accumulate:
                nb = 3 * C * D * 4
                est.add("grad W add", NODE + stream_s(nb), launches=1,
                        blocks=math.ceil(C * D / 512), nbytes=nb)
    est.add("loss reduction", NODE + LAT, launches=1, blocks=1)
    nb = C * D * (4 + 2 * e) + C * D * 4
    est.add("finish grad W", NODE + LAT + stream_s(nb), launches=1, blocks=C, nbytes=nb)
    # backward: grad W and grad x scaled by the upstream gradient, into new tensors
    nb = 2 * (C + B) * D * e
    est.add("backward rescale", 2 * NODE + stream_s(nb), launches=2,
            blocks=math.ceil(C * D / 512), nbytes=nb)
    # extra peak memory: the row block's logits and gradient, the accumulators, the outputs
    extra = n * C * (4 + (g_elem if g_elem != 4 else 0)) + n * D * 4 + C * D * 4
    if d.grad_w == "temp_add" and blocks > 1:
        extra += C * D * 4
    extra += (C + B) * D * e + 4 * (2 * B + 3 * C)
    est.extra_bytes = extra
    est.parts["_rows_per_block"] = n
    return est


def three_gemms_s(B: int, D: int, C: int, dtype: str) -> float:
    """benchmarks/harness.three_gemms_time: the three GEMMs of a step in the input dtype, in row
    blocks of 1 GiB of logits, grad W accumulated in place."""
    e = ELEM[dtype]
    rows = max(1, min(B, (1 << 30) // (C * e)))
    t = 0.0
    for r0 in range(0, B, rows):
        m = min(rows, B - r0)
        t += gemm_s(m, C, D, e, e) + gemm_s(m, D, C, e, e) + gemm_s(C, D, m, e, e, beta=True)
    return t


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------

# Not built: what a cooperative launch (all blocks resident, grid barriers) would give the small-C
# path: no divisor launch, and the partials added by every block at once.
COOPERATIVE_SMALL = SmallDesign("cooperative", rows_per_warp={2: 4, 8: 2}, single_block_rows=0,
                                small_batch_tile=8, finalize="grid_sync", fan_in=0,
                                divisor_in_block_rows=4096, even_shares=True)
DESIGNS = {"current": (CURRENT_SMALL, CURRENT_LARGE),
           "redesign": (REDESIGN_SMALL, REDESIGN_LARGE),
           "cooperative": (COOPERATIVE_SMALL, REDESIGN_LARGE)}


def targets(design: str) -> list[dict]:
    small, large = DESIGNS[design]
    rows = []
    for C in (2, 7):
        for dtype in ("fp32", "bf16"):
            est = small_c_step(small, 64, 1024, C, dtype, graph=True)
            label = f"paper (64, 1024, {C}) {dtype}"
            rows.append({"key": f"paper-step C={C} {dtype}",
                         "target": f"{label}: step by CUDA-graph replay", "goal": "<= 20 us",
                         "modelled": est.time_s, "unit": "s", "met": est.time_s <= 20e-6,
                         "parts": est.parts})
            rows.append({"key": f"paper-launches C={C} {dtype}",
                         "target": f"{label}: launches a step, and blocks",
                         "goal": "<= 2 launches, > 1 block", "modelled": est.launches,
                         "blocks": est.max_blocks, "unit": "launches",
                         "met": est.launches <= 2 and est.max_blocks > 1})
    for C in (2, 7):
        for dtype in ("fp32", "bf16"):
            B, D = 65536, 1024
            est = small_c_step(small, B, D, C, dtype, graph=False)
            frac = three_pass_floor_s(B, D, dtype) / est.time_s
            rows.append({"key": f"bandwidth C={C} {dtype}",
                         "target": f"bandwidth ({B}, {D}, {C}) {dtype}: fraction of the "
                                   "three-pass HBM floor", "goal": ">= 80%",
                         "modelled": frac, "unit": "fraction", "met": frac >= 0.8,
                         "parts": est.parts, "time_s": est.time_s})
    for C in (100_000, 1_000_000):
        B, D = 8192, 512
        est = large_c_step(large, B, D, C, "bf16")
        ref = three_gemms_s(B, D, C, "bf16")
        ratio = est.time_s / ref
        rows.append({"key": f"large-ratio C={C:.0e}",
                     "target": f"large C ({B}, {D}, {C:.0e}) bf16: time / three cuBLAS GEMMs",
                     "goal": "<= 1.6", "modelled": ratio, "unit": "ratio", "met": ratio <= 1.6,
                     "parts": est.parts, "time_s": est.time_s, "gemms_s": ref})
        eager = eager_extra_bytes(B, C)
        fits = eager <= large.free_bytes
        n = est.parts["_rows_per_block"]
        if fits:
            frac = est.extra_bytes / eager
            rows.append({"key": f"large-memory C={C:.0e}",
                         "target": f"large C ({B}, {D}, {C:.0e}) bf16: extra peak memory / "
                                   "eager's", "goal": "<= 25%", "modelled": frac,
                         "unit": "fraction", "met": frac <= 0.25})
        else:
            frac = est.extra_bytes / (n * C * 4)
            rows.append({"key": f"large-memory C={C:.0e}",
                         "target": f"large C ({B}, {D}, {C:.0e}) bf16: extra peak memory / one "
                                   "logits block (eager does not fit)", "goal": "<= 2",
                         "modelled": frac, "unit": "ratio", "met": frac <= 2})
    return rows


def _fmt(row: dict) -> str:
    v, unit = row["modelled"], row["unit"]
    if unit == "s":
        return f"{v * 1e6:.1f} us"
    if unit == "fraction":
        return f"{v:.1%}"
    if unit == "launches":
        return f"{v} launches, {row['blocks']} blocks"
    return f"{v:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--design", choices=list(DESIGNS), action="append",
                   help="a design to model (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--parts", action="store_true", help="show where the time goes")
    args = p.parse_args(argv)
    designs = args.design or list(DESIGNS)
    out = {name: targets(name) for name in designs}
    if args.json:
        print(json.dumps({"params": P, "occupancy": OCC, "designs": out}, indent=1,
                         default=float))
        return 0
    for name, rows in out.items():
        print(f"design '{name}' (H200 model: benchmarks/model_params.py)")
        for row in rows:
            print(f"  {'met ' if row['met'] else 'MISS'}  {row['target']}: {_fmt(row)} "
                  f"(target {row['goal']})")
            if args.parts and "parts" in row:
                parts = {k: v for k, v in row["parts"].items() if not k.startswith("_")}
                print("        " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
