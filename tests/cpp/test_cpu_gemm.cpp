// C++ tests of the CPU row blocks' GEMMs (csrc/cpu/gemm.h), called directly: every transpose of
// either operand, accumulate or not, a leading dimension of C wider than C, odd and tile-edge
// sizes, k long enough to be split over threads, on one and on two threads, against double
// loops over the same (bf16-rounded) values.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/gemm.h"

static int failures = 0;

static uint16_t to_bf16(float f) {  // nearest even (the inputs here are finite)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static float from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Element (r, c) of op(X), X stored row-major with leading dimension ld.
template <typename T>
static T elem(const std::vector<T>& x, int64_t ld, bool trans, int64_t r, int64_t c) {
  return trans ? x[c * ld + r] : x[r * ld + c];
}

// One GEMM on random data against the double loop (kBf16: the inputs rounded to bf16 first).
template <bool kBf16>
static void check(int64_t m, int64_t n, int64_t k, bool ta, bool tb, bool accumulate,
                  int threads, std::mt19937& gen) {
  std::normal_distribution<float> normal;
  const int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 5;
  const int64_t arows = ta ? k : m, brows = tb ? n : k;
  std::vector<float> af(arows * lda), bf(brows * ldb), c0(m * ldc);
  for (auto& v : af) v = normal(gen);
  for (auto& v : bf) v = normal(gen);
  for (auto& v : c0) v = normal(gen);
  std::vector<uint16_t> a16(af.size()), b16(bf.size());
  if (kBf16) {
    for (size_t i = 0; i < af.size(); ++i) af[i] = from_bf16(a16[i] = to_bf16(af[i]));
    for (size_t i = 0; i < bf.size(); ++i) bf[i] = from_bf16(b16[i] = to_bf16(bf[i]));
  }
  std::vector<float> c = c0;
  at::set_num_threads(threads);
  if (kBf16) {
    udat::cpu::gemm_bf16(m, n, k, {a16.data(), lda, ta}, {b16.data(), ldb, tb}, c.data(), ldc,
                         accumulate);
  } else {
    udat::cpu::gemm_f32(m, n, k, {af.data(), lda, ta}, {bf.data(), ldb, tb}, c.data(), ldc,
                        accumulate);
  }
  double worst = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double ref = accumulate ? c0[i * ldc + j] : 0.0, mag = std::fabs(ref);
      for (int64_t q = 0; q < k; ++q) {
        const double p = double(elem(af, lda, ta, i, q)) * elem(bf, ldb, tb, q, j);
        ref += p;
        mag += std::fabs(p);
      }
      // float32 sums: a few ulps of the sum of magnitudes per term's position
      const double bound = 1e-6 * mag * std::sqrt(double(k) + 1) + 1e-30;
      worst = std::max(worst, std::fabs(c[i * ldc + j] - ref) / bound);
    }
  }
  // Columns past n in the rows of C stay untouched.
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = n; j < ldc; ++j) {
      if (c[i * ldc + j] != c0[i * ldc + j]) worst = 1e9;
    }
  }
  if (!(worst <= 1.0)) {
    std::printf("FAIL %s m=%lld n=%lld k=%lld ta=%d tb=%d acc=%d threads=%d: error %.3g x bound\n",
                kBf16 ? "gemm_bf16" : "gemm_f32", (long long)m, (long long)n, (long long)k, ta,
                tb, accumulate, threads, worst);
    ++failures;
  }
}

int main() {
  std::mt19937 gen(7);
  const bool bf16 = udat::cpu::bf16_gemm_available();
  if (!bf16) std::printf("no AVX-512 BF16 here: gemm_bf16 not tested\n");
  // (m, n, k): tile edges (14 × 32), odd k, packed blocks (256 pairs, 504 rows, 512 columns),
  // and k split over threads (k ≫ m, n).
  const int64_t shapes[][3] = {{1, 1, 1},     {13, 31, 3},  {14, 32, 64},  {15, 33, 7},
                               {29, 17, 515}, {600, 40, 9}, {9, 600, 20},  {20, 45, 5001},
                               {3, 2000, 33}, {2000, 3, 2}, {33, 65, 1030}};
  for (const auto& s : shapes) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      for (int threads : {1, 2}) {
        const bool acc = (t + threads) % 2 == 0;
        if (bf16) check<true>(s[0], s[1], s[2], ta, tb, acc, threads, gen);
        check<false>(s[0], s[1], s[2], ta, tb, acc, threads, gen);
      }
    }
  }
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all GEMM checks passed (fp32 GEMM: %s)\n", udat::cpu::gemm_f32_provider());
  return 0;
}
