"""Compiler evidence for the CUDA kernels (docs/design.md, "Compiler evidence"): what ptxas
reports for every kernel instantiation on sm_90 — registers, spills, static shared memory — with
the dynamic shared memory of the small-C kernel at the feature sizes its design covers, the
resident blocks per SM that follow, and the design's floor for each
(benchmarks/cuda_design_occupancy.json).

    python -m benchmarks.cuda_occupancy BUILD_DIR   # the table; exit status 1 on a violation

The CMake CUDA build keeps ptxas's report next to each object (<object>.ptxas.txt, written by
tests/cuda_build/record_ptxas.py); tests/cuda_build/test_compiled_occupancy.py fails on any spill
and on any kernel below its design occupancy.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.model_params import H200  # noqa: E402

with open(os.path.join(ROOT, "benchmarks", "cuda_design_occupancy.json")) as _fh:
    DESIGN = json.load(_fh)
ARCH = DESIGN["arch"]
RESERVED_SMEM_PER_BLOCK = 1024  # what sm_90 keeps per resident block
SIZES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2}


@dataclass
class Kernel:
    mangled: str
    name: str = ""          # demangled, without the parameter list
    base: str = ""          # e.g. small_c_kernel
    args: tuple = ()        # template arguments
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    static_smem: int = 0


def parse_ptxas(text: str, arch: str = ARCH) -> list[Kernel]:
    """The kernels ptxas compiled for `arch`, with what it reported about each."""
    out, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line)
        if m:
            cur = Kernel(m.group(1)) if m.group(2) == arch else None
            if cur is not None:
                out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur.static_smem = int(s.group(1)) if s else 0
    _demangle(out)
    return out


def _demangle(kernels: list[Kernel]) -> None:
    if not kernels:
        return
    res = subprocess.run(["c++filt"], input="\n".join(k.mangled for k in kernels),
                         capture_output=True, text=True, check=True)
    for k, name in zip(kernels, res.stdout.splitlines()):
        name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "")
        depth, cut = 0, len(name)
        for i, ch in enumerate(name):  # the parameter list starts at the first '(' at depth 0
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                cut = i
                break
        k.name = name[:cut]
        head = k.name.split("<", 1)[0]
        k.base = head.rsplit("::", 1)[-1]
        if "<" in k.name:
            inner = k.name[k.name.index("<") + 1:k.name.rindex(">")]
            k.args = tuple(a.strip() for a in inner.split(","))


def blocks_per_sm(registers: int, threads: int, smem: int, p: dict = H200) -> int:
    """Resident blocks per SM (sm_90's allocation rules: registers by warp in units of 256)."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (p["regs_per_sm"] // regs_per_warp) // warps
    by_threads = p["max_threads_per_sm"] // threads
    by_smem = p["smem_per_sm_bytes"] // (smem + RESERVED_SMEM_PER_BLOCK)
    return min(p["max_blocks_per_sm"], by_regs, by_threads, by_smem)


# ---- the small-C kernel's dynamic shared memory: csrc/cuda/small_c_kernels.cuh ----------------

def small_c_traits(acc_bytes: int, nc: int) -> tuple[int, int]:
    """(R, COLS) of SmallTraits<A, NC>."""
    r = (1 if nc > 4 else 2) if acc_bytes == 8 else (2 if nc > 4 else 4)
    cols = (1 if nc > 4 else 2) if acc_bytes == 8 else (2 if nc > 4 else 4)
    return r, cols


def small_c_smem_bytes(ws_bytes: int, acc_bytes: int, nc: int, D: int) -> int:
    """SmallSmem(...).bytes, as the host computes it for a launch at feature size D."""
    r, cols = small_c_traits(acc_bytes, nc)
    tile, warps, threads = 16 * r, 16, 512
    d_pad = (D + 7) // 8 * 8

    def align16(v):
        return (v + 15) // 16 * 16

    o = align16(nc * d_pad * ws_bytes)
    o += tile * nc * acc_bytes + tile * acc_bytes + 2 * nc * acc_bytes + 2 * 32 * acc_bytes
    o += warps * nc * acc_bytes + 2 * warps * acc_bytes + nc * acc_bytes + 2 * acc_bytes
    o = align16(o) + threads * cols * acc_bytes
    return o + 16


def small_c_max_features(acc_bytes: int, nc: int) -> int:
    return 512 * small_c_traits(acc_bytes, nc)[1]


def evidence(kernels: list[Kernel]) -> tuple[list[dict], list[str]]:
    """One row per kernel instantiation (and feature size, for the small-C kernel), and the
    violations: spills, kernels without a design, occupancy below the design."""
    rows, problems = [], []
    design = DESIGN["kernels"]
    for k in kernels:
        d = design.get(k.base)
        if d is None:
            problems.append(f"{k.name}: no design occupancy in benchmarks/cuda_design_occupancy.json")
            continue
        if k.spill_stores or k.spill_loads:
            problems.append(f"{k.name}: spills {k.spill_stores} bytes stored, {k.spill_loads} "
                            "loaded")
        cases = [(None, 0)]
        if k.base == "small_c_kernel":
            _, acc, ws, nc = k.args
            acc_b, ws_b, nc = SIZES[acc], SIZES[ws], int(nc)
            cases = [(D, small_c_smem_bytes(ws_b, acc_b, nc, D)) for D in d["d"]
                     if D <= small_c_max_features(acc_b, nc)]
        for D, dyn in cases:
            if dyn + k.static_smem > H200["max_smem_per_block_bytes"]:
                continue  # the host sends this size to the GEMM path (small_c_fits)
            blocks = blocks_per_sm(k.registers, d["threads"], k.static_smem + dyn)
            rows.append({"kernel": k.name, "D": D, "registers": k.registers,
                         "spills": k.spill_stores + k.spill_loads, "stack": k.stack,
                         "static_smem": k.static_smem, "dynamic_smem": dyn,
                         "threads": d["threads"], "blocks_per_sm": blocks,
                         "design": d["blocks_per_sm"]})
            if blocks < d["blocks_per_sm"]:
                problems.append(f"{k.name}{'' if D is None else f' at D = {D}'}: {blocks} "
                                f"blocks per SM, below the design's {d['blocks_per_sm']}")
    return rows, problems


def load(build_dir: str) -> list[Kernel]:
    files = sorted(glob.glob(os.path.join(build_dir, "**", "*.ptxas.txt"), recursive=True))
    kernels = []
    for f in files:
        with open(f) as fh:
            kernels += parse_ptxas(fh.read())
    return kernels


def table(rows: list[dict]) -> str:
    lines = ["| kernel | D | registers | spills | static smem | dynamic smem | threads | "
             "blocks/SM | design |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {'' if r['D'] is None else r['D']} | {r['registers']} | "
                     f"{r['spills']} | {r['static_smem']} | {r['dynamic_smem']} | {r['threads']} "
                     f"| {r['blocks_per_sm']} | {r['design']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    kernels = load(argv[0])
    if not kernels:
        print(f"no ptxas report for {ARCH} under {argv[0]} (a CMake CUDA build with "
              "UDAT_PTXAS_REPORT=ON writes them)")
        return 1
    rows, problems = evidence(kernels)
    print(f"ptxas on {ARCH}: {len(kernels)} kernel instantiations")
    print(table(rows))
    for p in problems:
        print("VIOLATION:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
