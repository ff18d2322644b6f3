"""A self-check to run first on a new machine, GPU or not:

    python -m udat_kernels.info [--device cuda|cpu]

It prints how the extension was built, the device, which backends can serve tensors on that
device and why the others cannot, then runs a short correctness check of every backend that can
(forward and backward of both heads' shapes: a small head and a large one, float32 and bfloat16,
with and without the fused gradient reversal) against the float64 reference, with the
tolerances of docs/math.md ("Closeness and tolerances"), and ends with one verdict line per
backend. The exit status is 0 when every backend that can serve passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from . import _C_loader, build_info, dispatch, reference
from .ops import angular_margin_cross_entropy, linear_cross_entropy

# (rtol, atol) by the least precise input dtype: the table of docs/math.md ("Closeness and
# tolerances"); tests/test_info.py checks it against the tests' own copy.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-2, 1e-4),
    torch.float16: (2e-3, 1e-5),
}
BACKENDS = ("cpu", "cuda", "triton", "reference")
B, D = 64, 64
# (name, classes): a head small enough for each backend's small-class kernels and one that takes
# their large-class path (GEMM row blocks or class tiles).
HEADS = (("small", 7), ("large", 1000))


def _describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        why = "" if torch.cuda.is_available() else " (no CUDA device visible to torch)"
        return f"cpu{why}"
    p = torch.cuda.get_device_properties(device)
    return (f"{device} {p.name}, compute capability {p.major}.{p.minor}, "
            f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")


def _reasons(name: str, device: torch.device) -> list[str]:
    probe = torch.zeros(1, 1, device=device)
    try:
        return dispatch.get_backend(name).reasons(probe, probe)
    except Exception as e:  # noqa: BLE001 - a backend that cannot even answer is reported
        return [f"{type(e).__name__}: {e}"]


def _error(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float):
    """(error, bound) of the closeness rule, NaN required exactly where the reference has one."""
    a = actual.detach().double().cpu()
    b = expected.detach().double().cpu()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return math.inf, 0.0
    keep = ~torch.isnan(b)
    err = torch.linalg.vector_norm(a[keep] - b[keep]).item()
    bound = rtol * torch.linalg.vector_norm(b[keep]).item() + atol * math.sqrt(max(b.numel(), 1))
    return err, bound


def _inputs(C: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (B,), generator=g)
    return x.to(dtype).to(device), w.to(dtype).to(device), t.to(device)


def _grads(fn, x, w, t, upstream, **kw):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(x, w, t, reduction="none", **kw)
    gx, gw = torch.autograd.grad(loss, (x, w), upstream.to(loss))
    return loss, gx, gw


def check_case(backend: str, device: torch.device, C: int, dtype: torch.dtype, grl: bool,
               angular: bool, seed: int) -> tuple[bool, str]:
    """One forward + backward of `backend` against the float64 reference."""
    x, w, t = _inputs(C, dtype, device, seed)
    fn = angular_margin_cross_entropy if angular else linear_cross_entropy
    ref_fn = reference.angular_margin_cross_entropy if angular else reference.linear_cross_entropy
    kw = {"grl_lambda": 0.5} if grl else {}
    upstream = torch.randn(B, generator=torch.Generator().manual_seed(seed + 1),
                           dtype=torch.float64)
    got = _grads(fn, x, w, t, upstream.to(device), backend=backend, **kw)
    want = _grads(ref_fn, x.double().cpu(), w.double().cpu(), t.cpu(), upstream, **kw)
    rtol, atol = TOLERANCES[dtype]
    worst = 0.0
    for name, a, b in zip(("loss", "grad x", "grad W"), got, want):
        err, bound = _error(a, b, rtol, atol)
        if err > bound:
            return False, f"{name} error {err:.2e} above the bound {bound:.2e}"
        worst = max(worst, err / bound if bound > 0 else 0.0)
    return True, f"within tolerance (worst error {worst:.0%} of the bound)"


def check_backend(backend: str, device: torch.device, out=print) -> tuple[int, int]:
    """Runs every case; returns (passed, total)."""
    passed = total = 0
    for head, C in HEADS:
        for dtype in (torch.float32, torch.bfloat16):
            for grl in (False, True):
                for angular in (True, False):
                    total += 1
                    label = (f"{head} C={C:<5d} {str(dtype).split('.')[-1]:8s} "
                             f"{'GRL' if grl else 'no GRL':6s} "
                             f"{'angular' if angular else 'linear':7s}")
                    t0 = time.perf_counter()
                    try:
                        ok, what = check_case(backend, device, C, dtype, grl, angular,
                                              seed=total)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        ok, what = False, f"raised {type(e).__name__}: {' '.join(str(e).split())[:200]}"
                    passed += ok
                    out(f"  {backend:9s} {label} {'ok  ' if ok else 'FAIL'} {what} "
                        f"({time.perf_counter() - t0:.1f} s)")
    return passed, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="the device to check (default: cuda when one is visible, else cpu)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated subset of {', '.join(BACKENDS)}")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("device: cuda was asked for, but torch sees no CUDA device")
        return 1
    names = [b for b in args.backends.split(",") if b]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        p.error(f"unknown backends {unknown}; expected a subset of {BACKENDS}")

    info = build_info()
    print("udat-kernels self-check")
    print(f"build: version {info['version']}, torch {torch.__version__} (CUDA "
          f"{torch.version.cuda or 'none'}), extension {'built' if _C_loader.available() else 'NOT built'}"
          f", CPU kernels {'yes' if info['cpu'] else 'no'}, CUDA kernels "
          f"{'yes (archs ' + info['cuda_archs'] + ')' if info['cuda'] else 'no'}, "
          f"triton {info['triton'] or 'not installed'}")
    if not _C_loader.available():
        print(f"  the extension could not be loaded: {_C_loader.error()}")
    print(f"device: {_describe_device(device)}")
    print(f"backends for {device.type} tensors:")
    serving = []
    for name in names:
        why = _reasons(name, device)
        if why:
            print(f"  {name:9s} cannot serve: {'; '.join(why)}")
        else:
            print(f"  {name:9s} can serve" + (" (the eager float64 ground truth, not a fused "
                                               "kernel)" if name == "reference" else ""))
            serving.append(name)
    fused = [n for n in serving if n != "reference"]
    if fused:
        print(f"checks against the float64 reference (B={B}, D={D}; loss, grad x, grad W; "
              "docs/math.md tolerances):")
    verdicts = []
    status = 0
    for name in names:
        if name == "reference":
            continue
        if name not in fused:
            verdicts.append(f"verdict {name}: not available on {device.type}")
            continue
        passed, total = check_backend(name, device)
        ok = passed == total
        status |= not ok
        verdicts.append(f"verdict {name}: {'PASS' if ok else 'FAIL'} ({passed}/{total} cases)")
    for line in verdicts:
        print(line)
    if not fused:
        print("no fused backend can serve this device")
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
