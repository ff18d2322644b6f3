// The fused kernels for a small number of classes (the paper's heads: C = 2 and 7).
//
// One kernel per direction. A block keeps the C weight rows, normalized, in shared memory and
// walks tiles of rows in two phases:
//   1. a warp per group of rows: 16-byte loads of x, the row norm and the C dot products, then
//      (every lane alike, from warp-reduced sums) cosines, margin, log-sum-exp, loss and the
//      logit gradient G of each class, which go to shared memory;
//   2. a thread per 4 columns: grad x = G·ŵ − u·x (u projects out x̂; ×−λ for the fused GRL),
//      written once, and grad ŵ accumulated in registers as Σ_i G_ij x̂_i.
// Blocks write their grad ŵ and per-class sums as partials, which a second kernel (or, for a
// single block, the same one) adds in a fixed order: no float atomics, reproducible results.
//
// Identities used (docs/math.md, "Through the normalization"), with t_i = Σ_j G_ij c_ij = gx̂_i·x̂_i
// and q_j = Σ_i G_ij c_ij = gŵ_j·ŵ_j:
//   grad x_i = (gx̂_i − t_i x̂_i) / |x_i|,   grad W_j = (gŵ_j − q_j ŵ_j) / |W_j|.
#pragma once

#include "cuda_common.cuh"

namespace udat {
namespace cuda {

constexpr int kSmallThreads = 512;
constexpr int kSmallWarps = kSmallThreads / kWarp;
constexpr int kColsPerThread = 4;  // phase 2

// Rows a warp reads at once in phase 1: each ŵ value loaded from shared memory serves them all.
// Fewer for more classes, so that the dot products and the phase-2 registers fit.
template <int NC>
__host__ __device__ constexpr int rows_per_warp() {
  return NC > 4 ? 2 : 4;
}
template <int NC>
__host__ __device__ constexpr int small_tile() {
  return kSmallWarps * rows_per_warp<NC>();
}

template <typename S, typename A>
struct SmallArgs {
  const S* x;          // (B, D)
  const void* w;       // (C, D), dtype w_dtype
  DType w_dtype;
  RowArgs<A> row;
  GradScale<A> gs;
  const A* lse_in;     // backward: (B,)
  A* lse_out;          // forward: (B,)
  A* loss_rows;        // (B,) or null
  bool write_loss;
  bool want_grad;
  S* grad_x;           // (B, D)
  A* gw_parts;         // (gridDim.x * groups, C, D): Σ_i G_ij x̂_i per block and row group
  A* cls_parts;        // (gridDim.x, NC): q_j (angular) or Σ_i δ_ij (linear) per block
  A* loss_parts;       // (gridDim.x,)
  A* div_parts;        // (gridDim.x,)
  // Outputs of the in-kernel finalization (single block only).
  bool finalize;
  void* grad_w;
  DType gw_dtype;
  void* grad_b;        // null without bias
  DType gb_dtype;
  A* loss_out;         // () for sum/mean, else null
  int groups;          // phase-2 row groups: threads per group = ceil(D / 4)
  int64_t d_pad;       // row stride of ŵ in shared memory
  bool vec16;          // x rows allow 16-byte loads
  bool vec4;           // x rows allow 4-element loads and stores
};

// Shared memory layout, computed alike on host and device.
template <typename A>
struct SmallSmem {
  int64_t w, g, u, w_inv, w_proj, scratch, warp_cls, warp_red, cls, red, bytes;
  __host__ __device__ SmallSmem(int nc, int tile, int64_t d_pad) {
    int64_t o = 0;
    w = o;        o += int64_t(nc) * d_pad;
    g = o;        o += int64_t(tile) * nc;
    u = o;        o += tile;
    w_inv = o;    o += nc;
    w_proj = o;   o += nc;
    scratch = o;  o += 2 * kWarp;
    warp_cls = o; o += int64_t(kSmallWarps) * nc;
    warp_red = o; o += 2 * kSmallWarps;
    cls = o;      o += nc;
    red = o;      o += 2;
    bytes = o * int64_t(sizeof(A));
  }
};

// Phase 1 of a tile: the warp's rows' squared norms and dot products with the C weight rows.
template <typename S, typename A, int NC, int R>
__device__ __forceinline__ void warp_row_dots(const SmallArgs<S, A>& a, const A* w_s,
                                              int64_t row0, A (&dot)[R][NC], A (&ss)[R]) {
  const int lane = threadIdx.x % kWarp;
  const int64_t B = a.row.B, D = a.row.D;
#pragma unroll
  for (int q = 0; q < R; ++q) {
    ss[q] = A(0);
#pragma unroll
    for (int j = 0; j < NC; ++j) dot[q][j] = A(0);
  }
  if (a.vec16) {
    constexpr int V = 16 / sizeof(S);
    constexpr int WV = 16 / sizeof(A);  // ŵ loaded as 16-byte vectors too
    using XVec = Vec<S, V>;
    using WVec = Vec<A, WV>;
    const int64_t nv = D / V;
#pragma unroll 2
    for (int64_t v = lane; v < nv; v += kWarp) {
      A xv[R][V];
#pragma unroll
      for (int q = 0; q < R; ++q) {
        XVec raw;
        if (row0 + q < B) {
          raw = load_vec<XVec>(a.x + (row0 + q) * D + v * V);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) raw.v[e] = S(0);
        }
#pragma unroll
        for (int e = 0; e < V; ++e) {
          xv[q][e] = to_acc<A>(raw.v[e]);
          ss[q] += xv[q][e] * xv[q][e];
        }
      }
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        const A* wp = w_s + j * a.d_pad + v * V;
#pragma unroll
        for (int c = 0; c < V / WV; ++c) {  // V * sizeof(S) == 16 <= V * sizeof(A)
          const WVec wv = load_vec<WVec>(wp + c * WV);
#pragma unroll
          for (int e = 0; e < WV; ++e) {
#pragma unroll
            for (int q = 0; q < R; ++q) dot[q][j] += xv[q][c * WV + e] * wv.v[e];
          }
        }
      }
    }
  } else {
    for (int64_t d = lane; d < D; d += kWarp) {
      A xv[R];
#pragma unroll
      for (int q = 0; q < R; ++q) {
        xv[q] = row0 + q < B ? to_acc<A>(a.x[(row0 + q) * D + d]) : A(0);
        ss[q] += xv[q] * xv[q];
      }
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        const A wv = w_s[j * a.d_pad + d];
#pragma unroll
        for (int q = 0; q < R; ++q) dot[q][j] += xv[q] * wv;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < R; ++q) {
    ss[q] = warp_sum(ss[q]);
#pragma unroll
    for (int j = 0; j < NC; ++j) dot[q][j] = warp_sum(dot[q][j]);
  }
}

// The row epilogue of phase 1, computed alike by every lane of the warp; lane 0 writes.
// Returns the row's G_ij / |x_i| (to shared memory) and u_i = t_i / |x_i|² (0 when not projected).
template <typename S, typename A, int NC>
__device__ __forceinline__ void row_epilogue(const SmallArgs<S, A>& a, int64_t i,
                                             const A (&dot)[NC], A ss, A inv_div, A* g_s, A* u_s,
                                             A (&cls_acc)[NC], A& loss_acc, A& div_acc) {
  const RowArgs<A>& r = a.row;
  const MarginParams<A>& mp = r.mp;
  const bool lane0 = threadIdx.x % kWarp == 0;
  const RowTarget t = read_target(r, i);
  const int C = static_cast<int>(r.C);

  A inv_n = A(1);
  bool proj = false;
  if (r.normalize) {
    inv_n = inv_norm(ss);
    proj = norm_projects(ss);
  }
  A c[NC], z[NC];
  A c_y = A(0);
#pragma unroll
  for (int j = 0; j < NC; ++j) {
    const bool is_t = t.valid && j == t.y;
    if (r.normalize) {
      c[j] = dot[j] * inv_n;
      z[j] = mp.scale * (is_t ? margin_psi(c[j], mp) : c[j]);
      if (is_t) c_y = c[j];
    } else {
      c[j] = dot[j];
      z[j] = dot[j] + (r.bias && j < C ? r.bias[j] : A(0));
    }
  }

  A lse;
  if (a.lse_in) {
    lse = a.lse_in[i];
  } else {
    A m = -INFINITY;
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      if (j < C) m = z[j] > m ? z[j] : m;
    }
    const A shift = isinf(m) ? A(0) : m;  // all -inf: lse = -inf, not NaN
    A s = A(0);
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      if (j < C) s += exp(z[j] - shift);
    }
    lse = shift + log(s);
  }

  const A wsum = weight_sum(r);
  const A wy = t.valid ? class_w(r, t.y) : A(0);
  const RowCoef<A> rc = row_coef<A>(wy, wsum, r.smoothing, r.C);

  if (a.write_loss) {
    A loss = A(0);
    if (t.valid) {
      A z_y = A(0), wz = A(0);
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        if (j < C) {
          if (j == t.y) z_y = z[j];
          if (rc.b != A(0)) wz += class_w(r, j) * z[j];
        }
      }
      loss = sample_w(r, i) * row_loss(rc, lse, z_y, wsum, wz);
      div_acc += sample_w(r, i) * wy;
    } else if (t.bad) {
      loss = A(NAN);
    }
    loss_acc += loss;
    if (lane0) {
      a.lse_out[i] = lse;
      if (a.loss_rows) a.loss_rows[i] = loss;
    }
  }

  if (a.want_grad) {
    const A k = row_k(r, a.gs, t, i, inv_div);
    const A dpsi = r.normalize && t.valid ? margin_dpsi(c_y, mp) : A(1);
    A tsum = A(0);
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      A g = A(0);
      if (j < C) {
        const bool is_t = t.valid && j == t.y;
        const A delta = k * row_delta(rc, exp(z[j] - lse), is_t, class_w(r, j));
        if (r.normalize) {
          g = mp.scale * delta * (is_t ? dpsi : A(1));
          tsum += g * c[j];
          cls_acc[j] += g * c[j];
        } else {
          g = delta;
          cls_acc[j] += delta;
        }
      }
      if (lane0) g_s[j] = g * inv_n;
    }
    if (lane0) *u_s = proj ? tsum * inv_n * inv_n : A(0);
  }
}

// Loads the C weight rows into shared memory (zero-padded to NC rows of d_pad), with their norms;
// normalizes them for the angular head.
template <typename S, typename A, int NC>
__device__ __forceinline__ void load_weight(const SmallArgs<S, A>& a, A* w_s, A* w_inv_s,
                                            A* w_proj_s) {
  const int64_t C = a.row.C, D = a.row.D, d_pad = a.d_pad;
  for (int64_t idx = threadIdx.x; idx < NC * d_pad; idx += blockDim.x) {
    const int64_t j = idx / d_pad, d = idx % d_pad;
    w_s[idx] = (j < C && d < D) ? load_as<A>(a.w, a.w_dtype, j * D + d) : A(0);
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int j = warp; j < NC; j += kSmallWarps) {
    A s = A(0);
    for (int64_t d = lane; d < D; d += kWarp) s += w_s[j * d_pad + d] * w_s[j * d_pad + d];
    s = warp_sum(s);
    if (lane == 0) {
      w_inv_s[j] = a.row.normalize ? inv_norm(s) : A(1);
      w_proj_s[j] = a.row.normalize && norm_projects(s) ? A(1) : A(0);
    }
  }
  __syncthreads();
  if (a.row.normalize) {
    for (int64_t idx = threadIdx.x; idx < NC * d_pad; idx += blockDim.x) {
      w_s[idx] *= w_inv_s[idx / d_pad];
    }
    __syncthreads();
  }
}

// 1 / (the mean's divisor), or 1 for sum/none; only needed when a gradient is formed.
template <typename S, typename A>
__device__ __forceinline__ A block_inv_divisor(const SmallArgs<S, A>& a, A* scratch) {
  if (!a.want_grad || a.row.reduction != static_cast<int>(Reduction::Mean)) return A(1);
  A div = A(0);
  if (a.gs.divisor_parts) {
    // Every thread adds the same partials in the same order.
    for (int p = 0; p < a.gs.n_divisor_parts; ++p) div += a.gs.divisor_parts[p];
  } else {
    for (int64_t i = threadIdx.x; i < a.row.B; i += blockDim.x) div += row_divisor(a.row, i);
    div = block_sum(div, scratch);
  }
  return inv_divisor(div);
}

template <typename S, typename A, int NC>
__global__ void __launch_bounds__(kSmallThreads)
    small_c_kernel(const SmallArgs<S, A> a) {
  UDAT_DYNAMIC_SHARED(unsigned char, smem_raw, 16);
  A* smem = reinterpret_cast<A*>(smem_raw);
  constexpr int R = rows_per_warp<NC>();
  constexpr int kTile = small_tile<NC>();
  const SmallSmem<A> L(NC, kTile, a.d_pad);
  A* w_s = smem + L.w;
  A* g_s = smem + L.g;
  A* u_s = smem + L.u;
  A* w_inv_s = smem + L.w_inv;
  A* w_proj_s = smem + L.w_proj;
  A* scratch = smem + L.scratch;

  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t B = a.row.B, C = a.row.C, D = a.row.D;

  load_weight<S, A, NC>(a, w_s, w_inv_s, w_proj_s);
  const A inv_div = block_inv_divisor(a, scratch);
  const A x_scale = a.want_grad ? grad_x_scale(a.gs) : A(1);

  // Phase-2 ownership: row group `grp` takes every groups-th row of a tile, columns d0..d0+3.
  const int per_group = static_cast<int>((D + kColsPerThread - 1) / kColsPerThread);
  const int grp = per_group > 0 ? threadIdx.x / per_group : a.groups;
  const int64_t d0 = per_group > 0 ? int64_t(threadIdx.x % per_group) * kColsPerThread : 0;
  const bool p2 = a.want_grad && grp < a.groups;
  A w_reg[NC][kColsPerThread];
  A gw_acc[NC][kColsPerThread];
#pragma unroll
  for (int j = 0; j < NC; ++j) {
#pragma unroll
    for (int e = 0; e < kColsPerThread; ++e) {
      w_reg[j][e] = p2 && d0 + e < D ? w_s[j * a.d_pad + d0 + e] : A(0);
      gw_acc[j][e] = A(0);
    }
  }

  A cls_acc[NC];
#pragma unroll
  for (int j = 0; j < NC; ++j) cls_acc[j] = A(0);
  A loss_acc = A(0), div_acc = A(0);

  const int64_t n_tiles = (B + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t tile0 = tile * kTile;
    // Phase 1: a warp per R rows.
    {
      const int64_t row0 = tile0 + int64_t(warp) * R;
      A dot[R][NC];
      A ss[R];
      warp_row_dots<S, A, NC, R>(a, w_s, row0, dot, ss);
#pragma unroll
      for (int q = 0; q < R; ++q) {
        if (row0 + q < B) {
          const int rr = warp * R + q;
          row_epilogue<S, A, NC>(a, row0 + q, dot[q], ss[q], inv_div, g_s + rr * NC, u_s + rr,
                                 cls_acc, loss_acc, div_acc);
        }
      }
    }
    if (!a.want_grad) continue;
    __syncthreads();
    // Phase 2: a thread per 4 columns of every groups-th row.
    if (p2) {
      for (int rr = grp; rr < kTile; rr += a.groups) {
        const int64_t i = tile0 + rr;
        if (i >= B) break;
        A xv[kColsPerThread];
        const S* xr = a.x + i * D + d0;
        if (a.vec4) {
          const auto raw = load_vec<Vec<S, kColsPerThread>>(xr);
#pragma unroll
          for (int e = 0; e < kColsPerThread; ++e) xv[e] = to_acc<A>(raw.v[e]);
        } else {
#pragma unroll
          for (int e = 0; e < kColsPerThread; ++e) xv[e] = d0 + e < D ? to_acc<A>(xr[e]) : A(0);
        }
        A g[NC];
#pragma unroll
        for (int j = 0; j < NC; ++j) g[j] = g_s[rr * NC + j];
        const A u = u_s[rr];
        A gx[kColsPerThread];
#pragma unroll
        for (int e = 0; e < kColsPerThread; ++e) {
          A s = -u * xv[e];
#pragma unroll
          for (int j = 0; j < NC; ++j) s += g[j] * w_reg[j][e];
          gx[e] = x_scale * s;
        }
#pragma unroll
        for (int j = 0; j < NC; ++j) {
#pragma unroll
          for (int e = 0; e < kColsPerThread; ++e) gw_acc[j][e] += g[j] * xv[e];
        }
        S* gr = a.grad_x + i * D + d0;
        if (a.vec4) {
          Vec<S, kColsPerThread> out;
#pragma unroll
          for (int e = 0; e < kColsPerThread; ++e) out.v[e] = from_acc<S>(gx[e]);
          store_vec(gr, out);
        } else {
#pragma unroll
          for (int e = 0; e < kColsPerThread; ++e) {
            if (d0 + e < D) gr[e] = from_acc<S>(gx[e]);
          }
        }
      }
    }
    __syncthreads();
  }

  // Block partials, each in a fixed order.
  A* warp_cls = smem + L.warp_cls;
  A* warp_red = smem + L.warp_red;
  A* cls_s = smem + L.cls;
  A* red_s = smem + L.red;
  if (p2) {
    A* part = a.gw_parts + (int64_t(blockIdx.x) * a.groups + grp) * C * D;
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      if (j < C) {
#pragma unroll
        for (int e = 0; e < kColsPerThread; ++e) {
          if (d0 + e < D) part[j * D + d0 + e] = gw_acc[j][e];
        }
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < NC; ++j) warp_cls[warp * NC + j] = cls_acc[j];
    warp_red[2 * warp] = loss_acc;
    warp_red[2 * warp + 1] = div_acc;
  }
  __syncthreads();
  if (threadIdx.x < NC) {
    A s = A(0);
    for (int w = 0; w < kSmallWarps; ++w) s += warp_cls[w * NC + threadIdx.x];
    cls_s[threadIdx.x] = s;
    if (a.cls_parts) a.cls_parts[int64_t(blockIdx.x) * NC + threadIdx.x] = s;
  } else if (threadIdx.x < NC + 2) {
    const int k = threadIdx.x - NC;
    A s = A(0);
    for (int w = 0; w < kSmallWarps; ++w) s += warp_red[2 * w + k];
    red_s[k] = s;
    A* dst = k == 0 ? a.loss_parts : a.div_parts;
    if (dst) dst[blockIdx.x] = s;
  }
  if (!a.finalize) return;

  // A single block: add the row-group partials and write grad W, grad b and the loss here.
  __syncthreads();
  if (a.want_grad) {
    for (int64_t idx = threadIdx.x; idx < C * D; idx += blockDim.x) {
      const int64_t j = idx / D, d = idx % D;
      A acc = A(0);
      for (int g = 0; g < a.groups; ++g) acc += a.gw_parts[g * C * D + idx];
      A out = acc;
      if (a.row.normalize) {
        const A proj = w_proj_s[j] != A(0) ? cls_s[j] * w_s[j * a.d_pad + d] : A(0);
        out = w_inv_s[j] * (acc - proj);
      }
      store_as(a.grad_w, a.gw_dtype, idx, out);
    }
    if (a.grad_b && threadIdx.x < C) store_as(a.grad_b, a.gb_dtype, threadIdx.x, cls_s[threadIdx.x]);
  }
  if (a.write_loss && a.loss_out && threadIdx.x == 0) {
    const A total = red_s[0], div = red_s[1];
    a.loss_out[0] = a.row.reduction == static_cast<int>(Reduction::Sum)
                        ? total
                        : (div != A(0) ? total / div : A(NAN));
  }
}

// grad W (and grad b) from the partials of several blocks: a block per (column chunk, class).
template <typename A>
struct SmallFinalizeArgs {
  const void* w;
  DType w_dtype;
  const A* gw_parts;   // (n_parts, C, D)
  int n_parts;
  const A* cls_parts;  // (n_blocks, nc)
  int n_blocks;
  int nc;
  int64_t C, D;
  bool normalize;
  void* grad_w;
  DType gw_dtype;
  void* grad_b;
  DType gb_dtype;
};

template <typename A>
__global__ void small_c_finalize_kernel(const SmallFinalizeArgs<A> f) {
  UDAT_SHARED(A, scratch, kWarp);
  const int64_t j = blockIdx.y;
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  A q = A(0);
  for (int b = 0; b < f.n_blocks; ++b) q += f.cls_parts[int64_t(b) * f.nc + j];
  A inv = A(1);
  bool proj = false;
  if (f.normalize) {
    A s = A(0);
    for (int64_t e = threadIdx.x; e < f.D; e += blockDim.x) {
      const A v = load_as<A>(f.w, f.w_dtype, j * f.D + e);
      s += v * v;
    }
    s = block_sum(s, scratch);
    inv = inv_norm(s);
    proj = norm_projects(s);
  }
  if (d < f.D) {
    A acc = A(0);
    for (int p = 0; p < f.n_parts; ++p) acc += f.gw_parts[(int64_t(p) * f.C + j) * f.D + d];
    A out = acc;
    if (f.normalize) {
      const A w_hat = load_as<A>(f.w, f.w_dtype, j * f.D + d) * inv;
      out = inv * (acc - (proj ? q * w_hat : A(0)));
    }
    store_as(f.grad_w, f.gw_dtype, j * f.D + d, out);
  }
  if (f.grad_b && blockIdx.x == 0 && threadIdx.x == 0) store_as(f.grad_b, f.gb_dtype, j, q);
}

}  // namespace cuda
}  // namespace udat
