"""Couplings: the shared :class:`Coupling` base, Glow-style :class:`AffineCoupling`, the
volume-preserving :class:`AdditiveCoupling` (NICE, Glow's additive variant) and SRFlow's
:class:`CondAffineCoupling`.

A coupling is a list of *stages*; each stage evaluates a subnet ``h = subnet(cat(x[:, :passive],
cond))`` (or ``subnet(cond)`` for a stage that does not read the flow state, SRFlow's affine
injector) and applies the coupling's fused op to the channels ``[passive:]`` of the flow state.
The base owns the split, the concatenation, the conditioning, the stages and their one-evaluation
backward (STYLE rule 10, FrEIA's ``_BaseCouplingBlock``); a subclass writes only its rule, i.e.
its two op calls (:meth:`Coupling._transform`, :meth:`Coupling._transform_bwd`) and how many
subnet outputs it needs per active channel (``H_PER_CHANNEL``):

* affine (``flowkernels.ops.affine_coupling_*``, 2 per channel): shift ``h[:, 0::2]``, raw scale
  ``h[:, 1::2]``, ``s = sigmoid(raw + 2) + eps``; ``y2 = (x2 + shift) * s`` (SRFlow and the
  official Glow code, ``shift_first=True``) or ``y2 = x2 * s + shift`` (the Glow paper);
* additive (``flowkernels.ops.additive_coupling_*``, 1 per channel): ``y2 = x2 + h``, log-det 0.

Because the passive channels are unchanged, the memory-saving backward evaluates each subnet
exactly once, on the OUTPUT's passive channels, and gets from that one evaluation both the
shift/scale to invert and the graph for the gradient (DESIGN.md section 3).

Subnets follow the official SRFlow layout (keys ``0``, ``2``, ``4``): conv3x3 (no bias) +
ActNorm, ReLU, conv1x1 (no bias) + ActNorm, ReLU, zero-initialised conv3x3 with bias whose
output is scaled by ``exp(3 * logs)``.

Level batching (:mod:`flowkernels.layers._cond_parts`): a conditional coupling declares the
conditioning columns of its subnets' first convolutions (:meth:`AffineCoupling.cond_projections`);
a :class:`~flowkernels.FlowSequence` then computes their conditioning parts for many steps in
one convolution and passes each stage its part, and the stage evaluates
``conv(x1, W[:, :C1], b) + part`` as its first (folded) convolution.

Folding (:mod:`flowkernels.layers._folding`): inside a FlowSequence every subnet convolution and
the per-channel scale after it run as one convolution of folded parameters, computed for all
steps at once (:meth:`AffineCoupling.fold_terms`); a coupling called on its own runs its subnets
as plain Sequentials, op for op the official maths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from ..dispatch import select_backend
from ..ops.additive_coupling import additive_coupling_bwd, additive_coupling_fwd, additive_coupling_inv
from ..ops.affine_coupling import SRFLOW_EPS, affine_coupling_bwd, affine_coupling_fwd, affine_coupling_inv
from ._cond_parts import CondProjection, Parts
from ._contract import StepGrads, check_cond, check_flow_input, flat_grads, flow_precision
from ._folding import ConvRecord, Folded, FoldTerms, as_dtype, conv_vjp, pullback
from ._structure import structural
from .actnorm import ActNorm
from .base import FusedLayer, module_pullback

__all__ = [
    "Conv2dActNorm",
    "Conv2dZeros",
    "make_subnet",
    "Coupling",
    "AdditiveCoupling",
    "AffineCoupling",
    "CondAffineCoupling",
    "Stage",
    "Subnet",
    "validate_scale_floor",
]


class Conv2dActNorm(nn.Module):
    """Convolution without bias followed by ActNorm (the official subnet ``Conv2d``).

    Keys: ``weight`` (out, in, k, k), ``actnorm.bias`` / ``actnorm.logs`` (1, out, 1, 1).
    Weight ~ N(0, 0.05^2) as in the official code; 'same' padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) * 0.05)
        self.actnorm = ActNorm(out_channels)
        self.padding = kernel_size // 2

    def forward(self, x: Tensor) -> Tensor:
        return self.actnorm(F.conv2d(x, self.weight, padding=self.padding))

    def fold_terms(self) -> FoldTerms:
        """``actnorm(conv(x, W)) = (conv(x, W) + bias) * exp(logs)``: foldable into one conv."""
        return FoldTerms(self.weight, self.actnorm.logs, self.actnorm.bias, 1.0)


class Conv2dZeros(nn.Module):
    """Zero-initialised conv3x3 with bias, output scaled by ``exp(logscale_factor * logs)``.

    Keys: ``weight`` (out, in, 3, 3), ``bias`` (out,), ``logs`` (out, 1, 1).
    """

    padding = 1

    def __init__(self, in_channels: int, out_channels: int, logscale_factor: float = 3.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding) * torch.exp(self.logs * self.logscale_factor)

    def fold_terms(self) -> FoldTerms:
        return FoldTerms(self.weight, self.logs, self.bias, self.logscale_factor)


def _has_fold_terms(layer: nn.Module) -> bool:
    # on the class: hasattr on a module instance goes through nn.Module.__getattr__, which raises
    # (slowly) for the parameter-free layers, once per layer per subnet call
    return callable(getattr(type(layer), "fold_terms", None))


class Subnet(nn.Sequential):
    """The coupling subnet (``make_subnet``): a Sequential of convolutions with a per-channel
    scale (:class:`Conv2dActNorm`, :class:`Conv2dZeros`) and parameter-free layers (ReLU).

    ``subnet(inp)``: the plain Sequential, the official maths (op for op). :meth:`run_folded`:
    the same function with each convolution and its scale as one convolution of folded
    parameters (:mod:`flowkernels.layers._folding`), optionally with the first convolution's
    conditioning part precomputed: what a :class:`~flowkernels.FlowSequence` runs.
    """

    @structural
    def convolutions(self) -> tuple[nn.Module, ...]:
        """The layers with a per-channel scale (``fold_terms``), in order; the others must be
        parameter-free for the subnet to fold."""
        return tuple(layer for layer in self if _has_fold_terms(layer))

    @structural
    def foldable(self) -> bool:
        return all(_has_fold_terms(layer) or not any(True for _ in layer.parameters()) for layer in self)

    @structural
    def fold_terms(self) -> tuple[FoldTerms, ...]:
        return tuple(layer.fold_terms() for layer in self.convolutions())

    @structural
    def _layers(self) -> tuple[tuple[nn.Module, bool], ...]:
        """Each layer and whether it is one of :meth:`convolutions`."""
        return tuple((layer, _has_fold_terms(layer)) for layer in self)

    def run_folded(
        self, inp: Tensor | None, folded: Sequence[Folded], part: Tensor | None = None, tape: list | None = None
    ) -> Tensor:
        """The subnet on ``inp`` with folded convolutions (``folded``: one per :meth:`convolutions`).

        With ``part = conv(cond, W0[:, C1:])`` (B, out, H, W), the conditioning part of the first
        folded convolution, ``inp`` is only the flow-state channels x1 (C1 of them; None for a
        subnet reading the conditioning alone): ``first = conv(x1, W0[:, :C1], b0) + part``.
        ``tape``: a list that receives what :meth:`backward_folded` needs, layer by layer.
        """
        convs = iter(folded)
        out = inp
        for index, (layer, is_conv) in enumerate(self._layers()):
            if not is_conv:
                if tape is None:
                    out = layer(out)
                elif type(layer) is nn.ReLU:
                    out = layer(out)
                    tape.append(out)  # its mask
                else:  # any other parameter-free layer: its own autograd
                    (out,), pull = pullback(lambda t, layer=layer: [layer(t)], [out], [True])
                    out = out.detach()
                    tape.append(pull)
                continue
            weight, bias = next(convs)
            # The folded tensors carry the compute dtype (bfloat16 under autocast: cast by the
            # sequence, explicitly, so that a traced region computes what eager autocast does).
            first_part = index == 0 and part is not None
            x = None if out is None else as_dtype(out, weight.dtype)
            applied = weight[:, : x.shape[1]] if first_part and x is not None else weight
            if x is not None:
                conv = F.conv2d(x, applied, bias, padding=layer.padding)
            if first_part:
                # Sum in float32 (at least): under bf16 both convolutions come out in bf16, and a
                # bf16 sum would round a third time where the per-step convolution rounds once.
                wide = reference.at_least_float32(part)
                if x is None:
                    conv = bias.view(1, -1, 1, 1)
                conv = as_dtype(conv, wide) + as_dtype(part, wide)
            if tape is not None:
                tape.append(
                    ConvRecord(
                        inp=x,
                        inp_dtype=None if out is None else out.dtype,
                        weight=applied,
                        folded_shape=weight.shape,
                        bias=bias,
                        padding=layer.padding,
                        part_dtype=part.dtype if first_part else None,
                    )
                )
            out = conv
        return out

    @staticmethod
    def backward_folded(
        tape: list, grad_out: Tensor, trains: Sequence[tuple[bool, bool]], wants_inp: bool
    ) -> tuple[Tensor | None, Tensor | None, list[Folded | None]]:
        """The backward of :meth:`run_folded` from its ``tape``: ``(dL/dinp, dL/dpart, dL/d(folded)
        per convolution)`` given ``grad_out`` = dL/d(output). ``trains``: (weight, bias) of each
        folded convolution need a gradient (None where not); ``wants_inp``: dL/dinp is needed.
        Each convolution is one ``convolution_backward``, each ReLU one ``threshold_backward``:
        no autograd graph is built or walked (a quarter less host time than ``autograd.grad``
        over the recomputed subnet)."""
        grads: list[Folded | None] = []
        g, g_part = grad_out, None
        k = len(trains)
        for entry in reversed(tape):
            if isinstance(entry, Tensor):  # a ReLU's output
                g = torch.ops.aten.threshold_backward(g, entry, 0)
                continue
            if not isinstance(entry, ConvRecord):  # another parameter-free layer's pullback
                g = entry([g])[0]
                continue
            k -= 1
            g_in, g_part_k, g_w, g_b = conv_vjp(entry, g, trains[k], wants_inp or k > 0)
            g_part = g_part_k if g_part_k is not None else g_part
            grads.append(None if g_w is None and g_b is None else Folded(g_w, g_b))
            g = g_in
        grads.reverse()
        return g, g_part, grads


def make_subnet(in_channels: int, out_channels: int, hidden: int = 64) -> Subnet:
    """The official SRFlow/Glow coupling subnet (keys 0, 2, 4); output starts at exactly zero."""
    return Subnet(
        Conv2dActNorm(in_channels, hidden, 3),
        nn.ReLU(inplace=False),
        Conv2dActNorm(hidden, hidden, 1),
        nn.ReLU(inplace=False),
        Conv2dZeros(hidden, out_channels),
    )


def validate_scale_floor(floor: float, eps: float, name: str = "min_scale") -> float:
    """Return ``floor`` as a float if it lies in (eps, 1 + eps), the range of ``s``; else raise
    ValueError naming the argument ``name``."""
    floor = float(floor)
    if not eps < floor < 1.0 + eps:
        raise ValueError(f"{name}: expected a value in ({eps}, {1.0 + eps}), got {floor}")
    return floor


def floor_scale(h: Tensor, floor: float, eps: float) -> tuple[Tensor, Tensor]:
    """Raise the raw scales of ``h`` so that ``s = sigmoid(raw + 2) + eps >= floor``.

    The inverse divides by s; the official model blows up (NaN, black patches) where s nears
    eps = 1e-4 on out-of-distribution latents. Returns (clamped h, mask of untouched raw entries).
    """
    p = validate_scale_floor(floor, eps, "inverse_scale_floor") - eps
    raw_min = math.log(p / (1.0 - p)) - 2.0 if p < 1.0 else math.inf
    raw = h[:, 1::2]
    keep = raw >= raw_min
    clamped = h.clone()
    clamped[:, 1::2] = raw.clamp(min=raw_min)
    return clamped, keep


class Stage(NamedTuple):
    """One subnet + affine application: ``passive`` untouched channels; ``reads_x`` says whether
    the subnet input includes ``x[:, :passive]`` (else it is the conditioning tensor alone)."""

    subnet: nn.Module
    passive: int
    reads_x: bool


class Coupling(FusedLayer):
    """Base of the couplings: ``y1 = x1``, ``y2 = rule(x2, subnet(cat(x1, cond)))``, x1 = x[:, :C//2].

    Args:
        channels: C (>= 2).
        cond_channels: channels of the conditioning tensor (0: unconditional).
        hidden: subnet width.
        backend: kernel backend of this layer (None: the global default).
    Parameters: ``net`` (the subnet; ``make_subnet`` layout), unless a subclass builds others.

    To add a coupling rule, subclass and set ``H_PER_CHANNEL`` (subnet outputs per active
    channel) and implement :meth:`_transform` and :meth:`_transform_bwd` with a fused op (or
    any differentiable-free computation that rebuilds its input from its output); forward,
    inverse, level batching and the memory-saving backward then come from this class.
    """

    H_PER_CHANNEL = 2

    def __init__(self, channels: int, cond_channels: int = 0, hidden: int = 64, backend: str | None = None) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"channels: a coupling needs at least 2 channels, got {channels}")
        self.channels = channels
        self.cond_channels = cond_channels
        self.backend = backend
        self._build_subnets(hidden)

    def _build_subnets(self, hidden: int) -> None:
        c = self.channels
        self.net = make_subnet(c // 2 + self.cond_channels, self.H_PER_CHANNEL * (c - c // 2), hidden)

    def extra_repr(self) -> str:
        return f"{self.channels}, cond_channels={self.cond_channels}"

    @structural
    def stages(self) -> tuple[Stage, ...]:
        """The stages in forward order (memoised: an override should be :func:`structural` too)."""
        return (Stage(self.net, self.channels // 2, True),)

    def _transform(self, x: Tensor, h: Tensor, logdet: Tensor, passive: int, reverse: bool, backend: str) -> Tensor:
        """The rule on channels ``[passive:]`` given the subnet output ``h`` (its inverse when
        ``reverse``), ``logdet`` (B,) updated in place; runs with autocast off."""
        raise NotImplementedError

    def _transform_bwd(
        self, out: Tensor, h: Tensor, grad_out: Tensor, grad_logdet: Tensor, passive: int, reverse: bool, backend: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Backward with recompute of :meth:`_transform` from its output: ``(inp, grad_inp, grad_h)``
        (``grad_inp`` of the passive channels: only the direct part); runs with autocast off."""
        raise NotImplementedError

    def _check_input(self, x: Tensor, cond: Tensor | None) -> None:
        check_flow_input(x, self.channels)
        check_cond(cond, x, self.cond_channels)

    @structural
    def fold_terms(self) -> tuple[FoldTerms, ...]:
        """The foldable convolutions of the stages' subnets, stage by stage (empty unless every
        subnet is a foldable :class:`Subnet`): what a FlowSequence folds for all its steps at once
        and passes back as ``folded`` (:mod:`flowkernels.layers._folding`)."""
        stages = self.stages()
        if not all(isinstance(stage.subnet, Subnet) and stage.subnet.foldable() for stage in stages):
            return ()
        return tuple(t for stage in stages for t in stage.subnet.fold_terms())

    @structural
    def cond_projections(self) -> tuple[CondProjection, ...]:
        """The conditioning columns of each stage's first convolution, in stage order (empty
        for an unconditional or unfoldable coupling): what a FlowSequence may precompute for many
        steps in one convolution of the folded weights and pass back as ``parts`` (see the module
        docstring)."""
        stages = self.stages()
        if not self.cond_channels or not self.fold_terms() or not all(self._first_folds(s) for s in stages):
            return ()
        projections, term = [], 0
        for stage in stages:
            first = stage.subnet[0]
            projections.append(CondProjection(first.weight, stage.passive if stage.reads_x else 0, first.padding, term))
            term += len(stage.subnet.convolutions())
        return tuple(projections)

    @staticmethod
    def _first_folds(stage: Stage) -> bool:
        return hasattr(stage.subnet[0], "fold_terms")

    def _stage_folds(self, folded: Sequence[Folded] | None) -> list[list[Folded] | None]:
        """A step's folded convolutions (:meth:`fold_terms` order) split by stage."""
        stages = self.stages()
        if folded is None:
            return [None] * len(stages)
        out, k = [], 0
        for stage in stages:
            n = len(stage.subnet.convolutions())
            out.append(list(folded[k : k + n]))
            k += n
        return out

    def _subnet_input(self, stage: Stage, x: Tensor, cond: Tensor | None, has_part: bool) -> Tensor | None:
        """The subnet's input: ``cat(x1, cond)``, ``x1`` or ``cond``; with a precomputed
        conditioning part, x1 alone (None for a stage that reads the conditioning only)."""
        x1 = x[:, : stage.passive] if stage.reads_x else None
        if has_part:
            return x1
        if x1 is None:
            return cond
        return x1 if not self.cond_channels else torch.cat([x1, cond], dim=1)

    def _run(
        self,
        x: Tensor,
        cond: Tensor | None,
        logdet: Tensor,
        reverse: bool,
        parts: Parts = None,
        folded: Sequence[Folded] | None = None,
    ) -> Tensor:
        return self.apply_stages(x, cond, logdet, reverse, self.kernel_backend(x), parts, folded)

    def apply_stages(
        self,
        x: Tensor,
        cond: Tensor | None,
        logdet: Tensor,
        reverse: bool,
        backend: str,
        parts: Parts = None,
        folded: Sequence[Folded] | None = None,
    ) -> Tensor:
        """Run the stages (reversed and inverted when ``reverse``), ``logdet`` updated in place.
        ``parts``: the conditioning part of each stage (:meth:`cond_projections` order) or None;
        ``folded``: the folded convolutions (:meth:`fold_terms` order), or None to run the
        subnets as plain Sequentials (the official maths)."""
        stages = self.stages()
        stage_folds = self._stage_folds(folded)
        order = range(len(stages) - 1, -1, -1) if reverse else range(len(stages))
        for i in order:
            stage, part = stages[i], None if parts is None else parts[i]
            inp = self._subnet_input(stage, x, cond, part is not None)
            h = stage.subnet(inp) if stage_folds[i] is None else stage.subnet.run_folded(inp, stage_folds[i], part)
            with flow_precision(x):
                x = self._transform(x, h, logdet, stage.passive, reverse, backend)
        return x

    def backward_from_output(
        self,
        out: Tensor,
        grad_out: Tensor,
        grad_logdet: Tensor,
        cond: Tensor | None,
        reverse: bool,
        parts: Parts = None,
        folded: Sequence[Folded] | None = None,
    ) -> StepGrads:
        res = self.backward_stages(
            out, grad_out, grad_logdet, cond, reverse, select_backend(self.backend, out), parts, folded
        )
        inp, grad_inp, grad_cond, grads_by_id, grad_parts, grad_folded = res
        grad_params = flat_grads(self.trainable_parameters(), grads_by_id)
        return StepGrads(inp, grad_inp, grad_cond, grad_params, grad_parts, grad_folded)

    def backward_stages(
        self,
        out: Tensor,
        grad_out: Tensor,
        grad_logdet: Tensor,
        cond: Tensor | None,
        reverse: bool,
        backend: str,
        parts: Parts = None,
        folded: Sequence[Folded] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, dict[int, Tensor | None], list | None, list | None]:
        """Backward with recompute through the stages: one subnet evaluation per stage on the
        output's passive channels, then the fused op. Returns (inp, grad_inp, grad_cond,
        parameter gradients keyed by ``id(param)``, gradients of ``parts`` or None, gradients of
        ``folded`` (a :class:`Folded` of gradients or None per convolution) or None).

        With ``parts`` the stages never read ``cond`` (grad_cond is None), and the gradients of
        the first convolutions' conditioning columns are left to whoever computed the parts. With
        ``folded`` the subnets are differentiated with respect to the folded convolutions, and the
        gradients of the subnet parameters are left to whoever folded them."""
        stages = self.stages()
        stage_folds = self._stage_folds(folded)
        grads_by_id: dict[int, Tensor | None] = {}
        grad_parts: list[Tensor | None] | None = None if parts is None else [None] * len(stages)
        grad_folded: list[Folded | None] | None = None if folded is None else []
        # cond as saved by the unit keeps requires_grad: False for a frozen encoder's features
        cond_grad = parts is None and cond is not None and bool(self.cond_channels) and cond.requires_grad
        grad_cond = torch.zeros_like(cond) if cond_grad else None
        order = range(len(stages)) if reverse else range(len(stages) - 1, -1, -1)
        stage_grads: list[list[Folded | None]] = [[] for _ in stages]
        for i in order:
            stage, part = stages[i], None if parts is None else parts[i]
            inp = self._subnet_input(stage, out, cond, part is not None)
            wants_inp = stage.reads_x or cond_grad
            if stage_folds[i] is None:
                h, pull = module_pullback(stage.subnet, inp, input_grads=[wants_inp])
            else:
                h, pull = _folded_pullback(stage.subnet, inp, part, stage_folds[i], wants_inp)
            with flow_precision(out):
                out, grad_out, grad_h = self._transform_bwd(
                    out, h, grad_out, grad_logdet, stage.passive, reverse, backend
                )
            g_inputs, g_params = pull(grad_h)
            g_in = g_inputs[0]
            if grad_parts is not None:
                grad_parts[i] = g_inputs[1]
            if stage.reads_x:
                grad_out[:, : stage.passive] += g_in[:, : stage.passive]
                g_in = g_in[:, stage.passive :]
            if grad_cond is not None and g_in is not None:
                grad_cond += g_in
            if stage_folds[i] is None:
                params = [p for p in stage.subnet.parameters() if p.requires_grad]
                grads_by_id.update(zip(map(id, params), g_params))
            else:
                stage_grads[i] = g_params
        if grad_folded is not None:
            grad_folded = [g for grads in stage_grads for g in grads]
        return out, grad_out, grad_cond, grads_by_id, grad_parts, grad_folded


def _folded_pullback(
    subnet: Subnet, inp: Tensor | None, part: Tensor | None, folded: Sequence[Folded], wants_inp: bool
) -> tuple[Tensor, Callable[[Tensor], tuple[tuple[Tensor | None, ...], list[Folded | None]]]]:
    """``subnet.run_folded(inp, folded, part)`` once, and its pullback to the input, the part and
    the folded convolutions (a folded tensor's gradient only where its parameters train), by
    :meth:`Subnet.backward_folded` from the evaluation's tape."""
    trains = [
        (t.weight.requires_grad or t.logs.requires_grad, t.bias.requires_grad or t.logs.requires_grad)
        for t in subnet.fold_terms()
    ]
    tape: list = []
    with torch.no_grad():
        h = subnet.run_folded(inp, folded, part, tape=tape)

    def pull(grad_h: Tensor) -> tuple[tuple[Tensor | None, ...], list[Folded | None]]:
        with torch.no_grad():
            g_inp, g_part, grads = subnet.backward_folded(tape, as_dtype(grad_h, h.dtype), trains, wants_inp)
        return (g_inp if wants_inp else None, g_part), grads

    return h, pull


class AffineCoupling(Coupling):
    """Affine coupling: ``y1 = x1``, ``y2 = affine(x2, subnet(cat(x1, cond)))``, x1 = x[:, :C//2].

    Args:
        channels: C (>= 2).
        cond_channels: channels of the conditioning tensor (0: unconditional).
        hidden: subnet width.
        shift_first: ``(x2 + t) * s`` (SRFlow, and the official Glow code) if True, ``x2 * s + t``
            (the Glow paper's formula) if False. The default differs on purpose from the op's
            (``ops.affine_coupling_fwd`` defaults to SRFlow's True): this class is the generic
            coupling of the paper, while SRFlow's layer, :class:`CondAffineCoupling`, and
            :class:`~flowkernels.Glow` pass True.
        eps: scale floor, ``s = sigmoid(raw + 2) + eps``.
        backend: kernel backend of this layer (None: the global default).
    Parameters: ``net`` (the subnet; ``make_subnet`` layout).

    Attribute ``inverse_scale_floor`` (None by default): if set, the inverse uses
    ``max(s, floor)`` instead of s, trading exact invertibility for bounded amplification
    (a sampling remedy; see :func:`floor_scale`). The forward is never affected.
    """

    def __init__(
        self,
        channels: int,
        cond_channels: int = 0,
        hidden: int = 64,
        shift_first: bool = False,
        eps: float = SRFLOW_EPS,
        backend: str | None = None,
    ) -> None:
        super().__init__(channels, cond_channels, hidden, backend)
        self.shift_first = shift_first
        self.eps = eps
        self.inverse_scale_floor: float | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift_first={self.shift_first}, eps={self.eps}"

    def _transform(self, x: Tensor, h: Tensor, logdet: Tensor, passive: int, reverse: bool, backend: str) -> Tensor:
        if reverse and self.inverse_scale_floor is not None:
            h, _ = floor_scale(h, self.inverse_scale_floor, self.eps)
        op = affine_coupling_inv if reverse else affine_coupling_fwd
        return op(x, h, logdet, passive=passive, shift_first=self.shift_first, eps=self.eps, backend=backend)[0]

    def _transform_bwd(
        self, out: Tensor, h: Tensor, grad_out: Tensor, grad_logdet: Tensor, passive: int, reverse: bool, backend: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        keep = None
        if reverse and self.inverse_scale_floor is not None:
            h, keep = floor_scale(h, self.inverse_scale_floor, self.eps)
        inp, grad_inp, grad_h = affine_coupling_bwd(
            out,
            h,
            grad_out,
            grad_logdet,
            passive=passive,
            shift_first=self.shift_first,
            eps=self.eps,
            reverse=reverse,
            backend=backend,
        )
        if keep is not None:  # the clamped raw scales are constants: no gradient through them
            grad_h[:, 1::2] *= keep
        return inp, grad_inp, grad_h


class AdditiveCoupling(Coupling):
    """Additive coupling (NICE; Glow's ``flow_coupling=0``): ``y1 = x1``, ``y2 = x2 + subnet(cat(x1, cond))``.

    Volume preserving: the log-det of a call is exactly 0 and the passed ``logdet`` comes back
    unchanged (the fused op ``flowkernels.ops.additive_coupling_*`` adds nothing). Cheaper than
    the affine coupling (half the subnet outputs, no scale, no division on the inverse, so no
    error amplification), less expressive per step.

    Args:
        channels: C (>= 2); cond_channels: conditioning channels (0: unconditional);
        hidden: subnet width; backend: kernel backend (None: the global default).
    Parameters: ``net`` (the subnet, ``make_subnet`` layout, ``C - C//2`` outputs).
    """

    H_PER_CHANNEL = 1

    def _transform(self, x: Tensor, h: Tensor, logdet: Tensor, passive: int, reverse: bool, backend: str) -> Tensor:
        op = additive_coupling_inv if reverse else additive_coupling_fwd
        return op(x, h, logdet, passive=passive, backend=backend)[0]

    def _transform_bwd(
        self, out: Tensor, h: Tensor, grad_out: Tensor, grad_logdet: Tensor, passive: int, reverse: bool, backend: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        return additive_coupling_bwd(out, h, grad_out, passive=passive, reverse=reverse, backend=backend)


class CondAffineCoupling(AffineCoupling):
    """SRFlow's ``CondAffineSeparatedAndCond``: affine injector, then conditional coupling.

    1. injector: ``h = fFeatures(cond)``; ``x = (x + h[:, 0::2]) * s`` on all C channels;
    2. coupling: ``h = fAffine(cat(x[:, :C//2], cond))``; the same on ``x[:, C//2:]``.

    Args:
        channels: C; cond_channels: conditioning channels (320 in SRFlow); hidden: 64.
    Parameters (official keys): ``fFeatures`` (cond -> 2C), ``fAffine`` (C//2 + cond -> 2(C - C//2)).
    """

    def __init__(
        self,
        channels: int,
        cond_channels: int = 320,
        hidden: int = 64,
        eps: float = SRFLOW_EPS,
        backend: str | None = None,
    ) -> None:
        if cond_channels < 1:
            raise ValueError(
                f"cond_channels: the conditional coupling needs a conditioning tensor, got {cond_channels}"
            )
        super().__init__(channels, cond_channels, hidden, shift_first=True, eps=eps, backend=backend)

    def _build_subnets(self, hidden: int) -> None:
        c = self.channels
        self.fAffine = make_subnet(c // 2 + self.cond_channels, 2 * (c - c // 2), hidden)
        self.fFeatures = make_subnet(self.cond_channels, 2 * c, hidden)

    @structural
    def stages(self) -> tuple[Stage, ...]:
        return (Stage(self.fFeatures, 0, False), Stage(self.fAffine, self.channels // 2, True))
