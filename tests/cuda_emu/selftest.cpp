// Small kernels with one defect each (and their correct twins), to show that the emulator catches
// what it claims to: test_emu_checks.py runs them through the op udat_cuda_emu::selftest.
// Compiled like csrc/cuda, through the same macros.
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/device_api.cuh"

namespace {

constexpr int kThreads = 64;

// Every thread writes its slot of a shared array, then reads its neighbour's: with `sync` the
// barrier orders the two; without it the read races with the neighbour's write.
__global__ void shared_neighbour(float* out, bool sync) {
  UDAT_SHARED(float, buf, kThreads);
  const int t = threadIdx.x;
  buf[t] = float(t);
  if (sync) __syncthreads();
  out[blockIdx.x * kThreads + t] = buf[(t + 1) % kThreads];
}

// Reads one element past the end of `in` when `off_by_one`.
__global__ void read_past_end(const float* in, float* out, int n, bool off_by_one) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[off_by_one ? i + 1 : i];
}

// A 16-byte vector load at `in + offset` (elements).
__global__ void vector_load(const float* in, float* out, int offset) {
  struct alignas(16) V {
    float v[4];
  };
  UDAT_CHECK_VECTOR_ACCESS(in + offset, sizeof(V));
  const V v = *reinterpret_cast<const V*>(in + offset);
  out[threadIdx.x] = v.v[threadIdx.x % 4];
}

// Last block done: every block writes a partial, then counts itself in; the last one adds the
// partials. Without the fence the partials of other blocks are not ordered before its reads.
__global__ void last_block_sum(float* parts, unsigned* counter, float* out, bool fence) {
  UDAT_SHARED(unsigned, ticket, 1);
  if (threadIdx.x == 0) parts[blockIdx.x] = float(blockIdx.x + 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    if (fence) __threadfence();
    ticket[0] = atomicInc(counter, gridDim.x - 1);
  }
  __syncthreads();
  if (ticket[0] != gridDim.x - 1) return;
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (unsigned b = 0; b < gridDim.x; ++b) s += parts[b];
    out[0] = s;
  }
}

// Two blocks write the same word.
__global__ void blocks_collide(float* out) {
  if (threadIdx.x == 0) out[0] = float(blockIdx.x);
}

// A warp reduction whose mask leaves out half the warp that calls it, or one that only half the
// warp reaches.
__global__ void shuffle_cases(float* out, int which) {
  float v = float(threadIdx.x);
  if (which == 0) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
  } else if (which == 1) {
    v += __shfl_xor_sync(0x0000ffffu, v, 16);  // lanes 16-31 left out of the mask they need
  } else if (threadIdx.x < 16) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);  // lanes 16-31 never arrive
  }
  out[threadIdx.x] = v;
}

// A barrier that only part of the block reaches.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Reads shared memory nobody wrote.
__global__ void uninitialized_shared(float* out) {
  UDAT_SHARED(float, buf, kThreads);
  if (threadIdx.x > 0) buf[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[0];
}

void selftest(std::string which) {
  ::udat::emu::begin_call();
  std::vector<float> in(64 + 8, 1.0f), out(256, 0.0f), parts(8, 0.0f);
  std::vector<unsigned> counter(1, 0u);
  ::udat::emu::register_buffer(in.data(), 64 * sizeof(float), "in");
  ::udat::emu::register_buffer(out.data(), out.size() * sizeof(float), "out");
  ::udat::emu::register_buffer(parts.data(), parts.size() * sizeof(float), "parts");
  ::udat::emu::register_buffer(counter.data(), sizeof(unsigned), "counter");
  cudaStream_t s = nullptr;
  if (which == "shared_sync" || which == "shared_race") {
    UDAT_LAUNCH(shared_neighbour, 2, kThreads, 0, s)(out.data(), which == "shared_sync");
  } else if (which == "in_bounds" || which == "out_of_bounds") {
    UDAT_LAUNCH(read_past_end, 1, kThreads, 0, s)(in.data(), out.data(), 64,
                                                  which == "out_of_bounds");
  } else if (which == "aligned_vector" || which == "misaligned_vector") {
    UDAT_LAUNCH(vector_load, 1, 32, 0, s)(in.data(), out.data(),
                                          which == "aligned_vector" ? 4 : 1);
  } else if (which == "fence" || which == "missing_fence") {
    UDAT_LAUNCH(last_block_sum, 8, 32, 0, s)(parts.data(), counter.data(), out.data(),
                                             which == "fence");
    TORCH_CHECK(out[0] == 36.0f, "last_block_sum: got ", out[0]);
    TORCH_CHECK(counter[0] == 0u, "last_block_sum: the counter did not wrap to 0");
  } else if (which == "blocks_collide") {
    UDAT_LAUNCH(blocks_collide, 2, 32, 0, s)(out.data());
  } else if (which == "shuffle_ok" || which == "shuffle_mask" || which == "shuffle_divergent") {
    const int k = which == "shuffle_ok" ? 0 : (which == "shuffle_mask" ? 1 : 2);
    UDAT_LAUNCH(shuffle_cases, 1, 32, 0, s)(out.data(), k);
    if (k == 0) TORCH_CHECK(out[5] == 9.0f, "shuffle: got ", out[5]);
  } else if (which == "divergent_barrier") {
    UDAT_LAUNCH(divergent_barrier, 1, kThreads, 0, s)(out.data());
  } else if (which == "uninitialized_shared") {
    UDAT_LAUNCH(uninitialized_shared, 1, kThreads, 0, s)(out.data());
  } else if (which == "gemm_ok" || which == "gemm_tf32_compute" || which == "gemm_tf32_handle") {
    // C (4×4) = A (4×8) · B (8×4), float32, through the cuBLAS stand-in.
    cublasHandle_t h = ::udat::emu::blas_handle(which == "gemm_tf32_handle");
    const float alpha = 1.0f, beta = 0.0f;
    const cublasComputeType_t compute =
        which == "gemm_tf32_compute" ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    TORCH_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 8, &alpha, in.data(), CUDA_R_32F,
                             4, in.data() + 32, CUDA_R_32F, 8, &beta, out.data(), CUDA_R_32F, 4,
                             compute, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
    TORCH_CHECK(out[0] == 8.0f, "gemm: got ", out[0]);
  } else {
    TORCH_CHECK(false, "selftest: unknown case ", which);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(udat_cuda_emu, m) { m.def("selftest(str case) -> ()", &selftest); }
