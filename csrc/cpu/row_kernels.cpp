// Vectorized row loops of the CPU epilogue (see row_kernels.h). The loops are written with
// fixed-width lane arrays so that the compiler vectorizes them without -ffast-math (which would
// break NaN propagation), and exp is a polynomial the compiler can vectorize, unlike std::exp.
#include "row_kernels.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define UDAT_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#else
#define UDAT_MULTIVERSION
#endif

namespace udat {
namespace cpu {
namespace {

constexpr int kLanes = 16;
// Lane sums are flushed into a double every kFlush elements: float partial sums of at most
// kFlush / kLanes terms keep float32 rounding far below the test tolerance at any C.
constexpr int64_t kFlush = 1024;

// exp(x) for x <= 88 to about 2 ulp (Cephes' expf): 2^n · p(r), r = x - n·ln2, |r| <= ln2/2.
// Inputs below -87.3 give 2^-126 instead of a denormal or 0, negligible beside the sum's >= 1
// term; NaN stays NaN (both clamps compare false).
inline float exp_poly(float x) {
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  // Round to nearest by the 1.5·2^23 trick: vectorizes without SSE4.1's roundps.
  const float magic = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  return p * std::bit_cast<float>(static_cast<uint32_t>(e) << 23);
}

}  // namespace

UDAT_MULTIVERSION
void scale_bias(float* z, int64_t n, const float* col_scale, const float* bias) {
  if (col_scale) {
    for (int64_t j = 0; j < n; ++j) z[j] *= col_scale[j];
  }
  if (bias) {
    for (int64_t j = 0; j < n; ++j) z[j] += bias[j];
  }
}

UDAT_MULTIVERSION
float row_max(const float* z, int64_t n) {
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] = z[j + l] > lanes[l] ? z[j + l] : lanes[l];
  }
  float m = -std::numeric_limits<float>::infinity();
  for (; j < n; ++j) m = z[j] > m ? z[j] : m;
  for (int l = 0; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

UDAT_MULTIVERSION
double exp_sum(const float* z, int64_t n, float shift) {
  double total = 0;
  int64_t j = 0;
  while (j + kLanes <= n) {
    float lanes[kLanes] = {};
    const int64_t stop = j + kFlush < n ? j + kFlush : n;
    for (; j + kLanes <= stop; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += exp_poly(z[j + l] - shift);
    }
    for (int l = 0; l < kLanes; ++l) total += lanes[l];
  }
  for (; j < n; ++j) total += exp_poly(z[j] - shift);
  return total;
}

UDAT_MULTIVERSION
double weighted_sum(const float* z, int64_t n, const float* w) {
  double total = 0;
  int64_t j = 0;
  while (j + kLanes <= n) {
    float lanes[kLanes] = {};
    const int64_t stop = j + kFlush < n ? j + kFlush : n;
    for (; j + kLanes <= stop; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += (w ? w[j + l] : 1.0f) * z[j + l];
    }
    for (int l = 0; l < kLanes; ++l) total += lanes[l];
  }
  for (; j < n; ++j) total += double(w ? w[j] : 1.0f) * z[j];
  return total;
}

UDAT_MULTIVERSION
void softmax_grad(float* z, int64_t n, float lse, float kp, float kb, const float* w,
                  const float* col_scale) {
  if (w && col_scale) {
    for (int64_t j = 0; j < n; ++j) z[j] = (kp * exp_poly(z[j] - lse) - kb * w[j]) * col_scale[j];
  } else if (col_scale) {
    for (int64_t j = 0; j < n; ++j) z[j] = (kp * exp_poly(z[j] - lse) - kb) * col_scale[j];
  } else if (w) {
    for (int64_t j = 0; j < n; ++j) z[j] = kp * exp_poly(z[j] - lse) - kb * w[j];
  } else {
    for (int64_t j = 0; j < n; ++j) z[j] = kp * exp_poly(z[j] - lse) - kb;
  }
}

}  // namespace cpu
}  // namespace udat
