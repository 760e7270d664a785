"""Measure the activation memory that autograd keeps, the quantity memory saving removes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["saved_tensor_bytes"]

T = TypeVar("T")


def saved_tensor_bytes(fn: Callable[[], T], exclude: Iterable[Tensor] = ()) -> tuple[T, int]:
    """Run ``fn`` and count the bytes of the distinct storages autograd saves for backward.

    Storages shared by several saved tensors count once; those of ``exclude`` (typically the
    model's parameters, which exist anyway) do not count. Deterministic on any device, unlike
    peak memory, but it leaves out transient buffers. Returns (fn's result, bytes).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())
