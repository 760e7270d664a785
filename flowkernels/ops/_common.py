"""Checks and routing shared by the fused-op wrappers and their Triton launchers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._layout import pixel_strides
from .._loader import load_extension, load_triton_kernels, register_triton_kernels

__all__ = [
    "TRITON_OPS",
    "kernel_op",
    "logdet_buffer",
    "check_coupling_args",
    "check_not_differentiating",
    "pixels_collapsible",
]

# The ops with Triton kernels, each in the module flowkernels.ops._<op>_kernels
TRITON_OPS = ("channel_affine", "affine_coupling", "additive_coupling")


def _triton_module(op: str) -> str:
    return f"{__package__}._{op}_kernels"


register_triton_kernels(*map(_triton_module, TRITON_OPS))


def kernel_op(backend: str, name: str) -> Callable[..., object]:
    """The registered op ``name`` (``<op>_<dir>``) of a kernel backend, its backend loaded first:
    ``torch.ops.flowkernels.<name>`` for ``"cuda"`` (``flowkernels._C``), ``<name>_triton`` for
    ``"triton"`` (from ``flowkernels.ops._<op>_kernels``; triton and every kernel module are
    imported on first use: triton is optional and slow to import). The only place the
    ``_triton`` suffix convention lives."""
    if backend == "triton":
        load_triton_kernels()
        return getattr(torch.ops.flowkernels, f"{name}_triton")
    if backend == "cuda":
        load_extension()
        return getattr(torch.ops.flowkernels, name)
    raise ValueError(f"backend: expected a kernel backend ('cuda' or 'triton') for op {name!r}, got {backend!r}")


def logdet_buffer(x: Tensor, logdet: Tensor | None, *, clone: bool) -> Tensor:
    """``logdet`` checked as a (B,) tensor of x's dtype on x's device, or a new zero buffer.

    ``clone=False`` returns the caller's tensor itself (the ops' in-place contract: they add
    into it); ``clone=True`` a copy (the layers' contract: the caller's tensor is never mutated).
    Raises TypeError for a wrong dtype, ValueError for a wrong shape or device.
    """
    if logdet is None:
        return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    if logdet.shape != (x.shape[0],):
        raise ValueError(f"logdet: expected shape ({x.shape[0]},) to match x's batch, got {tuple(logdet.shape)}")
    if logdet.dtype != x.dtype:
        raise TypeError(f"logdet: expected {x.dtype} like x, got {logdet.dtype}")
    if logdet.device != x.device:
        raise ValueError(f"logdet is on {logdet.device} but x is on {x.device}")
    return logdet.clone() if clone else logdet


def check_coupling_args(
    x: Tensor, h: Tensor, passive: int, *, kernel_dtypes: bool = False, per_channel: int = 2
) -> None:
    """Coupling inputs: x (B, C, H, W), ``0 <= passive < C``, h (B, per_channel*(C - passive), H, W)
    on x's device (``per_channel`` 2: the affine ops' interleaved shift and raw scale; 1: the
    additive ops' shift). ``kernel_dtypes`` also requires what the kernels take (the reference
    takes any float): x float32, h float32 or bfloat16. ValueError for shapes and devices,
    TypeError for dtypes."""
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    b, c, height, width = x.shape
    if not 0 <= passive < c:
        raise ValueError(f"passive: expected 0 <= passive < {c} (x's channels), got {passive}")
    expected = (b, per_channel * (c - passive), height, width)
    if tuple(h.shape) != expected:
        what = "shift and raw scale interleaved" if per_channel == 2 else "one shift each"
        raise ValueError(
            f"h: expected shape {expected} ({what} for the {c - passive} active channels), got {tuple(h.shape)}"
        )
    if h.device != x.device:
        raise ValueError(f"h is on {h.device} but x is on {x.device}")
    if kernel_dtypes:
        if x.dtype != torch.float32:
            raise TypeError(f"x: expected torch.float32 (the flow state), got {x.dtype}")
        if h.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"h: expected torch.float32 or torch.bfloat16, got {h.dtype}")


def check_not_differentiating(backend: str, *tensors: Tensor) -> None:
    """Kernel ops mutate the log-det buffer, so they carry no autograd formula of their own."""
    if backend != "reference" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"the {backend!r} kernels have no autograd formula of their own: differentiate through "
            "FlowStep / FlowSequence (invertible recompute), call under torch.no_grad(), or use "
            "backend='reference'"
        )


def pixels_collapsible(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` itself if the kernels can address its pixels (:mod:`flowkernels._layout`), else a
    dense copy in ``like``'s memory format: upstream gradients can arrive in any layout."""
    if pixel_strides(grad) is not None:
        return grad
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return grad.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
