#!/usr/bin/env bash
# Compile-check every csrc/*.cu with nvcc for sm_80 and sm_90 and syntax-check every csrc/*.cpp,
# at C++17, warnings as errors (DESIGN.md 7: "every .cu file compiles in CI with nvcc"; C++17
# because torch 2.11 builds extensions so). Works with a CPU build of torch: only its headers
# are needed, and the one CUDA-build header they lack (c10/cuda/impl/cuda_cmake_macros.h) is
# skipped with C10_CUDA_NO_CMAKE_CONFIGURE_FILE. Flags follow torch.utils.cpp_extension's CUDA
# build (its COMMON_NVCC_FLAGS) at C++17, plus -Werror all-warnings, host -Wall -Werror,
# and ptxas spill warnings; the per-kernel register / spill report is written to
# build/cuda_check/<file>.log. Files compile in parallel (CUDA_CHECK_JOBS, default 2).
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), NVCC (default: nvcc
# on PATH, else /usr/local/cuda/bin/nvcc), CUDA_CHECK_ARCHS (default "80 90"), CUDA_CHECK_STD
# (default c++17).
# Exit status: 0 if every file compiled cleanly, 1 otherwise (also when nothing was found).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [[ ! -x "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 1
fi

# Include paths and torch's nvcc flags, from the installed torch.
mapfile -t TORCH_INFO < <("$PYTHON" - <<'EOF'
from torch.utils import cpp_extension as ce
print(" ".join(f"-isystem {p}" for p in ce.include_paths()))
print(" ".join(ce.COMMON_NVCC_FLAGS))
EOF
)
read -r -a INCLUDES <<< "${TORCH_INFO[0]}"
read -r -a TORCH_FLAGS <<< "${TORCH_INFO[1]}"
# C++17, the oldest standard a supported torch builds extensions with (torch 2.11's
# cpp_extension passes -std=c++17, later ones -std=c++20): code that needs C++20 would pass
# here with a newer torch and fail to build with 2.11.
STD=${CUDA_CHECK_STD:-c++17}

GENCODE=()
for arch in ${CUDA_CHECK_ARCHS:-80 90}; do
  GENCODE+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done

FLAGS=(
  -c -O3 "-std=${STD}" "${GENCODE[@]}" "${TORCH_FLAGS[@]}"
  -Werror all-warnings -Xcompiler -Wall,-Werror -Xptxas -warn-spills --resource-usage
  -DFLOWKERNELS_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  "${INCLUDES[@]}"
)

shopt -s nullglob
CU_SOURCES=(csrc/*.cu csrc/kernels/*.cu)
CPP_SOURCES=(csrc/*.cpp)
if [[ ${#CU_SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no .cu files found under csrc/" >&2
  exit 1
fi
SOURCES=("${CU_SOURCES[@]}" "${CPP_SOURCES[@]}")

# Largest first (a proxy for compile time): the longest compile starts at once instead of last,
# alone on one core.
mapfile -t SOURCES < <(ls -S "${SOURCES[@]}")

OUT_DIR=build/cuda_check
mkdir -p "$OUT_DIR"
echo "check_cuda_compile: $("$NVCC" --version | tail -1)"
echo "check_cuda_compile: archs ${CUDA_CHECK_ARCHS:-80 90}, -std=${STD}, torch headers from $("$PYTHON" -c 'import torch; print(torch.__version__)')"

# The C++ sources are syntax-checked at the same standard with the host compiler (the test
# setup builds them, but with the installed torch's standard).
CXX_FLAGS=(
  -fsyntax-only "-std=${STD}" -fopenmp -Wall -Werror -DFLOWKERNELS_WITH_CUDA
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H "${INCLUDES[@]}"
  -isystem "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
)

# One file: compile, then print one line (and the compiler's messages on failure).
compile_one() {
  local src=$1 name start kernels
  name=$(basename "$src")
  start=$SECONDS
  if [[ $src == *.cpp ]]; then
    if "${CXX:-g++}" "$src" "${CXX_FLAGS[@]}" > "$OUT_DIR/$name.log" 2>&1; then
      echo "  ok    $src ($((SECONDS - start)) s, C++ syntax)"
      return 0
    fi
  elif "$NVCC" "$src" -o "$OUT_DIR/$name.o" "${FLAGS[@]}" > "$OUT_DIR/$name.log" 2>&1; then
    kernels=$(grep -c "Compiling entry function" "$OUT_DIR/$name.log" || true)
    echo "  ok    $src ($((SECONDS - start)) s, $kernels kernel compilations over all archs)"
    return 0
  fi
  echo "  FAIL  $src ($((SECONDS - start)) s):"
  grep -v "^ptxas info" "$OUT_DIR/$name.log" | sed 's/^/        /' | head -60
  return 1
}

# Background subshells (forks) see FLAGS; at most CUDA_CHECK_JOBS at a time.
status=0
pids=()
for src in "${SOURCES[@]}"; do
  while [[ $(jobs -rp | wc -l) -ge ${CUDA_CHECK_JOBS:-2} ]]; do sleep 1; done
  compile_one "$src" > "$OUT_DIR/$(basename "$src").status" &
  pids+=($!)
done
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then status=1; fi
  cat "$OUT_DIR/$(basename "${SOURCES[$i]}").status"
done

if [[ $status -ne 0 ]]; then
  echo "check_cuda_compile: FAILED"
  exit 1
fi
echo "check_cuda_compile: all ${#CU_SOURCES[@]} .cu files compiled for archs ${CUDA_CHECK_ARCHS:-80 90} and ${#CPP_SOURCES[@]} C++ sources checked, ${STD}, without warnings"
