"""Memory-saving invertible backprop (FlowSequence(memory_saving=True)) against stored-activation
autograd, at SRFlow depth (54 steps), in both directions, plus its memory and its contract.

Gradients are judged against float64 stored-activation autograd, within a multiple of fp32
stored-activation autograd's own error (tests/oracle.py); the deep flows' subnets use SiLU for
ReLU, whose kinks no input of 54 steps avoids."""

from __future__ import annotations

import copy

import pytest
import torch

import flowkernels as fk
from tests.helpers import level_inputs, randomize_, srflow_level, trained_level
from tests.oracle import outputs_and_grads, reference_of, smooth_relus_
from tests.tolerances import BF16_ERROR_RATIO, REL_TOL, ROUND_TRIP_ABS, rel_err

C, COND, HW = 12, 6, 6  # level-1 SRFlow channels, a small conditioning tensor, tiny images


@pytest.fixture(autouse=True)
def _reference_backend():
    with fk.use_backend("reference"):
        yield


def _pair(depth: int, x: torch.Tensor, cond: torch.Tensor, **kwargs) -> tuple[fk.FlowSequence, fk.FlowSequence]:
    """The same trained-like sequence twice: memory saving on, and plain autograd."""
    saving = trained_level(depth, C, COND, x, cond, memory_saving=True, **kwargs)
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    return saving, plain


def _grads(seq: fk.FlowSequence, x, cond, cot, cot_ld, reverse: bool = False) -> list[torch.Tensor]:
    """Gradients of <z, cot> + <logdet, cot_ld> w.r.t. x, cond and every parameter."""
    return outputs_and_grads(seq, x, cond, cot, cot_ld, reverse)[2:]


def _inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    return level_inputs(batch, C, COND, HW)


def _check_deep(depth: int, reverse: bool = False, **kwargs) -> None:
    """A smoothed trained-like level of ``depth`` steps, memory saving on: within the fp32 noise
    of float64 stored-activation autograd."""
    x, cond, cot, cot_ld = _inputs()
    saving = smooth_relus_(trained_level(depth, C, COND, x, cond, memory_saving=True, **kwargs))
    if reverse:
        x = x * 0.5  # a latent-like input for the sampling direction
    reference_of(saving, x, cond, cot, cot_ld, reverse).check(outputs_and_grads(saving, x, cond, cot, cot_ld, reverse))


@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
def test_54_step_gradients_match_float64(reverse: bool):
    _check_deep(54, reverse)


@pytest.mark.slow
def test_54_step_round_trip():
    x, cond, _, _ = _inputs()
    seq = trained_level(54, C, COND, x, cond).eval()
    with torch.no_grad():
        z, ld = seq(x, cond)
        x2, ld2 = seq.inverse(z, cond, ld)
    err = (x2 - x).abs().max().item()
    assert err <= ROUND_TRIP_ABS["sequence_54"], f"54-step round trip error {err:.2e}"
    assert ld2.abs().max().item() <= 1e-3 * ld.abs().max().item()


@pytest.mark.slow
def test_keep_every_restarts_reconstruction():
    _check_deep(24, keep_every=4)


def test_unconditional_sequence_and_frozen_parameters():
    steps = [randomize_(fk.FlowStep(4, fk.AffineCoupling(4, hidden=8))) for _ in range(5)]
    saving = fk.FlowSequence(steps)
    for p in steps[2].parameters():
        p.requires_grad_(False)
    x, cot, cot_ld = torch.randn(2, 4, 5, 7), torch.randn(2, 4, 5, 7), torch.randn(2)
    reference_of(saving, x, None, cot, cot_ld).check(outputs_and_grads(saving, x, None, cot, cot_ld))
    z, ld = saving(x.clone().requires_grad_(True))
    ((z * cot).sum() + (ld * cot_ld).sum()).backward()
    assert all(p.grad is None for p in saving.steps[2].parameters())
    assert all(p.grad is not None for p in saving.parameters() if p.requires_grad)


def test_second_backward_with_retain_graph_gives_the_same_gradients():
    """The backward depends only on the saved output and the parameters, so with retain_graph it
    can run again (a Jacobian by repeated backward); without retain_graph PyTorch itself reports
    the freed graph, with the right advice."""
    seq = fk.FlowSequence(srflow_level(4, C, COND))
    x, cond, _, _ = _inputs()
    z, ld = seq(x.requires_grad_(True), cond)
    loss = z.square().sum() + ld.sum()
    wrt = [x, *seq.parameters()]
    first = torch.autograd.grad(loss, wrt, retain_graph=True)
    second = torch.autograd.grad(loss, wrt)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        torch.autograd.grad(loss, wrt)


def test_parameters_changed_between_forward_and_backward_are_refused():
    """The backward rebuilds activations with the parameters' current values: a change in place
    after the forward (an optimizer step too early) would give silently wrong gradients."""
    seq = fk.FlowSequence(srflow_level(4, C, COND))
    x, cond, _, _ = _inputs()
    z, ld = seq(x.requires_grad_(True), cond)
    with torch.no_grad():
        seq.steps[2].actnorm.bias.add_(0.1)
    with pytest.raises(RuntimeError, match=r"1 parameter\(s\) .* modified in place after the forward"):
        (z.sum() + ld.sum()).backward()


def test_squeeze_inside_a_memory_saving_sequence():
    """Squeeze (no parameters, zero log-det) works as a step of the unit: gradients equal plain
    autograd's."""
    x, _, _, cot_ld = _inputs()
    cot = torch.randn(2, 4 * C, HW // 2, HW // 2)
    saving = fk.FlowSequence([randomize_(fk.FlowStep(C)), fk.Squeeze(2), randomize_(fk.FlowStep(4 * C))])
    reference_of(saving, x, None, cot, cot_ld).check(outputs_and_grads(saving, x, None, cot, cot_ld))


def test_split2d_is_refused_as_a_sequence_step():
    with pytest.raises(TypeError, match=r"steps\[1\]: a Split2d cannot be a step of a FlowSequence.*split.encode"):
        fk.FlowSequence([fk.FlowStep(C), fk.Split2d(C)])


def _saved_bytes(seq: fk.FlowSequence, x: torch.Tensor, cond: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    run = lambda: seq(x.clone().requires_grad_(True), cond.clone().requires_grad_(True))  # noqa: E731
    return fk.saved_tensor_bytes(run, exclude=seq.parameters())[1]


@pytest.mark.slow
def test_saved_memory_is_flat_in_depth():
    """Measured as bytes of tensors saved for backward (parameters excluded), 8 vs 64 steps."""
    x, cond, _, _ = _inputs()
    shallow_saving, shallow_plain = _pair(8, x, cond)
    deep_saving, deep_plain = _pair(64, x, cond)
    saving = (_saved_bytes(shallow_saving, x, cond), _saved_bytes(deep_saving, x, cond))
    plain = (_saved_bytes(shallow_plain, x, cond), _saved_bytes(deep_plain, x, cond))
    assert saving[0] == saving[1], f"memory saving grows with depth: {saving}"
    assert saving[1] <= (x.numel() + cond.numel()) * 4 + 1024  # output + conditioning only
    assert plain[1] > 6 * plain[0], f"plain autograd should grow ~linearly with depth: {plain}"


def _grads_autocast_forward(seq, x, cond, cot, cot_ld, reverse: bool) -> list[torch.Tensor]:
    """Like _grads, but only the forward runs under bf16 autocast; backward runs outside it, as
    in a usual training loop."""
    x, cond = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, ld = seq.inverse(x, cond) if reverse else seq(x, cond)
    assert z.dtype == torch.float32 and ld.dtype == torch.float32
    loss = (z * cot).sum() + (ld * cot_ld).sum()
    return list(torch.autograd.grad(loss, [x, cond, *seq.parameters()]))


@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
def test_bf16_subnets_recompute_under_the_same_autocast(reverse: bool):
    """The backward (outside autocast) must re-enter the forward's autocast state, or the
    recomputed subnet outputs would be fp32 while the forward's were bf16. The flow state
    stays float32, and the gradients are as good as plain bf16 autograd."""
    x, cond, cot, cot_ld = _inputs()
    saving, plain = _pair(8, x, cond)
    autocast_on: list[bool] = []
    relu = saving.steps[-1].affine.fAffine[1]  # (the subnet itself runs folded, not as a module call)
    handle = relu.register_forward_hook(lambda m, args, out: autocast_on.append(torch.is_autocast_enabled("cpu")))
    got = _grads_autocast_forward(saving, x, cond, cot, cot_ld, reverse)
    handle.remove()
    assert autocast_on == [True, True], f"autocast at the forward and at the recompute: {autocast_on}"
    want = _grads_autocast_forward(plain, x, cond, cot, cot_ld, reverse)
    fp32 = _grads(plain, x, cond, cot, cot_ld, reverse)
    # bf16 errors land on single gradient tensors at random (the folded convolutions round their
    # weights to bf16 where plain autograd rounds their outputs), so compare the worst tensors
    # (as tests/test_cond_batching.py does): measured 0.38 / 0.24 (forward / inverse) against plain
    # bf16 autograd's 0.43 / 0.27.
    worst_saving = max(rel_err(g, f) for g, f in zip(got, fp32))
    worst_plain = max(rel_err(w, f) for w, f in zip(want, fp32))
    assert worst_saving <= BF16_ERROR_RATIO * max(worst_plain, REL_TOL["grad_level"])
