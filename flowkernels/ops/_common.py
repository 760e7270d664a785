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
