"""The same Glow in flowkernels (memory saving), normflows and FrEIA: time and peak memory of one
training step at growing depth, side by side in one run, on the CPU.

Architecture, every library: L levels of squeeze -> K flow steps -> split (all but the last
level), coupling subnets conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3 of width ``--hidden``,
a Gaussian latent; one training step = negative log-likelihood, backward, Adam step.

* flowkernels: ``fk.Glow`` (ActNorm, LU 1x1 conv, affine coupling; the subnets also carry
  ActNorms, as the official Glow's), memory saving on, backend "auto" (the C++ kernels here).
* normflows: its Glow recipe (``nf.flows.GlowBlock``: affine coupling, LU 1x1 conv, ActNorm;
  ``nf.MultiscaleFlow`` with ``nf.flows.Merge``), as in its README's Glow example.
* FrEIA: ``Fm.AllInOneBlock`` (affine coupling with soft clamping, global affine, fixed random
  orthogonal permutation: FrEIA's Glow-style block; it has no learned 1x1 convolution), squeezes
  with ``Fm.IRevNetDownsampling``, splits with ``Fm.Split`` in a ``Ff.GraphINN``.

Each (library, K) runs in a fresh subprocess with glibc's mmap threshold fixed at 64 KiB, so
that freed tensors go back to the OS and the resident set follows live memory. Peak memory
(``peak_mib``) is the rise of the peak resident set (VmHWM, reset through /proc/self/clear_refs)
during one training step over the resident set before it, after a warm-up step: parameters,
their gradients and Adam's state (which grow with K in every library, ``params_mib`` each) are
already allocated, so the rise is the step's activations and workspace. ``saved_mib`` counts the
bytes autograd saves for backward (``fk.saved_tensor_bytes``, parameters excluded), the
activation memory that memory saving removes. Time: the median of ``--steps`` further steps.

normflows and FrEIA are optional: a library that is not installed is skipped, with the reason
in the JSON. Run (the committed results: benchmarks/results/cpu-<date>/README.md):

    python -m benchmarks.bench_peers --depths 4,8,16,32 --out benchmarks/results/cpu-$(date +%F)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.common import environment

LIBRARIES = ("flowkernels", "normflows", "FrEIA")
_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors return to the OS: RSS = live memory


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def _subnet(c_in: int, c_out: int, hidden: int) -> nn.Sequential:
    last = nn.Conv2d(hidden, c_out, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last
    )


def build_flowkernels(levels: int, depth: int, hidden: int, x: Tensor) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    import flowkernels as fk  # noqa: PLC0415

    glow = fk.Glow(x.shape[1], levels, depth, hidden, lu=True, memory_saving=True)
    glow.initialize_(x)
    return glow, lambda v: -glow.log_prob(v).mean()


def build_normflows(levels: int, depth: int, hidden: int, x: Tensor) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    import normflows as nf  # noqa: PLC0415

    c, h, w = x.shape[1:]
    q0, merges, flows = [], [], []
    for i in range(levels):  # normflows' Glow example, generative order (latent -> data)
        flows.append(
            [
                nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, split_mode="channel", scale=True)
                for _ in range(depth)
            ]
            + [nf.flows.Squeeze()]
        )
        if i > 0:
            merges.append(nf.flows.Merge())
            shape = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        else:
            shape = (c * 2 ** (levels + 1), h // 2**levels, w // 2**levels)
        q0.append(nf.distributions.DiagGaussian(shape))
    model = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)
    with torch.no_grad():
        model.forward_kld(x)  # ActNorm's data-dependent init happens on the first batch
    return model, lambda v: model.forward_kld(v)


def build_freia(levels: int, depth: int, hidden: int, x: Tensor) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    import FrEIA.framework as Ff  # noqa: PLC0415
    import FrEIA.modules as Fm  # noqa: PLC0415

    nodes = [Ff.InputNode(*x.shape[1:], name="x")]
    last, flat_outputs = nodes[0].out0, []
    for level in range(levels):
        nodes.append(Ff.Node(last, Fm.IRevNetDownsampling, {}))
        for _ in range(depth):
            block = {
                "subnet_constructor": lambda ci, co: _subnet(ci, co, hidden),
                "affine_clamping": 2.0,
                "permute_soft": True,
            }
            nodes.append(Ff.Node(nodes[-1], Fm.AllInOneBlock, block))
        last = nodes[-1].out0
        if level < levels - 1:
            split = Ff.Node(last, Fm.Split, {"n_sections": 2, "dim": 0})
            flat = Ff.Node(split.out1, Fm.Flatten, {})
            nodes += [split, flat]
            flat_outputs.append(flat.out0)
            last = split.out0
    top = Ff.Node(last, Fm.Flatten, {})
    concat = Ff.Node([*flat_outputs, top.out0], Fm.Concat, {"dim": 0})
    nodes += [top, concat, Ff.OutputNode(concat)]
    inn = Ff.GraphINN(nodes)

    def loss(v: Tensor) -> Tensor:
        z, log_jac = inn(v)
        return (0.5 * z.pow(2).sum(1) - log_jac).mean()

    return inn, loss


BUILDERS = {"flowkernels": build_flowkernels, "normflows": build_normflows, "FrEIA": build_freia}
MODULES = {"flowkernels": "flowkernels", "normflows": "normflows", "FrEIA": "FrEIA"}


def measure(library: str, levels: int, depth: int, hidden: int, batch: int, size: int, steps: int) -> dict:
    """One (library, depth) in this process: peak memory of the first training step, then the
    median time of ``steps`` more."""
    import flowkernels as fk  # noqa: PLC0415 (saved_tensor_bytes)

    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size) - 0.5
    model, loss_fn = BUILDERS[library](levels, depth, hidden, x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in a training loop
        loss_fn(x).backward()
        optimizer.step()

    _, saved = fk.saved_tensor_bytes(lambda: loss_fn(x), exclude=model.parameters())
    step()  # warm-up: allocates the gradients and Adam's state, which grow with the parameters
    rss = _status("VmRSS")
    _reset_peak()
    step()
    peak = _status("VmHWM") - rss
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "library": library,
        "depth": depth,
        "step_ms": 1e3 * statistics.median(times),
        "step_ms_all": [round(1e3 * t, 1) for t in times],
        "peak_mib": peak / 2**20,
        "saved_mib": saved / 2**20,
        "parameters": sum(p.numel() for p in model.parameters()),
        "params_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }


def _unavailable(library: str) -> str | None:
    try:
        importlib.import_module(MODULES[library])
    except ImportError as exc:
        return f"{library} is not installed ({exc}); pip install {library}"
    return None


def _version(library: str) -> str | None:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version(library)
    except Exception:  # noqa: BLE001 - a version is informative only
        return None


def run(args: argparse.Namespace) -> dict:
    rows, skipped = [], {}
    for library in args.libraries:
        reason = _unavailable(library)
        if reason is not None:
            skipped[library] = reason
            print(f"skip {library}: {reason}", flush=True)
            continue
        for depth in args.depths:
            cmd = [sys.executable, "-m", "benchmarks.bench_peers", "--child", library, "--depths", str(depth)]
            cmd += ["--levels", str(args.levels), "--hidden", str(args.hidden), "--batch", str(args.batch)]
            cmd += ["--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **_MMAP_ENV}, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{library} K={depth} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{library:12s} K={depth:3d}: {row['step_ms']:8.1f} ms/step, peak +{row['peak_mib']:7.1f} MiB, "
                f"saved {row['saved_mib']:7.2f} MiB",
                flush=True,
            )
    return {
        "benchmark": "bench_peers",
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
        "environment": {**environment(torch.device("cpu")), "threads": args.threads},
        "versions": {lib: _version(lib) for lib in LIBRARIES},
        "skipped": skipped,
        "rows": rows,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    metrics = [
        ("step_ms", "time per training step (ms)"),
        ("peak_mib", "peak memory rise (MiB)"),
        ("saved_mib", "autograd saved tensors (MiB)"),
    ]
    for ax, (key, label) in zip(axes, metrics):
        for library in LIBRARIES:
            rows = [r for r in result["rows"] if r["library"] == library]
            if rows:
                ax.plot([r["depth"] for r in rows], [r[key] for r in rows], marker="o", label=library)
        ax.set_xlabel("flow steps per level (K)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    c = result["config"]
    fig.suptitle(
        f"Glow training step on the CPU: L={c['levels']}, hidden {c['hidden']}, batch {c['batch']}, "
        f"3x{c['size']}x{c['size']}, {c['threads']} thread(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8, 16, 32])
    parser.add_argument(
        "--libraries", type=lambda s: s.split(","), default=list(LIBRARIES), help=f"comma-separated, of {LIBRARIES}"
    )
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after the measured one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_peers.json and bench_peers.png")
    parser.add_argument("--child", choices=LIBRARIES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.libraries) - set(LIBRARIES))
    if unknown:
        parser.error(f"--libraries: unknown {unknown}; expected some of {LIBRARIES}")
    torch.set_num_threads(args.threads)
    if args.child is not None:
        row = measure(args.child, args.levels, args.depths[0], args.hidden, args.batch, args.size, args.steps)
        print(json.dumps(row))
        return
    result = run(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_peers.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(result, args.out / "bench_peers.png")
        print(f"wrote {args.out / 'bench_peers.json'} and {args.out / 'bench_peers.png'}")


if __name__ == "__main__":
    main()
