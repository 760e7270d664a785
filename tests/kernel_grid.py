"""The grid of the kernel tests (STYLE rule 11): kernel backends and devices, shapes, layouts, and
the inputs built on them. Shared by tests/test_kernels.py (every kernel backend against the
reference) and the backend-specific tests/test_cpp_kernels.py and tests/test_triton_kernels.py.

A backend that cannot run here (triton not installed, the interpreter off on a CPU, a CPU-only
build of the extension on a GPU) is skipped with its reasons, at test time. The extension itself
is required on every machine: tests/test_cpp_kernels.py::test_build_has_openmp fails without it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from flowkernels._loader import load_extension, load_triton_kernels
from flowkernels.cpu_isa import supported_cpu_isas, use_cpu_isa
from flowkernels.dispatch import refusals
from flowkernels.ops import SRFLOW_EPS, fold
from flowkernels.ops.actnorm_conv import ChannelAffine

EPS = SRFLOW_EPS  # SRFlow's affine_eps, the floor of every coupling scale

# The registered name of op <name> on each kernel backend: torch.ops.flowkernels.<name><suffix>.
OP_SUFFIX = {"cuda": "", "triton": "_triton"}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# The instruction-set variants of the C++ CPU kernels (flowkernels.cpu_isa), highest first: each
# runs on every machine that supports it, so CI on an AVX-512 machine also runs the AVX2 code of
# an AVX2-only one, and both run the baseline.
CPU_ISAS = ("avx512", "avx2", "baseline")
# (backend, device, C++ ISA variant): the compiled extension's C++ and CUDA kernels, the Triton
# kernels under the interpreter on a CPU (TRITON_INTERPRET=1, tests/conftest.py) and compiled on
# a GPU.
KERNELS = [
    *(pytest.param(("cuda", "cpu", isa), id=f"cpp_{isa}") for isa in CPU_ISAS),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cpu"), id="triton_interpreted"),
    pytest.param(("triton", "cuda"), id="triton_cuda", marks=pytest.mark.gpu),
]

# (B, C, H, W). The kernels see H * W pixels; the Triton interpreter's cost grows with the number
# of programs, so the shapes stay small while still reaching every code path.
SHAPES = [
    pytest.param((1, 4, 5, 7), id="b1-odd"),  # batch 1, odd H and W: scalar paths, one padded block
    pytest.param((2, 3, 7, 5), id="c3"),  # C = 3: odd split (passive 1 of 3)
    pytest.param((3, 5, 6, 6), id="c5"),  # C = 5: P % 4 == 0 but C % 4 != 0
    pytest.param((2, 12, 8, 10), id="c12-level1"),  # level-1 SRFlow channels, P % 4 == 0: float4 paths on GPU
    pytest.param((2, 24, 8, 10), id="c24-level2"),  # level 2: the widest one-thread-per-pixel map, a 32-channel block
    pytest.param((2, 96, 3, 5), id="c96-tiled"),  # level 3 / 4x top: the C x C map in two 64-channel tiles
    pytest.param((1, 192, 5, 6), id="c192-tiled"),  # 8x top level: three channel tiles, C + 1 = 193 columns
    pytest.param((2, 12, 7, 1), id="w1"),  # W = 1: the pixel stride is stride_h
]
# The bf16 subnet-output checks: batch 1 with odd sizes, level 1, and a tiled channel count.
BF16_SHAPES = [SHAPES[0], SHAPES[3], SHAPES[5]]

# (x channels_last, h channels_last): the subnet output may come back in another layout than the
# flow state. Ops with one layout-carrying input use the first two.
LAYOUTS = {
    "nchw": (False, False),
    "cl": (True, True),
    "x_nchw-h_cl": (False, True),
    "x_cl-h_nchw": (True, False),
}
X_LAYOUTS = {"nchw": False, "cl": True}
# passive = 0 (SRFlow's affine injector: every channel transformed) or C // 2 (the coupling)
PASSIVE = {"injector": lambda c: 0, "coupling": lambda c: c // 2}


def to_layout(t: Tensor, channels_last: bool) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def is_layout(t: Tensor, channels_last: bool) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def f64(*ts: Tensor) -> list[Tensor]:
    """The reference runs in float64 on the kernels' float32 inputs: the oracle's own rounding
    stays far below the tolerances."""
    return [t.double() for t in ts]


@dataclass(frozen=True)
class Kernel:
    """One kernel backend on one device (and C++ ISA variant), its ops registered."""

    backend: str
    device: str
    isa: str | None = None

    def op(self, name: str):
        return getattr(torch.ops.flowkernels, name + OP_SUFFIX[self.backend])


def kernel_backend(backend: str, device: str, isa: str | None = None) -> Kernel:
    """Load ``backend`` for tensors on ``device``, or skip the test with the reasons it cannot run.
    ``isa``: the C++ CPU variant the test needs (:func:`selected_isa` runs it), skipped where the
    CPU lacks it."""
    why = refusals(backend, torch.empty(1, 2, 1, 1, device=device))
    if why:
        pytest.skip(f"backend {backend!r} cannot run on {device} here: {'; '.join(why)}")
    if backend == "triton":
        load_triton_kernels()  # registers the *_triton ops
    else:
        load_extension()
    if isa is not None and isa not in supported_cpu_isas():
        pytest.skip(f"this CPU cannot run the {isa!r} variant of the C++ kernels (it runs {supported_cpu_isas()})")
    return Kernel(backend, device, isa)


def selected_isa(kernel: Kernel) -> contextlib.AbstractContextManager:
    """Run the C++ CPU kernels' variant of ``kernel`` inside the block (nothing for other kernels)."""
    return use_cpu_isa(kernel.isa) if kernel.isa is not None else contextlib.nullcontext()


def coupling_inputs(shape, passive: int, layout: str, device: str) -> tuple[Tensor, Tensor]:
    """Flow state and a subnet output whose raw scales reach s ~ 1e-3, so the inverse amplifies
    (x in the layout's first, h in its second memory format)."""
    b, c, height, width = shape
    x_cl, h_cl = LAYOUTS[layout]
    x = to_layout(torch.randn(shape, device=device), x_cl)
    h = to_layout(2.0 * torch.randn(b, 2 * (c - passive), height, width, device=device), h_cl)
    return x, h


def channel_map(c: int, pixels: int, device: str, reverse: bool = False) -> ChannelAffine:
    """ActNorm + 1x1 conv folded into one channel map (``reverse``: the inverse map), from
    trained-like parameters: W orthogonal plus noise, a random ActNorm."""
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    weight = (q + 0.1 * torch.randn(c, c, dtype=torch.float64)).float()
    logs, bias = 0.2 * torch.randn(c), 0.3 * torch.randn(c)
    cmap = fold(weight, logs, bias, pixels, reverse=reverse)
    return ChannelAffine(*(t.to(device) for t in cmap))
