"""Pure-PyTorch reference of every flow op: the oracle for the kernels and the CPU fallback.

Tensors are (B, C, H, W). Every function here is differentiable with plain autograd and
returns its per-sample log-determinant contribution ``dlogdet`` of shape (B,) instead of
touching a buffer, so that it can be composed freely in tests. The dispatching wrappers in
``flowkernels.ops`` turn these into the in-place ``logdet`` convention of the kernels.

Conventions (DESIGN.md section 2, the official SRFlow):

* ActNorm: ``y = (x + bias) * exp(logs)``, ``dlogdet = H*W*sum(logs)``.
* Invertible 1x1 conv: ``y = W x`` per pixel, ``dlogdet = H*W*log|det W|`` (in float64).
* Fused ActNorm + 1x1 conv: ``y = W diag(exp(logs)) (x + bias)``, the per-pixel affine channel
  map ``y = matrix @ x + offset`` with ``matrix = W diag(exp(logs))``, ``offset = matrix @ bias``.
* Affine coupling on channels ``[passive:]`` given a subnet output ``h`` with shift and raw scale
  interleaved on channels (``shift = h[:, 0::2]``, ``raw = h[:, 1::2]``) and
  ``s = sigmoid(raw + 2) + eps``: SRFlow ``y2 = (x2 + shift) * s`` (``shift_first=True``) or
  Glow-style ``y2 = x2 * s + shift``; ``dlogdet = sum(log s)``. ``passive=0`` is SRFlow's
  conditional affine injector, ``passive=C//2`` the coupling.
* Additive coupling (NICE, Glow's additive variant) on channels ``[passive:]`` given a subnet
  output ``h`` of one shift per active channel: ``y2 = x2 + h``, ``dlogdet = 0``.
* Gaussian standardisation (the priors of a multi-scale flow): ``eps = (z - mean) * exp(-logs)``,
  ``dlogdet = -sum(logs)``.

This module imports only torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "actnorm",
    "actnorm_fwd",
    "actnorm_inv",
    "invconv_fwd",
    "invconv_inv",
    "lu_weight",
    "actnorm_conv_fwd",
    "actnorm_conv_inv",
    "channel_affine",
    "channel_affine_bwd",
    "affine_coupling_fwd",
    "affine_coupling_inv",
    "affine_coupling_bwd",
    "additive_coupling_fwd",
    "additive_coupling_inv",
    "additive_coupling_bwd",
    "squeeze2d",
    "unsqueeze2d",
    "gaussian_log_prob",
    "gaussian_standardize",
    "gaussian_unstandardize",
    "split2d_fwd",
    "split2d_inv",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _pixels(x: Tensor) -> int:
    return x.shape[2] * x.shape[3]


def actnorm(x: Tensor, logs: Tensor, bias: Tensor) -> Tensor:
    """ActNorm's map alone, ``(x + bias) * exp(logs)``; logs, bias (1, C, 1, 1) (inside subnets,
    where no log-det is wanted)."""
    return (x + bias) * torch.exp(logs)


def actnorm_fwd(x: Tensor, logs: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """ActNorm ``y = (x + bias) * exp(logs)``; logs, bias (1, C, 1, 1). Returns (y, dlogdet (B,))."""
    dlogdet = (_pixels(x) * logs.sum()).expand(x.shape[0])
    return actnorm(x, logs, bias), dlogdet


def actnorm_inv(y: Tensor, logs: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse ActNorm ``x = y * exp(-logs) - bias``. Returns (x, dlogdet = -H*W*sum(logs))."""
    x = y * torch.exp(-logs) - bias
    dlogdet = (-_pixels(y) * logs.sum()).expand(y.shape[0])
    return x, dlogdet


def at_least_float32(t: Tensor) -> torch.dtype:
    """float32 for half/bf16/float32 inputs (subnet outputs may be bf16), float64 stays float64:
    ``torch.promote_types(t.dtype, torch.float32)`` for floating ``t``, without its dispatched call."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _logabsdet(weight: Tensor) -> Tensor:
    # float64: log|det W| of a 96x96 or 192x192 matrix loses digits in float32.
    return torch.linalg.slogdet(weight.double())[1].to(at_least_float32(weight))


def invconv_fwd(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Invertible 1x1 convolution ``y[:, :, p] = weight @ x[:, :, p]``; weight (C, C)."""
    y = torch.einsum("ij,bjhw->bihw", weight, x)
    dlogdet = (_pixels(x) * _logabsdet(weight)).expand(x.shape[0])
    return y, dlogdet


def invconv_inv(y: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse 1x1 convolution with ``inverse(weight)`` computed in float64."""
    weight_inv = torch.linalg.inv(weight.double()).to(y.dtype)
    x = torch.einsum("ij,bjhw->bihw", weight_inv, y)
    dlogdet = (-_pixels(y) * _logabsdet(weight)).expand(y.shape[0])
    return x, dlogdet


def lu_weight(perm: Tensor, lower: Tensor, upper: Tensor, log_s: Tensor, sign_s: Tensor) -> Tensor:
    """Glow's LU-parametrised 1x1 weight ``W = P L (U + diag(sign_s * exp(log_s)))``.

    lower/upper: (C, C), only their strictly lower/upper triangles are used; log_s, sign_s: (C,);
    perm: (C, C) permutation matrix. ``log|det W| = sum(log_s)``.
    """
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    l_mat = torch.tril(lower, -1) + eye
    u_mat = torch.triu(upper, 1) + torch.diag(sign_s * torch.exp(log_s))
    return perm @ l_mat @ u_mat


def channel_affine(x: Tensor, matrix: Tensor, offset: Tensor) -> Tensor:
    """The per-pixel affine channel map ``y[b, :, p] = matrix @ x[b, :, p] + offset``."""
    return torch.einsum("ij,bjhw->bihw", matrix, x) + offset[None, :, None, None]


def channel_affine_bwd(
    out: Tensor, grad_out: Tensor, matrix: Tensor, matrix_inv: Tensor, inv_offset: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward-with-recompute of ``out = matrix @ inp + offset`` from its output.

    Rebuilds ``inp = matrix_inv @ out + inv_offset`` and returns
    ``(inp, grad_inp = matrix^T grad_out, grad_matrix = sum_{b,p} grad_out inp^T,
    grad_offset = sum_{b,p} grad_out)``; grad_matrix (C, C) and grad_offset (C,) are float32.
    """
    inp = channel_affine(out, matrix_inv, inv_offset)
    grad_inp = torch.einsum("ji,bjhw->bihw", matrix, grad_out)
    grad_matrix = torch.einsum("bihw,bjhw->ij", grad_out, inp)
    grad_offset = grad_out.sum(dim=(0, 2, 3))
    return inp, grad_inp, grad_matrix, grad_offset


def actnorm_conv_fwd(x: Tensor, weight: Tensor, logs: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """ActNorm then 1x1 conv, the first half of a flow step. logs, bias: (1, C, 1, 1) or (C,)."""
    y, ld_act = actnorm_fwd(x, logs.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1))
    y, ld_conv = invconv_fwd(y, weight)
    return y, ld_act + ld_conv


def actnorm_conv_inv(y: Tensor, weight: Tensor, logs: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`actnorm_conv_fwd`: inverse 1x1 conv, then inverse ActNorm."""
    x, ld_conv = invconv_inv(y, weight)
    x, ld_act = actnorm_inv(x, logs.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1))
    return x, ld_act + ld_conv


def _shift_and_scale(h: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """shift, s = sigmoid(raw + 2) + eps and sigmoid itself, in float32 (float64 for float64 h)."""
    h = h.to(at_least_float32(h))
    shift, raw = h[:, 0::2], h[:, 1::2]
    sig = torch.sigmoid(raw + 2.0)
    return shift, sig + eps, sig


def _check_passive(x: Tensor, h: Tensor, passive: int, per_channel: int = 2) -> None:
    """h must carry ``per_channel`` values (shift and raw scale, or the shift alone) per active channel."""
    active = x.shape[1] - passive
    if h.shape[1] != per_channel * active:
        what = "shift and scale" if per_channel == 2 else "a shift"
        raise ValueError(
            f"h: expected {per_channel * active} channels ({what} for the {active} active channels of x), "
            f"got {h.shape[1]}"
        )


def affine_coupling_fwd(
    x: Tensor, h: Tensor, passive: int, shift_first: bool = True, eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Affine coupling (or injector, ``passive=0``) on channels ``[passive:]``.

    x: (B, C, H, W); h: (B, 2*(C - passive), H, W), any float dtype (computed in float32).
    Returns (y, dlogdet = sum log s). ``y[:, :passive] = x[:, :passive]``.
    """
    _check_passive(x, h, passive)
    shift, s, _ = _shift_and_scale(h, eps)
    x1, x2 = x[:, :passive], x[:, passive:]
    y2 = (x2 + shift) * s if shift_first else x2 * s + shift
    return torch.cat([x1, y2], dim=1), torch.log(s).sum(dim=(1, 2, 3))


def affine_coupling_inv(
    y: Tensor, h: Tensor, passive: int, shift_first: bool = True, eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`affine_coupling_fwd`. Returns (x, dlogdet = -sum log s).

    Divides by s >= eps, so errors in y grow by up to 1/eps (1e4 for SRFlow).
    """
    _check_passive(y, h, passive)
    shift, s, _ = _shift_and_scale(h, eps)
    y1, y2 = y[:, :passive], y[:, passive:]
    x2 = y2 / s - shift if shift_first else (y2 - shift) / s
    return torch.cat([y1, x2], dim=1), -torch.log(s).sum(dim=(1, 2, 3))


def affine_coupling_bwd(
    out: Tensor,
    h: Tensor,
    grad_out: Tensor,
    grad_logdet: Tensor,
    passive: int,
    shift_first: bool = True,
    eps: float = 1e-4,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward-with-recompute of the affine coupling from its output (explicit formulas).

    ``reverse=False``: ``out = affine_coupling_fwd(inp, h)``; ``reverse=True``: ``out`` came from
    :func:`affine_coupling_inv`. ``grad_out`` is dL/dout and ``grad_logdet`` (B,) is dL/dlogdet
    of the running log-determinant the op added to (forward) or subtracted from (inverse).
    Returns ``(inp, grad_inp, grad_h)``; grad_h has h's dtype, the others are float32.

    With ``sg = sigmoid(raw + 2)``, ``s = sg + eps`` and ``ds/draw = sg (1 - sg)``:

    * forward, shift first: ``inp = out/s - t``, ``g_inp = g s``, ``g_t = g s``,
      ``g_s = (g out + gl) / s``; scale first: ``inp = (out - t)/s``, ``g_inp = g s``,
      ``g_t = g``, ``g_s = g inp + gl / s``.
    * reverse, shift first: ``inp = (out + t) s``, ``g_inp = g / s``, ``g_t = -g``,
      ``g_s = -(g (out + t) + gl) / s``; scale first: ``inp = out s + t``, ``g_inp = g / s``,
      ``g_t = -g / s``, ``g_s = -(g out + gl) / s``.
    """
    _check_passive(out, h, passive)
    shift, s, sig = _shift_and_scale(h, eps)
    o1, o2 = out[:, :passive], out[:, passive:]
    g1, g2 = grad_out[:, :passive], grad_out[:, passive:]
    gl = grad_logdet.to(s.dtype).reshape(-1, 1, 1, 1)
    if not reverse:
        if shift_first:
            i2 = o2 / s - shift
            g_shift, g_s = g2 * s, (g2 * o2 + gl) / s
        else:
            i2 = (o2 - shift) / s
            g_shift, g_s = g2, g2 * i2 + gl / s
        g_i2 = g2 * s
    else:
        if shift_first:
            i2 = (o2 + shift) * s
            g_shift, g_s = -g2, -(g2 * (o2 + shift) + gl) / s
        else:
            i2 = o2 * s + shift
            g_shift, g_s = -g2 / s, -(g2 * o2 + gl) / s
        g_i2 = g2 / s
    g_raw = g_s * sig * (1.0 - sig)
    grad_h = torch.stack([g_shift, g_raw], dim=2).flatten(1, 2).to(h.dtype)
    return torch.cat([o1, i2], dim=1), torch.cat([g1, g_i2], dim=1), grad_h


def additive_coupling_fwd(x: Tensor, h: Tensor, passive: int) -> tuple[Tensor, Tensor]:
    """Additive coupling on channels ``[passive:]``: ``y2 = x2 + h``; ``y[:, :passive] = x[:, :passive]``.

    x: (B, C, H, W); h: (B, C - passive, H, W) shift, any float dtype (computed in float32).
    Returns (y, dlogdet), dlogdet (B,) exactly zero: the map is volume preserving.
    """
    _check_passive(x, h, passive, per_channel=1)
    shift = h.to(at_least_float32(h))
    y = torch.cat([x[:, :passive], x[:, passive:] + shift], dim=1)
    return y, x.new_zeros(x.shape[0])


def additive_coupling_inv(y: Tensor, h: Tensor, passive: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`additive_coupling_fwd`: ``x2 = y2 - h``. Returns (x, dlogdet = 0)."""
    _check_passive(y, h, passive, per_channel=1)
    shift = h.to(at_least_float32(h))
    return torch.cat([y[:, :passive], y[:, passive:] - shift], dim=1), y.new_zeros(y.shape[0])


def additive_coupling_bwd(
    out: Tensor, h: Tensor, grad_out: Tensor, passive: int, reverse: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward-with-recompute of the additive coupling from its output (explicit formulas).

    ``reverse=False``: ``out = additive_coupling_fwd(inp, h)``; ``reverse=True``: ``out`` came from
    :func:`additive_coupling_inv`. The log-det is constant, so no gradient of it is needed.
    Returns ``(inp, grad_inp, grad_h)``; grad_h has h's dtype:

    * forward: ``inp = out - t``, ``g_inp = g``, ``g_t = g2``;
    * reverse: ``inp = out + t``, ``g_inp = g``, ``g_t = -g2``.
    """
    _check_passive(out, h, passive, per_channel=1)
    shift = h.to(at_least_float32(h))
    o2, g2 = out[:, passive:], grad_out[:, passive:]
    i2, g_shift = (o2 + shift, -g2) if reverse else (o2 - shift, g2)
    return torch.cat([out[:, :passive], i2], dim=1), grad_out.clone(), g_shift.to(h.dtype)


def squeeze2d(x: Tensor, factor: int = 2) -> Tensor:
    """Space-to-depth: (B, C, H, W) -> (B, C*f*f, H/f, W/f); channel ``c*f*f + i*f + j`` holds
    pixel ``(f*h + i, f*w + j)`` of channel c (the official SRFlow/Glow order, = pixel_unshuffle)."""
    return F.pixel_unshuffle(x, factor)


def unsqueeze2d(x: Tensor, factor: int = 2) -> Tensor:
    """Inverse of :func:`squeeze2d`."""
    return F.pixel_shuffle(x, factor)


def gaussian_log_prob(z: Tensor, mean: Tensor | None = None, logs: Tensor | None = None) -> Tensor:
    """Per-sample log-density of a diagonal Gaussian N(mean, exp(logs)^2), summed over C, H, W.

    mean/logs None means the standard normal. Returns (B,) in z's dtype.
    """
    if mean is None:
        return -0.5 * (z.pow(2) + _LOG_2PI).sum(dim=(1, 2, 3))
    return -0.5 * (2.0 * logs + (z - mean).pow(2) * torch.exp(-2.0 * logs) + _LOG_2PI).sum(dim=(1, 2, 3))


def gaussian_standardize(z: Tensor, mean: Tensor, logs: Tensor) -> tuple[Tensor, Tensor]:
    """The standardising bijection of N(mean, exp(logs)^2): ``eps = (z - mean) * exp(-logs)``.

    mean, logs broadcast against z (B, C, H, W). Returns (eps, dlogdet = -sum(logs) per sample),
    so that ``log N(z; mean, exp(logs)^2) = log N(eps; 0, I) + dlogdet``.
    """
    eps = (z - mean) * torch.exp(-logs)
    return eps, -logs.expand_as(z).sum(dim=(1, 2, 3))


def gaussian_unstandardize(eps: Tensor, mean: Tensor, logs: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`gaussian_standardize`: ``z = mean + exp(logs) * eps``; dlogdet = +sum(logs)."""
    z = mean + torch.exp(logs) * eps
    return z, logs.expand_as(eps).sum(dim=(1, 2, 3))


def split2d_fwd(z: Tensor, h: Tensor, passive: int) -> tuple[Tensor, Tensor, Tensor]:
    """Factor out ``z[:, passive:]`` under the learned prior ``h = prior_net(z[:, :passive])``.

    h: (B, 2*(C - passive), H, W) with mean = h[:, 0::2], logs = h[:, 1::2].
    Returns (z1, eps = (z2 - mean) * exp(-logs), log N(z2; mean, exp(logs)^2) per sample).
    """
    z1, z2 = z[:, :passive], z[:, passive:]
    mean, logs = h[:, 0::2], h[:, 1::2]
    return z1, (z2 - mean) * torch.exp(-logs), gaussian_log_prob(z2, mean, logs)


def split2d_inv(z1: Tensor, h: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`split2d_fwd`: ``z2 = mean + exp(logs) * eps``.

    Returns (z = cat(z1, z2), log N(z2; mean, exp(logs)^2) per sample).
    """
    mean, logs = h[:, 0::2], h[:, 1::2]
    z2 = mean + torch.exp(logs) * eps
    return torch.cat([z1, z2], dim=1), gaussian_log_prob(z2, mean, logs)
