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

import torch
from torch import Tensor

from ..dispatch import select_backend
from ..ops.actnorm_conv import actnorm_conv_bwd, actnorm_conv_fwd, actnorm_conv_inv
from ._cond_parts import CondProjection, Parts
from ._contract import StepGrads, check_cond, check_flow_input, flat_grads, flow_precision, in_plain_mode
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

    def cond_projections(self) -> list[CondProjection]:
        """The coupling's (see :meth:`AffineCoupling.cond_projections`); none without one."""
        return self.affine.cond_projections() if self.affine is not None else []

    def _run(self, x: Tensor, cond: Tensor | None, logdet: Tensor, reverse: bool, parts: Parts = None) -> Tensor:
        if in_plain_mode():
            return self._run_submodules(x, cond, logdet, reverse)
        backend = self.kernel_backend(x)
        if not reverse:
            x = self._actnorm_conv(x, logdet, backend, reverse=False)
        if self.affine is not None:
            x = self.affine.apply_stages(x, cond, logdet, reverse, backend, parts)
        if reverse:
            x = self._actnorm_conv(x, logdet, backend, reverse=True)
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

    def _actnorm_conv(self, x: Tensor, logdet: Tensor, backend: str, reverse: bool) -> Tensor:
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
    ) -> StepGrads:
        """Fused backward with recompute: the coupling's stages (one subnet evaluation each),
        then one pass of the actnorm+1x1 kernel (or the other way round for ``reverse``)."""
        backend = select_backend(self.backend, out)
        grads_by_id: dict[int, Tensor | None] = {}
        grad_cond = grad_parts = None
        if reverse:
            out, grad_out = self._actnorm_conv_backward(out, grad_out, grad_logdet, backend, True, grads_by_id)
        if self.affine is not None:
            out, grad_out, grad_cond, coupling_grads, grad_parts = self.affine.backward_stages(
                out, grad_out, grad_logdet, cond, reverse, backend, parts
            )
            grads_by_id.update(coupling_grads)
        if not reverse:
            out, grad_out = self._actnorm_conv_backward(out, grad_out, grad_logdet, backend, False, grads_by_id)
        return StepGrads(out, grad_out, grad_cond, flat_grads(self.trainable_parameters(), grads_by_id), grad_parts)

    def _actnorm_conv_backward(
        self, out: Tensor, grad_out: Tensor, grad_logdet: Tensor, backend: str, reverse: bool, grads_by_id: dict
    ) -> tuple[Tensor, Tensor]:
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
        return inp, grad_inp
