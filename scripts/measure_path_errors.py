"""How far each fp32 path of an SRFlow level is from float64 stored-activation autograd (CPU).

The paths: stored-activation autograd in fp32 (the yardstick), memory saving on the reference
backend, and memory saving on the C++ kernels per step and level-batched, each C++ path in every
instruction-set variant this CPU runs. For each, the worst relative error over z, the log-det
and every gradient (x, cond, parameters), and its ratio to the yardstick's.

Two parts:

* ``issue16``: the input of the failing test of issue 16 (the seed of
  ``test_batched_equals_per_step[recompute-per-step-forward-saving-cuda]``), with the ReLU input
  closest to its kink in float64, and the C++ per-step path against a float64 oracle whose
  ReLUs are given the sides this path's own forward took (the "kink-consistent" oracle);
* ``seeds``: kink-free inputs (tests/oracle.py) of 8-step levels, both directions.

    PYTHONPATH=. python scripts/measure_path_errors.py [--seeds 24] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import zlib

import torch
from torch import nn

import flowkernels as fk
from flowkernels.cpu_isa import supported_cpu_isas, use_cpu_isa
from tests.helpers import level_inputs, trained_level
from tests.oracle import float64_margin, level_case, outputs_and_grads, reference_of
from tests.tolerances import rel_err

C, COND, HW = 12, 6, 6
ISSUE16_TEST = "tests/test_cond_batching.py::test_batched_equals_per_step[recompute-per-step-forward-saving-cuda]"


def _paths() -> dict[str, tuple[str, bool, bool, str | None]]:
    """name -> (backend, memory saving, level batching, C++ ISA variant)."""
    paths = {"reference, memory saving": ("reference", True, False, None)}
    for isa in supported_cpu_isas():
        paths[f"C++ {isa}, memory saving, per-step"] = ("cuda", True, False, isa)
        paths[f"C++ {isa}, memory saving, batched"] = ("cuda", True, True, isa)
    return paths


def _run_path(seq: fk.FlowSequence, case: tuple, reverse: bool, path: tuple) -> list[torch.Tensor]:
    backend, saving, batching, isa = path
    s = copy.deepcopy(seq)
    s.memory_saving = saving
    s.set_cond_batching(batching, chunk_bytes=0)
    with fk.use_backend(backend), use_cpu_isa(isa) if isa else contextlib.nullcontext():
        return outputs_and_grads(s, *case, reverse)


def _errors(got: list[torch.Tensor], oracle: list[torch.Tensor], names: list[str]) -> tuple[float, str]:
    errors = {n: rel_err(g, o) for n, g, o in zip(names, got, oracle)}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def _relu_sides(seq: nn.Module, run) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The sign of the inputs of every ReLU of ``seq`` (by name) at its last call in ``run()``:
    in a memory-saving step, the backward's recompute, whose masks the gradients use."""
    sides: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in seq.named_modules():
        if isinstance(m, nn.ReLU):
            handles.append(
                m.register_forward_pre_hook(lambda _, args, n=name: sides.__setitem__(n, args[0].detach() > 0))
            )
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return sides


def _kink_consistent_oracle(seq: fk.FlowSequence, case: tuple, sides: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Float64 stored-activation autograd whose ReLUs take the sides in ``sides``."""
    oracle = copy.deepcopy(seq).double()
    oracle.memory_saving = False
    oracle.set_cond_batching(False)

    def forced(side: torch.Tensor):  # noqa: ANN202
        def hook(_: nn.Module, args: tuple) -> tuple:
            v = args[0]
            # only inputs within rounding of 0 differ: move them to +-1e-12, keeping d(input) = 1
            flip = (v > 0) != side
            target = torch.where(side, 1e-12, -1e-12).to(v.dtype)
            return (v + torch.where(flip, target - v, torch.zeros_like(v)).detach(),)

        return hook

    for name, m in oracle.named_modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_pre_hook(forced(sides[name]))
    with fk.use_backend("reference"):
        return outputs_and_grads(oracle, *case)


def issue16() -> dict:
    torch.manual_seed(zlib.crc32(ISSUE16_TEST.encode()))
    x, cond, cot, cot_ld = level_inputs(2, C, COND, HW)
    with fk.use_backend("cuda"):
        seq = trained_level(8, C, COND, x, cond, memory_saving=True)
    case = (x, cond, cot, cot_ld)
    ref = reference_of(seq, *case)
    out = {"float64 ReLU margin": ref.margin, "fp32 stored activations": _errors(ref.plain, ref.oracle, ref.names)}
    for name, path in _paths().items():
        out[name] = _errors(_run_path(seq, case, False, path), ref.oracle, ref.names)
    # The C++ per-step path against the oracle that takes the ReLU sides of its recompute
    per_step = copy.deepcopy(seq)
    per_step.set_cond_batching(False)
    with fk.use_backend("cuda"):
        sides = _relu_sides(per_step, lambda: outputs_and_grads(per_step, *case))
        got = outputs_and_grads(per_step, *case)
    f64_sides = _relu_sides_f64(seq, x, cond)
    flips = {n: int((sides[n] != f64_sides[n]).sum()) for n in sides if bool((sides[n] != f64_sides[n]).any())}
    out["ReLUs whose inputs the C++ per-step recompute puts on the other side than float64"] = flips
    out["C++ per-step vs the kink-consistent float64 oracle"] = _errors(
        got, _kink_consistent_oracle(seq, case, sides), ref.names
    )
    return out


def _relu_sides_f64(seq: fk.FlowSequence, x: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
    oracle = copy.deepcopy(seq).double()
    oracle.set_cond_batching(False)
    with fk.use_backend("reference"), torch.no_grad():
        return _relu_sides(oracle, lambda: oracle(x.double(), cond.double()))


def seeds(n: int) -> list[dict]:
    rows = []
    for seed in range(n):
        torch.manual_seed(seed)
        reverse = bool(seed % 2)
        lc = level_case(8, C, COND, HW, reverse=reverse)
        case = (lc.x, lc.cond, lc.cot, lc.cot_ld)
        ref = lc.reference()
        plain, _ = _errors(ref.plain, ref.oracle, ref.names)
        row = {"seed": seed, "reverse": reverse, "margin": float64_margin(lc.seq, lc.x, lc.cond, reverse)}
        row["fp32 stored activations"] = plain
        for name, path in _paths().items():
            err, _ = _errors(_run_path(lc.seq, case, reverse, path), ref.oracle, ref.names)
            row[name] = err
            row[f"{name} / fp32 stored"] = err / plain
        rows.append(row)
        print(f"seed {seed}: fp32 stored {plain:.2e}, worst ratio {max(v for k, v in row.items() if '/' in k):.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=24)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "isas": supported_cpu_isas()},
        "torch": torch.__version__,
        "issue16": issue16(),
    }
    for key, value in result["issue16"].items():
        print(f"{key:70s} {value}")
    rows = seeds(args.seeds)
    ratios = [v for r in rows for k, v in r.items() if "/" in k]
    result["seeds"] = rows
    result["summary"] = {"max ratio to fp32 stored activations": max(ratios, default=None), "draws": len(rows)}
    print(json.dumps(result["summary"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
