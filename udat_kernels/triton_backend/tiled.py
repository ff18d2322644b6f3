"""Large-C path (10^4 to 10^7 classes): logits tiles from tl.dot, never a B×C fp32 tensor.

Of the two memory designs (docs/design.md, "Memory") this takes the first: row chunks whose
buffers fit a budget computed from free device memory (capped by the extra-peak target), with
the gradient formed from the same buffer — three GEMMs (logits, grad x, grad W). Per chunk of R
rows (docs/design.md, "The Triton kernels"):

  1. `_logits_kernel` (tl.dot tiles, fp32 accumulation): z = s·cos with the margin on the target
     column (or x·Wᵀ + b), then per (row, class tile) the tile's max m_t, Σ exp(z − m_t) and
     Σ w_j z_j; it stores P̃ = exp(z − m_t) — bf16 for bf16 inputs (2 bytes a logit, the
     precision a bf16 gradient operand has anyway), fp32 otherwise — and the target's z and
     cosine. No logit is written in fp32 and none is read back for a softmax pass.
  2. `_row_lse_kernel` (one program per row): log-sum-exp and loss from the tile partials, and
     the row's gradient coefficients; each tile's max becomes e_t = exp(m_t − lse), so that
     p_ij = P̃_ij · e_t(j).
  3. `_grad_x_kernel` / `_grad_w_kernel` (tl.dot): grad x̂ = G Ŵ and grad ŵ (+)= Gᵀ x̂, where
     each program forms its tile of G = s·δ·ψ' in registers from P̃ and the coefficients, and
     folds the norms in (G's columns times 1/‖W_j‖, or rows times 1/‖x_i‖), so that neither
     normalized copy exists. fp32 operands multiply in IEEE fp32, never TF32.
  4. `_project_kernel` turns the normalized gradients into grad x / grad W (the Jacobian of
     v / max(‖v‖, eps)) and applies −λ to grad x.

Traffic per logit: P̃ written once and read by each gradient GEMM (6 bytes for bf16), plus the
tile partials (12 bytes per row and 128 classes).

The same kernels run the shard mode (docs/design.md, "Shard mode"): given a class offset and the
whole problem's class count, the row kernel writes each row's partial q_i in place of its loss
and the backward takes the combined log-sum-exp; the ordinary op is offset 0 of C classes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (NUM_STAGES, MarginConsts, cast_rn, dot_fp32, dummy, margin_dpsi,
                      margin_psi, mean_denominator, row_scale, sum_partials)
from ._runtime import COUNTS, Cost, device_info, launch, note_buffer, torch_kernel

# Bytes a call's chunk buffers may take (None: from free device memory and the extra-peak cap,
# see chunk_rows); tests set it to force several chunks.
LOGITS_BUDGET_BYTES = None
# Of the free device memory, the share the chunk buffers may take.
FREE_FRACTION = 0.5
# Extra peak memory allowed, as a share of the eager reference's (four B×C fp32 tensors).
EAGER_PEAK_SHARE = 0.25
# Tile sizes (None: chosen per device; tests use small tiles).
TILE = None


@triton.jit(do_not_specialize=COUNTS)
def _row_norm_kernel(src_ptr, norm_ptr, N, D, stride, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """norm (N,) = ‖src_i‖ in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    offs = tl.arange(0, BLOCK_D)
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs
        v = tl.load(src_ptr + rows[:, None] * stride + dd[None, :],
                    mask=row_ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(v * v, 1)
    tl.store(norm_ptr + rows, tl.sqrt(sq), mask=row_ok)


@triton.jit(do_not_specialize=COUNTS)
def _logits_kernel(
    x_ptr, w_ptr, target_ptr, bias_ptr, cw_ptr, xnorm_ptr, wnorm_ptr, p_ptr, stats_ptr, zy_ptr,
    cy_ptr, row0, R, C, D, NT, stride_x, stride_w, ignore_index,
    scale, cos_m, sin_m, threshold, linear_off, cos_margin,
    NORMALIZE: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_CW: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M rows, BLOCK_N classes) tile of z for rows row0 + r (r < R): its P̃ tile and
    the tile's partials.

    p (R, C) in P̃'s dtype; stats (3, R, NT) fp32: max (made finite), Σ exp(z − max) and
    Σ w_j z_j per row and class tile; zy, cy (R,): the target's z and raw cosine, from the tile
    that holds it. One grid axis (_logits_grid): the row tiles of a class tile are consecutive
    programs, so that W's tile is read once from HBM while the chunk of x stays in L2.

    In the shard mode the targets, ignore_index and class weights come shifted by the shard's
    class offset (tiled_launch), so that column j is the target where y − o = j.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_m = tl.cdiv(R, BLOCK_M)
    pid_m = pid % n_m
    pid_n = pid // n_m
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < R
    rows = row0 + local
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        a = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + kk[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_FP32:
            # float32 (or mixed-dtype) inputs: full-precision products, no TF32.
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    tgt = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
    is_t = (cols[None, :] == tgt[:, None]) & (tgt != ignore_index)[:, None]
    here = (tgt >= pid_n * BLOCK_N) & (tgt < pid_n * BLOCK_N + BLOCK_N) & (tgt < C) & row_ok
    if NORMALIZE:
        inv_x = 1.0 / tl.maximum(tl.load(xnorm_ptr + rows, mask=row_ok, other=1.0), 1e-12)
        inv_w = 1.0 / tl.maximum(tl.load(wnorm_ptr + cols, mask=col_ok, other=1.0), 1e-12)
        z = acc * inv_x[:, None] * inv_w[None, :]
        if HAS_MARGIN:
            # The margin on one column per row: ψ of a (BLOCK_M,) vector, not of the whole
            # tile (which would spill the accumulator's registers).
            c_y = tl.sum(tl.where(is_t, z, 0.0), 1)
            psi_y = margin_psi(c_y, cos_m, sin_m, threshold, linear_off, cos_margin)
            tl.store(cy_ptr + local, c_y, mask=here & (tgt != ignore_index))
            z = tl.where(is_t, psi_y[:, None], z)
        z = scale * z
    else:
        z = acc
        if HAS_BIAS:
            z = z + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(zy_ptr + local, tl.sum(tl.where(is_t, z, 0.0), 1), mask=here)
    if HAS_CW:
        wj = tl.load(cw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        wj = col_ok.to(tl.float32)
    wz = tl.sum(tl.where(col_ok[None, :], z, 0.0) * wj[None, :], 1)
    z = tl.where(col_ok[None, :], z, float("-inf"))
    m = tl.max(z, 1)
    # A tile whose max is ±inf (an infinite logit, or no class) keeps an offset of 0, so that
    # +inf logits give an infinite sum and no inf − inf.
    m = tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)
    p = tl.exp(z - m[:, None])
    s = tl.sum(p, 1)
    tl.store(p_ptr + local[:, None] * C + cols[None, :], cast_rn(p, p_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    st = stats_ptr + local * NT + pid_n
    tl.store(st, m, mask=row_ok)
    tl.store(st + R * NT, s, mask=row_ok)
    tl.store(st + 2 * R * NT, wz, mask=row_ok)


@triton.jit(do_not_specialize=COUNTS)
def _row_lse_kernel(
    stats_ptr, zy_ptr, cy_ptr, coef_ptr, target_ptr, cw_ptr, sw_ptr, gloss_ptr, denom_ptr,
    wsum_ptr, lse_in_ptr, loss_ptr, lse_ptr, row0, R, B, C, NC, class_offset, NT, n_denom,
    ignore_index, scale, cos_m, sin_m, threshold, smoothing,
    NORMALIZE: tl.constexpr, HAS_MARGIN: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
    HAS_CW: tl.constexpr, HAS_SW: tl.constexpr, HAS_GLOSS: tl.constexpr,
    REDUCTION: tl.constexpr, WRITE_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_LSE: tl.constexpr, SHARD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Row r of the chunk: lse and loss_i from its tile partials; for the gradient, the row's
    coefficients coef (4, R) = (k_i·s, a_i + ε/C·Σw, a_i, ψ'_i) and e_t = exp(m_t − lse) in
    place of each tile's max.

    The tiles cover the classes [class_offset, class_offset + C) of NC (the ordinary op: 0 and
    C = NC); a_i, ε/NC, Σw and the target's range are the whole problem's. SHARD: the shard
    mode's rows (docs/math.md, "Class shards"): the forward writes q_i = −v_i·[a_i·z_iy·[owned]
    + ε/NC·Σ_j w_j z_ij] in place of the loss, and a row whose target is outside [0, NC) gets a
    NaN gradient (the ordinary op gives it none). target and cw are the whole problem's (not
    shifted), and class_offset places this call's classes in it."""
    r = tl.program_id(0).to(tl.int64)
    row = row0 + r
    offs = tl.arange(0, BLOCK_T)
    inv_denom = 1.0
    if COMPUTE_GRAD and REDUCTION == 1:
        denom = sum_partials(denom_ptr, n_denom, 1, 64)
        inv_denom = tl.where(denom != 0.0, 1.0 / tl.where(denom != 0.0, denom, 1.0), 0.0)
    tgt, valid, in_range, v, k = row_scale(target_ptr, sw_ptr, gloss_ptr, row, row < B, B, NC,
                                           ignore_index, inv_denom, HAS_SW, HAS_GLOSS, REDUCTION)
    ok_t = valid & in_range
    # The target is among this call's classes (every valid row, in the ordinary op).
    owned = ok_t & (tgt >= class_offset) & (tgt - class_offset < C)
    if SHARD:
        k = tl.where(valid & ((tgt < 0) | (tgt >= NC)), float("nan"), k)
    safe_t = tl.where(ok_t, tgt, 0)
    if HAS_CW:
        w_y = tl.load(cw_ptr + safe_t).to(tl.float32)
        wsum = tl.load(wsum_ptr)
    else:
        w_y = 1.0
        wsum = NC * 1.0
    a = (1.0 - smoothing) * w_y
    smooth_b = smoothing / NC
    st = stats_ptr + r * NT

    if HAS_LSE:
        lse = tl.load(lse_in_ptr + row)
    else:
        m_vec = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        for t0 in range(0, NT, BLOCK_T):
            tt = t0 + offs
            m_vec = tl.maximum(m_vec, tl.load(st + tt, mask=tt < NT, other=float("-inf")))
        mx = tl.max(m_vec, 0)
        s_vec = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for t0 in range(0, NT, BLOCK_T):
            tt = t0 + offs
            ok = tt < NT
            m_t = tl.load(st + tt, mask=ok, other=0.0)
            s_t = tl.load(st + R * NT + tt, mask=ok, other=0.0)
            s_vec += tl.where(ok, s_t * tl.exp(m_t - mx), 0.0)
        lse = mx + tl.log(tl.sum(s_vec, 0))
    if WRITE_LOSS:
        wz_vec = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for t0 in range(0, NT, BLOCK_T):
            tt = t0 + offs
            wz_vec += tl.load(st + 2 * R * NT + tt, mask=tt < NT, other=0.0)
        # zy is written only where a tile holds the target
        z_y = tl.where(owned, tl.load(zy_ptr + r), 0.0)
        # Without smoothing its term is left out, not multiplied by 0: with a +inf logit it is
        # inf − inf (docs/math.md, "Non-finite inputs").
        if SHARD:
            if NORMALIZE and HAS_MARGIN:
                # A NaN target cosine: the margin's clamp made its logit finite; the reference's
                # ψ keeps it NaN, and so must lse^(r) and q_i (which holds z_y without the lse).
                c_y = tl.load(cy_ptr + r, mask=owned, other=0.0)
                z_y = tl.where(c_y == c_y, z_y, c_y)
                lse = tl.where(c_y == c_y, lse, c_y)
            smooth = tl.where(smooth_b != 0.0, smooth_b * tl.sum(wz_vec, 0), 0.0)
            loss = -v * (a * z_y + smooth)
        else:
            smooth = tl.where(smooth_b != 0.0, smooth_b * (wsum * lse - tl.sum(wz_vec, 0)),
                              0.0)
            loss = v * (a * (lse - z_y) + smooth)
        loss = tl.where(valid, tl.where(in_range, loss, float("nan")), 0.0)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)

    if COMPUTE_GRAD:
        g_scale = k
        if NORMALIZE:
            g_scale = k * scale
        dpsi = 1.0
        if NORMALIZE and HAS_MARGIN and not STRAIGHT_THROUGH:
            # cy is written only for rows whose target is one of the tiles' classes
            c_y = tl.load(cy_ptr + r, mask=owned, other=0.0)
            dpsi = tl.where(owned, margin_dpsi(c_y, cos_m, sin_m, threshold), 1.0)
        tl.store(coef_ptr + r, g_scale)
        tl.store(coef_ptr + R + r, a + smooth_b * wsum)
        tl.store(coef_ptr + 2 * R + r, tl.where(owned, a, 0.0))
        tl.store(coef_ptr + 3 * R + r, dpsi)
        for t0 in range(0, NT, BLOCK_T):
            tt = t0 + offs
            ok = tt < NT
            m_t = tl.load(st + tt, mask=ok, other=0.0)
            tl.store(st + tt, tl.exp(m_t - lse), mask=ok)


@triton.jit
def _grad_tile(p_ptr, stats_ptr, coef_ptr, target_ptr, cw_ptr, rows_l, row0, cols, R, C, NT,
               tile, smooth_b, ignore_index, HAS_CW: tl.constexpr, ROWS_FIRST: tl.constexpr,
               SHARD: tl.constexpr):
    """The tile of G = s·δ·ψ' at local rows rows_l and classes cols (all in one class tile of
    the logits kernel, `tile`), in fp32: (rows, cols) when ROWS_FIRST, else (cols, rows).

    δ_ij = p_ij (a_i + ε/C·Σw) − ε/C·w_j − a_i [j = y_i], with p_ij = P̃_ij e_t (targets,
    ignore_index and class weights shifted by the shard's offset in the shard mode). SHARD:
    ignored rows give exactly 0, even where their logits are not finite (docs/math.md, "Class
    shards").
    """
    r_ok = rows_l < R
    c_ok = cols < C
    kg = tl.load(coef_ptr + rows_l, mask=r_ok, other=0.0)
    pc = tl.load(coef_ptr + R + rows_l, mask=r_ok, other=0.0)
    a = tl.load(coef_ptr + 2 * R + rows_l, mask=r_ok, other=0.0)
    dpsi = tl.load(coef_ptr + 3 * R + rows_l, mask=r_ok, other=1.0)
    e = tl.load(stats_ptr + rows_l * NT + tile, mask=r_ok, other=0.0)
    tgt = tl.load(target_ptr + row0 + rows_l, mask=r_ok, other=-1)
    live = r_ok
    if SHARD:
        live = r_ok & (tgt != ignore_index)
    if HAS_CW:
        wj = tl.load(cw_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    else:
        wj = c_ok.to(tl.float32)
    if ROWS_FIRST:
        p = tl.load(p_ptr + rows_l[:, None] * C + cols[None, :],
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        is_t = cols[None, :] == tgt[:, None]
        d = p * (e * pc)[:, None] - smooth_b * wj[None, :] - tl.where(is_t, a[:, None], 0.0)
        g = kg[:, None] * tl.where(is_t, d * dpsi[:, None], d)
        g = tl.where(live[:, None] & c_ok[None, :], g, 0.0)
    else:
        p = tl.load(p_ptr + rows_l[None, :] * C + cols[:, None],
                    mask=r_ok[None, :] & c_ok[:, None], other=0.0).to(tl.float32)
        is_t = cols[:, None] == tgt[None, :]
        d = p * (e * pc)[None, :] - smooth_b * wj[:, None] - tl.where(is_t, a[None, :], 0.0)
        g = kg[None, :] * tl.where(is_t, d * dpsi[None, :], d)
        g = tl.where(live[None, :] & c_ok[:, None], g, 0.0)
    return g


@triton.jit(do_not_specialize=COUNTS)
def _grad_x_kernel(
    p_ptr, stats_ptr, coef_ptr, target_ptr, cw_ptr, w_ptr, wnorm_ptr, gx_ptr,
    row0, R, C, D, NT, stride_w, smooth_b, ignore_index,
    NORMALIZE: tl.constexpr, HAS_CW: tl.constexpr, DOT_FP32: tl.constexpr, SHARD: tl.constexpr,
    TILE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad x̂ rows row0 + r (r < R) = G Ŵ, G formed per tile: gx (B, D) fp32.

    TILE_N is the logits kernel's class tile (a multiple of BLOCK_K). The feature tiles of a
    row tile are consecutive programs: they read the same P̃ rows, from L2 after the first.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_d = tl.cdiv(D, BLOCK_N)
    pid_m = pid // n_d
    pid_n = pid % n_d
    rows_l = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = dd < D
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        cols = k0 + offs_k
        c_ok = cols < C
        g = _grad_tile(p_ptr, stats_ptr, coef_ptr, target_ptr, cw_ptr, rows_l, row0, cols, R,
                       C, NT, k0 // TILE_N, smooth_b, ignore_index, HAS_CW, True, SHARD)
        if NORMALIZE:
            inv_w = 1.0 / tl.maximum(tl.load(wnorm_ptr + cols, mask=c_ok, other=1.0), 1e-12)
            g = g * inv_w[None, :]
        w = tl.load(w_ptr + cols[:, None] * stride_w + dd[None, :],
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(g, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(g.to(w.dtype), w, acc)
    tl.store(gx_ptr + (row0 + rows_l)[:, None] * D + dd[None, :], acc,
             mask=(rows_l < R)[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=COUNTS)
def _grad_w_kernel(
    p_ptr, stats_ptr, coef_ptr, target_ptr, cw_ptr, x_ptr, xnorm_ptr, gw_ptr, gb_ptr,
    row0, R, C, D, NT, stride_x, smooth_b, ignore_index,
    NORMALIZE: tl.constexpr, HAS_CW: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr, SHARD: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad ŵ (C, D) fp32 (+)= Gᵀ x̂ over the chunk's rows, G formed per tile; and grad b
    (C,) (+)= Σ_i G_ij for the linear head.

    A class tile of BLOCK_M lies in one logits tile (TILE_N is a multiple of BLOCK_M). With one
    chunk the result is written once (ACCUMULATE false): no accumulator is re-read.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_d = tl.cdiv(D, BLOCK_N)
    pid_m = pid // n_d
    pid_n = pid % n_d
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c_ok = cols < C
    dd = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = dd < D
    offs_k = tl.arange(0, BLOCK_K)
    tile = pid_m * BLOCK_M // TILE_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        rows_l = k0 + offs_k
        r_ok = rows_l < R
        g = _grad_tile(p_ptr, stats_ptr, coef_ptr, target_ptr, cw_ptr, rows_l, row0, cols, R,
                       C, NT, tile, smooth_b, ignore_index, HAS_CW, False, SHARD)
        if HAS_BIAS:
            gb += tl.sum(g, 1)
        if NORMALIZE:
            inv_x = 1.0 / tl.maximum(tl.load(xnorm_ptr + row0 + rows_l, mask=r_ok, other=1.0),
                                     1e-12)
            g = g * inv_x[None, :]
        xt = tl.load(x_ptr + (row0 + rows_l)[:, None] * stride_x + dd[None, :],
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(g, xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(g.to(xt.dtype), xt, acc)
    out = gw_ptr + cols[:, None] * D + dd[None, :]
    mask = c_ok[:, None] & d_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0)
    tl.store(out, acc, mask=mask)
    if HAS_BIAS:
        b_ok = c_ok & (pid_n == 0)
        if ACCUMULATE:
            gb += tl.load(gb_ptr + cols, mask=b_ok, other=0.0)
        tl.store(gb_ptr + cols, gb, mask=b_ok)


@triton.jit(do_not_specialize=COUNTS)
def _sum_kernel(src_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """out = Σ src (fp32, fixed order): the class weights' sum for label smoothing."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK):
        acc += tl.load(src_ptr + i0 + offs, mask=i0 + offs < N, other=0.0).to(tl.float32)
    tl.store(out_ptr, tl.sum(acc, 0))


@triton.jit(do_not_specialize=COUNTS)
def _project_kernel(g_ptr, v_ptr, out_ptr, lam_ptr, N, D, stride_g, stride_v,
                    NORMALIZE: tl.constexpr, HAS_LAMBDA: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out_i = (g_i − [‖v_i‖ ≥ eps] (g_i·v̂_i) v̂_i) / max(‖v_i‖, eps), times −λ when given.

    g (N, D) the gradient w.r.t. the normalized rows, v (N, D) the rows themselves; the linear
    head (NORMALIZE false) only scales and casts. out (N, D) in out's dtype.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    offs = tl.arange(0, BLOCK_D)
    if NORMALIZE:
        sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
        dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs
            mask = row_ok[:, None] & (dd < D)[None, :]
            v = tl.load(v_ptr + rows[:, None] * stride_v + dd[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            g = tl.load(g_ptr + rows[:, None] * stride_g + dd[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            sq += tl.sum(v * v, 1)
            dot += tl.sum(g * v, 1)
        norm = tl.sqrt(sq)
        inv = 1.0 / tl.maximum(norm, 1e-12)
        # t v̂ / n with t = g·v̂: written as (g·v) inv² v to avoid forming v̂ twice.
        coef = tl.where(norm >= 1e-12, dot * inv * inv, 0.0)
    factor = tl.full((BLOCK_R,), 1.0, tl.float32)
    if NORMALIZE:
        factor = inv
    if HAS_LAMBDA:
        factor = factor * -tl.load(lam_ptr).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs
        mask = row_ok[:, None] & (dd < D)[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_g + dd[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if NORMALIZE:
            v = tl.load(v_ptr + rows[:, None] * stride_v + dd[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            g = g - coef[:, None] * v
        tl.store(out_ptr + rows[:, None] * D + dd[None, :],
                 cast_rn(g * factor[:, None], out_ptr.dtype.element_ty), mask=mask)



def _gemm_dtype(x, weight):
    # bf16 inputs: P̃ and the gradient tiles in bf16, both gradient GEMMs on tensor cores. fp16
    # would overflow where ψ' is large (s·ψ' reaches 6·10^7 at |c| = 1), so fp16 and mixed
    # inputs use fp32 (IEEE) throughout.
    if x.dtype == weight.dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def _tiles(gemm, info, rows: int, D: int):
    """Tiles of the logits, grad x and grad W kernels: ((BM, BN, BK), warps, stages) each.

    The logits tile's width is a multiple of grad x's BLOCK_K and grad W's BLOCK_M (their
    class steps lie inside one logits tile). grad x's feature tile narrows when the chunk has
    few rows, so that its grid still covers the SMs twice.
    """
    if TILE is not None:
        t = TILE
        return (t[:3], t[3], t[4]), (t[:3], t[3], t[4]), (t[:3], t[3], t[4])
    if not info.gpu:
        t = ((16, 16, 16), 4, 1)
        return t, t, t
    if gemm == torch.bfloat16:
        logits = ((128, 128, 64), 8, 3)
        gx_m, gx_n = 128, 128
        while gx_m > 64 and triton.cdiv(rows, gx_m) * triton.cdiv(D, gx_n) < 2 * info.num_sms:
            gx_m //= 2
        while gx_n > 32 and triton.cdiv(rows, gx_m) * triton.cdiv(D, gx_n) < 2 * info.num_sms:
            gx_n //= 2
        return logits, ((gx_m, gx_n, 64), 8, 3), ((128, 128, 64), 8, 3)
    logits = ((64, 64, 32), 4, 2)
    return logits, ((64, 64, 32), 4, 2), ((64, 64, 32), 4, 2)


def chunk_rows(B: int, C: int, per_row: int, fixed: int, block: int, info) -> int:
    """Rows of a chunk: as many as the budget allows (a multiple of the row tile, at least one).

    budget = min(FREE_FRACTION of the free device memory, EAGER_PEAK_SHARE of the eager
    reference's extra peak (four B×C fp32 tensors)), less the call's fixed buffers."""
    if LOGITS_BUDGET_BYTES is not None:
        budget = LOGITS_BUDGET_BYTES
    else:
        budget = min(FREE_FRACTION * info.free_bytes, EAGER_PEAK_SHARE * 16 * B * C) - fixed
    rows = int(budget) // per_row // block * block
    return min(B, max(block, rows))


# One grid function per kernel: the launch uses it, and the CPU tests check what it returns
# against CUDA's limits at every size the backend serves.


def _rows_grid(N: int, block_r: int) -> tuple:
    return (triton.cdiv(N, block_r),)


def _logits_grid(rows: int, C: int, bm: int, bn: int) -> tuple:
    # Row tiles times class tiles on axis 0 (axes 1 and 2 stop at 65535 class tiles).
    return (triton.cdiv(rows, bm) * triton.cdiv(C, bn),)


def _row_grid(rows: int) -> tuple:
    return (rows,)


def _gemm_grid(M: int, N: int, bm: int, bn: int) -> tuple:
    return (triton.cdiv(M, bm) * triton.cdiv(N, bn),)


_NORM_ROWS = 16


def _norm(t):
    N, D = t.shape
    norm = torch.empty((N,), dtype=torch.float32, device=t.device)
    block_d = min(256, max(16, triton.next_power_of_2(D)))
    launch(_row_norm_kernel, _rows_grid(N, _NORM_ROWS), (t, norm, N, D, t.stride(0)),
           dict(BLOCK_R=_NORM_ROWS, BLOCK_D=block_d), num_warps=4, num_stages=NUM_STAGES,
           cost=Cost(bytes=N * D * t.element_size() + N * 4,
                     inflight=_NORM_ROWS * block_d * t.element_size() * (NUM_STAGES - 1),
                     barriers=triton.cdiv(D, block_d)))
    return norm


def _project(g, v, out, lam, normalize):
    N, D = g.shape
    block_d = min(128, max(16, triton.next_power_of_2(D)))  # 256 spills on Triton 3.8
    launch(_project_kernel, _rows_grid(N, _NORM_ROWS),
           (g, v, out, dummy(lam, g), N, D, g.stride(0), v.stride(0)),
           dict(NORMALIZE=normalize, HAS_LAMBDA=lam is not None, BLOCK_R=_NORM_ROWS,
                BLOCK_D=block_d), num_warps=4, num_stages=NUM_STAGES,
           cost=Cost(bytes=N * D * (g.element_size() + v.element_size() + out.element_size()),
                     inflight=_NORM_ROWS * block_d * 8 * (NUM_STAGES - 1),
                     barriers=2 * triton.cdiv(D, block_d)))


def tiled_launch(x, weight, target, bias, class_weight, sample_weight, grl_lambda, grad_loss,
                 lse_in, consts: MarginConsts, normalize, smoothing, ignore_index, reduction,
                 straight_through, write_loss, compute_grad, shard=None):
    """Run the tiled path; returns (loss, lse, grad_x, grad_weight, grad_bias) like small_c_launch.

    lse_in (B,) fp32 or None: the forward's log-sum-exp, reused by the backward.
    shard (class_offset, num_classes) or None: the shard mode (docs/design.md, "Shard mode"):
    weight holds the classes [class_offset, class_offset + C) of num_classes, class_weight is
    the whole (num_classes,) vector, targets are global; with reduction none, `loss` is then
    the rows' partial q_i, lse_in the combined log-sum-exp, grad_loss ∂L/∂loss_i, and grad x
    comes in fp32. None is the ordinary op: offset 0 of C classes.
    """
    B, D = x.shape
    C = weight.shape[0]
    offset, NC = shard if shard is not None else (0, C)
    dev = x.device
    info = device_info(dev)
    f32 = dict(dtype=torch.float32, device=dev)
    gemm = _gemm_dtype(x, weight)
    pe = 2 if gemm == torch.bfloat16 else 4
    (lt, lw, ls), _, _ = _tiles(gemm, info, B, D)
    bm, bn, bk = lt
    NT = triton.cdiv(C, bn)
    per_row = C * pe + NT * 12 + 24
    fixed = (C * D * 4 + B * D * 4) * compute_grad + (B + C) * 8
    R = chunk_rows(B, C, per_row, fixed, bm, info)
    (lt, lw, ls), (xt, xw, xs), (wt, ww, ws) = _tiles(gemm, info, R, D)
    p = torch.empty((R, C), dtype=gemm, device=dev)
    stats = torch.empty((3, R, NT), **f32)
    rowbuf = torch.empty((6, R), **f32)  # zy, cy and the four gradient coefficients
    zy, cy, coef = rowbuf[0], rowbuf[1], rowbuf[2:]
    loss_rows = torch.empty((B,), **f32) if write_loss else zy
    lse = torch.empty((B,), **f32) if write_loss else zy
    note_buffer(R * per_row + fixed)

    xnorm = _norm(x) if normalize else zy
    wnorm = _norm(weight) if normalize else zy
    denom, n_denom = None, 0
    if reduction == 1 and (compute_grad or write_loss):
        denom, n_denom = mean_denominator(target, class_weight, sample_weight, C, ignore_index)
    wsum = None
    if class_weight is not None:
        wsum = torch.empty((), **f32)
        launch(_sum_kernel, (1,), (class_weight, wsum, NC), dict(BLOCK=1024), num_warps=4,
               num_stages=NUM_STAGES, cost=Cost(bytes=NC * 4, inflight=4096, barriers=2))
    if compute_grad:
        gx_hat = torch.empty((B, D), **f32)
        gw_acc = torch.empty((C, D), **f32)
        gb = torch.empty((C,), **f32) if bias is not None else None
    dfp32 = dot_fp32(x, weight, info)
    gdot = "fp32" if gemm == torch.float32 or not info.gpu else "bf16"
    block_t = min(1024, triton.next_power_of_2(NT))
    smooth_b = smoothing / NC
    # The tile kernels see this call's classes as columns 0..C-1: in the shard mode they get the
    # targets and ignore_index shifted by the offset and the class weights from the offset on
    # (the row kernel keeps the whole problem's).
    t_l, ign_l, cw_l = target, ignore_index, class_weight
    if offset:
        torch_kernel("sub", Cost(bytes=B * 16))
        t_l, ign_l = target - offset, ignore_index - offset
        cw_l = class_weight[offset:] if class_weight is not None else None

    for row0 in range(0, B, R):
        rows = min(R, B - row0)
        launch(_logits_kernel, _logits_grid(rows, C, bm, bn),
               (x, weight, t_l, dummy(bias, zy), dummy(cw_l, zy), xnorm, wnorm, p,
                stats, zy, cy, row0, rows, C, D, NT, x.stride(0), weight.stride(0), ign_l,
                *consts.args()),
               dict(NORMALIZE=normalize, HAS_MARGIN=normalize and consts.has_margin,
                    HAS_BIAS=bias is not None, HAS_CW=class_weight is not None, DOT_FP32=dfp32,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=lw, num_stages=ls,
               cost=Cost(bytes=rows * (C * pe + NT * 12 + D * x.element_size())
                         + C * D * weight.element_size(), flops=2 * rows * C * D,
                         dot="fp32" if dfp32 else "bf16",
                         inflight=(bm + bn) * bk * x.element_size() * (ls - 1), barriers=6,
                         logits=rows * C * pe))
        launch(_row_lse_kernel, _row_grid(rows),
               (stats, zy, cy, coef, target, dummy(class_weight, zy), dummy(sample_weight, zy),
                dummy(grad_loss, zy), dummy(denom, zy), dummy(wsum, zy), dummy(lse_in, zy),
                loss_rows, lse, row0, rows, B, C, NC, offset, NT, n_denom, ignore_index,
                consts.scale, consts.cos_m, consts.sin_m, consts.threshold, smoothing),
               dict(NORMALIZE=normalize, HAS_MARGIN=normalize and consts.has_margin,
                    STRAIGHT_THROUGH=straight_through, HAS_CW=class_weight is not None,
                    HAS_SW=sample_weight is not None, HAS_GLOSS=grad_loss is not None,
                    REDUCTION=reduction, WRITE_LOSS=write_loss, COMPUTE_GRAD=compute_grad,
                    HAS_LSE=lse_in is not None, SHARD=shard is not None, BLOCK_T=block_t),
               num_warps=4, num_stages=NUM_STAGES,
               cost=Cost(bytes=rows * NT * 12 * (1 + compute_grad) + rows * 40,
                         inflight=block_t * 8 * (NUM_STAGES - 1),
                         barriers=6 * triton.cdiv(NT, block_t), logits=rows * NT * 12))
        if not compute_grad:
            continue
        xm, xn, xk = xt
        launch(_grad_x_kernel, _gemm_grid(rows, D, xm, xn),
               (p, stats, coef, t_l, dummy(cw_l, zy), weight, wnorm, gx_hat, row0,
                rows, C, D, NT, weight.stride(0), smooth_b, ign_l),
               dict(NORMALIZE=normalize, HAS_CW=class_weight is not None,
                    DOT_FP32=gdot == "fp32", SHARD=shard is not None, TILE_N=bn, BLOCK_M=xm,
                    BLOCK_N=xn, BLOCK_K=xk),
               num_warps=xw, num_stages=xs,
               cost=Cost(bytes=rows * C * pe + C * D * weight.element_size() + rows * D * 4,
                         flops=2 * rows * C * D, dot=gdot,
                         inflight=(xm * pe + xn * weight.element_size()) * xk * (xs - 1),
                         barriers=4, logits=rows * C * pe))
        wm, wn, wk = wt
        launch(_grad_w_kernel, _gemm_grid(C, D, wm, wn),
               (p, stats, coef, t_l, dummy(cw_l, zy), x, xnorm, gw_acc,
                dummy(gb, zy), row0, rows, C, D, NT, x.stride(0), smooth_b, ign_l),
               dict(NORMALIZE=normalize, HAS_CW=class_weight is not None,
                    HAS_BIAS=bias is not None, ACCUMULATE=row0 > 0, DOT_FP32=gdot == "fp32",
                    SHARD=shard is not None, TILE_N=bn, BLOCK_M=wm, BLOCK_N=wn, BLOCK_K=wk),
               num_warps=ww, num_stages=ws,
               cost=Cost(bytes=rows * C * pe + rows * D * x.element_size()
                         + C * D * 4 * (2 if row0 > 0 else 1), flops=2 * rows * C * D,
                         dot=gdot, inflight=(wm * pe + wn * x.element_size()) * wk * (ws - 1),
                         barriers=4, logits=rows * C * pe))

    loss = None
    if write_loss:
        if reduction == 0:
            loss = loss_rows
        else:
            torch_kernel("sum", Cost(bytes=B * 4, barriers=2))
            if reduction == 1:
                torch_kernel("sum", Cost(bytes=n_denom * 4, barriers=2))
                torch_kernel("div", Cost(bytes=12))
            loss = loss_rows.sum() if reduction == 2 else loss_rows.sum() / denom.sum()
    gx = gw = gbias = None
    if compute_grad:
        # the shard mode's part of grad x stays in fp32: the caller sums the shards' parts
        gx = torch.empty(x.shape, **f32) if shard is not None else torch.empty_like(x)
        gw = torch.empty_like(weight)
        _project(gx_hat, x, gx, grl_lambda, normalize)
        _project(gw_acc, weight, gw, None, normalize)
        if gb is not None:
            torch_kernel("copy", Cost(bytes=C * 6))
            gbias = gb.to(bias.dtype)
    note_buffer(R * per_row + fixed, freed=True)
    return loss, (lse if write_loss else None), gx, gw, gbias
