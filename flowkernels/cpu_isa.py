"""The instruction-set variant of the C++ CPU kernels (``flowkernels._C`` on CPU tensors).

Each hot loop of the C++ kernels is compiled for three x86-64 variants: ``"avx512"``
(x86-64-v4), ``"avx2"`` (x86-64-v3: AVX2 + FMA) and ``"baseline"`` (x86-64). By default a call
runs the best variant the CPU supports; :func:`set_cpu_isa` / :func:`use_cpu_isa` select a lower
one, so that one machine runs the code of another (an AVX-512 machine the AVX2 and baseline code)
and the tests cover every variant a machine supports. The variants compute the same maths and
differ only in float rounding (vector width, FMA contraction, order of partial sums).

``FLOWKERNELS_CPU_ISA`` (read when the extension loads) sets the initial variant, like PyTorch's
``ATEN_CPU_CAPABILITY``. The setting is process-wide; it does not affect CUDA or Triton kernels.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ._loader import load_extension, on_extension_load

__all__ = ["cpu_isa", "set_cpu_isa", "supported_cpu_isas", "use_cpu_isa"]


def cpu_isa() -> str:
    """The variant the C++ CPU kernels run now: ``"baseline"``, ``"avx2"`` or ``"avx512"``."""
    return load_extension().cpu_isa()


def supported_cpu_isas() -> list[str]:
    """The variants this CPU can run (and the build holds), lowest first."""
    return list(load_extension().supported_cpu_isas())


def set_cpu_isa(name: str) -> None:
    """Run the C++ CPU kernels' ``name`` variant from now on; ValueError naming the supported
    variants if this CPU cannot run it."""
    load_extension().set_cpu_isa(name)


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Run the C++ CPU kernels' ``name`` variant inside the block, then restore the previous one."""
    previous = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(previous)


@on_extension_load
def _initial_variant() -> None:
    name = os.environ.get("FLOWKERNELS_CPU_ISA")
    if name:
        try:
            set_cpu_isa(name)
        except ValueError as exc:
            raise ValueError(f"FLOWKERNELS_CPU_ISA: {exc}") from None
