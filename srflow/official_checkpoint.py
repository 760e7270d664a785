"""Reading official SRFlow checkpoints (``SRFlow_DF2K_4X.pth`` ...) and checking them against a model.

Official ``.pth`` files are plain state_dicts saved from ``netG.module``; a ``module.`` prefix
(a checkpoint saved from a DataParallel wrapper) is stripped. Files are opened read-only with
``torch.load(weights_only=True)`` (no pickled code runs); ``.safetensors`` files are read with
safetensors. Nothing is ever written back. The same readers serve any plain state_dict file
(pretrained RRDB weights, ``init_official``); the training run's own checkpoints are
:mod:`srflow.training_checkpoint`, which raises the same :class:`CheckpointError`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .presets import PRESETS

__all__ = ["CheckpointError", "read_state_dict", "strip_prefix", "check_state_dict"]

_MAX_LISTED = 3  # keys listed per kind of mismatch: they are long


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not match the model (missing/unexpected keys, shapes)."""


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a state_dict from ``path`` (``.pth``/``.pt`` via torch.load with weights_only=True,
    ``.safetensors`` via safetensors) onto the CPU. The file is only read."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; expected a state_dict file (.pth, .safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError...)
        raise CheckpointError(
            f"checkpoint {str(path)!r}: could not be read as a PyTorch state_dict ({type(exc).__name__}: {exc})"
        ) from exc
    return as_state_dict(obj, str(path))


def as_state_dict(obj: object, source: str = "state_dict") -> dict[str, Tensor]:
    """Validate that ``obj`` is a mapping of str to tensors and return it as a dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state_dict (a mapping of parameter names to tensors), got {type(obj).__name__}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{source}: expected a state_dict of tensors; {len(bad)} entries are not str -> Tensor, "
            f"e.g. {_listing(bad)}"
        )
    return dict(obj)


def strip_prefix(state_dict: dict[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Remove ``prefix`` from every key that has it (DataParallel/DDP checkpoints)."""
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str, preset_name: str) -> None:
    """Raise :class:`CheckpointError` counting the missing keys, unexpected keys and wrong shapes
    (the first few of each named); it leads with the preset the state_dict fits, if another one."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} keys with the wrong shape: {_listing(wrong)}")
    if problems:
        fits = _fitting_preset(state_dict)
        lead = f"is a {fits} checkpoint, not {preset_name}" if fits else f"does not match SRFlow preset {preset_name!r}"
        raise CheckpointError(
            f"{source} {lead} ({len(state_dict)} keys in the checkpoint, {len(expected)} in the model): "
            + "; ".join(problems)
        )


@functools.cache
def _preset_shapes(name: str) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Key -> shape of a whole SRFlow of preset ``name`` and of its RRDB alone (built on the meta
    device: no memory, no initialisation, the global RNG untouched)."""
    from .model import SRFlow  # noqa: PLC0415 (the model imports this module)

    with torch.device("meta"):
        model = SRFlow.from_preset(name, seed=0)
    whole = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return whole, {k: tuple(v.shape) for k, v in model.RRDB.state_dict().items()}


def _fitting_preset(state_dict: Mapping[str, Tensor]) -> str | None:
    """ "<preset> model" or "<preset> RRDB" if a preset's model or RRDB has exactly the keys and
    shapes of ``state_dict``."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for name in PRESETS:
        for part, expected in zip(("model", "RRDB"), _preset_shapes(name)):
            if shapes == expected:
                return f"{name} {part}"
    return None
