"""ActNorm data-dependent initialisation: explicit (``FlowSequence.initialize_`` /
``fk.initialize_actnorms``), once, not after loading a checkpoint, never inside the memory-saving
recompute, all-reduced under DDP; training with uninitialised ActNorms raises, eval is identity."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flowkernels as fk
from tests.helpers import randomize_

C, COND = 6, 4


@pytest.fixture(autouse=True)
def _reference_backend():
    with fk.use_backend("reference"):
        yield


def _flow() -> fk.FlowSequence:
    steps = [fk.FlowStep(C), fk.FlowStep(C, fk.CondAffineCoupling(C, COND, hidden=8)), fk.FlowStep(C)]
    return fk.FlowSequence(steps)


def _actnorms(module: torch.nn.Module) -> list[fk.ActNorm]:
    return [m for m in module.modules() if isinstance(m, fk.ActNorm)]


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_initialize_sets_every_actnorm_from_the_first_batch():
    flow = _flow().train()
    x, cond = torch.randn(8, C, 6, 6) * 3 + 1, torch.randn(8, COND, 6, 6)
    norms = _actnorms(flow)
    assert len(norms) == 3 + 2 * 2  # three flow ActNorms + two per subnet (injector, coupling)
    assert flow.initialize_(x, cond) == len(norms)
    assert all(m.initialized for m in norms)
    # the first ActNorm normalises its own input: zero mean, unit std per channel
    first = flow.steps[0].actnorm
    y = (x + first.bias) * torch.exp(first.logs)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(C), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(C), atol=1e-4, rtol=0)


def test_initialize_actnorms_takes_any_forward():
    step = fk.FlowStep(C, fk.CondAffineCoupling(C, COND, hidden=8))
    x, cond = torch.randn(4, C, 6, 6), torch.randn(4, COND, 6, 6)
    assert fk.initialize_actnorms(step, lambda: step(x, cond)) == 1 + 2 * 2
    assert all(m.initialized for m in _actnorms(step))


def test_initialisation_happens_once_and_forward_never_initialises():
    flow = _flow().train()
    cond = torch.randn(4, COND, 6, 6)
    flow.initialize_(torch.randn(4, C, 6, 6), cond)
    after_first = _params(flow)
    assert flow.initialize_(torch.randn(4, C, 6, 6) * 10, cond) == 0
    flow(torch.randn(4, C, 6, 6) * 10, cond)
    for a, b in zip(after_first, _params(flow)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_training_with_uninitialised_actnorms_raises(direction: str):
    flow = _flow().train()
    x, cond = torch.randn(4, C, 6, 6), torch.randn(4, COND, 6, 6)
    call = flow if direction == "forward" else flow.inverse
    with pytest.raises(RuntimeError, match=r"FlowSequence: ActNorm2d 'steps.0.actnorm' \(and 6 more\) has not been"):
        call(x, cond)
    with pytest.raises(RuntimeError, match=r"flow.initialize_\(x, cond\).*fk.initialize_actnorms"):
        fk.ActNorm2d(C)(x)
    assert not any(m.initialized for m in _actnorms(flow))


def test_uninitialised_actnorms_are_the_identity_in_eval():
    flow = _flow().eval()
    before = _params(flow)
    x = torch.randn(4, C, 6, 6)
    flow(x, torch.randn(4, COND, 6, 6))
    assert not any(m.initialized for m in _actnorms(flow))
    for a, b in zip(before, _params(flow)):
        assert torch.equal(a, b)
    y, logdet = fk.ActNorm2d(C).eval()(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(4))


def test_loaded_checkpoint_is_not_reinitialised():
    trained = randomize_(_flow())
    fresh = _flow()
    assert not any(m.initialized for m in _actnorms(fresh))
    fresh.load_state_dict(trained.state_dict())
    assert all(m.initialized for m in _actnorms(fresh))
    assert fresh.train().initialize_(torch.randn(4, C, 6, 6) * 5, torch.randn(4, COND, 6, 6)) == 0
    fresh(torch.randn(4, C, 6, 6) * 5, torch.randn(4, COND, 6, 6))
    for a, b in zip(_params(trained), _params(fresh)):
        assert torch.equal(a, b)
    # official rule: an all-zero ActNorm in a loaded state_dict still counts as uninitialised
    other = _flow()
    other.load_state_dict(_flow().state_dict())
    assert not any(m.initialized for m in _actnorms(other))


def test_never_initialised_inside_the_recompute(monkeypatch: pytest.MonkeyPatch):
    flow = _flow().train()
    calls: list[int] = []
    original = fk.ActNorm.initialize_

    def counting(self, x):
        calls.append(id(self))
        return original(self, x)

    monkeypatch.setattr(fk.ActNorm, "initialize_", counting)
    x, cond = torch.randn(4, C, 6, 6, requires_grad=True), torch.randn(4, COND, 6, 6)
    flow.initialize_(x, cond)
    assert len(calls) == len(_actnorms(flow))  # each one, once, in the init pass
    z, ld = flow(x, cond)
    for m in _actnorms(flow):  # make the recompute think it could initialise (or should refuse)
        m.initialized = False
    (z.sum() + ld.sum()).backward()
    assert len(calls) == len(_actnorms(flow)), "an ActNorm was initialised inside the backward recompute"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, flow: fk.FlowSequence, x, cond, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = x.shape[0] // world
        flow.train().initialize_(x[rank * half : (rank + 1) * half], cond[rank * half : (rank + 1) * half])
        out[rank] = [p.detach().clone() for p in flow.parameters()]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_initialisation_is_all_reduced():
    """Two gloo ranks, each seeing half the batch, end with identical ActNorms equal to one
    process initialised on the whole batch."""
    flow = _flow()
    x, cond = torch.randn(8, C, 6, 6) * 2 + 0.5, torch.randn(8, COND, 6, 6)
    x[:4] += 3.0  # the halves differ, so a per-rank init would disagree
    single = copy.deepcopy(flow).train()
    single.initialize_(x, cond)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), flow, x, cond, out), nprocs=2, join=True)
        ranks = [out[0], out[1]]
    for p0, p1, ps in zip(*ranks, single.parameters()):
        assert torch.equal(p0, p1), "ranks disagree after init"
        torch.testing.assert_close(p0, ps.detach(), rtol=1e-5, atol=1e-5)


def test_initialisation_under_bf16_autocast():
    """The initialisation pass runs the layers unfused; under bf16 autocast the flow state must
    stay float32 there too (only the subnets run in bf16)."""
    flow = _flow().train()
    x, cond = torch.randn(4, C, 6, 6), torch.randn(4, COND, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flow.initialize_(x, cond)
        z, logdet = flow(x, cond)
    assert z.dtype == torch.float32 and logdet.dtype == torch.float32
    assert all(m.initialized for m in _actnorms(flow))
