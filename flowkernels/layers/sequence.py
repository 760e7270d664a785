"""FlowSequence: a stack of layers with memory-saving invertible backprop (DESIGN.md section 3).

``FlowSequence(steps, memory_saving=True)`` runs as one autograd unit
(:func:`~flowkernels.layers._unit.invertible_backprop`): its forward keeps only the output, the
per-sample log-det and the conditioning tensor; its backward rebuilds each step's input from its
output. The inverse direction is differentiated the same way (SRFlow's L1 loss on a sample).

Reconstruction error compounds with depth and ``1/s`` can reach ``1/eps``; ``keep_every=N``
also stores the input of every N-th step and restarts the reconstruction there.

Level batching (``cond_batching=True``, :mod:`flowkernels.layers._cond_parts`): every step reads
the same conditioning tensor, so the conditioning parts of the steps' subnet first convolutions
are computed for a chunk of steps (``cond_chunk_bytes`` of parts) in one convolution, in both
directions, with and without gradients; the memory-saving backward recomputes them chunk by
chunk in reverse (or keeps them from forward, ``keep_cond_parts=True``) and reduces their weight
and conditioning gradients with one GEMM per chunk. The results equal the per-step path up to
float32 rounding (the convolution's sum over input channels is split in two).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ._contract import StepGrads, check_cond, flat_grads, in_plain_mode, logdet_buffer
from ._unit import ambient_compute_dtype, invertible_backprop, run_steps, step_chunks
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
        cond_batching: compute the conditioning parts of the steps' subnet first convolutions
            (their ``cond_projections()``) for a chunk of steps in one convolution (True), or let
            every step convolve ``cond`` itself (False). Same results up to float32 rounding.
            None (default): by device, batched for CUDA tensors (fewer, wider GEMMs), per step
            elsewhere (on a CPU batching measured no faster, 0.99x, and costs memory).
        cond_chunk_bytes: most bytes of conditioning parts per chunk (B x outputs x H x W x the
            element size of the autocast dtype): the transient memory of batching. A step over
            it alone is a chunk of one (0: one convolution per step for all its subnets). None
            (default): the bytes of the conditioning tensor itself, so the transient parts (and
            their gradients in backward) stay within what the sequence already references, at
            any depth.
        keep_cond_parts: with memory saving, keep every chunk's parts from forward to backward
            instead of recomputing them (memory for a third less conditioning-convolution work;
            SRFlow level 1: ~52 MB per 160x160 sample in fp32, ~26 MB in bf16).

    ``forward(x, cond=None, logdet=None) -> (z, logdet)``; ``inverse(z, cond=None, logdet=None)``.
    Its ActNorms must be initialised before it is used in training mode: call
    :meth:`initialize_` once on a first batch (or load a checkpoint).
    """

    def __init__(
        self,
        steps: Iterable[InvertibleModule],
        memory_saving: bool = True,
        keep_every: int | None = None,
        *,
        cond_batching: bool | None = None,
        cond_chunk_bytes: int | None = None,
        keep_cond_parts: bool = False,
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
        self.set_cond_batching(cond_batching, chunk_bytes=cond_chunk_bytes, keep_parts=keep_cond_parts)

    def extra_repr(self) -> str:
        return (
            f"memory_saving={self.memory_saving}, keep_every={self.keep_every}, cond_batching={self.cond_batching}, "
            f"cond_chunk_bytes={self.cond_chunk_bytes}, keep_cond_parts={self.keep_cond_parts}"
        )

    def set_cond_batching(
        self, enabled: bool | None, *, chunk_bytes: int | None = None, keep_parts: bool = False
    ) -> None:
        """Set ``cond_batching``, ``cond_chunk_bytes`` and ``keep_cond_parts`` (see the class)."""
        if chunk_bytes is not None and (
            isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 0
        ):
            raise ValueError(f"cond_chunk_bytes: expected a non-negative integer or None, got {chunk_bytes!r}")
        self.cond_batching = None if enabled is None else bool(enabled)
        self.cond_chunk_bytes = chunk_bytes
        self.keep_cond_parts = bool(keep_parts)

    def initialize_(self, x: Tensor, cond: Tensor | None = None) -> int:
        """Data-dependent init of every uninitialised ActNorm from one plain forward of the
        first batch ``x`` (B, C, H, W) and its ``cond``, in network order, all-reduced under
        torch.distributed (:func:`~flowkernels.initialize_actnorms`). Never runs inside the
        memory-saving unit. Returns how many ActNorms were initialised (0 once all are)."""
        return initialize_actnorms(self, lambda: self(x, cond))

    def _dispatch(self, x: Tensor, cond: Tensor | None, logdet: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        if in_plain_mode():  # the ActNorm init: every layer called as a module, unfused
            return self._step_by_step(x, cond, logdet, reverse)
        chunk_bytes = self._chunk_bytes(x, cond)
        needs_grad = torch.is_grad_enabled() and self._any_requires_grad(x, cond)
        # Without memory saving, kernel-backend steps would each be a one-step unit that keeps its
        # output; one unit keeping every step's input (keep_every=1) stores the same.
        if needs_grad and (self.memory_saving or self._steps_need_unit(x, cond)):
            buf = logdet_buffer(x, logdet, clone=True)
            return invertible_backprop(
                self.steps,
                x,
                cond,
                buf,
                reverse=reverse,
                keep_every=self.keep_every if self.memory_saving else 1,
                cond_chunk_bytes=chunk_bytes,
                keep_parts=self.keep_cond_parts,
            )
        if needs_grad and chunk_bytes is None:  # stored activations: the official maths, op for op
            return self._step_by_step(x, cond, logdet, reverse)
        # no gradients (sampling, encoding): the steps' small maps folded at once, per chunk
        buf = logdet_buffer(x, logdet, clone=True)
        return self._run(x, cond, buf, reverse), buf

    def _step_by_step(
        self, x: Tensor, cond: Tensor | None, logdet: Tensor | None, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        for step in reversed(self.steps) if reverse else self.steps:
            x, logdet = step.inverse(x, cond, logdet) if reverse else step(x, cond, logdet)
        return x, logdet

    def _chunk_bytes(self, x: Tensor, cond: Tensor | None) -> int | None:
        """The chunk budget when this call batches the conditioning parts, else None (batching
        off, by setting or by device; no cond; no step with projections)."""
        if cond is None:
            return None
        enabled = self.cond_batching if self.cond_batching is not None else cond.device.type == "cuda"
        if not enabled:
            return None
        projections = [p for step in self.steps for p in step.cond_projections()]
        if not projections:
            return None
        check_cond(cond, x, projections[0].weight.shape[1] - projections[0].start)
        return self.cond_chunk_bytes if self.cond_chunk_bytes is not None else cond.numel() * cond.element_size()

    def _steps_need_unit(self, x: Tensor, cond: Tensor | None) -> bool:
        ld = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        return any(step._needs_unit(x, cond, ld) for step in self.steps)

    def _any_requires_grad(self, x: Tensor, cond: Tensor | None) -> bool:
        return (
            x.requires_grad
            or (cond is not None and cond.requires_grad)
            or any(p.requires_grad for p in self.parameters())
        )

    def _run(self, x: Tensor, cond: Tensor | None, logdet: Tensor, reverse: bool) -> Tensor:
        order = list(reversed(self.steps)) if reverse else list(self.steps)
        chunks = step_chunks(order, cond, self._chunk_bytes(x, cond))
        compute_dtype = ambient_compute_dtype(x.device.type)
        return run_steps(order, chunks, x, cond, logdet, reverse, compute_dtype=compute_dtype)[0]

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
