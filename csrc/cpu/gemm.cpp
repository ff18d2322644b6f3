// The float32 GEMM of the CPU row blocks (see gemm.h): the BLAS sgemm behind ATen, called
// directly, so that the float32 precision switches (which send at::mm to a bf16 oneDNN GEMM on
// CPUs with bf16 units) cannot reach it.
#include "gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>

// Fortran BLAS, as torch's CPU BLAS wrapper declares it (32-bit integers). Weak: a torch build
// whose BLAS lacks it still loads, and gemm_f32 then falls back to at::mm.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace udat {
namespace cpu {
namespace {

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

at::Tensor view(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::kFloat);
}

}  // namespace

const char* gemm_f32_provider() { return sgemm_ ? "blas sgemm" : "aten mm"; }

void gemm_f32(int64_t m, int64_t n, int64_t k, MatRef<float> a, MatRef<float> b, float* c,
              int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (sgemm_ && fits_int(m) && fits_int(n) && fits_int(k) && fits_int(a.ld) && fits_int(b.ld) &&
      fits_int(ldc)) {
    // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and the column-major view
    // of a stored row-major matrix is its transpose: each operand keeps its own flag.
    const char ta = a.trans ? 'T' : 'N', tb = b.trans ? 'T' : 'N';
    const int M = int(n), N = int(m), K = int(k);
    // Leading dimensions of the column-major views, at least 1 for empty operands.
    const int ld_b = int(std::max<int64_t>(1, b.ld)), ld_a = int(std::max<int64_t>(1, a.ld));
    const int ld_c = int(std::max<int64_t>(1, ldc));
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    sgemm_(&tb, &ta, &M, &N, &K, &alpha, b.p, &ld_b, a.p, &ld_a, &beta, c, &ld_c);
    return;
  }
  at::Tensor A = a.trans ? view(a.p, k, m, a.ld).t() : view(a.p, m, k, a.ld);
  at::Tensor B = b.trans ? view(b.p, n, k, b.ld).t() : view(b.p, k, n, b.ld);
  at::Tensor C = view(c, m, n, ldc);
  if (accumulate) {
    C.addmm_(A, B);
  } else {
    at::mm_out(C, A, B);
  }
}

}  // namespace cpu
}  // namespace udat
