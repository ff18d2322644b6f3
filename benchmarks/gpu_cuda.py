"""The CUDA stage of the GPU check: sanitizer runs, paper-size, bandwidth and large-C
figures of backend="cuda", printed row by row as they are measured, and at the end the measured
figures beside the ones the model predicts (benchmarks/model_cuda.py).

    python benchmarks/gpu_cuda.py STAGE [STAGE ...] [--budget-s SECONDS]

STAGE is one of gpu_check.sh's stages, each mapped to the checks of this backend:
  correctness  compute-sanitizer memcheck and racecheck on tiny cases of every kernel path (a bad
               target with validate=False included), where the tool is installed;
  paper        (64, 1024, 2) and (64, 1024, 7): our kernel launches per forward+backward (target
               <= 2, over more than one block) and the step time by CUDA-graph replay (target
               <= 20 µs); then (65536, 1024, 2) and (65536, 1024, 7): fraction of the memory
               floor, three passes over B×D at the measured copy bandwidth (target >= 80%);
  large        (8192, 512, 1e5) and (8192, 512, 1e6) bf16: time against three cuBLAS GEMMs of the
               same shapes (target <= 1.6×) and extra peak memory against the eager reference
               (target <= 25%; where eager does not fit, against one logits block: <= 2×);
  compare      every target: modelled, measured (from the stages above, or "not measured").
Every measured step is forward + loss.backward() into x and the weight, side by side with the
Triton backend, the eager reference and torch.compile of it. The deadline is GPU_CHECK_DEADLINE
(epoch seconds) when set, else now + --budget-s; a check that it leaves no time for says so.
Rows are also written as JSON lines to $GPU_CHECK_OUT/cuda_<stage>.jsonl, and the figures the
compare stage reads to $GPU_CHECK_OUT/cuda_measured.json, when GPU_CHECK_OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Case  # noqa: E402

STAGES = ("correctness", "paper", "large", "compare")
BASELINES = ("ours:triton", "reference", "compile")
# torch.compile's first call compiles (tens of seconds a shape): its rows run only with this
# much time left, and once per shape.
COMPILE_NEEDS_S = 120
_ROWS: list[dict] = []


def record(key: str, value: float) -> None:
    """A measured figure of a model target (benchmarks/model_cuda.py's keys), for `compare`."""
    out = os.environ.get("GPU_CHECK_OUT")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "cuda_measured.json")
    data = {}
    if os.path.exists(path):
        with open(path) as fh:
            data = json.load(fh)
    data[key] = value
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)


def say(*parts) -> None:
    print("[cuda]", *parts, flush=True)


def _fmt_s(s: float) -> str:
    if s != s:
        return "n/a"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"


def _fmt_b(b: float) -> str:
    return "n/a" if b != b else f"{b / 2**20:.1f} MiB"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


class Deadline:
    def __init__(self, budget_s: float):
        env = os.environ.get("GPU_CHECK_DEADLINE")
        self.at = float(env) if env else time.time() + budget_s

    def left(self) -> float:
        return self.at - time.time()

    def allows(self, seconds: float, what: str) -> bool:
        if self.left() < seconds:
            say(f"{what}: skipped ({self.left():.0f} s left, needs about {seconds:.0f} s)")
            return False
        return True

    def baselines(self, case: Case, first_of_shape: bool) -> list[str]:
        """The baselines to measure next to ours on this case, as time allows."""
        impls = [b for b in BASELINES if b != "compile"]
        if first_of_shape and self.allows(COMPILE_NEEDS_S, f"{case.label()} compile"):
            impls.append("compile")
        return impls


def _row(case: Case, impl: str, *, graph: bool = False, budget_s: float = 1.0) -> harness.Row:
    row = harness.measure(case, impl, budget_s=budget_s, graph=graph)
    g = row.extra.get("graph_median_s", math.nan)
    say(f"{case.label()} {impl:12s} {row.status:7s} median {_fmt_s(row.median_s)}"
        + (f"  graph {_fmt_s(g)}" if graph else "")
        + f"  extra peak {_fmt_b(row.peak_mem_bytes)}"
        + (f"  ({row.reason})" if row.reason else ""))
    _ROWS.append({"case": case.label(), "impl": impl, "status": row.status,
                  "median_s": row.median_s, "graph_median_s": g,
                  "peak_mem_bytes": row.peak_mem_bytes, "reason": row.reason})
    return row


# ---------------------------------------------------------------------------------------------
# correctness: compute-sanitizer
# ---------------------------------------------------------------------------------------------

# Every kernel path on tiny inputs: the fused kernel in one block and in several (with its
# finalize and divisor kernels), the GEMM path in one and several row blocks, and a bad target.
_SANITIZER_CASE = r"""
import os, torch, udat_kernels as uk
def run(B, D, C, env, bad=False, dtype=torch.float32):
    os.environ.update(env)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", generator=g).to(dtype).requires_grad_()
    w = torch.randn(C, D, device="cuda", generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, C, (B,), device="cuda", generator=g)
    if bad:
        t[1] = C + 5
    for angular in (True, False):
        f = uk.angular_margin_cross_entropy if angular else uk.linear_cross_entropy
        f(x, w, t, backend="cuda", validate=False, label_smoothing=0.1, grl_lambda=0.5).backward()
    for k in env:
        os.environ.pop(k)
run(37, 33, 7, {})
run(300, 64, 2, {}, dtype=torch.bfloat16)
run(37, 33, 7, {}, bad=True)
run(300, 40, 7, {}, bad=True)
run(37, 33, 50, {})
run(37, 33, 50, {"UDAT_CUDA_BLOCK_BYTES": "400"}, bad=True)
torch.cuda.synchronize()
print("sanitizer case done")
"""


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "compute-sanitizer")):
            return os.path.join(home, "bin", "compute-sanitizer")
    return None


def stage_correctness(deadline: Deadline) -> bool:
    tool = _sanitizer()
    if tool is None:
        say("compute-sanitizer: not installed on this machine; memcheck/racecheck not run")
        return True
    ok = True
    for check in ("memcheck", "racecheck"):
        if not deadline.allows(40, f"compute-sanitizer {check}"):
            continue
        t0 = time.time()
        # Only our kernels are instrumented (torch's run unchecked), which keeps this quick; a
        # tool that does not know the filter is run again without it.
        for flt in (["--kernel-name", "kns=udat"], []):
            cmd = [tool, "--tool", check, "--error-exitcode", "9", *flt, sys.executable, "-c",
                   _SANITIZER_CASE]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                     timeout=max(10.0, min(240.0, deadline.left() - 5)))
            except subprocess.TimeoutExpired:
                res = None
                break
            if "SUMMARY" in res.stdout + res.stderr:
                break
        if res is None:
            say(f"compute-sanitizer {check}: cut off at the deadline")
            continue
        text = res.stdout + res.stderr
        summary = " | ".join(line.strip() for line in text.splitlines() if "SUMMARY" in line)
        passed = res.returncode == 0
        ok &= passed
        verdict = "clean" if passed else f"FAILED (exit {res.returncode})"
        say(f"compute-sanitizer {check}: {verdict} in {time.time() - t0:.0f} s  {summary[:300]}")
        if not passed:
            say("\n".join(text.splitlines()[-30:]))
    return ok


# ---------------------------------------------------------------------------------------------
# paper and bandwidth
# ---------------------------------------------------------------------------------------------


def count_launches(case: Case) -> dict:
    """Kernels one forward+backward step of ours:cuda launches: ours, torch's, memsets/copies."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import providers

    built = providers.build("ours:cuda", case)
    for _ in range(3):
        built.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        built.step()
        torch.cuda.synchronize()
    ours, others, copies = [], [], 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if ev.name.lower().startswith(("memset", "memcpy")):
            copies += 1
        elif "udat::cuda::" in ev.name:
            ours.append(ev.name.split("(")[0].replace("void ", "")[:60])
        else:
            others.append(ev.name[:50])
    return {"ours": ours, "torch": others, "memset_memcpy": copies}


def stage_paper(deadline: Deadline) -> None:
    for C in (2, 7):
        for dtype in ("fp32", "bf16"):
            if not deadline.allows(15, f"paper C={C} {dtype}"):
                return
            case = Case("arcface", 64, 1024, C, dtype=dtype, device="cuda")
            try:
                launches = count_launches(case)
                n = len(launches["ours"])
                say(f"{case.label()} launches: {n} of ours {launches['ours']}, target <= 2: "
                    f"{_verdict(n <= 2)}; besides them {len(launches['torch'])} torch kernels "
                    f"{launches['torch']} and {launches['memset_memcpy']} memset/memcpy")
                record(f"paper-launches C={C} {dtype}", n)
            except Exception as e:  # noqa: BLE001 - report, then time it anyway
                say(f"{case.label()} launches: not counted ({type(e).__name__}: {e})")
            ours = _row(case, "ours:cuda", graph=True, budget_s=2.0)
            g = ours.extra.get("graph_median_s", math.nan)
            if g == g:
                record(f"paper-step C={C} {dtype}", g)
            say(f"{case.label()} graph step target <= 20 us: {_verdict(g <= 20e-6)} "
                f"({_fmt_s(g)}{', ' + ours.extra['graph_error'] if 'graph_error' in ours.extra else ''})")
            for impl in deadline.baselines(case, dtype == "fp32"):
                _row(case, impl, graph=True)

    bw = harness.copy_bandwidth()
    say(f"device-to-device copy bandwidth {bw / 1e9:.0f} GB/s")
    for C in (2, 7):
        for dtype in ("fp32", "bf16"):
            if not deadline.allows(15, f"bandwidth C={C} {dtype}"):
                return
            case = Case("arcface", 65536, 1024, C, dtype=dtype, device="cuda")
            elem = torch.finfo(case.torch_dtype).bits // 8
            floor_s = 3 * case.B * case.D * elem / bw
            ours = _row(case, "ours:cuda", budget_s=2.0)
            frac = floor_s / ours.median_s if ours.status == "ok" else math.nan
            say(f"{case.label()} memory floor {_fmt_s(floor_s)}: {frac:.0%} of it, target "
                f">= 80%: {_verdict(frac >= 0.8)}")
            if frac == frac:
                record(f"bandwidth C={C} {dtype}", frac)
            for impl in deadline.baselines(case, dtype == "fp32"):
                row = _row(case, impl)
                if row.status == "ok" and ours.status == "ok" and impl == "ours:triton":
                    say(f"{case.label()} extra peak memory vs triton: "
                        f"{_fmt_b(ours.peak_mem_bytes)} vs {_fmt_b(row.peak_mem_bytes)}")


# ---------------------------------------------------------------------------------------------
# large C
# ---------------------------------------------------------------------------------------------


def stage_large(deadline: Deadline) -> None:
    from benchmarks import model_cuda

    for C in (100_000, 1_000_000):
        case = Case("arcface", 8192, 512, C, dtype="bf16", device="cuda")
        if not deadline.allows(30, case.label()):
            return
        gemms = harness.three_gemms_time(case.B, case.D, case.C, torch.bfloat16)
        say(f"{case.label()} three cuBLAS GEMMs (logits, grad x, grad W): {_fmt_s(gemms)}")
        free_before = torch.cuda.mem_get_info()[0]
        ours = _row(case, "ours:cuda", budget_s=3.0)
        if ours.status == "ok":
            ratio = ours.median_s / gemms
            say(f"{case.label()} {ratio:.2f}x the three GEMMs, target <= 1.6x: "
                f"{_verdict(ratio <= 1.6)}")
            record(f"large-ratio C={C:.0e}", ratio)
        eager = model_cuda.eager_extra_bytes(case.B, C)
        if ours.status == "ok" and eager > free_before:
            # eager cannot run here: the path's extra peak against one of its logits blocks
            d = model_cuda.LargeDesign("measured", "memory", "beta1", 2, 32, free_bytes=free_before)
            block = model_cuda.large_block_rows(d, case.B, case.D, C, 2) * C * 4
            frac = ours.peak_mem_bytes / block
            say(f"{case.label()} extra peak {_fmt_b(ours.peak_mem_bytes)}, {frac:.2f}x one logits "
                f"block (eager does not fit), target <= 2x: {_verdict(frac <= 2)}")
            record(f"large-memory C={C:.0e}", frac)
        for impl in deadline.baselines(case, C == 100_000):
            if eager > free_before and impl != "ours:triton":
                say(f"{case.label()} {impl}: skipped, it needs about {_fmt_b(eager)}")
                continue
            if not deadline.allows(20, f"{case.label()} {impl}"):
                continue
            base = _row(case, impl, budget_s=2.0)
            if base.status != "ok" or ours.status != "ok":
                say(f"{case.label()} vs {impl}: not comparable ({base.status})")
                continue
            line = (f"{case.label()} vs {impl}: speedup {base.median_s / ours.median_s:.2f}x, "
                    f"extra peak memory {ours.peak_mem_bytes / base.peak_mem_bytes:.0%} of it")
            if impl == "reference":
                frac = ours.peak_mem_bytes / base.peak_mem_bytes
                line += f" (target <= 25%: {_verdict(frac <= 0.25)})"
                record(f"large-memory C={C:.0e}", frac)
            say(line)
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# measured against modelled
# ---------------------------------------------------------------------------------------------


def _fmt_target(key: str, v) -> str:
    if v is None or v != v:
        return "not measured"
    if key.startswith("paper-step"):
        return f"{v * 1e6:.1f} us"
    if key.startswith("paper-launches"):
        return f"{int(v)} launches"
    if key.startswith("bandwidth") or key.startswith("large-memory C=1e+05"):
        return f"{v:.1%}"
    return f"{v:.2f}"


def compare_table(measured: dict) -> list[str]:
    """Every CUDA target: modelled (design "redesign") beside measured."""
    from benchmarks import model_cuda

    lines = ["| target | goal | modelled | measured |", "|---|---|---|---|"]
    for row in model_cuda.targets("redesign"):
        key = row["key"]
        modelled = row["modelled"]
        lines.append(f"| {row['target']} | {row['goal']} | {_fmt_target(key, modelled)} | "
                     f"{_fmt_target(key, measured.get(key))} |")
    return lines


def stage_compare(deadline: Deadline) -> None:
    out = os.environ.get("GPU_CHECK_OUT")
    measured = {}
    if out and os.path.exists(os.path.join(out, "cuda_measured.json")):
        with open(os.path.join(out, "cuda_measured.json")) as fh:
            measured = json.load(fh)
    say("measured against modelled (H200 model, benchmarks/model_cuda.py):")
    for line in compare_table(measured):
        say(line)


RUNNERS = {"correctness": stage_correctness, "paper": stage_paper, "large": stage_large,
           "compare": stage_compare}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stages", nargs="*", default=list(STAGES),
                   help=f"any of {', '.join(STAGES)} (default: all, in that order)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="seconds for everything when GPU_CHECK_DEADLINE is not set")
    args = p.parse_args(argv)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; expected {STAGES}")
    deadline = Deadline(args.budget_s)
    if args.stages == ["compare"]:  # needs no GPU: what was measured, beside the model
        stage_compare(deadline)
        return 0
    if not torch.cuda.is_available():
        say("skipped: no CUDA device")
        return 3
    from udat_kernels import dispatch

    probe = torch.zeros(1, 1, device="cuda")
    why = dispatch.get_backend("cuda").reasons(probe, probe)
    if why:
        say("skipped: backend 'cuda' cannot serve: " + "; ".join(why))
        return 1
    say(f"device: {torch.cuda.get_device_name()}")
    status = 0
    for name in args.stages:
        t0 = time.time()
        say(f"{name}: start ({deadline.left():.0f} s left)")
        try:
            if RUNNERS[name](deadline) is False:
                status = 1
        except Exception as e:  # noqa: BLE001 - report and go on to the next stage
            status = 1
            say(f"{name}: ERROR {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        say(f"{name}: done in {time.time() - t0:.1f} s")
        out = os.environ.get("GPU_CHECK_OUT")
        if out and _ROWS:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"cuda_{name}.jsonl"), "w") as fh:
                for row in _ROWS:
                    fh.write(json.dumps(row) + "\n")
        _ROWS.clear()
    return status


if __name__ == "__main__":
    sys.exit(main())
