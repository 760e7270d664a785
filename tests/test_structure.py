"""The memoised structure of the layers (flowkernels/layers/_structure.py): a layer's stages,
foldable convolutions and parameter lists are reused between calls, and never once the module
tree holds other parameters or submodules, however they got there."""

from __future__ import annotations

import copy

import pytest
import torch

import flowkernels as fk
import srflow
from flowkernels.layers import _structure
from tests.helpers import level_inputs, trained_level
from tests.tolerances import assert_rel_close

C, COND, HW = 6, 4, 5


@pytest.fixture(params=["reference", "cuda"])  # "cuda": the compiled extension, C++ kernels on a CPU
def backend(request):
    with fk.use_backend(request.param):
        yield request.param


def _level() -> tuple[fk.FlowSequence, tuple[torch.Tensor, ...]]:
    inputs = level_inputs(2, C, COND, HW)
    return trained_level(5, C, COND, inputs[0], inputs[1], memory_saving=True), inputs


def _loss_and_grads(seq: fk.FlowSequence, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict]:
    x, cond, cot, cot_ld = inputs
    seq.zero_grad(set_to_none=True)
    z, logdet = seq(x, cond)
    loss = (z * cot).sum() + (logdet * cot_ld).sum()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in seq.named_parameters()}


def _check_same(seq: fk.FlowSequence, fresh: fk.FlowSequence, inputs: tuple[torch.Tensor, ...]) -> None:
    """``seq`` (memos from before a change) computes what ``fresh`` (a copy made after it) does."""
    loss, grads = _loss_and_grads(seq, inputs)
    want_loss, want = _loss_and_grads(fresh, inputs)
    assert_rel_close(loss, want_loss, "forward")
    assert grads.keys() == want.keys()
    for name, g in grads.items():
        assert (g is None) == (want[name] is None), name
        if g is not None:
            assert_rel_close(g, want[name], "grad_level")


def test_a_replaced_submodule_is_used(backend):
    seq, inputs = _level()
    coupling = seq.steps[3].affine
    new = fk.Conv2dActNorm(coupling.fAffine[0].weight.shape[1], coupling.fAffine[0].weight.shape[0])
    new.actnorm.initialized = True
    _loss_and_grads(seq, inputs)  # memos filled (after ``new`` was built)
    coupling.fAffine[0] = new  # registered: a new epoch
    # seen by a direct query too, outside any layer call
    assert seq.steps[3].fold_terms()[3].weight is new.weight
    _check_same(seq, copy.deepcopy(seq), inputs)
    assert new.weight.grad is not None


def test_a_parameter_swapped_without_registration_is_used(backend):
    """``functional_call`` writes ``module._parameters`` directly; the call sees the swap, the
    gradient reaches the swapped-in tensor, and the next plain call sees the originals again."""
    seq, inputs = _level()
    x, cond, cot, cot_ld = inputs
    _loss_and_grads(seq, inputs)
    seq.zero_grad(set_to_none=True)
    name = "steps.3.affine.fFeatures.2.weight"
    swapped = (seq.get_parameter(name).detach() + 0.01 * torch.randn_like(seq.get_parameter(name))).requires_grad_()
    z, logdet = torch.func.functional_call(seq, {name: swapped}, (x, cond))
    ((z * cot).sum() + (logdet * cot_ld).sum()).backward()
    twin = copy.deepcopy(seq)
    with torch.no_grad():
        twin.get_parameter(name).copy_(swapped)
    want_z, _ = twin(x, cond)
    _, want = _loss_and_grads(twin, inputs)
    assert_rel_close(z, want_z, "forward")
    assert_rel_close(swapped.grad, want[name], "grad_level")
    assert seq.get_parameter(name).grad is None  # the original took no part
    _check_same(seq, copy.deepcopy(seq), inputs)  # and is used again afterwards


def test_requires_grad_is_read_per_call(backend):
    seq, inputs = _level()
    _loss_and_grads(seq, inputs)
    frozen = seq.steps[4].affine.fAffine[2].weight
    frozen.requires_grad_(False)
    _, grads = _loss_and_grads(seq, inputs)
    assert grads["steps.4.affine.fAffine.2.weight"] is None
    assert all(p is not frozen for p in seq.steps[4].trainable_parameters())
    frozen.requires_grad_(True)
    _check_same(seq, copy.deepcopy(seq), inputs)


def test_a_copy_keeps_its_own_memos(backend):
    """A deep copy (an EMA model) is its own tree: its memos hold its own parameters, and
    replacing a submodule of one leaves the other as it was."""
    seq, inputs = _level()
    _loss_and_grads(seq, inputs)
    twin = copy.deepcopy(seq)
    _loss_and_grads(twin, inputs)
    for model in (seq, twin):
        assert model.steps[3].fold_terms()[-1].weight is model.steps[3].affine.fAffine[4].weight
    before = copy.deepcopy(seq)
    twin.steps[3].affine.fAffine[4] = fk.Conv2dZeros(16, 2 * (C - C // 2))
    _check_same(seq, before, inputs)


def test_a_training_step_keeps_the_memos():
    """Nothing in an SRFlow training step registers a module or parameter (which would start a
    new epoch and rebuild every memo on every step: correct, but the host time this saves)."""
    model = srflow.SRFlow.from_preset("tiny-4x", memory_saving=True, backend="cuda", seed=0)
    hr = torch.rand(2, 3, 16, 16)
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    model.initialize_actnorms(hr, lr)
    model.train()
    model.nll(hr, lr).mean().backward()
    step = next(m for m in model.modules() if isinstance(m, fk.FlowStep) and m.affine is not None)
    terms, epoch = step.fold_terms(), _structure._Epoch.value
    model.nll(hr, lr).mean().backward()
    assert _structure._Epoch.value == epoch
    assert step.fold_terms() is terms


def test_a_parameter_moved_between_modules_without_registration_starts_a_new_epoch():
    """The check compares the tree's held objects in one flat sequence; a parameter moved from one
    module's dict to the next one's leaves that sequence as it was, and is caught by the dicts'
    sizes."""
    first, second = torch.nn.Module(), torch.nn.Module()
    first.weight = torch.nn.Parameter(torch.zeros(2))
    root = torch.nn.Sequential(first, second)
    _structure.check_structure(root)
    epoch = _structure._Epoch.value
    _structure.check_structure(root)
    assert _structure._Epoch.value == epoch  # nothing changed: the memos stay
    second._parameters["weight"] = first._parameters.pop("weight")
    _structure.check_structure(root)
    assert _structure._Epoch.value > epoch
