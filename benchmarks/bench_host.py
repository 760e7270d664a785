"""Host overhead of an SRFlow training step and of sampling: what the CPU can tell about the GPU.

At a compute-negligible size (default: df2k-4x, batch 1, 16x16 HR) a step's time is the host's
work of dispatching its ops, and every dispatched op is one kernel launch (or more) on a GPU.
Per variant this measures:

* ``ops_per_step``: aten / custom ops dispatched by one training step (NLL forward + backward,
  RRDB frozen, no optimizer; the gradients reset to None as the trainer's optimizer does),
  counted with a ``TorchDispatchMode``, and the most frequent ones;
* ``ops_per_sample``: the same for one ``sample`` call (temperature 0.9, no grad);
* ``host_syncs_per_step`` / ``host_syncs_per_sample``: those of the ops that make the host wait
  for a GPU (``HOST_SYNC_OPS``: tensors built from host data, values read back, value-dependent
  output sizes, linalg error checks, copies to the host);
* ``host_ms_per_step`` / ``host_ms_per_sample``: median wall time of those calls (one thread);
* ``graph_breaks``: ``torch._dynamo.explain`` of the training loss and of ``sample``;
* with ``--inductor``: Inductor's generated-kernel count and compile time of the training loss
  (forward + backward), on a small preset (minutes of compile on a CPU);
* with ``--trace-times``: seconds to compile the first variant's training loss with Dynamo alone
  (``backend="eager"``) and with AOT autograd (``"aot_eager"``), first step included: the part
  of a compile that does not depend on the code generator (minutes for df2k-4x).

``--narrow``: the preset's architecture (levels, steps, RRDB blocks: the same ops, the same op
count) with its widths divided by 8 (RRDB 8 / 4 channels, subnets 8 wide). On a CPU, df2k-4x at
batch 1 is not compute-negligible: its 89 MB of coupling-subnet weights are read (and, memory
saving, folded) several times per step, a cost a GPU does not feel. The narrow model leaves the
host's own work: dispatch, autograd, and the layers' Python.

Variants: ``official`` (stored-activation autograd over the reference ops: the official code's
maths, op for op), ``ms-reference``, ``ms-cuda`` (memory saving on the reference / C++ backend,
library defaults: level batching by device) and ``ms-cuda-batched`` (level batching forced on).

    python -m benchmarks.bench_host [--preset df2k-4x] [--variants ...] [--inductor] [--trace-times] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import flowkernels as fk
import srflow
from benchmarks.common import add_common_args, environment, write_json
from srflow.presets import SRFlowPreset, get_preset

VARIANTS = {  # name -> (memory_saving, backend, cond_batching)
    "official": (False, "reference", False),
    "ms-reference": (True, "reference", None),
    "ms-cuda": (True, "cuda", None),
    "ms-cuda-batched": (True, "cuda", True),
}


_INDEXING = {torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_}


class _CountOps(TorchDispatchMode):
    """Counts every op dispatched inside the mode, by name; indexing by a boolean mask as
    ``aten.index(mask)`` (on a GPU it waits for the device to learn the output size)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = str(func.overloadpacket)
        if func.overloadpacket in _INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
            name += "(mask)"
        self.counts[name] += 1
        return func(*args, **(kwargs or {}))


# Copies to the host that a CPU tensor makes without dispatching an op (on a GPU each is a
# device-to-host copy, which waits for the device): seen by a function mode, counted as ops.
_HOST_READS = {torch.Tensor.tolist: "Tensor.tolist", torch.Tensor.numpy: "Tensor.numpy", torch.Tensor.cpu: "Tensor.cpu"}


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to`` call copies to the host and waits: it names the CPU (``"cpu"``; a
    device object such as ``x.to(device)`` or torch's own ``x.to(grads[0].device)`` moves a tensor
    to the run's device, which is the CPU only because this run is on one) and is not
    ``non_blocking`` (a copy into pinned memory, queued and not waited for)."""
    return "cpu" in (*args[1:], kwargs.get("device")) and not kwargs.get("non_blocking", False)


class _CountHostReads(TorchFunctionMode):
    def __init__(self, counts: collections.Counter[str]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in _HOST_READS:
            self.counts[_HOST_READS[func]] += 1
        elif func is torch.Tensor.to and _to_host(args, kwargs):
            self.counts["Tensor.to(cpu)"] += 1
        return func(*args, **kwargs)


# What makes the host wait for a GPU: a tensor built from host data (a host-to-device copy,
# which waits for the stream), a value read back (.item(), bool(), int(), torch.equal), an op
# whose output size depends on the values (nonzero, boolean masks, unique), an error check of
# linalg (inv, cholesky without _ex), and the host reads above.
HOST_SYNC_OPS = (
    "aten.lift_fresh",
    "aten._local_scalar_dense",
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten.index(mask)",
    "aten.index_put(mask)",
    "aten.index_put_(mask)",
    "aten._unique2",
    "aten._linalg_check_errors",
    *_HOST_READS.values(),
    "Tensor.to(cpu)",
)


def host_syncs(ops: collections.Counter[str]) -> int:
    """How many of the counted ``ops`` (:func:`count_ops`) make the host wait for a GPU."""
    return sum(ops[op] for op in HOST_SYNC_OPS)


def count_ops(fn: Callable[[], object]) -> collections.Counter[str]:
    """The ops ``fn`` dispatches, by name, and the host reads a CPU tensor makes without one
    (``Tensor.tolist`` ...: on a GPU each is an op too)."""
    with _CountOps() as mode, _CountHostReads(mode.counts):
        fn()
    return mode.counts


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn``, the device's queue drained after each call (on a GPU at a
    compute-negligible size that is the host's time to launch everything)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_breaks(fn: Callable, *args: object) -> int:
    torch._dynamo.reset()
    return int(torch._dynamo.explain(fn)(*args).graph_break_count)


def narrow(preset: str) -> SRFlowPreset:
    """``preset``'s architecture with every width divided by 8 (module docstring)."""
    p = get_preset(preset)
    return dataclasses.replace(p, name=f"{p.name}-narrow", nf=p.nf // 8, gc=p.gc // 8, hidden=p.hidden // 8)


def build(preset: str | SRFlowPreset, variant: str, device: torch.device, hr_size: int, batch: int):  # noqa: ANN201
    memory_saving, backend, batching = VARIANTS[variant]
    model = srflow.SRFlow.from_preset(preset, memory_saving=memory_saving, backend=backend, seed=0).to(device)
    model.set_cond_batching(batching)
    gen = torch.Generator(device=device).manual_seed(0)
    hr = torch.rand(batch, 3, hr_size, hr_size, device=device, generator=gen)
    lr = torch.nn.functional.avg_pool2d(hr, model.scale)
    model.initialize_actnorms(hr, lr)
    model.check_inputs = False  # as the trainer runs it: its data are valid by construction
    return model.train(), hr, lr


def measure(args: argparse.Namespace, preset: str | SRFlowPreset, variant: str, device: torch.device) -> dict:
    """Eager ops and host times of one variant. Run for every variant before anything is traced
    in the process: after a ``torch._dynamo.explain`` the same eager step measured up to 1.6x
    slower (narrow df2k-4x, official maths: 102 ms first, 169 ms after another variant's)."""
    model, hr, lr = build(preset, variant, device, args.hr_size, args.batch)
    params = list(model.parameters())

    def step() -> None:
        for p in params:  # what the trainer's optimizer.zero_grad(set_to_none=True) does, without
            p.grad = None  # Module.zero_grad's walk of the module tree (~10 ms, the same for every variant)
        model.nll(hr, lr).mean().backward()

    def sample() -> None:
        with torch.no_grad():
            torch.manual_seed(0)  # the global RNG: a Generator would break a compiled graph
            model.sample(lr, temperature=0.9)

    step()  # loads the backends, fills caches
    ops = count_ops(step)
    sample_ops = count_ops(sample)
    out = {
        "variant": variant,
        "ops_per_step": sum(ops.values()),
        "top_ops_per_step": dict(ops.most_common(15)),
        "ops_per_sample": sum(sample_ops.values()),
        "host_syncs_per_step": host_syncs(ops),
        "host_syncs_per_sample": host_syncs(sample_ops),  # sample's non-finite report reads one count
        "host_ms_per_step": median_ms(step, args.reps),
        "host_ms_per_sample": median_ms(sample, args.reps),
    }
    print(
        f"{variant}: {out['ops_per_step']} ops/step, {out['ops_per_sample']} ops/sample, "
        f"{out['host_ms_per_step']:.0f} ms/step",
        flush=True,
    )
    return out


def measure_breaks(args: argparse.Namespace, preset: str | SRFlowPreset, variant: str, device: torch.device) -> dict:
    """Graph breaks of one variant's training loss and of its sampling."""
    model, hr, lr = build(preset, variant, device, args.hr_size, args.batch)
    out = {
        "graph_breaks_step": graph_breaks(lambda hr, lr: model.nll(hr, lr).mean(), hr, lr),
        "graph_breaks_sample": graph_breaks(lambda lr: model.sample(lr, temperature=0.9), lr),
    }
    print(
        f"{variant}: graph breaks {out['graph_breaks_step']} (step), {out['graph_breaks_sample']} (sample)",
        flush=True,
    )
    return out


def first_compiled_step_s(model: srflow.SRFlow, hr: torch.Tensor, lr: torch.Tensor, backend: str) -> float:
    """Seconds of the first training step (NLL forward + backward) compiled whole with
    ``backend``: the compile included."""
    compiled = torch.compile(lambda hr, lr: model.nll(hr, lr).mean(), fullgraph=True, backend=backend)
    t0 = time.perf_counter()
    compiled(hr, lr).backward()
    return time.perf_counter() - t0


PHASES = (
    "bytecode_tracing",
    "create_aot_dispatcher_function",
    "compile_fx.<locals>.fw_compiler_base",
    "compile_fx.<locals>.bw_compiler",
    "async_compile.wait",
)


def inductor_kernels(args: argparse.Namespace, device: torch.device) -> dict:
    """Generated kernels and compile time of the training loss (forward + backward) on
    ``--inductor-preset`` (``<preset>-narrow``: its widths / 8, the same graph)."""
    from torch._inductor import metrics  # noqa: PLC0415 (private, only for this optional measurement)

    name = args.inductor_preset
    preset = narrow(name.removesuffix("-narrow")) if name.endswith("-narrow") else name
    model, hr, lr = build(preset, "ms-cuda", device, 32, 2)
    torch._dynamo.reset()
    metrics.reset()
    seconds = first_compiled_step_s(model, hr, lr, "inductor")
    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    phases = dict(zip(names, map(float, values)))
    return {
        "preset": args.inductor_preset,
        "generated_kernels": metrics.generated_kernel_count,
        "compile_s": seconds,
        # where it went: Dynamo's trace, AOT autograd + Inductor, Inductor's forward and backward
        # graphs, of those the wait for the generated kernels' compilation (C++ here, Triton on CUDA)
        "phases_s": {k: phases.get(k) for k in PHASES},
    }


def trace_times(args: argparse.Namespace, preset: str | SRFlowPreset, variant: str, device: torch.device) -> dict:
    """Seconds of ``variant``'s first compiled training step per tracing backend."""
    fk.check_backend_available(VARIANTS[variant][1], device)  # loads the backend: a trace cannot import it
    out: dict = {"variant": variant}
    for backend in ("eager", "aot_eager"):
        model, hr, lr = build(preset, variant, device, args.hr_size, args.batch)
        torch._dynamo.reset()
        out[f"{backend}_s"] = first_compiled_step_s(model, hr, lr, backend)
        print(f"trace time, backend {backend}: {out[f'{backend}_s']:.1f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--preset", default="df2k-4x")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--hr-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--inductor", action="store_true", help="also compile the training loss with Inductor")
    parser.add_argument("--inductor-preset", default="tiny-4x", help="a preset, or <preset>-narrow")
    parser.add_argument("--narrow", action="store_true", help="the preset's architecture, widths / 8")
    parser.add_argument("--trace-times", action="store_true", help="also time Dynamo's and AOT's compile")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.reps, args.hr_size = "tiny-4x", 1, 32
    torch.set_num_threads(1)
    device = torch.device(args.device)
    preset = narrow(args.preset) if args.narrow else args.preset
    payload = {
        "env": environment(device),
        "preset": preset.name if args.narrow else preset,
        "hr_size": args.hr_size,
        "batch": args.batch,
        "command": " ".join(sys.argv),
        "results": [measure(args, preset, v, device) for v in args.variants.split(",")],
    }
    name = f"bench_host_{payload['preset']}"
    # written after each part: a run stopped from outside keeps the eager numbers
    write_json(name, payload, args.out)
    for result in payload["results"]:
        result.update(measure_breaks(args, preset, result["variant"], device))
        write_json(name, payload, args.out)
    if args.trace_times:
        payload["trace_times"] = trace_times(args, preset, args.variants.split(",")[0], device)
        write_json(name, payload, args.out)
    if args.inductor:
        payload["inductor"] = inductor_kernels(args, device)
        print(f"inductor: {payload['inductor']}", flush=True)
    print(f"wrote {write_json(name, payload, args.out)}")


if __name__ == "__main__":
    main()
