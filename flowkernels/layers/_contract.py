"""The pieces of the layer contract that every layer module shares (a leaf: torch and ops only).

Layer modes, the flow-precision rule, the input checks, the log-det buffer, what a
recompute backward returns (:class:`StepGrads`), and the rule for modules that need a
data-dependent initialisation (:class:`DataInitialized`). The contract itself is written out in
:mod:`flowkernels.layers.base`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from ..ops._common import logdet_buffer
from ._channel_maps import MapTerms
from ._cond_parts import CondProjection
from ._folding import FoldTerms
from ._structure import structural

__all__ = [
    "DataInitialized",
    "RecomputableStep",
    "StepGrads",
    "check_cond",
    "check_dtype_matches",
    "check_finite",
    "check_flow_input",
    "check_initialized",
    "flat_grads",
    "flow_precision",
    "in_plain_mode",
    "inputs_checked",
    "logdet_buffer",
    "plain_forward",
    "set_mode",
    "uninitialized",
]


class _Mode:
    """Process-wide layer modes, set by context managers in eager code only (module-level state
    rather than ContextVars, which torch.compile cannot read; never changed inside a traced
    region, where Dynamo would replay the change; layers are not used from several threads).

    plain: a plain forward runs for the data-dependent initialisation (:func:`plain_forward`):
        layers run unfused, submodule by submodule, so that forward hooks see each input.
    inputs_checked: inside a layer call, whose top level has already validated the inputs:
        nested layers skip the NaN/Inf scan and the initialisation check, so a model pays one
        scan (one host sync) per top-level call, not one per layer.
    """

    plain = False
    inputs_checked = False


@contextlib.contextmanager
def set_mode(name: str) -> Iterator[None]:
    """Set the :class:`_Mode` flag ``name`` for the duration of the block."""
    previous = getattr(_Mode, name)
    setattr(_Mode, name, True)
    try:
        yield
    finally:
        setattr(_Mode, name, previous)


def plain_forward() -> contextlib.AbstractContextManager:
    """Run layers unfused, submodule by submodule (used by the ActNorm initialisation pass)."""
    return set_mode("plain")


def in_plain_mode() -> bool:
    return _Mode.plain


def inputs_checked() -> bool:
    """Whether an enclosing layer call has already validated its inputs."""
    return _Mode.inputs_checked


def flow_precision(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for the flow state: subnets may run in bf16, the flow itself stays float32.
    (Nothing to switch off without autocast: a no-op context, a third of the host time of an
    autocast one, entered a few hundred times per SRFlow step.)"""
    if not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


class StepGrads(NamedTuple):
    """What a layer's ``backward_from_output`` returns.

    inp: the rebuilt input; grad_inp: dL/dinp; grad_cond: dL/dcond (None if cond is None);
    grad_params: dL/dp for each tensor of the layer's ``trainable_parameters()``, same order;
    grad_parts: dL/dpart for each precomputed conditioning part the layer was given (None when
    it was given none), whose weight-column and cond gradients the caller completes;
    grad_folded: for each folded convolution the layer was given (``folded``), the gradients of
    its folded weight and bias (a ``Folded`` of them, or None; fresh tensors, which the caller
    may overwrite); the caller maps them back to the parameters through the fold, and leaves
    those parameters' entries of grad_params None;
    grad_map: for a layer given its ``channel_map``, the gradients (matrix (C, C), offset (C,)) of
    the map it applied, which the caller turns into its parameters' gradients (whose entries of
    grad_params it leaves None).
    """

    inp: Tensor
    grad_inp: Tensor
    grad_cond: Tensor | None
    grad_params: list[Tensor | None]
    grad_parts: list[Tensor | None] | None = None
    grad_folded: list | None = None
    grad_map: tuple[Tensor, Tensor] | None = None


class RecomputableStep(Protocol):
    """What the memory-saving unit needs of a layer (every InvertibleModule has it)."""

    def _run(self, x: Tensor, cond: Tensor | None, logdet: Tensor, reverse: bool) -> Tensor: ...

    def backward_from_output(
        self, out: Tensor, grad_out: Tensor, grad_logdet: Tensor, cond: Tensor | None, reverse: bool
    ) -> StepGrads: ...

    def trainable_parameters(self) -> list[Tensor]: ...

    def cond_projections(self) -> Sequence[CondProjection]: ...

    def fold_terms(self) -> Sequence[FoldTerms]: ...

    def map_terms(self) -> MapTerms | None: ...

    def map_param_grads(self, grad_weight: Tensor, grad_logs: Tensor, grad_bias: Tensor) -> list: ...


def flat_grads(params: Sequence[Tensor], grads_by_id: dict[int, Tensor | None]) -> list[Tensor | None]:
    """Order gradients keyed by ``id(param)`` as ``params`` (the stage backwards collect them by
    id; :class:`StepGrads` lists them in parameter order)."""
    return [grads_by_id.get(id(p)) for p in params]


def check_flow_input(x: Tensor, channels: int | None = None) -> None:
    """Flow state must be a (B, C, H, W) float32 (or float64) tensor with the expected channels."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x: expected torch.float32 (the flow state is float32; float64 for checks), got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"x: expected {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")


def check_dtype_matches(module: nn.Module, x: Tensor) -> None:
    """The flow state must have the dtype of the module's parameters (float32, or float64 for a
    module converted with ``.double()`` on the reference backend): a mismatch would otherwise
    surface as a dtype error deep inside a matrix product."""
    param = next(module.parameters(), None)
    if param is not None and x.dtype != param.dtype:
        raise TypeError(
            f"x: expected {param.dtype} to match the parameters of {type(module).__name__}, got {x.dtype}; "
            f"convert the input (x.to({param.dtype})) or the module (.to({x.dtype}))"
        )


def check_finite(name: str, t: Tensor) -> None:
    """Raise on NaN/Inf in a user-supplied tensor (one reduction and one host sync per call)."""
    t = t.detach()
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: contains {bad} non-finite values (NaN or Inf)")


def check_cond(cond: Tensor | None, x: Tensor, channels: int | None) -> None:
    """The conditioning tensor must be (B, channels, H, W) like x; unconditional layers
    (``channels`` 0 or None) ignore it, so one tensor can be passed to a whole sequence."""
    if not channels:
        return
    if cond is None:
        raise ValueError(
            f"cond: this layer needs a ({x.shape[0]}, {channels}, {x.shape[2]}, {x.shape[3]}) tensor, got None"
        )
    expected = (x.shape[0], channels, x.shape[2], x.shape[3])
    if tuple(cond.shape) != expected:
        raise ValueError(f"cond: expected shape {expected}, got {tuple(cond.shape)}")
    if cond.device != x.device:
        raise ValueError(f"cond is on {cond.device} but x is on {x.device}")


class DataInitialized(nn.Module):
    """A module whose parameters are set from data, once, by an explicit :meth:`initialize_`
    before it is trained (ActNorm; STYLE rule 10: ``forward`` never initialises).

    ``initialized`` is a plain Python bool, not a buffer: see :class:`~flowkernels.ActNorm`.
    """

    initialized: bool = False

    def initialize_(self, x: Tensor) -> None:
        """Set the parameters from the statistics of this module's input ``x``; mark initialised."""
        raise NotImplementedError


@structural
def _data_initialized(module: nn.Module) -> tuple[DataInitialized, ...]:
    """The :class:`DataInitialized` submodules of ``module`` (itself included), memoised: the
    initialisation check runs on every training call, and walking a model's tree each time costs
    milliseconds (an SRFlow model has about a thousand submodules)."""
    return tuple(m for m in module.modules() if isinstance(m, DataInitialized))


def uninitialized(module: nn.Module) -> list[DataInitialized]:
    """The submodules of ``module`` (itself included) still waiting for their initialisation."""
    return [m for m in _data_initialized(module) if not m.initialized]


def check_initialized(module: nn.Module) -> None:
    """Raise RuntimeError if ``module`` contains an uninitialised :class:`DataInitialized`, naming
    the first one and how to initialise it."""
    if not uninitialized(module):
        return
    names = [n for n, m in module.named_modules() if isinstance(m, DataInitialized) and not m.initialized]
    first = dict(module.named_modules())[names[0]]
    where = f"{type(first).__name__} {names[0]!r}" if names[0] else f"this {type(first).__name__}"
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    raise RuntimeError(
        f"{type(module).__name__}: {where}{more} has not been initialised, and the module is in training "
        "mode. ActNorm's data-dependent initialisation is explicit: run it once on a first batch with "
        "`flow.initialize_(x, cond)` (a FlowSequence) or `fk.initialize_actnorms(module, lambda: module(x, cond))`, "
        "or load a checkpoint (load_state_dict); in eval mode an uninitialised ActNorm is the identity"
    )
