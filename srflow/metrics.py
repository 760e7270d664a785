"""Image-quality metrics as SRFlow and the NTIRE21 challenge report them.

Images are uint8 RGB, (H, W, 3) numpy arrays, as in the official test script: PSNR and SSIM
with scikit-image on the full image (no border crop, no Y channel), LR-PSNR = PSNR between the
LR input and the MATLAB-bicubic downscale of the SR (SRFlow reaches about 50 dB), and a
pixel-space diversity over several samples. LPIPS runs only where the ``lpips`` package and
its AlexNet weights are already on disk; nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from .imresize import imresize

__all__ = ["to_uint8", "psnr", "ssim", "lr_psnr", "diversity", "lpips_model", "lpips_distance"]


def to_uint8(img: torch.Tensor, rounding: bool = False) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, clamped, x255, truncated (the official test
    script's conversion of model outputs) or rounded (``rounding=True``, for images that were
    uint8 already, where truncation could turn k/255*255 = k - 1e-6 into k - 1)."""
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"img: expected (3, H, W), got {tuple(img.shape)}")
    arr = img.detach().float().clamp(0, 1) * 255.0
    arr = (arr.round() if rounding else arr).to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()


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


def lr_psnr(sr: torch.Tensor, lr: torch.Tensor, scale: int) -> float:
    """PSNR between the LR image and the bicubic downscale of the SR, both uint8.

    sr: (3, H, W) in [0, 1]; lr: (3, H/scale, W/scale) in [0, 1]. As the official script: the SR
    is converted to uint8 first, downscaled with MATLAB bicubic, rounded back to uint8.
    """
    sr8 = torch.from_numpy(to_uint8(sr)).permute(2, 0, 1).float()
    down = imresize(sr8[None], 1.0 / scale)[0].round().clamp(0, 255).to(torch.uint8)
    return psnr(down.permute(1, 2, 0).numpy(), to_uint8(lr, rounding=True))


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
def lpips_distance(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> float:
    """LPIPS between two (3, H, W) images in [0, 1] (scaled to [-1, 1] as the metric expects)."""
    device = next(model.parameters()).device
    x, y = (t.detach().float().clamp(0, 1)[None].to(device) * 2 - 1 for t in (a, b))
    return float(model(x, y).mean())
