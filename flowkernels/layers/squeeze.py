"""Squeeze (space-to-depth) as an invertible layer with zero log-determinant."""

from __future__ import annotations

from torch import Tensor

from .. import reference
from ._contract import check_flow_input
from .base import InvertibleModule

__all__ = ["Squeeze"]


class Squeeze(InvertibleModule):
    """(B, C, H, W) -> (B, C*f*f, H/f, W/f) in the official SRFlow/Glow channel order.

    Args:
        factor: f (2 in SRFlow). H and W must be divisible by f.
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor: expected a positive integer, got {factor}")
        self.factor = factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    def _check_input(self, x: Tensor, cond: Tensor | None) -> None:
        check_flow_input(x)

    def _run(self, x: Tensor, cond: Tensor | None, logdet: Tensor, reverse: bool) -> Tensor:
        f = self.factor
        if reverse:
            if x.shape[1] % (f * f):
                raise ValueError(f"x: unsqueeze by {f} needs channels divisible by {f * f}, got {x.shape[1]}")
            return reference.unsqueeze2d(x, f)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x: squeeze by {f} needs H and W divisible by {f}, got {x.shape[2]}x{x.shape[3]}")
        return reference.squeeze2d(x, f)
