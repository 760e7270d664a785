"""Judging an fp32 path of a flow level the machine-independent way: against float64
stored-activation autograd (the oracle), bounded by a multiple of the error that fp32
stored-activation autograd itself reaches on the same input.

Two fp32 paths (memory saving or not, batched or per-step, C++ or reference, one ISA variant or
another) round differently, and how differently depends on the machine (vector width, FMA, the
convolution library's kernels). So a path is judged by how far it is from float64, compared with
how far plain fp32 autograd is: a correct path is within a small multiple of that, a wrong one is
far above it (tests/tolerances.py: ``FP32_PATH_RATIO``).

One more thing makes fp32 gradients differ between correct paths: the kinks of the subnets'
ReLUs. Where a ReLU input lies within fp32 rounding of 0, each path picks a side by its own
rounding, and the gradient is discontinuous there: one element flips between 0 and its full
value (seen: 3.7e-3 relative on one weight gradient, from an input of -1.9e-7 in float64 that one
fp32 path rounded to +3.3e-7). No tolerance can tell that from a bug, so the tests evaluate
gradients only where they are defined to fp32 precision:

* shallow levels (a few steps on tiny images): inputs are drawn again until every ReLU input of
  the float64 run is at least ``KINK_MARGIN`` of its call's largest input away from 0
  (:func:`level_case`);
* deep flows (54 steps, SRFlow models), whose hundreds of thousands of ReLU inputs always include
  some that close to 0: the subnets' ReLUs become SiLUs (:func:`smooth_relus_`). The memory-saving
  unit treats a subnet as a black box, so the activation does not matter to what these tests check;
  the official-architecture tests (tests/test_srflow_official.py) keep the ReLUs, at fixed inputs
  whose margin is checked there.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import flowkernels as fk
from tests.helpers import level_inputs, trained_level
from tests.tolerances import FP32_NOISE_FLOOR, FP32_PATH_RATIO, KINK_MARGIN, rel_err

MAX_DRAWS = 40  # about half of the draws of an 8-step level pass: 40 tries fail with p ~ 1e-12


def relu_margin(module: nn.Module, run: Callable[[], object]) -> float:
    """The smallest ``|input| / max|input|`` over every call of a ReLU of ``module`` during ``run()``."""
    margins: list[float] = []

    def record(_: nn.Module, args: tuple) -> None:
        v = args[0].detach().abs()
        margins.append((v.min() / v.max().clamp_min(1e-300)).item())

    handles = [m.register_forward_pre_hook(record) for m in module.modules() if isinstance(m, nn.ReLU)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return min(margins, default=math.inf)


@torch.no_grad()
def smooth_relus_(module: nn.Module) -> nn.Module:
    """Replace every ReLU inside ``module``'s Sequentials (the coupling subnets) with a SiLU."""
    for seq in module.modules():
        if isinstance(seq, nn.Sequential):
            for i, layer in enumerate(seq):
                if isinstance(layer, nn.ReLU):
                    seq[i] = nn.SiLU()
    return module


def outputs_and_grads(
    seq: nn.Module,
    x: Tensor,
    cond: Tensor | None,
    cot: Tensor,
    cot_ld: Tensor,
    reverse: bool = False,
    cond_grad: bool = True,
) -> list[Tensor]:
    """(z, logdet, then the gradients of <z, cot> + <logdet, cot_ld> w.r.t. x, cond (if given and
    ``cond_grad``) and every trainable parameter), in ``seq``'s dtype, on the current backend."""
    x = x.to(next(seq.parameters()).dtype).clone().requires_grad_(True)
    wrt = [x]
    if cond is not None:
        cond = cond.to(x.dtype).clone().requires_grad_(cond_grad)
        wrt += [cond] if cond_grad else []
    params = [p for p in seq.parameters() if p.requires_grad]
    z, ld = seq.inverse(x, cond) if reverse else seq(x, cond)
    loss = (z * cot.to(x.dtype)).sum() + (ld * cot_ld.to(x.dtype)).sum()
    grads = torch.autograd.grad(loss, [*wrt, *params])
    return [z.detach(), ld.detach(), *grads]


def stored_activation(seq: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``seq`` in ``dtype`` that runs as stored-activation autograd on the reference
    backend's maths (memory saving and level batching off): the oracle in float64, the noise
    yardstick in float32. Call it under ``fk.use_backend("reference")``."""
    plain = copy.deepcopy(seq).to(dtype)
    for m in plain.modules():
        if isinstance(m, fk.FlowSequence):
            m.memory_saving = False
            m.set_cond_batching(False)
        if isinstance(m, fk.MultiScaleFlow):  # its level sequences are not registered submodules
            m.set_memory_saving(False)
            m.set_cond_batching(False)
        if isinstance(m, fk.layers.base.FusedLayer):
            m.backend = None  # the global default, which the caller sets to the reference
    return plain


@dataclass
class Reference:
    """The float64 oracle and the fp32 plain-autograd yardstick of one input, the names of their
    tensors (``z``, ``logdet``, ``x``, ``cond``, then the parameters), and the input's
    :func:`relu_margin` in the float64 run."""

    oracle: list[Tensor]
    plain: list[Tensor]
    names: list[str]
    margin: float

    @property
    def noise(self) -> float:
        """The worst relative error of fp32 plain autograd against float64 (floored)."""
        return max(FP32_NOISE_FLOOR, *(rel_err(p, o) for p, o in zip(self.plain, self.oracle)))

    def check(self, got: list[Tensor], what: str = "path") -> None:
        """Every tensor of ``got`` within ``FP32_PATH_RATIO`` x the fp32 noise of float64, on an
        input whose gradients are defined to fp32 precision (no ReLU input near its kink)."""
        assert self.margin >= KINK_MARGIN, f"a ReLU input is {self.margin:.1e} (relative) from its kink"
        assert len(got) == len(self.oracle) == len(self.names)
        errors = {n: rel_err(g.detach().cpu(), o) for n, g, o in zip(self.names, got, self.oracle)}
        worst = max(errors, key=errors.get)
        bound = FP32_PATH_RATIO * self.noise
        assert errors[worst] <= bound, (
            f"{what}: {worst} is {errors[worst]:.2e} from float64 (relative), above {FP32_PATH_RATIO} x the "
            f"{self.noise:.2e} that fp32 plain autograd reaches on this input"
        )


def reference_of(
    seq: nn.Module,
    x: Tensor,
    cond: Tensor | None,
    cot: Tensor,
    cot_ld: Tensor,
    reverse: bool = False,
    cond_grad: bool = True,
) -> Reference:
    """Run the oracle and the fp32 yardstick of ``seq`` on this input."""
    names = ["z", "logdet", "x", *(["cond"] if cond is not None and cond_grad else [])]
    names += [n for n, p in seq.named_parameters() if p.requires_grad]
    with fk.use_backend("reference"):
        oracle_seq = stored_activation(seq, torch.float64)
        oracle: list[Tensor] = []
        margin = relu_margin(
            oracle_seq, lambda: oracle.extend(outputs_and_grads(oracle_seq, x, cond, cot, cot_ld, reverse, cond_grad))
        )
        plain = outputs_and_grads(stored_activation(seq), x, cond, cot, cot_ld, reverse, cond_grad)
    return Reference(oracle, plain, names, margin)


@dataclass
class LevelCase:
    """A trained-like SRFlow level (fp32) and an input where its gradients are well defined."""

    seq: fk.FlowSequence
    x: Tensor
    cond: Tensor
    cot: Tensor
    cot_ld: Tensor
    reverse: bool

    def run(self, seq: nn.Module | None = None, cond_grad: bool = True) -> list[Tensor]:
        """:func:`outputs_and_grads` of ``seq`` (default: the case's level) on this input."""
        return outputs_and_grads(
            self.seq if seq is None else seq, self.x, self.cond, self.cot, self.cot_ld, self.reverse, cond_grad
        )

    def reference(self, cond_grad: bool = True) -> Reference:
        return reference_of(self.seq, self.x, self.cond, self.cot, self.cot_ld, self.reverse, cond_grad)


def float64_margin(seq: nn.Module, x: Tensor, cond: Tensor | None, reverse: bool = False) -> float:
    """:func:`relu_margin` of the float64 stored-activation run of ``seq`` on ``x``, ``cond``."""
    oracle = stored_activation(seq, torch.float64)
    run = oracle.inverse if reverse else oracle
    with fk.use_backend("reference"), torch.no_grad():
        return relu_margin(oracle, lambda: run(x.double(), None if cond is None else cond.double()))


def level_case(
    depth: int,
    channels: int,
    cond_channels: int,
    hw: tuple[int, int] | int,
    batch: int = 2,
    reverse: bool = False,
    **seq_kwargs: object,
) -> LevelCase:
    """A :func:`~tests.helpers.trained_level` of ``depth`` steps and an input (``reverse``: a
    latent-like half-scale one for the inverse) drawn until every ReLU input of its float64
    stored-activation run is at least ``KINK_MARGIN`` from 0 (relative to that call's largest)."""
    for _ in range(MAX_DRAWS):
        x, cond, cot, cot_ld = level_inputs(batch, channels, cond_channels, hw)
        with fk.use_backend("reference"):
            seq = trained_level(depth, channels, cond_channels, x, cond, **seq_kwargs)
        x = x * 0.5 if reverse else x
        if float64_margin(seq, x, cond, reverse) >= KINK_MARGIN:
            return LevelCase(seq, x, cond, cot, cot_ld, reverse)
    raise AssertionError(f"no input in {MAX_DRAWS} draws keeps every ReLU input {KINK_MARGIN:.0e} away from 0")
