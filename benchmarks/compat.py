"""Each drop-in of udat_kernels.compat against the original it replaces, on the same problem.

    python -m benchmarks.compat                  # the two CPU problems of docs/compat.md
    python -m benchmarks.compat --quick          # tiny sizes: checks that everything runs
    python -m benchmarks.compat --device cuda    # the same on a GPU
    python -m benchmarks.compat --out compat.json

One training step each: the loss of embeddings x (B, D, requiring grad, as a backbone's output)
and labels, then backward into x and the class centres. Pairs (original -> drop-in):

  pml ArcFaceLoss / CosFaceLoss -> udat_kernels.compat.pml ArcFaceLoss / CosFaceLoss
  arcface_torch's head, eager     -> compat.insightface.CombinedMarginLoss: its forward (the
                                     same eager head, our margin) and its fused_loss (the op)

arcface_torch is not installable: its head is written here from its published formulas
(normalized cosines clamped to [-1, 1]; ArcFace: arccos, + m2 on the target, cos, all under
no_grad; CosFace: target − m3; times s; cross-entropy), as in tests/test_compat_insightface.py.

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


def _fmt_time(s):
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
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
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
    for loss in PAIRS:
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
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
