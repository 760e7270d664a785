"""Image-quality metrics as SRFlow's ``test.py`` / ``Measure.py`` and the NTIRE21 challenge report them.

Images are uint8 RGB, (H, W, 3) numpy arrays, as in the official test script: PSNR and SSIM
with scikit-image on the full image (no border crop, no Y channel), LR-PSNR = PSNR between the
LR input and the official uint8 imresize of the SR (SRFlow reaches about 50 dB), LPIPS(AlexNet)
on the uint8 images scaled to [-1, 1], and a pixel-space diversity over several samples. These
equal the official code's values on its own outputs (``tests/test_srflow_official_eval.py``:
PSNR, SSIM and LR-PSNR within 1e-6). LPIPS runs only where the ``lpips`` package and its AlexNet
weights are already on disk; nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from .data import to_uint8
from .imresize import imresize_uint8

__all__ = ["to_uint8", "psnr", "ssim", "lr_psnr", "diversity", "lpips_model", "lpips_distance"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of the same shape; ``inf`` for identical images."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: the images differ in shape, {a.shape} vs {b.shape}")
    if np.array_equal(a, b):
        return float("inf")  # scikit-image would divide by zero (and warn) here
    return float(peak_signal_noise_ratio(a, b, data_range=255))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 RGB images (scikit-image defaults: 7x7 window, per channel). Both sides
    must be at least 7 pixels."""
    if a.shape != b.shape:
        raise ValueError(f"ssim: the images differ in shape, {a.shape} vs {b.shape}")
    if min(a.shape[:2]) < 7:
        raise ValueError(f"ssim: images must be at least 7x7 (the SSIM window), got {a.shape[0]}x{a.shape[1]}")
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def lr_psnr(sr: np.ndarray, lr: np.ndarray, scale: int) -> float:
    """PSNR between the LR image and the official uint8 imresize of the SR by 1/scale (``test.py``'s
    "LRC PSNR"). sr: (H, W, 3) uint8; lr: (ceil(H/scale), ceil(W/scale), 3) uint8."""
    return psnr(lr, imresize_uint8(sr, 1.0 / scale))


def diversity(samples: Sequence[torch.Tensor]) -> float:
    """Mean over pixels of the per-pixel standard deviation across samples, in 8-bit units.

    samples: n >= 2 tensors (3, H, W) in [0, 1] for the same LR. 0 means deterministic output.
    (The NTIRE21 score uses LPIPS maps; see :func:`lpips_model`.)
    """
    if len(samples) < 2:
        raise ValueError(f"samples: diversity needs at least 2 samples, got {len(samples)}")
    stack = torch.stack([s.detach().float().clamp(0, 1) * 255.0 for s in samples])
    return float(stack.std(dim=0, unbiased=False).mean())


def lpips_model() -> torch.nn.Module | None:
    """The LPIPS(AlexNet) metric if it can be built from files already on disk, else None.

    Needs the ``lpips`` package (which ships its linear weights) and torchvision's AlexNet
    weights in the torch hub cache; returns None instead of downloading anything.
    """
    try:
        import lpips  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return None
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    if not os.path.isdir(checkpoints) or not any(f.startswith("alexnet") for f in os.listdir(checkpoints)):
        return None
    return lpips.LPIPS(net="alex", verbose=False)


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, a: np.ndarray, b: np.ndarray) -> float:
    """LPIPS between two (H, W, 3) uint8 images, scaled to [-1, 1] as ``Measure.py`` does (x / 127.5 - 1)."""
    device = next(model.parameters()).device
    x, y = (
        torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1 for t in (a, b)
    )
    return float(model(x, y).mean())
