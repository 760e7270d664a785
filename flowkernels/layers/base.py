"""The contract every invertible layer follows, and the pieces the memory-saving backward uses.

Every :class:`InvertibleModule` maps (B, C, H, W) float32 tensors with an optional conditioning
tensor ``cond`` (float64 is accepted too, for oracles and gradcheck on the reference backend;
the kernel backends refuse it):

* ``forward(x, cond=None, logdet=None) -> (y, logdet + log|det dy/dx|)``
* ``inverse(y, cond=None, logdet=None) -> (x, logdet - log|det dy/dx|)``

``logdet`` is a (B,) tensor of the flow's dtype (None means zeros); it is not modified, the
returned one is new. Forward adds the log-determinant, inverse subtracts it, and ``inverse(forward(x))``
gives back x up to rounding.

For memory-saving backprop (:class:`~flowkernels.FlowSequence`) a layer also provides
``backward_from_output``: given its OUTPUT and the upstream gradients it rebuilds its input and
returns the input, conditioning and parameter gradients. The default implementation inverts
the layer without grad and differentiates one forward with grad; fused layers override it
with one subnet evaluation and the backward-with-recompute kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..dispatch import select_backend

__all__ = ["InvertibleModule", "FusedLayer", "StepGrads", "module_pullback", "flow_precision", "plain_forward"]


class _Mode:
    """Process-wide layer modes, set by context managers in eager code only (module-level state
    rather than ContextVars, which torch.compile cannot read; never changed inside a traced
    region, where Dynamo would replay the change; layers are not used from several threads).

    plain: a plain forward runs for ActNorm data-dependent initialisation: layers run unfused,
        submodule by submodule, and start no other initialisation.
    nested: inside a layer call: nested layers skip the NaN/Inf scan of their input, so a
        model pays one scan (one host sync) per top-level call, not one per layer.

    Initialisation never happens inside the memory-saving unit (DESIGN.md section 3) by
    construction: the unit and its recompute call layers' ``_run``/``backward_from_output``,
    never ``forward``, the only place that initialises.
    """

    plain = False
    nested = False


@contextlib.contextmanager
def _set_mode(name: str) -> Iterator[None]:
    previous = getattr(_Mode, name)
    setattr(_Mode, name, True)
    try:
        yield
    finally:
        setattr(_Mode, name, previous)


def plain_forward() -> contextlib.AbstractContextManager:
    """Run layers unfused, submodule by submodule (used by the ActNorm initialisation pass)."""
    return _set_mode("plain")


def in_plain_mode() -> bool:
    return _Mode.plain


def flow_precision(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for the flow state: subnets may run in bf16, the flow itself stays float32."""
    return torch.autocast(x.device.type, enabled=False)


class StepGrads(NamedTuple):
    """What :meth:`InvertibleModule.backward_from_output` returns.

    inp: the rebuilt input; grad_inp: dL/dinp; grad_cond: dL/dcond (None if cond is None);
    grad_params: dL/dp for each tensor of :meth:`InvertibleModule.trainable_parameters`, same order.
    """

    inp: Tensor
    grad_inp: Tensor
    grad_cond: Tensor | None
    grad_params: list[Tensor | None]


def module_pullback(
    module: nn.Module, *inputs: Tensor, input_grads: Sequence[bool] | None = None
) -> tuple[Tensor, Callable[[Tensor], tuple[tuple[Tensor | None, ...], list[Tensor | None]]]]:
    """Evaluate ``module(*inputs)`` once with grad and return ``(out, pull)``.

    ``pull(grad_out)`` returns (grads of the inputs, grads of the module's trainable parameters);
    ``input_grads`` says which inputs need one (default all): skipping an input skips e.g. the
    data gradient of a first convolution over a frozen encoder's 320 conditioning channels.
    Eagerly this is ``torch.autograd.grad`` (cheapest); under ``torch.compile`` it is
    ``torch.func.vjp`` over ``functional_call``, which Dynamo can trace inside a backward (it
    returns every input's gradient).
    """
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    if torch.compiler.is_compiling():

        def call(ins: tuple[Tensor, ...], ps: list[Tensor]) -> Tensor:
            return torch.func.functional_call(module, dict(zip(names, ps)), ins)

        out, vjp_fn = torch.func.vjp(call, tuple(inputs), params)

        def pull_compiled(grad_out: Tensor) -> tuple[tuple[Tensor | None, ...], list[Tensor | None]]:
            g_in, g_params = vjp_fn(grad_out)
            return tuple(g_in), list(g_params)

        return out, pull_compiled

    wanted = [True] * len(inputs) if input_grads is None else list(input_grads)
    with torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_(w) for t, w in zip(inputs, wanted))
        out = module(*leaves)

    def pull(grad_out: Tensor) -> tuple[tuple[Tensor | None, ...], list[Tensor | None]]:
        wrt = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, (*wrt, *params), grad_out, allow_unused=True))
        g_in = tuple(next(grads) if t.requires_grad else None for t in leaves)
        return g_in, list(grads)

    return out.detach(), pull


class InvertibleModule(nn.Module):
    """Base class of every invertible layer (see the module docstring for the contract).

    Subclasses implement :meth:`_run`, the in-place-logdet transform used by both directions,
    and may override :meth:`backward_from_output`.

    ``check_inputs`` (True by default): a top-level call raises a ValueError on NaN/Inf in x or
    cond, at the cost of one reduction and one host sync. Set it to False on a module whose
    caller validates its own inputs (e.g. a model that checks its images once per batch).
    """

    check_inputs = True

    def forward(self, x: Tensor, cond: Tensor | None = None, logdet: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) float32 -> (y, logdet + log|det J|); logdet (B,) float32 or None."""
        return self._call(x, cond, logdet, reverse=False)

    def inverse(self, y: Tensor, cond: Tensor | None = None, logdet: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Inverse map: (y, logdet) -> (x, logdet - log|det J|)."""
        return self._call(y, cond, logdet, reverse=True)

    def _call(self, x: Tensor, cond: Tensor | None, logdet: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        from .actnorm import maybe_initialize

        self._check_input(x, cond)
        if torch.compiler.is_compiling():
            # No NaN/Inf scan (a data-dependent branch) and no mode change in a traced region.
            if not reverse:
                maybe_initialize(self, x, cond)
            return self._dispatch(x, cond, logdet, reverse)
        if self.check_inputs and not _Mode.nested:
            check_finite("x", x)
            if cond is not None:
                check_finite("cond", cond)
        with _set_mode("nested"):
            if not reverse:
                maybe_initialize(self, x, cond)
            return self._dispatch(x, cond, logdet, reverse)

    def _dispatch(self, x: Tensor, cond: Tensor | None, logdet: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        """Run one call: through the recompute unit when :meth:`_needs_unit`, else :meth:`_run`."""
        from .sequence import invertible_backprop

        buf = logdet_buffer(x, logdet)
        if self._needs_unit(x, cond, buf):
            return invertible_backprop([self], x, cond, buf, reverse=reverse)
        return self._run(x, cond, buf, reverse), buf

    def _check_input(self, x: Tensor, cond: Tensor | None) -> None:
        """Validate the input; subclasses extend this with their channel/size checks."""
        check_flow_input(x)

    def _needs_unit(self, x: Tensor, cond: Tensor | None, logdet: Tensor) -> bool:
        """Whether this call must go through the recompute unit (fused kernels under grad)."""
        return False

    def _run(self, x: Tensor, cond: Tensor | None, logdet: Tensor, reverse: bool) -> Tensor:
        """Apply the layer (``reverse``: its inverse), adding (subtracting) into ``logdet`` in place."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[Tensor]:
        """The parameters that get gradients, in ``parameters()`` order."""
        return [p for p in self.parameters() if p.requires_grad]

    def backward_from_output(
        self, out: Tensor, grad_out: Tensor, grad_logdet: Tensor, cond: Tensor | None, reverse: bool
    ) -> StepGrads:
        """Rebuild the input from ``out`` (no grad), then differentiate one plain forward.

        ``reverse=True`` means ``out`` came from :meth:`inverse`. Costs one extra forward.
        """
        with torch.no_grad():
            inp = self._run(out, cond, torch.zeros_like(grad_logdet), not reverse)
        params = self.trainable_parameters()
        with torch.enable_grad():
            leaf = inp.detach().requires_grad_(True)
            cond_leaf = cond.detach().requires_grad_(True) if cond is not None else None
            ld = torch.zeros_like(grad_logdet)
            y = self._run(leaf, cond_leaf, ld, reverse)
            wrt = [leaf] + ([cond_leaf] if cond_leaf is not None else []) + params
            grads = torch.autograd.grad((y, ld), wrt, (grad_out, grad_logdet), allow_unused=True)
        grad_inp = grads[0] if grads[0] is not None else torch.zeros_like(inp)
        grad_cond = None
        if cond_leaf is not None:
            grad_cond = grads[1] if grads[1] is not None else torch.zeros_like(cond)
        return StepGrads(inp, grad_inp, grad_cond, list(grads[len(wrt) - len(params) :]))


class FusedLayer(InvertibleModule):
    """A layer with fused-kernel paths: it runs on ``self.backend`` (None: the global default),
    and under autograd with a kernel backend it goes through the recompute unit (the kernel ops
    mutate the log-det buffer, so they have no autograd formula of their own)."""

    backend: str | None = None

    def kernel_backend(self, x: Tensor) -> str:
        """The concrete backend for flow state ``x`` (the reference while initialising)."""
        return "reference" if in_plain_mode() else select_backend(self.backend, x)

    def _needs_unit(self, x: Tensor, cond: Tensor | None, logdet: Tensor) -> bool:
        return (
            self.kernel_backend(x) != "reference"
            and torch.is_grad_enabled()
            and (x.requires_grad or (cond is not None and cond.requires_grad) or bool(self.trainable_parameters()))
        )


def logdet_buffer(x: Tensor, logdet: Tensor | None) -> Tensor:
    """A fresh (B,) buffer of x's dtype holding ``logdet`` (the caller's tensor is never mutated)."""
    if logdet is None:
        return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    if logdet.shape != (x.shape[0],):
        raise ValueError(f"logdet: expected shape ({x.shape[0]},) to match x's batch, got {tuple(logdet.shape)}")
    if logdet.dtype != x.dtype:
        raise TypeError(f"logdet: expected {x.dtype} like x, got {logdet.dtype}")
    if logdet.device != x.device:
        raise ValueError(f"logdet is on {logdet.device} but x is on {x.device}")
    return logdet.clone()


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


def flat_grads(params: Sequence[Tensor], named: dict[int, Tensor | None]) -> list[Tensor | None]:
    """Order gradients keyed by ``id(param)`` as ``params``."""
    return [named.get(id(p)) for p in params]
