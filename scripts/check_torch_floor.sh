#!/usr/bin/env bash
# The compile and level-batching tests under the oldest torch the project supports (2.11, the GPU
# machine's), on the CPU, with the C++ extension built by that torch (C++17) and Triton's compile
# tests in triton 3.6's interpreter.
#
#   bash scripts/check_torch_floor.sh [pytest args...]   (default: the compile and batching tests;
#                                                        `tests`: the whole suite, ~5 min on 2 cores)
#
# Why: Dynamo and cpp_extension change between torch versions, and CI has torch 2.13 only. Three
# faults passed CI and failed under 2.11 (2026-12-04): a C++20 requires-clause (2.11 builds
# extensions as C++17), bool() of a list in traced code, and a memory-saving unit output
# updated in place under no_grad, whose gradient 2.11's Dynamo dropped. Run it before a GPU
# lease and after changing traced code. Not part of CI: it needs pip to find FLOOR_TORCH.
#
# Environment: FLOOR_TORCH (default torch==2.11.0), FLOOR_VENV (default .venv-floor; created once),
# FLOOR_TREE (default build/floor-tree: a copy of the tracked files, so that its extension build
# does not replace the one in the working tree), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$(realpath -m "${FLOOR_VENV:-.venv-floor}")
TREE=$(realpath -m "${FLOOR_TREE:-build/floor-tree}")

if [[ ! -x $VENV/bin/python ]]; then
  python3 -m venv "$VENV"
  # triton 3.6 as on the GPU machine; numpy < 2.3: its interpreter fails on numpy 2.4 (a
  # 1-element array as a loop bound), and on the GPU Triton runs compiled
  "$VENV/bin/pip" install -q "${FLOOR_TORCH:-torch==2.11.0}" triton==3.6.0 "numpy<2.3" ninja setuptools \
    "pytest<9.2" pytest-xdist pytest-benchmark scikit-image pillow safetensors tqdm pyyaml matplotlib
fi
echo "check_torch_floor: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"

rm -rf "$TREE"
mkdir -p "$TREE"
git ls-files -z | xargs -0 cp --parents -t "$TREE"
cd "$TREE"
FLOWKERNELS_SKIP_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py -q build_ext --inplace
ARGS=(tests/test_srflow_compile.py tests/test_compile.py tests/test_cond_batching.py tests/test_triton_compile.py)
[[ $# -gt 0 ]] && ARGS=("$@")
OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup "${ARGS[@]}"
echo "check_torch_floor: passed ($ROOT at $(git -C "$ROOT" rev-parse --short HEAD), working tree's tracked files)"
