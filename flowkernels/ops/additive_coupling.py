"""Fused additive coupling (NICE; Glow's ``flow_coupling=0``) given the subnet output ``h``.

Oracle: ``reference.additive_coupling_fwd`` / ``_inv`` / ``_bwd``.

Per element of the active channels ``c >= passive`` (``passive=C//2``: the coupling), with
``shift = h[:, c - passive]``:

* forward: ``y = x + shift``; passive channels are copied, so the output replaces the ``cat``.
* inverse: ``x = y - shift``.
* backward with recompute from the OUTPUT (``reverse`` says which direction produced it): the
  rebuilt input ``out -+ shift``, ``dL/dinput = grad_out`` and ``dL/dh = +-grad_out[:, passive:]``
  (h's dtype) in one pass.

The map is volume preserving: its log-determinant is exactly 0. The public wrappers take and
return the caller's (B,) log-det buffer like the affine ones, so a layer treats both couplings
alike, and leave it untouched: adding zeros would cost a reduction launch per call and nothing
else, and an op that declared a mutation it never performs would make torch.compile copy the
buffer for nothing. So the registered ops take no log-det at all and mutate nothing.

Why a separate op family and not an additive mode of ``affine_coupling``: everything that the
two share is shared below the op (the per-element maths in ``csrc/kernels/coupling_math.h``, the
host prologues in ``csrc/coupling_host.h``, the CPU row helpers, the CUDA layout choice in
``csrc/kernels/coupling_layout.cuh``, the Triton tile helpers in ``_triton_utils``), while what
differs is the whole contract: h has half the channels (one shift, not shift and scale), there is
no log-det, no ``eps``, no ``shift_first``, no ``grad_logdet``. A mode flag would widen every
affine schema and kernel signature with arguments the other mode ignores, and put a branch (or
twice the template instantiations) in every affine kernel; as its own op the additive coupling
reads 2 tensors instead of 3 and launches once instead of twice.

Registered ops: ``flowkernels::additive_coupling_{fwd,inv,bwd}`` (``flowkernels._C``) and
``flowkernels::additive_coupling_{fwd,inv,bwd}_triton`` (``_additive_coupling_kernels.py``); the
fakes of the C++ ops are registered at the end of this file, once the extension loads:

    additive_coupling_fwd(Tensor x, Tensor h, int passive) -> Tensor
    additive_coupling_inv(Tensor y, Tensor h, int passive) -> Tensor
    additive_coupling_bwd(Tensor out, Tensor h, Tensor grad_out, int passive, bool reverse) -> (Tensor, Tensor, Tensor)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._loader import on_extension_load
from ..dispatch import select_backend
from ._common import check_coupling_args, check_not_differentiating, kernel_op, logdet_buffer, pixels_collapsible

__all__ = [
    "additive_coupling_fwd",
    "additive_coupling_inv",
    "additive_coupling_bwd",
]


def _apply(
    x: Tensor, h: Tensor, logdet: Tensor | None, passive: int, backend: str | None, direction: str
) -> tuple[Tensor, Tensor]:
    """Both public directions: validate, pick the backend, run the op; the log-det is unchanged."""
    check_coupling_args(x, h, passive, per_channel=1)
    logdet = logdet_buffer(x, logdet, clone=False)
    name = select_backend(backend, x, h)
    check_not_differentiating(name, x, h)
    if name == "reference":
        fn = reference.additive_coupling_inv if direction == "inv" else reference.additive_coupling_fwd
        return fn(x, h, passive)[0], logdet
    return kernel_op(name, f"additive_coupling_{direction}")(x, h, passive), logdet


def additive_coupling_fwd(
    x: Tensor, h: Tensor, logdet: Tensor | None = None, *, passive: int = 0, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Additive coupling on channels ``[passive:]``: ``y2 = x2 + h``, log-det 0.

    Args:
        x: (B, C, H, W) float32, NCHW or channels_last (or a channel slice); channels ``[:passive]`` pass through.
        h: (B, C - passive, H, W) subnet output (the shifts), float32 or bfloat16.
        logdet: (B,) float32 running log-det, returned as it is (the map preserves volume); a
            zero buffer is made when None.
    Returns: (y, logdet); y has x's shape and memory format, logdet is the passed tensor if one was given.
    """
    return _apply(x, h, logdet, passive, backend, "fwd")


def additive_coupling_inv(
    y: Tensor, h: Tensor, logdet: Tensor | None = None, *, passive: int = 0, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`additive_coupling_fwd`: ``x2 = y2 - h``. Shapes as there; returns (x, logdet)."""
    return _apply(y, h, logdet, passive, backend, "inv")


def additive_coupling_bwd(
    out: Tensor,
    h: Tensor,
    grad_out: Tensor,
    *,
    passive: int = 0,
    reverse: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward with recompute from the output of the forward (or, ``reverse=True``, the inverse).

    Args:
        out: (B, C, H, W) float32 output of that call; h: the subnet output it used.
        grad_out: dL/dout (float32, out's shape). The log-det is constant: it has no gradient to pass.
    Returns: ``(inp, grad_inp, grad_h)``: the rebuilt input of that call (float32), dL/dinp
    (float32, a copy of grad_out; for passive channels only the direct part, the subnet path is
    added by the caller) and dL/dh in h's dtype.
    """
    check_coupling_args(out, h, passive, per_channel=1)
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out: expected shape {tuple(out.shape)}, got {tuple(grad_out.shape)}")
    name = select_backend(backend, out, h)
    with torch.no_grad():
        if name == "reference":
            return reference.additive_coupling_bwd(out, h, grad_out, passive, reverse)
        grad_out = pixels_collapsible(grad_out, out)
        return kernel_op(name, "additive_coupling_bwd")(out, h, grad_out, passive, reverse)


def additive_coupling_fwd_fake(x: Tensor, h: Tensor, passive: int) -> Tensor:
    torch._check(
        h.shape[1] == x.shape[1] - passive, lambda: f"h: expected {x.shape[1] - passive} channels, got {h.shape[1]}"
    )
    return torch.empty_like(x)


def additive_coupling_bwd_fake(
    out: Tensor, h: Tensor, grad_out: Tensor, passive: int, reverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(
        grad_out.shape == out.shape, lambda: f"grad_out: expected {tuple(out.shape)}, got {tuple(grad_out.shape)}"
    )
    return torch.empty_like(out), torch.empty_like(out), torch.empty_like(h)


@on_extension_load
def _register_fakes() -> None:
    """The C++ ops are declared by ``flowkernels._C``, so their fakes can only be registered once it loads."""
    torch.library.register_fake("flowkernels::additive_coupling_fwd")(additive_coupling_fwd_fake)
    torch.library.register_fake("flowkernels::additive_coupling_inv")(additive_coupling_fwd_fake)
    torch.library.register_fake("flowkernels::additive_coupling_bwd")(additive_coupling_bwd_fake)
