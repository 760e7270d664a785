"""Launcher helpers and ``@triton.jit`` helpers shared by the Triton op files."""

from __future__ import annotations

import os
from dataclasses import dataclass

import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

__all__ = ["CouplingTiles", "coupling_tile", "launcher", "poison", "pow2_block", "round_to"]


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


# The coupling kernels (affine and additive) work on tiles of channels x pixels, channel block a
# power of two in [2, 64] covering C when C <= 64, so that in channels_last one tile row is a
# whole pixel's channels (contiguous). The tile is 1024 elements: at SRFlow level 1 (B16, C12,
# 80x80) that is 16 x 64, 1600 programs (12 per SM on 132 SMs), each thread holding 8 fp32 values
# per tensor (x, shift, raw) at 4 warps. Chosen by the H200 tile sweep of the affine kernels in
# benchmarks/results/nvidia-h200-2026-11-26-dev/triton-device-time.txt (1024 fastest, 8192
# spills, 8 warps gained nothing), taken on the kernels of 90d8e88, before 756d21d merged forward
# and inverse and 3b96f2d added the tile helper; not re-measured since, nor for the additive kernels.
_MIN_BLOCK_C = 2
_MAX_BLOCK_C = 64
_TILE = 1024
_NUM_WARPS = 4


@dataclass(frozen=True)
class CouplingTiles:
    """The launch of a coupling kernel over a (B, C, H, W) flow tensor: its channels, pixels
    per sample, the grid ``(pixel tiles, B, channel tiles)`` and the meta-parameters."""

    channels: int
    pixels: int
    grid: tuple[int, int, int]
    block_c: int
    block_p: int
    num_warps: int = _NUM_WARPS

    @classmethod
    def of(cls, x: Tensor) -> CouplingTiles:
        batch, c, height, width = x.shape
        block_c = pow2_block(c, _MIN_BLOCK_C, _MAX_BLOCK_C)
        block_p = _TILE // block_c
        grid = (triton.cdiv(height * width, block_p), batch, triton.cdiv(c, block_c))
        return cls(c, height * width, grid, block_c, block_p)

    @property
    def meta(self) -> dict[str, int]:
        """The launch keywords ``BLOCK_C``, ``BLOCK_P`` and ``num_warps``."""
        return {"BLOCK_C": self.block_c, "BLOCK_P": self.block_p, "num_warps": self.num_warps}


@triton.jit
def coupling_tile(C, HW, passive, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's tile of a :class:`CouplingTiles` grid: channels c (BLOCK_C) and pixels p
    (BLOCK_P) of sample b (grid axes 2, 0, 1), its bounds mask, which channels are active
    (c >= passive) and their index a into h. Returns ``(c, p, b as int64, tile_ok, active,
    act_ok, a)``."""
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = (p < HW)[None, :]
    active = (c >= passive) & (c < C)
    a = tl.where(active, c - passive, 0)
    return c, p, tl.program_id(1).to(tl.int64), (c < C)[:, None] & p_ok, active, active[:, None] & p_ok, a


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 ``v`` to ``dtype``; to bfloat16 by explicit round-to-nearest-even on the bits (what
    torch's ``.to(torch.bfloat16)`` does). Compiled Triton rounds to nearest even by default too,
    but the interpreter truncates; rounding here makes both backends agree with torch."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        v = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return v.to(dtype)
