"""Shared pieces of the Triton kernels: the margin math of docs/math.md and launch heuristics.

The `@triton.jit` helpers mirror csrc/margin_math.h expression for expression, so that the Triton,
CPU and CUDA backends compute the same float32 numbers. Everything here is imported only when
Triton is importable (see __init__.py).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._runtime import COUNTS, Cost, launch

# Software-pipelining depth (Triton's default on CUDA) of the kernels that do not choose their
# own: passed explicitly, and recorded, so that the ahead-of-time compile builds what runs.
NUM_STAGES = 3


def interpreting() -> bool:
    """Whether Triton runs its kernels in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def inv_norm(sumsq):
    """1 / max(sqrt(sumsq), eps): the factor that normalizes a row (and divides its gradient)."""
    return 1.0 / tl.maximum(tl.sqrt(sumsq), 1e-12)


@triton.jit
def cast_rn(v, dtype: tl.constexpr):
    """fp32 v converted to dtype with round-to-nearest-even.

    That is what the GPU's conversion does; the interpreter truncates fp32 -> bf16, so the bf16
    case is rounded by hand (on the bits, NaN kept), which gives the same numbers on both.
    """
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v.to(dtype)


@triton.jit
def margin_psi(c, cos_m, sin_m, threshold, linear_off, cos_margin):
    """psi(c) (docs/math.md, "The margin ψ") on the clamped cosine: angular branch above
    cos(pi - m2), linear below."""
    c = tl.minimum(tl.maximum(c, -1.0), 1.0)
    sin_t = tl.sqrt(tl.maximum(1.0 - c * c, 0.0))
    angular = c * cos_m - sin_t * sin_m - cos_margin
    linear = c - linear_off - cos_margin
    return tl.where(c > threshold, angular, linear)


@triton.jit
def margin_dpsi(c, cos_m, sin_m, threshold):
    """psi'(c), the exact gradient (docs/math.md, "ψ′ and its guard"); the clamp is identity
    for the gradient."""
    c = tl.minimum(tl.maximum(c, -1.0), 1.0)
    sin2 = tl.maximum(1.0 - c * c, 1e-12)
    return tl.where(c > threshold, cos_m + c * sin_m / tl.sqrt(sin2), 1.0)


@triton.jit
def row_scale(target_ptr, sw_ptr, gloss_ptr, rows, row_ok, B, C, ignore_index, inv_denom,
              HAS_SW: tl.constexpr, HAS_GLOSS: tl.constexpr, REDUCTION: tl.constexpr):
    """k_i (docs/math.md, "Logit gradient") for a block of rows: v_i x upstream gradient (/ the
    mean's denominator).

    Zero for padding rows, ignored rows and rows whose target is out of range, so that they
    contribute no gradient. Returns (target, valid, in_range, v, k), each (BLOCK,).
    """
    tgt = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (tgt != ignore_index)
    in_range = (tgt >= 0) & (tgt < C)
    if HAS_SW:
        v = tl.load(sw_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    else:
        v = valid.to(tl.float32)
    k = v
    if HAS_GLOSS:
        if REDUCTION == 0:
            k = k * tl.load(gloss_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        else:
            k = k * tl.load(gloss_ptr).to(tl.float32)
    if REDUCTION == 1:
        k = k * inv_denom
    k = tl.where(valid & in_range, k, 0.0)
    return tgt, valid, in_range, v, k


@triton.jit
def denominator_sum(target_ptr, cw_ptr, sw_ptr, lo, hi, C, ignore_index,
                    HAS_CW: tl.constexpr, HAS_SW: tl.constexpr, BLOCK: tl.constexpr):
    """Sum over rows lo <= i < hi not ignored of v_i * w_{y_i}: the mean's denominator (fixed
    order)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(lo, hi, BLOCK):
        rows = start + offs
        tgt = tl.load(target_ptr + rows, mask=rows < hi, other=ignore_index)
        valid = (rows < hi) & (tgt != ignore_index)
        term = valid.to(tl.float32)
        if HAS_SW:
            term = term * tl.load(sw_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        if HAS_CW:
            # An out-of-range target is not read: its row has a NaN loss anyway.
            ok = valid & (tgt >= 0) & (tgt < C)
            term = term * tl.load(cw_ptr + tgt, mask=ok, other=0.0).to(tl.float32)
        acc += term
    return tl.sum(acc, 0)


@triton.jit
def last_program(count_ptr):
    """True in the one program that arrives last at the counter (arrival_counter: zero before
    the launch; the last program sets it back to zero when it is done).

    The partials the other programs stored before their arrival are visible to it: the
    counter's atomic add orders them (acquire-release, GPU scope) and they are read volatile.
    """
    return tl.atomic_add(count_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1


@triton.jit
def sum_partials(ptr, n, stride, BLOCK: tl.constexpr):
    """Σ_{p < n} ptr[p · stride] in a fixed order (volatile loads: other programs' stores)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p0 in range(0, n, BLOCK):
        acc += tl.load(ptr + (p0 + offs) * stride, mask=p0 + offs < n, other=0.0, volatile=True)
    return tl.sum(acc, 0)


@triton.jit(do_not_specialize=COUNTS)
def _mean_denominator_kernel(target_ptr, cw_ptr, sw_ptr, part_ptr, B, C, ignore_index, SPAN,
                             HAS_CW: tl.constexpr, HAS_SW: tl.constexpr, BLOCK: tl.constexpr):
    """Partials of the mean's denominator: program p sums rows [p·SPAN, (p+1)·SPAN). Their
    readers add them in program order (sum_partials): deterministic, and no counter to zero."""
    pid = tl.program_id(0)
    lo = pid * SPAN
    tl.store(part_ptr + pid, denominator_sum(target_ptr, cw_ptr, sw_ptr, lo,
                                             tl.minimum(lo + SPAN, B), C, ignore_index,
                                             HAS_CW, HAS_SW, BLOCK))


# ----------------------------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------------------------


class MarginConsts:
    """The margin's scalars, computed once on the host in double (margin_math.h's MarginParams)."""

    def __init__(self, normalize: bool, scale: float, margin: float, cos_margin: float):
        if not normalize:
            scale, margin, cos_margin = 1.0, 0.0, 0.0
        self.scale = float(scale)
        self.cos_m = math.cos(margin)
        self.sin_m = math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.linear_off = margin * math.sin(margin)
        self.cos_margin = float(cos_margin)
        self.has_margin = margin != 0.0 or cos_margin != 0.0

    def args(self):
        return (self.scale, self.cos_m, self.sin_m, self.threshold, self.linear_off,
                self.cos_margin)


def mean_denominator(target, class_weight, sample_weight, C, ignore_index):
    """(partials, n): n float32 partial sums of v_i w_{y_i} over rows not ignored, whose sum in
    order is the mean's denominator (one launch of at most 64 programs)."""
    B = target.shape[0]
    block = min(1024, max(16, triton.next_power_of_2(B)))
    span = max(block, triton.cdiv(triton.cdiv(B, 64), block) * block)
    P = triton.cdiv(B, span)
    part = torch.empty((P,), dtype=torch.float32, device=target.device)
    launch(_mean_denominator_kernel, (P,),
           (target, class_weight if class_weight is not None else target,
            sample_weight if sample_weight is not None else target, part, B, C, ignore_index,
            span),
           dict(HAS_CW=class_weight is not None, HAS_SW=sample_weight is not None, BLOCK=block),
           num_warps=4, num_stages=NUM_STAGES,
           cost=Cost(bytes=B * 16, inflight=block * 16 * (NUM_STAGES - 1), barriers=4))
    return part, P


_COUNTERS: dict = {}


def arrival_counter(device: torch.device) -> torch.Tensor:
    """An int32 zero for last_program, one per device and stream, allocated once: the last
    program of each launch resets it, so that no fill is launched per call. Launches on one
    stream run in order, so they never share it at the same time."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (str(device), stream)
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = _COUNTERS[key] = torch.zeros((1,), dtype=torch.int32, device=device)
    return counter


def dot_fp32(x, weight, info) -> bool:
    """Whether the logits tiles upcast to fp32 (IEEE) instead of a native half-precision dot."""
    if x.dtype != weight.dtype or x.dtype == torch.float32:
        return True
    # The interpreter's bf16 dot multiplies raw bits (numpy has no bf16); bf16 products are
    # exact in fp32, so upcasting there gives the tensor-core result.
    return x.dtype == torch.bfloat16 and not info.gpu


def dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A stand-in pointer for an absent optional tensor (never read: a constexpr flag says so)."""
    return t if t is not None else like
