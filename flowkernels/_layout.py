"""The one layout rule of the kernels: H and W collapse into one pixel axis.

Every kernel (Triton, C++ and CUDA) addresses pixel ``p = row * W + col`` of a (B, C, H, W)
tensor as ``p * stride_p`` inside a sample, so it takes any tensor whose ``stride_h == W *
stride_w``: dense NCHW (``stride_p = 1``), dense channels_last (``stride_p = C``), channel slices
of either (``x[:, :4]``) and expanded (stride 0) tensors such as the gradient of a sum. The C++
twin of :func:`pixel_strides` is ``pixel_strides`` in ``csrc/flow_checks.h``. The dispatch refuses
other layouts with :func:`layout_reason`; the Triton launchers raise it
(:func:`require_pixel_strides`); the ``*_bwd`` wrappers make upstream gradients dense instead.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["pixel_strides", "layout_reason", "require_pixel_strides"]


def pixel_strides(t: Tensor) -> tuple[int, int, int] | None:
    """``(stride_b, stride_c, stride_p)`` of a (B, C, H, W) tensor whose H and W collapse into one
    pixel axis, or None if they do not (or ``t`` is not 4-D). With W == 1 the pixel stride is stride_h."""
    if t.dim() != 4:
        return None
    _, _, height, width = t.shape
    stride_b, stride_c, stride_h, stride_w = t.stride()
    if width == 1:
        return stride_b, stride_c, stride_h
    if height > 1 and stride_h != width * stride_w:
        return None
    return stride_b, stride_c, stride_w


def layout_reason(name: str, t: Tensor) -> str | None:
    """Why the kernels cannot address the pixels of ``t`` (argument ``name``); None if they can."""
    if pixel_strides(t) is not None:
        return None
    if t.dim() != 4:
        return f"{name}: expected a 4-D (B, C, H, W) tensor, got shape {tuple(t.shape)}"
    return (
        f"{name}: strides {tuple(t.stride())} for shape {tuple(t.shape)} do not let the pixels be addressed "
        "as p * stride_w (the kernels need stride_h == W * stride_w: NCHW, channels_last or a channel slice)"
    )


def require_pixel_strides(name: str, t: Tensor) -> tuple[int, int, int]:
    """:func:`pixel_strides` of ``t``, raising ValueError with :func:`layout_reason` if it has none."""
    strides = pixel_strides(t)
    if strides is None:
        raise ValueError(layout_reason(name, t))
    return strides
