"""MATLAB-compatible ``imresize`` with the bicubic kernel and antialiasing: a float path in
PyTorch and the uint8 path of the official SRFlow data and metrics in numpy.

SRFlow's LR images and its LR-PSNR metric use MATLAB's ``imresize(img, 1/scale, 'bicubic')``:
Keys' cubic kernel (a = -0.5); when shrinking, the kernel is stretched by 1/scale (antialiasing)
and scaled down by the same factor; output pixel ``i`` (1-based) samples input coordinate
``u = i / scale + 0.5 * (1 - 1 / scale)``; borders are mirrored (symmetric padding); weights
are normalised to sum to one. :func:`contributions` holds those taps for one axis.

* :func:`imresize` (float tensors, any device): each axis is one matrix product; values are not
  rounded.
* :func:`imresize_uint8` (uint8 numpy images): the official pipeline's uint8 path (the numpy port
  of MATLAB's imresize that SRFlow's ``prepare_data.py`` and ``test.py`` call): the height pass,
  clip to [0, 255] and round to uint8, then the width pass, clip and round again. Rounding after
  *each* pass is what MATLAB does for uint8 images too; rounding once at the end (the float path
  followed by a rounding) differs from it by 1-2 levels on 4-11% of the LR values. Each output
  value is the float64 sum of its taps in tap order, as the official code sums them, so the
  result equals the official LR bit for bit (``tests/test_srflow_official_eval.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["contributions", "imresize", "imresize_uint8", "resize_weights"]


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic kernel (a = -0.5), float64, with the products in MATLAB's order."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def contributions(in_size: int, out_size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The taps of one axis: ``(indices, weights)``, both (out_size, taps); ``out[i] = sum_p
    weights[i, p] * in[indices[i, p]]`` with 0-based, border-mirrored int64 indices and float64
    weights that sum to one per row."""
    width = 4.0 / scale if scale < 1 else 4.0
    u = np.arange(1, out_size + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = math.ceil(width) + 2
    idx = (left[:, None] + np.arange(taps) - 1).astype(np.int64)  # 0-based input indices
    dist = u[:, None] - idx - 1
    weights = scale * _cubic(dist * scale) if scale < 1 else _cubic(dist)
    weights = weights / np.sum(weights, axis=1)[:, None]
    # symmetric (mirror) border: -1 -> 0, -2 -> 1, in_size -> in_size - 1, ...
    mirror = np.concatenate([np.arange(in_size), np.arange(in_size - 1, -1, -1)])
    return mirror[np.mod(idx, 2 * in_size)], weights


def resize_weights(in_size: int, out_size: int, scale: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """(out_size, in_size) matrix W such that ``out = W @ in`` resizes one axis like MATLAB."""
    indices, weights = contributions(in_size, out_size, scale)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.scatter_add_(1, torch.from_numpy(indices), torch.from_numpy(weights))
    return matrix.to(dtype)


def _sizes(in_h: int, in_w: int, scale: float | None, size: tuple[int, int] | None) -> tuple[tuple, tuple]:
    """((out_h, out_w), (scale_h, scale_w)) from a factor or an output size."""
    if size is None:
        if scale is None or not scale > 0:
            raise ValueError(f"scale: expected a positive factor or a size, got {scale}")
        return (math.ceil(in_h * scale), math.ceil(in_w * scale)), (scale, scale)
    return tuple(size), (size[0] / in_h, size[1] / in_w)


def imresize(img: Tensor, scale: float | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """Resize (..., H, W) float images like MATLAB ``imresize(img, scale, 'bicubic')``.

    Args:
        img: (..., H, W) floating tensor (e.g. (B, 3, H, W) in [0, 1]); any device.
        scale: factor (0.25 shrinks 4x); or ``size``: (out_h, out_w) with scale = out / in per axis.
    Returns: (..., out_h, out_w) in img's dtype. Values are not clamped or quantised; for images
    that are uint8 (what SRFlow's LR and LR-PSNR are made from) use :func:`imresize_uint8`.
    """
    if not img.is_floating_point():
        raise TypeError(f"img: expected a floating tensor, got {img.dtype}")
    in_h, in_w = img.shape[-2:]
    size, scales = _sizes(in_h, in_w, scale, size)
    w_h = resize_weights(in_h, size[0], scales[0]).to(img.device)
    w_w = resize_weights(in_w, size[1], scales[1]).to(img.device)
    compute = img.double() if img.dtype == torch.float64 else img.float()
    out = torch.matmul(w_h.to(compute.dtype), compute)
    out = torch.matmul(out, w_w.to(compute.dtype).T)
    return out.to(img.dtype)


def _resize_axis_uint8(img: np.ndarray, axis: int, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One pass of :func:`imresize_uint8` along ``axis`` (0 or 1) of an (H, W, C) uint8 image."""
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    acc = None
    for p in range(indices.shape[1]):  # summed in tap order, like the official code
        term = weights[:, p].reshape(shape) * np.take(img, indices[:, p], axis=axis).astype(np.float64)
        acc = term if acc is None else acc + term
    return np.around(np.clip(acc, 0, 255)).astype(np.uint8)


def imresize_uint8(img: np.ndarray, scale: float | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Resize an (H, W, C) or (H, W) uint8 image as the official SRFlow pipeline does (MATLAB's
    uint8 ``imresize``; module docstring): per axis, the smaller scale first (height on a tie),
    each pass clipped and rounded (half to even) to uint8.

    Args:
        img: (H, W, C) or (H, W) uint8 numpy array (HWC, as read from a PNG).
        scale: factor (0.25 shrinks 4x); or ``size``: (out_h, out_w).
    Returns: uint8 array (out_h, out_w[, C]).
    """
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        kind = img.dtype if isinstance(img, np.ndarray) else type(img).__name__
        raise TypeError(f"img: expected a uint8 numpy array (H, W[, C]), got {kind}")
    if img.ndim not in (2, 3):
        raise ValueError(f"img: expected (H, W) or (H, W, C), got shape {img.shape}")
    out = img[:, :, None] if img.ndim == 2 else img
    in_h, in_w = out.shape[:2]
    size, scales = _sizes(in_h, in_w, scale, size)
    for axis in np.argsort(scales, kind="stable"):
        indices, weights = contributions(out.shape[axis], size[axis], scales[axis])
        out = _resize_axis_uint8(out, int(axis), indices, weights)
    return out[:, :, 0] if img.ndim == 2 else out
