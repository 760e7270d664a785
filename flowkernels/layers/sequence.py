"""FlowSequence: a stack of layers with memory-saving invertible backprop (DESIGN.md section 3).

``FlowSequence(steps, memory_saving=True)`` runs as one autograd unit
(:func:`~flowkernels.layers._unit.invertible_backprop`): its forward keeps only the output, the
per-sample log-det and the conditioning tensor; its backward rebuilds each step's input from its
output. The inverse direction is differentiated the same way (SRFlow's L1 loss on a sample).

Reconstruction error compounds with depth and ``1/s`` can reach ``1/eps``; ``keep_every=N``
also stores the input of every N-th step and restarts the reconstruction there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ._contract import StepGrads, flat_grads, logdet_buffer
from ._unit import invertible_backprop
from .actnorm import initialize_actnorms
from .base import InvertibleModule
from .split import Split2d

__all__ = ["FlowSequence", "validate_keep_every"]


def validate_keep_every(keep_every: int | None) -> int | None:
    """Return ``keep_every`` if it is None or a positive integer; otherwise raise ValueError."""
    if keep_every is not None and (isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1):
        raise ValueError(f"keep_every: expected a positive integer or None, got {keep_every!r}")
    return keep_every


class FlowSequence(InvertibleModule):
    """A stack of invertible layers sharing one conditioning tensor.

    Args:
        steps: the layers, applied in order (e.g. FlowSteps of one SRFlow level).
        memory_saving: when gradients are needed, run as one unit that stores no per-step
            activations and rebuilds them from the output in backward (True), or run the
            layers one by one with ordinary autograd (False).
        keep_every: with memory saving, also keep the input of every N-th step to bound the
            reconstruction drift (None: keep nothing).

    ``forward(x, cond=None, logdet=None) -> (z, logdet)``; ``inverse(z, cond=None, logdet=None)``.
    Its ActNorms must be initialised before it is used in training mode: call
    :meth:`initialize_` once on a first batch (or load a checkpoint).
    """

    def __init__(
        self, steps: Iterable[InvertibleModule], memory_saving: bool = True, keep_every: int | None = None
    ) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)
        if len(self.steps) == 0:
            raise ValueError("steps: a FlowSequence needs at least one layer")
        for i, step in enumerate(self.steps):
            if not isinstance(step, InvertibleModule):
                raise TypeError(f"steps[{i}]: expected an InvertibleModule, got {type(step).__name__}")
            if isinstance(step, Split2d):
                raise TypeError(
                    f"steps[{i}]: a Split2d cannot be a step of a FlowSequence: it factors channels out, "
                    "so the output alone does not determine the input (its inverse needs the eps it returns) "
                    "and the sequence could not rebuild its activations; apply it between sequences: "
                    "z, logdet = seq(x, cond, logdet); z1, eps, logdet = split.encode(z, logdet)"
                )
        self.memory_saving = memory_saving
        self.keep_every = validate_keep_every(keep_every)

    def extra_repr(self) -> str:
        return f"memory_saving={self.memory_saving}, keep_every={self.keep_every}"

    def initialize_(self, x: Tensor, cond: Tensor | None = None) -> int:
        """Data-dependent init of every uninitialised ActNorm from one plain forward of the
        first batch ``x`` (B, C, H, W) and its ``cond``, in network order, all-reduced under
        torch.distributed (:func:`~flowkernels.initialize_actnorms`). Never runs inside the
        memory-saving unit. Returns how many ActNorms were initialised (0 once all are)."""
        return initialize_actnorms(self, lambda: self(x, cond))

    def _dispatch(self, x: Tensor, cond: Tensor | None, logdet: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        if self.memory_saving and torch.is_grad_enabled() and self._any_requires_grad(x, cond):
            buf = logdet_buffer(x, logdet, clone=True)
            return invertible_backprop(self.steps, x, cond, buf, reverse=reverse, keep_every=self.keep_every)
        for step in reversed(self.steps) if reverse else self.steps:
            x, logdet = step.inverse(x, cond, logdet) if reverse else step(x, cond, logdet)
        return x, logdet

    def _any_requires_grad(self, x: Tensor, cond: Tensor | None) -> bool:
        return (
            x.requires_grad
            or (cond is not None and cond.requires_grad)
            or any(p.requires_grad for p in self.parameters())
        )

    def _run(self, x: Tensor, cond: Tensor | None, logdet: Tensor, reverse: bool) -> Tensor:
        for step in reversed(self.steps) if reverse else self.steps:
            x = step._run(x, cond, logdet, reverse)
        return x

    def backward_from_output(
        self, out: Tensor, grad_out: Tensor, grad_logdet: Tensor, cond: Tensor | None, reverse: bool
    ) -> StepGrads:
        """Nested use (a sequence inside another unit): each step's own recompute backward."""
        grads_by_id: dict[int, Tensor | None] = {}
        grad_cond = torch.zeros_like(cond) if cond is not None else None
        for step in self.steps if reverse else reversed(self.steps):
            res = step.backward_from_output(out, grad_out, grad_logdet, cond, reverse)
            out, grad_out = res.inp, res.grad_inp
            if grad_cond is not None and res.grad_cond is not None:
                grad_cond += res.grad_cond
            grads_by_id.update(zip(map(id, step.trainable_parameters()), res.grad_params))
        return StepGrads(out, grad_out, grad_cond, flat_grads(self.trainable_parameters(), grads_by_id))
