// Vectorized row loops of the CPU epilogue (see row_kernels.h), written with GCC vector types so
// that they vectorize without -ffast-math (which would break NaN propagation), with exp as a
// polynomial on those vectors.
#include "row_kernels.h"

#include <cstdint>
#include <cstring>
#include <limits>

// v8f values only cross inlined helpers of this file, so the ABI of passing them does not matter.
#pragma GCC diagnostic ignored "-Wpsabi"

// Two builds of every loop: x86-64-v3 (AVX2 + FMA) and the baseline x86-64 ISA, picked by CPU
// features when the library loads (function multi-versioning keyed on the ISA level, not on a
// CPU model).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define UDAT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define UDAT_MULTIVERSION
#endif

// Helpers are forced inline so that each cloned entry point compiles them for its own ISA.
#define UDAT_INLINE __attribute__((always_inline)) inline

namespace udat {
namespace cpu {
namespace {

// Eight floats as one GCC vector: the compiler emits one AVX register or two SSE ones, and the
// lane-wise selects below keep IEEE semantics (no -ffast-math, NaN propagates).
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int64_t kW = 8;
// Vector sums are flushed into a double every kFlush elements: float partial sums of at most
// kFlush / kW terms keep rounding far below the test tolerance at any C.
constexpr int64_t kFlush = 1024;

UDAT_INLINE v8f load(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
UDAT_INLINE void store(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
UDAT_INLINE v8f splat(float a) { return v8f{} + a; }
UDAT_INLINE double hsum(v8f v) {
  double s = 0;
  for (int l = 0; l < kW; ++l) s += v[l];
  return s;
}

// exp(x) for x <= 88 to about 2 ulp (Cephes' expf): 2^n · p(r), r = x - n·ln2, |r| <= ln2/2.
// Inputs below -87.3 give 2^-126 instead of a denormal or 0, negligible beside the sum's >= 1
// term; NaN stays NaN (both clamps compare false).
UDAT_INLINE v8f exp_poly(v8f x) {
  const v8f lo = splat(-87.3f), hi = splat(88.0f);
  v8f xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // Round to nearest by the 1.5·2^23 trick (no SSE4.1 roundps needed).
  const v8f magic = splat(12582912.0f);
  const v8f n = (xc * 1.44269504088896341f + magic) - magic;
  v8f r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v8f p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  return p * (v8f)e;  // a vector cast reinterprets the bits
}

UDAT_INLINE float exp_poly(float x) {
  v8f v = splat(x);
  return exp_poly(v)[0];
}

}  // namespace

UDAT_MULTIVERSION
void scale_bias(float* z, int64_t n, const float* col_scale, const float* bias, float row_scale) {
  if (col_scale) {
    for (int64_t j = 0; j < n; ++j) z[j] = (z[j] * row_scale) * col_scale[j];
  } else if (row_scale != 1.0f) {
    for (int64_t j = 0; j < n; ++j) z[j] *= row_scale;
  }
  if (bias) {
    for (int64_t j = 0; j < n; ++j) z[j] += bias[j];
  }
}

UDAT_MULTIVERSION
float row_max(const float* z, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  v8f m = splat(ninf);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const v8f v = load(z + j);
    m = v > m ? v : m;
  }
  float out = ninf;
  for (int l = 0; l < kW; ++l) out = m[l] > out ? m[l] : out;
  for (; j < n; ++j) out = z[j] > out ? z[j] : out;
  return out;
}

UDAT_MULTIVERSION
double exp_sum(const float* z, int64_t n, float shift) {
  double total = 0;
  int64_t j = 0;
  while (j + kW <= n) {
    v8f acc{};
    const int64_t stop = j + kFlush < n ? j + kFlush : n;
    for (; j + kW <= stop; j += kW) acc += exp_poly(load(z + j) - shift);
    total += hsum(acc);
  }
  for (; j < n; ++j) total += exp_poly(z[j] - shift);
  return total;
}

UDAT_MULTIVERSION
double weighted_sum(const float* z, int64_t n, const float* w) {
  double total = 0;
  int64_t j = 0;
  while (j + kW <= n) {
    v8f acc{};
    const int64_t stop = j + kFlush < n ? j + kFlush : n;
    for (; j + kW <= stop; j += kW) acc += (w ? load(w + j) : splat(1.0f)) * load(z + j);
    total += hsum(acc);
  }
  for (; j < n; ++j) total += double(w ? w[j] : 1.0f) * z[j];
  return total;
}

UDAT_MULTIVERSION
void add_into(float* dst, const float* src, int64_t n) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) store(dst + j, load(dst + j) + load(src + j));
  for (; j < n; ++j) dst[j] += src[j];
}

UDAT_MULTIVERSION
double dot(const float* a, const float* b, int64_t n) {
  double total = 0;
  int64_t j = 0;
  while (j + kW <= n) {
    v8f acc{};
    const int64_t stop = j + kFlush < n ? j + kFlush : n;
    for (; j + kW <= stop; j += kW) acc += load(a + j) * load(b + j);
    total += hsum(acc);
  }
  for (; j < n; ++j) total += double(a[j]) * b[j];
  return total;
}

namespace {

UDAT_INLINE v8f widen_bf16(const uint16_t* p) {
  uint16_t h[kW];
  std::memcpy(h, p, sizeof h);
  v8i bits;
  for (int l = 0; l < kW; ++l) bits[l] = int32_t(uint32_t(h[l]) << 16);
  return (v8f)bits;
}

UDAT_INLINE float widen_bf16(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace

UDAT_MULTIVERSION
double sq_norm_bf16(const uint16_t* w, int64_t n) {
  double total = 0;
  int64_t j = 0;
  while (j + kW <= n) {
    v8f acc{};
    const int64_t stop = j + kFlush < n ? j + kFlush : n;
    for (; j + kW <= stop; j += kW) {
      const v8f v = widen_bf16(w + j);
      acc += v * v;
    }
    total += hsum(acc);
  }
  for (; j < n; ++j) total += double(widen_bf16(w[j])) * widen_bf16(w[j]);
  return total;
}

UDAT_MULTIVERSION
void bf16_to_float(const uint16_t* w, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) store(out + j, widen_bf16(w + j));
  for (; j < n; ++j) out[j] = widen_bf16(w[j]);
}

namespace {

// The class count as a template parameter: the per-class accumulators stay in registers.
template <int C>
UDAT_INLINE double head_dots(const float* x, const float* W, int64_t D, double* z) {
  v8f acc[C] = {};
  v8f sq{};
  int64_t j = 0;
  for (; j + kW <= D; j += kW) {
    const v8f xv = load(x + j);
    sq += xv * xv;
    for (int c = 0; c < C; ++c) acc[c] += xv * load(W + c * D + j);
  }
  double sumsq = hsum(sq);
  for (int64_t k = j; k < D; ++k) sumsq += double(x[k]) * x[k];
  for (int c = 0; c < C; ++c) {
    double s = hsum(acc[c]);
    for (int64_t k = j; k < D; ++k) s += double(x[k]) * W[c * D + k];
    z[c] = s;
  }
  return sumsq;
}

// Pass 2 on R consecutive rows at once: each W_c and grad W_c vector is loaded (and grad W_c
// stored) once for the R rows rather than once per row; grad W_c still adds the rows in order.
template <int C, int R>
UDAT_INLINE void grads_tile(const float* __restrict g, const float* __restrict h,
                            const float* __restrict f, const float* __restrict beta,
                            const float* __restrict W, const float* __restrict x, int64_t D,
                            float* __restrict gx, float* __restrict gW) {
  int64_t j = 0;
  for (; j + kW <= D; j += kW) {
    v8f xv[R], acc[R];
    for (int r = 0; r < R; ++r) {
      xv[r] = load(x + r * D + j);
      acc[r] = -beta[r] * xv[r];
    }
    for (int c = 0; c < C; ++c) {
      const v8f wv = load(W + c * D + j);
      v8f gw = load(gW + c * D + j);
      for (int r = 0; r < R; ++r) {
        acc[r] += g[r * C + c] * wv;
        gw += h[r * C + c] * xv[r];
      }
      store(gW + c * D + j, gw);
    }
    for (int r = 0; r < R; ++r) store(gx + r * D + j, f[r] * acc[r]);
  }
  for (; j < D; ++j) {
    for (int r = 0; r < R; ++r) gx[r * D + j] = -beta[r] * x[r * D + j];
    for (int c = 0; c < C; ++c) {
      float gw = gW[c * D + j];
      for (int r = 0; r < R; ++r) {
        gx[r * D + j] += g[r * C + c] * W[c * D + j];
        gw += h[r * C + c] * x[r * D + j];
      }
      gW[c * D + j] = gw;
    }
    for (int r = 0; r < R; ++r) gx[r * D + j] *= f[r];
  }
}

constexpr int kGradRows = 4;

template <int C>
UDAT_INLINE void head_grads(const float* g, const float* h, const float* f, const float* beta,
                            const float* W, const float* x, int64_t rows, int64_t D, float* gx,
                            float* gW) {
  int64_t r = 0;
  for (; r + kGradRows <= rows; r += kGradRows) {
    grads_tile<C, kGradRows>(g + r * C, h + r * C, f + r, beta + r, W, x + r * D, D, gx + r * D,
                             gW);
  }
  for (; r < rows; ++r) {
    grads_tile<C, 1>(g + r * C, h + r * C, f + r, beta + r, W, x + r * D, D, gx + r * D, gW);
  }
}

template <template <int> class Fn, int C = 1>
struct HeadSwitch {
  template <typename... Args>
  UDAT_INLINE static void run(int64_t classes, Args... args) {
    if (classes == C) return Fn<C>::run(args...);
    if constexpr (C < kSmallHeadMax) HeadSwitch<Fn, C + 1>::run(classes, args...);
  }
};

template <int C>
struct HeadDots {
  UDAT_INLINE static void run(const float* x, const float* W, int64_t D, double* z,
                              double* sumsq) {
    *sumsq = head_dots<C>(x, W, D, z);
  }
};

template <int C>
struct HeadGrads {
  UDAT_INLINE static void run(const float* g, const float* h, const float* f, const float* beta,
                              const float* W, const float* x, int64_t rows, int64_t D, float* gx,
                              float* gW) {
    head_grads<C>(g, h, f, beta, W, x, rows, D, gx, gW);
  }
};

}  // namespace

UDAT_MULTIVERSION
double small_head_dots(const float* x, const float* W, int64_t C, int64_t D, double* z) {
  double sumsq = 0;
  HeadSwitch<HeadDots>::run(C, x, W, D, z, &sumsq);
  return sumsq;
}

UDAT_MULTIVERSION
void small_head_grads(const float* g, const float* h, const float* f, const float* beta,
                      const float* W, const float* x, int64_t rows, int64_t C, int64_t D,
                      float* gx, float* gW) {
  HeadSwitch<HeadGrads>::run(C, g, h, f, beta, W, x, rows, D, gx, gW);
}

UDAT_MULTIVERSION
void softmax_grad(float* z, int64_t n, float lse, float kp, float kb, const float* w,
                  const float* col_scale) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    v8f g = kp * exp_poly(load(z + j) - lse) - kb * (w ? load(w + j) : splat(1.0f));
    if (col_scale) g *= load(col_scale + j);
    store(z + j, g);
  }
  for (; j < n; ++j) {
    const float g = kp * exp_poly(z[j] - lse) - kb * (w ? w[j] : 1.0f);
    z[j] = col_scale ? g * col_scale[j] : g;
  }
}

}  // namespace cpu
}  // namespace udat
