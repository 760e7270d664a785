"""Random draws that trace under ``torch.compile`` with dynamic shapes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def draw(
    fn: Callable[..., Tensor],
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``fn(shape)`` (``torch.rand`` or ``torch.randn``) on ``device``: from ``generator`` on the
    generator's own device, then moved, or from the global RNG when None. Without a generator
    the argument is left out: ``randn(..., generator=None)`` is another overload, one that rejects
    the symbolic sizes of a compiled graph with dynamic shapes."""
    if generator is None:
        return fn(tuple(shape), device=device, dtype=dtype)
    return fn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
