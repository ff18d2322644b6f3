"""Each drop-in of udat_kernels.compat against the original it replaces, on the same problem.

    python -m benchmarks.compat                  # the CPU problems of docs/compat.md
    python -m benchmarks.compat --quick          # tiny sizes: checks that everything runs
    python -m benchmarks.compat --device cuda    # the single-device pairs on a GPU
    python -m benchmarks.compat --out compat.json
    python -m benchmarks.compat --only partial-fc   # PartialFC_V2 alone (two gloo ranks)

One training step each: the loss of embeddings x (B, D, requiring grad, as a backbone's output)
and labels, then backward into x and the class centres. Pairs (original -> drop-in):

  pml ArcFaceLoss / CosFaceLoss -> udat_kernels.compat.pml ArcFaceLoss / CosFaceLoss
  arcface_torch's head, eager     -> compat.insightface.CombinedMarginLoss: its forward (the
                                     same eager head, our margin) and its fused_loss (the op)

arcface_torch is not installable: its head is written here from its published formulas
(normalized cosines clamped to [-1, 1]; ArcFace: arccos, + m2 on the target, cos, all under
no_grad; CosFace: target − m3; times s; cross-entropy), as in tests/test_compat_insightface.py.

PartialFC_V2 (compat.insightface) runs over gloo ranks against the eager Partial FC-style head
of benchmarks/distributed.py (all-gathered embeddings, the global batch × local classes logits
materialized, the ArcFace margin in place, max and sum all-reduced, probabilities kept for the
backward), ArcFace s = 64, m2 = 0.5, on the same global batch and centres: one process per
rank, each rank's peak RSS growth during one step, the time per step of the slowest rank.

Time is the median of repeated steps (benchmarks/harness.py, `time_step`); memory is the peak
growth of one step from no gradients held, its new gradients included (CPU: peak RSS growth,
each implementation in a fresh process; GPU: max allocated growth).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import ROOT, peak_growth, time_step  # noqa: E402

SCALE = 64.0
ARC_DEG = 28.6                     # pytorch-metric-learning's default ArcFace margin (degrees)
ARC_RAD = math.radians(ARC_DEG)
COS_M = 0.35

# (original, drop-in) pairs, by loss; each name is one step builder below.
PAIRS = {
    "arcface": [("pml", "compat.pml"), ("arcface_torch", "compat.insightface.forward"),
                ("arcface_torch", "compat.insightface.fused_loss")],
    "cosface": [("pml", "compat.pml"), ("arcface_torch", "compat.insightface.forward"),
                ("arcface_torch", "compat.insightface.fused_loss")],
}
PROBLEMS = [(256, 512, 50_000), (256, 128, 10)]
QUICK = [(32, 16, 500), (32, 16, 7)]
# PartialFC_V2: (ranks, global batch, D, C); the original is benchmarks/distributed.py's
# Partial FC-style head, ArcFace at its s = 64, m = 0.5.
PFC_PROBLEM = (2, 256, 512, 50_000)
PFC_QUICK = (2, 32, 16, 500)  # a run check only: at D = 16 rows pass the 69.08 cap of the head
PFC_IMPLS = ("partial-fc", "compat.insightface.PartialFC_V2")
PFC_STEPS = 3


@dataclasses.dataclass
class Problem:
    loss: str  # arcface | cosface
    B: int
    D: int
    C: int
    device: str = "cpu"


def _data(p: Problem, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p.B, p.D, generator=g).to(p.device).requires_grad_()
    y = torch.randint(0, p.C, (p.B,), generator=g).to(p.device)
    return x, y


def _arcface_torch_head(x, weight, y, s, m2, m3):
    """arcface_torch's single-device head from its published formulas (module docstring)."""
    logits = F.linear(F.normalize(x), F.normalize(weight)).clamp(-1, 1)
    rows = torch.arange(x.shape[0], device=x.device)
    if m3 == 0:
        with torch.no_grad():
            target = logits[rows, y].arccos_() + m2
            logits.arccos_()
            logits[rows, y] = target
            logits.cos_()
    else:
        logits[rows, y] = logits[rows, y] - m3
    return F.cross_entropy(logits * s, y)


def build(impl: str, p: Problem):
    """(step, clear): a zero-argument training step of `impl` on problem `p`, and a function
    that drops the gradients it leaves."""
    torch.manual_seed(0)
    x, y = _data(p)
    m2, m3 = (ARC_RAD, 0.0) if p.loss == "arcface" else (0.0, COS_M)
    if impl in ("pml", "compat.pml"):
        if impl == "pml":
            from pytorch_metric_learning import losses as mod
        else:
            from udat_kernels.compat import pml as mod
        if p.loss == "arcface":
            loss_mod = mod.ArcFaceLoss(p.C, p.D, margin=ARC_DEG, scale=SCALE)
        else:
            loss_mod = mod.CosFaceLoss(p.C, p.D, margin=COS_M, scale=SCALE)
        loss_mod.to(p.device)
        params = [x, loss_mod.W]

        def loss_fn():
            return loss_mod(x, y)
    else:
        from udat_kernels.compat.insightface import CombinedMarginLoss

        weight = torch.nn.Parameter(torch.normal(0, 0.01, (p.C, p.D)).to(p.device))
        params = [x, weight]
        margin = CombinedMarginLoss(SCALE, 1.0, m2, m3)
        if impl == "arcface_torch":
            def loss_fn():
                return _arcface_torch_head(x, weight, y, SCALE, m2, m3)
        elif impl == "compat.insightface.forward":
            def loss_fn():
                cosines = F.linear(F.normalize(x), F.normalize(weight)).clamp(-1, 1)
                return F.cross_entropy(margin(cosines, y), y)
        elif impl == "compat.insightface.fused_loss":
            def loss_fn():
                return margin.fused_loss(x, weight, y)
        else:
            raise ValueError(f"impl: unknown {impl!r}")

    def clear():
        for t in params:
            t.grad = None

    def step():
        clear()
        loss = loss_fn()
        loss.backward()
        return loss

    return step, clear


def measure(impl: str, p: Problem, budget_s: float) -> dict:
    step, clear = build(impl, p)
    timing = time_step(step, device=p.device, budget_s=budget_s)
    clear()  # the memory of one step includes the gradients it makes
    mem, how = peak_growth(step, p.device)
    return {"impl": impl, "problem": dataclasses.asdict(p), "median_s": timing.median,
            "samples": len(timing.per_call_s), "peak_bytes": mem, "memory": how,
            "loss": float(timing.first_output.detach()), "threads": torch.get_num_threads()}


def measure_isolated(impl: str, p: Problem, budget_s: float) -> dict:
    """`measure` in a fresh process (CPU: the peak RSS of this step alone), with this process's
    number of torch threads."""
    spec = json.dumps({"impl": impl, "problem": dataclasses.asdict(p), "budget_s": budget_s,
                       "threads": torch.get_num_threads()})
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compat", "--one", spec], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join(proc.stderr.strip().splitlines()[-2:])
        return {"impl": impl, "problem": dataclasses.asdict(p), "error": tail}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# PartialFC_V2 over gloo ranks
# ---------------------------------------------------------------------------------------------

def _pfc_rank(spec: dict) -> None:
    """One rank of one implementation: warm-up, timed steps between barriers, then the peak RSS
    growth of one step; prints a JSON line."""
    import datetime

    import torch.distributed as dist

    from benchmarks.distributed import MARGIN, SCALE as PFC_SCALE, centres, \
        partial_fc_style_loss
    from benchmarks.harness import cpu_peak_rss_growth
    from udat_kernels.distributed import shard_range

    impl, rank, world = spec["impl"], spec["rank"], spec["world"]
    B, D, C = spec["batch"], spec["dim"], spec["classes"]
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=1800))
    g = torch.Generator().manual_seed(1234)
    x_all = torch.randn(B, D, generator=g)
    y_all = torch.randint(0, C, (B,), generator=g)
    rows = B // world
    x = x_all[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    y = y_all[rank * rows:(rank + 1) * rows].clone()
    del x_all, y_all
    start, n = shard_range(C, world, rank)
    if impl == "partial-fc":
        weight = torch.nn.Parameter(centres(start, n, D))

        def loss_fn():
            return partial_fc_style_loss(x, y, weight, start, dist.group.WORLD)
    else:
        from udat_kernels.compat.insightface import CombinedMarginLoss, PartialFC_V2

        head = PartialFC_V2(CombinedMarginLoss(PFC_SCALE, 1.0, MARGIN, 0.0), D, C)
        with torch.no_grad():
            head.weight.copy_(centres(start, n, D))
        weight = head.weight

        def loss_fn():
            return head(x, y)

    def step():
        x.grad = weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    loss = float(step().detach())  # warm-up
    times = []
    for _ in range(spec["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    x.grad = weight.grad = None
    dist.barrier()
    peak, method = cpu_peak_rss_growth(step)
    print(json.dumps({"rank": rank, "loss": loss, "times": times, "peak_bytes": peak,
                      "method": method}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def measure_partial_fc(impl: str, ranks: int, B: int, D: int, C: int, steps: int,
                       threads: int) -> dict:
    """`impl` on `ranks` fresh gloo processes; the slowest rank's median time per step and
    every rank's peak RSS growth."""
    import socket
    import statistics

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "benchmarks.compat", "--pfc-rank", json.dumps(dict(
            impl=impl, rank=r, world=ranks, port=port, batch=B, dim=D, classes=C, steps=steps,
            threads=threads))], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    reports, errors = [], []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            errors.append(" ".join(err.strip().splitlines()[-2:]) or f"exit {p.returncode}")
        else:
            reports.append(json.loads(lines[-1]))
    row = {"impl": impl, "ranks": ranks, "B": B, "D": D, "C": C, "threads_per_rank": threads}
    if errors:
        return dict(row, error="; ".join(errors))
    per_step = [max(r["times"][i] for r in reports) for i in range(steps)]
    return dict(row, median_s=statistics.median(per_step), min_s=min(per_step),
                max_s=max(per_step), peak_bytes=[r["peak_bytes"] for r in reports],
                memory=reports[0]["method"], loss=reports[0]["loss"])


def run_partial_fc(quick: bool, threads: int, rows: list) -> None:
    ranks, B, D, C = PFC_QUICK if quick else PFC_PROBLEM
    print(f"\n## PartialFC_V2, ArcFace s=64 m2=0.5, {ranks} gloo ranks × {threads} thread(s), "
          f"global batch {B} ({B // ranks} a rank), D={D}, C={C} ({C // ranks} a rank), fp32, "
          f"forward+backward\n")
    print("| implementation | time per step (median, min–max) | peak memory per rank | loss |")
    print("|---|---|---|---|")
    for impl in PFC_IMPLS:
        r = measure_partial_fc(impl, ranks, B, D, C, PFC_STEPS, threads)
        rows.append(r)
        if "error" in r:
            print(f"| {impl} | error: {r['error']} | | |", flush=True)
            continue
        peaks = " / ".join(_fmt_mem(b) for b in r["peak_bytes"])
        print(f"| {impl} | {_fmt_time(r['median_s'])} ({_fmt_time(r['min_s'])}–"
              f"{_fmt_time(r['max_s'])}) | {peaks} | {r['loss']:.4f} |", flush=True)


def _fmt_time(s):
    if s >= 1.0:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"


def _fmt_mem(b):
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per step")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--only", choices=("single-device", "partial-fc"), default=None,
                    help="run one part: the single-device pairs, or PartialFC_V2 (gloo ranks)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pfc-rank", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pfc_rank:
        _pfc_rank(json.loads(args.pfc_rank))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        spec = json.loads(args.one)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(measure(spec["impl"], Problem(**spec["problem"]), spec["budget_s"])))
        return 0
    shapes = QUICK if args.quick else PROBLEMS
    rows = []
    print(f"# compat drop-ins vs originals, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for loss in PAIRS if args.only != "partial-fc" else ():
        for B, D, C in shapes:
            p = Problem(loss, B, D, C, args.device)
            print(f"\n## {loss}, B={B}, D={D}, C={C}, fp32, forward+backward\n")
            print("| original | time | peak memory | drop-in | time | peak memory | speed-up "
                  "| memory ratio |")
            print("|---|---|---|---|---|---|---|---|")
            done = {}
            for orig, new in PAIRS[loss]:
                for impl in (orig, new):
                    if impl not in done:
                        run = measure_isolated if args.device == "cpu" else measure
                        done[impl] = run(impl, p, args.budget)
                        rows.append(done[impl])
                a, b = done[orig], done[new]
                if "error" in a or "error" in b:
                    print(f"| {orig} | {a.get('error', '')} | | {new} | {b.get('error', '')} "
                          f"| | | |")
                    continue
                print(f"| {orig} | {_fmt_time(a['median_s'])} | {_fmt_mem(a['peak_bytes'])} "
                      f"| {new} | {_fmt_time(b['median_s'])} | {_fmt_mem(b['peak_bytes'])} "
                      f"| {a['median_s'] / b['median_s']:.2f}× "
                      f"| {b['peak_bytes'] / max(a['peak_bytes'], 1):.2f} |", flush=True)
    if args.only != "single-device":
        if args.device == "cpu":
            # the torch threads of this process, shared among the ranks
            ranks = (PFC_QUICK if args.quick else PFC_PROBLEM)[0]
            run_partial_fc(args.quick, max(1, torch.get_num_threads() // ranks), rows)
        else:
            print("\nPartialFC_V2: CPU (gloo ranks) only here; on GPUs run it under torchrun "
                  "with NCCL — not measured")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
