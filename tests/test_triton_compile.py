"""torch.compile(fullgraph=True) over the Triton ops: the ops must appear in the traced graph and
give the eager results.

Without CUDA the kernels run under Triton's interpreter and only Dynamo runs: the captured
graph is executed as is (the ops call the interpreter). AOTAutograd and Inductor cannot run
there: AOT decomposes a ``triton_op`` by tracing its launcher on fake tensors, and under
``TRITON_INTERPRET=1`` ``wrap_triton`` hands back the interpreted kernel itself, which copies
tensor storage to the host ("Attempted to access the data pointer on an invalid python
storage"); Inductor has no CPU code generation for user Triton kernels either. The Inductor
checks are therefore ``gpu`` tests.

The op-level tests write a step with the registered ops directly, in the order FlowStep runs
them; the module-level tests compile FlowStep and a memory-saving FlowSequence themselves
(the backend must have been loaded eagerly before compiling, as the ``triton`` fixture does).
"""

from __future__ import annotations

import copy

import pytest
import torch

import flowkernels as fk
from flowkernels.dispatch import refusals
from flowkernels.ops import fold
from tests.helpers import cond_step, run_python
from tests.kernel_grid import DEVICES, Kernel, kernel_backend, to_layout
from tests.oracle import outputs_and_grads, reference_of
from tests.tolerances import ROUND_TRIP_ABS, assert_rel_close

pytestmark = pytest.mark.slow  # each test pays a Dynamo trace
ops = torch.ops.flowkernels
C, COND = 12, 5


@pytest.fixture(params=DEVICES)
def triton(request: pytest.FixtureRequest) -> Kernel:
    """The Triton backend, loaded eagerly (Dynamo cannot import it) on each device."""
    return kernel_backend("triton", request.param)


@pytest.fixture
def triton_cuda() -> Kernel:
    """The compiled Triton backend, for the Inductor tests (``gpu`` marker)."""
    return kernel_backend("triton", "cuda")


def _dynamo_capture(graphs: list):
    """A torch.compile backend that records Dynamo's FX graph and runs it unchanged."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    return backend


def _inductor_capture(graphs: list):
    """Records Dynamo's FX graph, then compiles it with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    return backend


def _ops_in(graphs: list) -> set[str]:
    return {str(n.target) for g in graphs for n in g.graph.nodes if str(n.target).startswith("flowkernels.")}


def _step_forward_inverse(step: fk.FlowStep, x: torch.Tensor, cond: torch.Tensor):
    """FlowStep forward then inverse (no grad), with the registered Triton ops directly."""
    b, c, height, width = x.shape
    w_inv, logabsdet = step.invconv.inverse_stats()
    params = (step.invconv.matrix(), step.actnorm.logs, step.actnorm.bias, height * width)
    fwd = fold(*params, weight_inv=w_inv, logabsdet=logabsdet)
    inv = fold(*params, reverse=True, weight_inv=w_inv, logabsdet=logabsdet)
    cpl = step.affine
    logdet = x.new_zeros(b)
    y = ops.channel_affine_fwd_triton(x, fwd.matrix, fwd.offset, fwd.logdet_term, logdet)
    y = ops.affine_coupling_fwd_triton(y, cpl.fFeatures(cond), logdet, 0, True, cpl.eps)
    h = cpl.fAffine(torch.cat([y[:, : c // 2], cond], dim=1))
    z = ops.affine_coupling_fwd_triton(y, h, logdet, c // 2, True, cpl.eps)
    back = logdet.clone()
    h = cpl.fAffine(torch.cat([z[:, : c // 2], cond], dim=1))
    y = ops.affine_coupling_inv_triton(z, h, back, c // 2, True, cpl.eps)
    y = ops.affine_coupling_inv_triton(y, cpl.fFeatures(cond), back, 0, True, cpl.eps)
    x_back = ops.channel_affine_fwd_triton(y, inv.matrix, inv.offset, inv.logdet_term, back)
    return z, logdet, x_back, back


def _recompute_backward(out, grad_out, grad_logdet, h_affine, h_features, cmap):
    """The kernel chain of one step's memory-saving backward (coupling, injector, actnorm+1x1)."""
    c = out.shape[1]
    inp, grad_inp, grad_h_affine = ops.affine_coupling_bwd_triton(
        out, h_affine, grad_out, grad_logdet, c // 2, True, fk.ops.SRFLOW_EPS, False
    )
    inp, grad_inp, grad_h_features = ops.affine_coupling_bwd_triton(
        inp, h_features, grad_inp, grad_logdet, 0, True, fk.ops.SRFLOW_EPS, False
    )
    inp, grad_inp, grad_matrix, grad_offset = ops.channel_affine_bwd_triton(
        inp, grad_inp, cmap.matrix, cmap.matrix_inv, cmap.inv_offset
    )
    return inp, grad_inp, grad_h_affine, grad_h_features, grad_matrix, grad_offset


def _step_and_inputs(device: str, channels_last: bool = False):
    step = cond_step(C, COND, hidden=8).to(device).eval()
    x = to_layout(torch.randn(2, C, 5, 3, device=device), channels_last)
    cond = to_layout(torch.randn(2, COND, 5, 3, device=device), channels_last)
    return step, x, cond


def _check_forward_inverse(backend_factory, device: str) -> None:
    step, x, cond = _step_and_inputs(device)
    graphs: list = []
    compiled = torch.compile(_step_forward_inverse, fullgraph=True, backend=backend_factory(graphs))
    with torch.no_grad():
        z, logdet, x_back, back = compiled(step, x, cond)
        with fk.use_backend("triton"):
            z_eager, logdet_eager = step(x, cond)
    assert len(graphs) == 1
    assert _ops_in(graphs) == {
        "flowkernels.channel_affine_fwd_triton",
        "flowkernels.affine_coupling_fwd_triton",
        "flowkernels.affine_coupling_inv_triton",
    }
    assert_rel_close(z, z_eager, "forward")
    assert_rel_close(logdet, logdet_eager, "forward")
    assert (x_back - x).abs().max().item() <= ROUND_TRIP_ABS["module"]
    assert back.abs().max().item() <= 1e-5 * logdet.abs().max().item()


def _check_backward_chain(backend_factory, device: str) -> None:
    step, out, cond = _step_and_inputs(device, channels_last=True)
    with torch.no_grad():
        h_affine = step.affine.fAffine(torch.cat([out[:, : C // 2], cond], dim=1))
        h_features = step.affine.fFeatures(cond)
        cmap = fold(step.invconv.matrix(), step.actnorm.logs, step.actnorm.bias, 15)
        args = (out, torch.randn_like(out), torch.randn(2, device=device), h_affine, h_features, cmap)
        graphs: list = []
        compiled = torch.compile(_recompute_backward, fullgraph=True, backend=backend_factory(graphs))
        got = compiled(*args)
        want = _recompute_backward(*args)
    assert len(graphs) == 1
    assert _ops_in(graphs) == {
        "flowkernels.affine_coupling_bwd_triton",
        "flowkernels.channel_affine_bwd_triton",
    }
    for g, w in zip(got, want):
        assert_rel_close(g, w, "grad")


def test_dynamo_fullgraph_step_forward_inverse(triton: Kernel):
    _check_forward_inverse(_dynamo_capture, triton.device)


def test_dynamo_fullgraph_recompute_backward(triton: Kernel):
    _check_backward_chain(_dynamo_capture, triton.device)


@pytest.mark.gpu
def test_inductor_fullgraph_step_forward_inverse(triton_cuda: Kernel):
    _check_forward_inverse(_inductor_capture, triton_cuda.device)


@pytest.mark.gpu
def test_inductor_fullgraph_recompute_backward(triton_cuda: Kernel):
    _check_backward_chain(_inductor_capture, triton_cuda.device)


@pytest.mark.gpu
def test_inductor_inlines_the_user_kernels(triton_cuda: Kernel):
    """Inductor sees through triton_op: its generated code launches our kernels by name."""
    from torch._inductor.utils import run_and_get_code

    step, x, cond = _step_and_inputs(triton_cuda.device)
    compiled = torch.compile(_step_forward_inverse, fullgraph=True)
    with torch.no_grad():
        _, code = run_and_get_code(compiled, step, x, cond)
    source = "\n".join(code)
    for kernel in (
        "_channel_affine_fwd_kernel",
        "_affine_coupling_apply_kernel",
        "_logdet_reduce_kernel",
    ):
        assert kernel in source, f"{kernel} not in Inductor's output code"


def _module_ops(graphs: list) -> set[str]:
    """Our ops anywhere in the captured graphs, including an autograd.Function's fwd/bwd bodies."""
    modules = [m for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)]
    return {str(n.target) for m in modules for n in m.graph.nodes if str(n.target).startswith("flowkernels.")}


def test_dynamo_fullgraph_flow_step_module(triton: Kernel):
    step, x, cond = _step_and_inputs(triton.device)
    step.backend = "triton"
    graphs: list = []
    compiled = torch.compile(step, fullgraph=True, backend=_dynamo_capture(graphs))
    with torch.no_grad():
        z, logdet = compiled(x, cond)
        z_eager, logdet_eager = step(x, cond)
    assert {"flowkernels.channel_affine_fwd_triton", "flowkernels.affine_coupling_fwd_triton"} <= _module_ops(graphs)
    assert_rel_close(z, z_eager, "forward")
    assert_rel_close(logdet, logdet_eager, "forward")


def test_dynamo_fullgraph_memory_saving_training(triton: Kernel):
    """A memory-saving FlowSequence with the Triton backend: forward and the recompute
    backward trace as one graph (Dynamo captures the unit with its backward body); outputs and
    gradients within the fp32 noise of float64 (tests/oracle.py)."""
    step, x, cond = _step_and_inputs("cpu")
    seq = fk.FlowSequence([step, copy.deepcopy(step)]).train()
    cot, cot_ld = torch.randn_like(x), torch.randn(x.shape[0])
    reference = reference_of(seq, x, cond, cot, cot_ld)
    seq = seq.to(triton.device)
    for s in seq.steps:
        s.backend = "triton"
    graphs: list = []
    seq.forward = torch.compile(seq.forward, fullgraph=True, backend=_dynamo_capture(graphs))
    reference.check(outputs_and_grads(seq, *(t.to(triton.device) for t in (x, cond, cot, cot_ld))), "compiled")
    assert "flowkernels.affine_coupling_bwd_triton" in _module_ops(graphs)


_FRESH_PROCESS = """
import torch
import flowkernels as fk
from tests.helpers import cond_step

fk.check_backend_available("triton", "cpu")
step = cond_step(12, 5, hidden=8).eval()
step.backend = "triton"
x, cond = torch.randn(2, 12, 5, 3), torch.randn(2, 5, 5, 3)
with torch.no_grad():
    z, logdet = torch.compile(step, fullgraph=True, backend="eager")(x, cond)
    z_eager, logdet_eager = step(x, cond)
torch.testing.assert_close((z, logdet), (z_eager, logdet_eager))
"""


def test_preflight_loads_what_a_compiled_model_needs():
    """In a fresh process, ``check_backend_available("triton", ...)`` is all that is needed before
    compiling a model on the Triton backend: it imports the kernel modules that register the
    ``*_triton`` ops, which a trace cannot import (importing triton alone left the first traced
    call failing with "not loaded before torch.compile")."""
    why = refusals("triton", torch.empty(1, 2, 1, 1))
    if why:
        pytest.skip(f"the Triton backend cannot run on the CPU here: {'; '.join(why)}")
    done = run_python(_FRESH_PROCESS, timeout=300, TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr[-3000:]
