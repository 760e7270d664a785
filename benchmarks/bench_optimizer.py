"""Adam's step over an SRFlow preset's trainable parameters: torch's default implementation
(``default``: ``foreach`` on CUDA, a loop over the parameters on the CPU), ``foreach`` and
``fused``, the one ``srflow train`` uses (it also skips a non-finite step on the device), with
the RRDB frozen (flow parameters only) and trainable (all of them).

Per point: the step's time (CUDA: triton's do_bench; CPU: a wall-clock loop; median and 20/80 %
quantiles, benchmarks/common.py), the ops it dispatches (each a kernel launch or more on a GPU,
bench_host.count_ops) and the parameter count. ``--threads`` sets the CPU's thread count.

    python -m benchmarks.bench_optimizer [--device cpu] [--preset df2k-4x] [--threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse

import torch

from srflow import SRFlow

from .bench_host import count_ops
from .common import add_common_args, bench, environment, write_json

# Adam's keyword arguments per implementation
IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def measure(model: SRFlow, rrdb_trainable: bool, implementation: str, device: torch.device) -> dict:
    """One (RRDB setting, implementation) point: time and ops of ``Adam.step`` on random gradients."""
    model.set_rrdb_trainable(rrdb_trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p).mul_(1e-3)
    opt = torch.optim.Adam(params, lr=1e-6, **IMPLEMENTATIONS[implementation])
    opt.step()  # the first step creates Adam's state
    ops = count_ops(opt.step)
    timing = bench(opt.step, device, warmup_ms=100, rep_ms=1000)
    return {
        "rrdb_trainable": rrdb_trainable,
        "implementation": implementation,
        "parameters": sum(p.numel() for p in params),
        "tensors": len(params),
        "ops_per_step": sum(ops.values()),
        **timing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--preset", default="df2k-4x")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.smoke:
        args.preset = "tiny-4x"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = SRFlow.from_preset(args.preset, seed=0).to(device)
    rows = []
    for rrdb_trainable in (False, True):
        for implementation in IMPLEMENTATIONS:
            row = measure(model, rrdb_trainable, implementation, device)
            rows.append(row)
            print(
                f"rrdb_trainable={rrdb_trainable} {implementation}: {row['ms']:.2f} ms "
                f"[{row['ms_q20']:.2f}, {row['ms_q80']:.2f}], {row['ops_per_step']} ops, "
                f"{row['parameters'] / 1e6:.1f} M parameters",
                flush=True,
            )
    env = {**environment(device), "threads": torch.get_num_threads() if device.type == "cpu" else None}
    path = write_json(f"bench_optimizer_{args.preset}", {"env": env, "preset": args.preset, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
