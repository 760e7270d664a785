"""Fused affine coupling / SRFlow affine injector given the subnet output ``h``.

Oracle: ``reference.affine_coupling_fwd`` / ``_inv`` / ``_bwd``.

Per element of the active channels ``c >= passive`` (``passive=0``: SRFlow's conditional affine
injector; ``passive=C//2``: the coupling), with ``shift = h[:, 0::2]``, ``raw = h[:, 1::2]`` and
``s = sigmoid(raw + 2) + eps``:

* forward: ``y = (x + shift) * s`` (SRFlow, ``shift_first=True``) or ``y = x * s + shift``;
  ``logdet[b] += sum log s`` accumulated in float32 per program and added into the (B,) buffer
  in place, never materialising ``log s``; passive channels are copied, so the output replaces
  the official ``cat``.
* inverse: ``x = y / s - shift`` or ``(y - shift) / s``; ``logdet[b] -= sum log s``.
* backward with recompute from the OUTPUT (``reverse`` says which direction produced it):
  the rebuilt input, dL/dinput and dL/dh (h's dtype) in one pass; formulas in
  ``reference.affine_coupling_bwd``.

Registered ops: ``flowkernels::affine_coupling_{fwd,inv,bwd}`` (``flowkernels._C``) and
``flowkernels::affine_coupling_{fwd,inv,bwd}_triton`` (``_affine_coupling_kernels.py``); the fakes
of the C++ ops are registered at the end of this file, once the extension loads:

    affine_coupling_fwd(Tensor x, Tensor h, Tensor(a!) logdet, int passive, bool shift_first, float eps) -> Tensor
    affine_coupling_inv(Tensor y, Tensor h, Tensor(a!) logdet, int passive, bool shift_first, float eps) -> Tensor
    affine_coupling_bwd(Tensor out, Tensor h, Tensor grad_out, Tensor grad_logdet, int passive,
                        bool shift_first, float eps, bool reverse) -> (Tensor, Tensor, Tensor)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._loader import on_extension_load
from ..dispatch import select_backend
from ._common import check_coupling_args, check_not_differentiating, kernel_op, logdet_buffer, pixels_collapsible

__all__ = [
    "SRFLOW_EPS",
    "affine_coupling_fwd",
    "affine_coupling_inv",
    "affine_coupling_bwd",
]

SRFLOW_EPS = 1e-4  # official affine_eps: s >= 1e-4, so an inverse may amplify errors up to 1e4x


def _apply(
    x: Tensor,
    h: Tensor,
    logdet: Tensor | None,
    passive: int,
    shift_first: bool,
    eps: float,
    backend: str | None,
    direction: str,
) -> tuple[Tensor, Tensor]:
    """Both public directions: validate, pick the backend, run the op with logdet in place."""
    check_coupling_args(x, h, passive)
    logdet = logdet_buffer(x, logdet, clone=False)
    name = select_backend(backend, x, h)
    check_not_differentiating(name, x, h)
    if name == "reference":
        fn = reference.affine_coupling_inv if direction == "inv" else reference.affine_coupling_fwd
        out, dlogdet = fn(x, h, passive, shift_first, eps)
        return out, logdet.add_(dlogdet)
    return kernel_op(name, f"affine_coupling_{direction}")(x, h, logdet, passive, shift_first, eps), logdet


def affine_coupling_fwd(
    x: Tensor,
    h: Tensor,
    logdet: Tensor | None = None,
    *,
    passive: int = 0,
    shift_first: bool = True,
    eps: float = SRFLOW_EPS,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Affine coupling on channels ``[passive:]``: ``y2 = (x2 + shift) * s``, ``s = sigmoid(raw + 2) + eps``.

    Args:
        x: (B, C, H, W) float32, NCHW or channels_last (or a channel slice); channels ``[:passive]`` pass through.
        h: (B, 2*(C - passive), H, W) subnet output, float32 or bfloat16; shift = h[:, 0::2],
            raw scale = h[:, 1::2].
        logdet: (B,) float32, incremented in place by sum(log s); a zero buffer is made when None.
        shift_first: SRFlow's ``(x + t) * s`` (True) or ``x * s + t`` (False).
    Returns: (y, logdet); y has x's shape and memory format.
    """
    return _apply(x, h, logdet, passive, shift_first, eps, backend, "fwd")


def affine_coupling_inv(
    y: Tensor,
    h: Tensor,
    logdet: Tensor | None = None,
    *,
    passive: int = 0,
    shift_first: bool = True,
    eps: float = SRFLOW_EPS,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`affine_coupling_fwd`: ``x2 = y2 / s - shift`` (divides by s >= eps).

    Shapes as in :func:`affine_coupling_fwd`; ``logdet`` is decremented in place. Returns (x, logdet).
    """
    return _apply(y, h, logdet, passive, shift_first, eps, backend, "inv")


def affine_coupling_bwd(
    out: Tensor,
    h: Tensor,
    grad_out: Tensor,
    grad_logdet: Tensor,
    *,
    passive: int = 0,
    shift_first: bool = True,
    eps: float = SRFLOW_EPS,
    reverse: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward with recompute from the output of the forward (or, ``reverse=True``, the inverse).

    Args:
        out: (B, C, H, W) float32 output of that call; h: the subnet output it used.
        grad_out: dL/dout (float32, out's shape); grad_logdet: (B,) float32 dL/dlogdet.
    Returns: ``(inp, grad_inp, grad_h)``: the rebuilt input of that call (float32), dL/dinp
    (float32; for passive channels only the direct part ``grad_out[:, :passive]``, the subnet
    path is added by the caller) and dL/dh in h's dtype.
    """
    check_coupling_args(out, h, passive)
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out: expected shape {tuple(out.shape)}, got {tuple(grad_out.shape)}")
    if grad_logdet.shape != (out.shape[0],):
        raise ValueError(f"grad_logdet: expected shape ({out.shape[0]},), got {tuple(grad_logdet.shape)}")
    name = select_backend(backend, out, h)
    with torch.no_grad():
        if name == "reference":
            return reference.affine_coupling_bwd(out, h, grad_out, grad_logdet, passive, shift_first, eps, reverse)
        grad_out = pixels_collapsible(grad_out, out)
        op = kernel_op(name, "affine_coupling_bwd")
        return op(out, h, grad_out, grad_logdet.float(), passive, shift_first, eps, reverse)


def affine_coupling_fwd_fake(
    x: Tensor, h: Tensor, logdet: Tensor, passive: int, shift_first: bool, eps: float
) -> Tensor:
    torch._check(
        h.shape[1] == 2 * (x.shape[1] - passive),
        lambda: f"h: expected {2 * (x.shape[1] - passive)} channels, got {h.shape[1]}",
    )
    return torch.empty_like(x)


def affine_coupling_bwd_fake(
    out: Tensor,
    h: Tensor,
    grad_out: Tensor,
    grad_logdet: Tensor,
    passive: int,
    shift_first: bool,
    eps: float,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(
        grad_out.shape == out.shape, lambda: f"grad_out: expected {tuple(out.shape)}, got {tuple(grad_out.shape)}"
    )
    return torch.empty_like(out), torch.empty_like(out), torch.empty_like(h)


@on_extension_load
def _register_fakes() -> None:
    """The C++ ops are declared by ``flowkernels._C``, so their fakes can only be registered once it loads."""
    torch.library.register_fake("flowkernels::affine_coupling_fwd")(affine_coupling_fwd_fake)
    torch.library.register_fake("flowkernels::affine_coupling_inv")(affine_coupling_fwd_fake)
    torch.library.register_fake("flowkernels::affine_coupling_bwd")(affine_coupling_bwd_fake)
