// What the CUDA kernels take from the CUDA toolchain, in one place, so that the same kernel sources
// compile two ways:
//   - with nvcc: the CUDA built-ins themselves;
//   - as host C++ with UDAT_CUDA_EMULATION defined: the checking emulator of tests/cuda_emu, which
//     runs every CUDA thread as a fiber and checks races, bounds and alignment (docs/design.md,
//     "Running the CUDA kernels on the CPU").
// Kernels declare shared memory and launch through the macros below, and load or store vectors
// through load_vec / store_vec (cuda_common.cuh), whose alignment the emulator checks.
#pragma once

#if defined(UDAT_CUDA_EMULATION)
#include "emulator.h"  // tests/cuda_emu, on the include path of the emulation build only

// A static __shared__ array of n T's; the dynamic (extern __shared__) one, aligned to `align`.
#define UDAT_SHARED(T, name, n) T* const name = ::udat::emu::static_shared<T>(n)
#define UDAT_DYNAMIC_SHARED(T, name, align) T* const name = ::udat::emu::dynamic_shared<T>(align)
// kernel<<<grid, block, smem, stream>>>(args...) is written UDAT_LAUNCH(kernel, ...)(args...).
#define UDAT_LAUNCH(kernel, grid, block, smem, stream) \
  ::udat::emu::launcher(#kernel, kernel, grid, block, smem, stream)
#define UDAT_CHECK_VECTOR_ACCESS(p, bytes) ::udat::emu::check_vector_access(p, bytes)
// A load that bypasses L1 (another block's data, published through a fence and an atomic).
#define UDAT_LOAD_CG(p) (*(p))
#else
#include <cuda_runtime.h>

#define UDAT_SHARED(T, name, n) __shared__ T name[n]
#define UDAT_DYNAMIC_SHARED(T, name, align) extern __shared__ __align__(align) T name[]
#define UDAT_LAUNCH(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (stream)>>>
#define UDAT_CHECK_VECTOR_ACCESS(p, bytes) ((void)0)
#define UDAT_LOAD_CG(p) __ldcg(p)
#endif
