"""Training checkpoints: model weights in safetensors plus the training state, written atomically.

A checkpoint of step ``S`` is two files in ``<out>/checkpoints/``:

* ``step-{S:09d}.safetensors``: the model's state_dict (official key layout, so
  :meth:`SRFlow.from_official` and ``srflow sample --checkpoint`` read it; in the RRDB stage the
  RRDBNet's, which ``--rrdb-weights`` reads), with safetensors metadata ``{"srflow":
  "training-checkpoint", "preset": name, "stage": "srflow" or "rrdb", "step": "S", "format_version": "1"}``
  (no stage: srflow, as written before the RRDB stage existed).
* ``step-{S:09d}.state.pt``: ``torch.save`` of plain containers of tensors/numbers/strings, so it
  loads with ``torch.load(weights_only=True)``: format_version, step, preset, the weights file's
  name and SHA-256, the optimiser state_dict, the global RNG states (CPU and CUDA), counters and
  the run's configuration (as a dict, for comparison on resume).

Writing: each file goes to a temporary file in the same folder, is flushed and fsynced, and is
moved into place with ``os.replace`` (atomic on POSIX): the weights first, the state last. The
state file is the commit marker: a checkpoint is *complete* when its state file exists and names
a weights file that exists; a crash leaves at worst an orphan weights file or a ``.tmp-`` file,
which are ignored. Existing checkpoint files are never overwritten (CheckpointError).
Only :func:`prune_checkpoints` deletes, and only complete checkpoints older than the newest N.

Reading (:func:`load_training_checkpoint`): the state file, then the weights file, whose SHA-256
must match the one the state recorded; any failure raises :class:`CheckpointError` naming the file.
:func:`newest_intact_checkpoint` finds the newest older checkpoint that passes these checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .official_checkpoint import CheckpointError, as_state_dict, read_state_dict, strip_prefix

__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT_VERSION",
    "CheckpointFiles",
    "TrainingCheckpoint",
    "atomic_write",
    "checkpoint_files",
    "list_checkpoints",
    "latest_checkpoint",
    "newest_intact_checkpoint",
    "resolve_checkpoint",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "read_weights",
    "read_rrdb_weights",
    "prune_checkpoints",
]

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
_KIND = "training-checkpoint"
_NAME = re.compile(r"^step-(\d{9})\.state\.pt$")
_REQUIRED_STATE_KEYS = ("format_version", "step", "preset", "weights_file", "weights_sha256", "optimizer")


@dataclass(frozen=True)
class CheckpointFiles:
    """The two files of one checkpoint."""

    step: int
    weights: Path
    state: Path


@dataclass(frozen=True)
class TrainingCheckpoint:
    """A verified checkpoint: ``weights`` (state_dict on the CPU) and ``state`` (the dict above)."""

    files: CheckpointFiles
    weights: dict[str, Tensor]
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _reason(exc: BaseException) -> str:
    """``Type: first line of the message`` (library messages can run over many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:300]}"


def checkpoint_files(folder: str | os.PathLike, step: int) -> CheckpointFiles:
    """The paths of step ``step``'s checkpoint in ``folder`` (which may not exist)."""
    folder = Path(folder)
    return CheckpointFiles(step, folder / f"step-{step:09d}.safetensors", folder / f"step-{step:09d}.state.pt")


def list_checkpoints(folder: str | os.PathLike) -> list[CheckpointFiles]:
    """The complete checkpoints in ``folder`` (state file and weights file present), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            files = checkpoint_files(folder, int(match.group(1)))
            if files.weights.is_file():
                found.append(files)
    return sorted(found, key=lambda f: f.step)


def latest_checkpoint(folder: str | os.PathLike) -> CheckpointFiles | None:
    """The newest complete checkpoint in ``folder``, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> CheckpointFiles:
    """A checkpoint from a path: a ``.safetensors`` or ``.state.pt`` file of a training checkpoint,
    a run folder (its ``checkpoints/`` subfolder) or a checkpoints folder (the newest complete one)."""
    path = Path(path)
    if path.is_dir():
        folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        latest = latest_checkpoint(folder)
        if latest is None:
            raise FileNotFoundError(f"checkpoint: no complete training checkpoint (step-*.state.pt) in {str(folder)!r}")
        return latest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: no such file {str(path)!r}")
    name = path.name
    if name.endswith(".state.pt"):
        stem = name[: -len(".state.pt")]
    elif name.endswith(".safetensors"):
        stem = name[: -len(".safetensors")]
    else:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: expected a training checkpoint (step-N.safetensors or step-N.state.pt) "
            "or a run folder; an official .pth is loaded as an official checkpoint instead"
        )
    match = re.match(r"^step-(\d+)$", stem)
    step = int(match.group(1)) if match else -1
    return CheckpointFiles(step, path.with_name(stem + ".safetensors"), path.with_name(stem + ".state.pt"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = True) -> None:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file in the same folder, which
    is fsynced and then moved into place with ``os.replace``. The temporary file is removed on
    failure. With ``overwrite=False`` an existing ``path`` raises CheckpointError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise CheckpointError(f"{str(path)!r} already exists; checkpoints are never overwritten")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if not overwrite and path.exists():
            raise CheckpointError(f"{str(path)!r} already exists; checkpoints are never overwritten")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not supported everywhere)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_training_checkpoint(
    folder: str | os.PathLike,
    step: int,
    preset: str,
    model_state: Mapping[str, Tensor],
    state: dict,
    stage: str = "srflow",
) -> CheckpointFiles:
    """Write step ``step``'s checkpoint into ``folder`` (weights first, then the state file).

    ``model_state``: the model's state_dict (moved to the CPU and made contiguous here);
    ``state``: optimiser state and the rest (must hold ``optimizer``); the common fields
    (format_version, step, preset, weights file and hash) are added here. Raises CheckpointError
    if either file exists already, or ValueError if a weight is not finite (nothing is written).
    """
    from safetensors.torch import save_file  # noqa: PLC0415 (optional dependency of srflow training)

    files = checkpoint_files(folder, step)
    for path in (files.weights, files.state):
        if path.exists():
            raise CheckpointError(f"{str(path)!r} already exists; checkpoints are never overwritten")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"refusing to save a checkpoint with non-finite weights ({len(bad)} tensors, e.g. {bad[0]})")
    metadata = {
        "srflow": _KIND,
        "preset": preset,
        "stage": stage,
        "step": str(step),
        "format_version": str(FORMAT_VERSION),
    }
    atomic_write(files.weights, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=False)
    full = dict(state)
    full.update(
        format_version=FORMAT_VERSION,
        step=int(step),
        preset=preset,
        stage=stage,
        weights_file=files.weights.name,
        weights_sha256=_sha256(files.weights),
    )
    atomic_write(files.state, lambda tmp: torch.save(full, tmp), overwrite=False)
    return files


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state_dict, safetensors metadata) of a ``.safetensors`` weights file, on the CPU."""
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ValueError...
        raise CheckpointError(
            f"checkpoint {str(path)!r}: could not be read as safetensors ({_reason(exc)}); "
            "the file is truncated or corrupt"
        ) from exc
    return strip_prefix(as_state_dict(tensors, f"checkpoint {str(path)!r}")), metadata


def read_rrdb_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], str | None]:
    """An RRDB state_dict (keys as in :class:`~srflow.rrdb.RRDBNet`) and the preset its metadata
    names (None if it has none) from ``path``: a run folder or checkpoint of the RRDB stage (a folder:
    its newest checkpoint), or a state_dict file (``.pth`` / ``.safetensors``, e.g. the official
    ``RRDB_DF2K_4X.pth``); ``module.`` and ``RRDB.`` prefixes are stripped when every key has them."""
    p = Path(path)
    preset = None
    if p.is_dir() or p.name.endswith(".state.pt") or (p.suffix == ".safetensors" and p.is_file()):
        files = resolve_checkpoint(p) if p.is_dir() or p.name.endswith(".state.pt") else None
        state, metadata = read_weights(files.weights if files is not None else p)
        preset = metadata.get("preset")
    else:
        state = strip_prefix(read_state_dict(p))
    if state and all(k.startswith("RRDB.") for k in state):
        state = strip_prefix(state, "RRDB.")
    return state, preset


def load_training_checkpoint(
    files: CheckpointFiles, preset: str | None = None, stage: str | None = None
) -> TrainingCheckpoint:
    """Read and verify a checkpoint (state file, then weights and their hash; preset and stage if given).

    Raises FileNotFoundError for a missing file and CheckpointError (naming the file) for an
    unreadable, truncated or mismatched one. Nothing is written.
    """
    if not files.state.is_file():
        raise FileNotFoundError(
            f"checkpoint: no training state {str(files.state)!r} next to {str(files.weights)!r} "
            "(a weights file alone cannot resume a run; it can start one as init_official, or be sampled from)"
        )
    try:
        state = torch.load(files.state, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(
            f"checkpoint {str(files.state)!r}: could not be read ({_reason(exc)}); the file is truncated or corrupt"
        ) from exc
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED_STATE_KEYS):
        missing = [k for k in _REQUIRED_STATE_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"checkpoint {str(files.state)!r}: not an srflow training state (missing {missing})")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(files.state)!r}: format version {state['format_version']}, "
            f"this srflow reads {FORMAT_VERSION}"
        )
    if preset is not None and state["preset"] != preset:
        raise CheckpointError(
            f"checkpoint {str(files.state)!r} was trained with preset {state['preset']!r}, but this run uses {preset!r}"
        )
    saved_stage = state.get("stage", "srflow")
    if stage is not None and saved_stage != stage:
        raise CheckpointError(
            f"checkpoint {str(files.state)!r} is of the {saved_stage} training stage, but this run trains {stage}"
        )
    weights_path = files.state.with_name(state["weights_file"])
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"checkpoint: weights file {str(weights_path)!r} named by {str(files.state)!r} is missing"
        )
    if _sha256(weights_path) != state["weights_sha256"]:
        raise CheckpointError(
            f"checkpoint {str(weights_path)!r}: its SHA-256 does not match the one recorded in "
            f"{str(files.state)!r}; the weights file is corrupt or was replaced"
        )
    weights, metadata = read_weights(weights_path)
    if metadata.get("preset", state["preset"]) != state["preset"]:
        raise CheckpointError(
            f"checkpoint {str(weights_path)!r}: metadata preset {metadata.get('preset')!r} differs from "
            f"the training state's {state['preset']!r}"
        )
    return TrainingCheckpoint(CheckpointFiles(int(state["step"]), weights_path, files.state), weights, state)


def newest_intact_checkpoint(
    folder: str | os.PathLike, before: int, preset: str | None = None, stage: str | None = None
) -> CheckpointFiles | None:
    """The newest complete checkpoint in ``folder`` older than step ``before`` that
    :func:`load_training_checkpoint` reads and verifies (with ``preset`` and ``stage`` if given), or None:
    where a run can continue when its newest checkpoint is damaged. Reads each candidate whole,
    newest first, until one passes."""
    for files in reversed(list_checkpoints(folder)):
        if files.step >= before:
            continue
        try:
            load_training_checkpoint(files, preset, stage)
        except (CheckpointError, FileNotFoundError):
            continue
        return files
    return None


def prune_checkpoints(folder: str | os.PathLike, keep_last: int) -> list[CheckpointFiles]:
    """Delete all but the newest ``keep_last`` complete checkpoints in ``folder`` (state file
    first, so a half-deleted checkpoint counts as incomplete). Returns what was deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last: expected a positive integer, got {keep_last}")
    old = list_checkpoints(folder)[:-keep_last]
    for files in old:
        for path in (files.state, files.weights):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return old
