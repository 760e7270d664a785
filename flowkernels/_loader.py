"""Loading the optional backends: the compiled extension ``flowkernels._C`` and triton.

Nothing is imported at ``import flowkernels`` (STYLE rule 1): each backend is imported on first
use and the result, a module or the reason it is unusable, is cached. Modules that need to act
once the extension exists (the op modules register the fakes of its C++ ops) subscribe with
:func:`on_extension_load`; the op package names its Triton kernel modules with
:func:`register_triton_kernels`. This module knows no op and imports only torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

__all__ = [
    "BackendImportError",
    "extension_reason",
    "load_extension",
    "load_triton_kernels",
    "on_extension_load",
    "register_triton_kernels",
    "triton_reason",
]


class BackendImportError(ImportError):
    """A backend (the extension, triton, a Triton kernel module) cannot be imported; says why."""


# Import results, filled on first (eager) use. Under torch.compile nothing is imported (Dynamo
# cannot trace importlib), so a backend must have been used or loaded once before compiling.
_loaded: dict[str, ModuleType | str] = {}
_extension_hooks: list[Callable[[], None]] = []
_triton_kernels: list[str] = []  # module names, see register_triton_kernels
_TRITON_BACKEND = "triton"  # _loaded key: triton, once it and every kernel module imported
_NOT_LOADED = (
    "{what} was not loaded before torch.compile: run the model once eagerly (e.g. a first training "
    "step) or call flowkernels._loader.{call}"
)


def on_extension_load(hook: Callable[[], None]) -> Callable[[], None]:
    """Decorator: run ``hook`` once ``flowkernels._C`` has been imported (at once if it already has)."""
    _extension_hooks.append(hook)
    if isinstance(_loaded.get("_C"), ModuleType):
        hook()
    return hook


def _extension() -> ModuleType | str:
    """``flowkernels._C`` (importing it once and running the hooks) or why it is unusable."""
    if "_C" not in _loaded:
        if torch.compiler.is_compiling():
            return _NOT_LOADED.format(what="flowkernels._C", call="load_extension()")
        try:
            module: ModuleType | str = importlib.import_module("flowkernels._C")
        except ImportError as exc:
            module = (
                f"the compiled extension flowkernels._C is not built ({exc}); build it with "
                "`pip install --no-build-isolation -e .` from the repository root"
            )
        _loaded["_C"] = module
        if isinstance(module, ModuleType):
            _run_hooks()
    return _loaded["_C"]


def _run_hooks() -> None:
    """Run every on-load hook, then raise the first error: one hook's failure (a bad setting)
    must not leave the ops of the others unregistered."""
    errors = []
    for hook in _extension_hooks:
        try:
            hook()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other hooks
            errors.append(exc)
    if errors:
        raise errors[0]


def extension_reason() -> str | None:
    """Why ``flowkernels._C`` cannot be used (not built, or not loaded before compiling); None if it can."""
    found = _extension()
    return found if isinstance(found, str) else None


def load_extension() -> ModuleType:
    """Import ``flowkernels._C`` once (its ops register) and run the on-load hooks; raise
    :class:`BackendImportError` saying why if it is unusable."""
    found = _extension()
    if isinstance(found, str):
        raise BackendImportError(found)
    return found


def triton_reason() -> str | None:
    """Why the Triton backend cannot be used (triton not installed, a registered kernel module
    failing to import, or neither loaded before compiling); None if it can. The first call
    imports triton and every registered kernel module (registering the ``*_triton`` ops), so
    that a kernel module that cannot be imported is a reason for "auto" to pass over, not an
    ImportError at the first kernel call."""
    if _TRITON_BACKEND not in _loaded:
        if torch.compiler.is_compiling():
            return _NOT_LOADED.format(what="triton", call="load_triton_kernels()")
        _loaded[_TRITON_BACKEND] = _import_triton_backend()
    found = _loaded[_TRITON_BACKEND]
    return found if isinstance(found, str) else None


def _import_triton_backend() -> ModuleType | str:
    """triton, once it and every registered kernel module are imported; or why they cannot be."""
    try:
        triton = importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not installed ({exc}); `pip install triton`"
    for module in _triton_kernels:
        try:
            importlib.import_module(module)
        except ImportError as exc:  # e.g. a triton release these kernels do not support
            return f"the Triton kernels failed to import: {module}: {type(exc).__name__}: {exc}"
    return triton


def register_triton_kernels(*modules: str) -> None:
    """Name Triton kernel modules for :func:`triton_reason` to load (``flowkernels.ops``
    registers its own when imported, which ``import flowkernels`` does)."""
    new = [m for m in modules if m not in _triton_kernels]
    if new:
        _triton_kernels.extend(new)
        _loaded.pop(_TRITON_BACKEND, None)  # loaded without them: load again on next use


def load_triton_kernels() -> None:
    """Import triton and every registered Triton kernel module (registering all the ``*_triton``
    ops), as a compiled graph that uses them needs done before tracing; raise
    :class:`BackendImportError` saying why if the Triton backend cannot be loaded."""
    reason = triton_reason()
    if reason is not None:
        raise BackendImportError(reason)
