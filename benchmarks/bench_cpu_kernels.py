"""pytest-benchmark: the C++ CPU kernels of flowkernels._C against the eager reference, on CPU.

Reports only; nothing here asserts on time. Each group (op, direction, shape) has a ``cpp`` and a
``reference`` row. The reference rows are the oracle functions of ``flowkernels.reference`` plus
the in-place log-det update, i.e. what ``backend="reference"`` runs after folding.

    pytest benchmarks/bench_cpu_kernels.py --benchmark-only
    FLOWKERNELS_BENCH_ROUNDS=3 pytest benchmarks/bench_cpu_kernels.py --benchmark-only -q   # quick

Each case runs a fixed number of rounds (FLOWKERNELS_BENCH_ROUNDS, default 20) after one warm-up
round, so the whole file takes seconds, not minutes. Needs the extension built in place
(``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from flowkernels import reference
from flowkernels._loader import load_extension

EPS = 1e-4
ROUNDS = int(os.environ.get("FLOWKERNELS_BENCH_ROUNDS", "20"))

SHAPES = {
    "b2-c12-40x40": (2, 12, 40, 40),  # SRFlow level 1 at half resolution
    "b2-c96-10x10": (2, 96, 10, 10),  # SRFlow level 3 (top) channels
}


@pytest.fixture(scope="module", autouse=True)
def _extension():
    return load_extension()


def _run(benchmark, fn: Callable[[], object], group: str, nbytes: int) -> None:
    benchmark.group = group
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def _coupling_case(shape_id: str):
    b, c, height, width = SHAPES[shape_id]
    passive = c // 2
    x = torch.randn(b, c, height, width)
    h = torch.randn(b, 2 * (c - passive), height, width)
    return x, h, torch.zeros(b), passive


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@pytest.mark.parametrize("direction", ["fwd", "inv", "bwd"])
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_affine_coupling(benchmark, shape_id: str, direction: str, impl: str):
    x, h, ld, passive = _coupling_case(shape_id)
    ops = torch.ops.flowkernels
    if direction == "bwd":
        g, gl = torch.randn_like(x), torch.randn(x.shape[0])
        args = (x, h, g, gl, passive, True, EPS, False)
        fn = (
            (lambda: ops.affine_coupling_bwd(*args))
            if impl == "cpp"
            else (lambda: reference.affine_coupling_bwd(*args))
        )
        nbytes = 5 * x.numel() * 4 + 2 * h.numel() * 4
    else:
        cpp_op = ops.affine_coupling_fwd if direction == "fwd" else ops.affine_coupling_inv
        ref_op = reference.affine_coupling_fwd if direction == "fwd" else reference.affine_coupling_inv

        def ref():
            y, dlogdet = ref_op(x, h, passive, True, EPS)
            ld.add_(dlogdet)
            return y

        fn = (lambda: cpp_op(x, h, ld, passive, True, EPS)) if impl == "cpp" else ref
        nbytes = 2 * x.numel() * 4 + h.numel() * 4
    _run(benchmark, fn, f"affine_coupling_{direction} {shape_id}", nbytes)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@pytest.mark.parametrize("direction", ["fwd", "inv", "bwd"])
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_channel_affine(benchmark, shape_id: str, direction: str, impl: str):
    b, c, height, width = SHAPES[shape_id]
    x = torch.randn(b, c, height, width)
    matrix = torch.eye(c) + torch.randn(c, c) / (2.0 * c**0.5)
    matrix_inv = torch.linalg.inv(matrix.double()).float()
    offset, inv_offset = torch.randn(c), torch.randn(c)
    term, ld = torch.tensor(1.0), torch.zeros(b)
    ops = torch.ops.flowkernels
    if direction == "bwd":
        g = torch.randn_like(x)
        args = (x, g, matrix, matrix_inv, inv_offset)
        fn = (lambda: ops.channel_affine_bwd(*args)) if impl == "cpp" else (lambda: reference.channel_affine_bwd(*args))
        nbytes = 4 * x.numel() * 4
    else:
        # The inverse is the same map with the inverse parameters (flowkernels.ops.actnorm_conv.fold).
        m, off = (matrix, offset) if direction == "fwd" else (matrix_inv, inv_offset)

        def ref():
            ld.add_(term)
            return reference.channel_affine(x, m, off)

        fn = (lambda: ops.channel_affine_fwd(x, m, off, term, ld)) if impl == "cpp" else ref
        nbytes = 2 * x.numel() * 4
    _run(benchmark, fn, f"channel_affine_{direction} {shape_id}", nbytes)
