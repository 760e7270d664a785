"""Backend selection: ``"cuda" | "triton" | "reference" | "auto"``.

* ``"reference"``: pure PyTorch (``flowkernels.reference``), any device and float dtype.
* ``"triton"``: the Triton kernels in ``flowkernels/ops``; CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
* ``"cuda"``: the compiled extension ``flowkernels._C``: its CUDA kernels for CUDA tensors and
  its C++ kernels for CPU tensors.
* ``"auto"``: the first backend in :data:`AUTO_PRIORITY` for the tensors' device that has no
  reason to refuse them (xformers-style dispatch). The order is the measured speed order
  (benchmarks/results/); the reference is last and never refuses.

The default backend is the only mutable global: :func:`set_backend`, :func:`use_backend`, and
the environment variable ``FLOWKERNELS_BACKEND`` (read once, at import). A backend named
explicitly that cannot take an input raises :class:`BackendUnavailableError` listing every
reason; nothing falls back silently.

This module is policy only: importing backends lives in :mod:`flowkernels._loader`, the layout
rule in :mod:`flowkernels._layout`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from ._layout import layout_reason
from ._loader import extension_reason, load_extension, triton_reason

__all__ = [
    "BACKENDS",
    "AUTO_PRIORITY",
    "BackendUnavailableError",
    "get_backend",
    "set_backend",
    "use_backend",
    "validate_backend",
    "select_backend",
    "refusals",
    "check_backend_available",
]

BACKENDS = ("cuda", "triton", "reference")
# Fastest measured first, per device type. On CPU the Triton interpreter is a test tool, never
# an automatic choice.
AUTO_PRIORITY: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cuda", "reference"),
}
_FLOW_DTYPES = (torch.float32,)
_SUBNET_DTYPES = (torch.float32, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """A backend named explicitly cannot take the given inputs; the message says why."""


def validate_backend(name: str | None, *, allow_none: bool = False) -> str | None:
    """Return ``name`` if it is a backend name or ``"auto"`` (or None where ``allow_none``: "follow
    the global default"); otherwise raise ValueError naming the allowed values."""
    if name is None and allow_none:
        return None
    if name != "auto" and name not in BACKENDS:
        none = " or None (the global default)" if allow_none else ""
        raise ValueError(f"backend: expected one of {BACKENDS + ('auto',)}{none}, got {name!r}")
    return name


_default_backend = validate_backend(os.environ.get("FLOWKERNELS_BACKEND", "auto"))


def get_backend() -> str:
    """The default backend used where a module or call passes ``backend=None``."""
    return _default_backend


def set_backend(name: str) -> None:
    """Set the default backend: ``"cuda"``, ``"triton"``, ``"reference"`` or ``"auto"``."""
    global _default_backend
    _default_backend = validate_backend(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that sets the default backend and restores the previous one on exit."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def refusals(backend: str, x: Tensor, h: Tensor | None = None) -> list[str]:
    """Why ``backend`` cannot take flow state ``x`` (and subnet output ``h``); empty means it can."""
    if backend == "reference":
        return []
    why: list[str] = []
    if backend == "triton":
        reason = triton_reason()
        if reason is not None:
            why.append(reason)
        if x.device.type != "cuda" and not _interpreting():
            why.append(f"x is on {x.device}; the Triton kernels need CUDA or TRITON_INTERPRET=1")
    elif backend == "cuda":
        reason = extension_reason()
        if reason is not None:
            why.append(reason)
        elif x.device.type == "cuda" and not load_extension().with_cuda:
            why.append("flowkernels._C was built without CUDA (no nvcc or a CPU build of torch at build time)")
        if x.device.type not in ("cpu", "cuda"):
            why.append(f"x is on {x.device}; the extension has CPU and CUDA kernels only")
    if x.dtype not in _FLOW_DTYPES:
        why.append(f"x has dtype {x.dtype}; the flow state must be torch.float32")
    reason = layout_reason("x", x)
    if reason is not None:
        why.append(reason)
    if h is not None:
        if h.dtype not in _SUBNET_DTYPES:
            why.append(f"h has dtype {h.dtype}; subnet outputs must be float32 or bfloat16")
        if h.device != x.device:
            why.append(f"h is on {h.device} but x is on {x.device}")
        reason = layout_reason("h", h)
        if reason is not None:
            why.append(reason)
    return why


def check_backend_available(backend: str | None, device: torch.device | str) -> None:
    """Raise :class:`BackendUnavailableError` now, naming every reason, if ``backend`` cannot run
    float32 flow state on ``device`` (a preflight for applications: check before writing output
    files, not at the first forward). ``"auto"`` and None always have a backend (the reference).

    It also loads what the backend needs (the extension; triton and its kernel modules), which
    ``torch.compile`` cannot do while tracing: call it before compiling a model, so that ``"auto"``
    picks in a compiled graph what it picks eagerly."""
    name = validate_backend(backend, allow_none=True)
    probe = torch.empty(1, 2, 1, 1, device=device)
    if name in (None, "auto"):
        if name is None and get_backend() != "auto":
            return check_backend_available(get_backend(), device)
        select_backend("auto", probe)  # loads what "auto" picks here (at worst the reference: nothing)
        return None
    why = refusals(name, probe)
    if why:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: " + "; ".join(why))


def _describe(x: Tensor, h: Tensor | None) -> str:
    def one(name: str, t: Tensor) -> str:
        return f"{name}: shape {tuple(t.shape)}, dtype {t.dtype}, strides {tuple(t.stride())}, device {t.device}"

    return "; ".join([one("x", x)] + ([one("h", h)] if h is not None else []))


def select_backend(requested: str | None, x: Tensor, h: Tensor | None = None) -> str:
    """Resolve ``requested`` (None means the default) to a concrete backend for these inputs.

    ``"auto"`` walks :data:`AUTO_PRIORITY` for ``x.device.type`` and takes the first backend
    without refusals. A named backend that refuses raises :class:`BackendUnavailableError`.
    """
    name = validate_backend(requested if requested is not None else get_backend())
    if name == "auto":
        for candidate in AUTO_PRIORITY.get(x.device.type, ("reference",)):
            if not refusals(candidate, x, h):
                return candidate
        return "reference"
    why = refusals(name, x, h)
    if why:
        reasons = "\n".join(f"  - {r}" for r in why)
        raise BackendUnavailableError(f"backend {name!r} cannot take {_describe(x, h)}:\n{reasons}")
    return name
