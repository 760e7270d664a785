"""Launcher helpers shared by the Triton op files."""

from __future__ import annotations

import os

import triton
from torch import Tensor
from torch.library import wrap_triton

__all__ = ["launcher", "poison", "bcp_strides"]


def launcher(kernel: object) -> object:
    """``wrap_triton(kernel)`` so that torch.compile sees the launch; under ``TRITON_INTERPRET=1``
    ``triton.jit`` makes an InterpretedFunction, which has no JIT metadata for the traceable
    wrapper and is launched directly (what torch >= 2.13's ``wrap_triton`` does itself)."""
    return wrap_triton(kernel) if isinstance(kernel, triton.runtime.JITFunction) else kernel


def poison(*outputs: Tensor) -> None:
    """Fill fresh output buffers with NaN (tests set FLOWKERNELS_POISON_OUTPUTS=1, read at
    launch time), so elements a kernel forgets to write show up."""
    if os.environ.get("FLOWKERNELS_POISON_OUTPUTS") == "1":
        for t in outputs:
            t.fill_(float("nan"))


def bcp_strides(name: str, t: Tensor) -> tuple[int, int, int]:
    """``(stride_b, stride_c, stride_w)`` of a (B, C, H, W) tensor, ``stride_w`` being the stride
    of the flattened pixel index ``p = h * W + w``: valid when ``stride_h == W * stride_w``
    (dense NCHW and dense channels_last). With W == 1 the pixel stride is stride_h."""
    _, _, height, width = t.shape
    stride_b, stride_c, stride_h, stride_w = t.stride()
    if width == 1:
        return stride_b, stride_c, stride_h
    if height > 1 and stride_h != width * stride_w:
        raise ValueError(
            f"{name}: strides {tuple(t.stride())} for shape {tuple(t.shape)} do not let the pixels be "
            f"addressed as p * stride_w (need stride_h == W * stride_w: dense NCHW or channels_last)"
        )
    return stride_b, stride_c, stride_w
