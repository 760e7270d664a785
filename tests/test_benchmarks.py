"""The benchmark scripts run end to end on tiny shapes (``--smoke``) on the CPU, and the report
turns their JSON into Markdown: scripts/gpu_check.sh depends on them, and a GPU run is too
scarce to find a broken script there. Nothing here looks at timings."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from flowkernels import dispatch

ROOT = Path(__file__).resolve().parents[1]
# each script pays its imports and a warm-up; the scripts run once, in one worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmarks")]


def _run(module: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLOWKERNELS_POISON_OUTPUTS": "0"}
    subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the C++ kernels when the extension is built (it is in CI), else the eager reference alone
    kernels = "eager" if dispatch.refusals("cuda", torch.zeros(1, 2, 2, 2)) else "eager,cuda"
    out = tmp_path_factory.mktemp("bench")
    common = ["--device", "cpu", "--smoke", "--out", str(out)]
    _run("benchmarks.bench_actnorm_conv", *common, "--providers", kernels, "--modes", "fwd,bwd")
    _run("benchmarks.bench_affine_coupling", *common, "--providers", kernels, "--modes", "inv,full")
    _run("benchmarks.bench_stack", *common, "--providers", "eager,checkpoint,ms-reference", "--modes", "full")
    _run("benchmarks.bench_memory", *common)
    variants = "official,ms-reference-cl,ms-reference-perstep,ms-reference-batched"
    _run("benchmarks.bench_srflow", *common, "--variants", variants, "--steps", "1")
    # not --trace-times: a CPU-only measurement (gpu_check.sh does not use it) of two more whole
    # compiles, ~55 s here
    _run("benchmarks.bench_host", *common, "--variants", "ms-reference")
    _run("benchmarks.bench_optimizer", *common)
    ab = ["--specs", "full:ms-reference", "--preset", "tiny-4x", "--rounds", "1", "--steps", "1", "--out", str(out)]
    _run("benchmarks.host_ab", str(ROOT), str(ROOT), *ab)
    _run("benchmarks.bench_loader", "--out", str(out), "--images", "2", "--size", "200", "120", "--crop", "32")
    _run("benchmarks.report", str(out))
    return out


def test_the_benchmark_group_holds(request: pytest.FixtureRequest):
    """``make test`` runs ``--dist loadgroup``: pytest-xdist keeps an ``xdist_group``'s tests on
    one worker by suffixing their ids with ``@<group>``, so ``results`` (every benchmark script,
    ~3 min on 2 cores) runs once. pytest 9.2 stopped reading that suffix and the group split
    without a word: the scripts ran on both workers (pyproject.toml keeps pytest below 9.2)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run under pytest-xdist's --dist loadgroup")
    assert request.node.nodeid.endswith("@benchmarks"), request.node.nodeid


def test_every_benchmark_writes_rows_without_errors(results: Path):
    for name in ("bench_actnorm_conv", "bench_affine_coupling", "bench_stack", "bench_memory"):
        rows = json.loads((results / f"{name}.json").read_text())["rows"]
        assert rows, name
        assert not [r for r in rows if "error" in r], f"{name}: {[r['error'] for r in rows if 'error' in r]}"
    srflow = json.loads((results / "bench_srflow_tiny-4x.json").read_text())
    assert [r["variant"] for r in srflow["results"]] == [
        "official",
        "ms-reference-cl",
        "ms-reference-perstep",
        "ms-reference-batched",
    ]
    assert all("error" not in r and len(r["points"]) == 2 for r in srflow["results"])
    # one model, batch and number of Adam steps in every variant: the last losses agree (a variant
    # that times something else than the official step shows here, not only in its time)
    for k in range(2):
        losses = [r["points"][k]["loss"] for r in srflow["results"]]
        assert max(abs(v - losses[0]) for v in losses) <= 1e-4 * abs(losses[0]), losses
    host_json = json.loads((results / "bench_host_tiny-4x.json").read_text())
    host = host_json["results"]
    assert [r["variant"] for r in host] == ["ms-reference"]
    assert all(r["ops_per_step"] > 0 and r["graph_breaks_step"] == 0 == r["graph_breaks_sample"] for r in host)
    ab = json.loads((results / "host_ab_tiny-4x.json").read_text())
    assert [t["path"] for t in ab["trees"]] == [str(ROOT)] * 2
    (row,) = ab["results"]
    assert row["spec"] == "full:ms-reference" and [len(v) for v in row["per_round_fastest_ms"]] == [1, 1]
    assert row["ratio_of_medians"] > 0 and row["ratio_of_fastest"] > 0
    adam = json.loads((results / "bench_optimizer_tiny-4x.json").read_text())["rows"]
    assert [(r["rrdb_trainable"], r["implementation"]) for r in adam] == [
        (trainable, implementation) for trainable in (False, True) for implementation in ("default", "foreach", "fused")
    ]
    assert all(r["ms"] > 0 and r["ops_per_step"] > 0 for r in adam)
    assert adam[0]["parameters"] < adam[3]["parameters"]  # the RRDB's parameters join when it trains
    loader = json.loads((results / "bench_loader.json").read_text())
    assert [r["mode"] for r in loader["rows"]] == ["cold", "memory", "store", "bank"]
    assert all(len(r["samples_per_s"]) == 5 and r["median"] > 0 for r in loader["rows"])
    speedup = srflow["batching_speedup"]["ms-reference-batched vs ms-reference-perstep"]
    assert set(speedup) == {"batch 2", "batch 4"} and all(v["median"] > 0 for v in speedup.values())


def test_report_has_every_section(results: Path):
    report = (results / "report.md").read_text()
    for title in ("ActNorm + 1x1 conv", "Affine coupling", "16-step stack", "SRFlow tiny-4x", "memory vs depth"):
        assert title in report
    assert (results / "memory_vs_depth.png").stat().st_size > 0


def test_bench_srflow_saves_after_every_measurement():
    """On a GPU a variant runs in bench_srflow's own process and its JSON is rewritten after each
    measurement (``on_point``): ``--max-seconds`` cannot stop a compiled variant that takes
    minutes, and a call stopped from outside must keep the points it had."""
    from benchmarks import bench_srflow  # noqa: PLC0415 (imports srflow's training stack)

    args = argparse.Namespace(
        preset="tiny-4x", rrdb_trainable=False, cond_chunk_mib=None, hr_size=32, batches=[2, 4], steps=1, warmup=1
    )
    args.max_batch, args.sample_batch = 8, 2
    saved: list[dict] = []
    deadline = time.perf_counter() + 600
    result = bench_srflow.run_variant(
        "ms-reference", args, torch.device("cpu"), None, deadline, lambda r: saved.append(copy.deepcopy(r))
    )
    assert "error" not in result and [p["batch"] for p in result["points"]] == [2, 4]
    assert [([p["batch"] for p in r["points"]], "sampling" in r) for r in saved] == [
        ([], False),  # started: a variant stopped in its first compile still shows
        ([2], False),
        ([2, 4], False),
        ([2, 4], True),
    ]


def test_bench_peers_runs_and_skips_absent_peers(tmp_path: Path):
    """flowkernels always runs; normflows and FrEIA run where installed and are skipped with the
    reason where not (they are optional: CI does not install them). (That memory saving keeps a
    Glow step's activations flat in depth: tests/test_multiscale.py.)"""
    _run(
        "benchmarks.bench_peers",
        *("--depths", "1", "--levels", "2", "--hidden", "4", "--batch", "2", "--size", "8", "--steps", "1"),
        *("--out", str(tmp_path)),
    )
    result = json.loads((tmp_path / "bench_peers.json").read_text())
    assert (tmp_path / "bench_peers.png").stat().st_size > 0
    ran = {r["library"] for r in result["rows"]}
    for library in ("normflows", "FrEIA"):
        if importlib.util.find_spec(library) is None:
            assert library not in ran and "is not installed" in result["skipped"][library]
        else:
            assert library in ran and library not in result["skipped"]
    ours = [r for r in result["rows"] if r["library"] == "flowkernels"]
    assert len(ours) == 1 and ours[0]["step_ms"] > 0 and ours[0]["saved_mib"] > 0


def _gpu_check(tmp_path: Path, python: str, *stages: str, **env: str) -> tuple[int, str, Path]:
    """scripts/gpu_check.sh's ``stages`` with ``python``, $OUT and $WORK in ``tmp_path`` and the
    extra ``env``: (exit status, status.txt, $WORK)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PYTHON": python, **env}
    run = subprocess.run(["bash", "scripts/gpu_check.sh", *stages], cwd=ROOT, env=env, capture_output=True, timeout=120)
    return run.returncode, (out / "status.txt").read_text(), work


def test_gpu_check_returns_its_work_as_one_tarball(tmp_path: Path):
    """scripts/gpu_check.sh, by its report stage (no GPU needed): $OUT holds only gpu-run.tgz, with
    every stage's log and output, and status.txt with each stage's exit code (the device tool
    returns at most 8 files, and a call stopped at its time limit returns what $OUT holds)."""
    rc, status, _ = _gpu_check(tmp_path, sys.executable, "report")
    out = tmp_path / "out"
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu-run.tgz", "status.txt"]
    assert status.startswith("report: exit 0 after ")
    with tarfile.open(out / "gpu-run.tgz") as tar:
        assert {"./report.log", "./report.md", "./status.txt"} <= set(tar.getnames())


def test_gpu_check_starts_no_stage_past_its_deadline(tmp_path: Path):
    """DEADLINE (seconds from the start) lets a lease's call end on its own, with what it skipped
    named: the stages listed after the deadline are not started, and the exit status is 2."""
    rc, status, work = _gpu_check(tmp_path, sys.executable, "report", DEADLINE="0")
    assert rc == 2
    assert status == "report: skipped (deadline)\n"
    assert not (work / "report.md").exists()


def test_gpu_check_runs_each_target_variant_in_its_own_process(tmp_path: Path):
    """The target stage's variants (the eager step, captured by hand, compiled with CUDA graphs)
    run one process each, into a folder each: a capture or compile that fails, or breaks its
    CUDA context, cannot take the next variant down, and each has its line in status.txt."""
    record = tmp_path / "python"
    record.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls.txt\n')
    record.chmod(0o755)
    rc, status_text, _ = _gpu_check(tmp_path, str(record), "target", TARGET_VARIANTS="ms-cuda,ms-cuda-capture")
    assert rc == 0
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert [c.split("--variants ")[1].split()[0] for c in calls] == ["ms-cuda", "ms-cuda-capture"]
    assert f"--out {tmp_path}/work/target/ms-cuda-capture " in calls[1]
    assert [line.split(":")[0] for line in status_text.splitlines()] == [
        "bench-srflow-target-ms-cuda",
        "bench-srflow-target-ms-cuda-capture",
    ]


def test_gpu_check_stops_a_stage_at_its_deadline(tmp_path: Path):
    """A stage still running at DEADLINE is stopped there (a Python that never returns stands in
    for a compile that outlasts the lease) and named as stopped, not as failed."""
    hang = tmp_path / "python"
    hang.write_text("#!/bin/sh\nexec sleep 300\n")
    hang.chmod(0o755)
    t0 = time.monotonic()
    rc, status, _ = _gpu_check(tmp_path, str(hang), "report", DEADLINE="10")
    assert time.monotonic() - t0 < 60
    assert rc == 2
    assert status.startswith("report: stopped at the deadline after ")
