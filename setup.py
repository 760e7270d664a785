"""Build of flowkernels._C: C++ CPU kernels always, CUDA kernels when nvcc and a CUDA torch exist.

Knobs (environment variables, nothing else is read):
  FLOWKERNELS_CUDA_ARCHS   compute capabilities, default "80;90" (A100, H100/H200)
  FLOWKERNELS_SKIP_CUDA    "1": build the CPU-only extension even where CUDA is available
  MAX_JOBS                 parallel compile jobs (torch's ninja build honours it)

Install with `pip install --no-build-isolation -e .` so the extension is compiled against the
installed torch. Without a CUDA toolkit or with a CPU build of torch the .cu files are skipped
here; CI compile-checks them on their own (scripts/check_cuda_compile.sh).
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _build_cuda() -> bool:
    if os.environ.get("FLOWKERNELS_SKIP_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _arch_flags() -> list[str]:
    archs = os.environ.get("FLOWKERNELS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]


def _extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function"]
    if not _build_cuda():
        return CppExtension(
            "flowkernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", *_arch_flags()]
    return CUDAExtension(
        "flowkernels._C",
        cpp_sources + sorted(glob.glob("csrc/*.cu")),
        define_macros=[("FLOWKERNELS_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
