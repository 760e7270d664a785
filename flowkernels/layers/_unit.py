"""The memory-saving autograd unit (DESIGN.md section 3): one ``autograd.Function`` over a stack
of layers.

Its forward runs every step under ``no_grad`` and keeps only the output, the per-sample log-det
and references to the conditioning tensor; its backward walks the steps in reverse, each
rebuilding its input from its output with its own ``backward_from_output`` (one subnet evaluation
with grad per coupling stage plus the fused backward-with-recompute kernels). Gradients are
returned for the input, the incoming log-det, the conditioning tensor and every trainable
parameter, so the unit composes with any autograd graph (a trainable encoder, DDP).

The unit calls layers' ``_run`` and ``backward_from_output``, never their ``forward``: nothing
inside it (or its recompute) checks or initialises ActNorms. It needs of a layer only the
:class:`~flowkernels.layers._contract.RecomputableStep` protocol, so it imports no layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._contract import RecomputableStep

__all__ = ["invertible_backprop"]


@dataclass(frozen=True, eq=False)
class _Plan:
    """What the unit needs besides tensors: the steps in application order and its options."""

    steps: tuple[RecomputableStep, ...]
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
        # The backward rebuilds activations with the parameters as they are THEN: record their
        # versions so that a change in between (an optimizer step) is refused, not silently wrong.
        if not torch.compiler.is_compiling():
            ctx.saved_params = params
            ctx.param_versions = tuple(p._version for p in params)
        ctx.save_for_backward(y, cond, *kept)
        return y, buf

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_logdet: Tensor | None):  # noqa: ANN001, ANN205
        plan: _Plan = ctx.plan
        if not torch.compiler.is_compiling():
            _check_unchanged(ctx)
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


def _check_unchanged(ctx) -> None:  # noqa: ANN001
    """Refuse a backward whose rebuild would use other parameters than the forward did.

    The backward depends only on the saved output (and kept inputs) and the parameters, so with
    ``retain_graph=True`` it can run again and gives the same gradients; without it, PyTorch
    frees the saved output after the first backward and reports that itself, with the right
    advice. What it cannot catch is a parameter changed in place between forward and backward:
    the activations would be rebuilt with the new values.
    """
    changed = [i for i, (p, version) in enumerate(zip(ctx.saved_params, ctx.param_versions)) if p._version != version]
    if changed:
        raise RuntimeError(
            f"FlowSequence (memory_saving=True): {len(changed)} parameter(s) (first: #{changed[0]}) were modified in "
            "place after the forward (e.g. by optimizer.step()), and the backward rebuilds activations from them; "
            "run the backward before changing parameters, or run the forward again"
        )


def invertible_backprop(
    steps: Sequence[RecomputableStep],
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
