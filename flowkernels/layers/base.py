"""The contract every invertible layer follows, and the pieces the memory-saving backward uses.

Every :class:`InvertibleModule` maps (B, C, H, W) float32 tensors with an optional conditioning
tensor ``cond`` (float64 is accepted too, for oracles and gradcheck on the reference backend;
the kernel backends refuse it):

* ``forward(x, cond=None, logdet=None) -> (y, logdet + log|det dy/dx|)``
* ``inverse(y, cond=None, logdet=None) -> (x, logdet - log|det dy/dx|)``

``logdet`` is a (B,) tensor of the flow's dtype (None means zeros); it is not modified, the
returned one is new. Forward adds the log-determinant, inverse subtracts it, and ``inverse(forward(x))``
gives back x up to rounding. ``forward`` never changes parameters: a layer holding ActNorms must
have them initialised (``FlowSequence.initialize_(x, cond)``, ``fk.initialize_actnorms`` or a
loaded checkpoint) before it is used in training mode, where a top-level call raises otherwise;
in eval mode an uninitialised ActNorm is the identity.

Direction flags, one convention everywhere: ``reverse`` (layers' ``_run``, ops) and the Triton
constexpr ``INVERSE`` mean "compute the inverse map"; in a backward (``backward_from_output``,
``*_bwd`` ops, the Triton constexpr ``REVERSE``) ``reverse`` says the output being differentiated
came from the inverse, so its input is rebuilt with the forward map; ``SUBTRACT`` (the Triton
log-det reduction) is the inverse's sign, ``logdet -= sum log s``.

For memory-saving backprop (:class:`~flowkernels.FlowSequence`) a layer also provides
``backward_from_output``: given its OUTPUT and the upstream gradients it rebuilds its input and
returns the input, conditioning and parameter gradients. The default implementation inverts
the layer without grad and differentiates one forward with grad; fused layers override it
with one subnet evaluation and the backward-with-recompute kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..dispatch import select_backend
from ._channel_maps import MapTerms
from ._cond_parts import CondProjection
from ._contract import (
    StepGrads,
    check_dtype_matches,
    check_finite,
    check_flow_input,
    check_initialized,
    in_plain_mode,
    inputs_checked,
    logdet_buffer,
    set_mode,
)
from ._folding import FoldTerms
from ._structure import all_parameters, check_structure
from ._unit import invertible_backprop

__all__ = ["InvertibleModule", "FusedLayer", "module_pullback"]


def module_pullback(
    module: nn.Module, *inputs: Tensor | None, input_grads: Sequence[bool] | None = None
) -> tuple[Tensor, Callable[[Tensor], tuple[tuple[Tensor | None, ...], list[Tensor | None]]]]:
    """Evaluate ``module(*inputs)`` once with grad and return ``(out, pull)``.

    ``pull(grad_out)`` returns (grads of the inputs, grads of the module's trainable parameters);
    ``input_grads`` says which inputs need one (default all): skipping an input skips e.g. the
    data gradient of a first convolution over a frozen encoder's 320 conditioning channels.
    A None input is passed on as None and gets a None gradient (:class:`~flowkernels.layers.coupling.Subnet`
    called with a precomputed conditioning part and no flow-state input).
    Eagerly this is ``torch.autograd.grad`` (cheapest); under ``torch.compile`` it is
    ``torch.func.vjp`` over ``functional_call``, which Dynamo can trace inside a backward (it
    returns every input's gradient).
    """
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    present = [i for i, t in enumerate(inputs) if t is not None]
    if torch.compiler.is_compiling():

        def call(ins: tuple[Tensor, ...], ps: list[Tensor]) -> Tensor:
            full = list(inputs)
            for i, t in zip(present, ins):
                full[i] = t
            return torch.func.functional_call(module, dict(zip(names, ps)), tuple(full))

        out, vjp_fn = torch.func.vjp(call, tuple(inputs[i] for i in present), params)

        def pull_compiled(grad_out: Tensor) -> tuple[tuple[Tensor | None, ...], list[Tensor | None]]:
            g_present, g_params = vjp_fn(grad_out)
            g_in: list[Tensor | None] = [None] * len(inputs)
            for i, g in zip(present, g_present):
                g_in[i] = g
            return tuple(g_in), list(g_params)

        return out, pull_compiled

    wanted = [True] * len(inputs) if input_grads is None else list(input_grads)
    with torch.enable_grad():
        leaves = tuple(None if t is None else t.detach().requires_grad_(w) for t, w in zip(inputs, wanted))
        out = module(*leaves)

    def pull(grad_out: Tensor) -> tuple[tuple[Tensor | None, ...], list[Tensor | None]]:
        needed = [t is not None and t.requires_grad for t in leaves]
        wrt = [t for t, n in zip(leaves, needed) if n]
        grads = iter(torch.autograd.grad(out, (*wrt, *params), grad_out, allow_unused=True))
        g_in = tuple(next(grads) if n else None for n in needed)
        return g_in, list(grads)

    return out.detach(), pull


def trainable_parameters(module: nn.Module) -> list[Tensor]:
    """``[p for p in module.parameters() if p.requires_grad]``, same order, from the memoised
    parameter list (:func:`~flowkernels.layers._structure.all_parameters`): the memory-saving unit
    asks every step for its parameters on every call."""
    return [p for p in all_parameters(module) if p.requires_grad]


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
        check_structure(self)
        self._check_input(x, cond)
        check_dtype_matches(self, x)
        if torch.compiler.is_compiling():
            # No NaN/Inf scan (a data-dependent branch) and no mode change in a traced region;
            # the initialisation check reads Python bools only, which Dynamo guards on.
            if self.training and not in_plain_mode():
                check_initialized(self)
            return self._dispatch(x, cond, logdet, reverse)
        if not inputs_checked():
            if self.training and not in_plain_mode():
                check_initialized(self)
            if self.check_inputs:
                check_finite("x", x)
                if cond is not None:
                    check_finite("cond", cond)
        with set_mode("inputs_checked"):
            return self._dispatch(x, cond, logdet, reverse)

    def _dispatch(self, x: Tensor, cond: Tensor | None, logdet: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        """Run one call: through the recompute unit when :meth:`_needs_unit`, else :meth:`_run`."""
        buf = logdet_buffer(x, logdet, clone=True)
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
        return trainable_parameters(self)

    def cond_projections(self) -> Sequence[CondProjection]:
        """Convolutions over the conditioning tensor that a :class:`~flowkernels.FlowSequence`
        may batch across steps (:mod:`flowkernels.layers._cond_parts`); none by default.

        A layer returning some must accept ``parts`` (one (B, out, H, W) tensor per projection,
        in this order) as a last argument of ``_run`` and ``backward_from_output``, use
        ``conv(cond, projection.cond_weight()) = part`` instead of reading those columns, and
        return the parts' gradients in ``StepGrads.grad_parts`` (parts are computed with the folded
        weights of :meth:`fold_terms`: ``CondProjection.term``).
        """
        return ()

    def fold_terms(self) -> Sequence[FoldTerms]:
        """Convolutions with a per-channel scale whose folded form (:mod:`flowkernels.layers._folding`)
        a :class:`~flowkernels.FlowSequence` may compute for many steps at once; none by default.

        A layer returning some must accept ``folded`` (one :class:`~flowkernels.layers._folding.Folded`
        per term, this order) as a keyword of ``_run`` and ``backward_from_output``, use it instead
        of those parameters, and return their gradients in ``StepGrads.grad_folded`` (tensors of
        its own, which the caller may overwrite).
        """
        return ()

    def map_terms(self) -> MapTerms | None:
        """An ActNorm + 1x1 map whose folding (:mod:`flowkernels.layers._channel_maps`) a
        :class:`~flowkernels.FlowSequence` may do for many steps at once; None by default.

        A layer returning one must accept ``channel_map`` (a ``StepMap``) as a keyword of ``_run``
        and ``backward_from_output``, return the applied map's gradients in ``StepGrads.grad_map``,
        and map them to its parameters in :meth:`map_param_grads`.
        """
        return None

    def map_param_grads(self, grad_weight: Tensor, grad_logs: Tensor, grad_bias: Tensor) -> list:
        """``(parameter, gradient)`` pairs from the gradients of :meth:`map_terms`' weight, logs
        and bias (shaped like them)."""
        raise NotImplementedError(f"{type(self).__name__} has no map_terms")

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
            # A layer with a constant log-det (e.g. Squeeze: zero) leaves ld outside the graph.
            outs, grad_outs = ((y, ld), (grad_out, grad_logdet)) if ld.requires_grad else ((y,), (grad_out,))
            grads = torch.autograd.grad(outs, wrt, grad_outs, allow_unused=True)
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
