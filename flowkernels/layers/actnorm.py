"""ActNorm with data-dependent initialisation (Glow; SRFlow's parametrisation).

``y = (x + bias) * exp(logs)`` per channel, ``bias`` and ``logs`` of shape (1, C, 1, 1) as in the
official state_dicts. Initialisation (DESIGN.md section 3, STYLE rule 10): once, from a first
training batch, ``bias = -mean(x)``, ``logs = -log(std(x) + 1e-6)`` over (N, H, W), all-reduced
across ranks under torch.distributed so every rank starts identical. It is explicit: one plain
forward run by :func:`initialize_actnorms` (or ``FlowSequence.initialize_(x, cond)``), each
ActNorm initialised from its own input just before it runs. ``forward`` never initialises, so
nothing initialises inside the memory-saving unit or its recompute.

Before initialisation ``bias`` and ``logs`` are zero. A layer holding an uninitialised ActNorm
raises RuntimeError when called in training mode (the check is in ``InvertibleModule``); in eval
mode the ActNorm is the identity (``y = x``, log-det 0), without a warning.

The ``initialized`` flag is a Python bool, not a buffer (DESIGN.md section 3 says buffer; this is
a deliberate departure): checking a device tensor would cost a host sync per layer and step, and
a buffer would add keys to the official state_dict layout, so official checkpoints would no longer
load with ``strict=True``. It is restored whenever a state_dict is loaded, by the official rule: a
loaded ActNorm is initialised unless its bias and logs are all zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import reference
from ._contract import DataInitialized, check_flow_input, flow_precision, plain_forward, uninitialized
from .base import InvertibleModule

__all__ = ["ActNorm", "ActNorm2d", "initialize_actnorms"]

_STD_EPS = 1e-6  # official: logs = log(1 / (std + 1e-6))


def _all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ActNorm(DataInitialized):
    """ActNorm as used inside subnets: ``forward(x) -> (x + bias) * exp(logs)``, no log-det.

    Also the base of :class:`ActNorm2d` (parameters, :meth:`initialize_`, the state-dict rule), so
    ``isinstance(m, ActNorm)`` finds both kinds; ``initialized`` is a Python bool (module docstring).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.initialized = False

    def extra_repr(self) -> str:
        return f"{self.channels}, initialized={self.initialized}"

    def forward(self, x: Tensor) -> Tensor:
        return reference.actnorm(x, self.logs, self.bias)

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

    Initialise it explicitly (:func:`initialize_actnorms`, ``FlowSequence.initialize_``) or load a
    checkpoint before training; uninitialised, it raises in training mode and is the identity in
    eval mode. It is an :class:`ActNorm` for ``isinstance`` (the init pass and user code find all
    ActNorms that way), although its ``forward`` returns ``(y, logdet)``.
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


@contextlib.contextmanager
def _init_hooks(targets: list[DataInitialized]) -> Iterator[None]:
    def hook(mod: nn.Module, args: tuple) -> None:
        if isinstance(mod, DataInitialized) and not mod.initialized:
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
    from its own input just before it first runs, in network order, with layers unfused, in
    training or eval mode alike. Call it once before training (the layers refuse to train with
    uninitialised ActNorms); ActNorms already initialised, e.g. loaded from a checkpoint, are
    left alone. Returns how many ActNorms were initialised.
    """
    targets = uninitialized(module)
    if targets:
        with _init_hooks(targets), plain_forward():
            run()
    return len(targets)
