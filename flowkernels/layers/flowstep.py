"""One Glow/SRFlow flow step: ActNorm -> invertible 1x1 conv -> optional coupling.

ActNorm and the 1x1 conv run as one fused op (``flowkernels.ops.actnorm_conv``); the coupling's
affine parts run as the fused affine op. Submodule names follow the official SRFlow keys:
``actnorm``, ``invconv``, ``affine``. Without a coupling this is SRFlow's "transitional" step.

With a kernel backend and gradients needed, a step used on its own is differentiated by
invertible recompute (it is a one-step :class:`~flowkernels.FlowSequence`): the kernels mutate
the log-det buffer and have no autograd formula of their own. With the reference backend the
step is plain autograd over ``flowkernels.reference`` (stored activations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..dispatch import select_backend
from ..ops.actnorm_conv import (
    actnorm_conv_bwd,
    actnorm_conv_fwd,
    actnorm_conv_inv,
    apply_channel_map,
    channel_map_bwd,
)
from ._channel_maps import MapTerms, StepMap
from ._cond_parts import CondProjection, Parts
from ._contract import StepGrads, check_cond, check_flow_input, flat_grads, flow_precision, in_plain_mode
from ._folding import Folded, FoldTerms
from ._structure import structural
from .actnorm import ActNorm2d
from .base import FusedLayer
from .coupling import Coupling
from .invconv import InvConv1x1

__all__ = ["FlowStep"]


class FlowStep(FusedLayer):
    """ActNorm2d -> InvConv1x1 -> coupling (optional), fused per backend.

    Args:
        channels: C.
        coupling: a :class:`~flowkernels.Coupling` over C channels (:class:`AffineCoupling`,
            :class:`AdditiveCoupling`, :class:`CondAffineCoupling`), or None.
        lu: LU-parametrised 1x1 conv.
        backend: ``"cuda" | "triton" | "reference" | "auto"`` or None for the global default;
            it applies to the whole step, coupling included.
        generator: RNG for the orthogonal 1x1 initialisation.
    """

    def __init__(
        self,
        channels: int,
        coupling: Coupling | None = None,
        *,
        lu: bool = False,
        backend: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if coupling is not None and coupling.channels != channels:
            raise ValueError(f"coupling: expected a coupling over {channels} channels, got {coupling.channels}")
        self.channels = channels
        self.backend = backend
        self.actnorm = ActNorm2d(channels)
        self.invconv = InvConv1x1(channels, lu=lu, generator=generator)
        self.affine = coupling

    @property
    def cond_channels(self) -> int:
        return self.affine.cond_channels if self.affine is not None else 0

    def _check_input(self, x: Tensor, cond: Tensor | None) -> None:
        check_flow_input(x, self.channels)
        check_cond(cond, x, self.cond_channels)

    @structural
    def cond_projections(self) -> tuple[CondProjection, ...]:
        """The coupling's (see :meth:`AffineCoupling.cond_projections`); none without one."""
        return tuple(self.affine.cond_projections()) if self.affine is not None else ()

    @structural
    def fold_terms(self) -> tuple[FoldTerms, ...]:
        """The coupling's (see :meth:`AffineCoupling.fold_terms`); none without one."""
        return tuple(self.affine.fold_terms()) if self.affine is not None else ()

    def map_terms(self) -> MapTerms:
        """The ActNorm + 1x1 parameters (:mod:`flowkernels.layers._channel_maps`)."""
        return MapTerms(self.invconv.matrix(), self.actnorm.logs, self.actnorm.bias)

    def map_param_grads(self, grad_weight: Tensor, grad_logs: Tensor, grad_bias: Tensor) -> list:
        """The ActNorm's and the 1x1's parameters with their gradients (the LU factors' through
        :meth:`InvConv1x1.weight_grads`)."""
        pairs = [(self.actnorm.logs, grad_logs), (self.actnorm.bias, grad_bias)]
        return pairs + list(zip(self.invconv.trainable_parameters(), self.invconv.weight_grads(grad_weight)))

    def _run(
        self,
        x: Tensor,
        cond: Tensor | None,
        logdet: Tensor,
        reverse: bool,
        parts: Parts = None,
        folded: Sequence[Folded] | None = None,
        channel_map: StepMap | None = None,
    ) -> Tensor:
        if in_plain_mode():
            return self._run_submodules(x, cond, logdet, reverse)
        backend = self.kernel_backend(x)
        if not reverse:
            x = self._actnorm_conv(x, logdet, backend, False, channel_map)
        if self.affine is not None:
            x = self.affine.apply_stages(x, cond, logdet, reverse, backend, parts, folded)
        if reverse:
            x = self._actnorm_conv(x, logdet, backend, True, channel_map)
        return x

    def _run_submodules(self, x: Tensor, cond: Tensor | None, logdet: Tensor, reverse: bool) -> Tensor:
        """Unfused, each submodule called as a module (forward hooks see its input)."""
        layers = [(self.actnorm, None), (self.invconv, None)]
        if self.affine is not None:
            layers.append((self.affine, cond))
        for layer, c in reversed(layers) if reverse else layers:
            x, new = layer.inverse(x, c, logdet) if reverse else layer(x, c, logdet)
            logdet.copy_(new)
        return x

    def _actnorm_conv(
        self, x: Tensor, logdet: Tensor, backend: str, reverse: bool, channel_map: StepMap | None
    ) -> Tensor:
        if channel_map is not None:  # folded by the sequence for all its steps
            term = channel_map.logdet_per_pixel * (x.shape[2] * x.shape[3])
            with flow_precision(x):
                return apply_channel_map(x, channel_map.matrix, channel_map.offset, term, logdet, backend)
        stats = {}
        if backend != "reference":
            weight_inv, logabsdet = self.invconv.inverse_stats()
            stats = {"weight_inv": weight_inv, "logabsdet": logabsdet}
        op = actnorm_conv_inv if reverse else actnorm_conv_fwd
        with flow_precision(x):
            y, _ = op(x, self.invconv.matrix(), self.actnorm.logs, self.actnorm.bias, logdet, backend=backend, **stats)
        return y

    def backward_from_output(
        self,
        out: Tensor,
        grad_out: Tensor,
        grad_logdet: Tensor,
        cond: Tensor | None,
        reverse: bool,
        parts: Parts = None,
        folded: Sequence[Folded] | None = None,
        channel_map: StepMap | None = None,
    ) -> StepGrads:
        """Fused backward with recompute: the coupling's stages (one subnet evaluation each),
        then one pass of the actnorm+1x1 kernel (or the other way round for ``reverse``). Given
        its ``channel_map``, the step returns the gradients of that map (``grad_map``) and leaves
        its ActNorm / 1x1 parameters to the caller's chain rule."""
        backend = select_backend(self.backend, out)
        grads_by_id: dict[int, Tensor | None] = {}
        grad_cond = grad_parts = grad_folded = grad_map = None
        if reverse:
            out, grad_out, grad_map = self._actnorm_conv_backward(
                out, grad_out, grad_logdet, backend, True, grads_by_id, channel_map
            )
        if self.affine is not None:
            out, grad_out, grad_cond, coupling_grads, grad_parts, grad_folded = self.affine.backward_stages(
                out, grad_out, grad_logdet, cond, reverse, backend, parts, folded
            )
            grads_by_id.update(coupling_grads)
        if not reverse:
            out, grad_out, grad_map = self._actnorm_conv_backward(
                out, grad_out, grad_logdet, backend, False, grads_by_id, channel_map
            )
        grad_params = flat_grads(self.trainable_parameters(), grads_by_id)
        return StepGrads(out, grad_out, grad_cond, grad_params, grad_parts, grad_folded, grad_map)

    def _actnorm_conv_backward(
        self,
        out: Tensor,
        grad_out: Tensor,
        grad_logdet: Tensor,
        backend: str,
        reverse: bool,
        grads_by_id: dict,
        channel_map: StepMap | None,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        if channel_map is not None:
            with flow_precision(out):
                inp, grad_inp, g_map, g_off = channel_map_bwd(
                    out, grad_out, channel_map.matrix, channel_map.matrix_inv, channel_map.inv_offset, backend
                )
            return inp, grad_inp, (g_map, g_off)
        weight_inv, _ = self.invconv.inverse_stats()
        with flow_precision(out):
            inp, grad_inp, g_w, g_logs, g_bias = actnorm_conv_bwd(
                out,
                grad_out,
                grad_logdet,
                self.invconv.matrix().detach(),
                self.actnorm.logs,
                self.actnorm.bias,
                reverse=reverse,
                weight_inv=weight_inv,
                backend=backend,
            )
        grads_by_id[id(self.actnorm.bias)] = g_bias
        grads_by_id[id(self.actnorm.logs)] = g_logs
        inv_params = self.invconv.trainable_parameters()
        grads_by_id.update(zip(map(id, inv_params), self.invconv.weight_grads(g_w)))
        return inp, grad_inp, None
