// Vectorized row loops of the CPU epilogue (see row_kernels.h), written with GCC vector types so
// that they vectorize without -ffast-math (which would break NaN propagation), with exp as a
// polynomial on those vectors.
#include "row_kernels.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

// Vector values only cross inlined helpers of this file, so the ABI of passing them does not
// matter.
#pragma GCC diagnostic ignored "-Wpsabi"

// Three builds of every loop, the right one picked when the library loads: 16 lanes for AVX-512
// (x86-64-v4), and 8 lanes compiled twice, for x86-64-v3 (AVX2 + FMA) and the baseline x86-64
// ISA (function multi-versioning keyed on the ISA level, not on a CPU model). The 16-lane loops
// get their own entry points because GCC lowers 16-lane vectors badly without AVX-512 (about 5×
// slower than the 8-lane ones on AVX2).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define UDAT_X86_LEVELS 1
#define UDAT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#define UDAT_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define UDAT_MULTIVERSION
#endif

// Helpers are forced inline so that each entry point compiles them for its own ISA.
#define UDAT_INLINE __attribute__((always_inline)) inline

namespace udat {
namespace cpu {
namespace {

// W floats as one GCC vector: the compiler emits one register per 16 (AVX-512), 8 (AVX) or 4
// (SSE) lanes, and the lane-wise selects below keep IEEE semantics (no -ffast-math, NaN
// propagates).
template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
};
template <int W>
using VF = typename Vec<W>::f;
template <int W>
using VI = typename Vec<W>::i;

// Vector sums are flushed into a double every kFlush elements: float partial sums of at most
// kFlush / W terms keep rounding far below the test tolerance at any C.
constexpr int64_t kFlush = 1024;

template <int W>
UDAT_INLINE VF<W> load(const float* p) {
  VF<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int W>
UDAT_INLINE void store(float* p, const VF<W>& v) {
  std::memcpy(p, &v, sizeof v);
}
template <int W>
UDAT_INLINE VF<W> splat(float a) {
  return VF<W>{} + a;
}
template <int W>
UDAT_INLINE double hsum(const VF<W>& v) {
  double s = 0;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}

// exp(x) for x <= 88 to about 2 ulp (Cephes' expf): 2^n · p(r), r = x - n·ln2, |r| <= ln2/2.
// Inputs below -87.3 give 2^-126 instead of a denormal or 0, negligible beside the sum's >= 1
// term; NaN stays NaN (both clamps compare false).
template <int W>
UDAT_INLINE VF<W> exp_poly(const VF<W>& x) {
  const VF<W> lo = splat<W>(-87.3f), hi = splat<W>(88.0f);
  VF<W> xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // Round to nearest by the 1.5·2^23 trick (no SSE4.1 roundps needed).
  const VF<W> magic = splat<W>(12582912.0f);
  const VF<W> n = (xc * 1.44269504088896341f + magic) - magic;
  VF<W> r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VF<W> p = splat<W>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI<W> e = (__builtin_convertvector(n, VI<W>) + 127) << 23;
  return p * (VF<W>)e;  // a vector cast reinterprets the bits
}

template <int W>
UDAT_INLINE float exp_poly(float x) {
  return exp_poly<W>(splat<W>(x))[0];
}

template <int W>
UDAT_INLINE VF<W> widen_bf16(const uint16_t* p) {
  uint16_t h[W];
  std::memcpy(h, p, sizeof h);
  VI<W> bits;
  for (int l = 0; l < W; ++l) bits[l] = int32_t(uint32_t(h[l]) << 16);
  return (VF<W>)bits;
}

UDAT_INLINE float widen_bf16(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <int W>
UDAT_INLINE void scale_bias_impl(float* z, int64_t n, const float* col_scale, const float* bias,
                                 float row_scale) {
  if (col_scale) {
    for (int64_t j = 0; j < n; ++j) z[j] = (z[j] * row_scale) * col_scale[j];
  } else if (row_scale != 1.0f) {
    for (int64_t j = 0; j < n; ++j) z[j] *= row_scale;
  }
  if (bias) {
    for (int64_t j = 0; j < n; ++j) z[j] += bias[j];
  }
}

template <int W>
UDAT_INLINE float row_max_impl(const float* z, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  VF<W> m = splat<W>(ninf);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const VF<W> v = load<W>(z + j);
    m = v > m ? v : m;
  }
  float out = ninf;
  for (int l = 0; l < W; ++l) out = m[l] > out ? m[l] : out;
  for (; j < n; ++j) out = z[j] > out ? z[j] : out;
  return out;
}

template <int W>
UDAT_INLINE double exp_sum_impl(const float* z, int64_t n, float shift) {
  double total = 0;
  int64_t j = 0;
  while (j + W <= n) {
    VF<W> acc{};
    const int64_t stop = j + kFlush < n ? j + kFlush : n;
    for (; j + W <= stop; j += W) acc += exp_poly<W>(load<W>(z + j) - shift);
    total += hsum<W>(acc);
  }
  for (; j < n; ++j) total += exp_poly<W>(z[j] - shift);
  return total;
}

template <int W>
UDAT_INLINE double weighted_sum_impl(const float* z, int64_t n, const float* w) {
  double total = 0;
  int64_t j = 0;
  while (j + W <= n) {
    VF<W> acc{};
    const int64_t stop = j + kFlush < n ? j + kFlush : n;
    for (; j + W <= stop; j += W) acc += (w ? load<W>(w + j) : splat<W>(1.0f)) * load<W>(z + j);
    total += hsum<W>(acc);
  }
  for (; j < n; ++j) total += double(w ? w[j] : 1.0f) * z[j];
  return total;
}

template <int W>
UDAT_INLINE void add_into_impl(float* dst, const float* src, int64_t n) {
  int64_t j = 0;
  for (; j + W <= n; j += W) store<W>(dst + j, load<W>(dst + j) + load<W>(src + j));
  for (; j < n; ++j) dst[j] += src[j];
}

template <int W>
UDAT_INLINE double dot_impl(const float* a, const float* b, int64_t n) {
  double total = 0;
  int64_t j = 0;
  while (j + W <= n) {
    VF<W> acc{};
    const int64_t stop = j + kFlush < n ? j + kFlush : n;
    for (; j + W <= stop; j += W) acc += load<W>(a + j) * load<W>(b + j);
    total += hsum<W>(acc);
  }
  for (; j < n; ++j) total += double(a[j]) * b[j];
  return total;
}

template <int W>
UDAT_INLINE double sq_norm_bf16_impl(const uint16_t* w, int64_t n) {
  double total = 0;
  int64_t j = 0;
  while (j + W <= n) {
    VF<W> acc{};
    const int64_t stop = j + kFlush < n ? j + kFlush : n;
    for (; j + W <= stop; j += W) {
      const VF<W> v = widen_bf16<W>(w + j);
      acc += v * v;
    }
    total += hsum<W>(acc);
  }
  for (; j < n; ++j) total += double(widen_bf16(w[j])) * widen_bf16(w[j]);
  return total;
}

template <int W>
UDAT_INLINE void bf16_to_float_impl(const uint16_t* w, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + W <= n; j += W) store<W>(out + j, widen_bf16<W>(w + j));
  for (; j < n; ++j) out[j] = widen_bf16(w[j]);
}

template <int W>
UDAT_INLINE void softmax_grad_impl(float* z, int64_t n, float lse, float kp, float kb,
                                   const float* w, const float* col_scale) {
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    VF<W> g = kp * exp_poly<W>(load<W>(z + j) - lse) - kb * (w ? load<W>(w + j) : splat<W>(1.0f));
    if (col_scale) g *= load<W>(col_scale + j);
    store<W>(z + j, g);
  }
  for (; j < n; ++j) {
    const float g = kp * exp_poly<W>(z[j] - lse) - kb * (w ? w[j] : 1.0f);
    z[j] = col_scale ? g * col_scale[j] : g;
  }
}

// The class count as a template parameter: the per-class accumulators stay in registers.
template <int W, int C>
UDAT_INLINE double head_dots(const float* x, const float* Wc, int64_t D, double* z) {
  VF<W> acc[C] = {};
  VF<W> sq{};
  int64_t j = 0;
  for (; j + W <= D; j += W) {
    const VF<W> xv = load<W>(x + j);
    sq += xv * xv;
    for (int c = 0; c < C; ++c) acc[c] += xv * load<W>(Wc + c * D + j);
  }
  double sumsq = hsum<W>(sq);
  for (int64_t k = j; k < D; ++k) sumsq += double(x[k]) * x[k];
  for (int c = 0; c < C; ++c) {
    double s = hsum<W>(acc[c]);
    for (int64_t k = j; k < D; ++k) s += double(x[k]) * Wc[c * D + k];
    z[c] = s;
  }
  return sumsq;
}

// Pass 2 on R consecutive rows at once: each W_c and grad W_c vector is loaded (and grad W_c
// stored) once for the R rows rather than once per row; grad W_c still adds the rows in order.
template <int W, int C, int R>
UDAT_INLINE void grads_tile(const float* __restrict g, const float* __restrict h,
                            const float* __restrict f, const float* __restrict beta,
                            const float* __restrict Wc, const float* __restrict x, int64_t D,
                            float* __restrict gx, float* __restrict gW) {
  int64_t j = 0;
  for (; j + W <= D; j += W) {
    VF<W> xv[R], acc[R];
    for (int r = 0; r < R; ++r) {
      xv[r] = load<W>(x + r * D + j);
      acc[r] = -beta[r] * xv[r];
    }
    for (int c = 0; c < C; ++c) {
      const VF<W> wv = load<W>(Wc + c * D + j);
      VF<W> gw = load<W>(gW + c * D + j);
      for (int r = 0; r < R; ++r) {
        acc[r] += g[r * C + c] * wv;
        gw += h[r * C + c] * xv[r];
      }
      store<W>(gW + c * D + j, gw);
    }
    for (int r = 0; r < R; ++r) store<W>(gx + r * D + j, f[r] * acc[r]);
  }
  for (; j < D; ++j) {
    for (int r = 0; r < R; ++r) gx[r * D + j] = -beta[r] * x[r * D + j];
    for (int c = 0; c < C; ++c) {
      float gw = gW[c * D + j];
      for (int r = 0; r < R; ++r) {
        gx[r * D + j] += g[r * C + c] * Wc[c * D + j];
        gw += h[r * C + c] * x[r * D + j];
      }
      gW[c * D + j] = gw;
    }
    for (int r = 0; r < R; ++r) gx[r * D + j] *= f[r];
  }
}

constexpr int kGradRows = 4;

template <int W, int C>
UDAT_INLINE void head_grads(const float* g, const float* h, const float* f, const float* beta,
                            const float* Wc, const float* x, int64_t rows, int64_t D, float* gx,
                            float* gW) {
  int64_t r = 0;
  for (; r + kGradRows <= rows; r += kGradRows) {
    grads_tile<W, C, kGradRows>(g + r * C, h + r * C, f + r, beta + r, Wc, x + r * D, D,
                                gx + r * D, gW);
  }
  for (; r < rows; ++r) {
    grads_tile<W, C, 1>(g + r * C, h + r * C, f + r, beta + r, Wc, x + r * D, D, gx + r * D, gW);
  }
}

template <int W, template <int, int> class Fn, int C = 1>
struct HeadSwitch {
  template <typename... Args>
  UDAT_INLINE static void run(int64_t classes, Args... args) {
    if (classes == C) return Fn<W, C>::run(args...);
    if constexpr (C < kSmallHeadMax) HeadSwitch<W, Fn, C + 1>::run(classes, args...);
  }
};

template <int W, int C>
struct HeadDots {
  UDAT_INLINE static void run(const float* x, const float* Wc, int64_t D, double* z,
                              double* sumsq) {
    *sumsq = head_dots<W, C>(x, Wc, D, z);
  }
};

template <int W, int C>
struct HeadGrads {
  UDAT_INLINE static void run(const float* g, const float* h, const float* f, const float* beta,
                              const float* Wc, const float* x, int64_t rows, int64_t D, float* gx,
                              float* gW) {
    head_grads<W, C>(g, h, f, beta, Wc, x, rows, D, gx, gW);
  }
};

template <int W>
UDAT_INLINE double small_head_dots_impl(const float* x, const float* Wc, int64_t C, int64_t D,
                                        double* z) {
  double sumsq = 0;
  HeadSwitch<W, HeadDots>::run(C, x, Wc, D, z, &sumsq);
  return sumsq;
}

template <int W>
UDAT_INLINE void small_head_grads_impl(const float* g, const float* h, const float* f,
                                       const float* beta, const float* Wc, const float* x,
                                       int64_t rows, int64_t C, int64_t D, float* gx, float* gW) {
  HeadSwitch<W, HeadGrads>::run(C, g, h, f, beta, Wc, x, rows, D, gx, gW);
}

#ifdef UDAT_X86_LEVELS
// AVX-512 where the CPU and the OS support it, unless UDAT_CPU_ROW_LOOPS=avx2 (read once, at the
// first call) asks for the 8-lane loops.
bool use_16_lanes() {
  static const bool yes = [] {
    const char* env = std::getenv("UDAT_CPU_ROW_LOOPS");
    return __builtin_cpu_supports("x86-64-v4") && !(env && std::strcmp(env, "avx2") == 0);
  }();
  return yes;
}
#endif

}  // namespace

// Each entry point: an 8-lane build (multi-versioned), a 16-lane AVX-512 build, and the choice.
#ifdef UDAT_X86_LEVELS
#define UDAT_ROW_LOOP(ret, name, params, args)                           \
  UDAT_MULTIVERSION ret name##_w8 params { return name##_impl<8> args; } \
  UDAT_AVX512 ret name##_w16 params { return name##_impl<16> args; }     \
  ret name params { return use_16_lanes() ? name##_w16 args : name##_w8 args; }
#else
#define UDAT_ROW_LOOP(ret, name, params, args) \
  ret name params { return name##_impl<8> args; }
#endif

UDAT_ROW_LOOP(void, scale_bias,
              (float* z, int64_t n, const float* col_scale, const float* bias, float row_scale),
              (z, n, col_scale, bias, row_scale))
UDAT_ROW_LOOP(float, row_max, (const float* z, int64_t n), (z, n))
UDAT_ROW_LOOP(double, exp_sum, (const float* z, int64_t n, float shift), (z, n, shift))
UDAT_ROW_LOOP(double, weighted_sum, (const float* z, int64_t n, const float* w), (z, n, w))
UDAT_ROW_LOOP(void, add_into, (float* dst, const float* src, int64_t n), (dst, src, n))
UDAT_ROW_LOOP(double, dot, (const float* a, const float* b, int64_t n), (a, b, n))
UDAT_ROW_LOOP(double, sq_norm_bf16, (const uint16_t* w, int64_t n), (w, n))
UDAT_ROW_LOOP(void, bf16_to_float, (const uint16_t* w, float* out, int64_t n), (w, out, n))
UDAT_ROW_LOOP(void, softmax_grad,
              (float* z, int64_t n, float lse, float kp, float kb, const float* w,
               const float* col_scale),
              (z, n, lse, kp, kb, w, col_scale))
UDAT_ROW_LOOP(double, small_head_dots,
              (const float* x, const float* Wc, int64_t C, int64_t D, double* z),
              (x, Wc, C, D, z))
UDAT_ROW_LOOP(void, small_head_grads,
              (const float* g, const float* h, const float* f, const float* beta, const float* Wc,
               const float* x, int64_t rows, int64_t C, int64_t D, float* gx, float* gW),
              (g, h, f, beta, Wc, x, rows, C, D, gx, gW))

const char* row_loops_isa() {
#ifdef UDAT_X86_LEVELS
  if (use_16_lanes()) return "avx512";
  return __builtin_cpu_supports("x86-64-v3") ? "avx2+fma" : "baseline x86-64";
#else
  return "portable";
#endif
}

}  // namespace cpu
}  // namespace udat
