"""MultiScaleFlow: the multi-scale architecture of RealNVP, Glow and SRFlow as one container.

Level l = 0 .. L-1, C_0 = ``in_channels``, C the channels after the level's squeeze:

1. :class:`~flowkernels.Squeeze` (space-to-depth x2): C_l -> C = 4 C_l, H, W halved;
2. the steps ``make_steps(l, C, cond_channels[l])`` returns, run as ONE memory-saving
   :class:`~flowkernels.FlowSequence` (DESIGN.md section 3: one autograd unit per level, level
   batching of the conditioning convolutions available, every backend);
3. if ``splits[l]``: a :class:`~flowkernels.Split2d` keeps C - C//2 channels and factors the rest
   out under a learned Gaussian prior (``split_prior="conditional"``: also reading the level's
   conditioning tensor, as the official Split2d can);

then the top prior (:class:`~flowkernels.GaussianPrior`: standard, learned, or conditioned on
the last level's tensor) over the last level's output.

Latents and log-det. Every latent is standardised by its prior: ``zs = [eps of each split in
level order, eps of the top]``, each N(0, I) under the model, so sampling at temperature T is
``inverse(T * randn)`` and ``inverse(zs)`` never needs the priors' internals. ``forward`` returns
the log-det of the bijection ``x -> zs`` itself (flow steps plus ``-sum(logs)`` of each prior),
which a brute-force Jacobian checks, and ``log p(x) = sum_i log N(zs_i; 0, I) + logdet``
(:meth:`MultiScaleFlow.log_prob`). With the standard top prior, ``zs`` and ``log_prob`` are
exactly SRFlow's latents and objective (its ``encode``).

Conditioning. ``cond`` is None, or one tensor per level (level l's at the resolution after its
squeeze, ``(B, cond_channels[l], H / 2^(l+1), W / 2^(l+1))``; a conditional top prior also takes
``(B, K, 1, 1)``; None for a level without), or, with a ``cond_net``, that module's input: it
maps one input (an image, class labels, SRFlow's LR image through its RRDB taps) to that list.

Parameters live in one flat ``layers`` ModuleList in application order (per level: squeeze,
steps, split), the layout of SRFlow's ``flowUpsamplerNet.layers.N`` and of the PyTorch Glow
ports, plus ``top_prior.*`` and ``cond_net.*``. Each level's FlowSequence shares the step modules
of ``layers`` without registering them again (a second registration would duplicate every key of
the state_dict): :meth:`MultiScaleFlow.train` passes the mode on to them, and nested layers run
with their input checks done once by the container.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import reference
from .._random import draw
from ..dispatch import validate_backend
from ._contract import check_finite, check_initialized, in_plain_mode, inputs_checked, logdet_buffer, set_mode
from .actnorm import initialize_actnorms
from .base import FusedLayer, InvertibleModule
from .prior import PRIOR_KINDS, GaussianPrior
from .sequence import FlowSequence, validate_keep_every
from .split import Split2d
from .squeeze import Squeeze

__all__ = ["FlowLevel", "LevelGuard", "MultiScaleFlow", "StepFactory"]

# make_steps(level, channels, cond_channels) -> the level's steps (channels: after its squeeze)
StepFactory = Callable[[int, int, int], Sequence[InvertibleModule]]


@dataclass(eq=False)
class FlowLevel:
    """One level: its squeeze, the FlowSequence of its steps, its split (or None), and where its
    modules sit in ``MultiScaleFlow.layers`` (``first`` .. ``stop - 1``)."""

    index: int
    squeeze: Squeeze
    sequence: FlowSequence
    split: Split2d | None
    first: int
    stop: int

    def encode(self, x: Tensor, cond: Tensor | None, logdet: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """x -> (the state passed on, the split's eps or None, logdet + this level's log-det)."""
        x, logdet = self.squeeze(x, None, logdet)
        x, logdet = self.sequence(x, cond, logdet)
        if self.split is None:
            return x, None, logdet
        return self.split.standardize(x, cond, logdet)

    def decode(
        self, z: Tensor, eps: Tensor | None, cond: Tensor | None, logdet: Tensor, guard: LevelGuard | None = None
    ) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`encode`: (state, eps) -> (x, logdet - this level's log-det).
        ``guard(z, level) -> z``, if given, sees (and may replace) the state after the split and
        after the steps (:meth:`MultiScaleFlow.inverse`)."""
        if self.split is not None:
            z, logdet = self.split.unstandardize(z, eps, cond, logdet)
            if guard is not None:
                z = guard(z, self)
        z, logdet = self.sequence.inverse(z, cond, logdet)
        if guard is not None:
            z = guard(z, self)
        return self.squeeze.inverse(z, None, logdet)


# guard(state, level) -> state: a check between the stages of a level's inverse
LevelGuard = Callable[[Tensor, FlowLevel], Tensor]


def _per_level(value: int | Sequence[int] | Sequence[bool], levels: int, name: str) -> list:
    if isinstance(value, (int, bool)):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name}: expected one value per level ({levels}), got {len(value)}")
    return value


class MultiScaleFlow(nn.Module):
    """Levels of squeeze -> steps -> split, and a top prior (module docstring).

    Args:
        in_channels: C_0 of the input x (B, C_0, H, W); H and W divisible by 2^levels.
        levels: L >= 1.
        make_steps: ``make_steps(level, channels, cond_channels)`` -> the level's invertible
            steps (e.g. FlowSteps), built for ``channels`` = the channels after its squeeze.
        splits: per level, whether it ends with a split (default: every level but the last).
        cond_channels: channels of each level's conditioning tensor (one int for all levels;
            0: the level takes none).
        split_prior: ``"learned"`` (prior from the kept half) or ``"conditional"`` (also from the
            level's conditioning tensor).
        top_prior: ``"standard"``, ``"learned"``, ``"conditional"`` (reads the last level's
            conditioning tensor) or a prior module (:mod:`flowkernels.layers.prior`).
        cond_net: a module mapping ``cond`` to the list of per-level tensors (None: ``cond`` is
            that list).
        memory_saving, keep_every, cond_batching: options of every level's FlowSequence.
        image_size: (H, W) that :meth:`sample` uses when given no size (optional).
    """

    check_inputs = True

    def __init__(
        self,
        in_channels: int,
        levels: int,
        make_steps: StepFactory,
        *,
        splits: Sequence[bool] | None = None,
        cond_channels: int | Sequence[int] = 0,
        split_prior: str = "learned",
        top_prior: str | nn.Module = "standard",
        cond_net: nn.Module | None = None,
        memory_saving: bool = True,
        keep_every: int | None = None,
        cond_batching: bool | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels: expected at least 1, got {levels}")
        if split_prior not in ("learned", "conditional"):
            raise ValueError(f"split_prior: expected 'learned' or 'conditional', got {split_prior!r}")
        self.in_channels = in_channels
        self.cond_channels = _per_level(cond_channels, levels, "cond_channels")
        split_flags = _per_level(
            [lvl < levels - 1 for lvl in range(levels)] if splits is None else splits, levels, "splits"
        )
        self.image_size = image_size
        self.layers = nn.ModuleList()
        self._levels: list[FlowLevel] = []
        channels = in_channels
        for lvl in range(levels):
            first = len(self.layers)
            channels *= 4
            squeeze = Squeeze(2)
            steps = list(make_steps(lvl, channels, self.cond_channels[lvl]))
            sequence = FlowSequence(steps, memory_saving, keep_every, cond_batching=cond_batching)
            split = None
            if split_flags[lvl]:
                split = Split2d(channels, self._prior_cond(split_prior, lvl, "split_prior"))
            self.layers.append(squeeze)
            self.layers.extend(steps)
            if split is not None:
                self.layers.append(split)
                channels = split.kept
            self._levels.append(FlowLevel(lvl, squeeze, sequence, split, first, len(self.layers)))
        self.top_channels = channels
        if isinstance(top_prior, str):
            if top_prior not in PRIOR_KINDS:
                raise ValueError(f"top_prior: expected one of {PRIOR_KINDS} or a module, got {top_prior!r}")
            top_prior = GaussianPrior(channels, top_prior, self._prior_cond(top_prior, levels - 1, "top_prior"))
        self.top_prior = top_prior
        self.cond_net = cond_net

    def _prior_cond(self, kind: str, level: int, name: str) -> int:
        """The conditioning channels a prior of ``kind`` at ``level`` reads (0 unless conditional)."""
        if kind != "conditional":
            return 0
        if not self.cond_channels[level]:
            raise ValueError(f"{name}: a 'conditional' prior needs cond_channels at level {level}, got 0")
        return self.cond_channels[level]

    # ---- structure and settings ----

    @property
    def levels(self) -> list[FlowLevel]:
        """The levels, first (highest resolution) first."""
        return list(self._levels)

    def train(self, mode: bool = True) -> MultiScaleFlow:
        super().train(mode)
        for level in self._levels:  # not registered submodules (module docstring)
            level.sequence.train(mode)
        return self

    def set_memory_saving(self, memory_saving: bool, keep_every: int | None = None) -> None:
        """Set every level's FlowSequence ``memory_saving`` and ``keep_every``."""
        validate_keep_every(keep_every)
        for level in self._levels:
            level.sequence.memory_saving = bool(memory_saving)
            level.sequence.keep_every = keep_every

    def set_cond_batching(
        self, enabled: bool | None, *, chunk_bytes: int | None = None, keep_parts: bool = False
    ) -> None:
        """Level batching of every level's FlowSequence (:meth:`FlowSequence.set_cond_batching`)."""
        for level in self._levels:
            level.sequence.set_cond_batching(enabled, chunk_bytes=chunk_bytes, keep_parts=keep_parts)

    def set_backend(self, backend: str | None) -> None:
        """Set the kernel backend of every fused layer (FlowSteps and their couplings)."""
        validate_backend(backend, allow_none=True)
        for module in self.layers.modules():
            if isinstance(module, FusedLayer):
                module.backend = backend

    def initialize_(self, x: Tensor, cond: object = None) -> int:
        """Data-dependent init of every uninitialised ActNorm from one plain forward of a first
        batch (see :func:`~flowkernels.initialize_actnorms`); returns how many were initialised."""
        return initialize_actnorms(self, lambda: self(x, cond))

    def latent_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Shapes of the latents of an input (batch, C_0, height, width): split eps first, top last."""
        self._check_size(height, width)
        shapes = []
        channels, h, w = self.in_channels, height, width
        for level in self._levels:
            channels, h, w = channels * 4, h // 2, w // 2
            if level.split is not None:
                shapes.append((batch, channels - level.split.kept, h, w))
                channels = level.split.kept
        shapes.append((batch, channels, h, w))
        return shapes

    def _check_size(self, height: int, width: int) -> None:
        f = 2 ** len(self._levels)
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"x: H and W must be positive multiples of 2^levels = {f}, got {height}x{width}")

    # ---- conditioning ----

    def conditioning(self, cond: object, batch: int | None = None) -> list[Tensor | None]:
        """The per-level conditioning tensors of ``cond`` (through ``cond_net`` if there is one),
        checked against ``cond_channels`` and, if given, the batch size."""
        if self.cond_net is not None and cond is not None:
            cond = self.cond_net(cond)
        if cond is None:
            if any(self.cond_channels):
                raise ValueError(
                    f"cond: this flow is conditional (cond_channels per level {self.cond_channels}), got None"
                )
            return [None] * len(self._levels)
        if isinstance(cond, Tensor) or not isinstance(cond, Sequence) or len(cond) != len(self._levels):
            what = "cond_net's output" if self.cond_net is not None else "cond"
            raise ValueError(
                f"{what}: expected a list of {len(self._levels)} per-level tensors (or None entries), got "
                f"{type(cond).__name__}" + (f" of length {len(cond)}" if isinstance(cond, Sequence) else "")
            )
        for lvl, (c, channels) in enumerate(zip(cond, self.cond_channels)):
            if c is None:
                if channels:
                    raise ValueError(f"cond[{lvl}]: level {lvl} needs a tensor of {channels} channels, got None")
                continue
            if not isinstance(c, Tensor) or c.dim() != 4 or c.shape[1] != channels:
                shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
                raise ValueError(f"cond[{lvl}]: expected a (B, {channels}, h, w) tensor, got {shape}")
            if batch is not None and c.shape[0] != batch:
                raise ValueError(f"cond[{lvl}]: expected batch {batch}, got {c.shape[0]}")
        return list(cond)

    def _checked(self, x: Tensor, conds: list[Tensor | None]) -> contextlib.AbstractContextManager:
        """Validate once at the top (as InvertibleModule does) and return the context in which
        nested layers skip their own checks. Traced by torch.compile: no NaN scan (a
        data-dependent branch) and no mode change (Dynamo would replay it)."""
        if torch.compiler.is_compiling():
            if self.training and not in_plain_mode():
                check_initialized(self)
            return contextlib.nullcontext()
        if not inputs_checked():
            if self.training and not in_plain_mode():
                check_initialized(self)
            if self.check_inputs:
                check_finite("x", x)
                for lvl, c in enumerate(conds):
                    if c is not None:
                        check_finite(f"cond[{lvl}]", c)
        return set_mode("inputs_checked")

    # ---- x <-> latents ----

    def forward(self, x: Tensor, cond: object = None, logdet: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """x (B, C_0, H, W) -> (zs, logdet + log|det dzs/dx|); zs as :meth:`latent_shapes`, each
        N(0, I) under the model. logdet: (B,) of x's dtype or None (zeros); not modified."""
        self._check_input(x)
        conds = self.conditioning(cond, x.shape[0])
        logdet = logdet_buffer(x, logdet, clone=True)
        with self._checked(x, conds):
            zs = []
            for level, c in zip(self._levels, conds):
                x, eps, logdet = level.encode(x, c, logdet)
                if eps is not None:
                    zs.append(eps)
            z_top, logdet = self.top_prior.standardize(x, conds[-1], logdet)
        return [*zs, z_top], logdet

    def inverse(
        self,
        zs: Sequence[Tensor],
        cond: object = None,
        logdet: Tensor | None = None,
        *,
        guard: LevelGuard | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Latents (as :meth:`forward` returns them) -> (x, logdet - log|det dzs/dx|).

        ``guard(z, level) -> z``, if given, is applied to the state after each level's split and
        after its steps (e.g. SRFlow's overflow guard, which zeroes non-finite positions so that
        a pass on unlikely latents can go on)."""
        zs = self._check_latents(zs)
        return self._decode(zs, self.conditioning(cond, zs[-1].shape[0]), logdet, guard)

    def _decode(
        self, zs: list[Tensor], conds: list[Tensor | None], logdet: Tensor | None, guard: LevelGuard | None
    ) -> tuple[Tensor, Tensor]:
        logdet = logdet_buffer(zs[-1], logdet, clone=True)
        eps_list = zs[:-1]
        with self._checked(zs[-1], conds):
            z, logdet = self.top_prior.unstandardize(zs[-1], conds[-1], logdet)
            for level, c in zip(reversed(self._levels), reversed(conds)):
                eps = eps_list.pop() if level.split is not None else None
                z, logdet = level.decode(z, eps, c, logdet, guard)
        return z, logdet

    def encode(self, x: Tensor, cond: object = None, logdet: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """x -> (zs, logdet + log p(x)): the latents of :meth:`forward` and the log-likelihood
        ``sum_i log N(zs_i; 0, I) + log|det dzs/dx|`` (B,), added to ``logdet`` (e.g. a
        dequantisation term; None: zeros)."""
        zs, logdet = self(x, cond, logdet)
        return zs, logdet + sum(reference.gaussian_log_prob(z) for z in zs)

    def log_prob(self, x: Tensor, cond: object = None) -> Tensor:
        """log p(x) in nats per sample, (B,): ``sum_i log N(zs_i; 0, I) + log|det dzs/dx|``."""
        return self.encode(x, cond)[1]

    def bits_per_dim(self, x: Tensor, cond: object = None, *, n_bins: int | None = None) -> Tensor:
        """-log2 p(x) / D per sample, (B,), D = C_0 * H * W. With ``n_bins``: the data are
        quantised to bins of width 1/n_bins (e.g. 256 for 8-bit images scaled to [0, 1) and
        dequantised with uniform noise), and ``D * log(n_bins)`` turns the density into the
        discrete log-likelihood bound that papers report as bits/dim."""
        dims = x[0].numel()
        nll = -self.log_prob(x, cond)
        if n_bins is not None:
            nll = nll + dims * math.log(n_bins)
        return nll / (dims * math.log(2.0))

    @torch.no_grad()
    def sample(
        self,
        n: int | None = None,
        cond: object = None,
        *,
        size: tuple[int, int] | None = None,
        shapes: Sequence[tuple[int, ...]] | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw x = inverse(temperature * N(0, I) latents), (n, C_0, H, W), without gradients.

        The latent shapes come from ``shapes`` (as :meth:`latent_shapes` returns them) or from
        ``n`` (default: the conditioning's batch) and the image ``size`` (default: that of the
        conditioning tensors, else ``image_size``). ``generator`` makes it reproducible;
        temperature 0 gives the model's mode-seeking sample (all latents zero).
        """
        conds = self.conditioning(cond)
        if shapes is None:
            batch = n if n is not None else next((c.shape[0] for c in conds if c is not None), None)
            if batch is None:
                raise ValueError("n: the number of samples is needed when no conditioning gives it")
            shapes = self.latent_shapes(batch, *self._sample_size(size, conds))
        for lvl, c in enumerate(conds):
            if c is not None and c.shape[0] != shapes[-1][0]:
                raise ValueError(f"cond[{lvl}]: expected batch {shapes[-1][0]} (the samples), got {c.shape[0]}")
        param = next(self.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        zs = [draw(torch.randn, s, generator, device, dtype) * temperature for s in shapes]
        return self._decode(self._check_latents(zs), conds, None, None)[0]

    def _sample_size(self, size: tuple[int, int] | None, conds: list[Tensor | None]) -> tuple[int, int]:
        if size is not None:
            return tuple(size)
        for lvl, c in enumerate(conds):
            if c is not None and c.shape[2:] != (1, 1):
                return c.shape[2] * 2 ** (lvl + 1), c.shape[3] * 2 ** (lvl + 1)
        if self.image_size is None:
            raise ValueError(
                "size: the image size (H, W) is needed: no conditioning tensor gives it, no image_size set"
            )
        return tuple(self.image_size)

    # ---- input checks ----

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected a (B, {self.in_channels}, H, W) tensor, got {shape}")
        self._check_size(x.shape[2], x.shape[3])

    def _check_latents(self, zs: Sequence[Tensor]) -> list[Tensor]:
        zs = list(zs)
        n_latents = 1 + sum(level.split is not None for level in self._levels)
        if len(zs) != n_latents:
            raise ValueError(f"zs: expected {n_latents} latents (one per split, then the top), got {len(zs)}")
        top = zs[-1]
        if top.dim() != 4:
            raise ValueError(f"zs[-1]: expected a 4-D (B, C, h, w) tensor, got shape {tuple(top.shape)}")
        f = 2 ** len(self._levels)
        expected = self.latent_shapes(top.shape[0], top.shape[2] * f, top.shape[3] * f)
        for i, (z, shape) in enumerate(zip(zs, expected)):
            if tuple(z.shape) != shape:
                raise ValueError(f"zs[{i}]: expected shape {shape}, got {tuple(z.shape)}")
        return zs
