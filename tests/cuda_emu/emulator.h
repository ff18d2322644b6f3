// The checking CUDA emulator: what csrc/cuda/device_api.cuh and csrc/cuda/host_api.h map the
// CUDA built-ins, the runtime and cuBLAS to when the CUDA sources are compiled as host C++
// (UDAT_CUDA_EMULATION). The kernels run from their own sources; nothing here is a copy of them.
//
// Each CUDA thread is a fiber of the calling OS thread. Threads switch only at __syncthreads, at
// warp collectives (shuffles, votes), at atomics and when they exit, in an order drawn from a
// seeded generator: a seeded permutation of the threads between barriers, and blocks interleaved
// at barriers and atomics. Every load and store of the emulated code (compiled with the
// compiler's thread-sanitizer instrumentation, whose hooks emulator.cpp implements) is checked:
// bounds of every buffer the host side registered, natural alignment, vector alignment
// (check_vector_access), data races on shared and global memory between barriers (accesses of
// different blocks count as ordered only through a __threadfence and an atomic), reads of
// shared memory never written. The first violation aborts the launch with an exception that says
// what, where, which block and thread, and the seed. docs/design.md, "Running the CUDA kernels on
// the CPU", says what is and is not modelled.
#pragma once

#include <math.h>  // the float overloads of exp, log, isinf, ... at global scope, as nvcc has them

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA qualifiers and built-in types --------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// ---- runtime types and calls the host side uses --------------------------------------------------
typedef struct udat_emu_stream* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream);

namespace udat {
namespace emu {
cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value);
cudaError_t occupancy(int* blocks, const void* fn, int threads, size_t smem);
}  // namespace emu
}  // namespace udat

template <typename F>
cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  return ::udat::emu::func_set_attribute(reinterpret_cast<const void*>(fn), attr, value);
}
template <typename F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F* fn, int threads,
                                                          size_t smem) {
  return ::udat::emu::occupancy(blocks, reinterpret_cast<const void*>(fn), threads, smem);
}

// ---- cuBLAS: the GEMM stand-in -------------------------------------------------------------------
typedef struct udat_emu_blas* cublasHandle_t;
enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
typedef cudaDataType_t cudaDataType;
enum cublasComputeType_t {
  CUBLAS_COMPUTE_16F = 64,
  CUBLAS_COMPUTE_16F_PEDANTIC = 65,
  CUBLAS_COMPUTE_32F = 68,
  CUBLAS_COMPUTE_32F_PEDANTIC = 69,
  CUBLAS_COMPUTE_64F = 70,
  CUBLAS_COMPUTE_64F_PEDANTIC = 71,
  CUBLAS_COMPUTE_32F_FAST_16F = 74,
  CUBLAS_COMPUTE_32F_FAST_16BF = 75,
  CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
};
enum cublasMath_t {
  CUBLAS_DEFAULT_MATH = 0,
  CUBLAS_TENSOR_OP_MATH = 1,
  CUBLAS_PEDANTIC_MATH = 2,
  CUBLAS_TF32_TENSOR_OP_MATH = 3,
  CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16,
};
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode);
cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode);
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo);

// ---- the emulator's own interface ----------------------------------------------------------------
namespace udat {
namespace emu {

uint3 thread_idx();  // by value: the emulator's own memory is not the kernel's
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

// Shared memory of the running block: the k-th static declaration a thread reaches is the block's
// k-th array; the dynamic one is sized by the launch.
void* static_shared_bytes(size_t bytes, size_t align);
void* dynamic_shared_bytes(size_t align);
template <typename T>
T* static_shared(size_t n) {
  return static_cast<T*>(static_shared_bytes(n * sizeof(T), alignof(T)));
}
template <typename T>
T* dynamic_shared(size_t align) {
  return static_cast<T*>(dynamic_shared_bytes(align));
}

// A vector load or store of `bytes` at p: p must be aligned to `bytes` (x86 would not mind).
void check_vector_access(const void* p, size_t bytes);

enum CollectiveKind : int { kShflIdx = 1, kShflXor, kShflDown, kShflUp, kBallot };
// A warp collective of the calling lane; `site` names the call ("file:line"): every lane the
// mask names must reach the same one.
void collective(int kind, unsigned mask, const void* in, void* out, size_t size, int arg,
                int width, const char* site);
void syncthreads_at(const char* site);
const char* site_name(const char* file, int line);  // an interned "file:line"
void threadfence();
enum AtomicOp : int { kAtomicAdd = 1, kAtomicInc, kAtomicExch, kAtomicCas, kAtomicMax };
// *p op= v atomically on `size` bytes of `type` (0 unsigned, 1 signed, 2 float); returns the old
// value in `old`.
void atomic(int op, void* p, size_t size, int type, const void* v, const void* compare,
            void* old);

// The kernel's own code starts: from here on its accesses are checked.
void kernel_body_begins();

// Runs entry(ctx) as every thread of every block of a grid; throws on the first violation.
void run_grid(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem,
              void (*entry)(void*), void* ctx);

// Host side: a device buffer handed to a kernel or GEMM, valid until the next begin_call().
void register_buffer(const void* p, size_t bytes, const char* name);
void begin_call();
// The cuBLAS handle of the calling thread, in the math mode torch's own handle would have
// (TF32 when torch allows it): host code must set the mode its GEMMs need.
cublasHandle_t blas_handle(bool tf32_allowed);
// The stream-ordered counters the kernels use for last-block-done: zeroed device memory.
void* counter_slots(size_t count);

// Configuration and the log of launches and GEMMs (tests/cuda_emu reads them through ops).
void set_config(const std::string& key, int64_t value);
int64_t get_config(const std::string& key);
std::string log_json();
void clear_log();

template <typename... P>
class Launcher {
 public:
  Launcher(const char* name, void (*fn)(P...), dim3 grid, dim3 block, size_t smem)
      : name_(name), fn_(fn), grid_(grid), block_(block), smem_(smem) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(P), "kernel launched with the wrong arity");
    Packed packed(std::forward<Args>(args)...);
    Ctx ctx{fn_, &packed};
    run_grid(name_, reinterpret_cast<const void*>(fn_), grid_, block_, smem_, &entry, &ctx);
  }

 private:
  using Packed = std::tuple<std::decay_t<P>...>;
  struct Ctx {
    void (*fn)(P...);
    const Packed* packed;
  };
  static void entry(void* p) {
    const Ctx* ctx = static_cast<const Ctx*>(p);
    void (*fn)(P...) = ctx->fn;
    Packed local = *ctx->packed;  // the launch's arguments, copied into this thread's own frame
    kernel_body_begins();
    std::apply(fn, local);
  }
  const char* name_;
  void (*fn_)(P...);
  dim3 grid_, block_;
  size_t smem_;
};

template <typename... P, typename G, typename B>
Launcher<P...> launcher(const char* name, void (*fn)(P...), G grid, B block, size_t smem,
                        cudaStream_t) {
  return Launcher<P...>(name, fn, dim3(grid), dim3(block), smem);
}

}  // namespace emu
}  // namespace udat

// ---- kernel built-ins -----------------------------------------------------------------------------
#define threadIdx (::udat::emu::thread_idx())
#define blockIdx (::udat::emu::block_idx())
#define blockDim (::udat::emu::block_dim())
#define gridDim (::udat::emu::grid_dim())

// A barrier's call site names it in reports, and threads of a block must meet at the same one.
#define __syncthreads() ::udat::emu::syncthreads_at(::udat::emu::site_name(__FILE__, __LINE__))

inline void __threadfence() { ::udat::emu::threadfence(); }

// Each collective is named by its call site (__builtin_FILE/LINE of the caller).
#define UDAT_EMU_SITE const char* file = __builtin_FILE(), int line = __builtin_LINE()

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, UDAT_EMU_SITE) {
  T out;
  ::udat::emu::collective(::udat::emu::kShflXor, mask, &v, &out, sizeof(T), lane_mask, width,
                          ::udat::emu::site_name(file, line));
  return out;
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, UDAT_EMU_SITE) {
  T out;
  ::udat::emu::collective(::udat::emu::kShflIdx, mask, &v, &out, sizeof(T), src_lane, width,
                          ::udat::emu::site_name(file, line));
  return out;
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, UDAT_EMU_SITE) {
  T out;
  ::udat::emu::collective(::udat::emu::kShflDown, mask, &v, &out, sizeof(T), int(delta), width,
                          ::udat::emu::site_name(file, line));
  return out;
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, UDAT_EMU_SITE) {
  T out;
  ::udat::emu::collective(::udat::emu::kShflUp, mask, &v, &out, sizeof(T), int(delta), width,
                          ::udat::emu::site_name(file, line));
  return out;
}
inline unsigned __ballot_sync(unsigned mask, int pred, UDAT_EMU_SITE) {
  unsigned out = 0;
  const int p = pred != 0;
  ::udat::emu::collective(::udat::emu::kBallot, mask, &p, &out, sizeof(int), 0, 32,
                          ::udat::emu::site_name(file, line));
  return out;
}
#undef UDAT_EMU_SITE

namespace udat {
namespace emu {
template <typename T>
constexpr int atomic_type() {
  return std::is_floating_point_v<T> ? 2 : (std::is_signed_v<T> ? 1 : 0);
}
template <typename T>
T atomic_rmw(int op, T* p, T v, T compare = T()) {
  T old;
  atomic(op, p, sizeof(T), atomic_type<T>(), &v, &compare, &old);
  return old;
}
}  // namespace emu
}  // namespace udat

template <typename T>
T atomicAdd(T* p, T v) {
  return ::udat::emu::atomic_rmw(::udat::emu::kAtomicAdd, p, v);
}
inline unsigned atomicInc(unsigned* p, unsigned v) {
  return ::udat::emu::atomic_rmw(::udat::emu::kAtomicInc, p, v);
}
template <typename T>
T atomicExch(T* p, T v) {
  return ::udat::emu::atomic_rmw(::udat::emu::kAtomicExch, p, v);
}
template <typename T>
T atomicCAS(T* p, T compare, T v) {
  return ::udat::emu::atomic_rmw(::udat::emu::kAtomicCas, p, v, compare);
}
template <typename T>
T atomicMax(T* p, T v) {
  return ::udat::emu::atomic_rmw(::udat::emu::kAtomicMax, p, v);
}
