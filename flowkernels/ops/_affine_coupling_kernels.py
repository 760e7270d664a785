"""Triton kernels of the fused affine coupling / SRFlow affine injector (:mod:`.affine_coupling`).

Throughout, ``h`` is the subnet output (``h_ptr``); image rows are ``row`` and the height is H.
Per element of the active channels ``c >= passive`` with ``a = c - passive``,
``shift = h[:, 2a]``, ``raw = h[:, 2a + 1]`` and ``s = sigmoid(raw + 2) + eps`` (oracles
``reference.affine_coupling_fwd`` / ``_inv`` / ``_bwd``); passive channels are copied:

* ``flowkernels::affine_coupling_fwd_triton(x, h, logdet, passive, shift_first, eps) -> y``:
  ``y = (x + shift) * s`` or ``x * s + shift``; ``logdet[b] += sum log s`` in place.
* ``flowkernels::affine_coupling_inv_triton(y, h, logdet, passive, shift_first, eps) -> x``:
  ``x = y / s - shift`` or ``(y - shift) / s``; ``logdet[b] -= sum log s`` in place.
* ``flowkernels::affine_coupling_bwd_triton(out, h, grad_out, grad_logdet, passive, shift_first,
  eps, reverse) -> (inp, grad_inp, grad_h)``: backward with recompute from the output of the
  forward (``reverse=False``) or of the inverse, one pass (formulas in ``reference.affine_coupling_bwd``).

Log-det (DESIGN.md section 4): ``log s`` is never stored. Each program of the elementwise kernel
writes the fp32 sum of ``log s`` over its tile to its own slot of a (B, n_programs_per_sample)
partial buffer; a second tiny kernel sums each row in a fixed order and adds (subtracts) it into
``logdet[b]``. Deterministic (no atomics), Liger-Kernel style two-stage reduction, at the cost of
one extra launch of B programs.

Layouts: every kernel takes the batch, channel and pixel strides of x/out, h, and of each output,
so one kernel serves NCHW and channels_last, also when x and h differ. Inside a sample the pixel
``p = row * W + col`` is addressed as ``p * stride_w`` (exact when ``stride_h == W * stride_w``:
the layout rule of :mod:`flowkernels._layout`, which ``require_pixel_strides`` checks). Triton
specialises integer arguments equal to 1, so the unit stride of each layout is a compile-time
constant and the (channels x pixels) tiles are coalesced along it. In channels_last, shift and
raw of one channel are neighbours, so the two strided loads of h share cache lines and h is read
from DRAM once.
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
from .affine_coupling import affine_coupling_bwd_fake, affine_coupling_fwd_fake

# Pixel chunk of the log-det row reduction (one program per sample).
_REDUCE_BLOCK = 1024


@triton.jit
def _shift_and_scale(h_ptr, b64, a, p, mask, stride_hb, stride_hc, stride_hw, eps):
    """Load ``shift = h[b, 2a, p]``, ``raw = h[b, 2a + 1, p]`` (fp32 or bf16, computed in fp32).

    Returns ``(shift, s, sig)`` with ``sig = sigmoid(raw + 2)`` and ``s = sig + eps``."""
    base = h_ptr + b64 * stride_hb + p[None, :] * stride_hw
    shift = tl.load(base + (2 * a)[:, None] * stride_hc, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(base + (2 * a + 1)[:, None] * stride_hc, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(raw + 2.0)
    return shift, sig + eps, sig


@triton.jit
def _affine_coupling_apply_kernel(
    in_ptr,
    h_ptr,
    out_ptr,
    logs_part_ptr,
    C,
    HW,
    passive,
    eps,
    stride_inb,
    stride_inc,
    stride_inw,
    stride_hb,
    stride_hc,
    stride_hw,
    stride_outb,
    stride_outc,
    stride_outw,
    SHIFT_FIRST: tl.constexpr,
    INVERSE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Forward (``INVERSE=False``) or inverse on one (BLOCK_C channels x BLOCK_P pixels) tile of
    sample b: the kernel of both ``affine_coupling_fwd_triton`` and ``affine_coupling_inv_triton``.

    Grid ``(cdiv(HW, BLOCK_P), B, cdiv(C, BLOCK_C))``. Reads the input tile and, for active
    channels only, the matching shift/raw rows of h; writes the output tile (passive channels
    copied) and the tile's fp32 ``sum log s`` to ``logs_part[b, pid_p * n_cblocks + pid_c]`` (for
    the inverse too: the reduction subtracts it).
    """
    c, p, b64, tile_ok, active, act_ok, a = coupling_tile(C, HW, passive, BLOCK_C, BLOCK_P)
    n_cblocks = tl.num_programs(2)
    v = tl.load(in_ptr + b64 * stride_inb + c[:, None] * stride_inc + p[None, :] * stride_inw, mask=tile_ok, other=0.0)
    shift, s, _ = _shift_and_scale(h_ptr, b64, a, p, act_ok, stride_hb, stride_hc, stride_hw, eps)
    if INVERSE:
        # Divides by s >= eps (1e-4 in SRFlow): errors in the input grow by up to 1/eps.
        out = v / s - shift if SHIFT_FIRST else (v - shift) / s
    else:
        out = (v + shift) * s if SHIFT_FIRST else v * s + shift
    out = tl.where(active[:, None], out, v)
    tl.store(out_ptr + b64 * stride_outb + c[:, None] * stride_outc + p[None, :] * stride_outw, out, mask=tile_ok)
    logs = tl.where(act_ok, tl.log(s), 0.0)
    slot = b64 * tl.num_programs(0) * n_cblocks + tl.program_id(0) * n_cblocks + tl.program_id(2)
    tl.store(logs_part_ptr + slot, tl.sum(tl.sum(logs, axis=1), axis=0))


@triton.jit
def _logdet_reduce_kernel(
    logs_part_ptr, logdet_ptr, n_part, stride_logdet, SUBTRACT: tl.constexpr, BLOCK: tl.constexpr
):
    """Second stage of the log-det reduction: program b sums row b of the (B, n_part) fp32
    partials in a fixed order (BLOCK-wide chunks, then a tree sum) and adds the total to
    ``logdet[b]`` in place, or subtracts it when ``SUBTRACT``."""
    b = tl.program_id(0)
    row = logs_part_ptr + b.to(tl.int64) * n_part
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, n_part, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        acc += tl.load(row + k, mask=k < n_part, other=0.0)
    total = tl.sum(acc, axis=0)
    if SUBTRACT:
        total = -total
    ld_ptr = logdet_ptr + b * stride_logdet
    tl.store(ld_ptr, tl.load(ld_ptr) + total)


@triton.jit
def _affine_coupling_bwd_kernel(
    out_ptr,
    h_ptr,
    grad_out_ptr,
    grad_logdet_ptr,
    inp_ptr,
    grad_inp_ptr,
    grad_h_ptr,
    C,
    HW,
    passive,
    eps,
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
    stride_grad_logdet,
    SHIFT_FIRST: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Backward with recompute on one (BLOCK_C x BLOCK_P) tile of sample b, from the output.

    Grid as the forward. Reads out, grad_out (all channels of the tile), shift/raw of the active
    channels and ``grad_logdet[b]``; writes inp and grad_inp (passive channels: ``inp = out``,
    ``grad_inp = grad_out``) and, for active channel a, ``grad_h[2a] = g_shift`` and
    ``grad_h[2a + 1] = g_raw`` in h's dtype (fp32 maths, one rounding at the store). With
    ``g = grad_out``, ``gl = grad_logdet[b]``, ``sig = sigmoid(raw + 2)``, ``s = sig + eps``:

    * forward output (``REVERSE=False``), shift first: ``inp = out/s - t``, ``g_inp = g s``,
      ``g_t = g s``, ``g_s = (g out + gl)/s``; scale first: ``inp = (out - t)/s``,
      ``g_inp = g s``, ``g_t = g``, ``g_s = g inp + gl/s``.
    * inverse output (``REVERSE=True``), shift first: ``inp = (out + t) s``, ``g_inp = g/s``,
      ``g_t = -g``, ``g_s = -(g (out + t) + gl)/s``; scale first: ``inp = out s + t``,
      ``g_inp = g/s``, ``g_t = -g/s``, ``g_s = -(g out + gl)/s``.
    * ``g_raw = g_s sig (1 - sig)``.
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
    gl = tl.load(grad_logdet_ptr + b64 * stride_grad_logdet)
    shift, s, sig = _shift_and_scale(h_ptr, b64, a, p, act_ok, stride_hb, stride_hc, stride_hw, eps)
    # Masked-off (passive, padded) lanes have s = sigmoid(2) + eps > 0: no division by zero.
    # Divisions are by s >= eps (1e-4 in SRFlow): errors grow by up to 1/eps.
    if not REVERSE:
        if SHIFT_FIRST:
            inp = out / s - shift
            g_shift = g * s
            g_s = (g * out + gl) / s
        else:
            inp = (out - shift) / s
            g_shift = g
            g_s = g * inp + gl / s
        g_inp = g * s
    else:
        if SHIFT_FIRST:
            inp = (out + shift) * s
            g_shift = -g
            g_s = -(g * (out + shift) + gl) / s
        else:
            inp = out * s + shift
            g_shift = -g / s
            g_s = -(g * out + gl) / s
        g_inp = g / s
    g_raw = g_s * sig * (1.0 - sig)
    inp = tl.where(active[:, None], inp, out)
    g_inp = tl.where(active[:, None], g_inp, g)
    tl.store(inp_ptr + b64 * stride_inpb + c[:, None] * stride_inpc + p[None, :] * stride_inpw, inp, mask=tile_ok)
    tl.store(
        grad_inp_ptr + b64 * stride_ginpb + c[:, None] * stride_ginpc + p[None, :] * stride_ginpw, g_inp, mask=tile_ok
    )
    gh = grad_h_ptr + b64 * stride_ghb + p[None, :] * stride_ghw
    gh_type = grad_h_ptr.dtype.element_ty
    tl.store(gh + (2 * a)[:, None] * stride_ghc, round_to(g_shift, gh_type), mask=act_ok)
    tl.store(gh + (2 * a + 1)[:, None] * stride_ghc, round_to(g_raw, gh_type), mask=act_ok)


def _apply(
    inverse: bool, inp: Tensor, h: Tensor, logdet: Tensor, passive: int, shift_first: bool, eps: float
) -> Tensor:
    """Launch the forward (``inverse=False``) or inverse kernel and the log-det reduction: two
    launches, the output allocated like ``inp``."""
    check_coupling_args(inp, h, passive, kernel_dtypes=True)
    batch = inp.shape[0]
    tiles = CouplingTiles.of(inp)
    grid = tiles.grid
    out = torch.empty_like(inp)
    logs_part = inp.new_empty((batch, grid[0] * grid[2]), dtype=torch.float32)
    poison(out, logs_part)
    launcher(_affine_coupling_apply_kernel)[grid](
        inp,
        h,
        out,
        logs_part,
        tiles.channels,
        tiles.pixels,
        passive,
        eps,
        *require_pixel_strides("x", inp),
        *require_pixel_strides("h", h),
        *require_pixel_strides("out", out),
        SHIFT_FIRST=shift_first,
        INVERSE=inverse,
        **tiles.meta,
    )
    launcher(_logdet_reduce_kernel)[(batch,)](
        logs_part,
        logdet,
        grid[0] * grid[2],
        logdet.stride(0),
        SUBTRACT=inverse,
        BLOCK=_REDUCE_BLOCK,
        num_warps=tiles.num_warps,
    )
    return out


@triton_op("flowkernels::affine_coupling_fwd_triton", mutates_args={"logdet"})
def _affine_coupling_fwd_triton(
    x: Tensor, h: Tensor, logdet: Tensor, passive: int, shift_first: bool, eps: float
) -> Tensor:
    """Coupling on channels ``[passive:]``: ``y = (x + shift) * s`` (or ``x * s + shift``).

    x: (B, C, H, W) float32; h: (B, 2*(C - passive), H, W) float32 or bfloat16; each NCHW or
    channels_last (or a channel slice). logdet (B,) float32 gets ``+= sum log s`` in place. y keeps x's layout.
    """
    return _apply(False, x, h, logdet, passive, shift_first, eps)


@triton_op("flowkernels::affine_coupling_inv_triton", mutates_args={"logdet"})
def _affine_coupling_inv_triton(
    y: Tensor, h: Tensor, logdet: Tensor, passive: int, shift_first: bool, eps: float
) -> Tensor:
    """Inverse coupling: ``x = y / s - shift`` (or ``(y - shift) / s``), ``logdet -= sum log s``.

    Shapes and layouts as the forward; x keeps y's layout.
    """
    return _apply(True, y, h, logdet, passive, shift_first, eps)


@triton_op("flowkernels::affine_coupling_bwd_triton", mutates_args={})
def _affine_coupling_bwd_triton(
    out: Tensor,
    h: Tensor,
    grad_out: Tensor,
    grad_logdet: Tensor,
    passive: int,
    shift_first: bool,
    eps: float,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward with recompute from the output: ``(inp, grad_inp, grad_h)``.

    out, grad_out: (B, C, H, W) float32; h: the subnet output (float32 or bfloat16); grad_logdet:
    (B,) float32. inp and grad_inp keep out's layout, grad_h has h's dtype and layout.
    """
    check_coupling_args(out, h, passive, kernel_dtypes=True)
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out: expected shape {tuple(out.shape)}, got {tuple(grad_out.shape)}")
    if tuple(grad_logdet.shape) != (out.shape[0],) or grad_logdet.dtype != torch.float32:
        raise ValueError(
            f"grad_logdet: expected a float32 tensor of shape ({out.shape[0]},), "
            f"got {grad_logdet.dtype} {tuple(grad_logdet.shape)}"
        )
    tiles = CouplingTiles.of(out)
    inp = torch.empty_like(out)
    grad_inp = torch.empty_like(out)
    grad_h = torch.empty_like(h)
    poison(inp, grad_inp, grad_h)
    launcher(_affine_coupling_bwd_kernel)[tiles.grid](
        out,
        h,
        grad_out,
        grad_logdet,
        inp,
        grad_inp,
        grad_h,
        tiles.channels,
        tiles.pixels,
        passive,
        eps,
        *require_pixel_strides("out", out),
        *require_pixel_strides("h", h),
        *require_pixel_strides("grad_out", grad_out),
        *require_pixel_strides("inp", inp),
        *require_pixel_strides("grad_inp", grad_inp),
        *require_pixel_strides("grad_h", grad_h),
        grad_logdet.stride(0),
        SHIFT_FIRST=shift_first,
        REVERSE=reverse,
        **tiles.meta,
    )
    return inp, grad_inp, grad_h


if not isinstance(_affine_coupling_apply_kernel, triton.runtime.JITFunction):
    # Under TRITON_INTERPRET=1 the launcher bodies cannot run on FakeTensors (the interpreter
    # copies tensor storage to the host), so the fake that triton_op derives from them is
    # replaced by the C++ ops' fakes, which give the same output metadata. Compiled Triton
    # keeps the derived fake (what torch.compile traces on GPU).
    _affine_coupling_fwd_triton.register_fake(affine_coupling_fwd_fake)
    _affine_coupling_inv_triton.register_fake(affine_coupling_fwd_fake)
    _affine_coupling_bwd_triton.register_fake(affine_coupling_bwd_fake)
