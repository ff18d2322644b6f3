// CPU kernels of the fused cross-entropy ops.
//
// Design (docs/design.md, "Memory": row blocks): rows of x are taken in blocks whose logits
// over all C classes fit a memory budget. Per block: one GEMM forms the logits, a fused
// epilogue applies scale and margin, the log-sum-exp, the loss and the logit gradient G in
// place, and two more GEMMs turn G into grad x (for the block) and grad W (accumulated). Three GEMMs for loss and gradient, never a
// B×C tensor, and no normalized copy of W: the column scale 1/|W_j| is folded into the epilogue.
//   angular: z_ij = s·c_ij with c_ij = x̂_i·W_j/|W_j|, so with G'_ij = G_ij/|W_j|
//            gx̂ = G' W  and  Σ_i G_ij x̂_i / |W_j| = (G'ᵀ x̂)_j  (the projection is linear).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../udat_ce.h"
#include "gemm.h"
#include "row_kernels.h"

namespace udat {
namespace {

// 256 MiB of logits: few, large blocks keep the grad-W GEMM efficient (each block re-reads and
// re-writes the (C, D) accumulator), while the forward's peak (grad W + one block) stays near
// the backward's (the saved grad W + its rescaled copy) for face-recognition heads.
constexpr int64_t kDefaultBlockBytes = int64_t(256) << 20;

// Bytes of logits a row block may hold; UDAT_CPU_BLOCK_BYTES overrides (tests use it to force
// several blocks on small inputs).
int64_t block_bytes() { return env_knob("UDAT_CPU_BLOCK_BYTES", kDefaultBlockBytes); }

// The shard mode's blocks hold at most this many rows as well (docs/design.md, "Shard mode"):
// its point is the rank's peak memory (the shard's grad W beside one block), and with 256 rows
// the three GEMMs of a block are already compute-bound (each block re-reads W and re-writes the
// grad-W accumulator: 2·256 flops per 4 bytes of the accumulator).
constexpr int64_t kShardBlockRows = 256;

// Heads of at most this many classes take the small-C pass (no GEMMs, no per-op overhead);
// UDAT_CPU_SMALL_C overrides it (tests set 0 to run small heads through the row blocks).
constexpr int64_t kDefaultSmallC = cpu::kSmallHeadMax;

int64_t small_c_limit() {
  return std::min<int64_t>(env_knob("UDAT_CPU_SMALL_C", kDefaultSmallC, 0), cpu::kSmallHeadMax);
}

void check_targets(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    TORCH_CHECK_VALUE(t[i] == ignore_index || (t[i] >= 0 && t[i] < C), "target: value ", t[i],
                      " at row ", i, " is outside [0, ", C, ") and is not ignore_index (",
                      ignore_index, ")");
  }
}

// Loops over one row of logits. float rows take the vectorized kernels of row_kernels.cpp; the
// templates serve float64.
template <typename T>
void scale_bias(T* z, int64_t n, const T* col_scale, const T* bias, T row_scale) {
  if (col_scale) for (int64_t j = 0; j < n; ++j) z[j] = (z[j] * row_scale) * col_scale[j];
  if (bias) for (int64_t j = 0; j < n; ++j) z[j] += bias[j];
}
void scale_bias(float* z, int64_t n, const float* col_scale, const float* bias, float row_scale) {
  cpu::scale_bias(z, n, col_scale, bias, row_scale);
}

template <typename T>
T row_max(const T* z, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}
float row_max(const float* z, int64_t n) { return cpu::row_max(z, n); }

template <typename T>
double exp_sum(const T* z, int64_t n, T shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += std::exp(z[j] - shift);
  return sum;
}
double exp_sum(const float* z, int64_t n, float shift) { return cpu::exp_sum(z, n, shift); }

template <typename T>
double dot(const T* a, const T* b, int64_t n) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += double(a[j]) * b[j];
  return sum;
}
double dot(const float* a, const float* b, int64_t n) { return cpu::dot(a, b, n); }

// Pass 1 of the small-C pass: the row's raw dot products with every class centre, and its
// squared norm (returned), in double (see cpu::small_head_dots).
template <typename T>
double head_dots(const T* x, const T* W, int64_t C, int64_t D, double* z) {
  for (int64_t c = 0; c < C; ++c) z[c] = dot(x, W + c * D, D);
  return dot(x, x, D);
}
double head_dots(const float* x, const float* W, int64_t C, int64_t D, double* z) {
  return cpu::small_head_dots(x, W, C, D, z);
}

// Pass 2 on `rows` consecutive rows: gx_r = f_r·(Σ_c g_rc W_c − beta_r·x_r), gW_c += h_rc·x_r.
template <typename T>
void head_grads(const T* g, const T* h, const T* f, const T* beta, const T* W, const T* x,
                int64_t rows, int64_t C, int64_t D, T* gx, T* gW) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    T* gr = gx + r * D;
    for (int64_t k = 0; k < D; ++k) gr[k] = -beta[r] * xr[k];
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < D; ++k) {
        gr[k] += g[r * C + c] * W[c * D + k];
        gW[c * D + k] += h[r * C + c] * xr[k];
      }
    }
    for (int64_t k = 0; k < D; ++k) gr[k] *= f[r];
  }
}
void head_grads(const float* g, const float* h, const float* f, const float* beta,
                const float* W, const float* x, int64_t rows, int64_t C, int64_t D, float* gx,
                float* gW) {
  cpu::small_head_grads(g, h, f, beta, W, x, rows, C, D, gx, gW);
}

template <typename T>
void add_into(T* dst, const T* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}
void add_into(float* dst, const float* src, int64_t n) { cpu::add_into(dst, src, n); }

template <typename T>
double weighted_sum(const T* z, int64_t n, const T* w) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (w ? w[j] : T(1)) * z[j];
  return sum;
}
double weighted_sum(const float* z, int64_t n, const float* w) {
  return cpu::weighted_sum(z, n, w);
}

template <typename T>
void softmax_grad(T* z, int64_t n, T lse, T kp, T kb, const T* w, const T* col_scale) {
  for (int64_t j = 0; j < n; ++j) {
    z[j] = (kp * std::exp(z[j] - lse) - kb * (w ? w[j] : T(1))) * (col_scale ? col_scale[j] : T(1));
  }
}
void softmax_grad(float* z, int64_t n, float lse, float kp, float kb, const float* w,
                  const float* col_scale) {
  cpu::softmax_grad(z, n, lse, kp, kb, w, col_scale);
}

// Which classes `weight` holds (docs/design.md, "Shard mode"): [offset, offset + C) of
// num_classes. The ordinary op is the whole problem (offset 0, num_classes = C) and writes each
// row's loss; the shard mode writes each row's partial q_i instead (docs/math.md, "Class shards").
struct ShardSpec {
  int64_t offset;
  int64_t num_classes;
  bool partial;

  static ShardSpec whole(int64_t C) { return {0, C, false}; }
};

// The inputs in the accumulation type T, with the per-row and per-class quantities both passes
// need. Built once per op call.
template <typename T>
struct Problem {
  int64_t B, C, D;   // C: the classes of `weight` (this shard's, in the shard mode)
  int64_t offset;    // the global id of weight's first class
  int64_t num_classes;  // every class of the problem: b = ε/num_classes, y in [0, num_classes)
  bool partial;      // the shard mode's rows: q_i rather than loss_i
  bool small;        // the small-C pass: x̂ is formed row by row, feats stays undefined
  // The row blocks take bf16 GEMMs (docs/design.md, "bfloat16 inputs on the CPU"): x and
  // weight are both bf16 and the CPU has the instruction. The GEMM operands are then x and W as
  // given (x16, w16), with no float32 copy of either (xa, feats and wa stay undefined), and the
  // angular logits come out as x·W_j, the epilogue dividing by |x_i| as it divides by |W_j|
  // (raw_x).
  bool bf16 = false;
  bool raw_x = false;
  at::TensorOptions opts;  // T on x's device
  at::Tensor x16, w16;  // (B, D), (C, D) bf16, contiguous (bf16 only)
  at::Tensor xa;     // (B, D) x in T (not bf16)
  at::Tensor feats;  // (B, D) x̂ (angular) or x (linear) in T: the left GEMM operand (not bf16)
  at::Tensor wa;     // (C, D) weight in T (not bf16)
  at::Tensor x_inv;  // (B,) 1/max(|x_i|, eps)           (angular)
  at::Tensor w_inv;  // (C,) 1/max(|W_j|, eps)           (angular)
  at::Tensor col_scale;  // (C,) s/max(|W_j|, eps)       (angular)
  at::Tensor x_norm;  // (B,) |x_i|                     (angular)
  at::Tensor w_norm;  // (C,) |W_j|                     (angular)
  at::Tensor cw;     // (num_classes,) class weights in T, undefined when absent (all ones)
  at::Tensor sw;     // (B,) sample weights in T, undefined when absent
  at::Tensor bias;   // (C,) in T, undefined when absent
  const int64_t* target;
  T wsum;            // Σ_j w_j over all num_classes
  T denom;           // Σ_{i not ignored} v_i w_{y_i}: the mean's divisor (ordinary op only)
};

// A row's target as this shard sees it. valid: counts (y in [0, num_classes), not ignored);
// bad: neither valid nor ignored (its outputs are NaN; the ordinary op has rejected such targets
// before); owned: valid and one of weight's classes, at column `local`. For the ordinary op
// owned = valid and local = y.
struct RowTarget {
  bool valid, bad, owned;
  int64_t local;
};

template <typename T>
RowTarget row_target(const Problem<T>& P, int64_t ignore_index, int64_t i) {
  const int64_t y = P.target[i];
  RowTarget r;
  r.valid = y != ignore_index && y >= 0 && y < P.num_classes;
  r.bad = y != ignore_index && !r.valid;
  r.local = y - P.offset;
  r.owned = r.valid && r.local >= 0 && r.local < P.C;
  return r;
}

// |W_j| of bf16 rows, in float32 from double sums, without a float32 copy of W.
at::Tensor bf16_row_norms(const at::Tensor& w16) {
  const int64_t C = w16.size(0), D = w16.size(1);
  at::Tensor norms = at::empty({C}, w16.options().dtype(at::kFloat));
  const auto* w = reinterpret_cast<const uint16_t*>(w16.data_ptr());
  float* out = norms.data_ptr<float>();
  at::parallel_for(0, C, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) out[j] = float(std::sqrt(cpu::sq_norm_bf16(w + j * D, D)));
  });
  return norms;
}

template <typename T>
Problem<T> make_problem(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                        const OptTensor& bias, const OptTensor& class_weight,
                        const OptTensor& sample_weight, const CeOptions& opt,
                        const ShardSpec& shard) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  Problem<T> P;
  P.B = x.size(0);
  P.C = weight.size(0);
  P.D = x.size(1);
  P.offset = shard.offset;
  P.num_classes = shard.num_classes;
  P.partial = shard.partial;
  P.opts = x.options().dtype(st);
  P.small = P.C <= small_c_limit();
  P.bf16 = std::is_same_v<T, float> && !P.small && x.scalar_type() == at::kBFloat16 &&
           weight.scalar_type() == at::kBFloat16 && cpu::bf16_gemm_available();
  P.raw_x = P.bf16 && opt.normalize;
  if (P.bf16) {
    P.x16 = x.contiguous();
    P.w16 = weight.contiguous();
  } else {
    P.xa = x.to(st).contiguous();
    P.wa = weight.to(st).contiguous();
  }
  if (opt.normalize && P.small) {
    // A few class centres: their norms by loops, not by a handful of tiny ATen ops.
    P.w_norm = at::empty({P.C}, P.wa.options());
    P.w_inv = at::empty({P.C}, P.wa.options());
    P.col_scale = at::empty({P.C}, P.wa.options());
    const T* w = P.wa.template data_ptr<T>();
    for (int64_t j = 0; j < P.C; ++j) {
      const T n = std::sqrt(T(dot(w + j * P.D, w + j * P.D, P.D)));
      P.w_norm.template data_ptr<T>()[j] = n;
      P.w_inv.template data_ptr<T>()[j] = T(1) / std::max(n, T(kNormEps));
      P.col_scale.template data_ptr<T>()[j] = T(opt.scale) / std::max(n, T(kNormEps));
    }
  } else if (opt.normalize) {
    // Norm reductions, not pow(2).sum(): no (C, D) temporary.
    if (P.bf16) {
      P.x_norm = bf16_row_norms(P.x16);
      P.w_norm = bf16_row_norms(P.w16);
    } else {
      P.x_norm = at::linalg_vector_norm(P.xa, 2, {1});
      P.w_norm = at::linalg_vector_norm(P.wa, 2, {1});
    }
    P.x_inv = P.x_norm.clamp_min(kNormEps).reciprocal();
    P.w_inv = P.w_norm.clamp_min(kNormEps).reciprocal();
    P.col_scale = P.w_inv * opt.scale;
    // Divide rather than multiply by the reciprocal: a row parallel to a class centre then
    // gives a cosine of exactly ±1, where ψ is ill-conditioned (sqrt(1 - c²)).
    if (!P.bf16) P.feats = P.xa / P.x_norm.clamp_min(kNormEps).unsqueeze(1);
  } else if (!P.small && !P.bf16) {
    P.feats = P.xa;
  }
  if (class_weight) P.cw = class_weight->to(st).contiguous();
  if (sample_weight) P.sw = sample_weight->to(st).contiguous();
  if (bias) P.bias = bias->to(st).contiguous();
  P.target = target.data_ptr<int64_t>();
  P.wsum = P.cw.defined() ? P.cw.sum().template item<T>() : T(P.num_classes);
  P.denom = T(0);
  if (P.partial) return P;  // no reduction in the shard mode
  double denom = 0;
  const T* cw = P.cw.defined() ? P.cw.template data_ptr<T>() : nullptr;
  const T* sw = P.sw.defined() ? P.sw.template data_ptr<T>() : nullptr;
  for (int64_t i = 0; i < P.B; ++i) {
    const int64_t y = P.target[i];
    if (y == opt.ignore_index) continue;
    denom += double(sw ? sw[i] : T(1)) * double(cw ? cw[y] : T(1));
  }
  P.denom = T(denom);
  return P;
}

// Where one pass over the row blocks writes. A null pointer or undefined tensor skips that part.
template <typename T>
struct PassOut {
  T* loss_rows = nullptr;     // (B,) v_i·loss_i (the shard mode: q_i), 0 for ignored rows
  T* lse = nullptr;           // (B,) written, or read when lse_given
  bool lse_given = false;
  const T* k = nullptr;       // (B,) gradient factor of each row; null: no gradient
  T x_scale = T(1);           // grad x multiplier (-λ for the fused GRL)
  at::Tensor grad_x;          // (B, D), x's dtype (the shard mode: T)
  at::Tensor grad_w_acc;      // (C, D) in T, accumulated
  at::Tensor grad_b_acc;      // (C,) in T, accumulated
};

// The fused epilogue of one row: logits -> (loss or partial, lse) and, with k, the logit
// gradient in place. In the shard mode the target column is this shard's only where it owns the
// row's target, and the class weights of its columns are cw[offset + j].
template <typename T>
void row_epilogue(const Problem<T>& P, const CeOptions& opt, const MarginParams<T>& mp,
                  const PassOut<T>& out, int64_t i, T* z) {
  const int64_t C = P.C;
  const int64_t y = P.target[i];
  const RowTarget rt = row_target(P, opt.ignore_index, i);
  const int64_t ly = rt.local;  // the target's column (read only when owned)
  const T* cw = P.cw.defined() ? P.cw.template data_ptr<T>() : nullptr;
  const T* cw_cols = cw ? cw + P.offset : nullptr;
  const T* sw = P.sw.defined() ? P.sw.template data_ptr<T>() : nullptr;
  const T* col_scale = opt.normalize ? P.col_scale.template data_ptr<T>() : nullptr;
  const T* bias = P.bias.defined() ? P.bias.template data_ptr<T>() : nullptr;

  // bf16 GEMMs leave |x_i| in the angular logits (Problem::raw_x): divide it out here, and put
  // 1/|x_i| into the row's gradient, which then feeds the GEMMs with x as given.
  const T x_div = P.raw_x ? std::max(P.x_norm.template data_ptr<T>()[i], T(kNormEps)) : T(1);
  const T row_scale = P.raw_x ? P.x_inv.template data_ptr<T>()[i] : T(1);
  T c_y = 0;  // the target cosine, kept for ψ'
  if (opt.normalize && rt.owned) {
    // Divide rather than multiply by 1/|W_y| (see make_problem).
    const T z_y = P.raw_x ? z[ly] / x_div : z[ly];
    c_y = z_y / std::max(P.w_norm.template data_ptr<T>()[ly], T(kNormEps));
  }
  scale_bias(z, C, col_scale, bias, row_scale);
  if (opt.normalize && rt.owned) z[ly] = mp.scale * margin_psi(c_y, mp);

  T lse;
  if (out.lse_given) {
    lse = out.lse[i];
  } else {
    const T m = row_max(z, C);
    const T shift = std::isinf(m) ? T(0) : m;  // all -inf: keep lse = -inf, not NaN
    // Sums over up to millions of classes are accumulated in double (a float accumulator
    // drifts by ~sqrt(C) ulps).
    // With an infinite maximum, lse is that infinity (as torch.logsumexp gives, docs/math.md,
    // "Non-finite inputs"), or NaN when the row also holds a NaN: the vectorized exp saturates
    // at exp(±88), so lse = m + log(sum) rather than the sum alone must say so.
    lse = m + T(std::log(exp_sum(z, C, shift)));
    out.lse[i] = lse;
  }

  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T wy = rt.valid ? (cw ? cw[y] : T(1)) : T(0);
  const RowCoef<T> rc = row_coef<T>(wy, P.wsum, T(opt.label_smoothing), P.num_classes);
  if (out.loss_rows) {
    T loss = rt.bad ? nan : T(0);
    if (rt.valid) {
      const T wz = rc.b != T(0) ? T(weighted_sum(z, C, cw_cols)) : T(0);
      if (P.partial) {
        // q_i = −v_i·[a_i·z_iy·[owned] + b·Σ_{j in shard} w_j·z_ij]
        loss = (sw ? sw[i] : T(1)) * row_partial(rc, rt.owned ? z[ly] : T(0), rt.owned, wz);
      } else {
        loss = (sw ? sw[i] : T(1)) * row_loss(rc, lse, z[ly], P.wsum, wz);
      }
    }
    out.loss_rows[i] = loss;
  }

  if (!out.k) return;
  if (rt.bad) {  // shard mode only: the whole row's gradient is NaN, as its loss
    std::fill(z, z + C, nan);
    return;
  }
  const T k = rt.valid ? out.k[i] * row_scale : T(0);
  if (k == T(0)) {
    std::fill(z, z + C, T(0));
    return;
  }
  softmax_grad(z, C, lse, k * rc.p_coef, k * rc.b, rc.b != T(0) ? cw_cols : nullptr, col_scale);
  // The target column, where this shard holds it: subtract a·k, and (angular) apply ψ'(c_y),
  // the chain rule through the margin.
  if (!rt.owned) return;
  if (opt.normalize) {
    z[ly] = (z[ly] - k * rc.a * col_scale[ly]) * margin_dpsi(c_y, mp);
  } else {
    z[ly] -= k * rc.a;
  }
}

const uint16_t* bf16_bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr());
}

// A bf16 row widened into `out` (float rows only: bf16 operands come with T = float).
template <typename T>
const T* widen_row(const uint16_t* w, T* out, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    cpu::bf16_to_float(w, out, n);
  } else {
    TORCH_INTERNAL_ASSERT(false, "bf16 operands with a float64 loss");
  }
  return out;
}

// x̂ of a bf16 row of norm `norm`, into `out`: divided as make_problem divides.
template <typename T>
const T* unit_row(const uint16_t* x, T norm, T* out, int64_t n) {
  widen_row(x, out, n);
  const T d = std::max(norm, T(kNormEps));
  for (int64_t k = 0; k < n; ++k) out[k] /= d;
  return out;
}

// grad x of the rows [r0, r0 + n) from gx̂ (angular: project out x̂ and divide by |x|).
template <typename T>
void finish_grad_x(const Problem<T>& P, const CeOptions& opt, T x_scale, int64_t r0,
                   at::Tensor gx /* (n, D) in T, rows of any stride, modified */) {
  const int64_t D = P.D;
  T* g = gx.data_ptr<T>();
  if (!opt.normalize) {
    if (x_scale != T(1)) gx.mul_(x_scale);
    return;
  }
  const T* xh = P.bf16 ? nullptr : P.feats.template data_ptr<T>();
  const auto* x16 = P.bf16 ? bf16_bits(P.x16) : nullptr;
  const T* x_inv = P.x_inv.template data_ptr<T>();
  const T* x_norm = P.x_norm.template data_ptr<T>();
  at::parallel_for(0, gx.size(0), 16, [&](int64_t lo, int64_t hi) {
    std::vector<T> row(x16 ? D : 0);  // x̂_i from the bf16 row
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t i = r0 + r;
      T* gr = g + r * gx.stride(0);
      const T* xr = xh ? xh + i * D : unit_row(x16 + i * D, x_norm[i], row.data(), D);
      // With raw_x the row's gradient already holds 1/|x_i| (see row_epilogue).
      const T f = (P.raw_x ? T(1) : x_inv[i]) * x_scale;
      if (x_norm[i] >= T(kNormEps)) {
        T dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += gr[d] * xr[d];
        for (int64_t d = 0; d < D; ++d) gr[d] = (gr[d] - dot * xr[d]) * f;
      } else {
        for (int64_t d = 0; d < D; ++d) gr[d] *= f;
      }
    }
  });
}

// grad W from the accumulated (G'ᵀ x̂) (angular: project out ŵ; the 1/|W| is already in G').
// With out16 (bf16 GEMMs), each finished row is also rounded to bf16 into out16 (C, D), the
// accumulator's row serving as scratch: one pass over the accumulator.
template <typename T>
void finish_grad_w(const Problem<T>& P, const CeOptions& opt, at::Tensor acc, uint16_t* out16) {
  if (!opt.normalize && !out16) return;
  const int64_t D = P.D;
  T* g = acc.data_ptr<T>();
  const T* w = P.bf16 ? nullptr : P.wa.template data_ptr<T>();
  const auto* w16 = P.bf16 ? bf16_bits(P.w16) : nullptr;
  const T* w_inv = opt.normalize ? P.w_inv.template data_ptr<T>() : nullptr;
  const T* w_norm = opt.normalize ? P.w_norm.template data_ptr<T>() : nullptr;
  at::parallel_for(0, P.C, 64, [&](int64_t lo, int64_t hi) {
    std::vector<T> row(w16 && opt.normalize ? D : 0);  // a bf16 row of W, widened
    for (int64_t j = lo; j < hi; ++j) {
      T* gr = g + j * D;
      if (opt.normalize && w_norm[j] >= T(kNormEps)) {
        const T* wr = w ? w + j * D : widen_row(w16 + j * D, row.data(), D);
        const T f = T(dot(gr, wr, D)) * w_inv[j] * w_inv[j];  // (g·ŵ) ŵ = (g·w) w / |w|²
        for (int64_t d = 0; d < D; ++d) gr[d] -= f * wr[d];
      }
      if constexpr (std::is_same_v<T, float>) {
        if (out16) {
          cpu::round_row_to_bf16(gr, D);
          std::memcpy(out16 + j * D, gr, sizeof(uint16_t) * D);
        }
      }
    }
  });
}

// The pass for heads of a few classes: no GEMM and no (B, D) temporary, two passes over each
// row of x (the second from L1), because at these sizes per-op overhead and memory traffic
// dominate. Pass 1 takes the raw dot products x·W_c and |x|² together; with d = max(|x|, eps),
// x̂·W_c = x·W_c / d. After the epilogue (z = G', the logit gradient with s/|W_c| in it):
//   grad x̂ = Σ_c G'_c W_c, and (grad x̂ · x̂) x̂ = (Σ_c G'_c x̂·W_c / d) x, so
//   grad x = x_scale/d · (Σ_c G'_c W_c − beta x) with beta = Σ_c G'_c x̂·W_c / d (0 when
//   |x| < eps: no projection, as F.normalize's gradient there), and G'ᵀ x̂ += (G'_c / d) x.
// The rows are split into a fixed number of chunks (so the result does not depend on the thread
// count), each chunk sums its share of grad W, and the chunks' sums are added in order.
// At least kSmallChunks chunks, and at most kSmallChunkRows rows a chunk, so that float partial
// sums stay short.
constexpr int64_t kSmallChunks = 8;
constexpr int64_t kSmallChunkRows = 256;
constexpr int64_t kGroupRows = 16;

template <typename T>
void small_pass(const Problem<T>& P, const CeOptions& opt, const PassOut<T>& out) {
  const int64_t B = P.B, C = P.C, D = P.D;
  const auto st = c10::CppTypeToScalarType<T>::value;
  const MarginParams<T> mp = cast_params<T>(
      make_margin_params(opt.scale, opt.margin, opt.cos_margin, opt.straight_through));
  const T* x = P.xa.template data_ptr<T>();
  const T* w = P.wa.template data_ptr<T>();
  const int64_t chunks = std::min<int64_t>(
      B, std::max<int64_t>(kSmallChunks, (B + kSmallChunkRows - 1) / kSmallChunkRows));
  const bool grads = out.k != nullptr;
  const bool grad_x_direct = grads && out.grad_x.scalar_type() == st;
  at::Tensor gx_t = grads && !grad_x_direct ? at::empty({B, D}, P.opts) : at::Tensor();
  T* gx_all = grads ? (grad_x_direct ? out.grad_x.template data_ptr<T>()
                                     : gx_t.template data_ptr<T>())
                    : nullptr;
  // Per chunk: its share of G'ᵀ x̂ (C·D) and of the bias gradient (C).
  const int64_t part_size = C * D + C;
  std::unique_ptr<T[]> partial(grads ? new T[chunks * part_size] : nullptr);

  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    // Pass 1 and the epilogue row by row, pass 2 for groups of rows (see cpu::small_head_grads):
    // per row of a group its G' (g), G'/d (h), x_scale/d (f) and beta.
    T g[kGroupRows * cpu::kSmallHeadMax], h[kGroupRows * cpu::kSmallHeadMax];
    T f[kGroupRows], beta[kGroupRows], zc[cpu::kSmallHeadMax];
    double dots[cpu::kSmallHeadMax];
    for (int64_t ch = lo; ch < hi; ++ch) {
      T* gw = grads ? partial.get() + ch * part_size : nullptr;
      if (grads) std::fill(gw, gw + part_size, T(0));
      const int64_t end = (ch + 1) * B / chunks;
      for (int64_t i0 = ch * B / chunks; i0 < end; i0 += kGroupRows) {
        const int64_t rows = std::min(kGroupRows, end - i0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          T* z = g + r * C;
          const double sumsq = head_dots(x + i * D, w, C, D, dots);
          T xn = 0, d = 1;
          if (opt.normalize) {
            // x̂·W_c = x·W_c / d, divided in double (exactly ±|W_c| for a row of a few
            // features parallel to W_c).
            const double xn_d = std::sqrt(sumsq), d_d = std::max(xn_d, double(kNormEps));
            xn = T(xn_d);
            d = T(d_d);
            for (int64_t j = 0; j < C; ++j) zc[j] = z[j] = T(dots[j] / d_d);
          } else {
            for (int64_t j = 0; j < C; ++j) z[j] = T(dots[j]);
          }
          row_epilogue(P, opt, mp, out, i, z);
          if (!grads) continue;
          f[r] = out.x_scale / d;
          beta[r] = 0;
          if (opt.normalize && xn >= T(kNormEps)) {
            for (int64_t j = 0; j < C; ++j) beta[r] += z[j] * zc[j];
            beta[r] /= d;
          }
          for (int64_t j = 0; j < C; ++j) {
            h[r * C + j] = opt.normalize ? z[j] / d : z[j];
            gw[C * D + j] += z[j];
          }
        }
        if (grads) head_grads(g, h, f, beta, w, x + i0 * D, rows, C, D, gx_all + i0 * D, gw);
      }
    }
  });
  if (!grads || chunks == 0) return;  // an empty batch: grad W and grad b are zeros already
  if (!grad_x_direct) out.grad_x.copy_(gx_t);
  T* gw = out.grad_w_acc.template data_ptr<T>();
  T* gb = out.grad_b_acc.defined() ? out.grad_b_acc.template data_ptr<T>() : nullptr;
  // The chunks' sums, in chunk order, column ranges in parallel.
  at::parallel_for(0, C * D, 4096, [&](int64_t lo, int64_t hi) {
    std::copy(partial.get() + lo, partial.get() + hi, gw + lo);
    for (int64_t ch = 1; ch < chunks; ++ch) {
      add_into(gw + lo, partial.get() + ch * part_size + lo, hi - lo);
    }
  });
  if (gb) {
    for (int64_t ch = 0; ch < chunks; ++ch) {
      for (int64_t j = 0; j < C; ++j) gb[j] += partial[ch * part_size + C * D + j];
    }
  }
}

// C = op(A)·op(B) (accumulate: +=) in T: float32 through cpu::gemm_f32 (out of reach of the
// float32 precision switches), float64 through ATen.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, cpu::MatRef<T> a, cpu::MatRef<T> b, T* c,
          int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    cpu::gemm_f32(m, n, k, a, b, c, ldc, accumulate);
  } else {
    if (m == 0 || n == 0) return;
    const auto view = [](const T* p, int64_t r, int64_t cols, int64_t ld) {
      return at::from_blob(const_cast<T*>(p), {r, cols}, {ld, 1},
                           c10::CppTypeToScalarType<T>::value);
    };
    at::Tensor A = a.trans ? view(a.p, k, m, a.ld).t() : view(a.p, m, k, a.ld);
    at::Tensor B = b.trans ? view(b.p, n, k, b.ld).t() : view(b.p, k, n, b.ld);
    at::Tensor C = view(c, m, n, ldc);
    accumulate ? C.addmm_(A, B) : at::mm_out(C, A, B);
  }
}

// One pass over all row blocks: logits GEMM, fused epilogue, and (with out.k) the two gradient
// GEMMs. With bf16 GEMMs (Problem::bf16) the epilogue rounds each row of the logit gradient to
// bf16 in place (a block of stride 2C), which the two gradient GEMMs read with x and W as given.
template <typename T>
void run_blocks(const Problem<T>& P, const CeOptions& opt, const PassOut<T>& out) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  const MarginParams<T> mp = cast_params<T>(
      make_margin_params(opt.scale, opt.margin, opt.cos_margin, opt.straight_through));
  const int64_t C = P.C, D = P.D;
  // As many rows as the budget allows, spread evenly over the blocks: a small last block would
  // run the GEMMs at a poor shape.
  const int64_t max_rows = std::max<int64_t>(
      1, std::min<int64_t>(P.partial ? std::min(P.B, kShardBlockRows) : P.B,
                           block_bytes() / std::max<int64_t>(1, C * int64_t(sizeof(T)))));
  const int64_t blocks = P.B > 0 ? (P.B + max_rows - 1) / max_rows : 1;
  const int64_t rows = std::max<int64_t>(1, (P.B + blocks - 1) / blocks);
  at::Tensor buf = at::empty({rows, C}, P.opts);
  const bool grad_x_direct = out.k && out.grad_x.scalar_type() == st;
  // With bf16 GEMMs the bf16 logit gradient fills the first half of each row of the block; the
  // float32 grad x of the row goes into the second half, where it fits (no extra buffer).
  const int64_t gx_offset = ((C + 1) / 2 + 15) / 16 * 16;
  const bool gx_in_block = P.bf16 && gx_offset + D <= C;
  at::Tensor gx_buf;
  if (out.k && !grad_x_direct && !gx_in_block) gx_buf = at::empty({rows, D}, P.opts);
  T* z = buf.data_ptr<T>();
  const auto* g16 = reinterpret_cast<const uint16_t*>(z);  // the bf16 logit gradient, stride 2C
  const T* feats = P.bf16 ? nullptr : P.feats.template data_ptr<T>();
  const T* w = P.bf16 ? nullptr : P.wa.template data_ptr<T>();

  for (int64_t r0 = 0; r0 < P.B; r0 += rows) {
    const int64_t n = std::min(rows, P.B - r0);
    if (P.bf16) {
      cpu::gemm_bf16(n, C, D, {bf16_bits(P.x16) + r0 * D, D, false}, {bf16_bits(P.w16), D, true},
                     reinterpret_cast<float*>(z), C, false);
    } else {
      gemm<T>(n, C, D, {feats + r0 * D, D, false}, {w, D, true}, z, C, false);
    }
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C));
    at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        T* zr = z + r * C;
        row_epilogue(P, opt, mp, out, r0 + r, zr);
        if constexpr (std::is_same_v<T, float>) {
          if (P.bf16 && out.k) cpu::round_row_to_bf16(zr, C);
        }
      }
    });
    if (!out.k) continue;
    at::Tensor gx = grad_x_direct ? out.grad_x.narrow(0, r0, n)
                    : gx_in_block ? at::from_blob(z + gx_offset, {n, D}, {C, 1}, P.opts)
                                  : gx_buf.narrow(0, 0, n);
    if (P.bf16) {
      cpu::gemm_bf16(n, D, C, {g16, 2 * C, false}, {bf16_bits(P.w16), D, false},
                     reinterpret_cast<float*>(gx.data_ptr<T>()), gx.stride(0), false);
    } else {
      gemm<T>(n, D, C, {z, C, false}, {w, D, false}, gx.data_ptr<T>(), gx.stride(0), false);
    }
    finish_grad_x(P, opt, out.x_scale, r0, gx);
    if (!grad_x_direct) out.grad_x.narrow(0, r0, n).copy_(gx);
    // The first block writes grad W, later ones accumulate: no zero fill of a (C, D) tensor.
    T* gw = out.grad_w_acc.template data_ptr<T>();
    if (P.bf16) {
      cpu::gemm_bf16(C, D, n, {g16, 2 * C, true}, {bf16_bits(P.x16) + r0 * D, D, false},
                     reinterpret_cast<float*>(gw), D, r0 > 0);
    } else {
      gemm<T>(C, D, n, {z, C, true}, {feats + r0 * D, D, false}, gw, D, r0 > 0);
    }
    if (out.grad_b_acc.defined()) {
      const at::Tensor g = P.bf16 ? at::from_blob(z, {n, C}, {2 * C, 1}, P.x16.options())
                                  : buf.narrow(0, 0, n);
      out.grad_b_acc.add_(P.bf16 ? g.sum(0, false, st) : g.sum(0));
    }
  }
}

// The fused GRL: grad x is multiplied by -λ.
template <typename T>
T grl_scale(const OptTensor& grl_lambda) {
  if (!grl_lambda) return T(1);
  TORCH_CHECK_VALUE(grl_lambda->numel() == 1, "grl_lambda: expected a 0-dim tensor, got shape ",
                    grl_lambda->sizes());
  const double lambda = grl_lambda->to(at::kCPU, at::kDouble).template item<double>();
  TORCH_CHECK_VALUE(std::isfinite(lambda), "grl_lambda: expected a finite value, got ", lambda);
  return T(-lambda);
}

// The gradient outputs of a pass, in T, and their conversion to the caller's dtypes. grad x is
// in x's dtype, or in T for the shard mode (its parts are summed over the shards).
template <typename T>
void alloc_grads(const Problem<T>& P, const at::Tensor& x, const at::Tensor& weight,
                 const OptTensor& bias, PassOut<T>& out) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  out.grad_x = at::empty({P.B, P.D}, P.partial ? P.opts : x.options());
  // Zeroed only for an empty batch; otherwise the first row block overwrites it.
  out.grad_w_acc = P.B == 0 ? at::zeros({P.C, P.D}, weight.options().dtype(st))
                            : at::empty({P.C, P.D}, weight.options().dtype(st));
  if (bias) out.grad_b_acc = at::zeros({P.C}, weight.options().dtype(st));
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_grads(const Problem<T>& P,
                                                            const CeOptions& opt,
                                                            const at::Tensor& weight,
                                                            const OptTensor& bias,
                                                            PassOut<T>& out) {
  at::Tensor gw;
  if (P.bf16) {
    gw = at::empty({P.C, P.D}, weight.options());
    finish_grad_w(P, opt, out.grad_w_acc, reinterpret_cast<uint16_t*>(gw.data_ptr()));
  } else {
    finish_grad_w(P, opt, out.grad_w_acc, nullptr);
    gw = out.grad_w_acc.to(weight.scalar_type());
  }
  at::Tensor gb = bias ? out.grad_b_acc.to(bias->scalar_type()) : at::empty({0}, P.opts);
  return {out.grad_x, gw, gb};
}

template <typename T>
FwdResult forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                       const OptTensor& bias, const OptTensor& class_weight,
                       const OptTensor& sample_weight, const OptTensor& grl_lambda,
                       const CeOptions& opt, bool compute_grad) {
  Problem<T> P = make_problem<T>(x, weight, target, bias, class_weight, sample_weight, opt,
                                 ShardSpec::whole(weight.size(0)));
  const auto st = c10::CppTypeToScalarType<T>::value;
  const auto fopt = x.options().dtype(st);
  at::Tensor loss_rows = at::empty({P.B}, fopt);
  at::Tensor lse = at::empty({P.B}, fopt);
  PassOut<T> out;
  out.loss_rows = loss_rows.data_ptr<T>();
  out.lse = lse.data_ptr<T>();
  at::Tensor k;
  const bool mean = opt.reduction == Reduction::Mean;
  if (compute_grad) {
    // Upstream gradient one: k_i = v_i (÷ the mean's divisor; zero when that divisor is zero).
    const T inv = mean ? (P.denom != T(0) ? T(1) / P.denom : T(0)) : T(1);
    k = P.sw.defined() ? P.sw * inv : at::full({P.B}, inv, fopt);
    out.k = k.data_ptr<T>();
    out.x_scale = grl_scale<T>(grl_lambda);
    alloc_grads(P, x, weight, bias, out);
  }
  P.small ? small_pass(P, opt, out) : run_blocks(P, opt, out);

  at::Tensor loss;
  if (opt.reduction == Reduction::None) {
    loss = loss_rows;
  } else {
    double total = 0;
    for (int64_t i = 0; i < P.B; ++i) total += double(out.loss_rows[i]);
    if (mean) total = P.denom != T(0) ? total / double(P.denom)
                                      : std::numeric_limits<double>::quiet_NaN();
    loss = at::scalar_tensor(total, fopt);
  }
  if (!compute_grad) {
    return {loss, lse, at::empty({0}, x.options()), at::empty({0}, weight.options()),
            at::empty({0}, bias ? bias->options() : fopt)};
  }
  auto [gx, gw, gb] = finish_grads(P, opt, weight, bias, out);
  return {loss, lse, gx, gw, gb};
}

template <typename T>
BwdResult backward_impl(const at::Tensor& grad_loss, const at::Tensor& x,
                        const at::Tensor& weight, const at::Tensor& target,
                        const OptTensor& bias, const OptTensor& class_weight,
                        const OptTensor& sample_weight, const at::Tensor& lse,
                        const OptTensor& grl_lambda, const CeOptions& opt) {
  Problem<T> P = make_problem<T>(x, weight, target, bias, class_weight, sample_weight, opt,
                                 ShardSpec::whole(weight.size(0)));
  const auto st = c10::CppTypeToScalarType<T>::value;
  const bool per_row = opt.reduction == Reduction::None;
  TORCH_CHECK_VALUE(per_row ? (grad_loss.dim() == 1 && grad_loss.size(0) == P.B)
                            : grad_loss.numel() == 1,
                    "grad_loss: expected the shape of the loss, got ", grad_loss.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == P.B, "lse: expected shape (", P.B,
                    ",), got ", lse.sizes());
  at::Tensor lse_t = lse.to(st).contiguous();
  const T inv = opt.reduction == Reduction::Mean ? (P.denom != T(0) ? T(1) / P.denom : T(0))
                                                 : T(1);
  at::Tensor k = grad_loss.to(st).reshape({-1}).expand({P.B}) * inv;
  if (P.sw.defined()) k = k * P.sw;
  k = k.contiguous();
  PassOut<T> out;
  out.lse = lse_t.data_ptr<T>();
  out.lse_given = true;
  out.k = k.data_ptr<T>();
  out.x_scale = grl_scale<T>(grl_lambda);
  alloc_grads(P, x, weight, bias, out);
  P.small ? small_pass(P, opt, out) : run_blocks(P, opt, out);
  return finish_grads(P, opt, weight, bias, out);
}

// The checks both ops share; the CPU kernels also check target range (a loop over B).
at::Tensor checked_target(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                          const OptTensor& bias, const OptTensor& class_weight,
                          const OptTensor& sample_weight, const CeOptions& opt) {
  check_inputs(x, weight, target, bias, class_weight, sample_weight, opt);
  const at::Tensor tgt = target.contiguous();
  check_targets(tgt, weight.size(0), opt.ignore_index);
  return tgt;
}

FwdResult margin_ce_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& target, const OptTensor& bias,
                            const OptTensor& class_weight, const OptTensor& sample_weight,
                            const OptTensor& grl_lambda, bool normalize, double scale,
                            double margin, double cos_margin, double label_smoothing,
                            int64_t ignore_index, int64_t reduction, bool straight_through,
                            bool compute_grad) {
  const CeOptions opt = make_options(normalize, scale, margin, cos_margin, label_smoothing,
                                     ignore_index, reduction, straight_through);
  const at::Tensor tgt = checked_target(x, weight, target, bias, class_weight, sample_weight, opt);
  if (loss_dtype(x, weight) == at::kDouble) {
    return forward_impl<double>(x, weight, tgt, bias, class_weight, sample_weight, grl_lambda,
                                opt, compute_grad);
  }
  return forward_impl<float>(x, weight, tgt, bias, class_weight, sample_weight, grl_lambda, opt,
                             compute_grad);
}

BwdResult margin_ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& target,
                            const OptTensor& bias, const OptTensor& class_weight,
                            const OptTensor& sample_weight, const at::Tensor& lse,
                            const OptTensor& grl_lambda, bool normalize, double scale,
                            double margin, double cos_margin, double label_smoothing,
                            int64_t ignore_index, int64_t reduction, bool straight_through) {
  const CeOptions opt = make_options(normalize, scale, margin, cos_margin, label_smoothing,
                                     ignore_index, reduction, straight_through);
  const at::Tensor tgt = checked_target(x, weight, target, bias, class_weight, sample_weight, opt);
  if (loss_dtype(x, weight) == at::kDouble) {
    return backward_impl<double>(grad_loss, x, weight, tgt, bias, class_weight, sample_weight,
                                 lse, grl_lambda, opt);
  }
  return backward_impl<float>(grad_loss, x, weight, tgt, bias, class_weight, sample_weight, lse,
                              grl_lambda, opt);
}

// ---------------------------------------------------------------------------------------------
// The shard mode (docs/design.md, "Shard mode"): the same passes over a shard of the classes,
// with per-row partials in the forward and the combined lse in the backward.
// ---------------------------------------------------------------------------------------------

template <typename T>
ShardFwdResult shard_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& target, const OptTensor& bias,
                                  const OptTensor& class_weight, const OptTensor& sample_weight,
                                  const CeOptions& opt, const ShardSpec& shard) {
  if (weight.size(0) == 0) {
    return empty_shard_forward(x, target, c10::CppTypeToScalarType<T>::value, opt.ignore_index,
                               shard.num_classes);
  }
  Problem<T> P = make_problem<T>(x, weight, target, bias, class_weight, sample_weight, opt, shard);
  at::Tensor lse = at::empty({P.B}, P.opts);
  at::Tensor partial = at::empty({P.B}, P.opts);
  PassOut<T> out;
  out.loss_rows = partial.data_ptr<T>();
  out.lse = lse.data_ptr<T>();
  P.small ? small_pass(P, opt, out) : run_blocks(P, opt, out);
  return {lse, partial};
}

template <typename T>
BwdResult shard_backward_impl(const at::Tensor& grad_rows, const at::Tensor& x,
                              const at::Tensor& weight, const at::Tensor& target,
                              const OptTensor& bias, const OptTensor& class_weight,
                              const OptTensor& sample_weight, const at::Tensor& lse,
                              const OptTensor& grl_lambda, const CeOptions& opt,
                              const ShardSpec& shard) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  const T x_scale = grl_scale<T>(grl_lambda);
  if (weight.size(0) == 0) return empty_shard_backward(x, weight, bias, st);
  Problem<T> P = make_problem<T>(x, weight, target, bias, class_weight, sample_weight, opt, shard);
  // k_i = v_i·∂L/∂loss_i; row_epilogue zeroes the ignored rows and fills the bad ones with NaN.
  at::Tensor k = grad_rows.to(st);
  if (P.sw.defined()) k = k * P.sw;
  k = k.contiguous();
  at::Tensor lse_t = lse.to(st).contiguous();
  PassOut<T> out;
  out.lse = lse_t.data_ptr<T>();
  out.lse_given = true;
  out.k = k.data_ptr<T>();
  out.x_scale = x_scale;
  alloc_grads(P, x, weight, bias, out);
  P.small ? small_pass(P, opt, out) : run_blocks(P, opt, out);
  return finish_grads(P, opt, weight, bias, out);
}

ShardFwdResult margin_ce_shard_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& target, const OptTensor& bias,
                                       const OptTensor& class_weight,
                                       const OptTensor& sample_weight, int64_t class_offset,
                                       int64_t num_classes, bool normalize, double scale,
                                       double margin, double cos_margin, double label_smoothing,
                                       int64_t ignore_index, bool straight_through) {
  const CeOptions opt = make_options(normalize, scale, margin, cos_margin, label_smoothing,
                                     ignore_index, 0, straight_through);
  check_shard_inputs(x, weight, target, bias, class_weight, sample_weight, opt, class_offset,
                     num_classes);
  const ShardSpec shard{class_offset, num_classes, true};
  const at::Tensor tgt = target.contiguous();
  if (loss_dtype(x, weight) == at::kDouble) {
    return shard_forward_impl<double>(x, weight, tgt, bias, class_weight, sample_weight, opt,
                                      shard);
  }
  return shard_forward_impl<float>(x, weight, tgt, bias, class_weight, sample_weight, opt, shard);
}

BwdResult margin_ce_shard_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& x,
                                  const at::Tensor& weight, const at::Tensor& target,
                                  const OptTensor& bias, const OptTensor& class_weight,
                                  const OptTensor& sample_weight, const at::Tensor& lse,
                                  const OptTensor& grl_lambda, int64_t class_offset,
                                  int64_t num_classes, bool normalize, double scale,
                                  double margin, double cos_margin, double label_smoothing,
                                  int64_t ignore_index, bool straight_through) {
  const CeOptions opt = make_options(normalize, scale, margin, cos_margin, label_smoothing,
                                     ignore_index, 0, straight_through);
  check_shard_inputs(x, weight, target, bias, class_weight, sample_weight, opt, class_offset,
                     num_classes);
  check_shard_rows(x, grad_rows, lse);
  const ShardSpec shard{class_offset, num_classes, true};
  const at::Tensor tgt = target.contiguous();
  if (loss_dtype(x, weight) == at::kDouble) {
    return shard_backward_impl<double>(grad_rows, x, weight, tgt, bias, class_weight,
                                       sample_weight, lse, grl_lambda, opt, shard);
  }
  return shard_backward_impl<float>(grad_rows, x, weight, tgt, bias, class_weight, sample_weight,
                                    lse, grl_lambda, opt, shard);
}

}  // namespace
}  // namespace udat

TORCH_LIBRARY_IMPL(udat_kernels, CPU, m) {
  m.impl("margin_ce_fwd", &udat::margin_ce_fwd_cpu);
  m.impl("margin_ce_bwd", &udat::margin_ce_bwd_cpu);
  m.impl("margin_ce_shard_fwd", &udat::margin_ce_shard_fwd_cpu);
  m.impl("margin_ce_shard_bwd", &udat::margin_ce_shard_bwd_cpu);
}
