"""Build of flowkernels._C: C++ CPU kernels always, CUDA kernels when nvcc and a CUDA torch exist.

Sources (csrc/, flash-attention style):
  ops.cpp                      the op schemas (TORCH_LIBRARY) and the Python module
  <op>_cpu.cpp                 C++ CPU kernels + TORCH_LIBRARY_IMPL(flowkernels, CPU)
  <op>_cuda.cu                 CUDA host entry points (checks, CUDAGuard, stream, launches) +
                               TORCH_LIBRARY_IMPL(flowkernels, CUDA)
  kernels/*.cuh, kernels/*.h   torch-free device kernels and shared per-element math
The .cu files are built whenever nvcc and a CUDA build of torch are present, GPU or not. A CPU
build of torch cannot link them, so CI compiles every .cu file on its own with nvcc for sm_80 and
sm_90 (scripts/check_cuda_compile.sh).

Knobs (environment variables, nothing else is read):
  FLOWKERNELS_CUDA_ARCHS   compute capabilities, default "80;90" (A100, H100/H200)
  FLOWKERNELS_SKIP_CUDA    "1": build the CPU-only extension even where CUDA is available
  FLOWKERNELS_NVCC_THREADS nvcc --threads (architectures compiled in parallel per file), default 2
  MAX_JOBS                 parallel compile jobs (torch's ninja build honours it)

Install with `pip install --no-build-isolation -e .` so the extension is compiled against the
installed torch, or build in place with `python setup.py build_ext --inplace`.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# The C++ standard is left to torch.utils.cpp_extension (C++17 for torch 2.11, C++20 later; the
# sources keep to C++17, which scripts/check_cuda_compile.sh checks). -fopenmp:
# at::parallel_for is an OpenMP region compiled into our code. -fno-trapping-math: lets GCC
# if-convert the float selects of the CPU row loops (cpu_vec.h) so that `omp simd` vectorises
# them; nothing here reads floating-point exception flags, and NaN / Inf semantics are unchanged.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unused-function"]


def _build_cuda() -> bool:
    if os.environ.get("FLOWKERNELS_SKIP_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _arch_flags() -> list[str]:
    archs = os.environ.get("FLOWKERNELS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (a.strip() for a in archs) if a]


def _extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    depends = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/kernels/*"))
    if not _build_cuda():
        return CppExtension(
            "flowkernels._C",
            cpp_sources,
            depends=depends,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    nvcc_flags = [
        "-O3",
        "-lineinfo",
        f"--threads={os.environ.get('FLOWKERNELS_NVCC_THREADS', '2')}",
        *_arch_flags(),
    ]
    return CUDAExtension(
        "flowkernels._C",
        cpp_sources + sorted(glob.glob("csrc/*.cu")),
        depends=depends,
        define_macros=[("FLOWKERNELS_WITH_CUDA", None)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
