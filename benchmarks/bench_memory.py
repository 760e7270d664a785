"""Memory of one training step of a FlowSequence against depth and image size.

Memory saving stores no per-step activations, so its memory should stay flat in depth, while
stored-activation autograd (``plain``, reference ops) grows linearly and per-step checkpointing
keeps one input per step. Measured as peak CUDA memory above the parameters and inputs
(``max_memory_allocated``) of forward + backward on a GPU, and on the CPU as bytes of the tensors
autograd saves during the forward (deterministic: what memory saving removes; the transient
working set of the backward is not in it).

``--rss`` (CPU) measures that transient too: each (batching, depth) runs one memory-saving
forward + backward in a fresh process and reports its peak resident set above the set before the
step (glibc's mmap threshold fixed, so that freed tensors leave the RSS), for level batching
off (``perstep``), on with the default chunk budget (``batched``: the
bytes of ``cond``) and on with the former fixed 256 MiB budget (``batched-256MiB``).

    python -m benchmarks.bench_memory [--device cuda] [--smoke] [--out DIR]
    python -m benchmarks.bench_memory --device cpu --rss --batch 4 --channels 12 --cond 16 \
        --hidden 32 --sizes 96 --depths 8,64            # peak RSS vs depth, by batching setting
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os

import torch
from torch.utils.checkpoint import checkpoint

import flowkernels as fk
from benchmarks.common import add_common_args, environment, is_oom, peak_rss_gib, rss_gib, write_json

VARIANTS = ("plain", "checkpoint", "memory_saving")


def build(depth: int, channels: int, cond: int, hidden: int, device: torch.device) -> fk.FlowSequence:
    torch.manual_seed(0)
    steps = [fk.FlowStep(channels, fk.CondAffineCoupling(channels, cond, hidden)) for _ in range(depth)]
    seq = fk.FlowSequence(steps).to(device)
    for m in seq.modules():
        if isinstance(m, fk.ActNorm):
            m.initialized = True  # memory does not depend on the ActNorm values
    return seq


def _step_memory(seq: fk.FlowSequence, variant: str, x: torch.Tensor, cond: torch.Tensor) -> float:
    """GiB of one forward + backward: CUDA peak above the baseline, or saved-tensor bytes on CPU."""
    seq.memory_saving = variant == "memory_saving"

    def forward() -> torch.Tensor:
        if variant == "checkpoint":
            z, ld = x, None
            for step in seq.steps:
                z, ld = checkpoint(step, z, cond, ld, use_reentrant=False)
        else:
            z, ld = seq(x, cond)
        return z.square().sum() - ld.sum()

    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        forward().backward()
        torch.cuda.synchronize(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - base) / 2**30
    loss, nbytes = fk.saved_tensor_bytes(forward, exclude=seq.parameters())
    loss.backward()
    return nbytes / 2**30


def sweep_memory(args, device: torch.device) -> list[dict]:
    rows = []
    c, cond, hidden, batch = args.channels, args.cond, args.hidden, args.batch
    depths = [int(d) for d in args.depths.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    plans = [("depth", d, sizes[0]) for d in depths] + [("size", depths[0], s) for s in sizes[1:]]
    for axis, depth, size in plans:
        seq = build(depth, c, cond, hidden, device)
        for variant in VARIANTS:
            # plain and checkpoint are the official maths (reference ops); memory saving uses the
            # backend under test
            for step in seq.steps:
                step.backend = args.backend if variant == "memory_saving" else "reference"
            row = {"axis": axis, "depth": depth, "size": size, "batch": batch, "variant": variant}
            x = torch.randn(batch, c, size, size, device=device, requires_grad=True)
            y = torch.randn(batch, cond, size, size, device=device)
            try:
                row["gib"] = _step_memory(seq, variant, x, y)
            except Exception as exc:  # noqa: BLE001
                row["error"] = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:300]
            seq.zero_grad(set_to_none=True)
            rows.append(row)
            print(row, flush=True)
    return rows


RSS_BATCHING = {"perstep": (False, None), "batched": (True, None), "batched-256MiB": (True, 256 * 2**20)}


def _rss_step(depth: int, batching: str, args: argparse.Namespace) -> float:
    """In a fresh process: peak RSS above the RSS before one memory-saving forward + backward."""
    torch.set_num_threads(1)
    seq = build(depth, args.channels, args.cond, args.hidden, torch.device("cpu"))
    enabled, chunk = RSS_BATCHING[batching]
    seq.set_cond_batching(enabled, chunk_bytes=chunk)
    size = int(args.sizes.split(",")[0])
    x = torch.randn(args.batch, args.channels, size, size, requires_grad=True)
    y = torch.randn(args.batch, args.cond, size, size)
    before = rss_gib()
    z, ld = seq(x, y)
    (z.square().sum() - ld.sum()).backward()
    return peak_rss_gib() - before


def sweep_rss(args: argparse.Namespace) -> list[dict]:
    rows = []
    # glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay
    # in the heap and the RSS keeps the high-water mark of fragmentation; a fixed threshold
    # returns every large tensor to the OS when freed, so the RSS tracks live memory
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read by each fresh process
    ctx = multiprocessing.get_context("spawn")
    for depth in (int(d) for d in args.depths.split(",")):
        for batching in RSS_BATCHING:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                gib = pool.submit(_rss_step, depth, batching, args).result()
            rows.append({"depth": depth, "batching": batching, "peak_rss_above_start_mib": gib * 1024})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--channels", type=int, default=12)
    parser.add_argument("--cond", type=int, default=320)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--depths", default="4,8,16,32,54")
    parser.add_argument("--sizes", default="40,80,160", help="first size is used for the depth sweep")
    parser.add_argument("--rss", action="store_true", help="CPU: peak RSS of the step by batching setting")
    args = parser.parse_args()
    if args.smoke:
        args.cond, args.hidden, args.batch, args.depths, args.sizes = 6, 8, 2, "2,4,8", "6,12"
    device = torch.device(args.device)
    if args.rss:
        rows = sweep_rss(args)
        measure = "peak RSS above the RSS before one memory-saving step (fresh process each), MiB"
        path = write_json("bench_memory_rss", {"env": environment(device), "measure": measure, "rows": rows}, args.out)
        print(f"wrote {path}")
        return
    rows = sweep_memory(args, device)
    unit = "peak CUDA memory above baseline" if device.type == "cuda" else "bytes saved for backward"
    path = write_json("bench_memory", {"env": environment(device), "measure": unit, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
