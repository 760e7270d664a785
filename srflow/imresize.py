"""MATLAB-compatible ``imresize`` with the bicubic kernel and antialiasing, in PyTorch.

SRFlow's LR images and its LR-PSNR metric use MATLAB's ``imresize(img, 1/scale, 'bicubic')``:
Keys' cubic kernel (a = -0.5); when shrinking, the kernel is stretched by 1/scale (antialiasing)
and scaled down by the same factor; output pixel ``i`` (1-based) samples input coordinate
``u = i / scale + 0.5 * (1 - 1 / scale)``; borders are mirrored (symmetric padding); weights
are normalised to sum to one. Each axis is one matrix product, so batches run on any device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["imresize", "resize_weights"]


def _cubic(x: Tensor) -> Tensor:
    ax = x.abs()
    ax2, ax3 = ax**2, ax**3
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_weights(in_size: int, out_size: int, scale: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """(out_size, in_size) matrix W such that ``out = W @ in`` resizes one axis like MATLAB."""
    width = 4.0 / scale if scale < 1 else 4.0
    out_idx = torch.arange(1, out_size + 1, dtype=torch.float64)
    u = out_idx / scale + 0.5 * (1.0 - 1.0 / scale)
    left = torch.floor(u - width / 2.0)
    taps = math.ceil(width) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # 1-based input indices
    dist = u[:, None] - idx
    weights = scale * _cubic(dist * scale) if scale < 1 else _cubic(dist)
    weights = weights / weights.sum(dim=1, keepdim=True)
    # symmetric (mirror) border: index 0 -> 1, -1 -> 2, in_size + 1 -> in_size, ...
    zero_based = idx - 1
    period = 2 * in_size
    mirrored = torch.remainder(zero_based, period)
    mirrored = torch.where(mirrored >= in_size, period - 1 - mirrored, mirrored).long()
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.scatter_add_(1, mirrored, weights)
    return matrix.to(dtype)


def imresize(img: Tensor, scale: float | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """Resize (..., H, W) float images like MATLAB ``imresize(img, scale, 'bicubic')``.

    Args:
        img: (..., H, W) floating tensor (e.g. (B, 3, H, W) in [0, 1]); any device.
        scale: factor (0.25 shrinks 4x); or ``size``: (out_h, out_w) with scale = out / in per axis.
    Returns: (..., out_h, out_w) in img's dtype. Values are not clamped or quantised; round to
    uint8 afterwards to mimic a saved MATLAB PNG (:func:`srflow.data.quantize`).
    """
    if not img.is_floating_point():
        raise TypeError(f"img: expected a floating tensor, got {img.dtype}")
    in_h, in_w = img.shape[-2:]
    if size is None:
        if scale is None or scale <= 0:
            raise ValueError(f"scale: expected a positive factor or a size, got {scale}")
        size = (math.ceil(in_h * scale), math.ceil(in_w * scale))
        scales = (scale, scale)
    else:
        scales = (size[0] / in_h, size[1] / in_w)
    w_h = resize_weights(in_h, size[0], scales[0]).to(img.device)
    w_w = resize_weights(in_w, size[1], scales[1]).to(img.device)
    compute = img.double() if img.dtype == torch.float64 else img.float()
    out = torch.matmul(w_h.to(compute.dtype), compute)
    out = torch.matmul(out, w_w.to(compute.dtype).T)
    return out.to(img.dtype)
