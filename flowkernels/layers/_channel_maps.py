"""The ActNorm + 1x1 maps of a sequence of steps, folded and differentiated at once.

Each :class:`~flowkernels.FlowStep` applies ``y = W diag(e^logs) (x + bias)`` per pixel: one
registered ``channel_affine`` kernel per call, fed with C x C folded parameters. Folding them and
applying the chain rule back to (W, logs, bias) is a dozen tiny ops per call; for the steps of a
sequence it is the same dozen ops on stacks (:func:`~flowkernels.ops.actnorm_conv.fold_stacked`,
:func:`~flowkernels.ops.actnorm_conv.chain_rule_stacked`): a 54-step SRFlow flow launches a few
dozen instead of a thousand or two per training step.

A layer takes part by returning :class:`MapTerms` from ``map_terms()``; it is then given its
:class:`StepMap` (``channel_map=``) and, in a memory-saving backward, returns the gradients of
the map it applied in ``StepGrads.grad_map``, which :meth:`SequenceMaps.pull_into` turns into
parameter gradients through the layer's ``map_param_grads``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..ops.actnorm_conv import StackedMaps, chain_rule_stacked, fold_stacked

__all__ = ["SequenceMaps", "MapTerms", "StepMap"]


class MapTerms(NamedTuple):
    """A step's ActNorm + 1x1 parameters: weight W (C, C); logs, bias (C elements each)."""

    weight: Tensor
    logs: Tensor
    bias: Tensor


class StepMap(NamedTuple):
    """What a step is given: the map it applies (``matrix`` (C, C), ``offset`` (C,)), the one that
    rebuilds its input from its output (``matrix_inv``, ``inv_offset``; ``matrix_inv`` None in a
    forward, which rebuilds nothing), and its log-det per pixel (0-dim; None in a backward)."""

    matrix: Tensor
    offset: Tensor
    matrix_inv: Tensor | None
    inv_offset: Tensor
    logdet_per_pixel: Tensor | None


class _Group(NamedTuple):
    steps: list[int]
    weight: Tensor
    weight_inv: Tensor | None
    bias: Tensor
    maps: StackedMaps
    shapes: tuple[torch.Size, torch.Size]  # of a step's logs and bias


def _inverse_stats(weight: Tensor, need_inverse: bool, need_logabsdet: bool) -> tuple[Tensor | None, Tensor | None]:
    """``(W^-1, log|det W|)`` of stacked weights (n, C, C), computed in float64, returned in the
    weights' dtype (each None unless needed). ``*_ex``: no host sync on an error flag.

    On a CPU from LU factors taken one matrix at a time: torch 2.13's batched CPU LU (MKL getrf,
    batch >= 2, C = 192) returns wrong pivots once the intra-op thread count has been changed in
    the process, so a batched slogdet is silently wrong and a batched inverse fails
    (tests/test_layers.py::test_sequence_maps_after_a_thread_count_change). The rest is batched:
    one triangular solve for the inverses, log|det| from the factors' diagonals (a third of
    the host time of a per-matrix ``inv_ex`` and ``slogdet``)."""
    w64 = weight.double()
    if w64.device.type != "cpu":
        inv = torch.linalg.inv_ex(w64)[0] if need_inverse else None
        lad = torch.linalg.slogdet(w64)[1] if need_logabsdet else None
        return tuple(None if t is None else t.to(weight.dtype) for t in (inv, lad))
    factors = [torch.linalg.lu_factor_ex(m)[:2] for m in w64.unbind(0)]
    lu = torch.stack([f[0] for f in factors])
    inv = lad = None
    if need_inverse:
        eye = torch.eye(lu.shape[-1], dtype=lu.dtype).expand_as(lu)
        inv = torch.linalg.lu_solve(lu, torch.stack([f[1] for f in factors]), eye).to(weight.dtype)
    if need_logabsdet:
        lad = lu.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1).to(weight.dtype)
    return inv, lad


class SequenceMaps:
    """The :class:`StepMap` of every step of ``steps[start:stop]`` with ``map_terms()``, stacked
    per channel count and folded in one go (``reverse``: the steps apply their inverses).

    W^-1 and log|det W| are computed here for the whole stack, in float64 (:func:`_inverse_stats`;
    the weights change every training step, so a per-layer cache would not save them), each only
    where needed: log|det W| in a forward, W^-1 in a backward (to rebuild, and for the log-det's
    gradient) and in a forward through the inverses (``reverse``: the map it applies).
    Differentiable when autograd is on (a plain run on the reference backend). ``backward``: the
    maps of the memory-saving backward (no log-dets).
    """

    def __init__(self, steps: Sequence, start: int, stop: int, reverse: bool, backward: bool = False) -> None:
        self.reverse, self.steps = reverse, steps
        terms = {i: t for i in range(start, stop) if (t := steps[i].map_terms()) is not None}
        first = next(iter(terms.values()), None)
        self._device_type = first.weight.device.type if first is not None else "cpu"
        with torch.autocast(self._device_type, enabled=False):  # the maps stay float32 under bf16 autocast
            self._fold(terms, backward)

    def _fold(self, terms: dict[int, MapTerms], backward: bool) -> None:
        by_key: dict[tuple, list[int]] = {}
        for i, t in terms.items():
            by_key.setdefault((t.weight.shape[0], t.weight.dtype, t.weight.device), []).append(i)
        self.maps: dict[int, StepMap] = {}
        self._groups: list[_Group] = []
        self._grads: dict[int, tuple[Tensor, Tensor, int]] = {}
        for members in by_key.values():
            ts = [terms[i] for i in members]
            weight = torch.stack([t.weight for t in ts])
            logs = torch.stack([t.logs for t in ts]).reshape(len(ts), -1)
            bias = torch.stack([t.bias for t in ts]).reshape(len(ts), -1)
            weight_inv, logabsdet = _inverse_stats(
                weight, need_inverse=backward or self.reverse, need_logabsdet=not backward
            )
            maps = fold_stacked(weight, logs, bias, weight_inv, logabsdet, reverse=self.reverse)
            n = len(ts)
            per_pixel = [None] * n if maps.logdet_per_pixel is None else maps.logdet_per_pixel.unbind(0)
            inverses = [None] * n if maps.matrix_inv is None else maps.matrix_inv.unbind(0)
            fields = zip(maps.matrix.unbind(0), maps.offset.unbind(0), inverses, maps.inv_offset.unbind(0))
            for i, f, lpp in zip(members, fields, per_pixel):
                self.maps[i] = StepMap(*f, lpp)
            self._groups.append(_Group(members, weight, weight_inv, bias, maps, (ts[0].logs.shape, ts[0].bias.shape)))

    def add_grads(self, step: int, grad_map: tuple[Tensor, Tensor] | None, pixels: int) -> None:
        """A step's gradients of the map it applied (``StepGrads.grad_map``) at ``pixels`` per sample."""
        if grad_map is not None:
            self._grads[step] = (*grad_map, pixels)

    def pull_into(
        self, grads: list[list[Tensor | None]], param_index: dict[int, tuple[int, int]], grad_logdet: Tensor
    ) -> None:
        """The chain rule of every group at once, into ``grads[step][index]`` at
        ``param_index[id(parameter)]`` (through each layer's ``map_param_grads``)."""
        with torch.autocast(self._device_type, enabled=False):
            self._pull_into(grads, param_index, grad_logdet)

    def _pull_into(
        self, grads: list[list[Tensor | None]], param_index: dict[int, tuple[int, int]], grad_logdet: Tensor
    ) -> None:
        total = grad_logdet.sum()
        for g in self._groups:
            if not all(i in self._grads for i in g.steps):
                continue
            g_map = torch.stack([self._grads[i][0] for i in g.steps])
            g_off = torch.stack([self._grads[i][1] for i in g.steps])
            # Invertible layers keep C*H*W, so the steps of a group (one channel count) share their
            # pixel count. Not torch.tensor(counts): on CUDA that is a host-to-device copy, which
            # waits for the stream (a host sync in the middle of the backward). Compared, not put
            # in a set: hashing would make a compiled step specialise on (recompile for) each size.
            count = self._grads[g.steps[0]][2]
            if any(self._grads[i][2] != count for i in g.steps):
                raise RuntimeError(
                    f"steps {g.steps} ({g.weight.shape[-1]} channels) ran at different pixel counts: a layer of "
                    "the sequence changes C*H*W, which an invertible layer cannot"
                )
            n = len(g.steps)
            g_logdet = (total * count).expand(n)
            g_w, g_logs, g_b = chain_rule_stacked(
                g_map, g_off, g_logdet, g.weight, g.weight_inv, g.bias, g.maps, reverse=self.reverse
            )
            g_logs, g_b = g_logs.reshape(n, *g.shapes[0]), g_b.reshape(n, *g.shapes[1])  # the parameters' shapes
            for i, w, lg, b in zip(g.steps, g_w.unbind(0), g_logs.unbind(0), g_b.unbind(0)):
                for param, value in self.steps[i].map_param_grads(w, lg, b):
                    if id(param) in param_index:
                        step, index = param_index[id(param)]
                        grads[step][index] = value
