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
    "StackedMaps",
    "apply_channel_map",
    "chain_rule_stacked",
    "channel_map_bwd",
    "fold",
    "fold_stacked",
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
    One step of :func:`fold_stacked`.
    """
    with torch.no_grad():
        w_inv, lad = _inverse_stats(weight, weight_inv, logabsdet, dtype)
        maps = fold_stacked(*_stacked_one(weight, logs, bias, w_inv, lad, dtype), reverse=reverse)
        return ChannelAffine(
            maps.matrix[0], maps.offset[0], maps.matrix_inv[0], maps.inv_offset[0], pixels * maps.logdet_per_pixel[0]
        )


class StackedMaps(NamedTuple):
    """The folded channel maps of n calls (leading dim n; :func:`fold_stacked`): the map each call
    applies (``matrix`` (n, C, C), ``offset`` (n, C)), the map that rebuilds its input from its
    output (``matrix_inv``, ``inv_offset``), its log-det per pixel (n,) and the scales ``e^logs``
    (n, C) that the chain rule reuses."""

    matrix: Tensor
    offset: Tensor
    matrix_inv: Tensor | None
    inv_offset: Tensor
    logdet_per_pixel: Tensor | None
    scale: Tensor


def fold_stacked(
    weight: Tensor, logs: Tensor, bias: Tensor, weight_inv: Tensor | None, logabsdet: Tensor | None, *, reverse: bool
) -> StackedMaps:
    """:func:`fold` for n calls at once (a FlowSequence's steps): weight, weight_inv (n, C, C);
    logs, bias (n, C); logabsdet (n,). Forward ``A = W diag(e^logs)``, ``a = A bias``, log-det
    ``+(sum logs + log|det W|)`` per pixel (None without ``logabsdet``: a backward needs none);
    ``reverse``: the inverse map is applied and the forward one rebuilds. ``weight_inv`` may be
    None in a forward (``reverse=False``) that never rebuilds: ``matrix_inv`` is then None. A
    handful of batched ops, whatever n."""
    if weight_inv is None and reverse:
        raise ValueError("fold_stacked: the inverse map applies W^-1, so reverse=True needs weight_inv")
    scale = torch.exp(logs)
    forward_map = weight * scale[:, None, :]
    inverse_map = None if weight_inv is None else weight_inv / scale[:, :, None]
    per_pixel = None if logabsdet is None else logs.sum(-1) + logabsdet
    if reverse:
        per_pixel = None if per_pixel is None else -per_pixel
        return StackedMaps(inverse_map, -bias, forward_map, _matvec(forward_map, bias), per_pixel, scale)
    return StackedMaps(forward_map, _matvec(forward_map, bias), inverse_map, -bias, per_pixel, scale)


def _matvec(m: Tensor, v: Tensor) -> Tensor:
    """Batched ``m @ v``: (n, C, C) x (n, C) -> (n, C)."""
    return (m @ v.unsqueeze(-1)).squeeze(-1)


def _stacked_one(
    weight: Tensor, logs: Tensor, bias: Tensor, weight_inv: Tensor, logabsdet: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor | None, ...]:
    """One call's parameters as a stack of one for :func:`fold_stacked` / :func:`chain_rule_stacked`."""
    return (
        weight.to(dtype)[None],
        logs.reshape(1, -1).to(dtype),
        bias.reshape(1, -1).to(dtype),
        weight_inv[None],
        None if logabsdet is None else logabsdet.reshape(1),
    )


def _inverse_stats(
    weight: Tensor,
    weight_inv: Tensor | None,
    logabsdet: Tensor | None,
    dtype: torch.dtype,
    *,
    need_logabsdet: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(W^-1, log|det W|)`` in ``dtype``: the given ones, or computed in float64 (log|det W|
    only if ``need_logabsdet``, else None)."""
    if weight_inv is None or (logabsdet is None and need_logabsdet):
        w = weight.detach().double()
        weight_inv = torch.linalg.inv_ex(w)[0] if weight_inv is None else weight_inv
        if logabsdet is None and need_logabsdet:
            logabsdet = torch.linalg.slogdet(w)[1]
    return weight_inv.to(dtype), None if logabsdet is None else logabsdet.to(dtype)


def apply_channel_map(
    x: Tensor, matrix: Tensor, offset: Tensor, logdet_term: Tensor, logdet: Tensor, backend: str
) -> Tensor:
    """``y = matrix @ x + offset`` per pixel and ``logdet += logdet_term`` in place, on a concrete
    ``backend`` (the registered ``channel_affine_fwd`` op, or the reference, differentiable)."""
    if backend == "reference":
        logdet.add_(logdet_term)
        return reference.channel_affine(x, matrix, offset)
    return kernel_op(backend, "channel_affine_fwd")(x, matrix, offset, logdet_term, logdet)


def channel_map_bwd(
    out: Tensor, grad_out: Tensor, matrix: Tensor, matrix_inv: Tensor, inv_offset: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward with recompute of :func:`apply_channel_map` from its output on a concrete
    ``backend``: ``(inp, grad_inp, grad_matrix, grad_offset)`` (the ``channel_affine_bwd`` op)."""
    with torch.no_grad():
        if backend == "reference":
            return reference.channel_affine_bwd(out, grad_out, matrix, matrix_inv, inv_offset)
        grad_out = pixels_collapsible(grad_out, out)
        return kernel_op(backend, "channel_affine_bwd")(out, grad_out, matrix, matrix_inv, inv_offset)


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
    cmap = fold(
        weight, logs, bias, x.shape[2] * x.shape[3], reverse=reverse, weight_inv=weight_inv, logabsdet=logabsdet
    )
    with torch.no_grad():
        y = apply_channel_map(x, cmap.matrix, cmap.offset, cmap.logdet_term, logdet, name)
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
        w_inv, _ = _inverse_stats(weight, weight_inv, None, out.dtype, need_logabsdet=False)
        w, ls, b, w_inv, _ = _stacked_one(weight, logs, bias, w_inv, None, out.dtype)
        maps = fold_stacked(w, ls, b, w_inv, None, reverse=reverse)
        inp, grad_inp, g_map, g_off = channel_map_bwd(
            out, grad_out, maps.matrix[0], maps.matrix_inv[0], maps.inv_offset[0], name
        )
        g = (pixels * grad_logdet.sum()).reshape(1)
        g_w, g_logs, g_b = chain_rule_stacked(g_map[None], g_off[None], g, w, w_inv, b, maps, reverse=reverse)
    return inp, grad_inp, g_w[0], g_logs.reshape(logs.shape), g_b.reshape(bias.shape)


def chain_rule_stacked(
    g_map: Tensor,
    g_off: Tensor,
    g_logdet: Tensor,
    weight: Tensor,
    weight_inv: Tensor,
    bias: Tensor,
    maps: StackedMaps,
    *,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """From dL/d(matrix, offset) of the maps n calls applied to dL/d(weight, logs, bias), stacked
    (weight (n, C, C), logs and bias (n, C)); ``maps`` from :func:`fold_stacked`.

    Forward map ``A = W D, a = A b`` (D = diag(e^logs)); reverse map ``A = D^-1 W^-1, a = -b``.
    The log-det term ``±pixels * (sum(logs) + log|det W|)`` adds ``±g`` to logs and ``±g W^-T``
    to W, with ``g_logdet`` (n,) = ``pixels * sum_b grad_logdet`` of each call.
    """
    w_inv_t = weight_inv.transpose(1, 2)
    scale, g = maps.scale, g_logdet
    if not reverse:
        g_map = g_map + g_off[:, :, None] * bias[:, None, :]
        g_b = _matvec(maps.matrix.transpose(1, 2), g_off)
        g_w = g_map * scale[:, None, :] + g[:, None, None] * w_inv_t
        g_logs = (weight * g_map).sum(1) * scale + g[:, None]
        return g_w, g_logs, g_b
    g_w_inv = g_map / scale[:, :, None]
    g_logs = -(g_w_inv * weight_inv).sum(2) - g[:, None]
    g_w = -(w_inv_t @ g_w_inv @ w_inv_t) - g[:, None, None] * w_inv_t
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
