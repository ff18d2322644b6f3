"""The Triton stage of the GPU check: correctness, paper-size, bandwidth and
large-C figures of backend="triton", printed row by row as they are measured.

    python -m benchmarks.gpu_triton [--budget-s SECONDS] [--stages warm,correctness,paper,...]
    python -m benchmarks.gpu_triton --smoke     # the same code on the CPU, tiny sizes

Stages, in order; each is skipped (with a line saying so) when the deadline leaves it no time:
  warm         the compile cache filled in parallel, one process per CPU: every specialization
               the stages below and the GPU subset of tests/test_triton.py launch, planned on
               meta tensors for this device (udat_kernels/triton_backend/plan.py), compiled
               before anything runs, so that the later stages do not compile one by one;
  correctness  fp32/bf16/fp16 on a subset of the test matrix (small-C and tiled paths), against
               the float64 reference with the tolerances of docs/math.md;
  paper        (64, 1024, 2) and (64, 1024, 7): kernel launches of forward+backward (target
               <= 2) and the step time by CUDA-graph replay (target <= 30 µs), vs the eager
               reference and torch.compile of it;
  bandwidth    (65536, 1024, 2) and (65536, 1024, 7): fraction of the memory floor — three
               passes over B×D at the measured device-to-device copy bandwidth (target >= 70%);
  largec       (8192, 512, 1e5) and (8192, 512, 1e6) bf16: fraction of the measured bf16 GEMM
               rate for the useful 3·2·B·C·D flops (target >= 50%), time vs torch.compile, and
               extra peak memory vs the eager reference (target <= 25% where it fits).
Each measured figure is printed beside the one the performance model predicts
(benchmarks/model_triton.py). Every timed step is forward + loss.backward() into x and the
weight; extra peak memory is the
maximum allocated during the step minus the memory allocated before it. The deadline is the
sooner of --budget-s and GPU_CHECK_DEADLINE (epoch seconds); rows are also appended to
GPU_CHECK_OUT/gpu_triton.log when GPU_CHECK_OUT is set.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from benchmarks import harness, providers
from benchmarks.harness import Case

STAGES = ("warm", "correctness", "paper", "bandwidth", "largec")


@dataclass(frozen=True)
class Plan:
    """Sizes and baselines of one run: the GPU figures, or a smoke run of the same code on the
    CPU (Triton interpreter, tiny sizes, no torch.compile, no CUDA-only measurements)."""

    device: str
    correctness: tuple  # (B, D, C)
    paper: tuple  # (B, D, C), fp32 and bf16
    bandwidth: tuple
    largec: tuple  # (B, D, C), bf16
    baselines: tuple
    stage_cost_s: dict  # a stage starts only if the deadline leaves this much


GPU_PLAN = Plan(
    device="cuda",
    # one program (paper), several programs with partials, and the tiled path; every case is
    # a fresh compilation, so the list is short
    correctness=((64, 1024, 7), (300, 130, 7), (257, 96, 1000)),
    paper=((64, 1024, 2), (64, 1024, 7)),
    bandwidth=((65536, 1024, 2), (65536, 1024, 7)),
    largec=((8192, 512, 100_000), (8192, 512, 1_000_000)),
    baselines=("reference", "compile"),
    stage_cost_s={"warm": 10, "correctness": 15, "paper": 30, "bandwidth": 30, "largec": 60},
)
SMOKE_PLAN = Plan(
    device="cpu",
    correctness=((20, 33, 2), (70, 17, 7), (9, 24, 40)),
    paper=((16, 64, 2),),
    bandwidth=((80, 64, 7),),
    largec=((32, 32, 100),),
    baselines=("reference",),
    stage_cost_s={"warm": 5, "correctness": 5, "paper": 5, "bandwidth": 5, "largec": 5},
)


_LOG = None


def say(*parts) -> None:
    """Print a row now (and append it to GPU_CHECK_OUT/gpu_triton.log when that is set)."""
    line = " ".join(["[triton]", *map(str, parts)])
    print(line, flush=True)
    if _LOG is not None:
        _LOG.write(line + "\n")
        _LOG.flush()


def _fmt_s(s: float) -> str:
    if s != s:  # NaN
        return "n/a"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"


def _fmt_b(b: float) -> str:
    return "n/a" if b != b else f"{b / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def stage_correctness(plan: Plan, deadline: float) -> bool:
    """A subset of tests/test_triton.py's matrix; True when every case passes."""
    sys.path.insert(0, os.path.join(harness.ROOT, "tests"))
    from helpers import check_against_reference, make_inputs

    import udat_kernels as uk

    ok = True
    for B, D, C in plan.correctness:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if time.monotonic() > deadline:
                say("correctness: deadline reached, remaining cases skipped")
                return ok
            for angular in (True, False):
                x, w, t = make_inputs(B, D, C, x_dtype=dtype, w_dtype=dtype, seed=C,
                                      device=plan.device)
                kw = {"label_smoothing": 0.1, "grl_lambda": 0.5}
                if not angular:
                    kw["bias"] = torch.randn(C, device=plan.device).to(dtype)
                fn = uk.angular_margin_cross_entropy if angular else uk.linear_cross_entropy
                name = f"{'angular' if angular else 'linear'} B={B} D={D} C={C} {dtype}"
                try:
                    check_against_reference(fn, x, w, t, angular=angular, backend="triton", **kw)
                    say(f"correctness {name}: ok")
                except AssertionError as e:
                    ok = False
                    say(f"correctness {name}: FAIL {e}")
    return ok


def _planned_specs(plan_: Plan) -> dict:
    """Every distinct specialization the later stages (and the GPU test subset's shapes) launch,
    planned for this device on meta tensors."""
    from udat_kernels.triton_backend import _runtime, plan

    info = _runtime.device_info(torch.device(plan_.device))
    calls = []
    for B, D, C in plan_.correctness:
        for dt in ("fp32", "bf16", "fp16"):
            calls += [dict(B=B, D=D, C=C, dtype=dt, normalize=n) for n in (True, False)]
    for B, D, C in plan_.paper + plan_.bandwidth:
        calls += [dict(B=B, D=D, C=C, dtype=dt) for dt in ("fp32", "bf16")]
    calls += [dict(B=B, D=D, C=C, dtype="bf16") for B, D, C in plan_.largec]
    specs = {}
    for c in calls:
        for gif in (True, False):
            rec = plan.plan(c["B"], c["D"], c["C"], c["dtype"], normalize=c.get("normalize", True),
                            grad_in_forward=gif, info=info)
            specs.update(rec.specs)
    return specs


def stage_warm(plan_: Plan, deadline: float) -> None:
    """Fill the compile cache in parallel (the runtime then finds every kernel compiled)."""
    import concurrent.futures as cf
    import multiprocessing

    from udat_kernels.triton_backend import aot

    specs = list(_planned_specs(plan_).values())
    if plan_.device != "cuda":
        say(f"warm: {len(specs)} specializations planned (nothing to compile under the "
            f"interpreter)")
        return
    t0 = time.monotonic()
    jobs = os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")  # CUDA is initialized: no fork
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        errors = [e for e in pool.map(aot.compile_into_cache, specs) if e]
    say(f"warm: {len(specs)} specializations compiled in {time.monotonic() - t0:.1f} s with "
        f"{jobs} processes" + (f"; {len(errors)} failed: {errors[:3]}" if errors else ""))


def _model(case: Case):
    from benchmarks import model_triton

    return model_triton.step(case.B, case.D, case.C, case.dtype)


def count_launches(case: Case) -> dict:
    """CUDA kernels (and memsets/copies) one forward+backward step of ours:triton launches."""
    from torch.profiler import ProfilerActivity, profile

    built = providers.build("ours:triton", case)
    for _ in range(3):  # compile and warm up outside the profile
        built.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        built.step()
        torch.cuda.synchronize()
    ours, torch_kernels, other = [], [], []
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.name
        if name.lower().startswith(("memset", "memcpy")):
            other.append(name)
        elif name.startswith("_") and "kernel" in name and "at::" not in name:
            ours.append(name)  # the Triton kernels, named after their jit functions
        else:
            torch_kernels.append(name[:60])  # e.g. autograd's fill of the seed gradient
    return {"ours": ours, "torch": torch_kernels, "memset_memcpy": len(other)}


def _row(case: Case, impl: str, graph: bool, budget_s: float) -> harness.Row:
    row = harness.measure(case, impl, budget_s=budget_s, graph=graph)
    graph_s = row.extra.get("graph_median_s", math.nan)
    say(f"{case.label()} {impl:12s} {row.status:7s} median {_fmt_s(row.median_s)}  "
        f"graph {_fmt_s(graph_s)}  extra peak {_fmt_b(row.peak_mem_bytes)}"
        + (f"  ({row.reason})" if row.reason else ""))
    return row


def stage_paper(plan: Plan, deadline: float) -> None:
    on_gpu = plan.device == "cuda"
    for B, D, C in plan.paper:
        for dtype in ("fp32", "bf16"):
            if time.monotonic() > deadline:
                say("paper: deadline reached, rest skipped")
                return
            case = Case("arcface", B, D, C, dtype=dtype, device=plan.device)
            if on_gpu:
                launches = count_launches(case)
                n = len(launches["ours"])
                say(f"{case.label()} launches: {n} Triton kernels {launches['ours']}, target "
                    f"<= 2: {'PASS' if n <= 2 else 'MISS'}; besides them "
                    f"{len(launches['torch'])} torch kernels {launches['torch']} and "
                    f"{launches['memset_memcpy']} memset/memcpy")
            ours = _row(case, "ours:triton", on_gpu, 2.0)
            model = _model(case)
            g = ours.extra.get("graph_median_s", math.nan)
            say(f"{case.label()} graph step target <= 30 us: "
                f"{'PASS' if g <= 30e-6 else 'MISS'} (measured {_fmt_s(g)}, modelled "
                f"{_fmt_s(model.graph_s)}, {model.triton_launches} Triton launches modelled)")
            for impl in plan.baselines:
                _row(case, impl, on_gpu, 1.0)


def stage_bandwidth(plan: Plan, deadline: float) -> None:
    bw = harness.copy_bandwidth(plan.device, nbytes=1 << (30 if plan.device == "cuda" else 24))
    say(f"device-to-device copy bandwidth {bw / 1e9:.0f} GB/s")
    for B, D, C in plan.bandwidth:
        for dtype in ("fp32", "bf16"):
            if time.monotonic() > deadline:
                say("bandwidth: deadline reached, rest skipped")
                return
            case = Case("arcface", B, D, C, dtype=dtype, device=plan.device)
            elem = torch.finfo(case.torch_dtype).bits // 8
            floor_s = 3 * case.B * case.D * elem / bw
            ours = _row(case, "ours:triton", False, 2.0)
            frac = floor_s / ours.median_s if ours.status == "ok" else math.nan
            model = _model(case)
            from benchmarks import model_triton

            mfrac = model_triton.three_pass_floor_s(B, D, dtype) / model.eager_s
            say(f"{case.label()} memory floor {_fmt_s(floor_s)}: {frac:.0%} of it, target "
                f">= 70%: {'PASS' if frac >= 0.7 else 'MISS'} (measured "
                f"{_fmt_s(ours.median_s)}; modelled {_fmt_s(model.eager_s)}, {mfrac:.0%} of "
                f"the model's floor)")
            for impl in plan.baselines:
                _row(case, impl, False, 1.0)


def stage_largec(plan: Plan, deadline: float) -> None:
    n = 8192 if plan.device == "cuda" else 256
    rate = harness.gemm_rate(torch.bfloat16, n=n, device=plan.device)
    say(f"bf16 GEMM rate {rate / 1e12:.3g} TFLOP/s")
    for B, D, C in plan.largec:
        if time.monotonic() > deadline:
            say("largec: deadline reached, rest skipped")
            return
        case = Case("arcface", B, D, C, dtype="bf16", device=plan.device)
        ours = _row(case, "ours:triton", False, 3.0)
        useful = 3 * 2 * case.B * case.C * case.D
        frac = useful / ours.median_s / rate if ours.status == "ok" else math.nan
        model = _model(case)
        from benchmarks.model_params import H200

        say(f"{case.label()} {frac:.0%} of the bf16 GEMM rate, target >= 50%: "
            f"{'PASS' if frac >= 0.5 else 'MISS'} (measured {_fmt_s(ours.median_s)}, extra peak "
            f"{_fmt_b(ours.peak_mem_bytes)}; modelled {_fmt_s(model.eager_s)}, "
            f"{useful / model.eager_s / H200['bf16_gemm_flop_per_s']:.0%}, extra peak "
            f"{_fmt_b(model.extra_peak_bytes)}, {model.bytes_per_logit:.1f} B/logit)")
        for impl in plan.baselines:
            if time.monotonic() > deadline:
                say(f"{case.label()} {impl}: skipped (deadline)")
                continue
            base = _row(case, impl, False, 2.0)
            if base.status != "ok" or ours.status != "ok":
                say(f"{case.label()} vs {impl}: not comparable ({base.status})")
                continue
            line = (f"{case.label()} vs {impl}: speedup {base.median_s / ours.median_s:.2f}x, "
                    f"extra peak memory {ours.peak_mem_bytes / base.peak_mem_bytes:.0%} of it")
            if impl == "reference":
                fits = ours.peak_mem_bytes <= 0.25 * base.peak_mem_bytes
                line += f" (target <= 25%: {'PASS' if fits else 'MISS'})"
            say(line)
        if plan.device == "cuda":
            torch.cuda.empty_cache()


RUNNERS = {"warm": stage_warm, "correctness": stage_correctness, "paper": stage_paper,
           "bandwidth": stage_bandwidth, "largec": stage_largec}


def run(budget_s: float, stages=STAGES, smoke: bool = False) -> int:
    """Run the stages in order within budget_s seconds; returns a process exit status.

    smoke: run every stage on the CPU through the Triton interpreter at tiny sizes (checks the
    code of this script where there is no GPU; its figures mean nothing).
    """
    deadline = time.monotonic() + budget_s
    if os.environ.get("GPU_CHECK_DEADLINE"):  # the calling script's deadline, epoch seconds
        left = float(os.environ["GPU_CHECK_DEADLINE"]) - time.time()
        deadline = min(deadline, time.monotonic() + left)
    plan = SMOKE_PLAN if smoke else GPU_PLAN
    if not smoke and not torch.cuda.is_available():
        for name in stages:
            say(f"{name}: skipped (no CUDA device; --smoke runs this script on the CPU)")
        return 0
    from udat_kernels import dispatch

    probe = torch.zeros(1, 1, device=plan.device)
    why = dispatch.get_backend("triton").reasons(probe, probe)
    if why:
        say("all stages skipped: backend 'triton' cannot serve: " + "; ".join(why))
        return 1
    status = 0
    for name in stages:
        left = deadline - time.monotonic()
        cost = plan.stage_cost_s[name]
        if left < cost:
            say(f"{name}: skipped ({left:.0f} s left, needs about {cost} s)")
            continue
        t0 = time.monotonic()
        say(f"{name}: start")
        try:
            if RUNNERS[name](plan, deadline) is False:
                status = 1
        except Exception as e:  # noqa: BLE001 - report and go on to the next stage
            status = 1
            say(f"{name}: ERROR {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        say(f"{name}: done in {time.monotonic() - t0:.1f} s")
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="seconds for all stages together (default 240)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--smoke", action="store_true",
                   help="run every stage on the CPU (Triton interpreter, tiny sizes)")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; expected {STAGES}")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    global _LOG
    out_dir = os.environ.get("GPU_CHECK_OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        _LOG = open(os.path.join(out_dir, "gpu_triton.log"), "a")
    try:
        return run(args.budget_s, stages, smoke=args.smoke)
    finally:
        if _LOG is not None:
            _LOG.close()


if __name__ == "__main__":
    sys.exit(main())
