"""Small-C path: one kernel that reads each row block of x once (the paper's heads, C = 2 or 7).

Per row block the kernel computes the row norms, the cosines (or plain logits) against every
class, the margin, the log-sum-exp and the loss, and — when a gradient is asked for — grad x
(times −λ) while x's block is still in L1/L2 (docs/design.md, "The Triton kernels"). The
per-class sums are tl.dot tiles against W padded to 16 classes: x (rows × features) @ Wᵀ for
the logits, G @ Ŵ for grad x and Gᵀ @ x̂ for grad W — no block-wide reduction per class.

The rows are spread over as many programs as the GPU holds at the occupancy the kernel is
designed for (design.py), never fewer than the row blocks allow: the paper's batch of 64 runs as
four programs. grad W needs a sum over all rows: a kernel that owns the only row block writes it
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

# Largest C served by this path (the classes live in one 16-wide dot tile); larger heads take
# the tiled path.
SMALL_C_MAX = 16
# Rows per block for batches of up to 64 such blocks; and programs (None: from the design
# occupancy on a GPU, 2 under the interpreter). Tests change them to force one program, or
# several blocks per program.
SMALL_BLOCK_ROWS = 16
MAX_PROGRAMS = None
# Features per step of the x tile (tests lower it to cross chunk boundaries), and warps per
# program (tests that put 64 rows in one block raise it, so that the tile still fits).
BLOCK_D_MAX = 256
NUM_WARPS = 4
# Partials summed at once by the reduction over programs.
_BLOCK_P = 32


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
    GW_DIRECT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Loss and/or gradient of row blocks pid, pid + programs, ...

    x (B, D), w (C, D), target (B,); loss (B,) or (), lse (B,), red (programs, 2) partial
    (loss sum, denominator) and count (an int32 zero) when several programs reduce; denom the
    n_denom partials of the mean's denominator (mean_denominator); gx (B, D),
    gw (C, D), gb (C,) or the fp32 partials gw_part (programs, C, D) and col_part
    (programs, C) (Σ_i G_ij c_ij for the angular head, Σ_i δ_ij = grad bias for the linear
    one); wnorm (C,) the weight row norms. BLOCK_C >= 16 (a dot's smallest side).
    """
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0)
    n_blocks = tl.cdiv(B, BLOCK_B)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    offs_d = tl.arange(0, BLOCK_D)
    w_rows = w_ptr + cols[:, None] * stride_w

    if HAS_CW:
        wj = tl.load(cw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        wj = col_ok.to(tl.float32)
    wsum = tl.sum(wj, 0)
    smooth_b = smoothing / C

    # Weight row norms: every program needs them and W is small on this path.
    inv_w = tl.full((BLOCK_C,), 1.0, tl.float32)
    if NORMALIZE:
        wsq = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            w = tl.load(w_rows + dd[None, :], mask=col_ok[:, None] & (dd < D)[None, :],
                        other=0.0).to(tl.float32)
            wsq += tl.sum(w * w, 1)
        inv_w = inv_norm(wsq)
        proj_w = tl.sqrt(wsq) >= 1e-12
        if COMPUTE_GRAD and not GW_DIRECT:
            tl.store(wnorm_ptr + cols, tl.sqrt(wsq), mask=col_ok & (pid == 0))
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)

    inv_denom = 1.0
    if COMPUTE_GRAD and REDUCTION == 1:
        if DENOM_INLINE:
            denom = denominator_sum(target_ptr, cw_ptr, sw_ptr, 0, B, C, ignore_index,
                                    HAS_CW, HAS_SW, BLOCK_B)
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
        rows64 = rows.to(tl.int64)
        x_rows = x_ptr + rows64[:, None] * stride_x
        tgt, valid, in_range, v, k = row_scale(
            target_ptr, sw_ptr, gloss_ptr, rows, row_ok, B, C, ignore_index, inv_denom,
            HAS_SW, HAS_GLOSS, REDUCTION)
        is_t = (cols[None, :] == tgt[:, None]) & valid[:, None]

        # Pass 1 over the features: raw dot products (one dot per step) and row sums of
        # squares.
        acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        xsq = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            xt = tl.load(x_rows + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(w_rows + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            xf = xt.to(tl.float32)
            xsq += tl.sum(xf * xf, 1)
            if DOT_FP32:
                acc = tl.dot(xf, tl.trans(wt.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(wt), acc)

        # Logits, log-sum-exp and loss, all in registers.
        if NORMALIZE:
            inv_x = inv_norm(xsq)
            cos = acc * inv_x[:, None] * inv_w[None, :]
            if HAS_MARGIN:
                psi = margin_psi(cos, cos_m, sin_m, threshold, linear_off, cos_margin)
                z = scale * tl.where(is_t, psi, cos)
            else:
                z = scale * cos
        else:
            z = acc
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
                g_x = g * inv_w[None, :]  # G diag(1/‖W_j‖): G Ŵ = g_x W
                g_w = g * inv_x[:, None]  # diag(1/‖x_i‖) G: Gᵀ x̂ = g_wᵀ x
            else:
                g = tl.where(col_ok[None, :], delta, 0.0)
                col_t = tl.sum(g, 0)
                g_x = g
                g_w = g
            if not DOT_FP32:
                g_x = g_x.to(x_ptr.dtype.element_ty)
                g_w = g_w.to(x_ptr.dtype.element_ty)

            # Pass 2 over the features (x's block is hot in cache): grad x, grad W.
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                d_ok = dd < D
                xt = tl.load(x_rows + dd[None, :], mask=row_ok[:, None] & d_ok[None, :],
                             other=0.0)
                wt = tl.load(w_rows + dd[None, :], mask=col_ok[:, None] & d_ok[None, :],
                             other=0.0)
                if DOT_FP32:
                    gx = tl.dot(g_x, wt.to(tl.float32), input_precision="ieee")
                    gw = tl.dot(tl.trans(g_w), xt.to(tl.float32), input_precision="ieee")
                else:
                    gx = tl.dot(g_x, wt)
                    gw = tl.dot(tl.trans(g_w), xt)
                if NORMALIZE:
                    gx = inv_x[:, None] * (gx - row_t[:, None] * (xt.to(tl.float32)
                                                                  * inv_x[:, None]))
                if HAS_LAMBDA:
                    gx = gx * neg_lambda
                tl.store(gx_ptr + rows64[:, None] * D + dd[None, :],
                         cast_rn(gx, gx_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & d_ok[None, :])
                gw_mask = col_ok[:, None] & d_ok[None, :]
                if GW_DIRECT:
                    if NORMALIZE:
                        w_hat = wt.to(tl.float32) * inv_w[:, None]
                        gw = inv_w[:, None] * (gw - col_t[:, None] * w_hat)
                    tl.store(gw_ptr + cols[:, None] * D + dd[None, :],
                             cast_rn(gw, gw_ptr.dtype.element_ty), mask=gw_mask)
                else:
                    part = gw_part_ptr + (pid * C + cols)[:, None] * D + dd[None, :]
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
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pp = (p0 + offs_p).to(tl.int64)
        p_ok = pp < P
        part = tl.load(gw_part_ptr + (pp * C + j)[:, None] * D + dd[None, :],
                       mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(part, 0)
        t_acc += tl.load(col_part_ptr + pp * C + j, mask=p_ok, other=0.0)
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


def _config(B: int, C: int, D: int, dot32: bool, loss_and_grad: bool = False):
    """(BLOCK_B, BLOCK_C, BLOCK_D, num_warps, num_stages): the sm_90 builds of these keep every tile in
    registers without spilling at two or more blocks per SM (docs/gpu/, the aot tables).

    Blocks of 16 rows (a dot's smallest side) while the batch is small, so that the paper's
    batch of 64 spreads over four programs; larger blocks for large batches, so that the grad W
    partial a program updates per block (C × D fp32, in L2) is small beside the x it reads.
    fp32 dots are FMA loops whose operands take more registers: narrower tiles. (A fourth
    load stage for the latency-bound paper batch spills with Triton 3.6 at unaligned D.)
    """
    block_c = max(16, triton.next_power_of_2(C))
    stages = NUM_STAGES
    if B <= 64 * SMALL_BLOCK_ROWS:
        block_b, block_d = SMALL_BLOCK_ROWS, (64 if dot32 else 256)
    else:
        block_b, block_d = (16, 64) if dot32 else (64, 128)
    if dot32:
        # 16 features: wider fp32 tiles spill at some shapes (unaligned D) with Triton 3.6 and
        # 3.8 alike (docs/design.md, "The Triton model")
        block_d = min(BLOCK_D_MAX, 16)
        if loss_and_grad:
            # Loss and gradient in one launch hold both passes' state: a third load stage
            # spills (8 bytes with Triton 3.8, class weights and GRL).
            stages = 2
    else:
        block_d = min(BLOCK_D_MAX, block_d, max(16, triton.next_power_of_2(D)))
    return block_b, block_c, block_d, NUM_WARPS, stages


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
    # Native bf16 dots on the GPU; fp32 (IEEE) otherwise: fp16 gradient tiles would overflow
    # where ψ' is large, and the interpreter's bf16 dot is not the GPU's.
    dot32 = not (info.gpu and x.dtype == weight.dtype == torch.bfloat16)
    block_b, block_c, block_d, num_warps, stages = _config(B, C, D, dot32,
                                                           write_loss and compute_grad)
    n_blocks = triton.cdiv(B, block_b)
    P = _programs(n_blocks, info)
    gw_direct = n_blocks == 1
    f32 = dict(dtype=torch.float32, device=dev)

    loss = torch.empty((B,) if reduction == 0 else (), **f32) if write_loss else None
    lse = torch.empty((B,), **f32) if write_loss else None
    red = count = None
    if write_loss and reduction != 0 and P > 1:
        red, count = torch.empty((P, 2), **f32), arrival_counter(dev)
    empty = torch.empty((0,), **f32)
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
    inline_denom = n_blocks <= 64  # every program sums the targets itself: no launch
    if compute_grad and reduction == 1 and not inline_denom:
        denom, n_denom = mean_denominator(target, class_weight, sample_weight, C, ignore_index)

    def ptr(t):
        return dummy(t, empty)

    # Traffic: x once (pass 2 re-reads the block from L2), W once (L2-resident), grad x once;
    # the partials are written once per program (their per-block updates stay in L2).
    ex, ew = x.element_size(), weight.element_size()
    per_prog = triton.cdiv(n_blocks, P)
    steps = per_prog * triton.cdiv(D, block_d)
    # Block-wide barriers per step, as the sm_90 builds have them (docs/gpu/triton-aot-*.md,
    # barriers per loop body): 2 in pass 1; in pass 2, 2 with fp32 dots and 14 with bf16 ones
    # (their operands are staged through shared memory); about 10 per block around them.
    barriers = steps * 2 + steps * (2 if dot32 else 14) * compute_grad + per_prog * 10
    main_cost = Cost(
        bytes=B * D * ex * (2 if compute_grad else 1) + C * D * ew + B * 12
        + (0 if gw_direct or not compute_grad else P * C * (D + 1) * 4),
        inflight=block_b * block_d * ex * (stages - 1), barriers=barriers)
    launch(_small_c_kernel, _main_grid(P), (
        x, weight, target, ptr(bias), ptr(class_weight), ptr(sample_weight), ptr(grad_loss),
        ptr(grl_lambda), ptr(denom), ptr(loss), ptr(lse), ptr(red), ptr(count), ptr(gx),
        ptr(gw), ptr(gb), ptr(gw_part), ptr(col_part), ptr(wnorm),
        B, C, D, n_denom, x.stride(0), weight.stride(0), ignore_index, *consts.args(),
        smoothing),
        dict(NORMALIZE=normalize, HAS_MARGIN=consts.has_margin, STRAIGHT_THROUGH=straight_through,
             HAS_BIAS=bias is not None, HAS_CW=class_weight is not None,
             HAS_SW=sample_weight is not None, HAS_GLOSS=grad_loss is not None,
             HAS_LAMBDA=grl_lambda is not None, REDUCTION=reduction, WRITE_LOSS=write_loss,
             COMPUTE_GRAD=compute_grad, DENOM_INLINE=inline_denom, GW_DIRECT=gw_direct,
             DOT_FP32=dot32, BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=block_d,
             BLOCK_P=_BLOCK_P),
        num_warps=num_warps, num_stages=stages, cost=main_cost)

    if compute_grad and not gw_direct:
        block_dw = min(64, max(16, triton.next_power_of_2(D)))
        launch(_small_c_grad_weight_kernel, _grad_weight_grid(C, D, block_dw),
               (weight, ptr(wnorm), gw_part, col_part, gw, ptr(gb), P, C, D, weight.stride(0)),
               dict(NORMALIZE=normalize, HAS_BIAS=bias is not None,
                    BLOCK_P=min(_BLOCK_P, triton.next_power_of_2(P)), BLOCK_D=block_dw),
               num_warps=4, num_stages=NUM_STAGES,
               cost=Cost(bytes=P * C * (D + 1) * 4 + 2 * C * D * ew,
                         inflight=min(_BLOCK_P, P) * block_dw * 4 * (NUM_STAGES - 1),
                         barriers=triton.cdiv(P, _BLOCK_P)))
    return loss, lse, gx, gw, gb
