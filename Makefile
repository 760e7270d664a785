# One virtual environment in .venv, set up once; `make demo` and `make test` both set up first.
# TORCH selects the torch to install (this machine: the local CPU build). On a machine that
# already has a suitable torch (e.g. the GPU image), use `pip install --no-build-isolation -e .`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
CPU_RESULTS ?= benchmarks/results/cpu-$(shell date +%F)

.PHONY: setup demo test lint cuda-check bench-cpu clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q "$(TORCH)"
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation -e ".[test,triton]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m srflow demo

lint: setup
	$(VENV)/bin/ruff check flowkernels srflow tests benchmarks scripts setup.py
	$(VENV)/bin/ruff format --check flowkernels srflow tests benchmarks scripts setup.py

# sm_90 (H100/H200, the GPUs the project is measured on) in `make test`: the kernels have no
# per-arch code, and each arch adds about a minute and a half of CI; CUDA_CHECK_ARCHS="80 90" for more.
CUDA_CHECK_ARCHS ?= 90
cuda-check:
	CUDA_CHECK_ARCHS="$(CUDA_CHECK_ARCHS)" bash scripts/check_cuda_compile.sh

# The suite on TEST_WORKERS pytest-xdist processes of one torch thread each (tests that need
# several threads set them); tests sharing an expensive module fixture stay on one worker.
TEST_WORKERS ?= 2

test: setup lint cuda-check
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25
	FLOWKERNELS_BENCH_ROUNDS=3 $(PY) -m pytest benchmarks/bench_cpu_kernels.py --benchmark-only -q

# The CPU benchmarks of this machine: C++ kernels vs the reference, FlowSequence memory vs depth,
# a Markdown report with plots, all under $(CPU_RESULTS). (GPU: scripts/gpu_check.sh.)
bench-cpu: setup
	mkdir -p $(CPU_RESULTS)
	$(PY) -m pytest benchmarks/bench_cpu_kernels.py --benchmark-only -q --benchmark-json=$(CPU_RESULTS)/pytest_benchmark_cpu_kernels.json
	$(PY) -m benchmarks.bench_memory --device cpu --cond 32 --hidden 32 --batch 4 --depths 4,8,16,32,54 --sizes 16,32 --out $(CPU_RESULTS)
	$(PY) -m benchmarks.report $(CPU_RESULTS)

clean:
	rm -rf $(VENV) build flowkernels/_C*.so *.egg-info
