"""The class-parallel loss: peak memory per rank and time per step (docs/distributed.md,
"Benchmark").

Three implementations of one ArcFace step (s = 64, m = 0.5, fp32, forward and backward into the
embeddings and the class centres) on the same global batch:

  sharded      udat_kernels.distributed.ShardedAngularMarginLoss over N gloo ranks (the table
               says which shard mode ran: the compiled one of the backend, or the reference)
  partial-fc   a plain-PyTorch class-parallel baseline written from Partial FC's published
               design: all-gathered embeddings, the (global batch × local classes) cosine
               logits materialized, the margin applied in place, max and sum of exponentials
               all-reduced, the probabilities kept for the backward (which reads the upstream
               gradient on the host)
  single       udat_kernels.angular_margin_cross_entropy on one process, the whole head

Each implementation runs in fresh processes (one per rank), so that every rank's peak RSS
growth during one step (benchmarks/harness.py, "Peak memory") is its own. Time per step is the
median over the timed steps of the slowest rank, each step between two barriers.

    python -m benchmarks.distributed                     # 2 ranks, D = 512, B = 1024, C = 200,000
    python -m benchmarks.distributed --classes 1000000   # the full size, where memory allows
    python -m benchmarks.distributed --quick             # tiny: checks that every row runs

The default C is scaled down from 10^6: the Partial FC-style baseline needs several copies of
the 1024 × 500,000 fp32 logits per rank (2 GB each), which two CPU ranks cannot hold beside
others on a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("sharded", "partial-fc", "single")
SCALE, MARGIN = 64.0, 0.5
# The collectives' names of torch 2.14, and of older releases.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_BLOCK = 4096


def centres(start, n, D):
    """Rows [start, start + n) of one fixed (C, D) head, drawn in seeded blocks of rows, so that
    every implementation and every shard layout trains the same centres."""
    first, last = start // _BLOCK, (start + n + _BLOCK - 1) // _BLOCK
    blocks = [torch.randn(_BLOCK, D, generator=torch.Generator().manual_seed(10_000 + k)) * 0.01
              for k in range(first, last)]
    whole = torch.cat(blocks) if blocks else torch.empty(0, D)
    return whole[start - first * _BLOCK:start - first * _BLOCK + n].contiguous()


# ---------------------------------------------------------------------------------------------
# The Partial FC-style baseline (plain PyTorch, materializes the logits)
# ---------------------------------------------------------------------------------------------

class _GatherRows(torch.autograd.Function):
    """All-gather of equal-size row blocks; the backward sums every rank's gradient of the
    gathered rows, keeps this rank's block and multiplies it by N (Partial FC's convention)."""

    @staticmethod
    def forward(ctx, x, group):
        n = dist.get_world_size(group)
        out = x.new_empty((n * x.shape[0], x.shape[1]))
        _ALL_GATHER(out, x.contiguous(), group=group)
        ctx.group, ctx.n = group, n
        return out

    @staticmethod
    def backward(ctx, grad):
        mine = grad.new_empty((grad.shape[0] // ctx.n, grad.shape[1]))
        _REDUCE_SCATTER(mine, grad.contiguous(), group=ctx.group)
        return mine * ctx.n, None


class _ClassParallelCE(torch.autograd.Function):
    """Softmax cross-entropy of logits split by class over the ranks: the row maximum and the
    sum of exponentials are all-reduced, the logits are turned into probabilities in place and
    kept for the backward."""

    @staticmethod
    def forward(ctx, logits, local_target, group):
        row_max = logits.max(dim=1, keepdim=True).values
        dist.all_reduce(row_max, dist.ReduceOp.MAX, group=group)
        logits.sub_(row_max).exp_()
        denom = logits.sum(dim=1, keepdim=True)
        dist.all_reduce(denom, group=group)
        logits.div_(denom)
        owned = torch.nonzero(local_target >= 0).squeeze(1)
        p_target = logits.new_zeros(logits.shape[0])
        p_target[owned] = logits[owned, local_target[owned]]
        dist.all_reduce(p_target, group=group)
        ctx.save_for_backward(logits, local_target, owned)
        return -p_target.clamp_min(1e-30).log().mean()

    @staticmethod
    def backward(ctx, grad):
        probs, local_target, owned = ctx.saved_tensors
        probs[owned, local_target[owned]] -= 1.0
        probs.div_(probs.shape[0])
        return probs * grad.item(), None, None


def partial_fc_style_loss(x_local, labels_local, weight_shard, class_start, group):
    x_all = _GatherRows.apply(x_local, group)
    labels = labels_local.new_empty(x_all.shape[0])
    _ALL_GATHER(labels, labels_local, group=group)
    n_local = weight_shard.shape[0]
    owned = (labels >= class_start) & (labels < class_start + n_local)
    local_target = torch.where(owned, labels - class_start, torch.full_like(labels, -1))
    logits = F.linear(F.normalize(x_all), F.normalize(weight_shard)).clamp(-1, 1)
    with torch.no_grad():  # ArcFace margin on the target column, straight-through gradient
        rows = torch.nonzero(owned).squeeze(1)
        cols = local_target[rows]
        logits[rows, cols] = torch.cos(torch.arccos(logits[rows, cols]) + MARGIN)
    return _ClassParallelCE.apply(logits * SCALE, local_target, group)


# ---------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------

def _rank_main(spec):
    from benchmarks.harness import cpu_peak_rss_growth

    impl, rank, world = spec["impl"], spec["rank"], spec["world"]
    B, D, C = spec["batch"], spec["dim"], spec["classes"]
    torch.set_num_threads(spec["threads"])
    group = None
    if impl != "single":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}",
                                rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=1800))
    g = torch.Generator().manual_seed(1234)
    # The same global batch for every implementation; each rank takes its rows.
    x_global = torch.randn(B, D, generator=g)
    labels_global = torch.randint(0, C, (B,), generator=g)
    rows = B // world
    x = x_global[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    labels = labels_global[rank * rows:(rank + 1) * rows].clone()
    del x_global, labels_global

    mode = None
    if impl == "sharded":
        from udat_kernels import dispatch
        from udat_kernels.distributed import ShardedAngularMarginLoss, shard_mode

        head = ShardedAngularMarginLoss(C, D, scale=SCALE, margin=MARGIN, timeout=1800)
        backend = dispatch.select(head.backend, x, head.weight).name
        mode = f"{backend} {'compiled' if backend in shard_mode.COMPILED else 'reference'}"
        with torch.no_grad():
            head.weight.copy_(centres(head.class_start, head.num_local, D))
        weight = head.weight

        def loss_fn():
            return head(x, labels)
    elif impl == "partial-fc":
        from udat_kernels.distributed import shard_range

        start, n = shard_range(C, world, rank)
        weight = torch.nn.Parameter(centres(start, n, D))
        group = dist.group.WORLD

        def loss_fn():
            return partial_fc_style_loss(x, labels, weight, start, group)
    else:
        from udat_kernels import angular_margin_cross_entropy

        weight = torch.nn.Parameter(centres(0, C, D))

        def loss_fn():
            return angular_margin_cross_entropy(x, weight, labels, scale=SCALE, margin=MARGIN)

    def step():
        x.grad = None
        weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    def barrier():
        if impl != "single":
            dist.barrier()

    loss = float(step())  # warm-up
    times = []
    for _ in range(spec["steps"]):
        barrier()
        t0 = time.perf_counter()
        step()
        barrier()
        times.append(time.perf_counter() - t0)
    x.grad = None
    weight.grad = None
    barrier()
    peak, method = cpu_peak_rss_growth(step)
    print(json.dumps({"rank": rank, "loss": loss, "times": times, "peak_bytes": peak,
                      "method": method, "shard_mode": mode}), flush=True)
    if impl != "single":
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Launcher and report
# ---------------------------------------------------------------------------------------------

def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_impl(impl, args):
    world = 1 if impl == "single" else args.ranks
    threads = args.threads * (args.ranks if impl == "single" else 1)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    for rank in range(world):
        spec = dict(impl=impl, rank=rank, world=world, port=port, batch=args.batch,
                    dim=args.dim, classes=args.classes, steps=args.steps, threads=threads)
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.distributed",
                                       "--rank-spec", json.dumps(spec)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports, errors = [], []
    deadline = time.monotonic() + args.timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return {"impl": impl, "error": f"timed out after {args.timeout} s"}
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            errors.append(" ".join(err.strip().splitlines()[-3:]) or f"exit {p.returncode}")
        else:
            reports.append(json.loads(lines[-1]))
    if errors:
        return {"impl": impl, "error": "; ".join(errors)}
    per_step = [max(r["times"][i] for r in reports) for i in range(args.steps)]
    return {"impl": impl, "processes": world, "threads": threads,
            "peak_mib": [r["peak_bytes"] / 2**20 for r in reports],
            "method": reports[0]["method"], "shard_mode": reports[0].get("shard_mode"),
            "median_s": statistics.median(per_step),
            "min_s": min(per_step), "max_s": max(per_step), "loss": reports[0]["loss"]}


def report(rows, args):
    print(f"\nArcFace s={SCALE:g} m={MARGIN}, fp32, D={args.dim}, global batch {args.batch} "
          f"({args.batch // args.ranks} a rank), C={args.classes}, {args.ranks} gloo ranks, "
          f"{args.steps} timed steps\n")
    print("| implementation | processes × threads | peak RSS growth per rank (MiB) | "
          "time per step (median, min–max) | loss |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | – | – | – | error: {r['error']} |")
            continue
        peaks = ", ".join(f"{p:.0f}" for p in r["peak_mib"])
        name = r["impl"] + (f" ({r['shard_mode']} shard mode)" if r.get("shard_mode") else "")
        print(f"| {name} | {r['processes']} × {r['threads']} | {peaks} | "
              f"{r['median_s']:.3f} s ({r['min_s']:.3f}–{r['max_s']:.3f}) | {r['loss']:.4f} |")
    by = {r["impl"]: r for r in rows if "error" not in r}
    if "sharded" in by and "partial-fc" in by:
        ours, base = by["sharded"], by["partial-fc"]
        mem = max(ours["peak_mib"]) / max(base["peak_mib"])
        speed = base["median_s"] / ours["median_s"]
        print(f"\nsharded ÷ partial-fc: peak memory per rank {100 * mem:.1f}% (target ≤ 25%), "
              f"time per step {1 / speed:.2f}× (target ≤ 1×)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank-spec", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1024, help="global batch (split evenly)")
    ap.add_argument("--classes", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    ap.add_argument("--impl", default=",".join(IMPLS))
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--quick", action="store_true", help="D=64, B=64, C=2000, 2 steps")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    if args.rank_spec:
        _rank_main(json.loads(args.rank_spec))
        return 0
    if args.quick:
        args.dim, args.batch, args.classes, args.steps = 64, 64, 2000, 2
    if args.batch % args.ranks:
        ap.error("--batch must be a multiple of --ranks")
    rows = []
    for impl in args.impl.split(","):
        if impl not in IMPLS:
            ap.error(f"--impl: unknown {impl!r}; expected some of {IMPLS}")
        rows.append(run_impl(impl, args))
        print(json.dumps(rows[-1]), flush=True)
    report(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
