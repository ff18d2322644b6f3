"""Small-C path: one kernel that reads each row block of x once (the paper's heads, C = 2 or 7).

Per row block the kernel computes the row norms, the cosines (or plain logits) against every
class, the margin, the log-sum-exp and the loss, and — when a gradient is asked for — grad x
(times −λ) while x's block is still in L1/L2 (docs/design.md, "The Triton kernels").

A program is one warp; its lanes own the features and every lane holds all classes and rows of
its block, so the per-class sums need no shared memory and no block-wide barrier: the dot
products are each lane's partial sums over its features, added across the warp's lanes once per
row block (warp shuffles); grad x = G Ŵ sums over the classes and grad W = Gᵀ X̂ over the rows
inside each lane. No tl.dot: at C ≤ 16 its tiles would be mostly padding, and its operands go
through shared memory.

The rows are spread over as many programs as the GPU holds at the occupancy the kernel is
designed for (design.py), never fewer than the row blocks allow: the paper's batch of 64 runs as
16 programs. grad W needs a sum over all rows: a kernel that owns the only row block writes it
directly, otherwise each program accumulates its rows into its own fp32 partial (programs, C, D),
which stays in L2, and a second kernel sums the partials in a fixed order (deterministic). The
loss's sum over programs is taken by the last program to finish (an atomic counter), in program
order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (NUM_STAGES, MarginConsts, arrival_counter, cast_rn, denominator_sum,
                      dummy, inv_norm, last_program, margin_dpsi, margin_psi, mean_denominator, row_scale,
                      sum_partials)
from ._runtime import COUNTS, Cost, device_info, launch
from .design import BLOCKS_PER_SM

# Largest C served by this path (the classes live in one register tile of at most 16); larger
# heads take the tiled path.
SMALL_C_MAX = 16
# Rows per block (None: from the register budget, _config) and programs (None: from the design
# occupancy on a GPU, 2 under the interpreter). Tests change them to force one program, or
# several blocks per program.
BLOCK_ROWS = None
MAX_PROGRAMS = None
# One warp a program: the sums over its lanes are warp shuffles, with no block-wide barrier.
_NUM_WARPS = 1
# Partials summed at once by the reduction over programs (in the main kernel: the loss), and
# the grad W partials the second kernel reads per step (enough bytes in flight to stream them).
_BLOCK_P = 32
_BLOCK_P_GW = 256
_NUM_WARPS_GW = 8  # 64 fp32 sums a thread for a (256, 64) tile


@triton.jit(do_not_specialize=COUNTS)
def _small_c_kernel(
    x_ptr, w_ptr, target_ptr, bias_ptr, cw_ptr, sw_ptr, gloss_ptr, lam_ptr, denom_ptr,
    loss_ptr, lse_ptr, red_ptr, count_ptr, gx_ptr, gw_ptr, gb_ptr, gw_part_ptr, col_part_ptr,
    wnorm_ptr, B, C, D, n_denom, stride_x, stride_w, ignore_index,
    scale, cos_m, sin_m, threshold, linear_off, cos_margin, smoothing,
    NORMALIZE: tl.constexpr, HAS_MARGIN: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, HAS_SW: tl.constexpr,
    HAS_GLOSS: tl.constexpr, HAS_LAMBDA: tl.constexpr, REDUCTION: tl.constexpr,
    WRITE_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, DENOM_INLINE: tl.constexpr,
    GW_DIRECT: tl.constexpr, XSQ_SLOT: tl.constexpr,
    BLOCK_B: tl.constexpr, NUM_C: tl.constexpr, BLOCK_L: tl.constexpr, VEC: tl.constexpr,
    UNROLL: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Loss and/or gradient of row blocks pid, pid + programs, ...

    x (B, D), w (C, D), target (B,); loss (B,) or (), lse (B,), red (programs, 2) partial
    (loss sum, denominator) and count (an int32 zero) when several programs reduce; denom the
    n_denom partials of the mean's denominator (mean_denominator); gx (B, D),
    gw (C, D), gb (C,) or the fp32 partials gw_part (programs, C, D) and col_part
    (programs, C) (Σ_i G_ij c_ij for the angular head, Σ_i δ_ij = grad bias for the linear
    one); wnorm (C,) the weight row norms.

    Every tile is rows × classes × features ([BLOCK_B, NUM_C, BLOCK_L · VEC]) with the features
    flat: a sub-step covers BLOCK_L · VEC features, each thread VEC contiguous ones (16 bytes of
    the wider of x and W) of every row and class, and a pass-1 loop step UNROLL sub-steps (more
    bytes in flight). A flat feature dimension of 32 × 16 bytes takes all the warp's threads in
    the layout Triton gives every load, whatever the other dimensions: x's and W's tiles and
    both passes share one layout, and the loops need no layout conversion (no shared memory, no
    barrier). The sums over the vector (a reshape to [.., BLOCK_L, VEC], within the thread),
    the classes (grad x) and the rows (grad W) stay in a thread; the dot products are summed
    over the lanes once per row block. XSQ_SLOT: class NUM_C − 1 is padding (C < NUM_C) and its
    "weight row" is x itself, so that the same sum gives ‖x_i‖².
    """
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0)
    n_blocks = tl.cdiv(B, BLOCK_B)
    cols = tl.arange(0, NUM_C)
    col_ok = cols < C
    c3 = cols[None, :, None]
    w_ok = c3 < C
    w_rows = w_ptr + c3 * stride_w
    # feature offsets of a sub-step: lane l holds VEC contiguous ones
    SUB = BLOCK_L * VEC
    feat = tl.arange(0, BLOCK_L * VEC)[None, None, :]
    STEP = SUB * UNROLL
    xsq_col = cols[None, :] == NUM_C - 1

    if HAS_CW:
        wj = tl.load(cw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        wj = col_ok.to(tl.float32)
    wsum = tl.sum(wj, 0)
    smooth_b = smoothing / C

    # Weight row norms: every program needs them and W is small on this path.
    inv_w = tl.full((NUM_C,), 1.0, tl.float32)
    if NORMALIZE:
        wsq = tl.zeros((1, NUM_C, BLOCK_L * VEC), dtype=tl.float32)
        for d0 in range(0, D, SUB):
            dd = d0 + feat
            w = tl.load(w_rows + dd, mask=w_ok & (dd < D), other=0.0).to(tl.float32)
            wsq += w * w
        wsq = tl.sum(tl.sum(wsq, 2), 0)
        inv_w = inv_norm(wsq)
        proj_w = tl.sqrt(wsq) >= 1e-12
        if COMPUTE_GRAD and not GW_DIRECT:
            tl.store(wnorm_ptr + cols, tl.sqrt(wsq), mask=col_ok & (pid == 0))
    inv_w3 = inv_w[None, :, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)

    inv_denom = 1.0
    if COMPUTE_GRAD and REDUCTION == 1:
        if DENOM_INLINE:
            denom = denominator_sum(target_ptr, cw_ptr, sw_ptr, 0, B, C, ignore_index,
                                    HAS_CW, HAS_SW, 64)
        else:
            denom = sum_partials(denom_ptr, n_denom, 1, BLOCK_P)
        # An empty or fully ignored batch has a NaN loss and zero gradients (as torch).
        inv_denom = tl.where(denom != 0.0, 1.0 / tl.where(denom != 0.0, denom, 1.0), 0.0)
    if HAS_LAMBDA:
        neg_lambda = -tl.load(lam_ptr).to(tl.float32)

    loss_acc = tl.full((), 0.0, tl.float32)
    den_acc = tl.full((), 0.0, tl.float32)
    for blk in range(pid, n_blocks, nprog):
        rows = blk * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        r3 = rows.to(tl.int64)[:, None, None]
        x_rows = x_ptr + r3 * stride_x
        x_ok = row_ok[:, None, None]
        tgt, valid, in_range, v, k = row_scale(
            target_ptr, sw_ptr, gloss_ptr, rows, row_ok, B, C, ignore_index, inv_denom,
            HAS_SW, HAS_GLOSS, REDUCTION)
        is_t = (cols[None, :] == tgt[:, None]) & valid[:, None]

        # Pass 1 over the features: each thread's partial dot products (and sums of squares),
        # summed over the lanes once the row block's features are done.
        acc = tl.zeros((BLOCK_B, NUM_C, BLOCK_L), dtype=tl.float32)
        if not XSQ_SLOT:
            xsq_acc = tl.zeros((BLOCK_B, 1, BLOCK_L), dtype=tl.float32)
        for d0 in range(0, D, STEP):
            for u in tl.static_range(UNROLL):
                dd = d0 + u * SUB + feat
                d_ok = dd < D
                xt = tl.load(x_rows + dd, mask=x_ok & d_ok, other=0.0).to(tl.float32)
                wt = tl.load(w_rows + dd, mask=w_ok & d_ok, other=0.0).to(tl.float32)
                if XSQ_SLOT:
                    wt = tl.where(c3 == NUM_C - 1, xt, wt)
                else:
                    xsq_acc += tl.sum(tl.reshape(xt * xt, (BLOCK_B, 1, BLOCK_L, VEC)), 3)
                acc += tl.sum(tl.reshape(xt * wt, (BLOCK_B, NUM_C, BLOCK_L, VEC)), 3)
        dots = tl.sum(acc, 2)
        if XSQ_SLOT:
            xsq = tl.sum(tl.where(xsq_col, dots, 0.0), 1)
        else:
            xsq = tl.sum(tl.sum(xsq_acc, 2), 1)

        # Logits, log-sum-exp and loss, all in registers.
        if NORMALIZE:
            inv_x = inv_norm(xsq)
            cos = tl.where(col_ok[None, :], dots * inv_x[:, None] * inv_w[None, :], 0.0)
            if HAS_MARGIN:
                psi = margin_psi(cos, cos_m, sin_m, threshold, linear_off, cos_margin)
                z = scale * tl.where(is_t, psi, cos)
            else:
                z = scale * cos
        else:
            z = dots
            if HAS_BIAS:
                z = z + bias[None, :]
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m = tl.max(z, 1)
        # An infinite max shifts by 0, as torch.logsumexp does: +inf logits give lse = +inf
        # and no inf − inf (docs/math.md, "Non-finite inputs").
        shift = tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)
        lse = shift + tl.log(tl.sum(tl.exp(z - shift[:, None]), 1))
        z_y = tl.sum(tl.where(is_t, z, 0.0), 1)
        w_y = tl.sum(tl.where(is_t, wj[None, :], 0.0), 1)
        a = (1.0 - smoothing) * w_y

        if WRITE_LOSS:
            wz = tl.sum(tl.where(col_ok[None, :], z, 0.0) * wj[None, :], 1)
            # Without smoothing its term is left out, not multiplied by 0: with a +inf logit it
            # is inf − inf.
            smooth = tl.where(smooth_b != 0.0, smooth_b * (wsum * lse - wz), 0.0)
            loss = v * (a * (lse - z_y) + smooth)
            # A target outside [0, C) gets a NaN loss; nothing is read out of bounds.
            loss = tl.where(valid, tl.where(in_range, loss, float("nan")), 0.0)
            if REDUCTION == 0:
                tl.store(loss_ptr + rows, loss, mask=row_ok)
            tl.store(lse_ptr + rows, lse, mask=row_ok)
            loss_acc += tl.sum(loss, 0)
            den_acc += tl.sum(tl.where(valid, v * w_y, 0.0), 0)

        if COMPUTE_GRAD:
            p = tl.exp(z - lse[:, None])
            delta = p * (a + smooth_b * wsum)[:, None] - smooth_b * wj[None, :]
            delta = k[:, None] * (delta - tl.where(is_t, a[:, None], 0.0))
            if NORMALIZE:
                g = scale * delta
                if HAS_MARGIN and not STRAIGHT_THROUGH:
                    c_y = tl.sum(tl.where(is_t, cos, 0.0), 1)
                    dpsi = margin_dpsi(c_y, cos_m, sin_m, threshold)
                    g = tl.where(is_t, g * dpsi[:, None], g)
                g = tl.where(col_ok[None, :], g, 0.0)
                # gx̂·x̂ = Σ_j G_ij c_ij and gŵ·ŵ = Σ_i G_ij c_ij: the projections of the norm's
                # gradient need no second reduction over the features.
                row_t = tl.sum(g * cos, 1)
                row_t = tl.where(tl.sqrt(xsq) >= 1e-12, row_t, 0.0)
                col_t = tl.where(proj_w, tl.sum(g * cos, 0), 0.0)
                inv_x3 = inv_x[:, None, None]
                row_t3 = row_t[:, None, None]
            else:
                g = tl.where(col_ok[None, :], delta, 0.0)
                col_t = tl.sum(g, 0)
            g3 = g[:, :, None]

            # Pass 2 over the features (x's block is hot in cache): grad x = G Ŵ and
            # grad W = Gᵀ X̂ (before the norms' Jacobians), summed over classes and rows in the
            # thread.
            for d0 in range(0, D, SUB):
                dd = d0 + feat
                d_ok = dd < D
                xt = tl.load(x_rows + dd, mask=x_ok & d_ok, other=0.0).to(tl.float32)
                wt = tl.load(w_rows + dd, mask=w_ok & d_ok, other=0.0).to(tl.float32)
                if NORMALIZE:
                    xt = xt * inv_x3
                    wt = wt * inv_w3
                gx = tl.sum(g3 * wt, 1, keep_dims=True)
                gw = tl.sum(g3 * xt, 0, keep_dims=True)
                if NORMALIZE:
                    gx = inv_x3 * (gx - row_t3 * xt)
                if HAS_LAMBDA:
                    gx = gx * neg_lambda
                tl.store(gx_ptr + r3 * D + dd, cast_rn(gx, gx_ptr.dtype.element_ty),
                         mask=x_ok & d_ok)
                gw_mask = w_ok & d_ok
                if GW_DIRECT:
                    if NORMALIZE:
                        gw = inv_w3 * (gw - col_t[None, :, None] * wt)
                    tl.store(gw_ptr + c3 * D + dd, cast_rn(gw, gw_ptr.dtype.element_ty),
                             mask=gw_mask)
                else:
                    part = gw_part_ptr + (pid * C + c3) * D + dd
                    prev = tl.load(part, mask=gw_mask & (blk != pid), other=0.0)
                    tl.store(part, prev + gw, mask=gw_mask)
            if GW_DIRECT:
                if HAS_BIAS:
                    tl.store(gb_ptr + cols, cast_rn(col_t, gb_ptr.dtype.element_ty), mask=col_ok)
            else:
                part = col_part_ptr + pid * C + cols
                prev = tl.load(part, mask=col_ok & (blk != pid), other=0.0)
                tl.store(part, prev + col_t, mask=col_ok)

    if WRITE_LOSS and REDUCTION != 0:
        if nprog == 1:
            if REDUCTION == 1:
                loss_acc = loss_acc / den_acc
            tl.store(loss_ptr, loss_acc)
        else:
            tl.store(red_ptr + pid * 2, loss_acc)
            tl.store(red_ptr + pid * 2 + 1, den_acc)
            if last_program(count_ptr):
                total = sum_partials(red_ptr, nprog, 2, BLOCK_P)
                if REDUCTION == 1:
                    total = total / sum_partials(red_ptr + 1, nprog, 2, BLOCK_P)
                tl.store(loss_ptr, total)
                tl.store(count_ptr, 0)  # ready for the next launch


@triton.jit(do_not_specialize=COUNTS)
def _small_c_grad_weight_kernel(
    w_ptr, wnorm_ptr, gw_part_ptr, col_part_ptr, gw_ptr, gb_ptr, P, C, D, stride_w,
    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad W (C, D) (and grad bias) from the per-program partials, summed in a fixed order.

    Grid (C · cdiv(D, BLOCK_D),). Angular: grad W_j = (gŵ_j − [‖W_j‖ ≥ eps] t_j ŵ_j) /
    max(‖W_j‖, eps) with t_j = Σ_i G_ij c_ij; linear: grad W_j = Σ_i δ_ij x_i, grad b_j = Σ_i δ_ij.
    """
    n_d = tl.cdiv(D, BLOCK_D)
    j = tl.program_id(0).to(tl.int64) // n_d
    dblk = tl.program_id(0) % n_d
    dd = dblk.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    offs_p = tl.arange(0, BLOCK_P)
    # Summed per element over the loop and across the tile once at the end: no block-wide
    # reduction per step (a fixed order all the same).
    acc2 = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pp = (p0 + offs_p).to(tl.int64)
        p_ok = pp < P
        acc2 += tl.load(gw_part_ptr + (pp * C + j)[:, None] * D + dd[None, :],
                        mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        t_acc += tl.load(col_part_ptr + pp * C + j, mask=p_ok, other=0.0)
    acc = tl.sum(acc2, 0)
    t = tl.sum(t_acc, 0)
    if NORMALIZE:
        norm = tl.load(wnorm_ptr + j)
        inv_w = 1.0 / tl.maximum(norm, 1e-12)
        w = tl.load(w_ptr + j * stride_w + dd, mask=d_ok, other=0.0).to(tl.float32)
        t = tl.where(norm >= 1e-12, t, 0.0)
        acc = inv_w * (acc - t * w * inv_w)
    tl.store(gw_ptr + j * D + dd, cast_rn(acc, gw_ptr.dtype.element_ty), mask=d_ok)
    if HAS_BIAS:
        tl.store(gb_ptr + j, cast_rn(t, gb_ptr.dtype.element_ty), mask=dblk == 0)


# (rows per block, sub-steps per loop step of pass 1, bytes a lane loads per row and sub-step)
# by element size (the wider of x and W), classes padded and whether the gradient is computed:
# 16-byte vectors and 4 KB of x in flight per program where the registers allow (docs/design.md,
# "The Triton model"). Each entry is a split whose sm_90 builds keep everything in registers
# with Triton 3.6 and 3.8 (aot.py checks every build the tests and the target shapes launch;
# the larger splits tried spill with one or the other), with as many rows as possible (fewer
# row blocks, fewer per-block barriers).
_TILES = {
    (4, 2, False): (4, 2, 16), (4, 2, True): (4, 2, 16),
    (4, 4, False): (4, 2, 16), (4, 4, True): (4, 2, 16),
    (4, 8, False): (4, 2, 16), (4, 8, True): (2, 4, 16),
    (4, 16, False): (1, 1, 16), (4, 16, True): (1, 2, 16),
    (2, 2, False): (4, 2, 16), (2, 2, True): (2, 4, 16),
    (2, 4, False): (4, 2, 16), (2, 4, True): (2, 4, 16),
    (2, 8, False): (4, 2, 16), (2, 8, True): (4, 2, 16),
    (2, 16, False): (2, 1, 16), (2, 16, True): (1, 2, 8),
}
# Where other tiles leave the registers a kernel variant needs: the gradient pass of a batch of
# at most 64 row blocks sums the targets' weights itself (DENOM_INLINE); x and W of different
# element sizes convert one of them.
_TILES_INLINE_DENOM = {(2, 2, True): (1, 8, 16), (2, 4, True): (1, 8, 16)}
_TILES_MIXED = {(4, 8, False): (2, 4, 16), (4, 8, True): (1, 4, 16)}


def _config(C: int, D: int, x, weight, compute_grad: bool, mean: bool):
    """(BLOCK_B, NUM_C, XSQ_SLOT, VEC, UNROLL, DENOM_INLINE, num_warps, num_stages) of the main
    kernel.

    The classes are padded to a power of two with one class to spare where C < 16 (it carries
    ‖x‖², XSQ_SLOT). Each lane holds BLOCK_B × NUM_C fp32 sums, and per loop step BLOCK_B rows
    and NUM_C classes of UNROLL × VEC features (_TILES). The vectors are 16-byte loads (8-byte
    for bf16 and fp16 gradients at 16 classes) where x, W, D and the row strides are 16-byte
    aligned (Triton's specialization tells the compiler so), single elements and one row a
    block otherwise. One load stage: a pipelined load would be staged through shared memory
    with a barrier per step. A batch of at most 64 row blocks needs no launch for the mean's
    denominator (DENOM_INLINE): every program of the gradient pass sums the targets itself,
    with the tiles of _TILES_INLINE_DENOM where the others leave it too few registers.
    """
    B = x.shape[0]
    xsq_slot = C < SMALL_C_MAX
    num_c = max(2, triton.next_power_of_2(C + 1)) if xsq_slot else SMALL_C_MAX
    esize = max(x.element_size(), weight.element_size())
    key = (4 if esize > 2 else 2, num_c, bool(compute_grad))
    tile = (x.element_size() != weight.element_size() and _TILES_MIXED.get(key)) or _TILES[key]
    aligned = (D % 16 == 0 and x.stride(0) % 16 == 0 and weight.stride(0) % 16 == 0
               and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)

    def shape(tile):
        block_b, unroll, vec_bytes = tile if aligned else (1, 1, esize)
        return BLOCK_ROWS or block_b, unroll, vec_bytes // esize

    block_b, unroll, vec = shape(tile)
    inline_denom = triton.cdiv(B, block_b) <= 64
    if inline_denom and compute_grad and mean and key in _TILES_INLINE_DENOM:
        block_b, unroll, vec = shape(_TILES_INLINE_DENOM[key])
    return block_b, num_c, xsq_slot, vec, unroll, inline_denom, _NUM_WARPS, 1


def _barriers(compute_grad: bool) -> tuple:
    """(per row block, per program) block-wide barriers of the main kernel's sm_90 builds at
    the GPU target shapes, the larger of Triton 3.6 and 3.8 (docs/gpu/, the aot tables): none in
    the feature loops (one layout for every tile), at most 3 per row block with the gradient
    (layout conversions of the per-row values), 2 per row block and 2 after the loop without."""
    return (3, 0) if compute_grad else (2, 2)


def _programs(n_blocks: int, info) -> int:
    if MAX_PROGRAMS is not None:
        cap = MAX_PROGRAMS
    elif info.gpu:
        cap = info.num_sms * BLOCKS_PER_SM["small_c_kernel"]  # one wave at design occupancy
    else:
        cap = 2
    return max(1, min(n_blocks, cap))


# One grid function per kernel: the launch uses it, and the CPU tests check what it returns
# against CUDA's limits at every size the backend serves.


def _main_grid(P: int) -> tuple:
    return (P,)


def _grad_weight_grid(C: int, D: int, block_d: int) -> tuple:
    return (C * triton.cdiv(D, block_d),)


def small_c_launch(x, weight, target, bias, class_weight, sample_weight, grl_lambda, grad_loss,
                   consts: MarginConsts, normalize, smoothing, ignore_index, reduction,
                   straight_through, write_loss, compute_grad):
    """Run the small-C kernel; returns (loss, lse, grad_x, grad_weight, grad_bias).

    x (B, D), weight (C, D) contiguous rows; grl_lambda a float32 0-dim tensor on x's device or
    None; grad_loss (B,) / () or None (an upstream gradient of one). Outputs that are not asked
    for are empty tensors of shape (0,).
    """
    B, D = x.shape
    C = weight.shape[0]
    dev = x.device
    info = device_info(dev)
    block_b, num_c, xsq_slot, vec, unroll, inline_denom, num_warps, stages = _config(
        C, D, x, weight, compute_grad, reduction == 1)
    block_l = 32 * num_warps
    n_blocks = triton.cdiv(B, block_b)
    gw_direct = n_blocks == 1
    ex, ew = x.element_size(), weight.element_size()
    inflight = block_b * block_l * vec * unroll * ex  # one loop step's x tile
    P = _programs(n_blocks, info)
    f32 = dict(dtype=torch.float32, device=dev)

    loss = torch.empty((B,) if reduction == 0 else (), **f32) if write_loss else None
    lse = torch.empty((B,), **f32) if write_loss else None
    red = count = None
    if write_loss and reduction != 0 and P > 1:
        red, count = torch.empty((P, 2), **f32), arrival_counter(dev)
    empty = torch.empty((0,), **f32)
    # The counter's stand-in has the counter's type, so that a launch of one program and one
    # of several are one specialization (one compilation).
    no_count = torch.empty((0,), dtype=torch.int32, device=dev)
    if compute_grad:
        gx = torch.empty_like(x)
        gw = torch.empty_like(weight)
        gb = torch.empty_like(bias) if bias is not None else None
        gw_part = None if gw_direct else torch.empty((P, C, D), **f32)
        col_part = None if gw_direct else torch.empty((P, C), **f32)
    else:
        gx = gw = gb = gw_part = col_part = None
    wnorm = torch.empty((C,), **f32) if compute_grad and normalize and not gw_direct else None
    denom, n_denom = None, 0
    if compute_grad and reduction == 1 and not inline_denom:
        denom, n_denom = mean_denominator(target, class_weight, sample_weight, C, ignore_index)

    def ptr(t):
        return dummy(t, empty)

    # Traffic: x once (pass 2 re-reads the block from L2), W once (L2-resident), grad x once;
    # the partials are written once per program (their per-block updates stay in L2). In
    # flight: one pass-1 step's x tile (no pipelining). Flops: fp32 FMAs (per element of x:
    # NUM_C products in pass 1, 2 · NUM_C + 2 in pass 2). Barriers: those of the sm_90 builds
    # (docs/gpu/triton-aot-*.md, barriers per loop body; _barriers).
    per_prog = triton.cdiv(n_blocks, P)
    fma = B * D * ((num_c + (not xsq_slot)) + (2 * num_c + 2) * compute_grad)
    per_block, fixed = _barriers(compute_grad)
    main_cost = Cost(
        bytes=B * D * ex * (2 if compute_grad else 1) + C * D * ew + B * 12
        + (0 if gw_direct or not compute_grad else P * C * (D + 1) * 4),
        flops=2 * fma, dot="fp32",
        inflight=inflight, barriers=per_prog * per_block + fixed)
    launch(_small_c_kernel, _main_grid(P), (
        x, weight, target, ptr(bias), ptr(class_weight), ptr(sample_weight), ptr(grad_loss),
        ptr(grl_lambda), ptr(denom), ptr(loss), ptr(lse), ptr(red), dummy(count, no_count),
        ptr(gx), ptr(gw), ptr(gb), ptr(gw_part), ptr(col_part), ptr(wnorm),
        B, C, D, n_denom, x.stride(0), weight.stride(0), ignore_index, *consts.args(),
        smoothing),
        dict(NORMALIZE=normalize, HAS_MARGIN=consts.has_margin, STRAIGHT_THROUGH=straight_through,
             HAS_BIAS=bias is not None, HAS_CW=class_weight is not None,
             HAS_SW=sample_weight is not None, HAS_GLOSS=grad_loss is not None,
             HAS_LAMBDA=grl_lambda is not None, REDUCTION=reduction, WRITE_LOSS=write_loss,
             COMPUTE_GRAD=compute_grad, DENOM_INLINE=inline_denom, GW_DIRECT=gw_direct,
             XSQ_SLOT=xsq_slot, BLOCK_B=block_b, NUM_C=num_c, BLOCK_L=block_l, VEC=vec,
             UNROLL=unroll, BLOCK_P=_BLOCK_P),
        num_warps=num_warps, num_stages=stages, cost=main_cost)

    if compute_grad and not gw_direct:
        block_dw = min(64, max(16, triton.next_power_of_2(D)))
        launch(_small_c_grad_weight_kernel, _grad_weight_grid(C, D, block_dw),
               (weight, ptr(wnorm), gw_part, col_part, gw, ptr(gb), P, C, D, weight.stride(0)),
               dict(NORMALIZE=normalize, HAS_BIAS=bias is not None,
                    BLOCK_P=min(_BLOCK_P_GW, triton.next_power_of_2(P)), BLOCK_D=block_dw),
               num_warps=_NUM_WARPS_GW, num_stages=NUM_STAGES,
               cost=Cost(bytes=P * C * (D + 1) * 4 + 2 * C * D * ew,
                         # one step's loads (its loop is not pipelined: no async loads in
                         # the aot table) and the one sum across the tile, after the loop
                         inflight=min(_BLOCK_P_GW, P) * block_dw * 4, barriers=3))
    return loss, lse, gx, gw, gb
