"""Glow (Kingma & Dhariwal, NeurIPS 2018) as a configuration of :class:`~flowkernels.MultiScaleFlow`.

L levels of squeeze -> K steps -> split (every level but the last), each step ActNorm ->
invertible 1x1 convolution (plain or LU) -> affine or additive coupling, a learned top prior. The
conventions are those of the official code (openai/glow ``model.py``), which differ in places
from the paper's equations: the affine coupling is ``y2 = (x2 + shift) * sigmoid(raw + 2)``
(shift first, shift and raw scale interleaved on channels), the split prior reads its mean and
log-scale interleaved from a zero-initialised 3x3 convolution of the kept half, and the learned
top prior is one mean and scale per channel (``learntop``). One deliberate difference: the
coupling scale has the floor ``eps`` = 1e-4 of :class:`~flowkernels.AffineCoupling` (the
official code has none), which bounds how much an inverse (sampling) can amplify errors.

Conditioning (optional, one of):

* class labels (``num_classes``): the top prior is conditioned on the one-hot class (the
  official ``ycond``), everything else is unconditional (:class:`ClassCondition`);
* an image (``cond_channels``): a small trainable encoder (:class:`ImageCondition`) maps it to a
  feature tensor per level, which every coupling, every split prior and the top prior read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import AdditiveCoupling, AffineCoupling, Coupling, FlowStep, MultiScaleFlow

__all__ = ["COUPLINGS", "ClassCondition", "Glow", "ImageCondition"]

COUPLINGS = ("affine", "additive")


class ClassCondition(nn.Module):
    """Class labels (B,) integer in [0, num_classes) -> the per-level conditioning of a
    class-conditional Glow: None for every level but the last, and the one-hot class as a
    (B, num_classes, 1, 1) float tensor for the top prior."""

    def __init__(self, num_classes: int, levels: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes: expected at least 2, got {num_classes}")
        self.num_classes = num_classes
        self.levels = levels

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, levels={self.levels}"

    def forward(self, labels: Tensor) -> list[Tensor | None]:
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"cond: expected class labels, an integer tensor of shape (B,), got {shape}")
        if labels.numel() and not bool(((labels >= 0) & (labels < self.num_classes)).all()):
            raise ValueError(f"cond: class labels must lie in [0, {self.num_classes}), got {labels.tolist()}")
        one_hot = F.one_hot(labels, self.num_classes).float()[:, :, None, None]
        return [None] * (self.levels - 1) + [one_hot]


class ImageCondition(nn.Module):
    """A conditioning image (B, C_img, H, W) -> one feature tensor per level, (B, features,
    H / 2^(l+1), W / 2^(l+1)) at level l: a squeeze of the previous level's tensor (the image for
    level 0), then a 3x3 convolution and a ReLU. Trained with the flow (the memory-saving units
    return their conditioning gradients)."""

    def __init__(self, in_channels: int, features: int, levels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        widths = [in_channels] + [features] * levels
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * widths[lvl], features, 3, padding=1), nn.ReLU())
            for lvl in range(levels)
        )

    def forward(self, image: Tensor) -> list[Tensor]:
        if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[1] != self.in_channels:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"cond: expected a (B, {self.in_channels}, H, W) image, got {shape}")
        features, f = [], image
        for block in self.blocks:
            f = block(f)
            features.append(f)
        return features


class Glow(MultiScaleFlow):
    """Glow: ``levels`` levels of ``steps`` flow steps (module docstring).

    Args:
        in_channels: image channels C_0.
        levels: L (the image size must be divisible by 2^L).
        steps: K, flow steps per level.
        hidden: coupling subnet width (512 in the paper).
        coupling: ``"affine"`` or ``"additive"``.
        lu: LU-parametrised 1x1 convolutions.
        learn_top: learned top prior (else N(0, I)); implied by conditioning.
        num_classes: class-conditional top prior (``cond`` = labels (B,)); 0: none.
        cond_channels: image-conditional (``cond`` = an image (B, cond_channels, H, W)); 0: none.
        cond_features: width of the image-conditioning features.
        image_size: (H, W) that :meth:`sample` uses by default.
        memory_saving, keep_every, cond_batching: FlowSequence options of every level.
        backend: kernel backend of every step (None: the global default).
        generator: RNG of the orthogonal 1x1 initialisations.
    """

    def __init__(
        self,
        in_channels: int = 3,
        levels: int = 3,
        steps: int = 32,
        hidden: int = 512,
        *,
        coupling: str = "affine",
        lu: bool = True,
        learn_top: bool = True,
        num_classes: int = 0,
        cond_channels: int = 0,
        cond_features: int = 32,
        image_size: tuple[int, int] | None = None,
        memory_saving: bool = True,
        keep_every: int | None = None,
        cond_batching: bool | None = None,
        backend: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling: expected one of {COUPLINGS}, got {coupling!r}")
        if steps < 1:
            raise ValueError(f"steps: expected at least 1 step per level, got {steps}")
        if num_classes and cond_channels:
            raise ValueError("num_classes, cond_channels: choose class- or image-conditioning, not both")

        def make_coupling(channels: int, cond: int) -> Coupling:
            if coupling == "additive":
                return AdditiveCoupling(channels, cond, hidden, backend=backend)
            return AffineCoupling(channels, cond, hidden, shift_first=True, backend=backend)

        def make_steps(level: int, channels: int, cond: int) -> list[FlowStep]:
            step_cond = cond if cond_channels else 0  # class labels reach the top prior only
            return [
                FlowStep(channels, make_coupling(channels, step_cond), lu=lu, backend=backend, generator=generator)
                for _ in range(steps)
            ]

        if num_classes:
            per_level = [0] * (levels - 1) + [num_classes]
            cond_net, split_prior, top = ClassCondition(num_classes, levels), "learned", "conditional"
        elif cond_channels:
            per_level = [cond_features] * levels
            cond_net = ImageCondition(cond_channels, cond_features, levels)
            split_prior, top = "conditional", "conditional"
        else:
            per_level, cond_net, split_prior, top = 0, None, "learned", "learned" if learn_top else "standard"
        super().__init__(
            in_channels,
            levels,
            make_steps,
            cond_channels=per_level,
            split_prior=split_prior,
            top_prior=top,
            cond_net=cond_net,
            memory_saving=memory_saving,
            keep_every=keep_every,
            cond_batching=cond_batching,
            image_size=image_size,
        )
        self.steps_per_level = steps
        self.coupling = coupling
