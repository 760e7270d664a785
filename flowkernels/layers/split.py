"""Split2d: factor out half of the channels under a learned Gaussian prior (Glow, SRFlow).

``z1 = z[:, :C - C//2]`` is kept; ``z2 = z[:, C - C//2:]`` is factored out. The prior is
``h = conv(z1)`` (a zero-initialised :class:`Conv2dZeros`, so it starts as N(0, 1)) with
``mean = h[:, 0::2]`` and ``logs = h[:, 1::2]``; the log-likelihood ``log N(z2; mean, exp(logs)^2)``
is added to the running ``logdet`` (the objective), as in the official code. The latent that the
official code returns for a split is ``eps = (z2 - mean) / exp(logs)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ._contract import check_flow_input, flow_precision
from .base import InvertibleModule
from .coupling import Conv2dZeros

__all__ = ["Split2d"]


class Split2d(InvertibleModule):
    """Learned-prior split over C channels (keys ``conv.weight``, ``conv.bias``, ``conv.logs``).

    ``forward(z) -> (z1, logdet + log p(z2 | z1))``; :meth:`encode` also returns ``eps``;
    ``inverse(z1, eps=...)`` rebuilds z, sampling ``eps ~ N(0, temperature^2)`` when not given.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"channels: a split needs at least 2 channels, got {channels}")
        self.channels = channels
        self.kept = channels - channels // 2
        self.conv = Conv2dZeros(self.kept, 2 * (channels - self.kept))

    def extra_repr(self) -> str:
        return f"{self.channels}, kept={self.kept}"

    def prior(self, z1: Tensor) -> Tensor:
        """h = conv(z1): (B, 2*(C - kept), H, W), mean = h[:, 0::2], logs = h[:, 1::2]."""
        return self.conv(z1).to(z1.dtype)

    def encode(self, z: Tensor, logdet: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, C, H, W) -> (z1 (B, kept, H, W), eps (B, C - kept, H, W), logdet + log p(z2|z1))."""
        check_flow_input(z, self.channels)
        h = self.prior(z[:, : self.kept])
        with flow_precision(z):
            z1, eps, logp = reference.split2d_fwd(z, h, self.kept)
        return z1, eps, logp if logdet is None else logdet + logp

    def forward(self, x: Tensor, cond: Tensor | None = None, logdet: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z1, _, logdet = self.encode(x, logdet)
        return z1, logdet

    def inverse(
        self,
        y: Tensor,
        cond: Tensor | None = None,
        logdet: Tensor | None = None,
        *,
        eps: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(z1, eps) -> (z, logdet - log p(z2|z1)); eps ~ N(0, temperature^2) when None."""
        check_flow_input(y, self.kept)
        out_shape = (y.shape[0], self.channels - self.kept, y.shape[2], y.shape[3])
        if eps is None:
            device = generator.device if generator is not None else y.device
            eps = torch.randn(out_shape, generator=generator, device=device).to(y.device) * temperature
        elif tuple(eps.shape) != out_shape:
            raise ValueError(f"eps: expected shape {out_shape}, got {tuple(eps.shape)}")
        h = self.prior(y)
        with flow_precision(y):
            z, logp = reference.split2d_inv(y, h, eps)
        return z, -logp if logdet is None else logdet - logp
