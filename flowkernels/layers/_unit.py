"""The memory-saving autograd unit (DESIGN.md section 3): one ``autograd.Function`` over a stack
of layers.

Its forward runs every step under ``no_grad`` and keeps only the output, the per-sample log-det
and references to the conditioning tensor; its backward walks the steps in reverse, each
rebuilding its input from its output with its own ``backward_from_output`` (one subnet evaluation
with grad per coupling stage plus the fused backward-with-recompute kernels). Gradients are
returned for the input, the incoming log-det, the conditioning tensor and every trainable
parameter, so the unit composes with any autograd graph (a trainable encoder, DDP).

Level batching (:mod:`~flowkernels.layers._cond_parts`): the steps come in chunks. Forward
computes the conditioning parts of a chunk in one convolution (no grad) and hands each step its
slices; backward walks the chunks in reverse, takes the chunk's parts (kept from forward when
``keep_parts``, else recomputed under the forward's autocast), collects the steps' part
gradients into one stacked tensor and reduces it with one weight-gradient GEMM and one
transposed convolution for the conditioning gradient. Without batching there is one chunk
without projections, and the unit is the per-step unit.

The unit calls layers' ``_run`` and ``backward_from_output``, never their ``forward``: nothing
inside it (or its recompute) checks or initialises ActNorms. It needs of a layer only the
:class:`~flowkernels.layers._contract.RecomputableStep` protocol, so it imports no layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._channel_maps import SequenceMaps
from ._cond_parts import PartChunk, plan_chunks
from ._contract import RecomputableStep
from ._folding import Folded, fold_convs, unfold_grads

__all__ = ["invertible_backprop", "run_steps", "step_chunks"]


@dataclass(frozen=True, eq=False)
class _Plan:
    """What the unit needs besides tensors: the steps in application order and its options."""

    steps: tuple[RecomputableStep, ...]
    reverse: bool
    keep_every: int | None
    chunks: tuple[PartChunk, ...]
    keep_parts: bool
    # id(parameter) -> (step, its index in the step's trainable_parameters())
    param_index: dict[int, tuple[int, int]]


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _compute_dtype(autocast: tuple[bool, torch.dtype]) -> torch.dtype | None:
    """The subnets' dtype under an :func:`_autocast_state` (None: the parameters')."""
    enabled, dtype = autocast
    return dtype if enabled else None


def ambient_compute_dtype(device_type: str) -> torch.dtype | None:
    """The subnets' dtype under the autocast state in effect now (None: the parameters')."""
    return _compute_dtype(_autocast_state(device_type))


class _InvertibleBackprop(torch.autograd.Function):
    """The memory-saving unit. Inputs: plan, autocast state, x, logdet (B,), cond or None, *params."""

    @staticmethod
    def forward(ctx, plan: _Plan, autocast: tuple, x: Tensor, logdet: Tensor, cond: Tensor | None, *params: Tensor):  # noqa: ANN001, ANN205
        buf = logdet.detach().clone()
        with torch.no_grad():
            y, kept_at, kept, kept_parts = run_steps(
                plan.steps,
                plan.chunks,
                x.detach(),
                cond,
                buf,
                plan.reverse,
                plan.keep_every,
                plan.keep_parts,
                _compute_dtype(autocast),
            )
        ctx.plan = plan
        ctx.autocast = autocast
        ctx.kept_at = tuple(kept_at)
        # The backward rebuilds activations with the parameters as they are THEN: record their
        # versions so that a change in between (an optimizer step) is refused, not silently wrong.
        if not torch.compiler.is_compiling():
            ctx.saved_params = params
            ctx.param_versions = tuple(p._version for p in params)
        ctx.save_for_backward(y, cond, *kept, *kept_parts)
        # Compiled, the log-det leaves as a fresh tensor: torch 2.11's Dynamo takes an output
        # that was updated in place under no_grad for non-differentiable and drops its gradient
        # (the steps' reference ops add into ``buf``; the ActNorm / 1x1 gradients came out wrong).
        return y, buf.clone() if torch.compiler.is_compiling() else buf

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_logdet: Tensor | None):  # noqa: ANN001, ANN205
        plan: _Plan = ctx.plan
        if not torch.compiler.is_compiling():
            _check_unchanged(ctx)
        y, cond, *saved = ctx.saved_tensors
        kept_inputs = dict(zip(ctx.kept_at, saved[: len(ctx.kept_at)]))
        kept_parts = list(saved[len(ctx.kept_at) :])
        grad_y = torch.zeros_like(y) if grad_y is None else grad_y
        if grad_logdet is None:
            grad_logdet = torch.zeros(y.shape[0], device=y.device, dtype=y.dtype)
        grad_cond = torch.zeros_like(cond) if cond is not None and ctx.needs_input_grad[4] else None
        grads: list[list[Tensor | None]] = [[] for _ in plan.steps]
        enabled, dtype = ctx.autocast
        with torch.autocast(y.device.type, dtype=dtype, enabled=enabled):
            # the parameters' small work for all the steps at once; the chunks only bound the parts
            fold = _SequenceFold(plan.steps, _compute_dtype(ctx.autocast))
            maps = SequenceMaps(plan.steps, 0, len(plan.steps), plan.reverse, backward=True)
            for c in range(len(plan.chunks) - 1, -1, -1):
                chunk = plan.chunks[c]
                stacked = weight = None
                if chunk.projections:
                    weight = chunk.weight(fold.folded)
                    stacked = kept_parts.pop() if plan.keep_parts else chunk.project(cond, weight)
                parts = chunk.split(stacked)
                grad_stacked = None if stacked is None else torch.zeros_like(stacked)
                grad_parts = chunk.split(grad_stacked)
                for i in range(chunk.stop - 1, chunk.start - 1, -1):
                    pixels = y.shape[2] * y.shape[3]
                    res = plan.steps[i].backward_from_output(
                        y, grad_y, grad_logdet, cond, plan.reverse, **_step_extras(parts, fold, maps, i)
                    )
                    y, grad_y = kept_inputs.get(i, res.inp), res.grad_inp
                    if grad_cond is not None and res.grad_cond is not None:
                        grad_cond += res.grad_cond
                    grads[i] = res.grad_params
                    fold.add_grads(i, res.grad_folded)
                    maps.add_grads(i, res.grad_map, pixels)
                    for dst, g in zip(grad_parts.get(i, ()), res.grad_parts or ()):
                        if g is not None:
                            dst.copy_(g)
                if grad_stacked is not None:
                    g_cond = _reduce_chunk(chunk, cond, weight, grad_stacked, fold, grad_cond is not None)
                    if g_cond is not None:
                        grad_cond += g_cond
            fold.pull_into(grads, plan.param_index)
            maps.pull_into(grads, plan.param_index, grad_logdet)
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


def run_steps(
    steps: Sequence[RecomputableStep],
    chunks: Sequence[PartChunk],
    x: Tensor,
    cond: Tensor | None,
    logdet: Tensor,
    reverse: bool,
    keep_every: int | None = None,
    keep_parts: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, list[int], list[Tensor], list[Tensor]]:
    """Run ``steps`` (application order): the subnet convolutions and the ActNorm + 1x1 maps of all
    of them folded at once, then chunk by chunk each chunk's conditioning parts in one
    convolution and its steps with their slices;
    ``logdet`` updated in place. With autograd on (a plain run on the reference backend)
    gradients flow through the folding and the stacked weight on their own.

    ``compute_dtype``: the subnets' dtype (the autocast dtype, e.g. bfloat16; None: the
    parameters'), applied explicitly through the folded tensors rather than by autocast, which a
    traced ``autograd.Function`` does not see.

    Returns (y, indices of the steps whose input was kept (every ``keep_every``-th), those inputs,
    each chunk's stacked parts if ``keep_parts``)."""
    kept_at, kept, kept_parts = [], [], []
    fold = _SequenceFold(steps, compute_dtype)
    maps = SequenceMaps(steps, 0, len(steps), reverse)
    for chunk in chunks:
        stacked = chunk.project(cond, chunk.weight(fold.folded)) if chunk.projections else None
        if keep_parts and stacked is not None:
            kept_parts.append(stacked)
        parts = chunk.split(stacked)
        for i in range(chunk.start, chunk.stop):
            if keep_every and i and i % keep_every == 0:
                kept.append(x)
                kept_at.append(i)
            x = steps[i]._run(x, cond, logdet, reverse, **_step_extras(parts, fold, maps, i))
    return x, kept_at, kept, kept_parts


def _step_extras(parts: dict[int, list[Tensor]], fold: _SequenceFold, maps: SequenceMaps, i: int) -> dict:
    """The extra keyword arguments of step ``i``: its conditioning ``parts``, its ``folded``
    convolutions and its ``channel_map``, each only if it has one (layers without take none)."""
    extras: dict = {}
    if i in parts:
        extras["parts"] = parts[i]
    if i in fold.folded:
        extras["folded"] = fold.folded[i]
    if i in maps.maps:
        extras["channel_map"] = maps.maps[i]
    return extras


class _SequenceFold:
    """The folded subnet convolutions of all the steps (:mod:`._folding`), computed at once.

    The fold is plain ops: in a plain run autograd, if enabled, differentiates through it on its
    own. In the memory-saving backward the steps return the gradients of their folded tensors
    (their subnets' explicit backward), which are collected step by step (:meth:`add_grads`,
    :meth:`add_weight_columns`) and mapped back to the parameters in one pass at the end
    (:meth:`pull_into`).
    """

    def __init__(self, steps: Sequence[RecomputableStep], dtype: torch.dtype | None) -> None:
        step_terms = {i: step.fold_terms() for i, step in enumerate(steps)}
        self.owners = [(i, j) for i, terms in step_terms.items() for j in range(len(terms))]
        self.terms = [t for ts in step_terms.values() for t in ts]
        self.flat, self.groups = fold_convs(self.terms, dtype)
        self.folded: dict[int, list[Folded]] = {}
        for (i, _), f in zip(self.owners, self.flat):
            self.folded.setdefault(i, []).append(f)
        self.index = {owner: k for k, owner in enumerate(self.owners)}
        self.grads: list[list[Tensor | None]] = [[None, None] for _ in self.flat]

    def add_grads(self, step: int, grad_folded: Sequence[Folded | None] | None) -> None:
        """Add a step's gradients of its folded convolutions (``StepGrads.grad_folded``)."""
        for j, g in enumerate(grad_folded or ()):
            if g is not None:
                slot = self.grads[self.index[(step, j)]]
                for n, value in enumerate(g):
                    if value is not None:
                        slot[n] = value if slot[n] is None else slot[n] + value

    def add_weight_columns(self, step: int, term: int, start: int, grad: Tensor) -> None:
        """Add ``grad`` to the gradient of the columns ``[start:]`` of a folded weight."""
        k = self.index[(step, term)]
        if self.grads[k][0] is None:
            self.grads[k][0] = torch.zeros_like(self.flat[k].weight)
        self.grads[k][0][:, start:] += grad

    def pull_into(self, grads: list[list[Tensor | None]], param_index: dict[int, tuple[int, int]]) -> None:
        """Map the collected gradients through the fold to the parameters: into
        ``grads[step][index]`` at ``param_index[id(parameter)]`` (trainable parameters only)."""
        collected = [None if w is None and b is None else Folded(*self._full(k)) for k, (w, b) in enumerate(self.grads)]
        for term, g in zip(self.terms, unfold_grads(self.terms, self.groups, collected)):
            if g is None:
                continue
            for tensor, value in zip((term.weight, term.logs, term.bias), g):
                if id(tensor) in param_index:
                    step, index = param_index[id(tensor)]
                    grads[step][index] = value

    def _full(self, k: int) -> tuple[Tensor, Tensor]:
        w, b = self.grads[k]
        return (
            torch.zeros_like(self.flat[k].weight) if w is None else w,
            torch.zeros_like(self.flat[k].bias) if b is None else b,
        )


def _reduce_chunk(
    chunk: PartChunk, cond: Tensor, weight: Tensor, grad_stacked: Tensor, fold: _SequenceFold, cond_grad: bool
) -> Tensor | None:
    """Complete a chunk's gradients from its stacked part gradients: add each projection's
    conditioning-column gradient to its folded weight's gradient (in ``fold``); return the
    conditioning gradient (None unless ``cond_grad``)."""
    weight_grads, g_cond = chunk.reduce(cond, weight, grad_stacked, cond_grad)
    for owner, proj, g in zip(chunk.owners, chunk.projections, weight_grads):
        fold.add_weight_columns(owner, proj.term, proj.start, g)
    return g_cond


def invertible_backprop(
    steps: Sequence[RecomputableStep],
    x: Tensor,
    cond: Tensor | None,
    logdet: Tensor,
    *,
    reverse: bool = False,
    keep_every: int | None = None,
    cond_chunk_bytes: int | None = None,
    keep_parts: bool = False,
) -> tuple[Tensor, Tensor]:
    """Apply ``steps`` (their inverses in reverse order when ``reverse``) as one memory-saving
    autograd unit. x: (B, C, H, W) float32; logdet: (B,) float32. Returns (y, logdet).

    ``cond_chunk_bytes``: batch the steps' ``cond_projections()`` over ``cond`` in chunks of at
    most that many bytes of conditioning parts (None: no batching, every step reads ``cond``
    itself); ``keep_parts``: keep the parts from forward to backward instead of recomputing them.
    """
    order = tuple(reversed(steps)) if reverse else tuple(steps)
    params = [step.trainable_parameters() for step in order]
    chunks = step_chunks(order, cond, cond_chunk_bytes)
    param_index = {id(p): (i, j) for i, step_params in enumerate(params) for j, p in enumerate(step_params)}
    plan = _Plan(order, reverse, keep_every, chunks, keep_parts, param_index)
    flat = [p for step_params in params for p in step_params]
    autocast = _autocast_state(x.device.type)
    return _InvertibleBackprop.apply(plan, autocast, x, logdet, cond, *flat)


def step_chunks(
    steps: Sequence[RecomputableStep], cond: Tensor | None, cond_chunk_bytes: int | None
) -> tuple[PartChunk, ...]:
    """The chunks of ``steps`` (application order) for :func:`run_steps`: one chunk without
    projections when ``cond_chunk_bytes`` is None (no batching) or there is no ``cond``."""
    if cond_chunk_bytes is None or cond is None:
        return (PartChunk(0, len(steps)),)
    return plan_chunks([step.cond_projections() for step in steps], cond, cond_chunk_bytes)
