"""Builds udat_kernels._C: the C++ CPU kernels always, the CUDA kernels where they can be built.

Environment switches (read at build time):
  UDAT_FORCE_CPU=1    skip the CUDA sources even where a toolkit and a CUDA torch are present
  UDAT_FORCE_CUDA=1   build the CUDA sources even where no toolkit/CUDA torch was detected
  UDAT_CUDA_ARCHS     compute capabilities, ";"-separated (default "8.0;9.0"); each -gencode is
                      added only where the installed nvcc supports that arch
  CUDA_HOME           the CUDA toolkit; otherwise found from `nvcc` on PATH, which may be a
                      wrapper script around the real compiler
  MAX_JOBS            parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _toolkit_from_nvcc(nvcc: str) -> str | None:
    """The toolkit root behind an nvcc, following a wrapper script if nvcc is one."""
    real = Path(nvcc).resolve()
    if real.parent.name == "bin" and (real.parent.parent / "include" / "cuda.h").exists():
        return str(real.parent.parent)
    try:
        text = real.read_text(errors="ignore")[:4096]
    except OSError:
        return None
    # A wrapper names the real compiler: exec /opt/cuda-X/bin/nvcc "$@"
    for match in re.finditer(r"(/[^\s\"']+)/bin/nvcc\b", text):
        root = Path(match.group(1))
        if (root / "include" / "cuda.h").exists():
            return str(root)
    return None


def find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_from_nvcc(nvcc)
        if root:
            return root
    for candidate in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if Path(candidate, "bin", "nvcc").exists():
            return candidate
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: resolve it first.
CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def version() -> str:
    text = (ROOT / "udat_kernels" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def supported_archs(nvcc: str) -> set[str]:
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {m.group(1) for m in re.finditer(r"compute_(\d+a?)", out.stdout)}


def gencode_flags(archs: list[str], nvcc: str) -> tuple[list[str], list[str]]:
    """-gencode flags for the archs nvcc supports, and the archs it kept."""
    known = supported_archs(nvcc)
    flags, kept = [], []
    for arch in archs:
        num = arch.replace(".", "")
        if known and num not in known:
            print(f"udat-kernels: nvcc does not support sm_{num}; skipped", file=sys.stderr)
            continue
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        kept.append(arch)
    if kept:  # PTX of the newest arch, for GPUs newer than the list
        num = kept[-1].replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags, kept


def nvidia_include_dirs() -> list[str]:
    """Headers of the nvidia-* wheels that come with a CUDA torch (cuBLAS, cuSPARSE, ...), which a
    bare toolkit may lack and ATen's CUDA headers include."""
    dirs = []
    for site in sys.path:
        for pkg in ("cu[0-9]*", "cublas", "cusparse", "cusolver", "curand", "cufft"):
            dirs += glob.glob(os.path.join(site, "nvidia", pkg, "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def build_cuda() -> bool:
    if _flag("UDAT_FORCE_CPU"):
        return False
    if _flag("UDAT_FORCE_CUDA"):
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


def extension():
    with_cuda = build_cuda()
    sources = [
        "csrc/udat_ce.cpp",
        "csrc/margin_ce_autograd.cpp",
        "csrc/cpu/udat_ce_cpu.cpp",
        "csrc/cpu/row_kernels.cpp",
        "csrc/cpu/gemm.cpp",
        "csrc/cpu/gemm_bf16.cpp",
        "python/module.cpp",
    ]
    defines = [
        ("UDAT_VERSION", f'"{version()}"'),
        ("UDAT_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    # at::parallel_for is an OpenMP loop compiled into the caller: without -fopenmp it runs on
    # one thread. The libgomp.so.1 it links resolves to the one torch has already loaded.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    include_dirs = [str(ROOT / "csrc")]
    archs: list[str] = []
    if not with_cuda:
        print(f"udat-kernels: building CPU kernels only (CUDA_HOME={CUDA_HOME}, "
              f"torch.version.cuda={torch.version.cuda})", file=sys.stderr)
        return CppExtension("udat_kernels._C", sources, include_dirs=include_dirs,
                            define_macros=defines, extra_compile_args={"cxx": cxx},
                            extra_link_args=link), archs
    nvcc = os.path.join(CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")
    requested = [a for a in os.environ.get("UDAT_CUDA_ARCHS", "8.0;9.0").split(";") if a.strip()]
    gencode, archs = gencode_flags([a.strip() for a in requested], nvcc)
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    defines += [("UDAT_WITH_CUDA", None), ("UDAT_CUDA_ARCHS", f'"{";".join(archs)}"')]
    include_dirs += nvidia_include_dirs()
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *gencode]
    print(f"udat-kernels: building CPU + CUDA kernels (CUDA_HOME={CUDA_HOME}, archs={archs})",
          file=sys.stderr)
    return CUDAExtension("udat_kernels._C", sources, include_dirs=include_dirs,
                         define_macros=defines,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags},
                         extra_link_args=link), archs


ext, _archs = extension()

setup(
    version=version(),
    packages=find_packages(include=["udat_kernels", "udat_kernels.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
