// The bfloat16 GEMM with a float32 C (see gemm.h), on the AVX-512 BF16 instruction vdpbf16ps:
// each lane adds the two products of a pair of bf16 values (exact in float32) to a float32 sum.
//
// Layout (the usual packed GEMM): both operands are copied, a block at a time, into pairs along
// k — one uint32 holds op(X)[.., 2q] in its low half and op(X)[.., 2q + 1] in its high half, the
// last pair of an odd k padded with a zero — so that any transpose of either operand costs only
// its packing. The micro-kernel keeps a kMR × kNR tile of C in 28 registers; per pair it loads
// two vectors of B and broadcasts one pair of A per row. The work is split over threads along the
// largest of m, n and k (k: each thread sums its share into a private C, then the shares are
// added in thread order).
#include "gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define UDAT_BF16_KERNEL 1
#include <immintrin.h>
#endif

namespace udat {
namespace cpu {

#ifdef UDAT_BF16_KERNEL

namespace {

constexpr int kMR = 14;             // rows of the C tile
constexpr int kNV = 2;              // 16-float vectors across the C tile
constexpr int kNR = 16 * kNV;       // columns of the C tile
constexpr int64_t kKC = 256;        // pairs of k per packed block (512 values of k)
constexpr int64_t kMC = 36 * kMR;   // rows of A packed at once when B is streamed
constexpr int64_t kNC = 16 * kNR;   // columns of B packed at once when A is streamed

using Ref = MatRef<uint16_t>;

// The pair (k, k + 1) of a contiguous row, zero-padded past its end (at n).
inline uint32_t pair_of_row(const uint16_t* row, int64_t kk, int64_t n) {
  uint32_t lo = row[kk], hi = kk + 1 < n ? row[kk + 1] : 0;
  return lo | (hi << 16);
}

// The packing loops, one pair at a time: the edges the vector loops below leave (a last group of
// fewer than 16 pairs, an odd k).
//   gather: dst[q·stride + r] = pair q of contiguous row r (rows [0, rows), pairs [q0, q1))
//   interleave: dst[q·stride + r] = (lo[r], hi[r]) for the two stored rows of pair q
void gather_pairs(const uint16_t* p, int64_t ld, int64_t rows, int64_t k, int64_t q0,
                  int64_t q1, int64_t qbase, uint32_t* dst, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = p + r * ld;
    for (int64_t q = q0; q < q1; ++q) dst[(q - qbase) * stride + r] = pair_of_row(row, 2 * q, k);
  }
}

// GCC 12 takes the undefined first operand inside the AVX-512 unpack intrinsics for an
// uninitialized variable.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

// 16 × 16 transpose of 32-bit elements: v[i][j] becomes v[j][i].
inline void transpose16(__m512i v[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each 128-bit lane now holds a 4 × 4 block; move the blocks.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    v[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    v[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Pairs q in [q0, q0 + nq) of `rows` (≤ 16) contiguous rows, 16 pairs at a time by a transpose,
// into dst[(q - q0)·stride + lane + r] (rows past `rows` are zero).
void gather_rows16(const uint16_t* p, int64_t ld, int64_t rows, int64_t k, int64_t q0,
                   int64_t nq, uint32_t* dst, int64_t stride, int64_t lane) {
  const __mmask16 keep = __mmask16((1u << rows) - 1);
  int64_t q = q0;
  // A group of 16 pairs reads 32 values of k from each row: only where they all exist.
  for (; q + 16 <= q0 + nq && 2 * (q + 16) <= k; q += 16) {
    __m512i v[16];
    for (int r = 0; r < 16; ++r) {
      v[r] = r < rows ? _mm512_loadu_si512(p + r * ld + 2 * q) : _mm512_setzero_si512();
    }
    transpose16(v);
    for (int j = 0; j < 16; ++j) {
      _mm512_mask_storeu_epi32(dst + (q - q0 + j) * stride + lane, keep, v[j]);
    }
  }
  gather_pairs(p, ld, rows, k, q, q0 + nq, q0, dst + lane, stride);
}

// Pair q (stored rows 2q and 2q + 1, the second zero past k) of `cols` (≤ 16) consecutive
// columns, interleaved, into dst[(q - q0)·stride + lane + c].
void interleave16(const uint16_t* p, int64_t ld, int64_t cols, int64_t k, int64_t q0, int64_t nq,
                  uint32_t* dst, int64_t stride, int64_t lane) {
  const __mmask32 in = __mmask32((uint64_t(1) << cols) - 1);
  const __mmask16 out = __mmask16((1u << cols) - 1);
  // (lo[0], hi[0], lo[1], hi[1], ...): index c of lo, 32 + c of hi.
  alignas(64) static const uint16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37,
                                                 6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11, 43,
                                                 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx = _mm512_load_si512(order);
  for (int64_t q = q0; q < q0 + nq; ++q) {
    const int64_t kk = 2 * q;
    const __m512i lo = _mm512_maskz_loadu_epi16(in, p + kk * ld);
    const __m512i hi = kk + 1 < k ? _mm512_maskz_loadu_epi16(in, p + (kk + 1) * ld)
                                  : _mm512_setzero_si512();
    _mm512_mask_storeu_epi32(dst + (q - q0) * stride + lane, out,
                             _mm512_permutex2var_epi16(lo, idx, hi));
  }
}

// op(A) rows [i0, i0 + mr) × pairs [q0, q0 + nq) into dst[q][r] (kMR per pair; rows past mr 0).
void pack_a(const Ref& a, int64_t k, int64_t i0, int64_t mr, int64_t q0, int64_t nq,
            uint32_t* dst) {
  if (mr < kMR) std::memset(dst, 0, sizeof(uint32_t) * kMR * nq);
  if (!a.trans) {  // stored m × k: the pairs of each row are contiguous
    gather_rows16(a.p + i0 * a.ld, a.ld, mr, k, q0, nq, dst, kMR, 0);
  } else {  // stored k × m: a pair takes the same column of two consecutive stored rows
    interleave16(a.p + i0, a.ld, mr, k, q0, nq, dst, kMR, 0);
  }
}

// op(B) columns [j0, j0 + nr) × pairs [q0, q0 + nq) into dst[q][j] (kNR per pair; columns past
// nr 0).
void pack_b(const Ref& b, int64_t k, int64_t j0, int64_t nr, int64_t q0, int64_t nq,
            uint32_t* dst) {
  if (nr < kNR) std::memset(dst, 0, sizeof(uint32_t) * kNR * nq);
  for (int64_t h = 0; h < kNR && h < nr; h += 16) {
    const int64_t cols = std::min<int64_t>(16, nr - h);
    if (b.trans) {  // stored n × k: each column of op(B) is a contiguous stored row
      gather_rows16(b.p + (j0 + h) * b.ld, b.ld, cols, k, q0, nq, dst, kNR, h);
    } else {  // stored k × n: interleave two consecutive stored rows
      interleave16(b.p + j0 + h, b.ld, cols, k, q0, nq, dst, kNR, h);
    }
  }
}

// C tile (kMR × kNR at c, stride ldc) = (accumulate ? C : 0) + Σ_q a[q]·b[q].
void micro_kernel(int64_t nq, const uint32_t* __restrict a, const uint32_t* __restrict b,
                  float* c, int64_t ldc, bool accumulate) {
  __m512 acc[kMR][kNV];
  for (int r = 0; r < kMR; ++r) {
    for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < nq; ++q) {
    __m512bh bv[kNV];
    for (int v = 0; v < kNV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + q * kNR + 16 * v);
#pragma GCC unroll 14
    for (int r = 0; r < kMR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(a[q * kMR + r]));
      for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < kMR; ++r) {
    for (int v = 0; v < kNV; ++v) {
      float* p = c + r * ldc + 16 * v;
      _mm512_storeu_ps(p, accumulate ? _mm512_add_ps(_mm512_loadu_ps(p), acc[r][v]) : acc[r][v]);
    }
  }
}

void round_row(float* z, int64_t n) {
  uint16_t* out = reinterpret_cast<uint16_t*>(z);
  int64_t j = 0;
  // Each step reads 16 floats before writing 16 bf16 at half their offset: the writes never
  // reach a float not yet read.
  for (; j + 16 <= n; j += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(z + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)h);
  }
  if (j < n) {
    const __mmask16 mask = __mmask16((1u << (n - j)) - 1);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, z + j));
    _mm256_mask_storeu_epi16(out + j, mask, (__m256i)h);
  }
}

#pragma GCC pop_options

// A tile at the edge of C: computed in full into a local tile, then its valid part stored.
void edge_tile(int64_t nq, const uint32_t* a, const uint32_t* b, float* c, int64_t ldc,
               int64_t mr, int64_t nr, bool accumulate) {
  alignas(64) float tile[kMR * kNR];
  micro_kernel(nq, a, b, tile, kNR, false);
  for (int64_t r = 0; r < mr; ++r) {
    for (int64_t j = 0; j < nr; ++j) {
      c[r * ldc + j] = accumulate ? c[r * ldc + j] + tile[r * kNR + j] : tile[r * kNR + j];
    }
  }
}

struct Problem {
  int64_t m, n, k;
  Ref a, b;
};

// C[m0:m1, n0:n1] (at c, which points at element (m0, n0), stride ldc) over the pairs
// [q0, q1). Each block of kKC pairs packs one operand for the whole range (the smaller side)
// and streams the other through it in micro-panels.
void compute_range(const Problem& pr, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                   int64_t q0, int64_t q1, float* c, int64_t ldc, bool accumulate) {
  const bool stream_b = (n1 - n0) >= (m1 - m0);
  std::vector<uint32_t> big, small;
  for (int64_t qb = q0; qb < q1 || (qb == q0 && q0 == q1); qb += kKC) {
    const int64_t nq = std::min(kKC, q1 - qb);
    const bool acc = accumulate || qb > q0;
    if (stream_b) {
      for (int64_t mb = m0; mb < m1; mb += kMC) {
        const int64_t me = std::min(m1, mb + kMC), blocks = (me - mb + kMR - 1) / kMR;
        big.resize(size_t(blocks * kMR * std::max<int64_t>(nq, 1)));
        for (int64_t t = 0; t < blocks; ++t) {
          pack_a(pr.a, pr.k, mb + t * kMR, std::min<int64_t>(kMR, me - mb - t * kMR), qb, nq,
                 big.data() + t * kMR * nq);
        }
        small.resize(size_t(kNR * std::max<int64_t>(nq, 1)));
        for (int64_t j = n0; j < n1; j += kNR) {
          const int64_t nr = std::min<int64_t>(kNR, n1 - j);
          pack_b(pr.b, pr.k, j, nr, qb, nq, small.data());
          for (int64_t t = 0; t < blocks; ++t) {
            const int64_t i = mb + t * kMR, mr = std::min<int64_t>(kMR, me - i);
            float* ct = c + (i - m0) * ldc + (j - n0);
            if (mr == kMR && nr == kNR) {
              micro_kernel(nq, big.data() + t * kMR * nq, small.data(), ct, ldc, acc);
            } else {
              edge_tile(nq, big.data() + t * kMR * nq, small.data(), ct, ldc, mr, nr, acc);
            }
          }
        }
      }
    } else {
      for (int64_t nb = n0; nb < n1; nb += kNC) {
        const int64_t ne = std::min(n1, nb + kNC), panels = (ne - nb + kNR - 1) / kNR;
        big.resize(size_t(panels * kNR * std::max<int64_t>(nq, 1)));
        for (int64_t t = 0; t < panels; ++t) {
          pack_b(pr.b, pr.k, nb + t * kNR, std::min<int64_t>(kNR, ne - nb - t * kNR), qb, nq,
                 big.data() + t * kNR * nq);
        }
        small.resize(size_t(kMR * std::max<int64_t>(nq, 1)));
        for (int64_t i = m0; i < m1; i += kMR) {
          const int64_t mr = std::min<int64_t>(kMR, m1 - i);
          pack_a(pr.a, pr.k, i, mr, qb, nq, small.data());
          for (int64_t t = 0; t < panels; ++t) {
            const int64_t j = nb + t * kNR, nr = std::min<int64_t>(kNR, ne - j);
            float* ct = c + (i - m0) * ldc + (j - n0);
            if (mr == kMR && nr == kNR) {
              micro_kernel(nq, small.data(), big.data() + t * kNR * nq, ct, ldc, acc);
            } else {
              edge_tile(nq, small.data(), big.data() + t * kNR * nq, ct, ldc, mr, nr, acc);
            }
          }
        }
      }
    }
    if (q0 == q1) break;  // k = 0: one pass that writes zeros (or leaves C)
  }
}

// [0, total) in `parts` ranges aligned to `align`: the begin of part p.
int64_t split(int64_t total, int64_t parts, int64_t align, int64_t p) {
  const int64_t units = (total + align - 1) / align;
  return std::min(total, (units * p / parts) * align);
}

}  // namespace

bool bf16_gemm_available() {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bf16");
  const char* env = std::getenv("UDAT_CPU_BF16_GEMM");
  return cpu && !(env && std::strcmp(env, "0") == 0);
}

void round_row_to_bf16(float* z, int64_t n) { round_row(z, n); }

void gemm_bf16(int64_t m, int64_t n, int64_t k, MatRef<uint16_t> a, MatRef<uint16_t> b, float* c,
               int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  const Problem pr{m, n, k, a, b};
  const int64_t pairs = (k + 1) / 2;
  const int64_t threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  // Along k when it dwarfs m and n (grad x of the row blocks: k = classes), each thread into a
  // private C; otherwise along the larger of m and n, each thread writing its own part of C.
  const bool split_k = threads > 1 && pairs >= 4 * kKC * threads && k >= 8 * std::max(m, n) &&
                       m * n * threads <= (int64_t(16) << 20);
  if (split_k) {
    // Thread 0 sums into C itself, the others into private parts added afterwards in order.
    std::vector<float> part(size_t(m * n * (threads - 1)));
    at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t qa = split(pairs, threads, 1, t), qb = split(pairs, threads, 1, t + 1);
        if (t == 0) {
          compute_range(pr, 0, m, 0, n, qa, qb, c, ldc, accumulate);
        } else {
          compute_range(pr, 0, m, 0, n, qa, qb, part.data() + (t - 1) * m * n, n, false);
        }
      }
    });
    at::parallel_for(0, m, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        for (int64_t t = 1; t < threads; ++t) {
          const float* pi = part.data() + ((t - 1) * m + i) * n;
          float* ci = c + i * ldc;
          for (int64_t j = 0; j < n; ++j) ci[j] += pi[j];
        }
      }
    });
    return;
  }
  const bool along_n = n >= m;
  const int64_t extent = along_n ? n : m, align = along_n ? kNR : kMR;
  const int64_t parts = std::max<int64_t>(1, std::min(threads, extent / (4 * align)));
  at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b0 = split(extent, parts, align, t), b1 = split(extent, parts, align, t + 1);
      if (b0 == b1) continue;
      if (along_n) {
        compute_range(pr, 0, m, b0, b1, 0, pairs, c + b0, ldc, accumulate);
      } else {
        compute_range(pr, b0, b1, 0, n, 0, pairs, c + b0 * ldc, ldc, accumulate);
      }
    }
  });
}

#else  // no AVX-512 BF16 kernel in this build

bool bf16_gemm_available() { return false; }
void round_row_to_bf16(float*, int64_t) {}
void gemm_bf16(int64_t, int64_t, int64_t, MatRef<uint16_t>, MatRef<uint16_t>, float*, int64_t,
               bool) {}

#endif

}  // namespace cpu
}  // namespace udat
