"""Checks shared by the fused-op wrappers."""

from __future__ import annotations

import torch
from torch import Tensor


def new_logdet(x: Tensor, logdet: Tensor | None) -> Tensor:
    """``logdet`` validated as a (B,) buffer of x's dtype (float32 for the kernels) on x's device,
    or a new zero buffer."""
    if logdet is None:
        return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    if logdet.shape != (x.shape[0],) or logdet.dtype != x.dtype or logdet.device != x.device:
        raise ValueError(
            f"logdet: expected a {x.dtype} tensor of shape ({x.shape[0]},) on {x.device}, "
            f"got {logdet.dtype} {tuple(logdet.shape)} on {logdet.device}"
        )
    return logdet


def check_not_differentiating(backend: str, *tensors: Tensor) -> None:
    """Kernel ops mutate the log-det buffer, so they carry no autograd formula of their own."""
    if backend != "reference" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"the {backend!r} kernels have no autograd formula of their own: differentiate through "
            "FlowStep / FlowSequence (invertible recompute), call under torch.no_grad(), or use "
            "backend='reference'"
        )


def pixels_collapsible(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` itself if its H and W collapse into one pixel axis (``stride_h == W * stride_w``:
    dense NCHW or channels_last, channel slices, expanded gradients of a sum), else a dense copy
    in ``like``'s memory format: upstream gradients can arrive in any layout, the kernels index
    pixels as ``p * stride_w``."""
    _, _, height, width = grad.shape
    if height == 1 or width == 1 or grad.stride(2) == width * grad.stride(3):
        return grad
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return grad.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
