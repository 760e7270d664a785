"""SRFlow's conditional flow (the official ``flowUpsamplerNet``) on flowkernels layers.

Layer sequence, level l = 1..L (L = log2(scale) + 1), C the flow channels:

1. ``Squeeze`` (space-to-depth x2, pixel_unshuffle order): C -> 4C, H/2, W/2;
2. ``n_transitional`` FlowSteps without coupling (ActNorm + invertible 1x1 conv);
3. K FlowSteps with ``CondAffineCoupling(C, cond_channels, hidden)`` (affine injector, then
   coupling), conditioned on level l's RRDB feature;
4. ``Split2d`` (learned prior on the kept half) for l < L - 1.

State-dict layout (official, strict-loadable): ``layers.{i}`` flat in exactly that order
(4x: squeeze 0/20/39, split 19), plus ``f.0`` (an unused Conv2d(cond_channels, 96, 3x3) that the
official model builds and never calls; it is kept so official checkpoints load with strict=True,
and its parameters never require grad).

Memory saving: the 2 + K steps of each level form one :class:`flowkernels.FlowSequence`, the
autograd unit of DESIGN.md section 3. Those sequences are *not* registered submodules (their
steps are already registered under ``layers``, which fixes the key layout): they live in a plain
list and share the step objects, so ``.to()``, ``load_state_dict`` and optimisers act on the same
parameters, and :meth:`FlowUpsamplerNet.train` passes the train/eval flag on to them (a
FlowSequence in training mode refuses uninitialised ActNorms; :meth:`SRFlow.initialize_actnorms`
initialises them explicitly).
Squeeze and Split2d run outside the units with ordinary autograd (no subnet activations).
Level batching (FlowSequence's ``cond_batching``; by device by default: on for CUDA tensors, off
elsewhere; :meth:`FlowUpsamplerNet.set_cond_batching`):
the RRDB-feature parts of the first convolutions of both subnets of a chunk of a level's steps
are one convolution, in training, encoding and sampling alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import flowkernels as fk
from flowkernels import reference

from .presets import SRFlowPreset
from .rrdb import feature_name

__all__ = ["FlowUpsamplerNet", "FlowLevel", "UNUSED_F_CHANNELS"]

UNUSED_F_CHANNELS = 96  # official flowUpsamplerNet.f: Conv2d(320, 96, 3x3), built but never called


@dataclass(eq=False)
class FlowLevel:
    """One level: its squeeze, the FlowSequence of its steps, its split (or None), its feature."""

    index: int
    squeeze: fk.Squeeze
    sequence: fk.FlowSequence
    split: fk.Split2d | None
    feature: str
    factor: float  # feature size / LR size


class FlowUpsamplerNet(nn.Module):
    """The conditional flow HR image <-> latents.

    Args:
        preset: the architecture.
        memory_saving: run each level as one memory-saving FlowSequence unit when gradients are
            needed (True), or with plain stored-activation autograd (False).
        keep_every: FlowSequence option, keep every N-th step input to bound recompute drift.
        backend: flowkernels backend of every FlowStep (``"auto"``, ``"reference"``, ...).
    """

    def __init__(
        self,
        preset: SRFlowPreset,
        *,
        memory_saving: bool = True,
        keep_every: int | None = None,
        backend: str | None = "auto",
    ) -> None:
        super().__init__()
        fk.validate_backend(backend, allow_none=True)
        self.preset = preset
        self.layers = nn.ModuleList()
        self._levels: list[FlowLevel] = []
        channels = 3
        for level in range(1, preset.L + 1):
            squeeze = fk.Squeeze(2)
            channels *= 4
            steps = [fk.FlowStep(channels, backend=backend) for _ in range(preset.n_transitional)]
            for _ in range(preset.K):
                coupling = fk.CondAffineCoupling(channels, preset.cond_channels, preset.hidden, backend=backend)
                steps.append(fk.FlowStep(channels, coupling, backend=backend))
            # Official rule: a split after every level but the last two (one for 4x, two for 8x).
            split = fk.Split2d(channels) if level < preset.L - 1 else None
            self.layers.append(squeeze)
            self.layers.extend(steps)
            if split is not None:
                self.layers.append(split)
            factor = preset.scale / 2**level
            self._levels.append(
                FlowLevel(
                    level,
                    squeeze,
                    fk.FlowSequence(steps, memory_saving=memory_saving, keep_every=keep_every),
                    split,
                    feature_name(factor),
                    factor,
                )
            )
            if split is not None:
                channels = split.kept
        self.top_channels = channels
        # SRFlow validates its images once per call (and decode guards overflow itself), so the
        # layers skip their own NaN/Inf scan: one host sync per level saved.
        for module in [*self.layers, *(level.sequence for level in self._levels)]:
            module.check_inputs = False
        self.f = nn.Sequential(nn.Conv2d(preset.cond_channels, UNUSED_F_CHANNELS, 3, padding=1))
        self.f.requires_grad_(False)

    @property
    def levels(self) -> list[FlowLevel]:
        """The levels, first (highest resolution) first."""
        return list(self._levels)

    def train(self, mode: bool = True) -> FlowUpsamplerNet:
        super().train(mode)
        for level in self._levels:
            level.sequence.train(mode)
        return self

    def set_memory_saving(self, memory_saving: bool, keep_every: int | None = None) -> None:
        """Set every level's FlowSequence ``memory_saving`` and ``keep_every``."""
        fk.validate_keep_every(keep_every)
        for level in self._levels:
            level.sequence.memory_saving = bool(memory_saving)
            level.sequence.keep_every = keep_every

    def set_cond_batching(
        self, enabled: bool | None, *, chunk_bytes: int | None = None, keep_parts: bool = False
    ) -> None:
        """Level batching of every level's FlowSequence (:meth:`flowkernels.FlowSequence.set_cond_batching`):
        the RRDB-feature parts of all subnet first convolutions of a chunk of steps as one
        convolution (by device by default: on for CUDA tensors), chunked by ``chunk_bytes`` (None:
        the size of the conditioning tensor), optionally kept for backward."""
        for level in self._levels:
            level.sequence.set_cond_batching(enabled, chunk_bytes=chunk_bytes, keep_parts=keep_parts)

    def set_backend(self, backend: str | None) -> None:
        """Set the flowkernels backend of every FlowStep (and its coupling)."""
        fk.validate_backend(backend, allow_none=True)
        for module in self.layers:
            if isinstance(module, fk.FlowStep):
                module.backend = backend
                if module.affine is not None:
                    module.affine.backend = backend

    def couplings(self) -> list[fk.AffineCoupling]:
        """Every coupling module (for the sampling scale floor)."""
        return [m for m in self.layers.modules() if isinstance(m, fk.AffineCoupling)]

    def latent_shapes(self, batch: int, hr_height: int, hr_width: int) -> list[tuple[int, int, int, int]]:
        """Shapes of the latents :meth:`encode` returns for an HR size: split eps first, top last."""
        shapes = []
        channels, h, w = 3, hr_height, hr_width
        for level in self._levels:
            channels, h, w = channels * 4, h // 2, w // 2
            if level.split is not None:
                shapes.append((batch, channels - level.split.kept, h, w))
                channels = level.split.kept
        shapes.append((batch, channels, h, w))
        return shapes

    def encode(self, x: Tensor, conds: list[Tensor], logdet: Tensor) -> tuple[list[Tensor], Tensor]:
        """HR x (B, 3, H, W) -> (latents, objective).

        latents: ``[eps of each split, ..., z_top]`` with eps = (z2 - mean) / std under the split's
        learned prior. objective (B,) = logdet + sum of split log-likelihoods + log N(z_top; 0, I),
        starting from ``logdet``.
        """
        eps_list = []
        for level, cond in zip(self._levels, conds):
            x, logdet = level.squeeze(x, None, logdet)
            x, logdet = level.sequence(x, cond, logdet)
            if level.split is not None:
                x, eps, logdet = level.split.encode(x, logdet)
                eps_list.append(eps)
        return eps_list + [x], logdet + reference.gaussian_log_prob(x)

    def decode(self, zs: list[Tensor], conds: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Latents (as :meth:`encode` returns them) -> (HR image (B, 3, H, W), overflow).

        The reverse pass divides by coupling scales down to 1e-4 and can overflow float32 on
        latents the model finds unlikely. After each split and each level, positions holding
        NaN/Inf are zeroed so the pass can go on, and the HR pixels they cover become NaN in the
        output; ``overflow`` is the (B, 1, H, W) bool mask of those pixels. All on the device:
        no host sync (the caller reads the mask if it wants to report it).
        """
        z = zs[-1]
        eps_list = list(zs[:-1])
        overflow: Tensor | None = None
        for level, cond in zip(reversed(self._levels), reversed(conds)):
            block = 2**level.index  # HR pixels per latent position (edge) at this level
            if level.split is not None:
                z, _ = level.split.inverse(z, eps=eps_list.pop())
                z, overflow = _guard(z, block, overflow)
            z, _ = level.sequence.inverse(z, cond)
            z, overflow = _guard(z, block, overflow)
            z, _ = level.squeeze.inverse(z)
        return z.masked_fill(overflow, float("nan")), overflow


def _guard(z: Tensor, block: int, overflow: Tensor | None) -> tuple[Tensor, Tensor]:
    """Zero the positions of z (B, C, h, w) with a non-finite channel; return z and ``overflow``
    or-ed with the HR pixels they cover (``block`` x ``block`` each)."""
    bad = ~torch.isfinite(z).all(dim=1, keepdim=True)
    hr_bad = bad.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)
    overflow = hr_bad if overflow is None else overflow | hr_bad
    return torch.where(bad, torch.zeros((), device=z.device, dtype=z.dtype), z), overflow
