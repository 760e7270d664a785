"""Invertible 1x1 convolution (Glow), plain or LU-decomposed.

``y[:, :, p] = W x[:, :, p]``, log-det ``H*W*log|det W|``. The plain weight is ``weight`` (C, C)
as in the official SRFlow state_dicts, initialised to a random orthogonal matrix. With
``lu=True`` (Glow's LU variant) ``W = P L (U + diag(sign_s * exp(log_s)))`` and
``log|det W| = sum(log_s)``.

``W^-1`` and ``log|det W|`` are computed in float64 (:meth:`InvConv1x1.inverse_stats`, returned in
the weight's dtype) and cached
on the weight's version counter, data pointer and device: they are reused while the weight is
unchanged (e.g. in the memory-saving backward and in repeated sampling) and recomputed after
any optimiser step, never keyed on train/eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import reference
from ._contract import check_flow_input, flow_precision
from .base import InvertibleModule

__all__ = ["InvConv1x1"]


def _random_orthogonal(channels: int, generator: torch.Generator | None) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
    return q.float().contiguous()  # QR returns a column-major Q


class InvConv1x1(InvertibleModule):
    """Invertible 1x1 convolution over C channels.

    Args:
        channels: C.
        lu: use the LU parametrisation (parameters ``lower``, ``upper``, ``log_s``; buffers
            ``perm``, ``sign_s``) instead of a full ``weight`` (C, C).
        generator: RNG for the random orthogonal initialisation.
    """

    _captured = False  # set once inverse_stats ran in a CUDA-graph capture: no cache from then on

    def __init__(self, channels: int, lu: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.lu = lu
        w = _random_orthogonal(channels, generator)
        if not lu:
            self.weight = nn.Parameter(w)
        else:
            perm, lower, upper = torch.linalg.lu(w.double())
            diag = torch.diagonal(upper)
            self.register_buffer("perm", perm.float())
            self.register_buffer("sign_s", torch.sign(diag).float())
            self.lower = nn.Parameter(torch.tril(lower, -1).float())
            self.upper = nn.Parameter(torch.triu(upper, 1).float())
            self.log_s = nn.Parameter(torch.log(diag.abs()).float())
        self._cache: tuple[tuple, Tensor, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"{self.channels}, lu={self.lu}"

    def matrix(self) -> Tensor:
        """The weight W (C, C), float32 (differentiable)."""
        if not self.lu:
            return self.weight
        return reference.lu_weight(self.perm, self.lower, self.upper, self.log_s, self.sign_s)

    def _tensors(self) -> list[Tensor]:
        return [self.weight] if not self.lu else [self.lower, self.upper, self.log_s]

    def inverse_stats(self) -> tuple[Tensor, Tensor]:
        """``(W^-1, log|det W|)`` computed in float64 and returned in the weight's dtype, not
        differentiable; cached while W is unchanged."""
        # No cache inside a traced graph or a CUDA-graph capture: recomputed per call (a replay
        # runs no Python, so a W^-1 taken from the cache would outlive the optimizer's updates).
        # Once captured, never again: replays change W without bumping its version, the key.
        if torch.compiler.is_compiling():
            return self._compute_stats()
        tensors = self._tensors()
        if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
            self._captured = True
        if self._captured:
            return self._compute_stats()
        key = tuple((t._version, t.data_ptr(), t.device) for t in tensors)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *self._compute_stats())
        return self._cache[1], self._cache[2]

    @torch.no_grad()
    def _compute_stats(self) -> tuple[Tensor, Tensor]:
        w = self.matrix()
        w64 = w.double()
        return torch.linalg.inv_ex(w64)[0].to(w.dtype), torch.linalg.slogdet(w64)[1].to(w.dtype)

    def weight_grads(self, grad_weight: Tensor) -> list[Tensor | None]:
        """Map dL/dW to gradients of :meth:`trainable_parameters` (the LU factors when ``lu``)."""
        if not self.lu:
            return [grad_weight] if self.weight.requires_grad else []
        params = [t for t in self._tensors() if t.requires_grad]
        if not params:
            return []

        def build(lower: Tensor, upper: Tensor, log_s: Tensor) -> Tensor:
            return reference.lu_weight(self.perm, lower, upper, log_s, self.sign_s)

        _, vjp_fn = torch.func.vjp(build, self.lower, self.upper, self.log_s)
        grads = dict(zip(("lower", "upper", "log_s"), vjp_fn(grad_weight.to(self.lower.dtype))))
        return [grads[name] for name in ("lower", "upper", "log_s") if getattr(self, name).requires_grad]

    def _check_input(self, x: Tensor, cond: Tensor | None) -> None:
        check_flow_input(x, self.channels)

    def _run(self, x: Tensor, cond: Tensor | None, logdet: Tensor, reverse: bool) -> Tensor:
        w = self.matrix()
        with flow_precision(x):
            y, dlogdet = reference.invconv_inv(x, w) if reverse else reference.invconv_fwd(x, w)
        logdet.add_(dlogdet)
        return y
