"""Measure what memory saving costs in accuracy and saves in memory at SRFlow depth (CPU).

For several seeds: a trained-like 54-step conditional sequence (2 transitional + 52 coupling
steps, C12, 6x6, 6 conditioning channels; data-initialised ActNorms, non-zero last layers):

* the round-trip error max|inverse(forward(x)) - x|;
* the worst relative gradient error (input, conditioning, every parameter) of memory saving
  against stored-activation autograd, for each backend given;

and the bytes autograd saves for backward at depth 8 and 64, memory saving against plain.

    PYTHONPATH=. python scripts/measure_memory_saving.py [--seeds 5] [--backends reference,cuda]
"""

from __future__ import annotations

import argparse
import copy

import torch

import flowkernels as fk
from tests.helpers import trained_level
from tests.tolerances import rel_err

C, COND, HW, BATCH = 12, 6, 6, 2


def _grads(seq: fk.FlowSequence, x: torch.Tensor, cond: torch.Tensor, cot: torch.Tensor, cot_ld: torch.Tensor):
    x, cond = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    z, ld = seq(x, cond)
    return torch.autograd.grad((z * cot).sum() + (ld * cot_ld).sum(), [x, cond, *seq.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--backends", default="reference,cuda")
    args = parser.parse_args()
    for backend in args.backends.split(","):
        round_trips, grad_errors = [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            x, cond = torch.randn(BATCH, C, HW, HW), torch.randn(BATCH, COND, HW, HW)
            cot, cot_ld = torch.randn_like(x), torch.randn(BATCH)
            saving = trained_level(54, C, COND, x, cond)
            plain = copy.deepcopy(saving)
            plain.memory_saving = False
            for step in saving.steps:
                step.backend = backend
            with torch.no_grad():
                z, ld = saving.eval()(x, cond)
                round_trips.append((saving.inverse(z, cond, ld)[0] - x).abs().max().item())
            saving.train()
            with fk.use_backend("reference"):
                want = _grads(plain, x, cond, cot, cot_ld)
            got = _grads(saving, x, cond, cot, cot_ld)
            grad_errors.append(max(rel_err(g, w) for g, w in zip(got, want)))
        print(
            f"{backend}: 54-step round trip max |error| per seed {', '.join(f'{r:.1e}' for r in round_trips)}; "
            f"worst relative gradient error per seed {', '.join(f'{g:.1e}' for g in grad_errors)}"
        )
    torch.manual_seed(0)
    x, cond = torch.randn(BATCH, C, HW, HW), torch.randn(BATCH, COND, HW, HW)
    for depth in (8, 64):
        seq = trained_level(depth, C, COND, x, cond)
        sizes = {}
        for memory_saving in (True, False):
            seq.memory_saving = memory_saving
            with fk.use_backend("reference"):
                run = lambda seq=seq: seq(x.clone().requires_grad_(True), cond)  # noqa: E731
                sizes[memory_saving] = fk.saved_tensor_bytes(run, exclude=seq.parameters())[1]
        print(f"depth {depth}: bytes saved for backward: memory saving {sizes[True]:,}, plain {sizes[False]:,}")


if __name__ == "__main__":
    main()
