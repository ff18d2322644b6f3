// The margin math of docs/math.md, once, for the CPU and CUDA backends.
//
// Every function here is a small inline host/device function on scalars, so that the C++ CPU
// kernels and the CUDA kernels compute exactly the same expressions. Accumulation type T is float
// for float32/bfloat16/float16 inputs and double for float64 inputs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define UDAT_HD __host__ __device__ __forceinline__
#else
#define UDAT_HD inline
#endif

namespace udat {

// The norm floor of F.normalize: x / max(||x||, eps).
constexpr double kNormEps = 1e-12;
// The floor under 1 - c^2 in the exact margin derivative (docs/math.md, "ψ′ and its guard").
constexpr double kSinFloor = 1e-12;

enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

// Scalars of the margin, computed once on the host in double and handed to kernels by value.
template <typename T>
struct MarginParams {
  T scale;       // s
  T cos_m;       // cos m2
  T sin_m;       // sin m2
  T threshold;   // cos(pi - m2): above it the angular branch, below it the linear one
  T linear_off;  // m2 * sin m2: the linear branch's offset
  T cos_margin;  // m3
  bool straight_through;  // psi' = 1 everywhere (insightface's behaviour)
};

inline MarginParams<double> make_margin_params(double scale, double margin, double cos_margin,
                                               bool straight_through) {
  const double pi = 3.14159265358979323846;
  MarginParams<double> p;
  p.scale = scale;
  p.cos_m = std::cos(margin);
  p.sin_m = std::sin(margin);
  p.threshold = std::cos(pi - margin);
  p.linear_off = margin * std::sin(margin);
  p.cos_margin = cos_margin;
  p.straight_through = straight_through;
  return p;
}

template <typename T>
inline MarginParams<T> cast_params(const MarginParams<double>& p) {
  return MarginParams<T>{static_cast<T>(p.scale),     static_cast<T>(p.cos_m),
                         static_cast<T>(p.sin_m),     static_cast<T>(p.threshold),
                         static_cast<T>(p.linear_off), static_cast<T>(p.cos_margin),
                         p.straight_through};
}

template <typename T>
UDAT_HD T clamp_cos(T c) {
  return c < T(-1) ? T(-1) : (c > T(1) ? T(1) : c);
}

// psi(c): the target cosine with both margins (docs/math.md, "The margin ψ"). c is clamped first.
template <typename T>
UDAT_HD T margin_psi(T c, const MarginParams<T>& p) {
  c = clamp_cos(c);
  if (c > p.threshold) {
    T sin_t = 1 - c * c;
    sin_t = sin_t > T(0) ? sin_t : T(0);
    return c * p.cos_m - std::sqrt(sin_t) * p.sin_m - p.cos_margin;
  }
  return c - p.linear_off - p.cos_margin;
}

// psi'(c) (docs/math.md, "ψ′ and its guard"); the clamp is identity for the gradient.
template <typename T>
UDAT_HD T margin_dpsi(T c, const MarginParams<T>& p) {
  if (p.straight_through) return T(1);
  c = clamp_cos(c);
  if (c > p.threshold) {
    T sin2 = 1 - c * c;
    sin2 = sin2 > T(kSinFloor) ? sin2 : T(kSinFloor);
    return p.cos_m + c * p.sin_m / std::sqrt(sin2);
  }
  return T(1);
}

// Online log-sum-exp: a partial is (m, sum) with m the largest value seen and sum = Σ exp(z - m).
// The empty partial is (-inf, 0). Non-finite values follow torch.logsumexp (docs/math.md,
// "Non-finite inputs"): a NaN anywhere makes the sum NaN for good; values equal to the maximum
// count exp(0) = 1 even when the maximum is infinite (never inf - inf); so a row with +inf
// finishes at +inf and a row of -inf at -inf.
template <typename T>
UDAT_HD void lse_push(T& m, T& sum, T z) {
  if (z > m) {
    sum = sum * std::exp(m - z) + T(1);  // m = -inf: exp(-inf) = 0, whatever z is
    m = z;
  } else if (z == m) {
    sum += T(1);
  } else {
    sum += std::exp(z - m);  // z < m, or z NaN (then the sum becomes NaN)
  }
}

// Merge two partial (max, sum) pairs, as tiles or threads finish. A NaN sum on either side
// survives whichever side holds the larger max.
template <typename T>
UDAT_HD void lse_merge(T& m, T& sum, T m2, T sum2) {
  if (m2 > m) {
    sum = sum * std::exp(m - m2) + sum2;
    m = m2;
  } else if (m2 == m) {
    sum += sum2;  // equal maxima, infinite ones included
  } else {
    sum += sum2 * std::exp(m2 - m);  // an empty partial adds 0 · 0; a NaN sum stays NaN
  }
}

// lse = m + log(sum): +inf for a row holding +inf, -inf for a row of -inf (sum >= 1 there), NaN
// for a NaN sum.
template <typename T>
UDAT_HD T lse_finish(T m, T sum) {
  return m + std::log(sum);
}

// Per-row coefficients of the loss and its gradient (docs/math.md, "Cross-entropy" and "Logit
// gradient"), with
//   wy = class weight of the target, wsum = sum of the class weights, eps = label smoothing,
//   C = number of classes. Both are independent of the column j.
template <typename T>
struct RowCoef {
  T a;        // (1 - eps) * w_y            : weight of (lse - z_y)
  T b;        // eps / C                     : weight of sum_j w_j (lse - z_j)
  T p_coef;   // a + b * wsum                : multiplies p_ij in delta
};

template <typename T>
UDAT_HD RowCoef<T> row_coef(T wy, T wsum, T smoothing, int64_t C) {
  RowCoef<T> r;
  r.a = (T(1) - smoothing) * wy;
  r.b = smoothing / T(C);
  r.p_coef = r.a + r.b * wsum;
  return r;
}

// loss_i / v_i = a (lse - z_y) + b (wsum lse - sum_j w_j z_j).
template <typename T>
UDAT_HD T row_loss(const RowCoef<T>& r, T lse, T z_y, T wsum, T wz_sum) {
  T loss = r.a * (lse - z_y);
  if (r.b != T(0)) loss += r.b * (wsum * lse - wz_sum);
  return loss;
}

// q_i / v_i of one shard of the classes (docs/math.md, "Class shards"):
// −[a z_y [owned] + b sum_{j in shard} w_j z_j], z_y read only when the shard owns the target.
template <typename T>
UDAT_HD T row_partial(const RowCoef<T>& r, T z_y, bool owned, T wz_sum) {
  T q = owned ? r.a * z_y : T(0);
  if (r.b != T(0)) q += r.b * wz_sum;
  return -q;
}

// delta_ij / k_i = p_ij * p_coef - a [j == y] - b w_j, with p_ij = exp(z_ij - lse).
template <typename T>
UDAT_HD T row_delta(const RowCoef<T>& r, T p, bool is_target, T wj) {
  T d = p * r.p_coef - r.b * wj;
  if (is_target) d -= r.a;
  return d;
}

// 1 / max(norm, eps): the factor that normalizes a row (and, for the gradient, divides by it).
template <typename T>
UDAT_HD T inv_norm(T sumsq) {
  T n = std::sqrt(sumsq);
  return T(1) / (n > T(kNormEps) ? n : T(kNormEps));
}

// Whether the norm is at least eps, i.e. whether the gradient is projected (docs/math.md,
// "Through the normalization").
template <typename T>
UDAT_HD bool norm_projects(T sumsq) {
  return std::sqrt(sumsq) >= T(kNormEps);
}

}  // namespace udat
