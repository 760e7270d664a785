"""FlowSequence and memory-saving invertible backprop (DESIGN.md section 3).

``FlowSequence(steps, memory_saving=True)`` is one autograd unit: its forward runs every step
under ``no_grad`` and keeps only the output, the per-sample log-det and references to the
conditioning tensor; its backward walks the steps in reverse, each rebuilding its input from its
output (:meth:`InvertibleModule.backward_from_output`: one subnet evaluation with grad per
coupling stage plus the fused backward-with-recompute kernels). Gradients are returned for the
input, the incoming log-det, the conditioning tensor and every trainable parameter, so the
unit composes with any autograd graph (a trainable encoder, DistributedDataParallel). The
inverse direction is differentiated the same way (SRFlow's L1 loss on a sample).

Reconstruction error compounds with depth and ``1/s`` can reach ``1/eps``; ``keep_every=N``
also stores the input of every N-th step and restarts the reconstruction there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import InvertibleModule, StepGrads, flat_grads, logdet_buffer

__all__ = ["FlowSequence", "invertible_backprop", "validate_keep_every"]


@dataclass(frozen=True, eq=False)
class _Plan:
    """What the unit needs besides tensors: the steps in application order and its options."""

    steps: tuple[InvertibleModule, ...]
    reverse: bool
    keep_every: int | None


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _InvertibleBackprop(torch.autograd.Function):
    """The memory-saving unit. Inputs: plan, autocast state, x, logdet (B,), cond or None, *params."""

    @staticmethod
    def forward(ctx, plan: _Plan, autocast: tuple, x: Tensor, logdet: Tensor, cond: Tensor | None, *params: Tensor):  # noqa: ANN001, ANN205
        buf = logdet.detach().clone()
        y = x.detach()
        kept, kept_at = [], []
        with torch.no_grad():
            for i, step in enumerate(plan.steps):
                if plan.keep_every and i and i % plan.keep_every == 0:
                    kept.append(y)
                    kept_at.append(i)
                y = step._run(y, cond, buf, plan.reverse)
        ctx.plan = plan
        ctx.autocast = autocast
        ctx.kept_at = tuple(kept_at)
        ctx.used = False
        ctx.save_for_backward(y, cond, *kept)
        return y, buf

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_logdet: Tensor | None):  # noqa: ANN001, ANN205
        plan: _Plan = ctx.plan
        # A second backward through the same graph is refused (DESIGN.md section 3). Under
        # torch.compile the backward is traced once, so no per-call flag can be kept there.
        if not torch.compiler.is_compiling():
            if ctx.used:
                raise RuntimeError(
                    "FlowSequence (memory_saving=True) was already backpropagated: its backward rebuilds "
                    "activations from the output once and cannot run twice (retain_graph is not supported); "
                    "run the forward again"
                )
            ctx.used = True
        y, cond, *kept = ctx.saved_tensors
        kept_inputs = dict(zip(ctx.kept_at, kept))
        grad_y = torch.zeros_like(y) if grad_y is None else grad_y
        if grad_logdet is None:
            grad_logdet = torch.zeros(y.shape[0], device=y.device, dtype=y.dtype)
        grad_cond = torch.zeros_like(cond) if cond is not None and ctx.needs_input_grad[4] else None
        grads: list[list[Tensor | None]] = [[] for _ in plan.steps]
        enabled, dtype = ctx.autocast
        with torch.autocast(y.device.type, dtype=dtype, enabled=enabled):
            for i in range(len(plan.steps) - 1, -1, -1):
                res = plan.steps[i].backward_from_output(y, grad_y, grad_logdet, cond, plan.reverse)
                y, grad_y = kept_inputs.get(i, res.inp), res.grad_inp
                if grad_cond is not None and res.grad_cond is not None:
                    grad_cond += res.grad_cond
                grads[i] = res.grad_params
        flat = [g for step_grads in grads for g in step_grads]
        return (None, None, grad_y, grad_logdet, grad_cond, *flat)


def invertible_backprop(
    steps: Sequence[InvertibleModule],
    x: Tensor,
    cond: Tensor | None,
    logdet: Tensor,
    *,
    reverse: bool = False,
    keep_every: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Apply ``steps`` (their inverses in reverse order when ``reverse``) as one memory-saving
    autograd unit. x: (B, C, H, W) float32; logdet: (B,) float32. Returns (y, logdet)."""
    order = tuple(reversed(steps)) if reverse else tuple(steps)
    params = [step.trainable_parameters() for step in order]
    plan = _Plan(order, reverse, keep_every)
    flat = [p for step_params in params for p in step_params]
    autocast = _autocast_state(x.device.type)
    return _InvertibleBackprop.apply(plan, autocast, x, logdet, cond, *flat)


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
    ActNorms are initialised from the first training batch in a plain forward, before the unit.
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
        self.memory_saving = memory_saving
        self.keep_every = validate_keep_every(keep_every)

    def extra_repr(self) -> str:
        return f"memory_saving={self.memory_saving}, keep_every={self.keep_every}"

    def _dispatch(self, x: Tensor, cond: Tensor | None, logdet: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        if self.memory_saving and torch.is_grad_enabled() and self._any_requires_grad(x, cond):
            buf = logdet_buffer(x, logdet)
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
        named: dict[int, Tensor | None] = {}
        grad_cond = torch.zeros_like(cond) if cond is not None else None
        for step in self.steps if reverse else reversed(self.steps):
            res = step.backward_from_output(out, grad_out, grad_logdet, cond, reverse)
            out, grad_out = res.inp, res.grad_inp
            if grad_cond is not None and res.grad_cond is not None:
                grad_cond += res.grad_cond
            named.update(zip(map(id, step.trainable_parameters()), res.grad_params))
        return StepGrads(out, grad_out, grad_cond, flat_grads(self.trainable_parameters(), named))
