#!/usr/bin/env bash
# GPU check: build the CUDA extension, run the GPU tests, run the benchmarks, write JSON.
#
#   bash scripts/gpu_check.sh [build|target|test|host|target-bf16|ops|stack|memory|srflow|lvlbatch|compiled|report|all]...
#
# Stages run in that order (default: all), most wanted first, so that a call cut short by a lease
# still returns what is owed: the build, then `target` (the training step of the README's GPU
# targets: df2k-4x, batch 16, fp32, eager, captured as a CUDA graph, compiled as CUDA graphs), the GPU
# tests, host overhead, the same step with bf16 subnets, then the rest.
# Logs and JSON accumulate in $WORK (default /tmp/gpu-run, so stages can run as separate calls
# on one machine; the build stays in the tree). $OUT gets one tarball of all of it, gpu-run.tgz,
# renewed every 20 s and after each stage, so that a call stopped at its time limit still brings
# back what it did, and status.txt (each stage's exit code). The device tool brings back at most
# 8 files: the JSON files are in the tarball, not beside it. Meant for one H100/H200 with torch
# + CUDA installed (Python 3.12, torch 2.11+cu130, triton 3.6, nvcc 13.0).
# DEADLINE (seconds from the start): no stage starts after it, and a running stage is stopped at
# it (`timeout`); skipped and stopped stages are named in status.txt, and the exit status is 2
# where stages were cut and none failed. For a lease's call with a 540 s limit: DEADLINE=500.
# To fit a short lease: TARGET_SECONDS, SRFLOW_SECONDS, LVLBATCH_SECONDS, COMPILED_SECONDS (time
# budgets), TARGET_VARIANTS, TARGET_BF16_VARIANTS, COMPILED_VARIANTS / COMPILED_BATCHES (points),
# TEST_WORKERS (xdist).
# Stage times on an H200 (2026-12-04): build ~70 s, the kernel test matrix ~65 s on 8 workers,
# host's eager part < 80 s, one df2k-4x step compiled with reduce-overhead > 2 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-/tmp/gpu-run}"
OUT="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$WORK" "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
status=0  # 1: a stage failed
cut=0     # 1: a stage was skipped or stopped at DEADLINE

snapshot() {  # $WORK so far as $OUT/gpu-run.tgz, replaced whole (never half-written)
    # one temporary per process (the 20 s loop and a finished stage may snapshot at once); tar's
    # exit 1 is "a log changed while read", which still leaves a valid archive
    local part="$OUT/gpu-run.tgz.part.$BASHPID"
    tar czf "$part" -C "$WORK" . 2>/dev/null
    if [ $? -le 1 ]; then mv -f "$part" "$OUT/gpu-run.tgz"; else rm -f "$part"; fi
}
(while sleep 20; do snapshot; done) >/dev/null 2>&1 &
snapshots=$!
trap 'kill $snapshots 2>/dev/null; rm -f "$OUT"/gpu-run.tgz.part.*' EXIT  # a killed loop leaves its temporary

run() {  # run NAME CMD...: log to $WORK/NAME.log, keep going on failure, remember it
    local name=$1; shift
    local left=""
    if [ -n "${DEADLINE:-}" ]; then
        left=$((DEADLINE - SECONDS))
        if [ "$left" -lt 5 ]; then
            echo "=== $name: skipped (DEADLINE=$DEADLINE s reached)"
            echo "$name: skipped (deadline)" >> "$WORK/status.txt"
            cp "$WORK/status.txt" "$OUT/status.txt"
            cut=1
            return
        fi
    fi
    echo "=== $name: $*"
    local t0=$SECONDS
    if [ -n "$left" ]; then
        timeout --kill-after=10 "$left" "$@" 2>&1 | tee "$WORK/$name.log"
    else
        "$@" 2>&1 | tee "$WORK/$name.log"
    fi
    local rc=${PIPESTATUS[0]}
    local what="exit $rc"
    # timeout's exit statuses, where the deadline was reached (a 137 before it is, e.g., the OOM killer)
    if [ -n "$left" ] && { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "$SECONDS" -ge $((DEADLINE - 1)) ]; then
        what="stopped at the deadline"
        cut=1
    elif [ "$rc" -ne 0 ]; then
        status=1
    fi
    echo "=== $name: $what after $((SECONDS - t0)) s"
    echo "$name: $what after $((SECONDS - t0)) s" >> "$WORK/status.txt"
    cp "$WORK/status.txt" "$OUT/status.txt"
    snapshot
}

want() { [[ " ${stages[*]} " == *" $1 "* || " ${stages[*]} " == *" all "* ]]; }

target() {  # target NAME VARIANTS: the step of the README's GPU targets (df2k-4x, batch 16,
    # 160x160, RRDB frozen), training only (one compile each: sampling compiles in the compiled
    # stage); each variant in its own process (a failed capture or compile cannot touch the next
    # one) and folder, $WORK/NAME/VARIANT; warmup_s holds the compile time (-capture: the warm-up
    # steps and the capture), the JSON is rewritten after each measurement
    local variant
    for variant in ${2//,/ }; do
        mkdir -p "$WORK/$1/$variant"
        run "bench-srflow-$1-$variant" "$PY" -m benchmarks.bench_srflow --out "$WORK/$1/$variant" \
            --variants "$variant" --batches 16 --steps 10 --sample-batch 0 --max-seconds "${TARGET_SECONDS:-300}"
    done
}

if want build; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/gpu.txt"
    run build env MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-deps --no-build-isolation -q -e .
    # fails where setup.py found no CUDA and built the C++ kernels only (the cuda backend's GPU
    # tests would then skip, and "auto" pick triton, with every stage green)
    run build-check "$PY" -c "import flowkernels._loader as loader; m = loader.load_extension(); print('with_cuda', m.with_cuda); assert m.with_cuda, 'flowkernels._C was built without CUDA'"
fi
if want target; then
    # fp32: the official maths and the memory-saving step eager; both captured whole as CUDA
    # graphs by hand (no compile: seconds); then compiled with reduce-overhead (CUDA graphs of
    # Inductor's kernels, fused Adam beside them: a compile of many minutes, last)
    target target "${TARGET_VARIANTS:-official,ms-cuda,ms-cuda-capture,official-capture,ms-cuda-graph}"
fi
if want test; then
    # TRITON_INTERPRET=0: the Triton kernels run compiled (tests/conftest.py defaults to the interpreter)
    # The model-level tests (CUDA-graph capture, official fixtures, compiled ops) first, then the
    # kernel matrix, on worker processes where pytest-xdist is there (Triton compiles on the CPU).
    # --maxfail, not -x: one failure must not hide the files collected after it.
    run test-gpu env TRITON_INTERPRET=0 "$PY" -m pytest -q --maxfail=5 -m gpu tests --ignore=tests/test_kernels.py \
        -p no:cacheprovider --durations=10 --junitxml="$WORK/test-gpu.xml"
    xdist=()
    "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
    run test-gpu-kernels env TRITON_INTERPRET=0 "$PY" -m pytest -q --maxfail=5 -m gpu tests/test_kernels.py "${xdist[@]}" \
        -p no:cacheprovider --durations=10 --junitxml="$WORK/test-gpu-kernels.xml"
fi
if want host; then
    run bench-host "$PY" -m benchmarks.bench_host --device cuda --out "$WORK"
    # Adam's default, foreach and fused (srflow train's) over df2k-4x's parameters: seconds
    run bench-optimizer "$PY" -m benchmarks.bench_optimizer --device cuda --out "$WORK"
fi
if want target-bf16; then
    # bf16 subnets, channels-last: eager, captured, then compiled with reduce-overhead
    target target-bf16 "${TARGET_BF16_VARIANTS:-ms-cuda-bf16-cl,ms-cuda-bf16-cl-capture,ms-cuda-bf16-cl-graph}"
fi
if want ops; then
    # torch.compile of the reference only at level 1 (each shape costs a compilation)
    run bench-actnorm-conv "$PY" -m benchmarks.bench_actnorm_conv --out "$WORK" --providers eager,triton,cuda
    run bench-affine-coupling "$PY" -m benchmarks.bench_affine_coupling --out "$WORK" --providers eager,triton,cuda
    mkdir -p "$WORK/compiled"
    run bench-actnorm-conv-compile "$PY" -m benchmarks.bench_actnorm_conv --out "$WORK/compiled" --providers compile --levels 1
    run bench-affine-coupling-compile "$PY" -m benchmarks.bench_affine_coupling --out "$WORK/compiled" --providers compile --levels 1
fi
if want stack; then
    run bench-stack "$PY" -m benchmarks.bench_stack --out "$WORK"
fi
if want memory; then
    run bench-memory "$PY" -m benchmarks.bench_memory --out "$WORK"
fi
if want srflow; then
    run bench-srflow "$PY" -m benchmarks.bench_srflow --out "$WORK" --max-seconds "${SRFLOW_SECONDS:-300}"
fi
if want lvlbatch; then
    # Level batching of the conditioning convolutions against the per-step path (and with the
    # parts kept for backward), fp32 and bf16 channels_last, df2k-4x 160x160, in one run.
    mkdir -p "$WORK/lvlbatch"
    run bench-srflow-lvlbatch "$PY" -m benchmarks.bench_srflow --out "$WORK/lvlbatch" \
        --variants ms-cuda-perstep,ms-cuda-batched,ms-cuda-keep,ms-cuda-bf16-cl-perstep,ms-cuda-bf16-cl-batched,ms-cuda-bf16-cl-keep \
        --batches 16,64 --sample-batch 16 --max-seconds "${LVLBATCH_SECONDS:-300}"
    cp "$WORK/lvlbatch/bench_srflow_df2k-4x.json" "$WORK/bench_srflow_df2k-4x_lvlbatch.json" 2>/dev/null
fi
if want compiled; then
    # The whole step compiled (Inductor) and as CUDA graphs, fp32 and bf16, against the official
    # maths eager and compiled, at two batches: the fit of memory per sample gives the batch that
    # fits in the official batch-16 memory, which is measured too (samples/s, the README's targets).
    mkdir -p "$WORK/compiled-step"
    run bench-srflow-compiled "$PY" -m benchmarks.bench_srflow --out "$WORK/compiled-step" \
        --variants "${COMPILED_VARIANTS:-official,ms-cuda-graph,ms-cuda-bf16-cl-graph,ms-cuda-compile,official-compile}" \
        --batches "${COMPILED_BATCHES:-16,64}" --sample-batch 16 --max-seconds "${COMPILED_SECONDS:-420}"
    cp "$WORK/compiled-step/bench_srflow_df2k-4x.json" "$WORK/bench_srflow_df2k-4x_compiled.json" 2>/dev/null
fi
if want report; then
    run report "$PY" -m benchmarks.report "$WORK"
fi
kill $snapshots 2>/dev/null
wait $snapshots 2>/dev/null
snapshot
[ "$status" -eq 0 ] && [ "$cut" -eq 1 ] && exit 2
exit $status
