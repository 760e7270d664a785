"""Level-batched conditioning convolutions: the conditioning parts of many subnets as one conv.

A convolution is linear in its input channels, so the first convolution of a subnet that reads
``cat(x1, cond)`` splits exactly into a flow-state part and a conditioning part::

    conv(cat(x1, cond), W) = conv(x1, W[:, :C1]) + conv(cond, W[:, C1:])

(SRFlow's affine injector reads ``cond`` alone: ``C1 = 0``). Every step of a
:class:`~flowkernels.FlowSequence` reads the same ``cond``, so the conditioning parts ``P`` of
the steps of a *chunk* are ONE convolution with the stacked weight slices (SRFlow df2k-4x level
1: 16 steps x 2 subnets x 64 = 2048 outputs over 320 channels), one wide GEMM and one read of
``cond`` instead of 32 narrow ones. Backward is the same: the weight gradients of a chunk are one
``conv2d_weight`` GEMM of the stacked part gradients ``G``, and the conditioning gradient one
``conv2d_input`` (a transposed convolution).

A layer declares the convolutions it can have split with ``cond_projections()``
(:class:`CondProjection`: the weight parameter, the column where its conditioning channels
start, and which of its folded convolutions it is: :mod:`flowkernels.layers._folding`).
Stacking concatenates views of the folded weights at run time, so the state_dict layout is
unchanged, and in a plain autograd run the gradients flow back through the concatenation on
their own. The memory-saving unit instead reduces them itself, chunk by chunk
(:meth:`PartChunk.reduce`), into the folded weights' gradients.

Chunks are consecutive steps whose parts fit a byte budget (``B * outputs * H * W`` times the
element size of the autocast dtype): the budget bounds the transient memory of ``P`` and ``G``,
and a chunk always holds at least one step, so a budget of 0 gives one chunk per step (one
convolution for both subnets of a step, still half the launches of the per-step path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._folding import Folded

__all__ = ["CondProjection", "PartChunk", "Parts", "plan_chunks", "part_dtype"]

# What a step with projections is given: one (B, out, H, W) part per projection, or None
Parts = list[Tensor] | None


class CondProjection(NamedTuple):
    """A convolution whose input channels ``[start:]`` are the conditioning tensor.

    weight: the (out, in, k, k) parameter of the convolution (stride 1, 'same' padding);
    start: the first column of ``weight`` over the conditioning channels (0 when the convolution
    reads the conditioning alone); padding: its padding (k // 2); term: the index of the
    convolution in its layer's ``fold_terms()``, whose folded weight the parts are computed with.
    """

    weight: nn.Parameter
    start: int
    padding: int
    term: int = 0


def part_dtype(cond: Tensor) -> torch.dtype:
    """The dtype the conditioning convolution produces: the autocast dtype if autocast is on."""
    device = cond.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else cond.dtype


@dataclass(frozen=True, eq=False)
class PartChunk:
    """Steps ``[start, stop)`` (application order) and the projections of those that have some.

    ``owners[j]`` is the step of ``projections[j]``; a step's projections are consecutive, in
    the order the step declared them.
    """

    start: int
    stop: int
    owners: tuple[int, ...] = ()
    projections: tuple[CondProjection, ...] = ()

    def weight(self, folded: Mapping[int, Sequence[Folded]]) -> Tensor:
        """The stacked (sum of outputs, cond_channels, k, k) conditioning columns of the owners'
        folded weights (``folded[step]``: that step's folded convolutions)."""
        return torch.cat([folded[o][p.term].weight[:, p.start :] for o, p in zip(self.owners, self.projections)])

    def project(self, cond: Tensor, weight: Tensor) -> Tensor:
        """P = conv(cond, stacked weight): (B, sum of outputs, H, W), in the weight's dtype (the
        folded weights carry the compute dtype: :func:`part_dtype`)."""
        return F.conv2d(cond.to(weight.dtype), weight, padding=self.projections[0].padding)

    def split(self, stacked: Tensor | None) -> dict[int, list[Tensor]]:
        """Slice a stacked (B, sum of outputs, H, W) tensor into each step's list of parts."""
        parts: dict[int, list[Tensor]] = {}
        if stacked is None:
            return parts
        sizes = [p.weight.shape[0] for p in self.projections]
        for owner, part in zip(self.owners, stacked.split(sizes, dim=1)):
            parts.setdefault(owner, []).append(part)
        return parts

    def reduce(
        self, cond: Tensor, weight: Tensor, grad_parts: Tensor, cond_grad: bool
    ) -> tuple[list[Tensor], Tensor | None]:
        """Backward of :meth:`project` with the stacked ``weight`` for the stacked part gradients
        ``grad_parts`` (B, outputs, H, W).

        Returns (the gradient of each projection's conditioning columns, (out, cond_channels, k, k)
        in the weight's dtype; dL/dcond in cond's dtype, or None unless ``cond_grad``). One
        weight-gradient GEMM and one transposed convolution for the whole chunk, in the dtype the
        forward used (bf16 under autocast, like autograd of an autocast convolution).
        """
        padding = self.projections[0].padding
        work = cond.detach().to(grad_parts.dtype)
        grad_w = torch.nn.grad.conv2d_weight(work, weight.shape, grad_parts, padding=padding)
        sizes = [p.weight.shape[0] for p in self.projections]
        grads = [g.to(weight.dtype) for g in grad_w.split(sizes)]
        grad_cond = None
        if cond_grad:
            grad_cond = torch.nn.grad.conv2d_input(
                cond.shape, weight.to(grad_parts.dtype), grad_parts, padding=padding
            ).to(cond.dtype)
        return grads, grad_cond


def plan_chunks(
    projections: Sequence[Sequence[CondProjection]], cond: Tensor, budget_bytes: int
) -> tuple[PartChunk, ...]:
    """Group the steps (their projections in application order) into chunks of at most
    ``budget_bytes`` of parts for this ``cond`` (B, Cc, H, W); a step over budget on its own is a
    chunk of one. Steps without projections join the current chunk. Projections with different
    kernel shapes cannot share a convolution, so they start a new chunk."""
    b, _, h, w = cond.shape
    per_channel = b * h * w * part_dtype(cond).itemsize
    chunks: list[PartChunk] = []
    start, owners, projs, used = 0, [], [], 0
    for i, step_projs in enumerate(projections):
        cost = sum(p.weight.shape[0] for p in step_projs) * per_channel
        # len(), not truthiness: torch 2.11's Dynamo cannot trace bool() of a list
        shape_change = len(projs) > 0 and any(
            p.weight.shape[2:] != projs[0].weight.shape[2:] or p.padding != projs[0].padding for p in step_projs
        )
        if len(step_projs) > 0 and len(projs) > 0 and (used + cost > budget_bytes or shape_change):
            chunks.append(PartChunk(start, i, tuple(owners), tuple(projs)))
            start, owners, projs, used = i, [], [], 0
        owners += [i] * len(step_projs)
        projs += list(step_projs)
        used += cost
    chunks.append(PartChunk(start, len(projections), tuple(owners), tuple(projs)))
    return tuple(chunks)
