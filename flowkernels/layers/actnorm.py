"""ActNorm with data-dependent initialisation (Glow; SRFlow's parametrisation).

``y = (x + bias) * exp(logs)`` per channel, ``bias`` and ``logs`` of shape (1, C, 1, 1) as in the
official state_dicts. Initialisation (DESIGN.md section 3): once, from the first training batch,
``bias = -mean(x)``, ``logs = -log(std(x) + 1e-6)`` over (N, H, W), all-reduced across ranks
under torch.distributed so every rank starts identical. It runs in an explicit plain forward
(:func:`initialize_actnorms`), never inside a forward of the memory-saving unit or a recompute,
and not in eval mode.

The ``initialized`` flag is a Python bool, not a tensor: checking a device tensor would cost a
host sync per layer and step, and a buffer would add keys to the official state_dict layout.
It is restored whenever a state_dict is loaded, by the official rule: a loaded ActNorm is
initialised unless its bias and logs are all zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import reference
from .base import InvertibleModule, check_flow_input, flow_precision, in_plain_mode, plain_forward

__all__ = ["ActNorm", "ActNorm2d", "initialize_actnorms", "maybe_initialize"]

_STD_EPS = 1e-6  # official: logs = log(1 / (std + 1e-6))


def _all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ActNorm(nn.Module):
    """ActNorm as used inside subnets: ``forward(x) -> (x + bias) * exp(logs)``, no log-det."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.initialized = False

    def extra_repr(self) -> str:
        return f"{self.channels}, initialized={self.initialized}"

    def forward(self, x: Tensor) -> Tensor:
        return reference.actnorm_fwd(x, self.logs, self.bias)[0]

    @torch.no_grad()
    def initialize_(self, x: Tensor) -> None:
        """Set bias and logs from the statistics of ``x`` (B, C, H, W) and mark initialised.

        Under torch.distributed the sums are all-reduced, so the statistics are those of the
        global batch. Two passes (mean, then centred second moment) for accuracy.
        """
        x = x.detach().float()
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        total = _all_reduce_sum(torch.cat([x.sum(dim=(0, 2, 3)), count[None]]))
        mean = total[:-1] / total[-1]
        sq = _all_reduce_sum(((x - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)))
        std = torch.sqrt(sq / total[-1])
        self.bias.copy_(-mean.view_as(self.bias))
        self.logs.copy_(-torch.log(std + _STD_EPS).view_as(self.logs))
        self.initialized = True

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: ANN001
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "bias" in state_dict and prefix + "logs" in state_dict:
            loaded = bool(state_dict[prefix + "bias"].any()) or bool(state_dict[prefix + "logs"].any())
            self.initialized = loaded


class ActNorm2d(ActNorm, InvertibleModule):
    """Invertible ActNorm layer: ``y = (x + bias) * exp(logs)``, log-det ``H*W*sum(logs)``.

    Args:
        channels: C. Parameters ``bias``, ``logs``: (1, C, 1, 1), zero until initialised.
    """

    def forward(self, x: Tensor, cond: Tensor | None = None, logdet: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return InvertibleModule.forward(self, x, cond, logdet)

    def _check_input(self, x: Tensor, cond: Tensor | None) -> None:
        check_flow_input(x, self.channels)

    def _run(self, x: Tensor, cond: Tensor | None, logdet: Tensor, reverse: bool) -> Tensor:
        fn = reference.actnorm_inv if reverse else reference.actnorm_fwd
        with flow_precision(x):
            y, dlogdet = fn(x, self.logs, self.bias)
        logdet.add_(dlogdet)
        return y


def _uninitialized(module: nn.Module) -> list[ActNorm]:
    return [m for m in module.modules() if isinstance(m, ActNorm) and not m.initialized]


@contextlib.contextmanager
def _init_hooks(targets: list[ActNorm]) -> Iterator[None]:
    def hook(mod: nn.Module, args: tuple) -> None:
        if isinstance(mod, ActNorm) and not mod.initialized:
            mod.initialize_(args[0])

    handles = [m.register_forward_pre_hook(hook) for m in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def initialize_actnorms(module: nn.Module, run: Callable[[], object]) -> int:
    """Data-dependent init of every uninitialised ActNorm in ``module`` from one plain forward.

    ``run`` performs the forward (e.g. ``lambda: flow(x, cond)``); each ActNorm is initialised
    from its own input just before it first runs, in network order, with layers unfused.
    Returns how many ActNorms were initialised.
    """
    targets = _uninitialized(module)
    if targets:
        with _init_hooks(targets), plain_forward():
            run()
    return len(targets)


def maybe_initialize(module: nn.Module, x: Tensor, cond: Tensor | None) -> None:
    """Initialise ``module``'s ActNorms from (x, cond) if it is training and any needs it.

    Skipped in eval mode and inside an initialisation pass (the hooks do it there). The
    memory-saving unit never calls it: it runs layers' ``_run``, not their ``forward``.
    """
    if not module.training or in_plain_mode():
        return
    if _uninitialized(module):
        initialize_actnorms(module, lambda: module(x, cond))
