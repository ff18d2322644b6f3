// The Python module udat_kernels._C: importing it registers the torch.library ops (their
// definitions live in csrc/), and it reports how it was built.
#include <pybind11/pybind11.h>

#include "cpu/gemm.h"
#include "cpu/row_kernels.h"

#ifndef UDAT_VERSION
#define UDAT_VERSION "0+unknown"
#endif
#ifndef UDAT_TORCH_VERSION
#define UDAT_TORCH_VERSION "unknown"
#endif
#ifndef UDAT_CUDA_ARCHS
#define UDAT_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "udat-kernels compiled ops (registered as torch.ops.udat_kernels.*)";
  m.def("build_info", []() {
    py::dict info;
    info["version"] = UDAT_VERSION;
    info["torch"] = UDAT_TORCH_VERSION;
    info["cpu"] = true;
#ifdef UDAT_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = UDAT_CUDA_ARCHS;
#else
    info["cuda"] = false;
    info["cuda_archs"] = "";
#endif
    return info;
  }, "How this extension was compiled: version, torch, cpu, cuda, cuda_archs.");
  m.def("cpu_kernels", []() {
    py::dict info;
    info["row_loops"] = udat::cpu::row_loops_isa();
    info["bf16_gemm"] = udat::cpu::bf16_gemm_available() ? "avx512_bf16" : "none";
    info["fp32_gemm"] = udat::cpu::gemm_f32_provider();
    return info;
  }, "What the CPU kernels run on this machine: row_loops (avx512, avx2+fma, baseline x86-64), "
     "bf16_gemm (avx512_bf16, or none: bf16 inputs then take the float32 GEMMs) and fp32_gemm.");
}
