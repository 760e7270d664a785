"""Fused ActNorm + invertible 1x1 convolution: per pixel ``y = W diag(exp(logs)) (x + bias)``.

Oracle: ``reference.actnorm_conv_fwd`` / ``reference.actnorm_conv_inv``.

The layer-level wrappers :func:`actnorm_conv_fwd` / ``_inv`` / ``_bwd`` (taking weight, logs,
bias) are "fold + channel_affine": both directions are the same per-pixel affine channel map
``out = matrix @ inp + offset`` with folded parameters (:func:`fold`), so every backend
implements one registered op pair, named after its oracle ``reference.channel_affine[_bwd]``:

* ``channel_affine_fwd(x, matrix, offset, logdet_term, logdet)``: ``y = matrix @ x + offset`` per
  pixel, ``logdet[b] += logdet_term`` in place (``logdet_term = ±H*W*(sum(logs) + log|det W|)``).
* ``channel_affine_bwd(out, grad_out, matrix, matrix_inv, inv_offset)``: backward with recompute
  from the OUTPUT: ``inp = matrix_inv @ out + inv_offset``, ``grad_inp = matrix^T @ grad_out``,
  ``grad_matrix = sum_{b,p} grad_out inp^T`` and ``grad_offset = sum_{b,p} grad_out`` (float32).

Registered ops: ``flowkernels::channel_affine_{fwd,bwd}`` (C++/CUDA, ``flowkernels._C``; their
fakes are registered below once it loads) and ``flowkernels::channel_affine_{fwd,bwd}_triton``
(``_channel_affine_kernels.py``), one schema:

    channel_affine_fwd(Tensor x, Tensor matrix, Tensor offset, Tensor logdet_term, Tensor(a!) logdet) -> Tensor
    channel_affine_bwd(Tensor out, Tensor grad_out, Tensor matrix, Tensor matrix_inv, Tensor inv_offset)
        -> (Tensor, Tensor, Tensor, Tensor)

The C x C folding and the chain rule from (matrix, offset) to (weight, logs, bias) are tiny and
run as plain tensor ops here, shared by all backends, in the flow's dtype (float32): W^-1 and
log|det W| come in computed in float64 (cached per weight version by InvConv1x1), and the rest is
one rounding per C x C product, far below the per-pixel kernels' own. No float64 round trips
per call: each would be launches for nothing on a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import reference
from .._loader import on_extension_load
from ..dispatch import select_backend
from ._common import check_not_differentiating, kernel_op, logdet_buffer, pixels_collapsible

__all__ = [
    "ChannelAffine",
    "fold",
    "actnorm_conv_fwd",
    "actnorm_conv_inv",
    "actnorm_conv_bwd",
]


class ChannelAffine(NamedTuple):
    """Folded parameters of one direction: ``out = matrix @ inp + offset`` and its inverse
    ``inp = matrix_inv @ out + inv_offset`` (float32), plus the log-det per sample (0-dim)."""

    matrix: Tensor
    offset: Tensor
    matrix_inv: Tensor
    inv_offset: Tensor
    logdet_term: Tensor


def _check_params(x: Tensor, weight: Tensor, logs: Tensor, bias: Tensor) -> int:
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if weight.shape != (c, c):
        raise ValueError(f"weight: expected shape ({c}, {c}) to match x's {c} channels, got {tuple(weight.shape)}")
    for name, p in (("logs", logs), ("bias", bias)):
        if p.numel() != c:
            raise ValueError(f"{name}: expected {c} elements to match x's channels, got shape {tuple(p.shape)}")
    for name, t in (("weight", weight), ("logs", logs), ("bias", bias)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return c


def fold(
    weight: Tensor,
    logs: Tensor,
    bias: Tensor,
    pixels: int,
    *,
    reverse: bool = False,
    weight_inv: Tensor | None = None,
    logabsdet: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> ChannelAffine:
    """Fold ActNorm (logs, bias: C elements) and the 1x1 weight (C, C) into one channel map.

    Forward: ``matrix = W diag(e^logs)``, ``offset = matrix @ bias``, inverse ``diag(e^-logs) W^-1``
    and ``-bias``; ``logdet_term = pixels * (sum(logs) + log|det W|)``. ``reverse=True`` swaps the
    two maps and negates the term. ``weight_inv`` / ``log|det W|`` may be passed precomputed
    (:meth:`~flowkernels.InvConv1x1.inverse_stats`); otherwise they are computed here in float64.
    The folding itself runs in ``dtype``: one rounding per entry of a C x C product. Not
    differentiable: the memory-saving backward applies the chain rule itself (:func:`actnorm_conv_bwd`).
    """
    with torch.no_grad():
        weight_inv, logabsdet = _inverse_stats(weight, weight_inv, logabsdet, dtype)
        ls, b = logs.reshape(-1).to(dtype), bias.reshape(-1).to(dtype)
        matrix, offset, term = _applied_map(weight.to(dtype), weight_inv, ls, b, logabsdet, pixels, reverse)
        matrix_inv, inv_offset = _inverse_map(weight.to(dtype), weight_inv, ls, b, reverse)
        return ChannelAffine(matrix, offset, matrix_inv, inv_offset, term)


def _inverse_stats(
    weight: Tensor, weight_inv: Tensor | None, logabsdet: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(W^-1, log|det W|)`` in ``dtype``: the given ones, or computed in float64."""
    return _weight_inverse(weight, weight_inv, dtype), _logabsdet(weight, logabsdet, dtype)


def _weight_inverse(weight: Tensor, weight_inv: Tensor | None, dtype: torch.dtype) -> Tensor:
    return (torch.linalg.inv(weight.detach().double()) if weight_inv is None else weight_inv).to(dtype)


def _logabsdet(weight: Tensor, logabsdet: Tensor | None, dtype: torch.dtype) -> Tensor:
    return (torch.linalg.slogdet(weight.detach().double())[1] if logabsdet is None else logabsdet).to(dtype)


def _applied_map(
    w: Tensor, w_inv: Tensor, ls: Tensor, b: Tensor, logabsdet: Tensor, pixels: int, reverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(matrix, offset, logdet_term)`` of the map a call applies: the forward ``W diag(e^ls)``,
    ``W diag(e^ls) b``, ``+pixels (sum ls + log|det W|)``, or (``reverse``) the inverse
    ``diag(e^-ls) W^-1``, ``-b``, ``-pixels (...)``. w, w_inv (C, C); ls, b (C,)."""
    term = pixels * (ls.sum() + logabsdet)
    if reverse:
        return w_inv * torch.exp(-ls)[:, None], -b, -term
    matrix = w * torch.exp(ls)
    return matrix, matrix @ b, term


def _inverse_map(w: Tensor, w_inv: Tensor, ls: Tensor, b: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    """``(matrix_inv, inv_offset)``: the inverse of the map a call applied (what rebuilds its input)."""
    if reverse:
        matrix = w * torch.exp(ls)
        return matrix, matrix @ b
    return w_inv * torch.exp(-ls)[:, None], -b


def _fold_and_apply(
    x: Tensor,
    weight: Tensor,
    logs: Tensor,
    bias: Tensor,
    logdet: Tensor | None,
    weight_inv: Tensor | None,
    logabsdet: Tensor | None,
    backend: str | None,
    reverse: bool,
) -> tuple[Tensor, Tensor]:
    """Both public directions: validate, pick the backend, fold and apply the channel map."""
    _check_params(x, weight, logs, bias)
    logdet = logdet_buffer(x, logdet, clone=False)
    name = select_backend(backend, x)
    check_not_differentiating(name, x, weight, logs, bias)
    if name == "reference":
        fn = reference.actnorm_conv_inv if reverse else reference.actnorm_conv_fwd
        out, dlogdet = fn(x, weight, logs, bias)
        return out, logdet.add_(dlogdet)
    with torch.no_grad():
        weight_inv, logabsdet = _inverse_stats(weight, weight_inv, logabsdet, x.dtype)
        ls, b = logs.reshape(-1), bias.reshape(-1)
        maps = _applied_map(weight, weight_inv, ls, b, logabsdet, x.shape[2] * x.shape[3], reverse)
        y = kernel_op(name, "channel_affine_fwd")(x, *maps, logdet)
    return y, logdet


def actnorm_conv_fwd(
    x: Tensor,
    weight: Tensor,
    logs: Tensor,
    bias: Tensor,
    logdet: Tensor | None = None,
    *,
    weight_inv: Tensor | None = None,
    logabsdet: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """ActNorm then 1x1 conv in one pass: ``y = W diag(exp(logs)) (x + bias)`` per pixel
    (:func:`fold`, then the ``channel_affine_fwd`` op).

    Args:
        x: (B, C, H, W) float32, NCHW or channels_last (or a channel slice of one).
        weight: (C, C) 1x1 conv weight; logs, bias: C elements each ((C,) or (1, C, 1, 1)).
        logdet: (B,) float32, incremented in place by ``H*W*(sum(logs) + log|det W|)``;
            a zero buffer is made when None.
        weight_inv, logabsdet: optional precomputed ``W^-1`` and ``log|det W|``
            (:meth:`~flowkernels.InvConv1x1.inverse_stats`); otherwise computed in float64.
        backend: see :mod:`flowkernels.dispatch`; kernel backends are not differentiable here.
    Returns: (y, logdet); y has x's shape and memory format.
    """
    return _fold_and_apply(x, weight, logs, bias, logdet, weight_inv, logabsdet, backend, reverse=False)


def actnorm_conv_inv(
    y: Tensor,
    weight: Tensor,
    logs: Tensor,
    bias: Tensor,
    logdet: Tensor | None = None,
    *,
    weight_inv: Tensor | None = None,
    logabsdet: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`actnorm_conv_fwd`: ``x = diag(exp(-logs)) W^-1 y - bias`` per pixel.

    ``W^-1`` is computed in float64 unless ``weight_inv`` is given; ``logdet`` (B,) float32 is
    decremented in place by ``H*W*(sum(logs) + log|det W|)``. Returns (x, logdet).
    """
    return _fold_and_apply(y, weight, logs, bias, logdet, weight_inv, logabsdet, backend, reverse=True)


def actnorm_conv_bwd(
    out: Tensor,
    grad_out: Tensor,
    grad_logdet: Tensor,
    weight: Tensor,
    logs: Tensor,
    bias: Tensor,
    *,
    reverse: bool = False,
    weight_inv: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward with recompute from the output of :func:`actnorm_conv_fwd` (or ``_inv``):
    :func:`fold`, the ``channel_affine_bwd`` op, then the chain rule to the layer's parameters.

    Args:
        out: (B, C, H, W) float32 output of the forward (``reverse=False``) or of the inverse.
        grad_out: dL/dout, same shape; grad_logdet: (B,) dL/dlogdet of the running log-det.
        weight, logs, bias: the parameters used in that call.
    Returns: ``(inp, grad_inp, grad_weight, grad_logs, grad_bias)``: the rebuilt input of that
    call, dL/dinp, and total parameter gradients (including the log-det terms) shaped like the
    parameters. One kernel pass over the pixels; the chain rule on C x C runs in float64.
    """
    _check_params(out, weight, logs, bias)
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out: expected shape {tuple(out.shape)}, got {tuple(grad_out.shape)}")
    name = select_backend(backend, out)
    pixels = out.shape[2] * out.shape[3]
    with torch.no_grad():
        w_inv = _weight_inverse(weight, weight_inv, out.dtype)
        w, ls, b = weight.to(out.dtype), logs.reshape(-1).to(out.dtype), bias.reshape(-1).to(out.dtype)
        scale = torch.exp(ls)
        forward_map = w * scale  # W diag(e^logs)
        inverse_map = w_inv / scale[:, None]  # diag(e^-logs) W^-1
        # (applied map, the map that rebuilds its input, that map's offset); reverse: the call
        # applied the inverse map, so its input is rebuilt with the forward one
        args = (inverse_map, forward_map, forward_map @ b) if reverse else (forward_map, inverse_map, -b)
        if name == "reference":
            inp, grad_inp, g_map, g_off = reference.channel_affine_bwd(out, grad_out, *args)
        else:
            grad_out = pixels_collapsible(grad_out, out)
            inp, grad_inp, g_map, g_off = kernel_op(name, "channel_affine_bwd")(out, grad_out, *args)
        g_w, g_logs, g_b = _chain_rule(g_map, g_off, grad_logdet, w, w_inv, scale, b, pixels, reverse)
    return inp, grad_inp, g_w, g_logs.reshape(logs.shape), g_b.reshape(bias.shape)


def _chain_rule(
    g_map: Tensor,
    g_off: Tensor,
    grad_logdet: Tensor,
    w: Tensor,
    w_inv: Tensor,
    scale: Tensor,
    b: Tensor,
    pixels: int,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """From dL/d(matrix, offset) of the applied map to dL/d(weight, logs, bias), all (C, C) / (C,)
    in the flow's dtype (scale = e^logs).

    Forward map ``A = W D, a = A b`` (D = diag(e^logs)); reverse map ``A = D^-1 W^-1, a = -b``.
    The log-det term ``±pixels * (sum(logs) + log|det W|)`` adds ``±g`` to logs and ``±g W^-T``
    to W, with ``g = pixels * sum_b grad_logdet``.
    """
    g = pixels * grad_logdet.sum()
    w_inv_t = w_inv.T
    if not reverse:
        g_map = g_map + torch.outer(g_off, b)
        g_b = (w * scale).T @ g_off
        g_w = g_map * scale + g * w_inv_t
        g_logs = (w * g_map).sum(0) * scale + g
        return g_w, g_logs, g_b
    g_w_inv = g_map / scale[:, None]
    g_logs = -(g_w_inv * w_inv).sum(1) - g
    g_w = -(w_inv_t @ g_w_inv @ w_inv_t) - g * w_inv_t
    return g_w, g_logs, -g_off


def channel_affine_fwd_fake(x: Tensor, matrix: Tensor, offset: Tensor, logdet_term: Tensor, logdet: Tensor) -> Tensor:
    c = x.shape[1]
    torch._check(matrix.shape == (c, c), lambda: f"matrix: expected ({c}, {c}), got {tuple(matrix.shape)}")
    torch._check(offset.shape == (c,), lambda: f"offset: expected ({c},), got {tuple(offset.shape)}")
    return torch.empty_like(x)


def channel_affine_bwd_fake(
    out: Tensor, grad_out: Tensor, matrix: Tensor, matrix_inv: Tensor, inv_offset: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = out.shape[1]
    torch._check(
        grad_out.shape == out.shape, lambda: f"grad_out: expected {tuple(out.shape)}, got {tuple(grad_out.shape)}"
    )
    return (
        torch.empty_like(out),
        torch.empty_like(out),
        out.new_empty((c, c), dtype=torch.float32),
        out.new_empty((c,), dtype=torch.float32),
    )


@on_extension_load
def _register_fakes() -> None:
    """The C++ ops are declared by ``flowkernels._C``, so their fakes can only be registered once it loads."""
    torch.library.register_fake("flowkernels::channel_affine_fwd")(channel_affine_fwd_fake)
    torch.library.register_fake("flowkernels::channel_affine_bwd")(channel_affine_bwd_fake)
