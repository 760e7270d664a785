"""Memoised structure: what a layer derives from its submodules and parameters alone.

A layer answers the same structural questions on every call: its coupling stages, its foldable
convolutions, the parameters it trains. The memory-saving unit asks every step of a sequence for
them in forward and backward, a few thousand ``nn.Module`` attribute lookups per SRFlow training
step: a fifth of its host time (``python -m benchmarks.bench_host --narrow``). A method decorated
with :func:`structural` is evaluated once and reused while the structure is unchanged.

"Unchanged" is tracked by one process-wide *epoch*, and every memo belongs to one epoch:

* torch's global registration hooks start a new epoch whenever any module registers a submodule
  or a parameter (``module.conv = ...``, ``module.weight = nn.Parameter(...)``, ``add_module``,
  ``load_state_dict(assign=True)``);
* writes that bypass registration (``torch.func.functional_call``, ``Module.to`` under
  ``torch.__future__.set_overwrite_module_params_on_conversion``) are caught by
  :func:`check_structure`, which every layer call runs on its own tree: it compares each
  module's parameters and submodules, by identity, with those seen at the last call, and starts
  a new epoch on any difference.

Memoised values may only hold the module's own parameters and submodules (references, never
tensors computed from them) and attributes fixed at construction; ``requires_grad`` is not
structure (:func:`all_parameters` lists every parameter, callers filter). Under torch.compile
nothing is memoised or checked (Dynamo traces the plain computation and guards on it itself).
"""

from __future__ import annotations

import functools
import itertools
import operator
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = ["all_parameters", "check_structure", "structural"]

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


class _Epoch:
    value = 0


def _new_epoch(*_args: object) -> None:
    _Epoch.value += 1


nn.modules.module.register_module_module_registration_hook(_new_epoch)
nn.modules.module.register_module_parameter_registration_hook(_new_epoch)

# module -> {method qualname: (epoch, value)}; weak, so that a memo never outlives its module (the
# values must not reference the module itself), and per object, so that copies sharing a
# ``__dict__`` (DataParallel's replicas) never share memos
_memos: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[int, object]]] = weakref.WeakKeyDictionary()


def structural(method: Callable[[M], T]) -> Callable[[M], T]:
    """Memoise a method without arguments whose result depends on the module's structure only
    (see the module docstring). The value is shared: callers must not modify it (return tuples)."""
    key = method.__qualname__

    @functools.wraps(method)
    def memoised(self: M) -> T:
        if torch.compiler.is_compiling():
            return method(self)
        memo = _memos.get(self)
        if memo is None:
            memo = _memos[self] = {}
        hit = memo.get(key)
        if hit is not None and hit[0] == _Epoch.value:
            return hit[1]  # type: ignore[return-value]
        value = method(self)
        memo[key] = (_Epoch.value, value)
        return value

    return memoised


@structural
def all_parameters(module: nn.Module) -> tuple[Tensor, ...]:
    """``tuple(module.parameters())``, memoised (:func:`structural`)."""
    return tuple(module.parameters())


_parameter_dict = operator.attrgetter("_parameters")
_module_dict = operator.attrgetter("_modules")
_values = operator.methodcaller("values")  # not dict.values: a TorchScript module's dicts are wrappers


def _held(modules: tuple[nn.Module, ...]) -> tuple[list[object], list[int]]:
    """Every parameter and submodule the ``modules`` hold, in order, and how many each dict holds
    (so that an object moved from one module to the next shows). C-level iteration: the ~1,000
    modules of an SRFlow flow are read in ~0.3 ms."""
    dicts = list(itertools.chain(map(_parameter_dict, modules), map(_module_dict, modules)))
    return list(itertools.chain.from_iterable(map(_values, dicts))), list(map(len, dicts))


def check_structure(root: nn.Module) -> None:
    """Start a new epoch if any module of ``root``'s tree holds other parameters or submodules
    than at the last check (a write that bypassed registration); cheap when nothing changed: one
    identity comparison per parameter and submodule of the tree."""
    if torch.compiler.is_compiling():
        return
    seen = root.__dict__.get("_structure_seen")
    # seen[1] is the root: a copy of a module's __dict__ (DataParallel's replicas) compares anew
    if seen is not None and seen[0] == _Epoch.value and seen[1] is root:
        (held, counts), (was_held, was_counts) = _held(seen[2]), seen[3]
        # against the objects of the last check, kept alive there
        if counts == was_counts and all(map(operator.is_, held, was_held)):
            return
        _new_epoch()
    modules = tuple(root.modules())
    # on the root itself (replaced, never mutated: a copy of its __dict__ keeps the old one)
    root.__dict__["_structure_seen"] = (_Epoch.value, root, modules, _held(modules))
