"""Benchmark a 16-step conditional flow stack (one SRFlow level) end to end.

Shape: B16, C12, 80x80, conditioning 320 channels, subnet width 64 (SRFlow 4x level 1), 16
coupling steps (actnorm, 1x1 conv, injector, coupling). Providers:

* ``eager``: stored-activation autograd over the reference ops (the official maths);
* ``compile``: torch.compile of ``eager``;
* ``checkpoint``: torch.utils.checkpoint (non-reentrant) around every step of ``eager``, the
  openai/glow approach;
* ``ms-<backend>``: FlowSequence(memory_saving=True) with that flowkernels backend.

Modes: ``fwd`` and ``inv`` without grad, ``full`` = forward + backward of
``sum(z * g) + sum(logdet)`` w.r.t. all parameters (the conditioning frozen, as with a frozen
RRDB). Reports time and peak memory above the inputs and parameters.

    python -m benchmarks.bench_stack [--device cuda] [--smoke] [--layouts nchw,channels_last] [--out DIR]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.checkpoint import checkpoint

import flowkernels as fk
from benchmarks.common import Unsupported, add_common_args, environment, sweep, write_json
from flowkernels import dispatch

FULL = {"batch": 16, "channels": 12, "height": 80, "width": 80, "cond": 320, "hidden": 64, "depth": 16}
SMOKE = {"batch": 2, "channels": 12, "height": 8, "width": 8, "cond": 8, "hidden": 8, "depth": 3}


def build_stack(case: dict, device: torch.device, generator_seed: int = 0) -> fk.FlowSequence:
    """A trained-like stack: data-initialised ActNorms, non-zero last subnet layers."""
    torch.manual_seed(generator_seed)
    c, cond = case["channels"], case["cond"]
    steps = [fk.FlowStep(c, fk.CondAffineCoupling(c, cond, case["hidden"])) for _ in range(case["depth"])]
    seq = fk.FlowSequence(steps).to(device)
    with torch.no_grad():
        for m in seq.modules():
            if isinstance(m, fk.Conv2dZeros):
                for p in (m.weight, m.bias, m.logs):
                    p.normal_(0.0, 0.02)
    x, y = inputs(case, device)
    with fk.use_backend("reference"):
        fk.initialize_actnorms(seq, lambda: seq(x, y))
    return seq


def inputs(case: dict, device: torch.device, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    b, h, w = case["batch"], case["height"], case["width"]
    x = torch.randn(b, case["channels"], h, w, device=device).contiguous(memory_format=fmt)
    cond = torch.randn(b, case["cond"], h, w, device=device).contiguous(memory_format=fmt)
    return x, cond


def factory(case: dict, provider: str, mode: str, device: torch.device, stacks: dict):
    channels_last = case["layout"] == "channels_last"
    x, cond = inputs(case, device, channels_last)
    seq = stacks["seq"]
    if channels_last:
        seq = seq.to(memory_format=torch.channels_last)
    backend = provider.removeprefix("ms-") if provider.startswith("ms-") else "reference"
    if backend != "reference" and dispatch.refusals(backend, x):
        raise Unsupported("; ".join(dispatch.refusals(backend, x)))
    for step in seq.steps:
        step.backend = backend
    seq.memory_saving = provider.startswith("ms-")
    params = [p for p in seq.parameters() if p.requires_grad]
    g = torch.randn_like(x)

    if provider == "checkpoint":

        def run(inp: torch.Tensor, reverse: bool = False):
            ld = None
            for step in reversed(seq.steps) if reverse else seq.steps:
                fn = step.inverse if reverse else step
                inp, ld = checkpoint(fn, inp, cond, ld, use_reentrant=False)
            return inp, ld
    elif provider == "compile":
        compiled = torch.compile(seq)
        compiled_inv = torch.compile(seq.inverse)

        def run(inp: torch.Tensor, reverse: bool = False):
            return compiled_inv(inp, cond) if reverse else compiled(inp, cond)
    else:

        def run(inp: torch.Tensor, reverse: bool = False):
            return seq.inverse(inp, cond) if reverse else seq(inp, cond)

    if mode in ("fwd", "inv"):

        def no_grad() -> object:
            with torch.no_grad():
                return run(x, reverse=mode == "inv")

        return no_grad, 0

    def full() -> object:
        z, ld = run(x)
        return torch.autograd.grad((z * g).sum() + ld.sum(), params)

    return full, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--providers", default="eager,compile,checkpoint,ms-reference,ms-triton,ms-cuda")
    parser.add_argument("--modes", default="fwd,inv,full")
    parser.add_argument("--layouts", default="nchw,channels_last")
    args = parser.parse_args()
    device = torch.device(args.device)
    base = SMOKE if args.smoke else FULL
    stacks = {"seq": build_stack(base, device)}
    cases = [{**base, "layout": layout} for layout in args.layouts.split(",")]
    rows = sweep(
        "stack16",
        cases,
        args.providers.split(","),
        args.modes.split(","),
        lambda case, p, m: factory(case, p, m, device, stacks),
        device,
        None,
    )
    path = write_json("bench_stack", {"env": environment(device), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
