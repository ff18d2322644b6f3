"""Side-by-side benchmark report: markdown tables, target ratios and PNG plots.

    python -m benchmarks.report                       # the CPU set of `make bench`
    python -m benchmarks.report --set quick           # tiny sizes: checks that everything runs
    python -m benchmarks.report --set full            # the whole CPU matrix (long)
    python -m benchmarks.report --device cuda --set gpu-paper,gpu-large
    python -m benchmarks.report --from-json bench.json   # render a pytest-benchmark run

Each group of cases is printed as soon as it is measured. On the CPU every (case, implementation)
pair runs in its own process, so that its peak RSS growth is its own; on the GPU all run in this
process and peak memory is torch.cuda.max_memory_allocated growth. The rows, the tables and the
plots (time and peak memory against the number of classes, one line per implementation) are
written to --out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import providers  # noqa: E402
from benchmarks.harness import (Case, Row, copy_bandwidth, gemm_rate, measure,  # noqa: E402
                                measure_isolated, three_gemms_time)

EXIT_NO_DEVICE = 3  # gpu_check.sh reports this exit status as "no CUDA device"
CPU_IMPLS = ["ours:cpu", "reference", "insightface", "pml", "compile", "torch-lce"]
# most telling first: a time limit cuts the end of the list
GPU_IMPLS = ["ours:cuda", "ours:triton", "reference", "compile", "liger", "cce", "torch-lce",
             "insightface", "pml"]


@dataclass
class Group:
    """Cases measured and printed together; `sweep` groups vary C only and are plotted."""

    key: str
    title: str
    cases: list[Case]
    impls: list[str]
    budget_s: float = 5.0
    sweep: bool = False
    graph: bool = False
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The sets
# ---------------------------------------------------------------------------------------------


def _cases(op, shapes, dtypes=("fp32",), modes=("fwd+bwd",), device="cpu"):
    return [Case(op, B, D, C, dt, mode, device) for dt in dtypes for mode in modes
            for (B, D, C) in shapes]


def cpu_groups(name: str) -> list[Group]:
    if name == "quick":
        return [
            Group("smoke", "Smoke run: tiny sizes",
                  _cases("arcface", [(64, 32, 7), (64, 32, 500)])
                  + _cases("arcface", [(64, 32, 500)], dtypes=("bf16",)),
                  ["ours:cpu", "reference", "insightface", "pml", "torch-lce"], budget_s=0.5),
            Group("sweep", "Smoke run: time and memory against C",
                  _cases("arcface", [(32, 16, 10), (32, 16, 100), (32, 16, 1000)]),
                  ["ours:cpu", "reference", "torch-lce"], budget_s=0.3, sweep=True),
        ]
    groups = [
        Group("targets", "Large head of the CPU targets: (1024, 512, 100000)",
              _cases("arcface", [(1024, 512, 100_000)]), ["ours:cpu", "reference", "compile"],
              budget_s=12.0,
              notes=["ArcFace s=64, m=0.5, fp32, forward+backward through loss.backward()."]),
        Group("targets-bf16", "The large head with bf16 x and W: (1024, 512, 100000)",
              _cases("arcface", [(1024, 512, 100_000)], dtypes=("bf16",)),
              ["ours:cpu", "reference", "compile"], budget_s=12.0,
              notes=["ArcFace s=64, m=0.5, bf16 x and W (loss and sums in fp32), "
                     "forward+backward; measured right after the fp32 rows above, against which "
                     "the targets below compare it."]),
        Group("small", "Small heads of the CPU targets: B=256, D=512, C=2 and 7",
              _cases("arcface", [(256, 512, 2), (256, 512, 7)]),
              ["ours:cpu", "reference", "insightface", "pml", "torch-lce"], budget_s=2.0,
              notes=["torch.compile is timed in the sweep and at C=100000 (each shape costs a "
                     "compilation of about 20 s on this machine)."]),
        Group("sweep", "Face-recognition heads: time and memory against C (B=256, D=512)",
              _cases("arcface", [(256, 512, 1000), (256, 512, 10_000), (256, 512, 100_000)]),
              CPU_IMPLS, budget_s=4.0, sweep=True),
        Group("paper", "The paper's domain and label heads (D=1024)",
              _cases("arcface", [(64, 1024, 2), (64, 1024, 7), (4096, 1024, 2), (4096, 1024, 7)]),
              ["ours:cpu", "reference", "insightface", "pml", "torch-lce"], budget_s=2.0),
        Group("bf16", "bf16 inputs (B=256, D=512, C=10000)",
              _cases("arcface", [(256, 512, 10_000)], dtypes=("bf16",)),
              ["ours:cpu", "reference", "insightface", "pml", "torch-lce"], budget_s=3.0),
        Group("linear", "Linear softmax head (linear_cross_entropy, no margin)",
              _cases("linear", [(64, 1024, 7), (256, 512, 10_000)]),
              ["ours:cpu", "reference", "torch-lce"], budget_s=3.0),
    ]
    if name == "default":
        return groups
    if name == "targets":
        return groups[:3]
    if name == "full":
        face = [(B, 512, C) for B in (256, 1024) for C in (10_000, 100_000)]
        paper = [(B, 1024, C) for B in (64, 4096) for C in (2, 7)]
        return groups + [
            Group("full-arc", "ArcFace, forward and forward+backward, fp32 and bf16",
                  _cases("arcface", face + paper, ("fp32", "bf16"), ("fwd", "fwd+bwd")),
                  CPU_IMPLS, budget_s=3.0),
            Group("full-cos", "CosFace (m3=0.35), fp32",
                  _cases("cosface", face[:2] + paper[:2]),
                  ["ours:cpu", "reference", "pml", "compile"], budget_s=3.0),
        ]
    raise SystemExit(f"--set: unknown CPU set {name!r}")


def gpu_groups(name: str) -> list[Group]:
    impls = GPU_IMPLS
    dev = "cuda"
    if name == "gpu-paper":
        return [
            Group("gpu-paper", "Paper heads (64, 1024, C): step time, CUDA-graph replay",
                  _cases("arcface", [(64, 1024, 2), (64, 1024, 7)], ("fp32", "bf16"),
                         device=dev), ["ours:cuda", "ours:triton", "reference", "compile"],
                  budget_s=1.0, graph=True),
            Group("gpu-bandwidth", "Bandwidth-bound heads (65536, 1024, C)",
                  _cases("arcface", [(65536, 1024, 2), (65536, 1024, 7)], ("fp32", "bf16"),
                         device=dev), ["ours:cuda", "ours:triton", "reference", "compile"],
                  budget_s=1.0),
        ]
    if name == "gpu-large":
        return [
            Group("gpu-large", "Face-recognition heads (8192, 512, C), bf16: time and memory vs C",
                  _cases("arcface", [(8192, 512, 10_000), (8192, 512, 100_000),
                                     (8192, 512, 1_000_000)], ("bf16",), device=dev),
                  impls, budget_s=1.0, sweep=True),
        ]
    if name == "gpu-quick":
        return [Group("gpu-quick", "GPU smoke run", _cases("arcface", [(64, 64, 7)], device=dev),
                      impls, budget_s=0.2, graph=True)]
    raise SystemExit(f"--set: unknown GPU set {name!r}")


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def fmt_time(s: float) -> str:
    if s is None or math.isnan(s):
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def fmt_mib(b: float) -> str:
    if b is None or math.isnan(b):
        return "–"
    return f"{b / 2 ** 20:.1f}"


def _ours_best(rows: list[Row]) -> Row | None:
    ours = [r for r in rows if r.impl.startswith("ours:") and r.status == "ok"]
    return min(ours, key=lambda r: r.median_s) if ours else None


def _ratio(a: float, b: float) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def group_table(rows: list[Row]) -> str:
    """Markdown: one line per (case, implementation), ratios against our fastest backend."""
    lines = ["| case | implementation | median | spread (min–max) | samples | peak MiB "
             "| time ÷ ours | memory ÷ ours | first call | loss |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for case in dict.fromkeys(r.case for r in rows):
        case_rows = [r for r in rows if r.case == case]
        best = _ours_best(case_rows)
        for r in case_rows:
            name = providers.DESCRIPTIONS.get(r.impl, r.impl)
            if r.status != "ok":
                lines.append(f"| {case.label()} | {name} | {r.status}: {r.reason} "
                             f"| | | | | | | |")
                continue
            spread = f"{fmt_time(r.min_s)} – {fmt_time(r.max_s)}"
            t_ratio = _ratio(r.median_s, best.median_s) if best else "–"
            m_ratio = _ratio(r.peak_mem_bytes, best.peak_mem_bytes) if best else "–"
            graph = r.extra.get("graph_median_s")
            med = fmt_time(r.median_s) + (f" (graph {fmt_time(graph)})" if graph else "")
            loss = r.extra.get("loss")
            lines.append(f"| {case.label()} | {name} | {med} | {spread} | "
                         f"{r.samples}×{r.calls_per_sample} | {fmt_mib(r.peak_mem_bytes)} | "
                         f"{t_ratio} | {m_ratio} | {fmt_time(r.first_call_s)} | "
                         f"{'' if loss is None else f'{loss:.5g}'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def _find(rows, impl, **case_fields) -> Row | None:
    for r in rows:
        if r.impl == impl and r.status == "ok" and all(
                getattr(r.case, k) == v for k, v in case_fields.items()):
            return r
    return None


def _check(label: str, value: float | None, goal: float, higher_is_better: bool, unit="×"):
    if value is None or math.isnan(value):
        return f"- {label}: not measured"
    ok = value >= goal if higher_is_better else value <= goal
    sign = "≥" if higher_is_better else "≤"
    return f"- {label}: {value:.2f}{unit} (target {sign} {goal:g}{unit}) — {'met' if ok else 'NOT met'}"


def cpu_target_lines(rows: list[Row]) -> list[str]:
    out = []
    big = dict(op="arcface", B=1024, D=512, C=100_000, dtype="fp32", mode="fwd+bwd")
    ours, eager, comp = (_find(rows, i, **big) for i in ("ours:cpu", "reference", "compile"))
    out.append(_check("(1024, 512, 100000) fp32 fwd+bwd, eager ÷ ours",
                      eager.median_s / ours.median_s if ours and eager else None, 1.5, True))
    out.append(_check("(1024, 512, 100000) fp32 fwd+bwd, torch.compile ÷ ours",
                      comp.median_s / ours.median_s if ours and comp else None, 1.2, True))
    out.append(_check("(1024, 512, 100000) peak RSS growth, ours ÷ eager",
                      100 * ours.peak_mem_bytes / eager.peak_mem_bytes if ours and eager
                      else None, 25, False, unit="%"))
    bf16 = dict(big, dtype="bf16")
    ours16, comp16 = _find(rows, "ours:cpu", **bf16), _find(rows, "compile", **bf16)
    out.append(_check("(1024, 512, 100000) bf16 fwd+bwd ÷ fp32 fwd+bwd, ours",
                      ours16.median_s / ours.median_s if ours16 and ours else None, 0.5, False))
    out.append(_check("(1024, 512, 100000) bf16 fwd+bwd, torch.compile ÷ ours",
                      comp16.median_s / ours16.median_s if ours16 and comp16 else None, 2, True))
    out.append(_check("(1024, 512, 100000) peak RSS growth, ours bf16 ÷ ours fp32",
                      100 * ours16.peak_mem_bytes / ours.peak_mem_bytes if ours16 and ours
                      else None, 100, False, unit="%"))
    for C in (2, 7):
        small = dict(op="arcface", B=256, D=512, C=C, dtype="fp32", mode="fwd+bwd")
        ours, eager = _find(rows, "ours:cpu", **small), _find(rows, "reference", **small)
        out.append(_check(f"(256, 512, {C}) fp32 fwd+bwd, eager ÷ ours",
                          eager.median_s / ours.median_s if ours and eager else None, 4, True))
    return out


def gpu_target_lines(rows: list[Row], ceilings: dict, shapes: set) -> list[str]:
    """The GPU targets (docs/design.md, "Performance model") for the (B, D, C) shapes in `shapes` (those this run measured)."""
    out = []
    for impl, limit_us in (("ours:triton", 30), ("ours:cuda", 20)):
        for C in (2, 7):
            if (64, 1024, C) not in shapes:
                continue
            r = _find(rows, impl, B=64, D=1024, C=C, dtype="fp32", mode="fwd+bwd")
            g = r.extra.get("graph_median_s") if r else None
            out.append(_check(f"{impl} (64, 1024, {C}) fp32 CUDA-graph step", g * 1e6 if g else None,
                              limit_us, False, unit=" µs"))
    bw = ceilings.get("copy_bytes_per_s")
    for impl, goal in (("ours:triton", 70), ("ours:cuda", 80)):
        for dt in ("fp32", "bf16"):
            for C in (2, 7):
                if (65536, 1024, C) not in shapes:
                    continue
                r = _find(rows, impl, B=65536, D=1024, C=C, dtype=dt, mode="fwd+bwd")
                pct = None
                if r and bw:
                    nbytes = 3 * 65536 * 1024 * torch.finfo(r.case.torch_dtype).bits // 8
                    pct = 100 * nbytes / bw / r.median_s
                out.append(_check(f"{impl} (65536, 1024, {C}) {dt}, share of the bandwidth floor",
                                  pct, goal, True, unit="%"))
    flops = ceilings.get("bf16_flop_per_s")
    for C in (100_000, 1_000_000):
        if (8192, 512, C) not in shapes:
            continue
        shape = dict(B=8192, D=512, C=C, dtype="bf16", mode="fwd+bwd")
        eager, comp = _find(rows, "reference", **shape), _find(rows, "compile", **shape)
        for impl in ("ours:triton", "ours:cuda"):
            r = _find(rows, impl, **shape)
            pct = 100 * 6 * 8192 * 512 * C / r.median_s / flops if r and flops else None
            out.append(_check(f"{impl} (8192, 512, {C}) bf16, share of the bf16 GEMM rate", pct,
                              50, True, unit="%"))
            out.append(_check(f"{impl} (8192, 512, {C}) bf16, torch.compile ÷ ours",
                              comp.median_s / r.median_s if r and comp else None, 1.0, True))
            out.append(_check(f"{impl} (8192, 512, {C}) bf16, peak memory ours ÷ eager",
                              100 * r.peak_mem_bytes / eager.peak_mem_bytes if r and eager
                              else None, 25, False, unit="%"))
            gemms = ceilings.get(f"three_gemms_s_{C}")
            if impl == "ours:cuda" and C == 100_000:
                out.append(_check(f"{impl} (8192, 512, {C}) bf16, time ÷ three cuBLAS GEMMs",
                                  r.median_s / gemms if r and gemms else None, 1.5, False))
    return out


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def plot_sweep(rows: list[Row], path_prefix: str, title: str) -> list[str]:
    """time-vs-C and memory-vs-C PNGs, one line per implementation; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric, ylabel, suffix, scale in (("median_s", "time per step (ms)", "time", 1e3),
                                          ("peak_mem_bytes", "extra peak memory (MiB)", "memory",
                                           1 / 2 ** 20)):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for impl in dict.fromkeys(r.impl for r in rows):
            pts = sorted((r.case.C, getattr(r, metric) * scale) for r in rows
                         if r.impl == impl and r.status == "ok"
                         and not math.isnan(getattr(r, metric)))
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker="o",
                    label=providers.DESCRIPTIONS.get(impl, impl),
                    linewidth=2.5 if impl.startswith("ours:") else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of classes C")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = f"{path_prefix}_{suffix}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


# The CPU flags that decide which kernels run (ours and oneDNN's): vector width, bf16 units.
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
              "amx_bf16", "amx_tile")


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [fl for fl in _CPU_FLAGS if fl in have]
    except OSError:
        pass
    return []


def cpu_features_line(env: dict) -> str:
    """One sentence: which CPU features the CPU backend used in this run."""
    k = env.get("cpu_kernels") or {}
    if not k:
        return "CPU kernels: unknown (extension not built)."
    bf16 = ("bf16 GEMMs on AVX-512 BF16 (vdpbf16ps, float32 sums)" if k.get("bf16_gemm") ==
            "avx512_bf16" else "no bf16 GEMM (bf16 inputs took float32 GEMMs)")
    return (f"CPU features: {', '.join(env.get('cpu_flags') or ['?'])}. Our CPU backend ran "
            f"{bf16}; float32 GEMMs through {k.get('fp32_gemm')}; row loops "
            f"{k.get('row_loops')}.")


def environment(device: str) -> dict:
    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "cpu": _cpu_name(), "cpu_flags": _cpu_flags()}
    try:
        import udat_kernels

        env["udat_kernels"] = udat_kernels.build_info()
        env["cpu_kernels"] = udat_kernels._C_loader.cpu_kernels()
    except Exception as e:  # noqa: BLE001 - the report says what it ran against
        env["udat_kernels"] = f"unavailable: {e}"
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def run_group(group: Group, *, isolate: bool, repeat: int, deadline: float) -> list[Row]:
    rows = []
    for case in group.cases:
        for impl in group.impls:
            if time.monotonic() > deadline:
                rows.append(Row(case, impl, status="skipped", reason="time limit reached"))
                continue
            runs = []
            for _ in range(repeat):
                if isolate:
                    runs.append(measure_isolated(case, impl, budget_s=group.budget_s))
                else:
                    runs.append(measure(case, impl, budget_s=group.budget_s, graph=group.graph))
            rows.append(_merge(runs))
    return rows


def _merge(runs: list[Row]) -> Row:
    """Several processes of one pair: median of their medians, spread over all of them."""
    ok = [r for r in runs if r.status == "ok"]
    if len(runs) == 1 or not ok:
        return runs[0]
    row = ok[0]
    meds = sorted(r.median_s for r in ok)
    row.median_s = statistics.median(meds)
    row.min_s, row.max_s = min(r.min_s for r in ok), max(r.max_s for r in ok)
    row.samples = sum(r.samples for r in ok)
    row.peak_mem_bytes = statistics.median(r.peak_mem_bytes for r in ok)
    row.extra["process_medians_s"] = meds
    return row


def end_to_end_section(quick: bool) -> str:
    """The compact VGG16's training throughput with fused and eager heads (CPU)."""
    from benchmarks import end_to_end

    t0 = time.monotonic()
    try:
        res = end_to_end.measure("vgg16-compact", "cpu", batch=64, steps=3 if quick else 15,
                                 warmup=1 if quick else 3)
        body = end_to_end.table(res, "vgg16-compact", 64, "off")
    except end_to_end.Unavailable as e:
        body = f"skipped: {e}"
    return (f"## End to end: one UDAT-AS training step\n\n{body}\n\n"
            f"({time.monotonic() - t0:.0f} s)\n")


def measure_ceilings(groups: list[Group]) -> dict:
    out = {"copy_bytes_per_s": copy_bandwidth(), "bf16_flop_per_s": gemm_rate(torch.bfloat16)}
    for g in groups:
        if g.key == "gpu-large":
            for case in g.cases:
                out[f"three_gemms_s_{case.C}"] = three_gemms_time(case.B, case.D, case.C,
                                                                  case.torch_dtype)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--set", default=None,
                    help="comma-separated: default, quick, targets, full (CPU); gpu-paper, "
                         "gpu-large, gpu-quick (CUDA)")
    ap.add_argument("--out", default=os.path.join("runs", "bench"),
                    help="folder for results.json, report.md and the plots")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each pair in this many processes (spread across processes)")
    ap.add_argument("--time-limit", type=float, default=math.inf,
                    help="seconds; pairs not started by then are reported as skipped")
    ap.add_argument("--in-process", action="store_true",
                    help="on the CPU, measure in this process (peak RSS then less exact)")
    ap.add_argument("--no-e2e", action="store_true",
                    help="leave out the end-to-end training throughput (CPU sets)")
    ap.add_argument("--from-json", help="render a pytest-benchmark JSON file instead of running")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        return render_pytest_benchmark(args.from_json, args.out)

    start = time.monotonic()
    deadline = start + args.time_limit
    set_names = (args.set or ("default" if args.device == "cpu" else "gpu-paper,gpu-large"))
    groups = []
    for name in set_names.split(","):
        groups += gpu_groups(name) if args.device == "cuda" else cpu_groups(name)
    no_device = args.device == "cuda" and not torch.cuda.is_available()
    env = environment(args.device)
    command = ("python " + ("-m benchmarks.report" if __package__ else "benchmarks/report.py")
               + "".join(" " + shlex.quote(a) for a in sys.argv[1:]))
    where = env.get("gpu") or f"{env['cpu']}, {env['threads']} threads"
    print(f"# udat-kernels benchmark report\n\n`{command}` — {env['date']}, torch {env['torch']}, "
          f"{where}\n", flush=True)
    if args.device == "cpu":
        print(cpu_features_line(env) + "\n", flush=True)
    ceilings = {}
    requested = groups
    if no_device:
        print("no CUDA device: nothing measured\n", flush=True)
        groups = []
    elif args.device == "cuda":
        ceilings = measure_ceilings(groups)
        print("Measured ceilings: copy bandwidth "
              f"{ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s, bf16 GEMM "
              f"{ceilings['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s\n", flush=True)

    all_rows, md = [], []
    for group in groups:
        t0 = time.monotonic()
        rows = run_group(group, isolate=args.device == "cpu" and not args.in_process,
                         repeat=args.repeat, deadline=deadline)
        all_rows += rows
        text = f"## {group.title}\n\n" + "".join(n + "\n\n" for n in group.notes) \
            + group_table(rows) + f"\n\n({time.monotonic() - t0:.0f} s)\n"
        if group.sweep:
            paths = plot_sweep(rows, os.path.join(args.out, group.key), group.title)
            text += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                     for p in paths) + "\n"
        print(text, flush=True)
        md.append(text)

    if args.device == "cpu" and not args.no_e2e and set_names != "targets":
        text = end_to_end_section(quick="quick" in set_names.split(","))
        print(text, flush=True)
        md.append(text)

    if args.device == "cuda":
        shapes = {(c.B, c.D, c.C) for g in requested for c in g.cases}
        targets = gpu_target_lines(all_rows, ceilings, shapes)
    else:
        targets = cpu_target_lines(all_rows)
    text = "## Targets\n\n" + "\n".join(targets) + "\n"
    print(text, flush=True)
    md.append(text)
    print(f"total {time.monotonic() - start:.0f} s; results in {args.out}")

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": command, "environment": env, "ceilings": ceilings,
                   "rows": [r.to_json() for r in all_rows]}, f, indent=1)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        head = f"`{command}` — {env['date']}\n\n"
        if args.device == "cpu":
            head += cpu_features_line(env) + "\n\n"
        f.write(head + "\n".join(md))
    return EXIT_NO_DEVICE if no_device else 0


def render_pytest_benchmark(path: str, out: str) -> int:
    """Tables and plots from `pytest benchmarks/ --benchmark-json=path`."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "case" not in info:
            continue
        st = b["stats"]
        rows.append(Row(Case(**info["case"]), info["impl"], median_s=st["median"],
                        min_s=st["min"], max_s=st["max"], q1_s=st["q1"], q3_s=st["q3"],
                        samples=st["rounds"], calls_per_sample=st.get("iterations", 1),
                        peak_mem_bytes=info.get("peak_mem_bytes") or math.nan,
                        mem_method=info.get("mem_method", "")))
    print(f"# pytest-benchmark run {data.get('datetime', '')}\n")
    by_op = {}
    for r in rows:
        by_op.setdefault((r.case.op, r.case.dtype, r.case.mode, r.case.B, r.case.D), []).append(r)
    for key, rs in by_op.items():
        title = "{} {} {} B={} D={}".format(*key)
        print(f"## {title}\n\n{group_table(rs)}\n")
        if len({r.case.C for r in rs}) > 2:
            slug = "_".join(str(k) for k in key).replace("+", "")
            for p in plot_sweep(rs, os.path.join(out, f"pytest_{slug}"), title):
                print(f"![{os.path.basename(p)}]({os.path.basename(p)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
