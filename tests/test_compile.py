"""torch.compile(fullgraph=True) over the layers with the C++ and reference backends on the CPU:
FlowStep and a memory-saving FlowSequence trace without graph breaks, forward, inverse and the
recompute backward (through AOTAutograd), with our ops in the graph and eager results.

The Triton backend's compile tests are in test_triton_compile.py (under the interpreter only
Dynamo can run, not AOTAutograd).
"""

from __future__ import annotations

import pytest
import torch

import flowkernels as fk
from tests.helpers import trained_level
from tests.kernel_grid import kernel_backend
from tests.oracle import level_case
from tests.tolerances import assert_rel_close

C, COND = 12, 5


@pytest.fixture(params=["reference", "cuda"])
def backend(request: pytest.FixtureRequest) -> str:
    """The reference, and the C++ kernels (skipped with the reason where they cannot run)."""
    if request.param != "reference":
        kernel_backend(request.param, "cpu")
    return request.param


def _capture(graphs: list, inner: str = "aot_eager"):
    """A compile backend that records Dynamo's graph, then hands it to ``inner``."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return lookup_backend(inner)(gm, example_inputs)

    return backend


def _ops(graphs: list) -> set[str]:
    """Our ops anywhere in the captured graphs, including an autograd.Function's fwd/bwd bodies."""
    modules = [m for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)]
    return {str(n.target) for m in modules for n in m.graph.nodes if "flowkernels" in str(n.target)}


@pytest.mark.slow
def test_flow_step_inference_compiles_fullgraph(backend: str):
    x, cond = torch.randn(2, C, 6, 6), torch.randn(2, COND, 6, 6)
    seq = trained_level(3, C, COND, x, cond).eval()
    step = seq.steps[-1]
    step.backend = backend
    graphs: list = []
    compiled = torch.compile(step, fullgraph=True, backend=_capture(graphs))
    compiled_inv = torch.compile(step.inverse, fullgraph=True, backend=_capture(graphs))
    with torch.no_grad():
        z, ld = compiled(x, cond)
        x_back, ld_back = compiled_inv(z, cond, ld)
        z_eager, ld_eager = step(x, cond)
    assert_rel_close(z, z_eager, "forward")
    assert_rel_close(ld, ld_eager, "forward")
    assert_rel_close(x_back, x, "inverse")
    if backend == "cuda":
        assert {"flowkernels.channel_affine_fwd", "flowkernels.affine_coupling_inv"} <= _ops(graphs)


@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
def test_memory_saving_training_compiles_fullgraph(backend: str, reverse: bool):
    """The unit's backward (subnet recompute via torch.func.vjp, bwd kernels) traces under
    AOTAutograd; outputs and gradients within the fp32 noise of float64 (tests/oracle.py)."""
    case = level_case(5, C, COND, 6, reverse=reverse, keep_every=2)
    case.seq.train()
    for step in case.seq.steps:
        step.backend = backend
    reference = case.reference()
    graphs: list = []
    name = "inverse" if reverse else "forward"
    # an instance attribute: the compiled method is what case.run calls
    setattr(case.seq, name, torch.compile(getattr(case.seq, name), fullgraph=True, backend=_capture(graphs)))
    reference.check(case.run(), f"compiled {name}")
    if backend == "cuda":
        assert "flowkernels.affine_coupling_bwd" in _ops(graphs)


@pytest.mark.slow
def test_compiling_leaves_eager_behaviour_unchanged():
    """Tracing must not leave layer modes behind (Dynamo replays state changes made inside a
    traced region): a fresh model still refuses to train uninitialised ActNorms, initialises them
    explicitly, and still scans for NaN."""
    x, cond = torch.randn(2, C, 6, 6), torch.randn(2, COND, 6, 6)
    seq = trained_level(3, C, COND, x, cond).train()
    z, ld = torch.compile(seq, fullgraph=True, backend="aot_eager")(x.clone().requires_grad_(True), cond)
    (z.sum() + ld.sum()).backward()
    fresh = fk.FlowSequence([fk.FlowStep(C, fk.CondAffineCoupling(C, COND, 8))]).train()
    with pytest.raises(RuntimeError, match="has not been initialised"):
        fresh(x, cond)
    fresh.initialize_(x, cond)
    assert all(m.initialized for m in fresh.modules() if isinstance(m, fk.ActNorm))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fresh(bad, cond)
