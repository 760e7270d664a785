"""Split2d: factor out half of the channels under a learned Gaussian prior (Glow, SRFlow).

``z1 = z[:, :C - C//2]`` is kept; ``z2 = z[:, C - C//2:]`` is factored out. The prior is
``h = conv(z1)`` (a zero-initialised :class:`Conv2dZeros`, so it starts as N(0, 1)) with
``mean = h[:, 0::2]`` and ``logs = h[:, 1::2]``; with ``cond_channels`` it is conditional,
``h = conv(cat(z1, cond))`` (the official Split2d's ``cond_channels`` option). The latent that the
official code returns for a split is ``eps = (z2 - mean) / exp(logs)``.

Two conventions for the log-det, both exact:

* :meth:`Split2d.encode` / ``forward`` / ``inverse`` add the log-likelihood
  ``log N(z2; mean, exp(logs)^2)`` to the running ``logdet`` (the objective), as the official code;
* :meth:`Split2d.standardize` / :meth:`Split2d.unstandardize` treat ``z -> (z1, eps)`` as the
  bijection it is, with log-det ``-sum(logs)`` (what :class:`~flowkernels.MultiScaleFlow` uses,
  so that its log-det is that of ``x -> latents`` and every latent is N(0, I) under the model).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._random import draw
from ._contract import check_cond, check_flow_input, flow_precision
from .base import InvertibleModule
from .coupling import Conv2dZeros

__all__ = ["Split2d"]


class Split2d(InvertibleModule):
    """Learned-prior split over C channels (keys ``conv.weight``, ``conv.bias``, ``conv.logs``).

    Args:
        channels: C (>= 2); kept = C - C//2 stay in the flow.
        cond_channels: channels of a conditioning tensor the prior also reads (0: none).

    ``forward(z, cond) -> (z1, logdet + log p(z2 | z1, cond))``; :meth:`encode` also returns
    ``eps``; ``inverse(z1, cond, eps=...)`` rebuilds z, sampling ``eps ~ N(0, temperature^2)``
    when not given. :meth:`standardize` / :meth:`unstandardize`: the bijection ``z <-> (z1, eps)``.
    """

    def __init__(self, channels: int, cond_channels: int = 0) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"channels: a split needs at least 2 channels, got {channels}")
        if cond_channels < 0:
            raise ValueError(f"cond_channels: expected a non-negative integer, got {cond_channels}")
        self.channels = channels
        self.cond_channels = cond_channels
        self.kept = channels - channels // 2
        self.conv = Conv2dZeros(self.kept + cond_channels, 2 * (channels - self.kept))

    def extra_repr(self) -> str:
        return f"{self.channels}, kept={self.kept}, cond_channels={self.cond_channels}"

    def prior(self, z1: Tensor, cond: Tensor | None = None) -> Tensor:
        """h = conv(z1) or conv(cat(z1, cond)): (B, 2*(C - kept), H, W), mean = h[:, 0::2],
        logs = h[:, 1::2]. cond: (B, cond_channels, H, W), ignored without ``cond_channels``."""
        check_cond(cond, z1, self.cond_channels)
        inp = torch.cat([z1, cond.to(z1.dtype)], dim=1) if self.cond_channels else z1
        return self.conv(inp).to(z1.dtype)

    def encode(
        self, z: Tensor, logdet: Tensor | None = None, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, C, H, W) -> (z1 (B, kept, H, W), eps (B, C - kept, H, W), logdet + log p(z2|z1))."""
        check_flow_input(z, self.channels)
        h = self.prior(z[:, : self.kept], cond)
        with flow_precision(z):
            z1, eps, logp = reference.split2d_fwd(z, h, self.kept)
        return z1, eps, logp if logdet is None else logdet + logp

    def standardize(
        self, z: Tensor, cond: Tensor | None = None, logdet: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The bijection z (B, C, H, W) -> (z1, eps = (z2 - mean) / exp(logs)); returns
        (z1, eps, logdet - sum(logs)), its log-det added to ``logdet`` (zeros when None)."""
        check_flow_input(z, self.channels)
        h = self.prior(z[:, : self.kept], cond)
        with flow_precision(z):
            eps, dlogdet = reference.gaussian_standardize(z[:, self.kept :], h[:, 0::2], h[:, 1::2])
        return z[:, : self.kept], eps, dlogdet if logdet is None else logdet + dlogdet

    def unstandardize(
        self, z1: Tensor, eps: Tensor, cond: Tensor | None = None, logdet: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`standardize`: (z1, eps) -> (z, logdet + sum(logs)), i.e. the
        forward's log-det subtracted."""
        check_flow_input(z1, self.kept)
        shape = (z1.shape[0], self.channels - self.kept, *z1.shape[2:])
        if tuple(eps.shape) != shape:
            raise ValueError(f"eps: expected shape {shape}, got {tuple(eps.shape)}")
        h = self.prior(z1, cond)
        with flow_precision(z1):
            z2, dlogdet = reference.gaussian_unstandardize(eps.to(z1.dtype), h[:, 0::2], h[:, 1::2])
        return torch.cat([z1, z2], dim=1), dlogdet if logdet is None else logdet + dlogdet

    def forward(self, x: Tensor, cond: Tensor | None = None, logdet: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z1, _, logdet = self.encode(x, logdet, cond)
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
            eps = draw(torch.randn, out_shape, generator, y.device) * temperature
        elif tuple(eps.shape) != out_shape:
            raise ValueError(f"eps: expected shape {out_shape}, got {tuple(eps.shape)}")
        h = self.prior(y, cond)
        with flow_precision(y):
            z, logp = reference.split2d_inv(y, h, eps)
        return z, -logp if logdet is None else logdet - logp
