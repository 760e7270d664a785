"""SRFlow's conditional flow (the official ``flowUpsamplerNet``): one configuration of
:class:`flowkernels.MultiScaleFlow`.

Level l = 1..L (L = log2(scale) + 1; the container counts them from 0), C the flow channels:

1. ``Squeeze`` (space-to-depth x2, pixel_unshuffle order): C -> 4C, H/2, W/2;
2. ``n_transitional`` FlowSteps without coupling (ActNorm + invertible 1x1 conv);
3. K FlowSteps with ``CondAffineCoupling(C, cond_channels, hidden)`` (affine injector, then
   coupling), conditioned on level l's RRDB feature (``fea_up{scale / 2^l}``);
4. ``Split2d`` (learned, unconditional prior on the kept half) for l < L - 1;

and a standard normal prior at the top. The container runs each level's steps as one
memory-saving FlowSequence, with level batching by device (:meth:`set_cond_batching`).

What is SRFlow's own here: the RRDB feature each level reads (:attr:`FlowUpsamplerNet.features`),
the unused ``f`` convolution and the overflow guard of :meth:`FlowUpsamplerNet.decode`.
State-dict layout (official, strict-loadable): the container's ``layers.{i}`` in application
order (4x: squeeze 0/20/39, split 19), plus ``f.0``, an unused Conv2d(cond_channels, 96, 3x3)
that the official model builds and never calls; it is kept so official checkpoints load with
strict=True, and its parameters never require grad.

Latents and objective are the official ones: a split's latent is ``eps = (z2 - mean) / std``
and ``encode``'s objective is ``logdet + log N(eps; 0, I) - sum(log std)`` summed over splits,
plus ``log N(z_top; 0, I)``, which is the official ``logdet + log N(z2; mean, std)`` up to the
order of the float additions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import flowkernels as fk

from .presets import SRFlowPreset
from .rrdb import feature_name

__all__ = ["FlowUpsamplerNet", "UNUSED_F_CHANNELS"]

UNUSED_F_CHANNELS = 96  # official flowUpsamplerNet.f: Conv2d(320, 96, 3x3), built but never called


class FlowUpsamplerNet(fk.MultiScaleFlow):
    """The conditional flow HR image (B, 3, H, W) <-> latents, on RRDB features.

    Args:
        preset: the architecture.
        memory_saving: run each level as one memory-saving FlowSequence unit when gradients are
            needed (True), or with plain stored-activation autograd (False).
        keep_every: FlowSequence option, keep every N-th step input to bound recompute drift.
        backend: flowkernels backend of every FlowStep (``"auto"``, ``"reference"``, ...).

    ``encode(x, conds, logdet) -> (latents, objective)`` (the container's :meth:`encode`; conds:
    one feature per level, level l's (B, cond_channels, H / 2^l, W / 2^l)) and :meth:`decode`.
    """

    def __init__(
        self,
        preset: SRFlowPreset,
        *,
        memory_saving: bool = True,
        keep_every: int | None = None,
        backend: str | None = "auto",
    ) -> None:
        fk.validate_backend(backend, allow_none=True)

        def make_steps(level: int, channels: int, cond_channels: int) -> list[fk.FlowStep]:
            steps = [fk.FlowStep(channels, backend=backend) for _ in range(preset.n_transitional)]
            for _ in range(preset.K):
                coupling = fk.CondAffineCoupling(channels, cond_channels, preset.hidden, backend=backend)
                steps.append(fk.FlowStep(channels, coupling, backend=backend))
            return steps

        super().__init__(
            3,
            preset.L,
            make_steps,
            # Official rule: a split after every level but the last two (one for 4x, two for 8x).
            splits=[level < preset.L - 2 for level in range(preset.L)],
            cond_channels=preset.cond_channels,
            top_prior="standard",
            memory_saving=memory_saving,
            keep_every=keep_every,
        )
        self.preset = preset
        # Level l's feature is at scale / 2^l times the LR size. A tuple: torch.compile(dynamic=True)
        # traces the floats of a list attribute as symbols, which cannot index RRDB.features' dict.
        self.factors = tuple(preset.scale / 2 ** (level + 1) for level in range(preset.L))
        self.features = [feature_name(f) for f in self.factors]
        # SRFlow validates its images once per call (and decode guards overflow itself), so the
        # container skips its NaN/Inf scan; the nested layers run inside its checked context.
        self.check_inputs = False
        self.f = nn.Sequential(nn.Conv2d(preset.cond_channels, UNUSED_F_CHANNELS, 3, padding=1))
        self.f.requires_grad_(False)

    def couplings(self) -> list[fk.AffineCoupling]:
        """Every coupling module (for the sampling scale floor)."""
        return [m for m in self.layers.modules() if isinstance(m, fk.AffineCoupling)]

    def decode(self, zs: list[Tensor], conds: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Latents (as :meth:`encode` returns them) -> (HR image (B, 3, H, W), overflow).

        The reverse pass divides by coupling scales down to 1e-4 and can overflow float32 on
        latents the model finds unlikely. After each split and each level, positions holding
        NaN/Inf are zeroed so the pass can go on, and the HR pixels they cover become NaN in the
        output; ``overflow`` is the (B, 1, H, W) bool mask of those pixels. All on the device:
        no host sync (the caller reads the mask if it wants to report it).
        """
        guard = _OverflowGuard()
        x, _ = self.inverse(zs, conds, guard=guard)
        return x.masked_fill(guard.overflow, float("nan")), guard.overflow


class _OverflowGuard:
    """The :data:`flowkernels.LevelGuard` of :meth:`FlowUpsamplerNet.decode`: zeroes the positions
    of z (B, C, h, w) with a non-finite channel and collects the HR pixels they cover."""

    def __init__(self) -> None:
        self.overflow: Tensor | None = None

    def __call__(self, z: Tensor, level: fk.FlowLevel) -> Tensor:
        block = 2 ** (level.index + 1)  # HR pixels per latent position (edge) at this level
        bad = ~torch.isfinite(z).all(dim=1, keepdim=True)
        hr_bad = bad.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)
        self.overflow = hr_bad if self.overflow is None else self.overflow | hr_bad
        return torch.where(bad, torch.zeros((), device=z.device, dtype=z.dtype), z)
