// Vectorized loops over one row of float32 logits: the inner loops of the CPU epilogue.
//
// They live in their own translation unit, compiled for AVX-512, for AVX2 and for the baseline
// x86-64 ISA, with the right one picked when the library loads, so that one binary is fast on
// current CPUs and still runs on old ones. float64 rows use the plain loops of udat_ce_cpu.cpp.
#pragma once

#include <cstdint>

namespace udat {
namespace cpu {

// z[j] = (z[j]·row_scale)·col_scale[j] (col_scale may be null: z[j]·row_scale), then
// z[j] += bias[j] (bias may be null). A row_scale of 1 leaves z[j] exactly as it was.
void scale_bias(float* z, int64_t n, const float* col_scale, const float* bias, float row_scale);

// max_j z[j]; NaN entries are skipped (a later exp propagates them).
float row_max(const float* z, int64_t n);

// Σ_j exp(z[j] - shift), accumulated in double.
double exp_sum(const float* z, int64_t n, float shift);

// Σ_j w[j] z[j] (w may be null: Σ_j z[j]), accumulated in double.
double weighted_sum(const float* z, int64_t n, const float* w);

// The logit gradient in place: z[j] = (kp·exp(z[j] - lse) - kb·w[j]) · col_scale[j], with w and
// col_scale optional (null: ones).
void softmax_grad(float* z, int64_t n, float lse, float kp, float kb, const float* w,
                  const float* col_scale);

// Σ_j a[j] b[j], accumulated in double.
double dot(const float* a, const float* b, int64_t n);

// dst[j] += src[j].
void add_into(float* dst, const float* src, int64_t n);

// Rows of bfloat16 values (their bits, uint16_t): Σ_j w[j]² accumulated in double, and the row
// widened to float32 (exact).
double sq_norm_bf16(const uint16_t* w, int64_t n);
void bf16_to_float(const uint16_t* w, float* out, int64_t n);

// Heads of at most kSmallHeadMax classes, one row of x at a time, W (C, D) row-major, in two
// passes over the row:
constexpr int64_t kSmallHeadMax = 16;

// z[c] = Σ_k x[k]·W[c, k] for every class, and Σ_k x[k]² (the row's squared norm, returned).
// The vector lanes are summed, and the terms past the last full vector accumulated, in double:
// with a few features (D = 1: every cosine is ±1) the products are exact, so a row parallel to a
// class centre still gives a cosine of exactly ±1, where ψ is ill-conditioned (sqrt(1 - c²)).
double small_head_dots(const float* x, const float* W, int64_t C, int64_t D, double* z);

// For `rows` consecutive rows r of x and gx (row stride D), with g and h (rows, C):
// gx[r, k] = f[r]·(Σ_c g[r, c]·W[c, k] − beta[r]·x[r, k]) (overwritten) and
// gW[c, k] += Σ_r h[r, c]·x[r, k], the rows added in order.
void small_head_grads(const float* g, const float* h, const float* f, const float* beta,
                      const float* W, const float* x, int64_t rows, int64_t C, int64_t D,
                      float* gx, float* gW);

// Which build of these loops runs here: "avx512", "avx2+fma" or "baseline x86-64" ("portable"
// off x86-64 Linux with GCC). UDAT_CPU_ROW_LOOPS=avx2 (read at the first call) keeps AVX-512 CPUs
// on the 8-lane loops.
const char* row_loops_isa();

}  // namespace cpu
}  // namespace udat
