"""SRFlow training and sampling benchmark: the official maths against memory-saving backends.

One training step = RRDB conditioning + flow NLL forward + backward + Adam step (fused, as
``srflow train`` uses; before 2026-12-07 torch's default, fused only with CUDA graphs), on random
160x160 HR crops with their 40x40 (4x) LR, ActNorms initialised first. Variants:

* ``official``: stored-activation autograd over the reference ops (the official model's maths);
* ``checkpoint``: the same with torch.utils.checkpoint (non-reentrant) around every flow step,
  what a user can do today;
* ``ms-<backend>[-bf16][-cl][-perstep|-batched|-keep]``: memory-saving flow levels with a
  flowkernels backend, optionally bf16 autocast (RRDB and subnets; the flow state stays fp32) and
  channels_last; level batching of the conditioning convolutions (FlowSequence's
  ``cond_batching``) as the library's default (batched on CUDA, per step on a CPU), ``-perstep``
  off (every step convolves the RRDB features itself), ``-batched`` on, ``-keep`` on and keeping
  the batched parts from forward to backward (``keep_cond_parts``);
* any of them with ``-compile`` (``torch.compile(fullgraph=True)`` of the whole loss, forward and
  backward; the sampling call too) or ``-graph`` (the same in ``mode="reduce-overhead"``: CUDA
  graphs). ``warmup_s`` holds the compile time; a ``-graph`` variant on CUDA
  records ``cudagraph_skips`` and ``cudagraph_partitions`` (graphs Inductor ran uncaptured or
  split around uncapturable ops): its times are CUDA-graph times only where both are 0;
* or with ``-capture`` (CUDA only): the eager step, Adam's included, captured whole with
  ``torch.cuda.graph`` after the warm-up steps and replayed (:func:`captured`): no compile, so it
  measures in seconds what launching nothing from the host gives the eager kernels, where a
  ``-graph`` variant of df2k-4x compiles for many minutes (Inductor generates thousands of
  kernels for the step). A measurement, not a trainer option (yet).

For each variant and batch: median step time over timed steps, samples/s, the last step's loss
(across the fp32 variants equal up to rounding: one model, batch and number of steps) and peak
memory (``max_memory_allocated`` over the timed steps, model and optimizer state included, and
over the warm-up, ``warmup_peak_gib``: a CUDA graph's replay allocates nothing, so for ``-graph``
and ``-capture`` variants that and ``reserved_gib`` are the peaks to read; on the CPU each
variant runs in its own process and reports that process's peak resident set, total and above
its RSS before the first training step). From two batch sizes a linear fit gives GiB per
sample, the largest batch within 10/24/80 GiB, and the batch that fits in the memory
``official`` needs at batch 16, which is then measured. Sampling: ``sample`` of a batch of 40x40
LR at temperature 0.9.

    python -m benchmarks.bench_srflow [--preset df2k-4x] [--variants ...] [--smoke] [--out DIR]
    python -m benchmarks.bench_srflow --device cpu --variants ms-cuda-perstep,ms-cuda-batched,ms-cuda-keep \
        --batches 4 --hr-size 96 --sample-batch 0        # level batching vs per-step on the CPU
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

import flowkernels as fk
import srflow
from benchmarks.common import add_common_args, environment, is_oom, peak_rss_gib, rss_gib, write_json
from srflow.config import CUDA_GRAPH_MODES
from srflow.train import cudagraph_fallbacks

DEFAULT_VARIANTS = "official,checkpoint,ms-cuda,ms-triton,ms-cuda-cl,ms-cuda-bf16-cl,ms-triton-bf16-cl"
BUDGETS_GIB = (10, 24, 80)


COMPILE_SUFFIXES = {"compile": "default", "graph": "reduce-overhead"}


def parse_variant(name: str) -> dict:
    parts = name.split("-")
    compiled = [COMPILE_SUFFIXES[p] for p in parts if p in COMPILE_SUFFIXES]
    capture = "capture" in parts
    common = {
        "bf16": "bf16" in parts,
        "channels_last": "cl" in parts,
        "compile": compiled[0] if compiled else None,
        "capture": capture,
    }
    if len(compiled) + capture > 1:
        raise ValueError(f"variant: at most one of -compile, -graph and -capture, got {name!r}")
    if parts[0] in ("official", "checkpoint"):
        return {
            "memory_saving": False,
            "backend": "reference",
            "checkpoint": parts[0] == "checkpoint",
            "cond_batching": False,
            "keep_cond_parts": False,
            **common,
        }
    batching_flags = [p for p in parts if p in ("perstep", "batched", "keep")]
    if parts[0] != "ms" or len(parts) < 2 or len(batching_flags) > 1:
        raise ValueError(
            "variant: expected official, checkpoint or ms-<backend>[-bf16][-cl][-perstep|-batched|-keep]"
            f"[-compile|-graph|-capture], got {name!r}"
        )
    return {
        "memory_saving": True,
        "backend": parts[1],
        "checkpoint": False,
        "cond_batching": {"perstep": False, "batched": True, "keep": True}.get(next(iter(batching_flags), "")),
        "keep_cond_parts": "keep" in parts,
        **common,
    }


def _checkpoint_steps(model: srflow.SRFlow) -> None:
    """Wrap every flow step's forward in torch.utils.checkpoint (the user's alternative)."""
    for module in model.flowUpsamplerNet.modules():
        if isinstance(module, fk.FlowStep):
            plain = module.forward
            module.forward = lambda x, cond=None, logdet=None, _f=plain: checkpoint(
                _f, x, cond, logdet, use_reentrant=False
            )


def build(
    preset: str, variant: dict, device: torch.device, rrdb_trainable: bool, chunk_mib: float | None = None
) -> srflow.SRFlow:
    model = srflow.SRFlow.from_preset(
        preset,
        memory_saving=variant["memory_saving"],
        backend=variant["backend"],
        rrdb_trainable=rrdb_trainable,
        seed=0,
    ).to(device)
    chunk = None if chunk_mib is None else int(chunk_mib * 2**20)
    model.set_cond_batching(variant["cond_batching"], chunk_bytes=chunk, keep_parts=variant["keep_cond_parts"])
    if variant["checkpoint"]:
        _checkpoint_steps(model)
    if variant["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # as `srflow train` runs it: its batches are valid by construction, and the per-call value scan
    # is a host sync (eagerly, every step would wait for the RRDB)
    model.check_inputs = False
    return model.train()


def batch_of(model: srflow.SRFlow, batch: int, hr_size: int, device: torch.device, channels_last: bool):
    gen = torch.Generator(device=device).manual_seed(batch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    hr = torch.rand(batch, 3, hr_size, hr_size, device=device, generator=gen)
    lr = torch.nn.functional.avg_pool2d(hr, model.scale)
    return hr.contiguous(memory_format=fmt), lr.contiguous(memory_format=fmt)


def compiled_loss(model: srflow.SRFlow, mode: str | None):
    """The training loss ``(hr, lr) -> mean NLL``, whole-step compiled (``fullgraph``) in ``mode``
    (None: eager)."""
    loss = lambda hr, lr: model.nll(hr, lr).mean()  # noqa: E731
    if mode is None:
        return loss
    fk.check_backend_available(model.backend, next(model.parameters()).device)  # load it before tracing
    return torch.compile(loss, mode=mode, fullgraph=True)


def captures_graphs(variant: dict, device: torch.device) -> bool:
    """Whether Inductor is to run ``variant``'s compiled step as CUDA graphs."""
    return variant["compile"] in CUDA_GRAPH_MODES and device.type == "cuda"


def replays_graphs(variant: dict, device: torch.device) -> bool:
    """Whether ``variant``'s timed steps are CUDA-graph replays (Inductor's or :func:`captured`)."""
    return captures_graphs(variant, device) or (variant["capture"] and device.type == "cuda")


def captured(step: Callable[[], torch.Tensor], warmup: int) -> Callable[[], torch.Tensor]:
    """``step`` (a whole training step on fixed input tensors: zero_grad(set_to_none=True), loss,
    backward, a capturable optimizer's step) captured as one CUDA graph. ``warmup`` real steps run
    first on a side stream (lazy initialisations, the optimizer's state), then one capture on that
    same stream (which runs nothing: the linear-algebra libraries keep per-stream state, which
    they cannot set up inside a capture). The returned callable replays the graph: one more real
    step, whose loss it returns (the same tensor every time, overwritten by the next replay). The
    gradients the capture allocated stay the parameters' ``.grad``, rewritten by each replay.

    Warm-up and capture prefer cuSOLVER for linear algebra (the 1x1 maps' LU): torch may pick
    MAGMA for a batch, whose host-side waits a capture cannot record."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    linalg = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library("cusolver")
    try:
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        try:
            with torch.cuda.graph(graph, stream=side):
                loss = step()
        except Exception as exc:
            # a failure inside the capture surfaces as capture_end's own error: name the first one
            first = exc
            while first.__context__ is not None:
                first = first.__context__
            if first is exc:
                raise
            raise RuntimeError(f"capturing the step failed: {type(first).__name__}: {first}") from exc
    finally:
        torch.backends.cuda.preferred_linalg_library(linalg)
    torch.cuda.current_stream().wait_stream(side)

    def replay() -> torch.Tensor:
        graph.replay()
        return loss

    return replay


def measure_training(model, variant: dict, batch: int, hr_size: int, device, steps: int, warmup: int = 2) -> dict:
    """Median step time, samples/s and peak memory of ``steps`` timed steps after ``warmup`` ones
    (a ``-capture`` variant: replays of the step captured after the warm-up steps, at least one)."""
    hr, lr = batch_of(model, batch, hr_size, device, variant["channels_last"])
    rss_before = rss_gib() if device.type == "cpu" else None
    if variant["capture"] and device.type != "cuda":
        raise ValueError(f"-capture variants need CUDA (torch.cuda.graph), got device {device}")
    # capturable: Adam's step count on the device, so that a replay advances it
    opt = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True, capturable=variant["capture"]
    )
    # autocast's cast cache would hand a capture the weights cast before it: off when capturing
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not variant["capture"])
        if variant["bf16"]
        else contextlib.nullcontext()
    )
    loss_fn = compiled_loss(model, variant["compile"])

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(hr, lr)
        loss.backward()
        opt.step()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if variant["capture"]:
        step = captured(step, max(warmup, 1))
    else:
        for _ in range(warmup):
            step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        warmup_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    out = {"batch": batch, "ms": ms, "ms_min": min(times), "ms_max": max(times), "samples_per_s": batch / ms * 1e3}
    out["warmup_s"] = warmup_s  # compile time included for the compiled variants
    # the same model, batch and steps in every variant: the last loss agrees across them (bf16 aside)
    out["loss"] = loss.item()  # read before the next replay could overwrite a CUDA graph's output
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        # A CUDA graph's replay allocates nothing (its memory is its private pool, allocated while
        # it was recorded in the warm-up): for -graph and -capture variants the warm-up's peak and
        # the reserved memory are the ones to read, peak_gib counts what lives outside the graphs.
        out["warmup_peak_gib"] = warmup_peak / 2**30
        out["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        out["peak_rss_gib"] = peak_rss_gib()
        out["rss_before_gib"] = rss_before
        out["peak_rss_above_start_gib"] = out["peak_rss_gib"] - rss_before
    return out


def measure_sampling(model, batch: int, lr_size: int, device, reps: int, mode: str | None = None) -> dict:
    """Median time of ``sample`` at temperature 0.9; compiled in ``mode`` if given (then seeded
    through the global RNG: Dynamo cannot trace a Generator)."""
    model.eval()
    lr = torch.rand(batch, 3, lr_size, lr_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    sample = lambda lr: model.sample(lr, temperature=0.9, nonfinite="ignore")  # noqa: E731
    if mode is not None:
        sample = torch.compile(sample, mode=mode, fullgraph=True)
    with torch.no_grad():
        torch.manual_seed(0)
        sample(lr)
        sync(device)
        times = []
        for i in range(reps):
            torch.manual_seed(i)
            t0 = time.perf_counter()
            sample(lr)
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    model.train()
    return {"batch": batch, "lr_size": lr_size, "ms": statistics.median(times), "ms_min": min(times)}


def batching_speedups(results: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per batch, the per-step variant's step time over each batched variant's (``X-perstep``
    against ``X-batched`` and ``X-keep``; > 1: batching is faster), from the medians and from the fastest
    steps (on a shared machine other load only adds time, so the minimum is the steadier
    estimate). A variant listed several times (to interleave the runs) counts with all its steps:
    the median of its medians and the minimum of its minima."""
    times: dict[tuple[str, int], list[dict]] = {}
    for res in results:
        for point in res["points"]:
            if "ms" in point:
                times.setdefault((res["variant"], point["batch"]), []).append(point)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (name, batch), per_step in sorted(times.items()):
        if not name.endswith("-perstep"):
            continue
        base = name.removesuffix("-perstep")
        for batched in (f"{base}-batched", f"{base}-keep"):
            if (batched, batch) not in times:
                continue
            other = times[(batched, batch)]
            out.setdefault(f"{batched} vs {name}", {})[f"batch {batch}"] = {
                "median": statistics.median(p["ms"] for p in per_step) / statistics.median(p["ms"] for p in other),
                "min": min(p["ms_min"] for p in per_step) / min(p["ms_min"] for p in other),
            }
    return out


def fit(points: list[dict], peak: str = "peak_gib") -> dict | None:
    """Linear fit peak = fixed + per_sample * batch over the measured batches (``peak``: the
    points' field to fit)."""
    pts = [(p["batch"], p[peak]) for p in points if peak in p]
    if len(pts) < 2:
        return None
    (b0, m0), (b1, m1) = pts[0], pts[-1]
    per_sample = (m1 - m0) / (b1 - b0)
    fixed = m0 - per_sample * b0
    largest = {f"{g}GiB": int((g - fixed) / per_sample) if per_sample > 0 else None for g in BUDGETS_GIB}
    return {"gib_per_sample": per_sample, "fixed_gib": fixed, "largest_batch_predicted": largest}


def run_variant(
    name: str,
    args,
    device,
    official_b16_peak: float | None,
    deadline: float,
    on_point: Callable[[dict], object] | None = None,
) -> dict:
    """One variant's measurements. ``on_point(result so far)`` after each one: ``--max-seconds``
    only stops new measurements from starting, so a call stopped from outside in the middle of a
    variant (a compiled one takes minutes) keeps what it had measured."""
    variant = parse_variant(name)
    saved = on_point or (lambda _: None)
    result: dict = {
        "variant": name,
        **variant,
        "rrdb_trainable": args.rrdb_trainable,
        "cond_chunk_mib": args.cond_chunk_mib,
        "points": [],
    }
    fallbacks = cudagraph_fallbacks()
    if variant["compile"] is not None:
        # Dynamo keys its caches on the loss's code, the same in every variant of this process: a
        # second compiled variant would start from the first one's automatic-dynamic state (e.g.
        # symbolic strides after contiguous then channels-last inputs), not as `srflow train` does
        torch._dynamo.reset()
    saved(result)  # a variant stopped from outside in its first compile still shows, in_progress
    try:
        model = build(args.preset, variant, device, args.rrdb_trainable, args.cond_chunk_mib)
        hr, lr = batch_of(model, 2, args.hr_size, device, variant["channels_last"])
        model.initialize_actnorms(hr, lr)
        for batch in args.batches:
            if time.perf_counter() > deadline:
                result["truncated"] = "time budget reached"
                break
            try:
                point = measure_training(model, variant, batch, args.hr_size, device, args.steps, args.warmup)
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                result["points"].append({"batch": batch, "oom": True})
                break
            result["points"].append(point)
            saved(result)
            print(f"{name} batch {batch}: {point}", flush=True)
        # a CUDA graph's memory shows in the warm-up that recorded it, not in its replays
        peak = "warmup_peak_gib" if replays_graphs(variant, device) else "peak_gib"
        result["fit"] = fit([p for p in result["points"] if "ms" in p], peak)
        if official_b16_peak and result["fit"] and variant["memory_saving"] and time.perf_counter() < deadline:
            per, fixed = result["fit"]["gib_per_sample"], result["fit"]["fixed_gib"]
            target = min(int((official_b16_peak - fixed) / per), args.max_batch) if per > 0 else args.max_batch
            target -= target % 8
            if target > max(args.batches):
                point = measure_training(model, variant, target, args.hr_size, device, max(2, args.steps // 2))
                result["at_official_b16_memory"] = point
                saved(result)
                print(f"{name} at the official batch-16 memory ({official_b16_peak:.2f} GiB): {point}", flush=True)
        if args.sample_batch and not variant["checkpoint"] and time.perf_counter() < deadline:
            size = args.hr_size // model.scale
            result["sampling"] = measure_sampling(model, args.sample_batch, size, device, 5, variant["compile"])
            saved(result)
            print(f"{name} sampling: {result['sampling']}", flush=True)
    except Exception as exc:  # noqa: BLE001 (record and go on with the next variant)
        result["error"] = f"{type(exc).__name__}: {exc}"[:800]
        print(f"{name}: {result['error']}", flush=True)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if captures_graphs(variant, device):
        # over all the variant's compilations (a graph compiled once serves the later points)
        new = cudagraph_fallbacks(since=fallbacks)
        result["cudagraph_skips"], result["cudagraph_partitions"] = new["skips"], new["partitions"]
    return result


def run_variant_isolated(name: str, args, device, official_b16_peak: float | None, deadline: float) -> dict:
    """:func:`run_variant` in a fresh process (on the CPU: so that its peak RSS is its own)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        # time.perf_counter is per process: pass the time left, not the deadline
        left = deadline - time.perf_counter()
        return pool.submit(_run_variant_child, name, args, str(device), official_b16_peak, left).result()


def _run_variant_child(name: str, args, device: str, official_b16_peak: float | None, left: float) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_variant(name, args, torch.device(device), official_b16_peak, time.perf_counter() + left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--preset", default="df2k-4x")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--batches", default="16,64", help="batch sizes for time and the memory fit")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per point")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--hr-size", type=int, default=160)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--rrdb-trainable", action="store_true")
    parser.add_argument(
        "--cond-chunk-mib", type=float, default=None, help="level batching chunk budget (default: the library's)"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU: torch threads per variant (0: default)")
    parser.add_argument("--max-seconds", type=float, default=420.0, help="stop starting new measurements after this")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.hr_size, args.batches, args.steps, args.sample_batch = "tiny-4x", 32, "2,4", 2, 2
    args.batches = [int(b) for b in str(args.batches).split(",")]
    device = torch.device(args.device)
    deadline = time.perf_counter() + args.max_seconds
    results = []
    official_b16 = None
    env = environment(device)

    def save(in_progress: dict | None = None) -> Path:
        """Rewritten after every measurement: a run stopped from outside keeps what it measured."""
        done = results + ([{**in_progress, "in_progress": True}] if in_progress is not None else [])
        payload = {
            "env": env,
            "preset": args.preset,
            "hr_size": args.hr_size,
            "command": " ".join(sys.argv),
            "results": done,
            "batching_speedup": batching_speedups(done),
        }
        return write_json(f"bench_srflow_{args.preset}", payload, args.out)

    for name in args.variants.split(","):
        if device.type == "cpu":  # saved at its end (a child's results come back when it ends)
            res = run_variant_isolated(name, args, device, official_b16, deadline)
        else:
            res = run_variant(name, args, device, official_b16, deadline, save)
        if name == "official":
            official_b16 = next((p.get("peak_gib") for p in res["points"] if p.get("batch") == 16), None)
        results.append(res)
        path = save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
