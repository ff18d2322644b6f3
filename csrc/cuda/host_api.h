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
#endif

}  // namespace cuda
}  // namespace udat
