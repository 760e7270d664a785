"""Level batching of the conditioning convolutions (FlowSequence ``cond_batching``) against the
per-step path: outputs, inverses and every gradient (input, conditioning, parameters), with
memory saving on and off, the parts kept or recomputed, and one, several or per-step chunks.

Both paths are judged against float64 stored-activation autograd, within a multiple of fp32
stored-activation autograd's own error on the same (kink-free) input (tests/oracle.py), so the
verdict does not depend on how a machine rounds."""

from __future__ import annotations

import copy

import pytest
import torch

import flowkernels as fk
from flowkernels.layers._cond_parts import plan_chunks
from tests.helpers import level_inputs, randomize_, trained_level
from tests.oracle import level_case, outputs_and_grads, reference_of
from tests.tolerances import BF16_ERROR_RATIO, REL_TOL, rel_err

C, COND, HW = 12, 6, 6  # level-1 SRFlow channels, a small conditioning tensor, tiny images
STEP_PART_BYTES = 2 * 16 * 2 * HW * HW * 4  # one SRFlow step's parts: 2 subnets x hidden 16, batch 2, fp32

CHUNKS = {
    "per-step": 0,  # every step its own chunk (one convolution for both subnets)
    "several": 2 * STEP_PART_BYTES,  # chunks of 2 coupling steps
    "one": 2**40,  # the whole sequence in one chunk
}


def _available_backends() -> list:
    reasons = fk.dispatch.refusals("cuda", torch.zeros(1, C, 2, 2))
    return ["reference", pytest.param("cuda", marks=pytest.mark.skipif(bool(reasons), reason="; ".join(reasons)))]


def _pair(seq: fk.FlowSequence, chunk_bytes: int, keep: bool) -> tuple[fk.FlowSequence, fk.FlowSequence]:
    """The same sequence twice: batched with these options, and per-step."""
    batched = copy.deepcopy(seq)
    batched.set_cond_batching(True, chunk_bytes=chunk_bytes, keep_parts=keep)
    per_step = copy.deepcopy(seq)
    per_step.set_cond_batching(False)
    return batched, per_step


def _inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    return level_inputs(batch, C, COND, HW)


@pytest.mark.parametrize("backend", _available_backends())
@pytest.mark.parametrize("memory_saving", [True, False], ids=["saving", "plain"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("chunks", list(CHUNKS), ids=list(CHUNKS))
@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
def test_batched_and_per_step_match_float64(backend: str, memory_saving: bool, reverse: bool, chunks: str, keep: bool):
    case = level_case(8, C, COND, HW, reverse=reverse, memory_saving=memory_saving)
    reference = case.reference()
    batched, per_step = _pair(case.seq, CHUNKS[chunks], keep)
    with fk.use_backend(backend):
        reference.check(case.run(batched), "batched")
        reference.check(case.run(per_step), "per-step")


@pytest.mark.parametrize("backend", _available_backends())
def test_batched_and_per_step_channels_last(backend: str):
    """channels_last flow state and conditioning (the parts and their slices keep that layout)."""
    case = level_case(6, C, COND, HW)
    case.x, case.cond, case.cot = (
        t.contiguous(memory_format=torch.channels_last) for t in (case.x, case.cond, case.cot)
    )
    reference = case.reference()
    batched, per_step = _pair(case.seq, CHUNKS["several"], False)
    with fk.use_backend(backend):
        got, want = case.run(batched), case.run(per_step)
    assert got[0].stride() == want[0].stride()  # the same output layout as the per-step path
    reference.check(got, "batched")
    reference.check(want, "per-step")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
def test_batched_no_grad_equals_per_step(reverse: bool):
    """Sampling/encoding without autograd (the path SRFlow's sample and decode take)."""
    x, cond, _, _ = _inputs()
    with fk.use_backend("reference"):
        seq = trained_level(8, C, COND, x, cond).eval()
        batched, per_step = _pair(seq, CHUNKS["several"], False)
        with torch.no_grad():
            got = batched.inverse(x, cond) if reverse else batched(x, cond)
            want = per_step.inverse(x, cond) if reverse else per_step(x, cond)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= REL_TOL["forward"]


def test_frozen_conditioning_and_frozen_first_convolution():
    """A frozen encoder (cond without grad) and a frozen first-conv weight: no cond gradient is
    computed, the frozen weight gets none, and every other gradient matches."""
    case = level_case(6, C, COND, HW)
    case.seq.steps[3].affine.fAffine[0].weight.requires_grad_(False)
    reference = case.reference(cond_grad=False)
    batched, per_step = _pair(case.seq, CHUNKS["several"], False)
    with fk.use_backend("reference"):
        reference.check(case.run(batched, cond_grad=False), "batched")
        reference.check(case.run(per_step, cond_grad=False), "per-step")


def test_conditional_glow_with_affine_couplings():
    """The generic case of docs/ops.md: a conditional Glow of FlowSteps with
    ``AffineCoupling(cond_channels > 0)`` (one subnet reading cat(x1, cond)), odd sizes."""
    x, cond = torch.randn(3, 6, 5, 7), torch.randn(3, 4, 5, 7)
    steps = [randomize_(fk.FlowStep(6, fk.AffineCoupling(6, cond_channels=4, hidden=8))) for _ in range(5)]
    seq = fk.FlowSequence(steps)
    batched, per_step = _pair(seq, 0, False)
    cot, cot_ld = torch.randn_like(x), torch.randn(3)
    reference = reference_of(seq, x, cond, cot, cot_ld)
    with fk.use_backend("reference"):
        reference.check(outputs_and_grads(batched, x, cond, cot, cot_ld), "batched")
        reference.check(outputs_and_grads(per_step, x, cond, cot, cot_ld), "per-step")


def test_bf16_batched_error_is_that_of_bf16_per_step():
    """Under bf16 autocast the parts are bf16 like the per-step subnets' convolutions. At these
    tiny sizes single bf16 gradients err by 10-40% against fp32 either way, tensor by tensor at
    random, so the bound is on the worst tensor: the batched path's worst error against fp32 is
    at most BF16_ERROR_RATIO times the per-step path's."""
    x, cond, cot, cot_ld = _inputs()
    with fk.use_backend("reference"):
        seq = trained_level(6, C, COND, x, cond)
        batched, per_step = _pair(seq, CHUNKS["several"], False)
        fp32 = outputs_and_grads(per_step, x, cond, cot, cot_ld)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = outputs_and_grads(batched, x, cond, cot, cot_ld)
            want = outputs_and_grads(per_step, x, cond, cot, cot_ld)
    assert got[0].dtype == torch.float32
    worst_batched = max(rel_err(g, f) for g, f in zip(got, fp32))
    worst_per_step = max(rel_err(w, f) for w, f in zip(want, fp32))
    assert worst_batched <= BF16_ERROR_RATIO * max(worst_per_step, REL_TOL["grad_level"])


def test_chunks_follow_the_byte_budget():
    """Chunks hold whole steps within the budget (at least one each); plain steps join a chunk."""
    x, cond, _, _ = _inputs()
    steps = list(trained_level(8, C, COND, x, cond).steps)  # 2 plain steps, then 6 coupling steps
    projections = [s.cond_projections() for s in steps]
    assert [len(p) for p in projections] == [0, 0, 2, 2, 2, 2, 2, 2]
    for budget, sizes in ((0, [3, 1, 1, 1, 1, 1]), (2 * STEP_PART_BYTES, [4, 2, 2]), (2**40, [8])):
        chunks = plan_chunks(projections, cond, budget)
        assert [c.stop - c.start for c in chunks] == sizes
        assert chunks[0].start == 0 and chunks[-1].stop == len(steps)
        assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))


def test_one_convolution_over_cond_per_chunk(monkeypatch: pytest.MonkeyPatch):
    """With one chunk, the conditioning tensor is convolved once in forward (not 2 x 6 times)."""
    x, cond, _, _ = _inputs()
    seq = trained_level(8, C, COND, x, cond).eval()
    seq.set_cond_batching(True, chunk_bytes=2**40)
    reads = []
    conv2d = torch.nn.functional.conv2d

    def counting(inp: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        reads.append(inp is cond)
        return conv2d(inp, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", counting)
    with fk.use_backend("reference"), torch.no_grad():
        seq(x, cond)
    assert sum(reads) == 1


def test_invalid_chunk_budget_is_refused():
    seq = fk.FlowSequence([fk.FlowStep(4)])
    with pytest.raises(ValueError, match="cond_chunk_bytes: expected a non-negative integer or None, got -1"):
        seq.set_cond_batching(True, chunk_bytes=-1)
