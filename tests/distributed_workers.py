"""Processes of the distributed tests: a launcher (free port, time limit) and the scenarios each
rank runs (`python tests/distributed_workers.py SCENARIO RANK WORLD PORT OUT`).

A scenario returns a dict that the rank saves to OUT/rank<r>.pt; tests/test_distributed.py
reads them. Every comparison is made inside the ranks against the float64 reference op on the
same global data (docs/math.md, "Closeness and tolerances"), and reported as (error, bound).
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# ---------------------------------------------------------------------------------------------
# Launcher (runs in the pytest process)
# ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, out: Path, timeout_s: float = 60.0,
           script: str = __file__):
    """Run `scenario` of the worker file `script` (this one by default) on `world` gloo ranks;
    kill everything left after `timeout_s`.
    Returns (return codes, combined output per rank, results per rank or None)."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(Path(script)), scenario, str(r), str(world),
                               str(port), str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + timeout_s
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(0.1, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs.append(p.communicate()[0])
            raise AssertionError(f"{scenario} on {world} ranks did not finish in {timeout_s} s:\n"
                                 + "\n".join(logs))
    results = []
    for r in range(world):
        f = out / f"rank{r}.pt"
        results.append(torch.load(f, weights_only=False) if f.exists() else None)
    return [p.returncode for p in procs], logs, results


# ---------------------------------------------------------------------------------------------
# Scenarios (run in the ranks)
# ---------------------------------------------------------------------------------------------

def _global_data(B_rows, C, D, dtype, seed, ignore=()):
    """The global batch and head; bfloat16 means bfloat16 embeddings with float32 centres."""
    from helpers import make_inputs

    B = sum(B_rows)
    w_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    x, w, t = make_inputs(B, D, C, x_dtype=dtype, w_dtype=w_dtype, seed=seed)
    for i in ignore:
        if i < B:
            t[i] = -100
    return x, w, t


def _errors(got, want, dtype, name, torch_own=None):
    from helpers import spec_error, tolerance

    rtol, atol = tolerance(dtype)
    err, bound = spec_error(got, want, rtol, atol, name)
    if err > bound and torch_own is not None:
        # docs/math.md: where the problem is ill-conditioned, twice PyTorch's own error.
        own, _ = spec_error(torch_own, want, rtol, atol, name)
        bound = max(bound, 2 * own)
    return err, bound


CASES = {
    # name: (C, rows per rank by world size, dtype, loss keywords, forward keywords)
    "default": (7, {2: [5, 3], 3: [4, 0, 5]}, torch.float32, {}, {}),
    "ignore_smoothing_class_weight": (
        7, {2: [6, 4], 3: [3, 0, 6]}, torch.float32,
        {"label_smoothing": 0.1, "class_weight": "C", "ignore_index": -100}, {"sw": True}),
    "sum_cosface_straight_through_grl": (
        9, {2: [4, 5], 3: [2, 3, 4]}, torch.float32,
        {"reduction": "sum", "margin": 0.0, "cos_margin": 0.35,
         "margin_grad": "straight_through", "grl_lambda": 0.5}, {}),
    "none_both_margins": (
        8, {2: [3, 4], 3: [1, 5, 2]}, torch.float32,
        {"reduction": "none", "margin": 0.3, "cos_margin": 0.2, "label_smoothing": 0.05}, {}),
    "float64_weighted": (
        7, {2: [5, 2], 3: [0, 4, 3]}, torch.float64,
        {"label_smoothing": 0.2, "class_weight": "C"}, {"sw": True}),
    "fewer_classes_than_ranks": (2, {2: [3, 3], 3: [2, 2, 3]}, torch.float32, {}, {}),
    "every_rank_empty": (5, {2: [0, 0], 3: [0, 0, 0]}, torch.float32, {}, {}),
    "bfloat16_embeddings": (7, {2: [4, 4], 3: [3, 3, 2]}, torch.bfloat16,
                            {"label_smoothing": 0.1}, {}),
    "sampled": (40, {2: [6, 5], 3: [4, 0, 6]}, torch.float32,
                {"sample_rate": 0.3, "label_smoothing": 0.1, "class_weight": "C"}, {}),
}
# The Triton shard mode, where the Triton interpreter runs it on these CPU tensors (the test
# session sets TRITON_INTERPRET=1 without a GPU; the ranks inherit it).
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and importlib.util.find_spec("triton"):
    CASES["triton_weighted"] = (5, {2: [4, 3], 3: [3, 0, 4]}, torch.float32,
                                {"backend": "triton", "label_smoothing": 0.1,
                                 "class_weight": "C", "grl_lambda": 0.5}, {"sw": True})


def _run_case(name, rank, world):
    import torch.distributed as dist

    from udat_kernels import reference
    from udat_kernels.distributed import ShardedAngularMarginLoss

    C, by_world, dtype, loss_kw, fwd = CASES[name]
    rows = by_world[world]
    D = 8
    x, w, t = _global_data(rows, C, D, dtype, seed=len(name) * 7 + world, ignore=(1, 6))
    B = x.shape[0]
    g = torch.Generator().manual_seed(11)
    loss_kw = dict(loss_kw)
    if loss_kw.get("class_weight") == "C":
        loss_kw["class_weight"] = (torch.rand(C, generator=g) + 0.2).to(w.dtype)
    sw = (torch.rand(B, generator=g) + 0.2).to(w.dtype) if fwd.get("sw") else None
    lo = sum(rows[:rank])
    hi = lo + rows[rank]

    head = ShardedAngularMarginLoss(C, D, dtype=w.dtype, chunk_rows=3, timeout=30, **loss_kw)
    start, n = head.class_start, head.num_local
    with torch.no_grad():
        head.weight.copy_(w[start:start + n])
    x_local = x[lo:hi].clone().requires_grad_()
    loss = head(x_local, t[lo:hi], None if sw is None else sw[lo:hi])
    upstream = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)
    loss.backward(upstream)

    # The single-process op on the same global data (the sampled centres when sampling).
    kw = {k: v for k, v in loss_kw.items() if k not in ("sample_rate", "backend")}
    ref_w, ref_t, where = w, t, None
    if head.sample_rate < 1:
        every = [None] * world
        dist.all_gather_object(every, head.last_sampled_classes.tolist())
        ids = torch.tensor(sorted(sum(every, [])), dtype=torch.int64)
        ref_w = w[ids]
        valid = t != -100
        ref_t = torch.where(valid, torch.searchsorted(ids, torch.where(valid, t, 0)), -1)
        kw["ignore_index"] = -1
        if "class_weight" in kw:
            kw["class_weight"] = kw["class_weight"][ids]
        where = ids
    def op(xx, ww, cast):
        """The reference op in `cast` (float64), or on the inputs as given (cast None)."""
        if cast is not None:
            xx, ww = xx.to(cast), ww.to(cast)
        kk = {k: (v.to(cast) if isinstance(v, torch.Tensor) and cast is not None else v)
              for k, v in kw.items()}
        s = sw.to(cast) if sw is not None and cast is not None else sw
        return _op_with_upstream(xx, ww, ref_t, upstream, s, kk)

    want = op(x, ref_w, torch.float64)
    # PyTorch's own result on the inputs as given (docs/math.md, "Closeness and tolerances").
    own = op(x, ref_w, None) if dtype != torch.float64 else None
    grad_w_full = torch.zeros(C, D, dtype=torch.float64)
    own_w_full = torch.zeros(C, D, dtype=w.dtype)
    if where is not None:
        grad_w_full[where] = want[2]
        if own is not None:
            own_w_full[where] = own[2]
    else:
        grad_w_full = want[2]
        own_w_full = own[2] if own is not None else None
    out = {
        "loss": _errors(loss.detach(), want[0], dtype, "loss",
                        own[0] if own is not None else None),
        "grad_weight": _errors(head.weight.grad, grad_w_full[start:start + n], dtype,
                               "grad_weight",
                               own_w_full[start:start + n] if own is not None else None),
        "grad_embeddings": _errors(x_local.grad, world * want[1][lo:hi], dtype,
                                   "grad_embeddings",
                                   world * own[1][lo:hi] if own is not None else None),
        "same_loss_everywhere": _same_everywhere(loss.detach(), world),
        "grad_dtypes": (x_local.grad.dtype == x.dtype, head.weight.grad.dtype == w.dtype),
        "classes_used": C if where is None else len(where),
    }
    return out


def _op_with_upstream(x, w, t, upstream, sw, kw):
    from udat_kernels import reference

    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = reference.angular_margin_cross_entropy(x, w, t, sample_weight=sw, **kw)
    gx, gw = torch.autograd.grad(loss, [x, w], upstream.to(loss.dtype))
    return loss.detach(), gx, gw


def _same_everywhere(value, world):
    import torch.distributed as dist

    every = [None] * world
    dist.all_gather_object(every, repr(value.tolist()))  # repr: NaN equals NaN, bit for bit
    return all(v == every[0] for v in every)


def scenario_equivalence(rank, world):
    out = {}
    for name in CASES:
        try:
            out[name] = _run_case(name, rank, world)
        except Exception:  # noqa: BLE001 - reported to the test
            out[name] = {"exception": traceback.format_exc()}
    try:
        out["ddp_backbone"] = _ddp_backbone(rank, world)
    except Exception:  # noqa: BLE001
        out["ddp_backbone"] = {"exception": traceback.format_exc()}
    out["settings_mismatch"] = _expect_error(rank, world, lambda: _mismatched_head(rank, world))
    out["bad_label"] = _expect_error(rank, world, lambda: _bad_label(rank))
    return out


def _ddp_backbone(rank, world):
    """A linear backbone under DistributedDataParallel feeding the sharded loss: DDP's average
    of the N-scaled embedding gradients must be the single-process gradient of the global loss
    (docs/distributed.md, "Gradient scale")."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from udat_kernels import reference
    from udat_kernels.distributed import ShardedAngularMarginLoss

    C, D, F_in = 11, 6, 5
    rows = [4, 3, 5][:world]
    g = torch.Generator().manual_seed(21)
    inputs = torch.randn(sum(rows), F_in, generator=g)
    labels = torch.randint(0, C, (sum(rows),), generator=g)
    w = torch.randn(C, D, generator=g)
    backbone = torch.nn.Linear(F_in, D)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(D, F_in, generator=g))
        backbone.bias.copy_(torch.randn(D, generator=g))
    single = torch.nn.Linear(F_in, D).double()
    single.load_state_dict(backbone.state_dict())
    ddp = DDP(backbone)
    head = ShardedAngularMarginLoss(C, D, timeout=30, label_smoothing=0.1)
    with torch.no_grad():
        head.weight.copy_(w[head.class_start:head.class_start + head.num_local])
    lo, hi = sum(rows[:rank]), sum(rows[:rank + 1])
    head(ddp(inputs[lo:hi]), labels[lo:hi]).backward()
    ref_w = w.double().requires_grad_()
    loss = reference.angular_margin_cross_entropy(single(inputs.double()), ref_w, labels,
                                                  label_smoothing=0.1)
    loss.backward()
    own = torch.nn.Linear(F_in, D)
    own.load_state_dict(backbone.state_dict())
    own_w = w.clone().requires_grad_()
    reference.angular_margin_cross_entropy(own(inputs), own_w, labels,
                                           label_smoothing=0.1).backward()
    s0, n = head.class_start, head.num_local
    return {
        "backbone_weight": _errors(backbone.weight.grad, single.weight.grad, torch.float32,
                                   "backbone weight", own.weight.grad),
        "backbone_bias": _errors(backbone.bias.grad, single.bias.grad, torch.float32,
                                 "backbone bias", own.bias.grad),
        "head_weight": _errors(head.weight.grad, ref_w.grad[s0:s0 + n], torch.float32,
                               "head weight", own_w.grad[s0:s0 + n]),
    }


def _mismatched_head(rank, world):
    from udat_kernels.distributed import ShardedAngularMarginLoss

    margin = 0.4 if rank == world - 1 else 0.5
    ShardedAngularMarginLoss(10, 4, margin=margin, sample_rate=1.0 if rank else 0.5, timeout=30)


def _bad_label(rank):
    from udat_kernels.distributed import ShardedAngularMarginLoss

    head = ShardedAngularMarginLoss(10, 4, timeout=30)
    labels = torch.tensor([1, 2]) if rank != 1 else torch.tensor([3, 15])
    head(torch.randn(2, 4), labels)


def _expect_error(rank, world, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": ""}


def _one_step(head, rank):
    x = torch.randn(3, 4, requires_grad=True)
    loss = head(x, torch.tensor([0, 5, 9]))
    loss.backward()
    return float(loss)


def scenario_dies(rank, world):
    """Rank 1 is killed (SIGKILL) before the step; rank 0 must fail with the loss's error."""
    from udat_kernels.distributed import ShardedAngularMarginLoss

    head = ShardedAngularMarginLoss(10, 4, timeout=30)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return _timed_step(head, rank)


def scenario_raises(rank, world):
    """Rank 1 raises (uncaught) before the step; the others must fail with the loss's error."""
    from udat_kernels.distributed import ShardedAngularMarginLoss

    head = ShardedAngularMarginLoss(10, 4, timeout=30)
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    return _timed_step(head, rank)


def scenario_stalls(rank, world):
    """Rank 1 stays alive but never reaches the step (it sleeps past the loss's 4 s timeout);
    rank 0 must fail with the loss's error after the timeout, not hang."""
    from udat_kernels.distributed import ShardedAngularMarginLoss

    head = ShardedAngularMarginLoss(10, 4, timeout=4)
    if rank == 1:
        time.sleep(7)
        return {"slept": True}
    return _timed_step(head, rank)


def _timed_step(head, rank):
    t0 = time.monotonic()
    try:
        _one_step(head, rank)
        return {"type": None, "seconds": time.monotonic() - t0}
    except Exception as e:  # noqa: BLE001
        return {"type": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0}


def scenario_cuda_syncs(rank, world):
    """Host syncs of one step on a CUDA device (NCCL): counted by torch's sync debug mode."""
    import warnings

    from udat_kernels.distributed import ShardedAngularMarginLoss

    torch.cuda.set_device(rank)
    out = {}
    for name, rate in (("syncs", 1.0), ("syncs_sampled", 0.5)):
        head = ShardedAngularMarginLoss(50, 16, device="cuda", sample_rate=rate, timeout=30)
        x = torch.randn(8, 16, device="cuda", requires_grad=True)
        t = torch.randint(0, 50, (8,), device="cuda")
        head(x, t).backward()  # warm-up: first-call allocations and lazy initialisation
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                head(x, t).backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        msgs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        out[name], out[name + "_messages"] = len(msgs), msgs
    return out


SCENARIOS = {"equivalence": scenario_equivalence, "dies": scenario_dies,
             "raises": scenario_raises, "stalls": scenario_stalls,
             "cuda_syncs": scenario_cuda_syncs}


def main(argv):
    scenario, rank, world, port, out = argv[1], int(argv[2]), int(argv[3]), argv[4], Path(argv[5])
    import torch.distributed as dist

    torch.set_num_threads(1)
    backend = "nccl" if scenario.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    result = SCENARIOS[scenario](rank, world)
    torch.save(result, out / f"rank{rank}.pt")
    sys.stdout.flush()
    # Leave without tearing the process group down: after a failed collective its destructor
    # may abort, and a peer may already be gone.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
