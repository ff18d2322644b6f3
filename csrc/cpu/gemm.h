// The GEMMs of the CPU row blocks (docs/design.md, "The CPU kernels"), row-major throughout:
// C (m × n, leading dimension ldc) = op(A)·op(B), or C += op(A)·op(B), where op(X) is X or Xᵀ.
//
// - float32: the BLAS sgemm that ATen itself calls for a float32 at::mm, called directly so that
//   no float32 precision switch can turn it into a bfloat16 or TF32 GEMM (docs/math.md,
//   "Precision policy for float32"); at::mm itself follows them on this CPU.
// - bfloat16: a GEMM of our own on the AVX-512 BF16 dot-product instruction (bf16 products,
//   exact in float32, summed in float32) with a float32 C, which ATen does not offer fast: its
//   bf16 GEMM (oneDNN) rounds C to bf16, and the one with a float32 C is MKL's, which on this
//   AMD CPU runs no faster than the float32 GEMM. Only where the CPU has the instruction
//   (bf16_gemm_available).
#pragma once

#include <cstdint>

namespace udat {
namespace cpu {

// A matrix operand in memory: row-major with leading dimension ld, used as stored or transposed.
template <typename T>
struct MatRef {
  const T* p;
  int64_t ld;
  bool trans;  // the operand is the transpose of the stored matrix
};

// C = op(A)·op(B) (accumulate: C += ...) in float32; op(A) is m × k, op(B) is k × n.
void gemm_f32(int64_t m, int64_t n, int64_t k, MatRef<float> a, MatRef<float> b, float* c,
              int64_t ldc, bool accumulate);

// Which GEMM gemm_f32 calls: "blas sgemm", or "aten mm" where the BLAS of this torch build has no
// sgemm symbol (the precision switches can then reach it).
const char* gemm_f32_provider();

// Whether gemm_bf16 can run here: the CPU and the OS support AVX-512 F/BW/VL and AVX-512 BF16.
// UDAT_CPU_BF16_GEMM=0 makes it false (tests run the float32 fallback on such a CPU).
bool bf16_gemm_available();

// bfloat16 bits (uint16_t) in, float32 C: C = op(A)·op(B) (accumulate: C += ...). Parallel over
// at::get_num_threads() threads (serial when called inside a parallel region). Only when
// bf16_gemm_available().
void gemm_bf16(int64_t m, int64_t n, int64_t k, MatRef<uint16_t> a, MatRef<uint16_t> b, float* c,
               int64_t ldc, bool accumulate);

// Rounds a row of n floats to bfloat16 (nearest even; NaN stays NaN) in place: the bf16 values
// are written to the first 2n bytes of the row, so a block of rows of stride ld floats becomes a
// bf16 block of stride 2·ld. Only when bf16_gemm_available().
void round_row_to_bf16(float* z, int64_t n);

}  // namespace cpu
}  // namespace udat
