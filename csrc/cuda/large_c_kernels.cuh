// Kernels around the GEMMs of the large-C path (face-recognition heads, C up to 10^7).
//
// Per row block: the logits GEMM writes x_i·W_j in fp32/fp64 (W itself is the GEMM operand, so
// no normalized copy and no rounding of ŵ); the epilogue (a block per row) scales them into
// cosines, applies the margin, forms the log-sum-exp, the loss and, in place, the logit gradient
// G'_ij = G_ij / (|x_i| |W_j|) in the GEMM dtype. Two more GEMMs give G'·W = gx̂_i / |x_i|
// (finish_grad_x projects out x̂ with u_i = t_i / |x_i|²) and G'ᵀ·x = gŵ_j / |W_j| (accumulated
// over the blocks; finish_grad_w projects out ŵ). Same identities as the small-C kernels.
#pragma once

#include "cuda_common.cuh"

namespace udat {
namespace cuda {

constexpr int kEpilogueThreads = 256;
constexpr int kRowThreads = 256;  // norm and grad-W kernels: a block per row

// Squared norms of the rows of a (rows, D) matrix, and optionally 1 / max(norm, eps): a warp per
// row.
template <typename A>
__global__ void row_sumsq_kernel(const void* m, DType t, int64_t rows, int64_t D, A* out,
                                 A* inv_out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (row >= rows) return;
  A s = A(0);
  for (int64_t d = lane; d < D; d += kWarp) {
    const A v = load_as<A>(m, t, row * D + d);
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) {
    out[row] = s;
    if (inv_out) inv_out[row] = inv_norm(s);
  }
}

template <typename A, typename G>
struct EpilogueArgs {
  RowArgs<A> row;
  GradScale<A> gs;
  const A* logits;  // (n, C): x_i·W_j
  G* g_out;         // (n, C): G'_ij; may alias logits when G is A
  const A* x_ss;    // (B,) squared norms of x (angular)
  const A* w_inv;   // (C,) 1 / max(|W_j|, eps) (angular)
  int64_t r0;       // first row of the block
  const A* lse_in;  // backward: (B,)
  A* lse_out;       // forward: (B,)
  A* loss_rows;     // forward: (B,)
  bool want_grad;
  A* u_out;         // (B,) t_i / |x_i|² (0 when not projected)
  bool vec;         // float32 rows of logits and gradient allow 16-byte loads (and stores)
};

// What the epilogue knows of its row, and the logit of one column of it.
template <typename A>
struct EpilogueRow {
  const RowArgs<A>* r;
  const A* w_inv;
  RowTarget t;
  A inv_n;
  RowCoef<A> rc;
  A lse, k, dpsi;
  bool zero;  // zero_row: δ = 0 whatever the logits

  // The logit of column j from its GEMM value v, and its cosine (angular) for the gradient.
  __device__ __forceinline__ A logit(A v, int64_t j, A& c) const {
    if (r->normalize) {
      c = v * inv_n * w_inv[j];
      return r->mp.scale * ((t.owned && j == t.col) ? margin_psi(c, r->mp) : c);
    }
    c = v;
    return v + (r->bias ? r->bias[j] : A(0));
  }

  // Pass 1: the column into the running log-sum-exp (and the smoothing's weighted sum).
  __device__ __forceinline__ void push(A v, int64_t j, A& m, A& s, A& wz) const {
    A c;
    const A z = logit(v, j, c);
    lse_push(m, s, z);
    if (rc.b != A(0)) wz += col_w(*r, j) * z;
  }

  // Pass 2: the column's G'_ij, and its share of t_i.
  template <typename G>
  __device__ __forceinline__ G gradient(A v, int64_t j, A& tsum) const {
    A c;
    const A z = logit(v, j, c);
    const bool is_t = t.owned && j == t.col;
    const A delta = zero ? A(0) : k * row_delta(rc, exp(z - lse), is_t, col_w(*r, j));
    A g = delta;
    if (r->normalize) {
      g = r->mp.scale * delta * (is_t ? dpsi : A(1));
      tsum += g * c;
      g *= inv_n * w_inv[j];
    }
    return static_cast<G>(g);
  }
};

// The fused epilogue of one row: a block per row; columns of float32 logits in 16-byte vectors
// where the rows allow it (more bytes in flight), else one by one (float64: always).
template <typename A, typename G>
__global__ void __launch_bounds__(kEpilogueThreads)
    epilogue_kernel(const EpilogueArgs<A, G> a) {
  UDAT_SHARED(A, scratch_m, kWarp);
  UDAT_SHARED(A, scratch_s, kWarp);
  constexpr int V = sizeof(A) == 4 ? 4 : 1;
  const RowArgs<A>& r = a.row;
  const int64_t C = r.C;
  const int64_t i = a.r0 + blockIdx.x;
  const A* lrow = a.logits + int64_t(blockIdx.x) * C;
  EpilogueRow<A> e;
  e.r = &r;
  e.w_inv = a.w_inv;
  e.t = read_target(r, i);
  e.inv_n = A(1);
  bool proj = false;
  if (r.normalize) {
    e.inv_n = inv_norm(a.x_ss[i]);
    proj = norm_projects(a.x_ss[i]);
  }
  const A wsum = weight_sum(r);
  const A wy = e.t.valid ? class_w(r, e.t.y) : A(0);
  e.rc = row_coef<A>(wy, wsum, r.smoothing, r.num_classes);
  // The target column, read by every thread before the gradient overwrites the row in place.
  A c_y = A(0), z_y = A(0);
  if (e.t.owned) z_y = e.logit(lrow[e.t.col], e.t.col, c_y);

  if (a.lse_in) {
    e.lse = a.lse_in[i];
  } else {
    A m = -INFINITY, s = A(0), wz = A(0);
    if (a.vec) {
      for (int64_t jv = threadIdx.x; jv < C / V; jv += blockDim.x) {
        const auto lv = load_vec<Vec<A, V>>(lrow + jv * V);
#pragma unroll
        for (int q = 0; q < V; ++q) e.push(lv.v[q], jv * V + q, m, s, wz);
      }
    } else {
      for (int64_t j = threadIdx.x; j < C; j += blockDim.x) e.push(lrow[j], j, m, s, wz);
    }
    block_lse(m, s, scratch_m, scratch_s);
    e.lse = lse_finish(m, s);
    if (e.rc.b != A(0)) wz = block_sum(wz, scratch_m);
    if (threadIdx.x == 0) {
      A loss = A(0);
      if (e.t.valid) {
        loss = sample_w(r, i) * (r.shard ? row_partial(e.rc, z_y, e.t.owned, wz)
                                         : row_loss(e.rc, e.lse, z_y, wsum, wz));
      } else if (e.t.bad) {
        loss = A(NAN);
      }
      a.lse_out[i] = e.lse;
      a.loss_rows[i] = loss;
    }
  }
  if (!a.want_grad) return;

  A div = A(0);
  if (a.gs.divisor_parts) {
    for (int p = 0; p < a.gs.n_divisor_parts; ++p) div += a.gs.divisor_parts[p];
  }
  const A inv_div = a.gs.divisor_parts ? inv_divisor(div) : A(1);
  e.k = row_k(r, a.gs, e.t, i, inv_div);
  e.dpsi = r.normalize && e.t.owned ? margin_dpsi(c_y, r.mp) : A(1);
  e.zero = zero_row(r, e.t);
  __syncthreads();  // every read of the target column comes before the in-place writes
  G* grow = a.g_out + int64_t(blockIdx.x) * C;
  A tsum = A(0);
  // In place when G is A: each thread writes only what it has just read.
  if (a.vec) {
    for (int64_t jv = threadIdx.x; jv < C / V; jv += blockDim.x) {
      const auto lv = load_vec<Vec<A, V>>(lrow + jv * V);
      Vec<G, V> out;
#pragma unroll
      for (int q = 0; q < V; ++q) out.v[q] = e.template gradient<G>(lv.v[q], jv * V + q, tsum);
      store_vec(grow + jv * V, out);
    }
  } else {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      grow[j] = e.template gradient<G>(lrow[j], j, tsum);
    }
  }
  if (r.normalize) tsum = block_sum(tsum, scratch_m);
  if (threadIdx.x == 0) a.u_out[i] = proj ? tsum * e.inv_n * e.inv_n : A(0);
}

// grad x of rows [r0, r0 + n): x_scale · (gx − u_i x_i), in grad_x's dtype (x's, or the loss
// dtype in the shard mode).
template <typename A>
__global__ void finish_grad_x_kernel(const A* gx, const void* x, DType x_t, const A* u,
                                     int64_t r0, int64_t n, int64_t D, bool normalize,
                                     const GradScale<A> gs, void* grad_x, DType gx_t) {
  const A xs = grad_x_scale(gs);
  const int64_t total = n * D;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = r0 + e / D;
    const int64_t ge = r0 * D + e;
    A v = gx[e];
    if (normalize) v -= u[i] * load_as<A>(x, x_t, ge);
    store_as(grad_x, gx_t, ge, xs * v);
  }
}

// grad W from the accumulated a_j = gŵ_j / |W_j|: a_j − (a_j·ŵ_j) ŵ_j (angular; a_j alone when
// |W_j| < eps, which is gŵ_j / eps), a block per class.
template <typename A>
__global__ void __launch_bounds__(kRowThreads)
    finish_grad_w_kernel(const A* acc, const void* w, DType w_t, const A* w_ss, int64_t D,
                         bool normalize, void* grad_w, DType gw_t) {
  UDAT_SHARED(A, scratch, kWarp);
  const int64_t j = blockIdx.x;
  const A* arow = acc + j * D;
  if (!normalize) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) store_as(grad_w, gw_t, j * D + d, arow[d]);
    return;
  }
  const A inv = inv_norm(w_ss[j]);
  const bool proj = norm_projects(w_ss[j]);
  A dot = A(0);
  if (proj) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      dot += arow[d] * load_as<A>(w, w_t, j * D + d);
    }
  }
  const A f = block_sum(dot, scratch) * inv * inv;  // (a_j·ŵ_j) / |W_j|
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const A v = proj ? arow[d] - f * load_as<A>(w, w_t, j * D + d) : arow[d];
    store_as(grad_w, gw_t, j * D + d, v);
  }
}

}  // namespace cuda
}  // namespace udat
