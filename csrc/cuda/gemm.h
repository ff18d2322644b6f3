// One GEMM on row-major matrices through cuBLAS, with the compute type and math mode chosen here
// rather than by torch's global switches (docs/math.md, "Precision policy for float32"): float32
// operands are multiplied in float32 (no TF32), 16-bit operands accumulate in float32, float64 in
// float64. The emulation build runs the same call against the emulator's CPU stand-in, which
// rejects a float32 GEMM asked to run with a reduced compute type or in TF32 math mode.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "host_api.h"

namespace udat {
namespace cuda {

inline cudaDataType blas_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "gemm: no cuBLAS type for ", t);
  }
  return CUDA_R_32F;
}

// c = op(a) · op(b) + beta · c, with op(m) = mᵀ where the flag says so; a, b and c are row-major
// (unit stride along a row, any row stride). c is float32 (float64 with float64 operands).
inline void gemm(const at::Tensor& a, bool ta, const at::Tensor& b, bool tb, const at::Tensor& c,
                 double beta) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "gemm: expected matrices");
  TORCH_CHECK(a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1,
              "gemm: expected row-major operands");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "gemm: operands of different dtypes");
  const int64_t m = c.size(0), n = c.size(1), k = ta ? a.size(0) : a.size(1);
  TORCH_CHECK((ta ? a.size(1) : a.size(0)) == m && (tb ? b.size(1) : b.size(0)) == k &&
                  (tb ? b.size(0) : b.size(1)) == n,
              "gemm: shapes ", a.sizes(), (ta ? "ᵀ" : ""), " · ", b.sizes(), (tb ? "ᵀ" : ""),
              " do not give ", c.sizes());
  if (m == 0 || n == 0) return;
  const bool f64 = a.scalar_type() == at::kDouble;
  TORCH_CHECK(c.scalar_type() == (f64 ? at::kDouble : at::kFloat),
              "gemm: expected a float32 (float64) result, got ", c.scalar_type());
  const cublasComputeType_t compute = f64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  cublasHandle_t handle = blas_handle();
  // torch set this thread's handle to TF32 math when its switch allows it; our GEMMs never want
  // it (and 16-bit ones no reduced-precision reductions either). torch sets the mode again the
  // next time it takes the handle.
  UDAT_CUBLAS_CHECK(cublasSetMathMode(
      handle, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                        CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  const float alpha32 = 1.0f, beta32 = static_cast<float>(beta);
  const double alpha64 = 1.0, beta64 = beta;
  const void* alpha = f64 ? static_cast<const void*>(&alpha64) : &alpha32;
  const void* betap = f64 ? static_cast<const void*>(&beta64) : &beta32;
  const cudaDataType ab_t = blas_dtype(a.scalar_type());
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: B first, and a row-major
  // matrix read column-major is its own transpose.
  UDAT_CUBLAS_CHECK(cublasGemmEx(
      handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), alpha,
      dev_ptr<const void>(b, "gemm operand B"), ab_t, static_cast<int>(b.stride(0)),
      dev_ptr<const void>(a, "gemm operand A"), ab_t, static_cast<int>(a.stride(0)), betap,
      dev_ptr<void>(c, "gemm result C"), blas_dtype(c.scalar_type()),
      static_cast<int>(c.stride(0)), compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace cuda
}  // namespace udat
