"""Triton kernels of the fused additive coupling (:mod:`.additive_coupling`).

Per element of the active channels ``c >= passive`` with ``a = c - passive`` and
``shift = h[:, a]`` (oracles ``reference.additive_coupling_fwd`` / ``_inv`` / ``_bwd``); passive
channels are copied:

* ``flowkernels::additive_coupling_fwd_triton(x, h, passive) -> y``: ``y = x + shift``.
* ``flowkernels::additive_coupling_inv_triton(y, h, passive) -> x``: ``x = y - shift``.
* ``flowkernels::additive_coupling_bwd_triton(out, h, grad_out, passive, reverse) -> (inp,
  grad_inp, grad_h)``: backward with recompute from the output of the forward (``reverse=False``)
  or of the inverse, one pass: ``inp = out -+ shift``, ``grad_inp = grad_out``,
  ``grad_h = +-grad_out[:, passive:]`` in h's dtype.

The log-determinant is 0, so unlike the affine kernels there is no log-det reduction: one launch
per call. Tiles, grid and layouts are those of the affine kernels (:class:`._triton_utils.CouplingTiles`,
the strides of every tensor passed, so one kernel serves NCHW and channels_last, also when x and
h differ; see :mod:`._affine_coupling_kernels`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .._layout import require_pixel_strides
from ._common import check_coupling_args
from ._triton_utils import CouplingTiles, coupling_tile, launcher, poison, round_to
from .additive_coupling import additive_coupling_bwd_fake, additive_coupling_fwd_fake


@triton.jit
def _additive_coupling_apply_kernel(
    in_ptr,
    h_ptr,
    out_ptr,
    C,
    HW,
    passive,
    stride_inb,
    stride_inc,
    stride_inw,
    stride_hb,
    stride_hc,
    stride_hw,
    stride_outb,
    stride_outc,
    stride_outw,
    INVERSE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Forward (``INVERSE=False``) or inverse on one (BLOCK_C channels x BLOCK_P pixels) tile of
    sample b: reads the input tile and, for active channels, the matching rows of h; writes the
    output tile (passive channels copied). Grid ``(cdiv(HW, BLOCK_P), B, cdiv(C, BLOCK_C))``."""
    c, p, b64, tile_ok, active, act_ok, a = coupling_tile(C, HW, passive, BLOCK_C, BLOCK_P)
    v = tl.load(in_ptr + b64 * stride_inb + c[:, None] * stride_inc + p[None, :] * stride_inw, mask=tile_ok, other=0.0)
    shift = tl.load(
        h_ptr + b64 * stride_hb + a[:, None] * stride_hc + p[None, :] * stride_hw, mask=act_ok, other=0.0
    ).to(tl.float32)
    out = v - shift if INVERSE else v + shift  # masked-off (passive) lanes have shift = 0
    tl.store(out_ptr + b64 * stride_outb + c[:, None] * stride_outc + p[None, :] * stride_outw, out, mask=tile_ok)


@triton.jit
def _additive_coupling_bwd_kernel(
    out_ptr,
    h_ptr,
    grad_out_ptr,
    inp_ptr,
    grad_inp_ptr,
    grad_h_ptr,
    C,
    HW,
    passive,
    stride_outb,
    stride_outc,
    stride_outw,
    stride_hb,
    stride_hc,
    stride_hw,
    stride_goutb,
    stride_goutc,
    stride_goutw,
    stride_inpb,
    stride_inpc,
    stride_inpw,
    stride_ginpb,
    stride_ginpc,
    stride_ginpw,
    stride_ghb,
    stride_ghc,
    stride_ghw,
    REVERSE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Backward with recompute on one (BLOCK_C x BLOCK_P) tile of sample b, from the output.

    Grid as the forward. Reads out, grad_out (all channels of the tile) and the shifts of the
    active channels; writes inp (``out - shift``, or ``out + shift`` for an inverse's output;
    passive channels copied), ``grad_inp = grad_out`` and, for active channel a,
    ``grad_h[a] = grad_out`` (``-grad_out`` for an inverse's output) in h's dtype.
    """
    c, p, b64, tile_ok, active, act_ok, a = coupling_tile(C, HW, passive, BLOCK_C, BLOCK_P)
    out = tl.load(
        out_ptr + b64 * stride_outb + c[:, None] * stride_outc + p[None, :] * stride_outw, mask=tile_ok, other=0.0
    )
    g = tl.load(
        grad_out_ptr + b64 * stride_goutb + c[:, None] * stride_goutc + p[None, :] * stride_goutw,
        mask=tile_ok,
        other=0.0,
    )
    shift = tl.load(
        h_ptr + b64 * stride_hb + a[:, None] * stride_hc + p[None, :] * stride_hw, mask=act_ok, other=0.0
    ).to(tl.float32)
    if REVERSE:
        inp = out + shift
        g_shift = -g
    else:
        inp = out - shift
        g_shift = g
    tl.store(inp_ptr + b64 * stride_inpb + c[:, None] * stride_inpc + p[None, :] * stride_inpw, inp, mask=tile_ok)
    tl.store(grad_inp_ptr + b64 * stride_ginpb + c[:, None] * stride_ginpc + p[None, :] * stride_ginpw, g, mask=tile_ok)
    gh = grad_h_ptr + b64 * stride_ghb + a[:, None] * stride_ghc + p[None, :] * stride_ghw
    tl.store(gh, round_to(g_shift, grad_h_ptr.dtype.element_ty), mask=act_ok)


def _apply(inverse: bool, inp: Tensor, h: Tensor, passive: int) -> Tensor:
    """Launch the forward (``inverse=False``) or inverse kernel; the output allocated like ``inp``."""
    check_coupling_args(inp, h, passive, kernel_dtypes=True, per_channel=1)
    tiles = CouplingTiles.of(inp)
    out = torch.empty_like(inp)
    poison(out)
    launcher(_additive_coupling_apply_kernel)[tiles.grid](
        inp,
        h,
        out,
        tiles.channels,
        tiles.pixels,
        passive,
        *require_pixel_strides("x", inp),
        *require_pixel_strides("h", h),
        *require_pixel_strides("out", out),
        INVERSE=inverse,
        **tiles.meta,
    )
    return out


@triton_op("flowkernels::additive_coupling_fwd_triton", mutates_args={})
def _additive_coupling_fwd_triton(x: Tensor, h: Tensor, passive: int) -> Tensor:
    """Additive coupling on channels ``[passive:]``: ``y = x + shift``.

    x: (B, C, H, W) float32; h: (B, C - passive, H, W) float32 or bfloat16; each NCHW or
    channels_last (or a channel slice). y keeps x's layout.
    """
    return _apply(False, x, h, passive)


@triton_op("flowkernels::additive_coupling_inv_triton", mutates_args={})
def _additive_coupling_inv_triton(y: Tensor, h: Tensor, passive: int) -> Tensor:
    """Inverse additive coupling: ``x = y - shift``. Shapes and layouts as the forward."""
    return _apply(True, y, h, passive)


@triton_op("flowkernels::additive_coupling_bwd_triton", mutates_args={})
def _additive_coupling_bwd_triton(
    out: Tensor, h: Tensor, grad_out: Tensor, passive: int, reverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward with recompute from the output: ``(inp, grad_inp, grad_h)``.

    out, grad_out: (B, C, H, W) float32; h: the subnet output (float32 or bfloat16). inp and
    grad_inp keep out's layout, grad_h has h's dtype and layout.
    """
    check_coupling_args(out, h, passive, kernel_dtypes=True, per_channel=1)
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out: expected shape {tuple(out.shape)}, got {tuple(grad_out.shape)}")
    tiles = CouplingTiles.of(out)
    inp = torch.empty_like(out)
    grad_inp = torch.empty_like(out)
    grad_h = torch.empty_like(h)
    poison(inp, grad_inp, grad_h)
    launcher(_additive_coupling_bwd_kernel)[tiles.grid](
        out,
        h,
        grad_out,
        inp,
        grad_inp,
        grad_h,
        tiles.channels,
        tiles.pixels,
        passive,
        *require_pixel_strides("out", out),
        *require_pixel_strides("h", h),
        *require_pixel_strides("grad_out", grad_out),
        *require_pixel_strides("inp", inp),
        *require_pixel_strides("grad_inp", grad_inp),
        *require_pixel_strides("grad_h", grad_h),
        REVERSE=reverse,
        **tiles.meta,
    )
    return inp, grad_inp, grad_h


if not isinstance(_additive_coupling_apply_kernel, triton.runtime.JITFunction):
    # Under TRITON_INTERPRET=1 the launcher bodies cannot run on FakeTensors (the interpreter
    # copies tensor storage to the host): use the C++ ops' fakes, which give the same output
    # metadata (see _affine_coupling_kernels.py).
    _additive_coupling_fwd_triton.register_fake(additive_coupling_fwd_fake)
    _additive_coupling_inv_triton.register_fake(additive_coupling_fwd_fake)
    _additive_coupling_bwd_triton.register_fake(additive_coupling_bwd_fake)
