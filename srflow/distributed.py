"""Which process this is in a training run: rank, world size and device, under ``torchrun`` or alone.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is NCCL on GPUs and gloo on CPUs, and
rank ``r`` uses ``cuda:LOCAL_RANK``; a group that already exists (a caller's) is used as it is
and left open. One process (no ``WORLD_SIZE``) needs no group. The device is checked before the
group is joined (and so before a run writes anything): a malformed name, CUDA asked for where
there is none, or a GPU index past the last GPU raise ConfigError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError, resolve_device

__all__ = ["Distributed", "setup_distributed"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this process created the process group, so it destroys it in close()

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, validates and writes checkpoints."""
        return self.rank == 0

    def close(self) -> None:
        """Destroy the process group if this process created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: str | None) -> Distributed:
    """Join (or create) the process group that ``torchrun`` describes in the environment.

    ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (one process), or None for CUDA when available;
    under torchrun only whether it is CUDA counts (each rank takes ``cuda:LOCAL_RANK``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    requested = _checked_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world == 1:
        return Distributed(0, 1, requested, False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = requested.type == "cuda"
    chosen = _checked_device(f"cuda:{local}", f" (LOCAL_RANK {local} under torchrun)") if use_cuda else requested
    if use_cuda:
        torch.cuda.set_device(chosen)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.get_world_size() != world:
        raise ConfigError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return Distributed(dist.get_rank(), world, chosen, owns)


def _checked_device(name: str, why: str = "") -> torch.device:
    """``name`` as a torch.device if training can run there (cpu, or an existing CUDA GPU); the
    check is :func:`srflow.config.resolve_device`'s, raised as ConfigError with ``why`` the
    device was chosen."""
    try:
        return resolve_device(name, f"device{why}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
