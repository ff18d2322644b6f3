// What the host side of the CUDA backend takes from the CUDA runtime, c10's CUDA layer and cuBLAS,
// in one place: the real ones with nvcc, the emulator's stand-ins in the emulation build
// (device_api.cuh says why). Every device buffer the host side hands to a kernel or a GEMM goes
// through dev_ptr, so that the emulation knows its bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>

#include "device_api.cuh"

#if defined(UDAT_CUDA_EMULATION)
#include <ATen/Context.h>
#else
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublas_v2.h>
#endif

namespace udat {
namespace cuda {

#if defined(UDAT_CUDA_EMULATION)
#define UDAT_CUDA_CHECK(expr)                                                                  \
  do {                                                                                         \
    const cudaError_t udat_err_ = (expr);                                                      \
    TORCH_CHECK(udat_err_ == cudaSuccess, "CUDA emulator: ", #expr, " failed: ",             \
                cudaGetErrorString(udat_err_));                                                \
  } while (0)
#define UDAT_KERNEL_LAUNCH_CHECK() ((void)0)
#define UDAT_CUBLAS_CHECK(expr)                                                                \
  TORCH_CHECK((expr) == CUBLAS_STATUS_SUCCESS, "CUDA emulator: ", #expr, " failed")

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline cublasHandle_t blas_handle() {
  return ::udat::emu::blas_handle(at::globalContext().allowTF32CuBLAS());
}
template <typename T>
T* dev_ptr(const at::Tensor& t, const char* name) {
  int64_t span = 1;  // elements from the first to one past the last, whatever the strides
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 0) span = 0;
  }
  for (int64_t d = 0; d < t.dim() && span > 0; ++d) span += (t.size(d) - 1) * t.stride(d);
  ::udat::emu::register_buffer(t.data_ptr(), size_t(span) * t.element_size(), name);
  return static_cast<T*>(t.data_ptr());
}
inline int64_t device_free_bytes() {
  size_t free_bytes = 0, total_bytes = 0;
  cudaMemGetInfo(&free_bytes, &total_bytes);
  return int64_t(free_bytes);
}
inline unsigned* counter_slots(int64_t n) {
  return static_cast<unsigned*>(::udat::emu::counter_slots(size_t(n)));
}
#else
#define UDAT_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#define UDAT_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define UDAT_CUBLAS_CHECK(expr) TORCH_CUDABLAS_CHECK(expr)

using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
// torch's cuBLAS handle of this thread, on the current stream; its math mode is torch's, which
// follows the global TF32 switch: the GEMM wrapper sets the mode its call needs.
inline cublasHandle_t blas_handle() { return at::cuda::getCurrentCUDABlasHandle(); }
template <typename T>
T* dev_ptr(const at::Tensor& t, const char*) {
  return static_cast<T*>(t.data_ptr());
}
// n zeroed counters for a kernel's last-block-done tree, which it leaves zeroed (margin_ce_cuda.cu)
unsigned* counter_slots(int64_t n);
// Device memory free for this process: the driver's free memory and what torch's caching
// allocator holds without using (margin_ce_cuda.cu).
int64_t device_free_bytes();
#endif

}  // namespace cuda
}  // namespace udat
