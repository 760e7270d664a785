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
    "load_triton",
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
    """Why triton cannot be used (not installed, or not loaded before compiling); None if it can."""
    if "triton" not in _loaded:
        if torch.compiler.is_compiling():
            return _NOT_LOADED.format(what="triton", call="load_triton_kernels()")
        try:
            _loaded["triton"] = importlib.import_module("triton")
        except ImportError as exc:
            _loaded["triton"] = f"triton is not installed ({exc}); `pip install triton`"
    found = _loaded["triton"]
    return found if isinstance(found, str) else None


def load_triton(module: str) -> ModuleType:
    """Import the Triton kernel module ``module`` (a full dotted name; importing it registers its
    ``*_triton`` ops) once; raise :class:`BackendImportError` saying why if it cannot be."""
    if module not in _loaded:
        reason = triton_reason()
        if reason is None and torch.compiler.is_compiling():
            reason = _NOT_LOADED.format(what=module, call="load_triton_kernels()")
        if reason is not None:
            raise BackendImportError(reason)
        _loaded[module] = importlib.import_module(module)
    return _loaded[module]


def register_triton_kernels(*modules: str) -> None:
    """Name Triton kernel modules for :func:`load_triton_kernels` (``flowkernels.ops`` registers
    its own when imported, which ``import flowkernels`` does)."""
    _triton_kernels.extend(m for m in modules if m not in _triton_kernels)


def load_triton_kernels() -> None:
    """Import every registered Triton kernel module (registering all the ``*_triton`` ops), as a
    compiled graph that uses them needs done before tracing; raise :class:`BackendImportError`
    if triton cannot be loaded."""
    for module in _triton_kernels:
        load_triton(module)
