// The fused kernel for a small number of classes (the paper's heads: C = 2 and 7): one launch a
// pass (forward or backward), any batch, over as many blocks as the batch fills.
//
// A block keeps the C weight rows in shared memory as they are (W's own dtype when x has it, else
// the accumulation type; no normalized copy, so no rounding) with their inverse norms, and walks
// tiles of rows in two phases:
//   1. a warp per R rows: 16-byte loads of x, the row norm and the C dot products x·W_j, then
//      (every lane alike, from warp-reduced sums) cosines, margin, log-sum-exp, loss and the
//      logit gradient G of each class, which go to shared memory as G_ij / (|x_i| |W_j|);
//   2. a thread per COLS columns of a row group: grad x = Σ_j G'_ij W_j − u_i x_i (u projects out
//      x̂; ×−λ for the fused GRL), written once, and Σ_i G'_ij x_i accumulated in registers.
// Then every block adds its row groups' sums in a fixed order into one partial (C × D, with the
// per-class sums, the loss and the mean's divisor) and the blocks meet in a tree of last-block-
// done counters (fan_in children a node): the last child of a node to finish adds the children's
// partials in child order, up to the root, which writes grad W, grad b and the loss. Every sum's
// order is fixed by the tree, never by which block finishes last: the results are the same
// bitwise from run to run.
//
// Identities used (docs/math.md, "Through the normalization"), with t_i = Σ_j G_ij c_ij and
// q_j = Σ_i G_ij c_ij, G' = G / (|x_i| |W_j|) and a_j = Σ_i G'_ij x_i = gŵ_j / |W_j|:
//   grad x_i = Σ_j G'_ij W_j − t_i x_i / |x_i|²,   grad W_j = a_j − q_j W_j / |W_j|².
#pragma once

#include "cuda_common.cuh"

namespace udat {
namespace cuda {

constexpr int kSmallThreads = 512;
constexpr int kSmallWarps = kSmallThreads / kWarp;
constexpr int kMaxTreeLevels = 8;

// Rows a warp reads at once in phase 1 (each weight value loaded from shared memory serves them
// all), and columns a thread owns in phase 2 (their gradient sums stay in registers): chosen so
// that no instantiation spills at 128 registers (512 threads, one block an SM:
// benchmarks/cuda_design_occupancy.json).
template <typename A, int NC>
struct SmallTraits {
  static constexpr int R = sizeof(A) == 8 ? (NC > 4 ? 1 : 2) : (NC > 4 ? 2 : 4);
  static constexpr int COLS = sizeof(A) == 8 ? (NC > 4 ? 1 : 2) : (NC > 4 ? 2 : 4);
  // Phase 2 keeps its weights in registers for two classes; for eight they would crowd out the
  // gradient sums, and shared memory serves them (at W's own width, below its bandwidth).
  static constexpr bool kWInRegs = NC <= 4;
  static constexpr int kTile = kSmallWarps * R;               // rows of a full tile
  static constexpr int kMaxFeatures = kSmallThreads * COLS;   // D one row group covers
};

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
  int tile_rows;       // rows a block takes at once: a multiple of R, at most the full tile
  int64_t block_rows;  // rows of each block (the last one: what remains), in tiles of tile_rows
  int groups;          // phase-2 row groups: threads per group = ceil(D / COLS)
  int64_t d_pad;       // row stride of W in shared memory
  bool vec16;          // x rows allow 16-byte loads
  bool vec_cols;       // x and grad x rows allow COLS-element loads and stores
  // The tree of partials: level 0 holds a node per block, level l + 1 a node per fan_in nodes
  // of level l, the last level one node. Node n of level l is entry node_offset[l] + n of the
  // partial buffers; its counter (levels >= 1) is entry node_offset[l] - gridDim.x + n.
  int fan_in;
  int levels;
  int64_t node_offset[kMaxTreeLevels];
  int level_nodes[kMaxTreeLevels];
  A* gw_parts;         // (nodes, C, D): Σ_i G'_ij x_i
  A* cls_parts;        // (nodes, NC): q_j (angular) or Σ_i δ_ij (linear)
  A* red_parts;        // (nodes, 2): loss, divisor
  unsigned* counters;  // (nodes - gridDim.x): zero, and left zero
  // Outputs, written by the root.
  void* grad_w;
  DType gw_dtype;
  void* grad_b;        // null without bias
  DType gb_dtype;
  A* loss_out;         // () for sum/mean, else null
};

// Shared memory layout in bytes, computed alike on host and device: W in its storage type WS,
// then the accumulation-type arrays.
struct SmallSmem {
  int64_t w, g, u, w_inv, w_proj, scratch, warp_cls, warp_red, cls, red, gred, flag, bytes;
  __host__ __device__ SmallSmem(int nc, int64_t ws_bytes, int64_t a_bytes, int tile, int cols,
                                int64_t d_pad) {
    auto align16 = [](int64_t v) { return (v + 15) / 16 * 16; };
    int64_t o = 0;
    w = o;        o = align16(o + int64_t(nc) * d_pad * ws_bytes);
    g = o;        o += int64_t(tile) * nc * a_bytes;
    u = o;        o += int64_t(tile) * a_bytes;
    w_inv = o;    o += nc * a_bytes;
    w_proj = o;   o += nc * a_bytes;
    scratch = o;  o += 2 * kWarp * a_bytes;
    warp_cls = o; o += int64_t(kSmallWarps) * nc * a_bytes;
    warp_red = o; o += 2 * kSmallWarps * a_bytes;
    cls = o;      o += nc * a_bytes;
    red = o;      o += 2 * a_bytes;
    gred = o = align16(o);
    o += int64_t(kSmallThreads) * cols * a_bytes;
    flag = o;     o += 16;
    bytes = o;
  }
};

// The sum of n values p[0], p[stride], ... in a fixed order: eight interleaved chains, then a
// tree of the eight (the same order whichever thread or block computes it).
template <typename A>
__device__ __forceinline__ A fixed_sum(const A* p, int64_t stride, int n, bool cache_global) {
  A s[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) s[k] = A(0);
  for (int i = 0; i < n; i += 8) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (i + k < n) s[k] += cache_global ? load_cg(p + (i + k) * stride) : p[(i + k) * stride];
    }
  }
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Phase 1 of a tile: the warp's rows' squared norms and dot products with the C weight rows.
template <typename S, typename A, typename WS, int NC, int R>
__device__ __forceinline__ void warp_row_dots(const SmallArgs<S, A>& a, const WS* w_s,
                                              int64_t row0, int nrows, A (&dot)[R][NC],
                                              A (&ss)[R]) {
  const int lane = threadIdx.x % kWarp;
  const int64_t D = a.row.D;
#pragma unroll
  for (int q = 0; q < R; ++q) {
    ss[q] = A(0);
#pragma unroll
    for (int j = 0; j < NC; ++j) dot[q][j] = A(0);
  }
  if (a.vec16) {
    constexpr int V = 16 / sizeof(S);
    constexpr int WV = 16 / sizeof(WS);  // W loaded as 16-byte vectors too
    using XVec = Vec<S, V>;
    using WVec = Vec<WS, WV>;
    const int64_t nv = D / V;
    // Two iterations in flight for float accumulation; double's registers allow one.
#pragma unroll(sizeof(A) == 8 ? 1 : 2)
    for (int64_t v = lane; v < nv; v += kWarp) {
      XVec raw[R];
#pragma unroll
      for (int q = 0; q < R; ++q) {
        if (q < nrows) {
          raw[q] = load_vec<XVec>(a.x + (row0 + q) * D + v * V);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) raw[q].v[e] = S(0);
        }
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const A xe = to_acc<A>(raw[q].v[e]);
          ss[q] += xe * xe;
        }
      }
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        const WS* wp = w_s + j * a.d_pad + v * V;
#pragma unroll
        for (int c = 0; c < V / WV; ++c) {  // V * sizeof(S) == 16 <= V * sizeof(WS)
          const WVec wv = load_vec<WVec>(wp + c * WV);
#pragma unroll
          for (int e = 0; e < WV; ++e) {
            const A we = to_acc<A>(wv.v[e]);
#pragma unroll
            for (int q = 0; q < R; ++q) dot[q][j] += to_acc<A>(raw[q].v[c * WV + e]) * we;
          }
        }
      }
    }
  } else {
    for (int64_t d = lane; d < D; d += kWarp) {
      A xv[R];
#pragma unroll
      for (int q = 0; q < R; ++q) {
        xv[q] = q < nrows ? to_acc<A>(a.x[(row0 + q) * D + d]) : A(0);
        ss[q] += xv[q] * xv[q];
      }
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        const A wv = to_acc<A>(w_s[j * a.d_pad + d]);
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

// The row epilogue of phase 1, computed alike by every lane of the warp; lane 0 writes: the
// row's G'_ij to shared memory, u_i = t_i / |x_i|² (0 when not projected), and the per-class sums
// into the warp's own slots.
template <typename S, typename A, int NC>
__device__ __forceinline__ void row_epilogue(const SmallArgs<S, A>& a, int64_t i,
                                             const A (&dot)[NC], A ss, A inv_div,
                                             const A* w_inv_s, A* g_s, A* u_s, A* warp_cls,
                                             A& loss_acc, A& div_acc) {
  const RowArgs<A>& r = a.row;
  const MarginParams<A>& mp = r.mp;
  const bool lane0 = threadIdx.x % kWarp == 0;
  const RowTarget t = read_target(r, i);
  // The target's column where this shard owns it, else -1 (a small int: registers).
  const int tj = t.owned ? static_cast<int>(t.col) : -1;
  const int C = static_cast<int>(r.C);

  A inv_n = A(1);
  bool proj = false;
  if (r.normalize) {
    inv_n = inv_norm(ss);
    proj = norm_projects(ss);
  }
  // Cosine and logit of class j, recomputed where needed rather than kept (registers).
  auto logit = [&](int j, A& c) -> A {
    const bool is_t = j == tj;
    if (r.normalize) {
      c = dot[j] * inv_n * w_inv_s[j];
      return mp.scale * (is_t ? margin_psi(c, mp) : c);
    }
    c = dot[j];
    return dot[j] + (r.bias && j < C ? r.bias[j] : A(0));
  };
  A c_y = A(0);
#pragma unroll(sizeof(A) == 8 ? 1 : NC)
  for (int j = 0; j < NC; ++j) {  // (an unrolled loop: dot stays in registers)
    if (j == tj) c_y = r.normalize ? dot[j] * inv_n * w_inv_s[j] : dot[j];
  }

  A lse;
  if (a.lse_in) {
    lse = a.lse_in[i];
  } else {
    A m = -INFINITY;
#pragma unroll(sizeof(A) == 8 ? 1 : NC)
    for (int j = 0; j < NC; ++j) {
      A c;
      const A z = logit(j, c);
      if (j < C) m = z > m ? z : m;
    }
    const A shift = isinf(m) ? A(0) : m;  // all -inf: lse = -inf, not NaN
    A s = A(0);
#pragma unroll(sizeof(A) == 8 ? 1 : NC)
    for (int j = 0; j < NC; ++j) {
      A c;
      const A z = logit(j, c);
      if (j < C) s += exp(z - shift);
    }
    lse = shift + log(s);
  }

  const A wsum = weight_sum(r);
  const A wy = t.valid ? class_w(r, t.y) : A(0);
  const RowCoef<A> rc = row_coef<A>(wy, wsum, r.smoothing, r.num_classes);

  if (a.write_loss) {
    A loss = A(0);
    if (t.valid) {
      A z_y = A(0), wz = A(0);
#pragma unroll(sizeof(A) == 8 ? 1 : NC)
      for (int j = 0; j < NC; ++j) {
        if (j < C) {
          A c;
          const A z = logit(j, c);
          if (j == tj) z_y = z;
          if (rc.b != A(0)) wz += col_w(r, j) * z;
        }
      }
      loss = sample_w(r, i) * (r.shard ? row_partial(rc, z_y, t.owned, wz)
                                       : row_loss(rc, lse, z_y, wsum, wz));
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
    const A dpsi = r.normalize && t.owned ? margin_dpsi(c_y, mp) : A(1);
    const bool zero = zero_row(r, t);
    A tsum = A(0);
#pragma unroll(sizeof(A) == 8 ? 1 : NC)
    for (int j = 0; j < NC; ++j) {
      A g = A(0), cj = A(0);
      if (j < C) {
        const bool is_t = j == tj;
        A c;
        const A z = logit(j, c);
        const A delta = zero ? A(0) : k * row_delta(rc, exp(z - lse), is_t, col_w(r, j));
        if (r.normalize) {
          g = mp.scale * delta * (is_t ? dpsi : A(1));
          tsum += g * c;
          cj = g * c;
        } else {
          g = delta;
          cj = delta;
        }
      }
      if (lane0) {
        g_s[j] = g * inv_n * w_inv_s[j];
        warp_cls[j] += cj;
      }
    }
    if (lane0) *u_s = proj ? tsum * inv_n * inv_n : A(0);
  }
}

// Loads the C weight rows into shared memory as WS (zero-padded to NC rows of d_pad), with their
// inverse norms (1 for the linear head) and whether each is projected.
template <typename S, typename A, typename WS, int NC>
__device__ __forceinline__ void load_weight(const SmallArgs<S, A>& a, WS* w_s, A* w_inv_s,
                                            A* w_proj_s) {
  const int64_t C = a.row.C, D = a.row.D, d_pad = a.d_pad;
  for (int64_t idx = threadIdx.x; idx < NC * d_pad; idx += blockDim.x) {
    const int64_t j = idx / d_pad, d = idx % d_pad;
    w_s[idx] = (j < C && d < D) ? static_cast<WS>(load_as<A>(a.w, a.w_dtype, j * D + d)) : WS(0);
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int j = warp; j < NC; j += kSmallWarps) {
    A s = A(0);
    for (int64_t d = lane; d < D; d += kWarp) {
      const A v = to_acc<A>(w_s[j * d_pad + d]);
      s += v * v;
    }
    s = warp_sum(s);
    if (lane == 0) {
      w_inv_s[j] = a.row.normalize ? inv_norm(s) : A(1);
      w_proj_s[j] = a.row.normalize && norm_projects(s) ? A(1) : A(0);
    }
  }
  __syncthreads();
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

template <typename S, typename A, typename WS, int NC>
__global__ void __launch_bounds__(kSmallThreads)
    small_c_kernel(const SmallArgs<S, A> a) {
  UDAT_DYNAMIC_SHARED(unsigned char, smem_raw, 16);
  using T = SmallTraits<A, NC>;
  constexpr int R = T::R;
  constexpr int COLS = T::COLS;
  const SmallSmem L(NC, sizeof(WS), sizeof(A), T::kTile, COLS, a.d_pad);
  WS* w_s = reinterpret_cast<WS*>(smem_raw + L.w);
  A* g_s = reinterpret_cast<A*>(smem_raw + L.g);
  A* u_s = reinterpret_cast<A*>(smem_raw + L.u);
  A* w_inv_s = reinterpret_cast<A*>(smem_raw + L.w_inv);
  A* w_proj_s = reinterpret_cast<A*>(smem_raw + L.w_proj);
  A* scratch = reinterpret_cast<A*>(smem_raw + L.scratch);
  A* warp_cls = reinterpret_cast<A*>(smem_raw + L.warp_cls);
  A* warp_red = reinterpret_cast<A*>(smem_raw + L.warp_red);
  A* cls_s = reinterpret_cast<A*>(smem_raw + L.cls);
  A* red_s = reinterpret_cast<A*>(smem_raw + L.red);
  A* gred = reinterpret_cast<A*>(smem_raw + L.gred);
  int* flag = reinterpret_cast<int*>(smem_raw + L.flag);

  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t B = a.row.B, C = a.row.C, D = a.row.D;

  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < NC; ++j) warp_cls[warp * NC + j] = A(0);
  }
  load_weight<S, A, WS, NC>(a, w_s, w_inv_s, w_proj_s);
  const A inv_div = block_inv_divisor(a, scratch);
  const A x_scale = a.want_grad ? grad_x_scale(a.gs) : A(1);

  // Phase-2 ownership: row group `grp` takes every groups-th row of a tile, columns d0..d0+COLS.
  const int per_group = static_cast<int>((D + COLS - 1) / COLS);
  const int grp = per_group > 0 ? threadIdx.x / per_group : a.groups;
  const int64_t d0 = per_group > 0 ? int64_t(threadIdx.x % per_group) * COLS : 0;
  const bool p2 = a.want_grad && grp < a.groups;
  constexpr int WR = T::kWInRegs ? NC : 1;
  A w_reg[WR][COLS];
  A gw_acc[NC][COLS];
#pragma unroll
  for (int j = 0; j < NC; ++j) {
#pragma unroll
    for (int e = 0; e < COLS; ++e) {
      if (T::kWInRegs) {
        w_reg[j < WR ? j : 0][e] = p2 && d0 + e < D ? to_acc<A>(w_s[j * a.d_pad + d0 + e]) : A(0);
      }
      gw_acc[j][e] = A(0);
    }
  }
  A loss_acc = A(0), div_acc = A(0);

  // The block's rows: an even share of the batch, so that every block streams alike.
  const int64_t row_begin = int64_t(blockIdx.x) * a.block_rows;
  const int64_t row_end = row_begin + a.block_rows < B ? row_begin + a.block_rows : B;
  for (int64_t tile0 = row_begin; tile0 < row_end; tile0 += a.tile_rows) {
    const int tile_n = static_cast<int>(row_end - tile0 < a.tile_rows ? row_end - tile0
                                                                        : a.tile_rows);
    // Phase 1: a warp per R rows.
    if (warp * R < tile_n) {
      const int64_t row0 = tile0 + int64_t(warp) * R;
      const int nrows = tile_n - warp * R < R ? tile_n - warp * R : R;
      A dot[R][NC];
      A ss[R];
      warp_row_dots<S, A, WS, NC, R>(a, w_s, row0, nrows, dot, ss);
#pragma unroll
      for (int q = 0; q < R; ++q) {
        if (q < nrows) {
          const int rr = warp * R + q;
          row_epilogue<S, A, NC>(a, row0 + q, dot[q], ss[q], inv_div, w_inv_s, g_s + rr * NC,
                                 u_s + rr, warp_cls + warp * NC, loss_acc, div_acc);
        }
      }
    }
    if (!a.want_grad) continue;
    __syncthreads();
    // Phase 2: a thread per COLS columns of every groups-th row.
    if (p2) {
      for (int rr = grp; rr < tile_n; rr += a.groups) {
        const int64_t i = tile0 + rr;
        A xv[COLS];
        const S* xr = a.x + i * D + d0;
        if (a.vec_cols) {
          const auto raw = load_vec<Vec<S, COLS>>(xr);
#pragma unroll
          for (int e = 0; e < COLS; ++e) xv[e] = to_acc<A>(raw.v[e]);
        } else {
#pragma unroll
          for (int e = 0; e < COLS; ++e) xv[e] = d0 + e < D ? to_acc<A>(xr[e]) : A(0);
        }
        A g[NC];
#pragma unroll
        for (int j = 0; j < NC; ++j) g[j] = g_s[rr * NC + j];
        const A u = u_s[rr];
        A gx[COLS];
        // The linear head projects nothing (u = 0): no −u·x term, which a non-finite x would
        // turn into NaN where the row's gradient is exactly zero (an ignored row of a shard).
#pragma unroll
        for (int e = 0; e < COLS; ++e) gx[e] = a.row.normalize ? -u * xv[e] : A(0);
#pragma unroll
        for (int j = 0; j < NC; ++j) {
          A wj[COLS];
          if (T::kWInRegs) {
#pragma unroll
            for (int e = 0; e < COLS; ++e) wj[e] = w_reg[j < WR ? j : 0][e];
          } else {  // d_pad and d0 are multiples of COLS: an aligned vector
            const auto wv = load_vec<Vec<WS, COLS>>(w_s + j * a.d_pad + d0);
#pragma unroll
            for (int e = 0; e < COLS; ++e) wj[e] = to_acc<A>(wv.v[e]);
          }
#pragma unroll
          for (int e = 0; e < COLS; ++e) gx[e] += g[j] * wj[e];
        }
#pragma unroll
        for (int e = 0; e < COLS; ++e) gx[e] *= x_scale;
#pragma unroll
        for (int j = 0; j < NC; ++j) {
#pragma unroll
          for (int e = 0; e < COLS; ++e) gw_acc[j][e] += g[j] * xv[e];
        }
        S* gr = a.grad_x + i * D + d0;
        if (a.vec_cols) {
          Vec<S, COLS> out;
#pragma unroll
          for (int e = 0; e < COLS; ++e) out.v[e] = from_acc<S>(gx[e]);
          store_vec(gr, out);
        } else {
#pragma unroll
          for (int e = 0; e < COLS; ++e) {
            if (d0 + e < D) gr[e] = from_acc<S>(gx[e]);
          }
        }
      }
    }
    __syncthreads();
  }

  // The block's partial (node blockIdx.x of level 0), every sum in a fixed order.
  if (lane == 0) {
    warp_red[2 * warp] = loss_acc;
    warp_red[2 * warp + 1] = div_acc;
  }
  __syncthreads();
  const int64_t self = a.node_offset[0] + blockIdx.x;
  if (threadIdx.x < NC) {
    const A s = fixed_sum(warp_cls + threadIdx.x, NC, kSmallWarps, false);
    if (threadIdx.x < C) a.cls_parts[self * NC + threadIdx.x] = s;
  } else if (threadIdx.x < NC + 2) {
    const int k = threadIdx.x - NC;
    a.red_parts[self * 2 + k] = fixed_sum(warp_red + k, 2, kSmallWarps, false);
  }
  if (a.want_grad) {
    // Row groups, class by class: every thread's sums into shared memory, then each column's sum
    // over the groups.
    for (int j = 0; j < C; ++j) {
#pragma unroll
      for (int jj = 0; jj < NC; ++jj) {
        if (jj == j && p2) {
#pragma unroll
          for (int e = 0; e < COLS; ++e) gred[threadIdx.x * COLS + e] = gw_acc[jj][e];
        }
      }
      __syncthreads();
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        const int64_t slot = (d / COLS) * COLS + d % COLS;  // group 0's thread for column d
        a.gw_parts[(self * C + j) * D + d] =
            fixed_sum(gred + slot, int64_t(per_group) * COLS, a.groups, false);
      }
      __syncthreads();
    }
  }

  // Up the tree: the last child of each node to finish adds the children's partials into it.
  int64_t node = blockIdx.x;
  for (int level = 0; level + 1 < a.levels; ++level) {
    const int64_t parent = node / a.fan_in;
    const int64_t first = parent * a.fan_in;
    const int64_t end = first + a.fan_in < a.level_nodes[level] ? first + a.fan_in
                                                                : a.level_nodes[level];
    const int kids = static_cast<int>(end - first);
    __syncthreads();  // this block's writes of the child partial are all issued
    if (threadIdx.x == 0) {
      __threadfence();  // ... and visible before the count says so
      unsigned* counter = a.counters + (a.node_offset[level + 1] - gridDim.x + parent);
      *flag = atomicInc(counter, unsigned(kids - 1)) == unsigned(kids - 1);  // wraps to 0
    }
    __syncthreads();
    if (!*flag) return;
    const int64_t src = a.node_offset[level] + first;
    const int64_t dst = a.node_offset[level + 1] + parent;
    for (int64_t idx = threadIdx.x; idx < (a.want_grad ? C * D : 0); idx += blockDim.x) {
      a.gw_parts[dst * C * D + idx] = fixed_sum(a.gw_parts + src * C * D + idx, C * D, kids, true);
    }
    if (threadIdx.x < C) {
      a.cls_parts[dst * NC + threadIdx.x] =
          fixed_sum(a.cls_parts + src * NC + threadIdx.x, NC, kids, true);
    } else if (threadIdx.x >= NC && threadIdx.x < NC + 2) {
      const int k = threadIdx.x - NC;
      a.red_parts[dst * 2 + k] = fixed_sum(a.red_parts + src * 2 + k, 2, kids, true);
    }
    node = parent;
  }

  // The root: grad W, grad b and the loss.
  __syncthreads();
  const int64_t root = a.node_offset[a.levels - 1];
  if (a.want_grad) {
    if (threadIdx.x < C) cls_s[threadIdx.x] = load_cg(a.cls_parts + root * NC + threadIdx.x);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < C * D; idx += blockDim.x) {
      const int64_t j = idx / D, d = idx % D;
      A out = load_cg(a.gw_parts + root * C * D + idx);
      if (a.row.normalize && w_proj_s[j] != A(0)) {
        out -= cls_s[j] * w_inv_s[j] * w_inv_s[j] * to_acc<A>(w_s[j * a.d_pad + d]);
      }
      store_as(a.grad_w, a.gw_dtype, idx, out);
    }
    if (a.grad_b && threadIdx.x < C) store_as(a.grad_b, a.gb_dtype, threadIdx.x, cls_s[threadIdx.x]);
  }
  if (a.write_loss && a.loss_out && threadIdx.x == 0) {
    red_s[0] = load_cg(a.red_parts + root * 2);
    red_s[1] = load_cg(a.red_parts + root * 2 + 1);
    const A total = red_s[0], div = red_s[1];
    a.loss_out[0] = a.row.reduction == static_cast<int>(Reduction::Sum)
                        ? total
                        : (div != A(0) ? total / div : A(NAN));
  }
}

}  // namespace cuda
}  // namespace udat
