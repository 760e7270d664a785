"""Measure the error of bf16 autocast (frozen-RRDB forward and subnets in bf16, the flow state
float32) against float32, on the official SRFlow fixtures (tests/data/official-srflow-small-*).

For each fixture and backend (level batching on, its default): the relative error (max|a - e| / max|e|)
against the official outputs of the NLL, the latents, the decode of the official latents, the
temperature-0 sample and the worst parameter gradient, once in float32 and once with everything
(RRDB, flow, backward) under ``torch.autocast(dtype=torch.bfloat16)``. The runs are those of
``tests/test_srflow_official.py`` (memory saving on).

    PYTHONPATH=. python scripts/measure_bf16_official.py [--backends cuda] [--scales 4x,8x]
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from tests.test_srflow_official import fixture, outputs
from tests.tolerances import rel_err


def errors(scale: str, backend: str, bf16: bool) -> dict[str, float]:
    fx = fixture(scale)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        out = outputs.__wrapped__(scale, backend, True, "cpu")
    grads = fx.grads()
    return {
        "nll": rel_err(out.nll, fx.tensors["nll"]),
        "latents": max(rel_err(z, w) for z, w in zip(out.latents, fx.latents())),
        "decode": rel_err(out.decode, fx.tensors["decode"]),
        "sample_t0": rel_err(out.sample_t0, fx.tensors["sample_t0"]),
        "grad_worst": max(rel_err(out.grads[name], g.float()) for name, g in grads.items()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cuda")
    parser.add_argument("--scales", default="4x,8x")
    args = parser.parse_args()
    rows = []
    for scale in args.scales.split(","):
        for backend in args.backends.split(","):
            for bf16 in (False, True):
                row = {"scale": scale, "backend": backend, "dtype": "bf16" if bf16 else "fp32"}
                row.update(errors(scale, backend, bf16))
                rows.append(row)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
