"""Large-C path (10^4 to 10^7 classes): logits tiles from tl.dot, never a B×C tensor.

Of the two memory designs (docs/design.md, "Memory") this takes the first: row chunks whose
logits over all classes fit a memory budget (LOGITS_BUDGET_BYTES), with the gradient formed in
the same pass — three GEMMs (logits, grad x, grad W). The second design (class tiles, online log-sum-exp, no logits buffer)
needs a fourth GEMM, because grad x and grad W are reductions over different axes and cannot both
be accumulated by one tiling without atomics; at C = 10^5..10^6 and D = 512 the GEMMs dominate,
so a third more GEMM work costs more than writing and re-reading a bounded chunk of logits.

Per chunk of R rows:
  1. `_logits_kernel` (tl.dot tiles, fp32 accumulation, bf16/fp16 operands on tensor cores):
     z = s·cos with the margin applied on the target column inside the tile (or x·Wᵀ + b),
     written in fp32 to the (R, C) chunk buffer;
  2. `_softmax_grad_kernel` (one program per row): log-sum-exp, loss, and the gradient tile
     G = s·δ·ψ' — over z's buffer in fp32, or into a bf16 buffer for bf16 inputs;
  3. grad x̂ = G @ Ŵ and grad ŵ += Gᵀ @ x̂ (`_gemm_kernel`, fp32 accumulation and output;
     IEEE fp32 products for fp32 operands whatever torch's TF32 switches say), then `_project_kernel` turns the normalized gradients into grad x / grad W
     (the Jacobian of x / max(‖x‖, eps)) and applies −λ to grad x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (NUM_STAGES, MarginConsts, cast_rn, dot_fp32, dummy, margin_dpsi,
                      margin_psi, mean_denominator, row_scale)
from ._runtime import Cost, device_info, launch, note_buffer, torch_kernel

# Bytes the per-chunk logits (and gradient) buffer may take; tests lower it to force chunks.
# 2 GiB keeps (8192, 512, 10^5) to three chunks, and ~256-row chunks at 10^6 classes.
LOGITS_BUDGET_BYTES = 2 << 30
# Tile sizes of the logits kernel (None: chosen per device; tests use small tiles).
TILE = None


@triton.jit
def _row_norm_kernel(src_ptr, norm_ptr, hat_ptr, N, D, stride,
                     WRITE_HAT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """norm (N,) = ‖src_i‖ in fp32 and, when asked, hat (N, D) = src_i / max(‖src_i‖, eps)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    offs = tl.arange(0, BLOCK_D)
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs
        v = tl.load(src_ptr + rows[:, None] * stride + dd[None, :],
                    mask=row_ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(v * v, 1)
    norm = tl.sqrt(sq)
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    if WRITE_HAT:
        inv = 1.0 / tl.maximum(norm, 1e-12)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs
            mask = row_ok[:, None] & (dd < D)[None, :]
            v = tl.load(src_ptr + rows[:, None] * stride + dd[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            tl.store(hat_ptr + rows[:, None] * D + dd[None, :],
                     cast_rn(v * inv[:, None], hat_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logits_kernel(
    x_ptr, w_ptr, target_ptr, bias_ptr, xnorm_ptr, wnorm_ptr, z_ptr, cy_ptr,
    row0, R, C, D, stride_x, stride_w, ignore_index,
    scale, cos_m, sin_m, threshold, linear_off, cos_margin,
    NORMALIZE: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """z[r, j] for rows row0 + r (r < R) and all classes j: one (BLOCK_M, BLOCK_N) tile each.

    z (R, C) fp32. cy (R,) receives the target's raw cosine (for ψ') from the tile holding it.
    One grid axis (see _logits_grid): the row tiles of a class tile are consecutive programs,
    so that the class tile of W is read once from HBM while the chunk of x stays in L2.
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
    if NORMALIZE:
        inv_x = 1.0 / tl.maximum(tl.load(xnorm_ptr + rows, mask=row_ok, other=1.0), 1e-12)
        inv_w = 1.0 / tl.maximum(tl.load(wnorm_ptr + cols, mask=col_ok, other=1.0), 1e-12)
        cos = acc * inv_x[:, None] * inv_w[None, :]
        if HAS_MARGIN:
            tgt = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
            is_t = (cols[None, :] == tgt[:, None]) & (tgt != ignore_index)[:, None]
            # The margin on one column per row: ψ of a (BLOCK_M,) vector, not of the whole
            # tile (which would spill the accumulator's registers).
            c_y = tl.sum(tl.where(is_t, cos, 0.0), 1)
            psi_y = margin_psi(c_y, cos_m, sin_m, threshold, linear_off, cos_margin)
            z = scale * tl.where(is_t, psi_y[:, None], cos)
            here = (tgt >= pid_n * BLOCK_N) & (tgt < pid_n * BLOCK_N + BLOCK_N) & (tgt < C)
            tl.store(cy_ptr + local, c_y, mask=row_ok & here & (tgt != ignore_index))
        else:
            z = scale * cos
    else:
        z = acc
        if HAS_BIAS:
            z = z + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(z_ptr + local[:, None] * C + cols[None, :], z,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _softmax_grad_kernel(
    z_ptr, g_ptr, cy_ptr, target_ptr, cw_ptr, sw_ptr, gloss_ptr, denom_ptr, lse_in_ptr,
    loss_ptr, lse_ptr, row0, B, C, ignore_index,
    scale, cos_m, sin_m, threshold, smoothing,
    NORMALIZE: tl.constexpr, HAS_MARGIN: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
    HAS_CW: tl.constexpr, HAS_SW: tl.constexpr, HAS_GLOSS: tl.constexpr,
    REDUCTION: tl.constexpr, WRITE_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_LSE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One row of the chunk: lse and loss_i (unreduced) from z, then G over z's row.

    z (R, C) fp32, g (R, C) in the GEMM dtype (may alias z); loss, lse (B,) fp32.
    """
    r = tl.program_id(0).to(tl.int64)
    row = row0 + r
    offs = tl.arange(0, BLOCK_N)
    inv_denom = 1.0
    if COMPUTE_GRAD and REDUCTION == 1:
        denom = tl.load(denom_ptr)
        inv_denom = tl.where(denom != 0.0, 1.0 / tl.where(denom != 0.0, denom, 1.0), 0.0)
    tgt, valid, in_range, v, k = row_scale(target_ptr, sw_ptr, gloss_ptr, row, row < B, B, C,
                                           ignore_index, inv_denom, HAS_SW, HAS_GLOSS, REDUCTION)
    ok_t = valid & in_range
    safe_t = tl.where(ok_t, tgt, 0)
    z_row = z_ptr + r * C
    z_y = tl.load(z_row + safe_t)
    if HAS_CW:
        w_y = tl.load(cw_ptr + safe_t).to(tl.float32)
    else:
        w_y = 1.0
    a = (1.0 - smoothing) * w_y
    smooth_b = smoothing / C

    # Pass 1: online log-sum-exp per lane, and the class-weighted sums for label smoothing.
    m_vec = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_vec = tl.zeros((BLOCK_N,), dtype=tl.float32)
    wz_vec = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ws_vec = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_N):
        cols = c0 + offs
        ok = cols < C
        if WRITE_LOSS or not HAS_LSE:
            z = tl.load(z_row + cols, mask=ok, other=float("-inf"))
        if not HAS_LSE:
            m_new = tl.maximum(m_vec, z)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_vec = s_vec * tl.exp(m_vec - m_safe) + tl.exp(z - m_safe)
            m_vec = m_new
        if HAS_CW:
            wj = tl.load(cw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        else:
            wj = ok.to(tl.float32)
        if WRITE_LOSS:
            wz_vec += tl.where(ok, z, 0.0) * wj
        ws_vec += wj
    wsum = tl.sum(ws_vec, 0)
    if HAS_LSE:
        lse = tl.load(lse_in_ptr + row)
    else:
        m = tl.max(m_vec, 0)
        lse = m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), 0))
    if WRITE_LOSS:
        loss = v * (a * (lse - z_y) + smooth_b * (wsum * lse - tl.sum(wz_vec, 0)))
        loss = tl.where(valid, tl.where(in_range, loss, float("nan")), 0.0)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)

    if COMPUTE_GRAD:
        p_coef = a + smooth_b * wsum
        g_scale = k
        if NORMALIZE:
            g_scale = k * scale
        dpsi = 1.0
        if NORMALIZE and HAS_MARGIN and not STRAIGHT_THROUGH:
            dpsi = margin_dpsi(tl.load(cy_ptr + r), cos_m, sin_m, threshold)
        g_row = g_ptr + r * C
        for c0 in range(0, C, BLOCK_N):
            cols = c0 + offs
            ok = cols < C
            z = tl.load(z_row + cols, mask=ok, other=float("-inf"))
            if HAS_CW:
                wj = tl.load(cw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            else:
                wj = ok.to(tl.float32)
            is_t = (cols == tgt) & ok_t
            delta = tl.exp(z - lse) * p_coef - smooth_b * wj - tl.where(is_t, a, 0.0)
            g = g_scale * tl.where(is_t, delta * dpsi, delta)
            tl.store(g_row + cols, cast_rn(g, g_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                 stride_cm, ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c (+)= a @ b: a (M, K), b (K, N) at any strides, c (M, N) fp32 with unit column stride.

    The gradient GEMMs of a chunk (grad x̂ = G Ŵ, grad ŵ += Gᵀ x̂). fp32 operands multiply in
    IEEE fp32 (input_precision="ieee": no TF32); bf16 operands on tensor cores. The tiles of a
    column of c are consecutive programs (N = D is small: they share the a tile in L2).
    """
    pid = tl.program_id(0).to(tl.int64)
    n_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_n
    pid_n = pid % n_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    c = c_ptr + rm[:, None] * stride_cm + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c, mask=mask, other=0.0)
    tl.store(c, acc, mask=mask)


@triton.jit
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


def _tiles(x, weight, info):
    if TILE is not None:
        return TILE
    if not info.gpu:
        return 16, 16, 16, 4, 1
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the largest tiles whose sm_90 build
    # keeps the accumulator and the margin epilogue in registers (no spills).
    if x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16):
        return 128, 128, 32, 8, 4
    return 64, 64, 32, 4, 2


def _gemm_dtype(x, weight):
    # bf16 gradient tiles keep both gradient GEMMs on tensor cores; fp16 would overflow where
    # ψ' is large (s·ψ' reaches 6·10^7 at |c| = 1), so fp16 and mixed inputs use fp32.
    if x.dtype == weight.dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def _gemm(a, b, out, accumulate: bool, info):
    """out (+)= a @ b in fp32, by _gemm_kernel: fp32 operands as IEEE fp32 products (never
    TF32, whatever torch's precision switches say: docs/math.md, "Precision policy for
    float32"), bf16 operands on tensor cores with fp32 accumulation."""
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk, warps, stages = _gemm_tiles(a.dtype, info)
    e = a.element_size()
    cost = Cost(bytes=(M * K + K * N) * e + M * N * 4 * (2 if accumulate else 1),
                flops=2 * M * N * K, dot="fp32" if a.dtype == torch.float32 else "bf16",
                inflight=(bm + bn) * bk * e * (stages - 1), barriers=4,
                logits=M * K * e)  # a is the chunk's logit gradient G (or its transpose)
    launch(_gemm_kernel, _gemm_grid(M, N, bm, bn),
           (a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0)),
           dict(ACCUMULATE=accumulate, DOT_FP32=a.dtype == torch.float32 or not info.gpu,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages,
           cost=cost)


def _gemm_tiles(dtype, info):
    if TILE is not None:
        return TILE
    if not info.gpu:
        return 16, 16, 16, 4, 1
    if dtype == torch.bfloat16:
        return 128, 128, 32, 8, 4
    return 64, 64, 32, 4, 2


# One grid function per kernel: the launch uses it, and the CPU tests check what it returns
# against CUDA's limits at every size the backend serves.


def _rows_grid(N: int, block_r: int) -> tuple:
    return (triton.cdiv(N, block_r),)


def _logits_grid(rows: int, C: int, bm: int, bn: int) -> tuple:
    # Row tiles times class tiles on axis 0 (axes 1 and 2 stop at 65535 class tiles).
    return (triton.cdiv(rows, bm) * triton.cdiv(C, bn),)


def _softmax_grid(rows: int) -> tuple:
    return (rows,)


def _gemm_grid(M: int, N: int, bm: int, bn: int) -> tuple:
    return (triton.cdiv(M, bm) * triton.cdiv(N, bn),)


_NORM_ROWS = 16


def _norms(t, hat_dtype=None):
    N, D = t.shape
    norm = torch.empty((N,), dtype=torch.float32, device=t.device)
    hat = torch.empty((N, D), dtype=hat_dtype, device=t.device) if hat_dtype else norm
    block_d = min(256, max(16, triton.next_power_of_2(D)))
    hat_bytes = N * D * torch.empty((), dtype=hat_dtype).element_size() if hat_dtype else 0
    launch(_row_norm_kernel, _rows_grid(N, _NORM_ROWS), (t, norm, hat, N, D, t.stride(0)),
           dict(WRITE_HAT=hat_dtype is not None, BLOCK_R=_NORM_ROWS, BLOCK_D=block_d),
           num_warps=4, num_stages=NUM_STAGES,
           cost=Cost(bytes=N * D * t.element_size() + N * 4 + hat_bytes,
                     inflight=_NORM_ROWS * block_d * t.element_size() * (NUM_STAGES - 1),
                     barriers=2 * triton.cdiv(D, block_d)))
    return norm, (hat if hat_dtype else None)


def _project(g, v, out, lam, normalize):
    N, D = g.shape
    block_d = min(256, max(16, triton.next_power_of_2(D)))
    launch(_project_kernel, _rows_grid(N, _NORM_ROWS),
           (g, v, out, dummy(lam, g), N, D, g.stride(0), v.stride(0)),
           dict(NORMALIZE=normalize, HAS_LAMBDA=lam is not None, BLOCK_R=_NORM_ROWS,
                BLOCK_D=block_d), num_warps=4, num_stages=NUM_STAGES,
           cost=Cost(bytes=N * D * (g.element_size() + v.element_size() + out.element_size()),
                     inflight=_NORM_ROWS * block_d * 8 * (NUM_STAGES - 1),
                     barriers=2 * triton.cdiv(D, block_d)))


def tiled_launch(x, weight, target, bias, class_weight, sample_weight, grl_lambda, grad_loss,
                 lse_in, consts: MarginConsts, normalize, smoothing, ignore_index, reduction,
                 straight_through, write_loss, compute_grad):
    """Run the tiled path; returns (loss, lse, grad_x, grad_weight, grad_bias) like small_c_launch.

    lse_in (B,) fp32 or None: the forward's log-sum-exp, reused by the backward.
    """
    B, D = x.shape
    C = weight.shape[0]
    dev = x.device
    info = device_info(dev)
    f32 = dict(dtype=torch.float32, device=dev)
    bm, bn, bk, warps, stages = _tiles(x, weight, info)
    gemm = _gemm_dtype(x, weight)
    separate_g = compute_grad and gemm != torch.float32
    per_row = C * (4 + (2 if separate_g else 0))
    R = min(B, max(bm, LOGITS_BUDGET_BYTES // per_row // bm * bm))
    z = torch.empty((R, C), **f32)
    g = torch.empty((R, C), dtype=gemm, device=dev) if separate_g else z
    need_cy = normalize and consts.has_margin
    cy = torch.empty((R,), **f32) if need_cy else z
    loss_rows = torch.empty((B,), **f32) if write_loss else z
    lse = torch.empty((B,), **f32) if write_loss else z
    ge = g.element_size()
    note_buffer(R * C * (4 + (ge if separate_g else 0)))
    if compute_grad:
        note_buffer((B + C) * D * 4 + (B + C) * D * ge * normalize)

    if normalize:
        xnorm, x_hat = _norms(x, gemm if compute_grad else None)
        wnorm, w_hat = _norms(weight, gemm if compute_grad else None)
    else:
        xnorm = wnorm = z
        x_hat, w_hat = x.to(gemm), weight.to(gemm)
    denom = None
    if reduction == 1 and (compute_grad or write_loss):
        denom = mean_denominator(target, class_weight, sample_weight, C, ignore_index)
    if compute_grad:
        gx_hat = torch.empty((B, D), **f32)
        gw_acc = torch.empty((C, D), **f32)
        gb_acc = torch.zeros((C,), **f32) if bias is not None else None

    passes = (write_loss or lse_in is None) + compute_grad  # reads of z per row
    block_s = min(1024, triton.next_power_of_2(C))

    def softmax_cost(rows):
        b = rows * C * (4 * passes + ge * compute_grad)
        return Cost(bytes=b, inflight=block_s * 4 * (NUM_STAGES - 1),
                    barriers=4 + 2 * triton.cdiv(C, block_s), logits=b)

    for row0 in range(0, B, R):
        rows = min(R, B - row0)
        launch(_logits_kernel, _logits_grid(rows, C, bm, bn),
               (x, weight, target, dummy(bias, z), xnorm, wnorm, z, cy, row0, rows, C, D,
                x.stride(0), weight.stride(0), ignore_index, *consts.args()),
               dict(NORMALIZE=normalize, HAS_MARGIN=need_cy, HAS_BIAS=bias is not None,
                    DOT_FP32=dot_fp32(x, weight, info), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
               num_warps=warps, num_stages=stages,
               cost=Cost(bytes=rows * C * 4 + C * D * weight.element_size()
                         + rows * D * x.element_size(), flops=2 * rows * C * D,
                         dot="fp32" if dot_fp32(x, weight, info) else "bf16",
                         inflight=(bm + bn) * bk * x.element_size() * (stages - 1),
                         barriers=4, logits=rows * C * 4))
        launch(_softmax_grad_kernel, _softmax_grid(rows),
               (z, g, cy, target, dummy(class_weight, z), dummy(sample_weight, z),
                dummy(grad_loss, z), dummy(denom, z), dummy(lse_in, z), loss_rows, lse, row0, B,
                C, ignore_index, consts.scale, consts.cos_m, consts.sin_m, consts.threshold,
                smoothing),
               dict(NORMALIZE=normalize, HAS_MARGIN=need_cy, STRAIGHT_THROUGH=straight_through,
                    HAS_CW=class_weight is not None, HAS_SW=sample_weight is not None,
                    HAS_GLOSS=grad_loss is not None, REDUCTION=reduction,
                    WRITE_LOSS=write_loss, COMPUTE_GRAD=compute_grad,
                    HAS_LSE=lse_in is not None, BLOCK_N=min(1024, triton.next_power_of_2(C))),
               num_warps=4, num_stages=NUM_STAGES, cost=softmax_cost(rows))
        if compute_grad:
            g_chunk = g[:rows]
            _gemm(g_chunk, w_hat, gx_hat[row0:row0 + rows], False, info)
            _gemm(g_chunk.t(), x_hat[row0:row0 + rows], gw_acc, row0 > 0, info)
            if gb_acc is not None:
                torch_kernel("sum", Cost(bytes=rows * C * ge + C * 8, logits=rows * C * ge))
                gb_acc += g_chunk.sum(0, dtype=torch.float32)

    loss = None
    if write_loss:
        if reduction == 0:
            loss = loss_rows
        elif reduction == 2:
            loss = loss_rows.sum()
        else:
            loss = loss_rows.sum() / denom
    gx = gw = gb = None
    if write_loss and reduction != 0:
        torch_kernel("sum", Cost(bytes=B * 4, barriers=2))
    if compute_grad:
        gx = torch.empty_like(x)
        gw = torch.empty_like(weight)
        _project(gx_hat, x, gx, grl_lambda, normalize)
        _project(gw_acc, weight, gw, None, normalize)
        gb = gb_acc.to(bias.dtype) if gb_acc is not None else None
    return loss, (lse if write_loss else None), gx, gw, gb
