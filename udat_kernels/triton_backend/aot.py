"""Compile the Triton kernels for sm_90 exactly as they are launched, without a GPU.

The interpreter runs code that the compiler may reject or build badly (register pressure,
spills, TF32 dots), so every distinct launch is also compiled for an NVIDIA target:

- the specializations an interpreted test run launched, as _runtime recorded them in the file
  named by UDAT_TRITON_LAUNCHES (argument types, 16-byte alignment and value-1 specializations,
  constexprs, num_warps, num_stages), and
- those the launchers plan at every GPU target shape of the performance model (plan.py on an
  H200 stand-in: the paper batch, the bandwidth shapes and the large heads), and one shard of
  the shard mode (`plan_shard`).

Each distinct specialization is compiled once, in parallel, with the Triton that runs this
module; ptxas's report and the cubin's resource usage give registers, shared memory, spills and
blocks per SM (H200 limits), the PTX any TF32 mma, and for the builds planned at the target
shapes the SASS per loop body the barriers, async loads and mma instructions.

    python -m udat_kernels.triton_backend.aot [--specs FILE ...] [--table OUT.md]

Fails (exit 1) when a kernel does not compile, when any build spills (local-memory stores),
when an fp32 dot is built as TF32 mma, or when a kernel planned at a GPU target shape has fewer
blocks per SM than design.py says it is designed for, or a small-C build there has more
barriers than its launch declares to the performance model. Must run without TRITON_INTERPRET
(the kernels bind to the interpreter when it is set at import).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from .design import BLOCKS_PER_SM as DESIGN

# The GPU target shapes of the performance model (docs/design.md, "Performance model"):
# (label, B, D, C, dtype).
TARGET_SHAPES = (
    ("paper", 64, 1024, 2, "fp32"), ("paper", 64, 1024, 2, "bf16"),
    ("paper", 64, 1024, 7, "fp32"), ("paper", 64, 1024, 7, "bf16"),
    ("bandwidth", 65536, 1024, 2, "fp32"), ("bandwidth", 65536, 1024, 2, "bf16"),
    ("bandwidth", 65536, 1024, 7, "fp32"), ("bandwidth", 65536, 1024, 7, "bf16"),
    ("large", 8192, 512, 100_000, "bf16"), ("large", 8192, 512, 1_000_000, "bf16"),
)
# One rank's shard in the shard mode (docs/design.md, "Shard mode"): half of 10^6 classes, the
# global batch of the distributed benchmark: (label, B, D, C_l, dtype), num_classes = 2·C_l.
SHARD_TARGET_SHAPES = (("shard", 1024, 512, 500_000, "bf16"),)

# H200 (compute capability 9.0) per-SM limits, as in benchmarks/model_params.py.
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024  # the CUDA runtime's share of each block's shared memory


def blocks_per_sm(regs: int, num_warps: int, shared_bytes: int) -> int:
    """Resident blocks per SM of a kernel, from its registers, warps and shared memory."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp, by 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    by_smem = SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_BLOCK)
    return max(0, min(by_regs, by_threads, by_smem, MAX_BLOCKS_PER_SM))


# ----------------------------------------------------------------------------------------------
# which specializations
# ----------------------------------------------------------------------------------------------


def target_specs() -> dict[str, dict]:
    """The distinct specializations the launchers plan at the GPU target shapes."""
    from . import plan
    from ._runtime import spec_key

    out: dict[str, dict] = {}
    plans = [(label, B, D, C, dtype, plan.plan(B, D, C, dtype))
             for label, B, D, C, dtype in TARGET_SHAPES]
    plans += [(label, B, D, C, dtype, plan.plan_shard(B, D, C, 2 * C, dtype))
              for label, B, D, C, dtype in SHARD_TARGET_SHAPES]
    for label, B, D, C, dtype, rec in plans:
        for key, spec in rec.specs.items():
            entry = out.setdefault(key, dict(spec, origins=[]))
            entry["origins"].append(f"{label} ({B}, {D}, {C}) {dtype}")
    return {spec_key({k: v for k, v in s.items() if k != "origins"}): s for s in out.values()}


def load_specs(paths) -> dict[str, dict]:
    from ._runtime import spec_key

    out: dict[str, dict] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    spec = json.loads(line)
                    out.setdefault(spec_key(spec), dict(spec, origins=["tests"]))
    return out


# ----------------------------------------------------------------------------------------------
# compiling one specialization (in a worker process)
# ----------------------------------------------------------------------------------------------


def _kernel(kid: str):
    module, name = kid.split(":")
    return getattr(importlib.import_module(module), name)


def _source(spec: dict):
    """The ASTSource Triton's runtime builds for this launch (runtime/jit.py, _pack_args)."""
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource

    kernel = _kernel(spec["kernel"])
    names = list(kernel.arg_names)
    signature, constexprs, attrs = {}, {}, {}
    for name, ty, key in spec["args"]:
        i = names.index(name)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = key
        elif isinstance(key, str):
            attrs[(i,)] = BaseBackend.parse_attr(key)
    for name, value in spec["constexprs"].items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    signature = {n: signature[n] for n in names}  # in parameter order
    return ASTSource(kernel, signature, constexprs, attrs)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_LOOP_OPS = {
    "barriers": re.compile(r"\sBAR\.(SYNC|ARV|RED)"),
    "async_loads": re.compile(r"\s(LDGSTS|UTMALDG|UBLKCP)"),
    "mma": re.compile(r"\s(HGMMA|HMMA)"),
}
_ADDR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def analyze_sass(sass: str) -> dict:
    """Spill stores, TF32 mma, and per loop body (a backward branch's range) its barriers,
    async loads and mma instructions."""
    instrs = [(int(m.group(1), 16), m.group(2)) for m in _ADDR.finditer(sass)]
    loops, spans = [], []
    for addr, text in instrs:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
        if m and m.group(1) is not None:
            target = int(m.group(1), 16)
            if target < addr:
                body = [t for a, t in instrs if target <= a <= addr]
                spans.append((target, addr))
                loops.append({"length": len(body), **{k: sum(bool(r.search(" " + t)) for t in body)
                                                       for k, r in _LOOP_OPS.items()}})
    for loop, (lo, hi) in zip(loops, spans):
        # innermost: no other loop's range inside this one's
        loop["innermost"] = not any(lo <= a <= b <= hi and (a, b) != (lo, hi) for a, b in spans)
    texts = [t for _, t in instrs]
    return {
        "local_stores": sum(bool(re.search(r"\bSTL\b|\bSTL\.", t)) for t in texts),
        "tf32_mma": sum(("TF32" in t.upper()) and bool(re.search(r"H(G)?MMA", t)) for t in texts),
        "loops": loops,
    }


# an mma or wgmma instruction's opcode (after an optional predicate)
_PTX_TF32_MMA = re.compile(r"^\s*(?:@\S+\s+)?(?:wg)?mma\S*", re.M)


def ptx_tf32_mma(ptx: str) -> int:
    """mma / wgmma instructions of a PTX listing whose operands are TF32."""
    return sum(".tf32" in m.group(0) for m in _PTX_TF32_MMA.finditer(ptx))


def compile_one(spec: dict, arch: int, disassemble: bool = True) -> dict:
    """Build one specialization; returns its resources, or the error.

    Registers, shared memory and spills come from ptxas and the cubin's resource usage, TF32
    mma from the PTX; `disassemble` adds the SASS reading (loops, their barriers, async loads
    and mma), which takes longer than the compilation itself: the check asks for it at the
    target shapes only."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.monotonic()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # ptxas -v, printed by Triton (a fresh cache)
            compiled = triton.compile(_source(spec), target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec["num_warps"],
                                               "num_stages": spec["num_stages"]})
    except Exception as e:  # noqa: BLE001 - reported per kernel
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
    ptxas = log.getvalue()
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas)]
    if not spills:
        return {"error": "no ptxas report (was the kernel taken from a compile cache?)"}
    cubin = compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True).stdout if disassemble else ""
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    regs = int(usage.get("REG", 0))
    shared = int(usage.get("SHARED", 0)) + int(compiled.metadata.shared)
    out = {"regs": regs, "stack": int(usage.get("STACK", 0)), "spill_bytes": sum(spills),
           "local": int(usage.get("LOCAL", 0)), "shared": shared,
           "blocks_per_sm": blocks_per_sm(regs, spec["num_warps"], shared),
           "seconds": round(time.monotonic() - t0, 2)}
    out.update(analyze_sass(sass))
    out["tf32_mma"] = max(out["tf32_mma"], ptx_tf32_mma(compiled.asm["ptx"]))
    return out


def compile_into_cache(spec: dict) -> str:
    """Compile one specialization for this process's GPU into Triton's compile cache, where the
    runtime finds it at launch (benchmarks/gpu_triton.py warms the cache in parallel with it).
    Returns "" or what failed."""
    import triton

    try:
        triton.compile(_source(spec), target=triton.runtime.driver.active.get_current_target(),
                       options={"num_warps": spec["num_warps"],
                                "num_stages": spec["num_stages"]})
        return ""
    except Exception as e:  # noqa: BLE001 - the launch compiles it again and reports
        return f"{short(spec['kernel'])}: {type(e).__name__}"


def _worker(args):
    key, spec, arch, disassemble = args
    return key, compile_one(spec, arch, disassemble)


# ----------------------------------------------------------------------------------------------
# checks and report
# ----------------------------------------------------------------------------------------------


def short(kid: str) -> str:
    return kid.split(":")[1].lstrip("_")


def describe(spec: dict) -> str:
    """The constexprs that tell specializations of a kernel apart, briefly."""
    ce = spec["constexprs"]
    tiles = "×".join(str(ce[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_B", "BLOCK_C",
                                          "BLOCK_D", "BLOCK_L", "VEC", "UNROLL", "BLOCK_R",
                                          "BLOCK_P", "BLOCK") if k in ce)
    dtypes = sorted({ty[1:] for _, ty, _ in spec["args"] if ty.startswith("*")} - {"i64"})
    flags = [k for k in ("COMPUTE_GRAD", "WRITE_LOSS", "DOT_FP32", "GW_DIRECT", "ACCUMULATE")
             if ce.get(k)]
    nc = f" C={ce['NUM_C']}" if "NUM_C" in ce else ""
    return f"{'/'.join(dtypes)}{nc} {tiles} w{spec['num_warps']} s{spec['num_stages']} " \
           + " ".join(f.lower() for f in flags)


def _declared_barriers(spec: dict):
    """(innermost loop, any loop) barriers the small-C launcher declares per row block for this
    build (small_c._barriers, which the performance model takes), or None for other kernels."""
    if not spec["kernel"].endswith(":_small_c_kernel"):
        return None
    from . import small_c

    return 0, small_c._barriers(bool(spec["constexprs"].get("COMPUTE_GRAD")))[0]


def check(specs: dict, results: dict, design: dict) -> list[str]:
    """Every failure, one line each."""
    fails = []
    for key, spec in specs.items():
        r = results[key]
        name = f"{short(spec['kernel'])} [{describe(spec)}]"
        if "error" in r:
            fails.append(f"{name}: does not compile: {r['error']}")
            continue
        if r["spill_bytes"]:
            fails.append(f"{name}: spills {r['spill_bytes']} bytes (ptxas; {r['regs']} "
                         f"registers)")
        if r["tf32_mma"]:
            fails.append(f"{name}: {r['tf32_mma']} TF32 mma instructions (fp32 dots must be "
                         f"IEEE fp32)")
        planned = [o for o in spec["origins"] if o != "tests"]
        want = design.get(short(spec["kernel"]))
        if planned and want is None:
            fails.append(f"{name}: no design occupancy in design.py")
        elif planned and r["blocks_per_sm"] < want:
            fails.append(f"{name}: {r['blocks_per_sm']} blocks per SM compiled, designed for "
                         f"{want} ({', '.join(planned)})")
        declared = _declared_barriers(spec)
        if planned and declared is not None:
            inner = max([lp["barriers"] for lp in r["loops"] if lp["innermost"]], default=0)
            outer = max([lp["barriers"] for lp in r["loops"]], default=0)
            if inner > declared[0] or outer > declared[1]:
                fails.append(f"{name}: {inner} barriers in an innermost loop, {outer} in a loop "
                             f"body; the launch declares at most {declared[0]} and "
                             f"{declared[1]} ({', '.join(planned)})")
    return fails


def _loops(r: dict) -> str:
    inner = [lp for lp in r.get("loops", []) if lp["length"] > 8]
    if not inner:
        return "-"
    return " ".join(f"{lp['barriers']}/{lp['async_loads']}/{lp['mma']}" for lp in inner[:4]) \
        + (" …" if len(inner) > 4 else "")


def table(specs: dict, results: dict, design: dict, version: str, arch: int) -> str:
    lines = [f"# Triton kernels compiled for sm_{arch} (Triton {version})", "",
             "Written by `python -m udat_kernels.triton_backend.aot --specs <recorded> --table "
             "<this file>`; blocks per SM from the registers, warps and shared memory at H200 "
             "limits. Loops: barriers / async loads / mma instructions per loop body (a "
             "backward branch's range), innermost first.", "",
             "## At the GPU target shapes", "",
             "| kernel | specialization | shapes | regs | smem (B) | blocks/SM | designed | "
             "spill B | loops b/a/m |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    planned = [(k, s) for k, s in specs.items() if any(o != "tests" for o in s["origins"])]
    for key, spec in sorted(planned, key=lambda ks: (ks[1]["kernel"], describe(ks[1]))):
        r = results[key]
        if "error" in r:
            lines.append(f"| {short(spec['kernel'])} | {describe(spec)} | | error | | | | | |")
            continue
        shapes = "; ".join(o for o in spec["origins"] if o != "tests")
        lines.append(f"| {short(spec['kernel'])} | {describe(spec)} | {shapes} | {r['regs']} | "
                     f"{r['shared']} | {r['blocks_per_sm']} | "
                     f"{design.get(short(spec['kernel']), '-')} | {r['spill_bytes']} | "
                     f"{_loops(r)} |")
    lines += ["", "## The interpreted test run's specializations, per kernel", "",
              "| kernel | specializations | regs (max) | smem max (B) | blocks/SM (min) | "
              "spill B | compile s (sum) |", "|---|---:|---:|---:|---:|---:|---:|"]
    by_kernel: dict[str, list] = {}
    for key, spec in specs.items():
        if "tests" in spec["origins"] and "error" not in results[key]:
            by_kernel.setdefault(short(spec["kernel"]), []).append(results[key])
    for name, rs in sorted(by_kernel.items()):
        lines.append(f"| {name} | {len(rs)} | {max(r['regs'] for r in rs)} | "
                     f"{max(r['shared'] for r in rs)} | {min(r['blocks_per_sm'] for r in rs)} | "
                     f"{sum(r['spill_bytes'] for r in rs)} | "
                     f"{sum(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--specs", nargs="*", default=[],
                   help="JSON-lines files of recorded launches (UDAT_TRITON_LAUNCHES)")
    p.add_argument("--no-targets", action="store_true",
                   help="skip the launches planned at the GPU target shapes")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--table", help="write the markdown table here")
    p.add_argument("--json", help="write every specialization and its resources here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the kernels are bound to the interpreter", flush=True)
        return 2
    import triton

    # A fresh compile cache: every build runs ptxas, whose report gives the spills.
    cache = os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="udat-aot-")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    t0 = time.monotonic()
    specs = load_specs(args.specs)
    if not args.no_targets:
        for key, spec in target_specs().items():
            if key in specs:
                specs[key]["origins"] += spec["origins"]
            else:
                specs[key] = spec
    design = DESIGN
    work = [(k, {x: v for x, v in s.items() if x != "origins"}, args.arch,
             any(o != "tests" for o in s["origins"])) for k, s in specs.items()]
    results = {}
    ctx = multiprocessing.get_context("fork")
    try:
        with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
            for key, res in pool.map(_worker, work, chunksize=1):
                results[key] = res
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    fails = check(specs, results, design)
    n_tests = sum("tests" in s["origins"] for s in specs.values())
    print(f"Triton {triton.__version__}, sm_{args.arch}: {len(specs)} distinct specializations "
          f"({n_tests} from recorded launches, {len(specs) - n_tests} more at the GPU target "
          f"shapes) compiled in {time.monotonic() - t0:.0f} s with {args.jobs} processes")
    text = table(specs, results, design, triton.__version__, args.arch)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(s, result=results[k]) for k, s in specs.items()], f, indent=1)
    for line in fails:
        print("FAIL", line)
    print(f"aot: {len(specs) - len(fails)} passed, {len(fails)} failed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
