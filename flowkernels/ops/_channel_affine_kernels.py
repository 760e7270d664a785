"""Triton kernels of the per-pixel affine channel map, the op under the fused ActNorm + 1x1 conv
(:mod:`flowkernels.ops.actnorm_conv`).

Both directions of the layer are ``out = matrix @ inp + offset`` with folded parameters
(``actnorm_conv.fold``); oracles ``reference.channel_affine`` and ``reference.channel_affine_bwd``.
Registered ops (schemas in ``actnorm_conv``'s docstring):

* ``flowkernels::channel_affine_fwd_triton(x, matrix, offset, logdet_term, logdet) -> y``:
  ``y[b, :, p] = matrix @ x[b, :, p] + offset``, ``logdet[b] += logdet_term`` in place.
* ``flowkernels::channel_affine_bwd_triton(out, grad_out, matrix, matrix_inv, inv_offset)
  -> (inp, grad_inp, grad_matrix, grad_offset)``: one pass over the pixels rebuilding
  ``inp = matrix_inv @ out + inv_offset``, ``grad_inp = matrix^T @ grad_out`` and the fp32
  reductions ``grad_matrix = sum_{b,p} grad_out inp^T``, ``grad_offset = sum_{b,p} grad_out``.

Layouts: every kernel takes the batch, channel and pixel strides of every tensor, so one kernel
serves NCHW and channels_last (and a mix of them between arguments). Inside a sample the pixel
``p = row * W + col`` is addressed as ``p * stride_w``, exact whenever ``stride_h == W * stride_w``
(the layout rule of :mod:`flowkernels._layout`; ``require_pixel_strides`` checks it). Triton
specialises integer arguments equal to 1, so the unit stride (pixels in NCHW, channels in
channels_last) is a compile-time constant and the compiler makes that tile axis the fastest one:
loads and stores are coalesced along the memory order of each layout.

The C x C products go through ``tl.dot(..., input_precision="ieee")`` (exact fp32 FMA, no TF32)
over channel blocks of 16 to 64 (``tl.dot`` needs every block dim >= 16; padded channels are
masked to zero), with a K loop over input-channel blocks, so any C works (tested 3 to 192). The
backward's pixel reduction ``grad_out inp^T`` uses "tf32x3" instead (see _GRAD_MATRIX_PRECISION).

Measured on an H200 (torch 2.11, triton 3.6; benchmarks/results/nvidia-h200-2026-11-26-dev), B16
C12 80x80, CUDA-graph replay: forward 6.3 us NCHW / 12.6 us channels_last (a same-size copy:
4.4 us); backward 36 us NCHW / 52 us channels_last with L2 warm (61 / 88 us with IEEE for
grad_matrix). The backward is not yet at the bandwidth target: its grad_matrix dot and the layout
conversions around it dominate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .._layout import require_pixel_strides
from ._triton_utils import launcher, poison, pow2_block
from .actnorm_conv import channel_affine_bwd_fake, channel_affine_fwd_fake

# Channel blocks: powers of two in [16, 64]. 16 is tl.dot's minimum; 64 caps the fp32 tiles
# (a 64 x 64 partial grad_matrix plus two 64 x BLOCK_P operands) at what 8 warps hold in
# registers without spilling. C <= 64 (every SRFlow level except the top one) fits one block, so
# each input element is read from memory exactly once; larger C tiles the output channels over
# the grid and re-reads the input once per block (L2 hits).
_MIN_BLOCK_C = 16
_MAX_BLOCK_C = 64
# Elements per fp32 tile of the forward (channels x pixels): 4096 -> BLOCK_P = 256 pixels at
# C <= 16 (SRFlow level 1, C = 12): 16 KiB read and 12 KiB written per program, 32 fp32 values
# of x per thread at 4 warps, and 400 programs at B16 C12 80x80 (3 per SM on 132 SMs, one wave).
# H200 at that shape (NCHW / channels_last): 4096: 6.3 / 12.6 us, 2048: 5.7 / 15.7 us,
# 8192: 6.2 / 12.8 us; 4096 is the best compromise over both layouts.
_FWD_TILE = 4096
# The backward holds four such tiles (out, grad_out, inp, grad_inp) plus the partial
# grad_matrix, so it uses half the pixels per tile.
_BWD_TILE = 2048
# The backward writes one fp32 (C, C) partial of grad_matrix per program (Liger-style
# deterministic two-stage reduction, no atomics). Programs loop over pixel tiles (grid-stride),
# and their number is capped so that the partials stay small next to the tensors themselves:
# at most 1024 programs (enough to fill 132 SMs several times over) and 2**20 partial elements
# (4 MiB). The cap is a constant, not the device's SM count, so the summation order and thus the
# result do not depend on the GPU.
_BWD_MAX_PROGRAMS = 1024
_BWD_PARTIAL_BUDGET = 1 << 20
# grad_matrix = sum_p grad_out inp^T is a dot whose K dimension is the BLOCK_P pixels of a tile.
# IEEE fp32 dots run on FMA units with each thread holding K-long operand slices, which spills
# at K = 128 (H200, level-1 backward at B16: 61 us, 10x the forward). "tf32x3" (three TF32
# tensor-core products of the split operands) keeps ~fp32 accuracy: per-product error ~2^-21,
# the 1e-5 tests pass on the H200 (C = 3 to 192); 36 us. The interpreter computes it in fp32.
_GRAD_MATRIX_PRECISION = "tf32x3"


@triton.jit
def _channel_affine_fwd_kernel(
    x_ptr,
    matrix_ptr,
    offset_ptr,
    logdet_term_ptr,
    logdet_ptr,
    y_ptr,
    C,
    HW,
    stride_xb,
    stride_xc,
    stride_xw,
    stride_yb,
    stride_yc,
    stride_yw,
    stride_matrix_i,
    stride_matrix_j,
    stride_offset,
    stride_logdet,
    BLOCK_CO: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """``y[b, co, p] = sum_ci matrix[co, ci] x[b, ci, p] + offset[co]``; ``logdet[b] += term``.

    Grid ``(cdiv(HW, BLOCK_P), B, cdiv(C, BLOCK_CO))``: program ``(pid_p, b, pid_c)`` computes the
    output tile of channels ``[pid_c * BLOCK_CO, +BLOCK_CO)`` x pixels ``[pid_p * BLOCK_P, +BLOCK_P)``
    of sample b. It reads the matching x tile in input-channel blocks of BLOCK_CI (the K loop)
    and the (BLOCK_CO, BLOCK_CI) blocks of ``matrix``, accumulates in an fp32 register tile with
    ``tl.dot`` in IEEE fp32, adds ``offset`` and writes y once. The program ``(0, b, 0)`` also
    adds the 0-dim ``logdet_term`` to ``logdet[b]`` in place (one writer per sample, no atomics).
    """
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    pid_c = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    co = pid_c * BLOCK_CO + tl.arange(0, BLOCK_CO)
    p_ok = p < HW
    co_ok = co < C
    x_base = x_ptr + b.to(tl.int64) * stride_xb
    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_CI):
        ci = k0 + tl.arange(0, BLOCK_CI)
        ci_ok = ci < C
        # Padded rows/columns load as 0, so they add nothing to the product.
        m = tl.load(
            matrix_ptr + co[:, None] * stride_matrix_i + ci[None, :] * stride_matrix_j,
            mask=co_ok[:, None] & ci_ok[None, :],
            other=0.0,
        )
        x = tl.load(
            x_base + ci[:, None] * stride_xc + p[None, :] * stride_xw,
            mask=ci_ok[:, None] & p_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(m, x, acc, input_precision="ieee")
    offset = tl.load(offset_ptr + co * stride_offset, mask=co_ok, other=0.0)
    y = acc + offset[:, None]
    y_base = y_ptr + b.to(tl.int64) * stride_yb
    tl.store(y_base + co[:, None] * stride_yc + p[None, :] * stride_yw, y, mask=co_ok[:, None] & p_ok[None, :])
    if (pid_p == 0) & (pid_c == 0):
        ld_ptr = logdet_ptr + b * stride_logdet
        tl.store(ld_ptr, tl.load(ld_ptr) + tl.load(logdet_term_ptr))


@triton.jit
def _channel_affine_bwd_kernel(
    out_ptr,
    grad_out_ptr,
    matrix_ptr,
    matrix_inv_ptr,
    inv_offset_ptr,
    inp_ptr,
    grad_inp_ptr,
    grad_matrix_part_ptr,
    grad_offset_part_ptr,
    C,
    HW,
    n_pblocks,
    n_tiles,
    stride_outb,
    stride_outc,
    stride_outw,
    stride_goutb,
    stride_goutc,
    stride_goutw,
    stride_inpb,
    stride_inpc,
    stride_inpw,
    stride_ginpb,
    stride_ginpc,
    stride_ginpw,
    stride_matrix_i,
    stride_matrix_j,
    stride_inv_i,
    stride_inv_j,
    stride_inv_offset,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    GM_PRECISION: tl.constexpr,
):
    """Backward with recompute of ``out = matrix @ inp + offset`` from its output, one pass.

    Per pixel: ``inp = matrix_inv @ out + inv_offset``, ``grad_inp = matrix^T @ grad_out``; over
    the pixels this program visits: ``grad_matrix += grad_out inp^T``, ``grad_offset += grad_out``.

    Grid ``(n_prog, NB, NB)`` with ``NB = cdiv(C, BLOCK_C)``. Program ``(q, ib, jb)`` visits the
    pixel tiles ``t = q, q + n_prog, ...`` (tile t: sample ``t // n_pblocks``, BLOCK_P pixels) and
    owns the channel blocks i (rows of grad_matrix, grad_offset) and j (inp, grad_inp, columns of
    grad_matrix). Per tile it rebuilds ``inp[j]`` (K loop over all channels of ``out``), reads
    ``grad_out[i]``, and accumulates ``grad_out[i] inp[j]^T`` and ``sum_p grad_out[i]`` in fp32
    registers; programs with ``ib == 0`` also write ``inp[j]`` and ``grad_inp[j]`` (K loop over
    ``grad_out``). At the end it writes its fp32 partials ``grad_matrix_part[q, i, j]`` and, with
    ``jb == 0``, ``grad_offset_part[q, i]``; the launcher sums them over q (deterministic).

    ``ONE_BLOCK`` (C <= BLOCK_C, so NB = 1): the same maths with each element of ``out`` and
    ``grad_out`` loaded once per tile and both matrices loaded once per program.
    """
    q = tl.program_id(0)
    n_prog = tl.num_programs(0)
    ib = tl.program_id(1)
    jb = tl.program_id(2)
    ar_c = tl.arange(0, BLOCK_C)
    ar_p = tl.arange(0, BLOCK_P)
    ci = ib * BLOCK_C + ar_c
    cj = jb * BLOCK_C + ar_c
    ci_ok = ci < C
    cj_ok = cj < C
    grad_matrix = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    grad_offset = tl.zeros((BLOCK_C,), dtype=tl.float32)
    inv_offset = tl.load(inv_offset_ptr + cj * stride_inv_offset, mask=cj_ok, other=0.0)
    if ONE_BLOCK:
        # NB = 1: ci == cj, all channels in one block.
        c = ar_c
        c_ok = ci_ok
        both_ok = c_ok[:, None] & c_ok[None, :]
        m_inv = tl.load(matrix_inv_ptr + c[:, None] * stride_inv_i + c[None, :] * stride_inv_j, mask=both_ok, other=0.0)
        # matrix^T as a (j, k) tile: element [j, k] = matrix[k, j].
        m_t = tl.load(matrix_ptr + c[None, :] * stride_matrix_i + c[:, None] * stride_matrix_j, mask=both_ok, other=0.0)
        for t in range(q, n_tiles, n_prog):
            b = t // n_pblocks
            p = (t - b * n_pblocks) * BLOCK_P + ar_p
            b64 = b.to(tl.int64)
            tile_ok = c_ok[:, None] & (p < HW)[None, :]
            out = tl.load(
                out_ptr + b64 * stride_outb + c[:, None] * stride_outc + p[None, :] * stride_outw,
                mask=tile_ok,
                other=0.0,
            )
            g = tl.load(
                grad_out_ptr + b64 * stride_goutb + c[:, None] * stride_goutc + p[None, :] * stride_goutw,
                mask=tile_ok,
                other=0.0,
            )
            inp = tl.dot(m_inv, out, input_precision="ieee") + inv_offset[:, None]
            grad_inp = tl.dot(m_t, g, input_precision="ieee")
            tl.store(inp_ptr + b64 * stride_inpb + c[:, None] * stride_inpc + p[None, :] * stride_inpw, inp, tile_ok)
            tl.store(
                grad_inp_ptr + b64 * stride_ginpb + c[:, None] * stride_ginpc + p[None, :] * stride_ginpw,
                grad_inp,
                tile_ok,
            )
            # Padded pixels hold inp = inv_offset but g = 0 there, so they add nothing.
            grad_matrix = tl.dot(g, tl.trans(inp), grad_matrix, input_precision=GM_PRECISION)
            grad_offset += tl.sum(g, axis=1)
    else:
        for t in range(q, n_tiles, n_prog):
            b = t // n_pblocks
            p = (t - b * n_pblocks) * BLOCK_P + ar_p
            p_ok = p < HW
            b64 = b.to(tl.int64)
            inp = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
            for k0 in range(0, C, BLOCK_C):
                ck = k0 + ar_c
                ck_ok = ck < C
                m_inv = tl.load(
                    matrix_inv_ptr + cj[:, None] * stride_inv_i + ck[None, :] * stride_inv_j,
                    mask=cj_ok[:, None] & ck_ok[None, :],
                    other=0.0,
                )
                out = tl.load(
                    out_ptr + b64 * stride_outb + ck[:, None] * stride_outc + p[None, :] * stride_outw,
                    mask=ck_ok[:, None] & p_ok[None, :],
                    other=0.0,
                )
                inp = tl.dot(m_inv, out, inp, input_precision="ieee")
            inp += inv_offset[:, None]
            g_i = tl.load(
                grad_out_ptr + b64 * stride_goutb + ci[:, None] * stride_goutc + p[None, :] * stride_goutw,
                mask=ci_ok[:, None] & p_ok[None, :],
                other=0.0,
            )
            grad_matrix = tl.dot(g_i, tl.trans(inp), grad_matrix, input_precision=GM_PRECISION)
            grad_offset += tl.sum(g_i, axis=1)
            if ib == 0:
                j_ok = cj_ok[:, None] & p_ok[None, :]
                tl.store(inp_ptr + b64 * stride_inpb + cj[:, None] * stride_inpc + p[None, :] * stride_inpw, inp, j_ok)
                grad_inp = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
                for k0 in range(0, C, BLOCK_C):
                    ck = k0 + ar_c
                    ck_ok = ck < C
                    m_t = tl.load(
                        matrix_ptr + ck[None, :] * stride_matrix_i + cj[:, None] * stride_matrix_j,
                        mask=cj_ok[:, None] & ck_ok[None, :],
                        other=0.0,
                    )
                    g_k = tl.load(
                        grad_out_ptr + b64 * stride_goutb + ck[:, None] * stride_goutc + p[None, :] * stride_goutw,
                        mask=ck_ok[:, None] & p_ok[None, :],
                        other=0.0,
                    )
                    grad_inp = tl.dot(m_t, g_k, grad_inp, input_precision="ieee")
                tl.store(
                    grad_inp_ptr + b64 * stride_ginpb + cj[:, None] * stride_ginpc + p[None, :] * stride_ginpw,
                    grad_inp,
                    j_ok,
                )
    part = grad_matrix_part_ptr + q.to(tl.int64) * C * C
    tl.store(part + ci[:, None] * C + cj[None, :], grad_matrix, mask=ci_ok[:, None] & cj_ok[None, :])
    if jb == 0:
        tl.store(grad_offset_part_ptr + q.to(tl.int64) * C + ci, grad_offset, mask=ci_ok)


def _check_channel_affine(x: Tensor, matrix: Tensor, vector: Tensor, names: tuple[str, str]) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D (B, C, H, W) flow tensor, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if tuple(matrix.shape) != (c, c):
        raise ValueError(f"{names[0]}: expected shape ({c}, {c}) to match {c} channels, got {tuple(matrix.shape)}")
    if tuple(vector.shape) != (c,):
        raise ValueError(f"{names[1]}: expected shape ({c},) to match {c} channels, got {tuple(vector.shape)}")
    for name, t in ((names[0], matrix), (names[1], vector)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: expected torch.float32, got {t.dtype}")


@triton_op("flowkernels::channel_affine_fwd_triton", mutates_args={"logdet"})
def _channel_affine_fwd_triton(
    x: Tensor, matrix: Tensor, offset: Tensor, logdet_term: Tensor, logdet: Tensor
) -> Tensor:
    """``y = matrix @ x + offset`` per pixel, ``logdet += logdet_term``; one kernel launch.

    x: (B, C, H, W) float32, NCHW or channels_last (or a channel slice); matrix (C, C), offset (C,) float32;
    logdet_term: 0-dim float32; logdet: (B,) float32, updated in place. y keeps x's layout.
    """
    _check_channel_affine(x, matrix, offset, ("matrix", "offset"))
    batch, c, height, width = x.shape
    hw = height * width
    y = torch.empty_like(x)
    poison(y)
    block_c = pow2_block(c, _MIN_BLOCK_C, _MAX_BLOCK_C)
    block_p = _FWD_TILE // block_c
    grid = (triton.cdiv(hw, block_p), batch, triton.cdiv(c, block_c))
    launcher(_channel_affine_fwd_kernel)[grid](
        x,
        matrix,
        offset,
        logdet_term,
        logdet,
        y,
        c,
        hw,
        *require_pixel_strides("x", x),
        *require_pixel_strides("y", y),
        matrix.stride(0),
        matrix.stride(1),
        offset.stride(0),
        logdet.stride(0),
        BLOCK_CO=block_c,
        BLOCK_CI=block_c,
        BLOCK_P=block_p,
        num_warps=4 if block_c <= 32 else 8,
    )
    return y


@triton_op("flowkernels::channel_affine_bwd_triton", mutates_args={})
def _channel_affine_bwd_triton(
    out: Tensor, grad_out: Tensor, matrix: Tensor, matrix_inv: Tensor, inv_offset: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward with recompute from the output: ``(inp, grad_inp, grad_matrix, grad_offset)``.

    out, grad_out: (B, C, H, W) float32, NCHW or channels_last (independently); matrix,
    matrix_inv (C, C) and inv_offset (C,) float32. inp and grad_inp keep out's layout;
    grad_matrix (C, C) and grad_offset (C,) are float32 sums of per-program partials.
    """
    _check_channel_affine(out, matrix, inv_offset, ("matrix", "inv_offset"))
    _check_channel_affine(out, matrix_inv, inv_offset, ("matrix_inv", "inv_offset"))
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out: expected shape {tuple(out.shape)}, got {tuple(grad_out.shape)}")
    batch, c, height, width = out.shape
    hw = height * width
    block_c = pow2_block(c, _MIN_BLOCK_C, _MAX_BLOCK_C)
    block_p = _BWD_TILE // block_c
    n_pblocks = triton.cdiv(hw, block_p)
    n_tiles = batch * n_pblocks
    n_prog = max(1, min(n_tiles, _BWD_MAX_PROGRAMS, _BWD_PARTIAL_BUDGET // (c * c)))
    n_cblocks = triton.cdiv(c, block_c)
    inp = torch.empty_like(out)
    grad_inp = torch.empty_like(out)
    grad_matrix_part = out.new_empty((n_prog, c, c), dtype=torch.float32)
    grad_offset_part = out.new_empty((n_prog, c), dtype=torch.float32)
    poison(inp, grad_inp, grad_matrix_part, grad_offset_part)
    launcher(_channel_affine_bwd_kernel)[(n_prog, n_cblocks, n_cblocks)](
        out,
        grad_out,
        matrix,
        matrix_inv,
        inv_offset,
        inp,
        grad_inp,
        grad_matrix_part,
        grad_offset_part,
        c,
        hw,
        n_pblocks,
        n_tiles,
        *require_pixel_strides("out", out),
        *require_pixel_strides("grad_out", grad_out),
        *require_pixel_strides("inp", inp),
        *require_pixel_strides("grad_inp", grad_inp),
        matrix.stride(0),
        matrix.stride(1),
        matrix_inv.stride(0),
        matrix_inv.stride(1),
        inv_offset.stride(0),
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        ONE_BLOCK=bool(n_cblocks == 1),
        GM_PRECISION=_GRAD_MATRIX_PRECISION,
        num_warps=4 if block_c <= 32 else 8,
    )
    # Second stage of the deterministic reduction: a fixed-order fp32 sum over the programs.
    return inp, grad_inp, grad_matrix_part.sum(dim=0), grad_offset_part.sum(dim=0)


if not isinstance(_channel_affine_fwd_kernel, triton.runtime.JITFunction):
    # Under TRITON_INTERPRET=1 the launcher bodies cannot run on FakeTensors (the interpreter
    # copies tensor storage to the host), so the fake that triton_op derives from them is
    # replaced by the C++ ops' fakes, which give the same output metadata. Compiled Triton
    # keeps the derived fake (what torch.compile traces on GPU).
    _channel_affine_fwd_triton.register_fake(channel_affine_fwd_fake)
    _channel_affine_bwd_triton.register_fake(channel_affine_bwd_fake)
