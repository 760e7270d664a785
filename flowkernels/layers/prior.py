"""GaussianPrior: the top prior of a multi-scale flow (Glow's ``learntop`` / ``ycond`` prior).

A diagonal Gaussian ``N(mean, exp(logs)^2)`` over a (B, C, H, W) latent, its parameters
interleaved on channels like the split priors (``mean = h[:, 0::2]``, ``logs = h[:, 1::2]``):

* ``"standard"``: N(0, I), no parameters (SRFlow's top prior);
* ``"learned"``: ``h`` a learned (1, 2C, 1, 1) tensor, zero at init (so N(0, I)): one mean and
  scale per channel, the official Glow's ``learntop`` (a zero conv over zeros is its bias);
* ``"conditional"``: ``h = conv(cond)``, a zero-initialised :class:`Conv2dZeros` over the level's
  conditioning tensor (its bias is the learned constant). ``cond`` is (B, cond_channels, H, W) or
  (B, cond_channels, 1, 1): the latter, e.g. a one-hot class, gives Glow's ``ycond`` prior.

What :class:`~flowkernels.MultiScaleFlow` needs of a prior, and all a new prior must provide, is
the standardising bijection to N(0, I) and its log-det: ``standardize(z, cond, logdet) ->
(eps, logdet + log|det deps/dz|)`` and its inverse ``unstandardize(eps, cond, logdet) -> (z,
logdet - log|det deps/dz|)``; then ``log p(z) = log N(eps; 0, I) + log|det deps/dz|``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import reference
from ._contract import check_flow_input, flow_precision, logdet_buffer
from .coupling import Conv2dZeros

__all__ = ["PRIOR_KINDS", "GaussianPrior"]

PRIOR_KINDS = ("standard", "learned", "conditional")


class GaussianPrior(nn.Module):
    """Diagonal Gaussian prior over C channels.

    Args:
        channels: C.
        kind: ``"standard"``, ``"learned"`` or ``"conditional"`` (module docstring).
        cond_channels: channels of the conditioning tensor (``"conditional"`` only, > 0).
    Parameters: none (standard), ``h`` (1, 2C, 1, 1) (learned), ``conv.*`` (conditional).
    """

    def __init__(self, channels: int, kind: str = "learned", cond_channels: int = 0) -> None:
        super().__init__()
        if kind not in PRIOR_KINDS:
            raise ValueError(f"kind: expected one of {PRIOR_KINDS}, got {kind!r}")
        if (kind == "conditional") != (cond_channels > 0):
            raise ValueError(
                f"cond_channels: a {kind!r} prior needs {'> 0' if kind == 'conditional' else '0'} "
                f"conditioning channels, got {cond_channels}"
            )
        self.channels = channels
        self.kind = kind
        self.cond_channels = cond_channels
        if kind == "learned":
            self.h = nn.Parameter(torch.zeros(1, 2 * channels, 1, 1))
        elif kind == "conditional":
            self.conv = Conv2dZeros(cond_channels, 2 * channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, kind={self.kind!r}, cond_channels={self.cond_channels}"

    def params(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """(mean, logs), broadcastable against ``z`` (B, C, H, W); None for the standard normal."""
        check_flow_input(z, self.channels)
        if self.kind == "standard":
            return None
        if self.kind == "learned":
            h = self.h.to(z.dtype)
        else:
            h = self.conv(self._checked_cond(cond, z).to(z.dtype)).to(z.dtype)
        return h[:, 0::2], h[:, 1::2]

    def _checked_cond(self, cond: Tensor | None, z: Tensor) -> Tensor:
        b, _, height, width = z.shape
        if cond is None:
            raise ValueError(
                f"cond: this conditional prior needs a ({b}, {self.cond_channels}, {height}, {width}) "
                f"or ({b}, {self.cond_channels}, 1, 1) tensor, got None"
            )
        if (
            cond.dim() != 4
            or cond.shape[:2] != (b, self.cond_channels)
            or cond.shape[2:] not in ((height, width), (1, 1))
        ):
            raise ValueError(
                f"cond: expected shape ({b}, {self.cond_channels}, {height}, {width}) or "
                f"({b}, {self.cond_channels}, 1, 1), got {tuple(cond.shape)}"
            )
        return cond

    def standardize(self, z: Tensor, cond: Tensor | None = None, logdet: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z (B, C, H, W) -> (eps = (z - mean) / exp(logs), logdet - sum(logs)); logdet None: zeros."""
        logdet = logdet_buffer(z, logdet, clone=False)
        params = self.params(z, cond)
        if params is None:
            return z, logdet
        with flow_precision(z):
            eps, dlogdet = reference.gaussian_standardize(z, *params)
        return eps, logdet + dlogdet

    def unstandardize(
        self, eps: Tensor, cond: Tensor | None = None, logdet: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`standardize`: eps -> (z = mean + exp(logs) * eps, logdet + sum(logs))."""
        logdet = logdet_buffer(eps, logdet, clone=False)
        params = self.params(eps, cond)
        if params is None:
            return eps, logdet
        with flow_precision(eps):
            z, dlogdet = reference.gaussian_unstandardize(eps, *params)
        return z, logdet + dlogdet

    def log_prob(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """log N(z; mean, exp(logs)^2) per sample, (B,)."""
        eps, logdet = self.standardize(z, cond)
        return reference.gaussian_log_prob(eps) + logdet
