"""Shared benchmark plumbing: timing, peak memory, copy bandwidth, environment, JSON output.

Timing on CUDA uses ``triton.testing.do_bench`` (CUDA events, cache flush, median and 20/80 %
quantiles); on the CPU a wall-clock loop with the same quantiles, for smoke runs only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: torch.device) -> dict[str, Any]:
    """What produced a number: device, versions, commit, date."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import triton  # noqa: PLC0415

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["capability"] = list(torch.cuda.get_device_capability(device))
    else:
        env["cpu"] = platform.processor() or platform.machine()
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None
    return env


def bench(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """Median and 20/80 % quantiles of ``fn``'s run time in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench  # noqa: PLC0415

        q50, q20, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": q50, "ms_q20": q20, "ms_q80": q80}
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10, method="inclusive")
    return {"ms": statistics.median(times), "ms_q20": qs[1], "ms_q80": qs[7]}


def peak_memory(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak bytes allocated by ``fn`` above what was allocated before it (CUDA only), in GiB."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), large buffers."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = bench(lambda: dst.copy_(src), device)
    return 2 * nbytes / (timing["ms"] * 1e-3) / 1e9


def rss_gib() -> float:
    """This process's current resident set (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def peak_rss_gib() -> float:
    """This process's peak resident set so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``payload`` to ``<out_dir or benchmarks/results>/<name>.json`` and return the path.
    Replaced whole (a temporary renamed over it): a copy taken while it is rewritten, such as
    scripts/gpu_check.sh's snapshots, never holds half a file."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    part = path.with_name(f"{path.name}.part")
    part.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(part, path)
    return path


class Unsupported(Exception):
    """A provider cannot run a case (missing backend, mode without meaning); recorded, not fatal."""


def sweep(
    op: str,
    cases: list[dict],
    providers: list[str],
    modes: list[str],
    factory: Callable[[dict, str, str], tuple[Callable[[], object], int]],
    device: torch.device,
    copy_gbps: float | None,
) -> list[dict]:
    """Time every (case, provider, mode); ``factory`` returns (fn, bytes moved at minimum, or 0
    where bandwidth means nothing).

    Each row holds the timing, GB/s, the fraction of measured copy bandwidth and the peak
    memory of one call; failures become rows with an ``error`` so one bad provider does not
    lose the rest of a run.
    """
    rows = []
    for case in cases:
        for provider in providers:
            for mode in modes:
                row = {"op": op, **case, "provider": provider, "mode": mode}
                try:
                    fn, nbytes = factory(case, provider, mode)
                    row.update(bench(fn, device))
                    if nbytes:
                        row["gbps"] = nbytes / (row["ms"] * 1e-3) / 1e9
                        if copy_gbps:
                            row["frac_copy_bw"] = row["gbps"] / copy_gbps
                    row["peak_gib"] = peak_memory(fn, device)
                except Unsupported as exc:
                    row["skipped"] = str(exc)
                except Exception as exc:  # noqa: BLE001 (report and continue)
                    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                rows.append(row)
                print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    measured = {"ms", "ms_q20", "ms_q80", "gbps", "frac_copy_bw", "peak_gib", "error", "skipped"}
    keys = [k for k in row if k not in measured]
    head = " ".join(f"{k}={row[k]}" for k in keys)
    if "ms" in row:
        frac = f" ({100 * row['frac_copy_bw']:.0f}% of copy)" if "frac_copy_bw" in row else ""
        bw = f" {row['gbps']:.0f} GB/s{frac}" if "gbps" in row else ""
        mem = f" peak {row['peak_gib']:.3f} GiB" if row.get("peak_gib") is not None else ""
        return f"{head}: {row['ms']:.3f} ms [{row['ms_q20']:.3f}, {row['ms_q80']:.3f}]{bw}{mem}"
    return f"{head}: {row.get('error') or 'skipped: ' + row.get('skipped', '')}"


def reference_case(
    fwd: Callable, inv: Callable, provider: str, mode: str, tensors: list[torch.Tensor], extra: tuple, cotangents: tuple
) -> Callable[[], object]:
    """The ``eager``/``compile`` providers of a per-op benchmark, from the reference functions.

    ``fwd``/``inv`` run without grad; ``bwd`` is the autograd backward of a stored graph (what
    eager training pays after its forward), ``full`` forward + backward; gradients w.r.t.
    ``tensors``, with the (y, logdet) cotangents given.
    """
    fn = inv if mode == "inv" else fwd
    if provider == "compile":
        fn = torch.compile(fn)
    if mode in ("fwd", "inv"):
        return lambda: fn(*tensors, *extra)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    if mode == "full":
        return lambda: torch.autograd.grad(fn(*leaves, *extra), leaves, cotangents)
    outputs = fn(*leaves, *extra)
    return lambda: torch.autograd.grad(outputs, leaves, cotangents, retain_graph=True)


def kernel_case(mode: str, fwd: Callable[[], object], bwd: Callable[[], object]) -> Callable[[], object]:
    """A kernel provider's call for ``mode``: the op (fwd/inv), its recompute backward, or both."""
    if mode in ("fwd", "inv"):
        return fwd
    if mode == "bwd":
        return bwd
    return lambda: (fwd(), bwd())


def op_main(op: str, doc: str, cases: Callable[[bool, list[int]], list[dict]], factory: Callable) -> None:
    """The command line of a per-op benchmark (bench_<op>.py): providers x modes x SRFlow levels.

    ``cases(smoke, levels)`` lists the cases; ``factory(case, provider, mode, device)`` returns
    (fn, bytes). Writes ``bench_<op>.json`` with the environment and the copy bandwidth.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--providers", default="eager,compile,triton,cuda")
    parser.add_argument("--modes", default="fwd,inv,bwd,full")
    parser.add_argument("--levels", default="1,2,3", help="SRFlow 4x levels (shapes) to run")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    copy = copy_bandwidth(device, 2**24 if args.smoke else 2**30)
    rows = sweep(
        op,
        cases(args.smoke, [int(v) for v in args.levels.split(",")]),
        args.providers.split(","),
        args.modes.split(","),
        lambda case, p, m: factory(case, p, m, device),
        device,
        copy,
    )
    path = write_json(f"bench_{op}", {"env": environment(device), "copy_gbps": copy, "rows": rows}, args.out)
    print(f"wrote {path}")


def add_common_args(parser) -> None:  # noqa: ANN001
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for checking the script on a CPU")
