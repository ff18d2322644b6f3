// The Python module udat_kernels._C: importing it registers the torch.library ops (their
// definitions live in csrc/), and it reports how it was built.
#include <pybind11/pybind11.h>

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
}
