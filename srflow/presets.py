"""SRFlow architecture presets: frozen dataclasses named after the official configs.

Official presets (``code/confs/SRFlow_{DF2K_4X,DF2K_8X,CelebA_8X}.yml``, DESIGN.md section 5):

========== ===== ===== ============== === == ==============================
name       scale nb    blocks         L   K  parameters (state_dict)
========== ===== ===== ============== === == ==============================
df2k-4x    4     23    1, 8, 15, 22   3   16 39,541,811
df2k-8x    8     23    1, 3, 5, 7     4   16 50,821,891
celeba-8x  8     8     1, 3, 5, 7     4   16 40,030,531
========== ===== ===== ============== === == ==============================

All three use nf 64, gc 32, coupling hidden width 64 and 2 transitional steps per level, so the
conditioning tensor has nf * (1 + len(blocks)) = 320 channels.

Small presets for CPU tests and demos (not official; they keep the official layer/key structure
and levels, with fewer and narrower layers):

* ``tiny-4x``: scale 4, nf 32, gc 16, nb 2, blocks (0, 1) (96 conditioning channels), K 2,
  hidden 32. A 32x32 HR crop runs forward + backward in well under a second on one CPU core.
* ``tiny-8x``: the same at scale 8 (4 levels).

The number of levels is not a free parameter: the last level works at LR/2 (the RRDB feature
``fea_up0``) and each level halves the resolution, so ``L = log2(scale) + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SRFlowPreset", "PRESETS", "get_preset"]

SUPPORTED_SCALES = (4, 8)


@dataclass(frozen=True)
class SRFlowPreset:
    """Architecture of one SRFlow model.

    Attributes:
        name: preset name (``"df2k-4x"`` ...).
        scale: super-resolution factor (4 or 8).
        nb: number of RRDB blocks in the encoder trunk.
        block_idxs: 0-based trunk indices whose outputs are concatenated into the conditioning,
            in this order (official ``stackRRDB.blocks``).
        K: conditional coupling steps per level.
        nf: RRDB feature width (64).
        gc: RRDB dense-block growth channels (32).
        hidden: width of the injector/coupling subnets (64).
        n_transitional: steps per level without coupling (ActNorm + 1x1 conv) after the squeeze.
    """

    name: str
    scale: int
    nb: int
    block_idxs: tuple[int, ...]
    K: int = 16
    nf: int = 64
    gc: int = 32
    hidden: int = 64
    n_transitional: int = 2

    def __post_init__(self) -> None:
        if self.scale not in SUPPORTED_SCALES:
            raise ValueError(f"scale: expected one of {SUPPORTED_SCALES}, got {self.scale}")
        for field_name in ("nb", "K", "nf", "gc", "hidden"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field_name}: expected a positive integer, got {value!r}")
        if not isinstance(self.n_transitional, int) or self.n_transitional < 0:
            raise ValueError(f"n_transitional: expected a non-negative integer, got {self.n_transitional!r}")
        if not isinstance(self.block_idxs, tuple) or not self.block_idxs:
            raise ValueError(f"block_idxs: expected a non-empty tuple of trunk indices, got {self.block_idxs!r}")
        if len(set(self.block_idxs)) != len(self.block_idxs):
            raise ValueError(f"block_idxs: indices must be distinct, got {self.block_idxs}")
        bad = [i for i in self.block_idxs if not isinstance(i, int) or not 0 <= i < self.nb]
        if bad:
            raise ValueError(f"block_idxs: indices must lie in [0, nb={self.nb}), got {self.block_idxs}")

    @property
    def L(self) -> int:  # noqa: N802 (the paper's and the official config's name)
        """Number of flow levels: log2(scale) + 1 (3 for 4x, 4 for 8x)."""
        return int(math.log2(self.scale)) + 1

    @property
    def cond_channels(self) -> int:
        """Channels of each level's conditioning tensor: nf * (1 + len(block_idxs)) (320 official)."""
        return self.nf * (1 + len(self.block_idxs))


PRESETS: dict[str, SRFlowPreset] = {
    p.name: p
    for p in (
        SRFlowPreset("df2k-4x", scale=4, nb=23, block_idxs=(1, 8, 15, 22)),
        SRFlowPreset("df2k-8x", scale=8, nb=23, block_idxs=(1, 3, 5, 7)),
        SRFlowPreset("celeba-8x", scale=8, nb=8, block_idxs=(1, 3, 5, 7)),
        SRFlowPreset("tiny-4x", scale=4, nb=2, block_idxs=(0, 1), K=2, nf=32, gc=16, hidden=32),
        SRFlowPreset("tiny-8x", scale=8, nb=2, block_idxs=(0, 1), K=2, nf=32, gc=16, hidden=32),
    )
}


def get_preset(preset: str | SRFlowPreset) -> SRFlowPreset:
    """Look up a preset by name (or pass an :class:`SRFlowPreset` through)."""
    if isinstance(preset, SRFlowPreset):
        return preset
    if not isinstance(preset, str):
        raise TypeError(f"preset: expected a preset name or SRFlowPreset, got {type(preset).__name__}")
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown name {preset!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[preset]
