"""Folding the subnets' per-channel scales into their convolutions, for a whole level at once.

Every convolution of an SRFlow/Glow coupling subnet is followed by a per-channel affine map:
``(conv(x, W) + bias) * exp(logs)`` (ActNorm after the bias-free convolutions) or
``(conv(x, W) + bias) * exp(3 * logs)`` (the zero-initialised last layer). Exactly (up to
rounding) that is ONE convolution with folded parameters::

    conv(x, W * e, bias * e),   e = exp(factor * logs) per output channel

so a subnet evaluation is three convolutions and two ReLUs instead of thirteen ops, and the
activation-sized passes of the scales disappear. The folded parameters depend on the parameters
only, so a :class:`~flowkernels.FlowSequence` computes them once per call for all its steps
(:func:`fold_convs`: same-shaped convolutions stacked, a dozen ops per shape), and the
memory-saving backward differentiates the subnets with respect to the folded parameters, one
``convolution_backward`` per convolution from a record of its recomputation (:class:`ConvRecord`,
:func:`conv_vjp`), and maps those gradients back through the fold once for all the steps
(:func:`unfold_grads`). :func:`pullback` differentiates any other function (a subnet's
parameter-free layers other than ReLU) with autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ConvRecord",
    "FoldGroup",
    "FoldTerms",
    "Folded",
    "as_dtype",
    "conv_vjp",
    "fold_convs",
    "pullback",
    "unfold_grads",
]


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call where ``t`` already has that dtype: the subnets' recompute
    and backward cast on every convolution, ~800 casts per SRFlow step that are no-ops outside
    autocast, yet each costs a few microseconds of host time as a call."""
    return t if t.dtype == dtype else t.to(dtype)


class FoldTerms(NamedTuple):
    """One convolution followed by a per-channel scale: ``(conv(x, weight) + bias) * exp(factor * logs)``.

    weight: (out, in, k, k); logs, bias: ``out`` elements in any shape (e.g. (1, out, 1, 1));
    factor: the log-scale multiplier (1 for ActNorm, 3 for SRFlow's zero-initialised layer).
    """

    weight: Tensor
    logs: Tensor
    bias: Tensor
    factor: float


class Folded(NamedTuple):
    """The folded convolution of a :class:`FoldTerms`: weight (out, in, k, k) and bias (out,)."""

    weight: Tensor
    bias: Tensor


class FoldGroup(NamedTuple):
    """Same-shaped terms folded together: their indices and factor, the scales (n, out) and the
    folded (n, ...) weight and (n, out) bias in the parameters' dtype (all the backward needs)."""

    members: list[int]
    factor: float
    scale: Tensor
    folded_weight: Tensor
    folded_bias: Tensor


def fold_convs(terms: Sequence[FoldTerms], dtype: torch.dtype | None = None) -> tuple[list[Folded], list[FoldGroup]]:
    """``(W * e, bias * e)`` with ``e = exp(factor * logs)`` for every term, in order, and the
    groups they were folded in: terms of the same weight shape and factor are folded together
    (stacked, one exp and two multiplies), so a level of K steps costs a few ops per distinct
    shape, not per step. Folded in the parameters' dtype, then cast to ``dtype`` (the subnets'
    compute dtype, e.g. bfloat16 under autocast; None: unchanged). Differentiable;
    :func:`unfold_grads` is its backward in as few ops, and where autograd is off it overwrites
    the groups' folded weights, of which the returned weights are views when not cast."""
    by_key: dict[tuple, list[int]] = {}
    for i, t in enumerate(terms):
        by_key.setdefault((tuple(t.weight.shape), t.factor, t.weight.dtype, t.weight.device), []).append(i)
    folded: list[Folded | None] = [None] * len(terms)
    groups = []
    for (shape, factor, _, _), members in by_key.items():
        n = len(members)
        logs = torch.stack([terms[i].logs for i in members]).reshape(n, shape[0])
        bias = torch.stack([terms[i].bias for i in members]).reshape(n, shape[0])
        weight = torch.stack([terms[i].weight for i in members])
        scale = torch.exp(logs * factor if factor != 1.0 else logs)
        group = FoldGroup(members, factor, scale, _mul_into(weight, scale.reshape(n, shape[0], 1, 1, 1)), bias * scale)
        folded_weight, folded_bias = group.folded_weight, group.folded_bias
        if dtype is not None:
            folded_weight, folded_bias = folded_weight.to(dtype), folded_bias.to(dtype)
        for i, w, b in zip(members, folded_weight.unbind(0), folded_bias.unbind(0)):
            folded[i] = Folded(w, b)
        groups.append(group)
    return folded, groups  # type: ignore[return-value]


def _in_place(out: Tensor, other: Tensor) -> bool:
    """Whether ``out * other`` may overwrite ``out`` (the caller's to overwrite): where autograd is
    off and the product has ``out``'s dtype. A weight-sized result freshly allocated is, on a CPU,
    mostly page faults (16 weights of 64 x 320 x 3 x 3 scaled: ~18 ms out of place, ~1 ms in
    place; compiled, Inductor plans the buffers itself). The dtype test is on the dtypes' sizes:
    ``torch.promote_types`` would be one more dispatched call."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or out.requires_grad:
        return False
    a, b = out.dtype, other.dtype
    return a == b or (a.is_floating_point and b.is_floating_point and a.itemsize > b.itemsize)


def _mul_into(stack: Tensor, other: Tensor) -> Tensor:
    """``stack * other``, in place into ``stack`` where :func:`_in_place` allows."""
    return stack.mul_(other) if _in_place(stack, other) else stack * other


# where unfold_grads scales the weight gradients one by one (see _cpu_products_and_grads)
_STACK_FREE_DEVICES = ("cpu",)


def unfold_grads(
    terms: Sequence[FoldTerms], groups: Sequence[FoldGroup], grads: Sequence[Folded | None]
) -> list[tuple[Tensor, Tensor, Tensor] | None]:
    """The backward of :func:`fold_convs`: from the gradients of the folded (weight, bias) of each
    term (None: zero) to those of its (weight, logs, bias), shaped like them (None for a term of a
    group without any gradient). With ``W' = W e``, ``b' = b e``, ``e = exp(f l)`` per output
    channel: ``dW = dW' e``, ``db = db' e``, ``dl = f (sum(dW' W') + db' b')``: the folded tensors
    and the scales are all it reads. A few ops per group, the per-term tensors unbound from stacks
    (:func:`_cpu_products_and_grads` on a CPU). Where autograd is off it overwrites the groups'
    folded weights (the fold's last use) and the given weight gradients."""
    out: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(terms)
    for g in groups:
        present = [k for k, i in enumerate(g.members) if grads[i] is not None]
        if not present:
            continue
        n, o = g.scale.shape
        zero = None  # stands in for a term without gradients: shared, never written
        if len(present) < n:
            zero = Folded(torch.zeros_like(g.folded_weight[0]), torch.zeros_like(g.folded_bias[0]))
        got = [zero if grads[i] is None else grads[i] for i in g.members]
        gw = [f.weight for f in got]
        gb = torch.stack([f.bias for f in got])
        scale = g.scale.reshape(n, o, 1, 1, 1)
        if g.folded_weight.device.type in _STACK_FREE_DEVICES and _in_place(g.folded_weight, gw[present[0]]):
            products, g_weight = _cpu_products_and_grads(g.folded_weight, gw, scale, present)
        else:
            stacked = torch.stack(gw)
            products = _mul_into(g.folded_weight, stacked)  # dW' W', in the folded weights' memory
            g_weight = _mul_into(stacked, scale).unbind(0)
        g_scale = products.flatten(2).sum(-1) + gb * g.folded_bias
        g_logs = g_scale * g.factor if g.factor != 1.0 else g_scale
        g_bias = gb * g.scale
        first = terms[g.members[0]]
        g_logs = g_logs.reshape(n, *first.logs.shape).unbind(0)
        g_bias = g_bias.reshape(n, *first.bias.shape).unbind(0)
        for i, w, lg, b in zip(g.members, g_weight, g_logs, g_bias):
            out[i] = (w, lg, b)
    return out


def _cpu_products_and_grads(
    folded_weight: Tensor, gw: list[Tensor], scale: Tensor, present: list[int]
) -> tuple[Tensor, list[Tensor]]:
    """``(folded_weight * stack(gw), [w * e for w in gw])`` without stacking ``gw`` (eager, autograd
    off, on a CPU): the products in ``folded_weight``, the gradients scaled where they are (terms
    not in ``present`` keep their shared zero). A CPU foreach call is a loop of one call per
    tensor, cheaper than a weight-sized stack, which is mostly page faults when its memory is fresh
    (df2k-4x, one thread: ~5 ms for such a 12-14 MB stack, ~0.5 ms otherwise; without the stacks
    the full-width training step takes 0.90x the time). On CUDA the stack stays: one kernel,
    where a foreach over differently shaped tensors is one kernel per tensor."""
    torch._foreach_mul_(list(folded_weight.unbind(0)), gw)
    scales = scale.unbind(0)
    owned, factors = [gw[k] for k in present], [scales[k] for k in present]
    if _in_place(owned[0], factors[0]):
        torch._foreach_mul_(owned, factors)
    else:  # e.g. bfloat16 gradients of float32 weights: the product is float32
        owned = list(torch._foreach_mul(owned, factors))
    g_weight = list(gw)
    for k, w in zip(present, owned):
        g_weight[k] = w
    return folded_weight, g_weight


class ConvRecord(NamedTuple):
    """One folded convolution as a subnet applied it (``Subnet.run_folded`` with a tape), what its
    backward (:func:`conv_vjp`) needs: ``out = conv(inp, weight, bias)`` (stride 1, ``padding``),
    plus a precomputed conditioning part when ``part_dtype`` is set (the first convolution of a
    batched level: ``out = wide(conv) + wide(part)``, or ``wide(bias) + wide(part)`` without
    ``inp``; wide: at least float32)."""

    inp: Tensor | None  # as convolved (cast to the compute dtype); None: the part and the bias alone
    inp_dtype: torch.dtype | None  # its dtype before that cast (its gradient is returned in it)
    weight: Tensor  # as applied: only the flow-state columns of a first convolution with a part
    folded_shape: torch.Size  # the whole folded weight's (its gradient is returned in full)
    bias: Tensor
    padding: int
    part_dtype: torch.dtype | None


def conv_vjp(
    rec: ConvRecord, grad: Tensor, trains: tuple[bool, bool], wants_inp: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dL/dinp, dL/dpart, dL/dweight, dL/dbias)`` of a :class:`ConvRecord` from dL/dout, each
    None where not needed (``trains``: weight, bias; ``wants_inp``) or not there. The weight's
    gradient has the folded weight's shape; columns the record did not apply (the conditioning
    columns behind a part) are zero, for whoever computed the part to complete."""
    g_part = None
    if rec.part_dtype is not None:
        g_part = as_dtype(grad, rec.part_dtype)
        grad = as_dtype(grad, rec.bias.dtype)  # the convolution's output dtype, before the widening
    if rec.inp is None:
        return None, g_part, None, as_dtype(grad.sum((0, 2, 3)), rec.bias.dtype) if trains[1] else None
    g_inp, g_weight, g_bias = torch.ops.aten.convolution_backward(
        grad,
        rec.inp,
        rec.weight,
        [rec.weight.shape[0]],
        [1, 1],
        [rec.padding, rec.padding],
        [1, 1],
        False,
        [0, 0],
        1,
        [wants_inp, trains[0], trains[1]],
    )
    if g_weight is not None and g_weight.shape != rec.folded_shape:
        rest = rec.folded_shape[1] - g_weight.shape[1]
        g_weight = torch.cat([g_weight, g_weight.new_zeros(g_weight.shape[0], rest, *g_weight.shape[2:])], dim=1)
    return None if g_inp is None else as_dtype(g_inp, rec.inp_dtype), g_part, g_weight, g_bias


def pullback(
    fn: Callable[..., Sequence[Tensor]], inputs: Sequence[Tensor | None], wanted: Sequence[bool]
) -> tuple[list[Tensor], Callable[[Sequence[Tensor | None]], list[Tensor | None]]]:
    """Evaluate ``fn(*inputs)`` (a sequence of tensors) once with grad; return ``(outputs, pull)``.

    ``pull(grads)`` (one gradient or None per output) returns the gradient of each input (None
    where not ``wanted``, or for a None input). Eagerly this is ``torch.autograd.grad`` (the
    cheapest) over the inputs detached; under ``torch.compile`` it is ``torch.func.vjp``, which
    Dynamo can trace inside a backward. The outputs stay attached to the inputs.
    """
    present = [i for i, t in enumerate(inputs) if t is not None]

    def call(*ins: Tensor) -> tuple[Tensor, ...]:
        full = list(inputs)
        for i, t in zip(present, ins):
            full[i] = t
        return tuple(fn(*full))

    if torch.compiler.is_compiling():
        outs, vjp_fn = torch.func.vjp(call, *(inputs[i] for i in present))

        def pull_compiled(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
            full = [torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads)]
            g_present = vjp_fn(tuple(full))
            out: list[Tensor | None] = [None] * len(inputs)
            for i, g in zip(present, g_present):
                out[i] = g if wanted[i] else None
            return out

        return list(outs), pull_compiled

    with torch.enable_grad():
        leaves = [inputs[i].detach().requires_grad_(bool(wanted[i])) for i in present]
        outs = call(*leaves)

    def pull(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [(i, leaf) for i, leaf in zip(present, leaves) if leaf.requires_grad]
        out: list[Tensor | None] = [None] * len(inputs)
        if not pairs or not wrt:
            return out
        got = torch.autograd.grad(
            [o for o, _ in pairs], [leaf for _, leaf in wrt], [g for _, g in pairs], allow_unused=True
        )
        for (i, _), g in zip(wrt, got):
            out[i] = g
        return out

    return list(outs), pull
