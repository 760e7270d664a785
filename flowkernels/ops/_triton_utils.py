"""Launcher helpers shared by the Triton op files."""

from __future__ import annotations

import os

import triton
from torch import Tensor
from torch.library import wrap_triton

__all__ = ["launcher", "poison", "pow2_block"]


def launcher(kernel: object) -> object:
    """``wrap_triton(kernel)`` so that torch.compile sees the launch; under ``TRITON_INTERPRET=1``
    ``triton.jit`` makes an InterpretedFunction, which has no JIT metadata for the traceable
    wrapper and is launched directly (what torch >= 2.13's ``wrap_triton`` does itself)."""
    return wrap_triton(kernel) if isinstance(kernel, triton.runtime.JITFunction) else kernel


def poison(*outputs: Tensor) -> None:
    """Fill fresh output buffers with NaN (tests set FLOWKERNELS_POISON_OUTPUTS=1, read at
    launch time), so elements a kernel forgets to write show up."""
    if os.environ.get("FLOWKERNELS_POISON_OUTPUTS") == "1":
        for t in outputs:
            t.fill_(float("nan"))


def pow2_block(c: int, lo: int, hi: int) -> int:
    """The smallest power of two >= ``c`` within [lo, hi] (lo a power of two): a channel block."""
    block = lo
    while block < c and block < hi:
        block *= 2
    return block
