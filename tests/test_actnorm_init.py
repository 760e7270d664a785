"""ActNorm data-dependent initialisation: once, from the first training batch, not in eval, not
after loading a checkpoint, never inside the memory-saving recompute, all-reduced under DDP."""

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


def test_first_training_batch_initialises_every_actnorm():
    flow = _flow().train()
    x, cond = torch.randn(8, C, 6, 6) * 3 + 1, torch.randn(8, COND, 6, 6)
    flow(x, cond)
    norms = _actnorms(flow)
    assert len(norms) == 3 + 2 * 2  # three flow ActNorms + two per subnet (injector, coupling)
    assert all(m.initialized for m in norms)
    # the first ActNorm normalises its own input: zero mean, unit std per channel
    first = flow.steps[0].actnorm
    y = (x + first.bias) * torch.exp(first.logs)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(C), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(C), atol=1e-4, rtol=0)


def test_initialisation_happens_once():
    flow = _flow().train()
    cond = torch.randn(4, COND, 6, 6)
    flow(torch.randn(4, C, 6, 6), cond)
    after_first = _params(flow)
    flow(torch.randn(4, C, 6, 6) * 10, cond)
    for a, b in zip(after_first, _params(flow)):
        assert torch.equal(a, b)


def test_no_initialisation_in_eval():
    flow = _flow().eval()
    before = _params(flow)
    flow(torch.randn(4, C, 6, 6), torch.randn(4, COND, 6, 6))
    assert not any(m.initialized for m in _actnorms(flow))
    for a, b in zip(before, _params(flow)):
        assert torch.equal(a, b)


def test_loaded_checkpoint_is_not_reinitialised():
    trained = randomize_(_flow())
    fresh = _flow()
    assert not any(m.initialized for m in _actnorms(fresh))
    fresh.load_state_dict(trained.state_dict())
    assert all(m.initialized for m in _actnorms(fresh))
    fresh.train()(torch.randn(4, C, 6, 6) * 5, torch.randn(4, COND, 6, 6))
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
    x = torch.randn(4, C, 6, 6, requires_grad=True)
    z, ld = flow(x, torch.randn(4, COND, 6, 6))
    assert len(calls) == len(_actnorms(flow))  # each one, once, in the init pass
    for m in _actnorms(flow):  # make the recompute's forward think it could initialise
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
        flow.train()(x[rank * half : (rank + 1) * half], cond[rank * half : (rank + 1) * half])
        out[rank] = [p.detach().clone() for p in flow.parameters()]
    finally:
        dist.destroy_process_group()


def test_ddp_initialisation_is_all_reduced():
    """Two gloo ranks, each seeing half the batch, end with identical ActNorms equal to one
    process initialised on the whole batch."""
    flow = _flow()
    x, cond = torch.randn(8, C, 6, 6) * 2 + 0.5, torch.randn(8, COND, 6, 6)
    x[:4] += 3.0  # the halves differ, so a per-rank init would disagree
    single = copy.deepcopy(flow).train()
    single(x, cond)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), flow, x, cond, out), nprocs=2, join=True)
        ranks = [out[0], out[1]]
    for p0, p1, ps in zip(*ranks, single.parameters()):
        assert torch.equal(p0, p1), "ranks disagree after init"
        torch.testing.assert_close(p0, ps.detach(), rtol=1e-5, atol=1e-5)


def test_first_training_batch_under_bf16_autocast():
    """The initialisation pass runs the layers unfused; under bf16 autocast the flow state must
    stay float32 there too (only the subnets run in bf16)."""
    flow = _flow().train()
    x, cond = torch.randn(4, C, 6, 6), torch.randn(4, COND, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = flow(x, cond)
    assert z.dtype == torch.float32 and logdet.dtype == torch.float32
    assert all(m.initialized for m in _actnorms(flow))
