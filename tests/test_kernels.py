"""Every kernel backend against the reference: the registered ops ``torch.ops.flowkernels.*``
(C++ on the CPU, CUDA and Triton on a GPU, Triton under the interpreter on the CPU) and the
public wrappers, over the grid of tests/kernel_grid.py, plus memory-saving FlowSequence
gradients end to end on each backend.

Outputs are NaN-poisoned before every launch (tests/conftest.py), so elements a kernel does not
write fail the comparisons. Log-det buffers are pre-filled: the ops must add into them. fp32
results meet ``REL_TOL`` against the float64 reference; with a bf16 subnet output a kernel may
err at most ``BF16_ERROR_RATIO`` times eager PyTorch with the same bf16 input (DESIGN.md 7).
The backend-specific tests (error messages, opcheck, determinism, grid-stride loops) are in
test_cpp_kernels.py and test_triton_kernels.py.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import pytest
import torch

import flowkernels as fk
from flowkernels import reference
from flowkernels.dispatch import select_backend
from tests.helpers import level_inputs, trained_level
from tests.kernel_grid import (
    BF16_SHAPES,
    EPS,
    KERNELS,
    LAYOUTS,
    PASSIVE,
    SHAPES,
    X_LAYOUTS,
    Kernel,
    channel_map,
    coupling_inputs,
    f64,
    is_layout,
    kernel_backend,
    selected_isa,
    to_layout,
)
from tests.oracle import LevelCase, level_case, outputs_and_grads, smooth_relus_
from tests.tolerances import BF16_ERROR_RATIO, REL_TOL, assert_rel_close, rel_err

shapes = pytest.mark.parametrize("shape", SHAPES)
x_layouts = pytest.mark.parametrize("channels_last", list(X_LAYOUTS.values()), ids=list(X_LAYOUTS))
passive_kinds = pytest.mark.parametrize("passive_kind", list(PASSIVE))
shift_firsts = pytest.mark.parametrize("shift_first", [True, False], ids=["shift_first", "scale_first"])
reverses = pytest.mark.parametrize("reverse", [False, True], ids=["of_forward", "of_inverse"])


def coupling_grid(shape_list: list, shift_first: bool = True):
    """Parametrise a coupling test over shape x (x, h) layouts x passive kind, and x shift_first
    for the affine ops (``shift_first=False``: the additive ops, which have no scale)."""
    marks = [
        passive_kinds,
        pytest.mark.parametrize("layout", list(LAYOUTS)),
        pytest.mark.parametrize("shape", shape_list),
    ]

    def apply(test):
        for mark in [shift_firsts, *marks] if shift_first else marks:
            test = mark(test)
        return test

    return apply


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    kernel = kernel_backend(*request.param)
    with selected_isa(kernel):
        yield kernel


def test_outputs_are_poisoned_in_this_session():
    """The premise of every comparison below: launchers fill outputs with NaN first."""
    assert os.environ.get("FLOWKERNELS_POISON_OUTPUTS") == "1"


# ---- affine coupling / injector ----


COUPLING_DIRECTIONS = {  # op direction -> (reference, tolerance key)
    "fwd": (reference.affine_coupling_fwd, "forward"),
    "inv": (reference.affine_coupling_inv, "inverse"),
}


@pytest.mark.parametrize("direction", list(COUPLING_DIRECTIONS))
@coupling_grid(SHAPES)
def test_affine_coupling(kernel: Kernel, shape, layout, passive_kind, shift_first, direction):
    """y (or x) in the input's layout, and the log-det added into a pre-filled buffer."""
    passive = PASSIVE[passive_kind](shape[1])
    inp, h = coupling_inputs(shape, passive, layout, kernel.device)
    ref, what = COUPLING_DIRECTIONS[direction]
    logdet = torch.randn(shape[0], device=kernel.device)
    before = logdet.clone()
    out = kernel.op(f"affine_coupling_{direction}")(inp, h, logdet, passive, shift_first, EPS)
    want, dlogdet = ref(*f64(inp, h), passive, shift_first, EPS)
    assert is_layout(out, LAYOUTS[layout][0])
    assert_rel_close(out, want, what)
    assert_rel_close(logdet - before, dlogdet, what)


@reverses
@coupling_grid(SHAPES)
def test_affine_coupling_bwd(kernel: Kernel, shape, layout, passive_kind, shift_first, reverse):
    """(inp, grad_inp, grad_h): inp in out's layout and grad_h in h's, grad_out in a third mix
    (h's layout)."""
    passive = PASSIVE[passive_kind](shape[1])
    out, h = coupling_inputs(shape, passive, layout, kernel.device)
    x_cl, h_cl = LAYOUTS[layout]
    grad_out = to_layout(torch.randn(shape, device=kernel.device), h_cl)
    grad_logdet = torch.randn(shape[0], device=kernel.device)
    args = (passive, shift_first, EPS, reverse)
    got = kernel.op("affine_coupling_bwd")(out, h, grad_out, grad_logdet, *args)
    want = reference.affine_coupling_bwd(*f64(out, h, grad_out, grad_logdet), *args)
    assert is_layout(got[0], x_cl) and is_layout(got[1], x_cl) and is_layout(got[2], h_cl)
    assert got[2].dtype == h.dtype
    for g, w, what in zip(got, want, ("inverse", "grad", "grad")):
        assert_rel_close(g, w, what)


def _assert_bf16_as_good_as_eager(got, eager, oracle, what: str) -> None:
    """Kernel error with bf16 h at most BF16_ERROR_RATIO x eager PyTorch's error with the same
    bf16 h, both against the float32-h oracle (floored at the fp32 tolerance for ~exact cases)."""
    err, err_eager = rel_err(got, oracle), rel_err(eager, oracle)
    bound = BF16_ERROR_RATIO * max(err_eager, REL_TOL[what])
    assert err <= bound, f"{what}: bf16 kernel error {err:.2e} > {bound:.2e} (eager bf16 {err_eager:.2e})"


def _bf16_inputs(kernel: Kernel, shape, layout: str, passive: int) -> tuple[torch.Tensor, ...]:
    """Flow state, the float32 subnet output and the same rounded to bf16, in h's layout."""
    x, h32 = coupling_inputs(shape, passive, layout, kernel.device)
    return x, h32, to_layout(h32.to(torch.bfloat16), LAYOUTS[layout][1])


@pytest.mark.parametrize("direction", list(COUPLING_DIRECTIONS))
@coupling_grid(BF16_SHAPES)
def test_affine_coupling_bf16_h(kernel: Kernel, shape, layout, passive_kind, shift_first, direction):
    passive = PASSIVE[passive_kind](shape[1])
    x, h32, h16 = _bf16_inputs(kernel, shape, layout, passive)
    ref, what = COUPLING_DIRECTIONS[direction]
    logdet = torch.zeros(shape[0], device=kernel.device)
    got = kernel.op(f"affine_coupling_{direction}")(x, h16, logdet, passive, shift_first, EPS)
    oracle, oracle_ld = ref(*f64(x, h32), passive, shift_first, EPS)
    eager, eager_ld = ref(x, h16, passive, shift_first, EPS)
    _assert_bf16_as_good_as_eager(got, eager, oracle, what)
    _assert_bf16_as_good_as_eager(logdet, eager_ld, oracle_ld, what)


@reverses
@coupling_grid(BF16_SHAPES)
def test_affine_coupling_bwd_bf16_h(kernel: Kernel, shape, layout, passive_kind, shift_first, reverse):
    passive = PASSIVE[passive_kind](shape[1])
    out, h32, h16 = _bf16_inputs(kernel, shape, layout, passive)
    grad_out, grad_logdet = torch.randn_like(out), torch.randn(shape[0], device=kernel.device)
    args = (passive, shift_first, EPS, reverse)
    got = kernel.op("affine_coupling_bwd")(out, h16, grad_out, grad_logdet, *args)
    assert got[2].dtype == torch.bfloat16
    oracle = reference.affine_coupling_bwd(*f64(out, h32, grad_out, grad_logdet), *args)
    eager = reference.affine_coupling_bwd(out, h16, grad_out, grad_logdet, *args)
    for g, e, o, what in zip(got, eager, oracle, ("inverse", "grad", "grad")):
        _assert_bf16_as_good_as_eager(g.float(), e.float(), o, what)


# ---- additive coupling ----

ADDITIVE_DIRECTIONS = {  # op direction -> (reference, tolerance key)
    "fwd": (reference.additive_coupling_fwd, "forward"),
    "inv": (reference.additive_coupling_inv, "inverse"),
}


def additive_inputs(shape, passive: int, layout: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow state and a subnet output of one shift per active channel, in the layout's formats."""
    b, c, height, width = shape
    x_cl, h_cl = LAYOUTS[layout]
    h = to_layout(torch.randn(b, c - passive, height, width, device=device), h_cl)
    return to_layout(torch.randn(shape, device=device), x_cl), h


@pytest.mark.parametrize("direction", list(ADDITIVE_DIRECTIONS))
@coupling_grid(SHAPES, shift_first=False)
def test_additive_coupling(kernel: Kernel, shape, layout, passive_kind, direction):
    """y (or x) in the input's layout; the op takes no log-det (it is 0)."""
    passive = PASSIVE[passive_kind](shape[1])
    inp, h = additive_inputs(shape, passive, layout, kernel.device)
    ref, what = ADDITIVE_DIRECTIONS[direction]
    out = kernel.op(f"additive_coupling_{direction}")(inp, h, passive)
    want, dlogdet = ref(*f64(inp, h), passive)
    assert is_layout(out, LAYOUTS[layout][0])
    assert_rel_close(out, want, what)
    assert torch.equal(dlogdet, torch.zeros_like(dlogdet))


@reverses
@coupling_grid(SHAPES, shift_first=False)
def test_additive_coupling_bwd(kernel: Kernel, shape, layout, passive_kind, reverse):
    """(inp, grad_inp, grad_h): inp and grad_inp in out's layout, grad_h in h's, grad_out in h's."""
    passive = PASSIVE[passive_kind](shape[1])
    out, h = additive_inputs(shape, passive, layout, kernel.device)
    x_cl, h_cl = LAYOUTS[layout]
    grad_out = to_layout(torch.randn(shape, device=kernel.device), h_cl)
    got = kernel.op("additive_coupling_bwd")(out, h, grad_out, passive, reverse)
    want = reference.additive_coupling_bwd(*f64(out, h, grad_out), passive, reverse)
    assert is_layout(got[0], x_cl) and is_layout(got[1], x_cl) and is_layout(got[2], h_cl)
    for g, w, what in zip(got, want, ("inverse", "grad", "grad")):
        assert_rel_close(g, w, what)


@pytest.mark.parametrize("direction", list(ADDITIVE_DIRECTIONS))
@coupling_grid(BF16_SHAPES, shift_first=False)
def test_additive_coupling_bf16_h(kernel: Kernel, shape, layout, passive_kind, direction):
    passive = PASSIVE[passive_kind](shape[1])
    x, h32 = additive_inputs(shape, passive, layout, kernel.device)
    h16 = to_layout(h32.to(torch.bfloat16), LAYOUTS[layout][1])
    ref, what = ADDITIVE_DIRECTIONS[direction]
    got = kernel.op(f"additive_coupling_{direction}")(x, h16, passive)
    _assert_bf16_as_good_as_eager(got, ref(x, h16, passive)[0], ref(*f64(x, h32), passive)[0], what)


@reverses
@coupling_grid(BF16_SHAPES, shift_first=False)
def test_additive_coupling_bwd_bf16_h(kernel: Kernel, shape, layout, passive_kind, reverse):
    passive = PASSIVE[passive_kind](shape[1])
    out, h32 = additive_inputs(shape, passive, layout, kernel.device)
    h16 = to_layout(h32.to(torch.bfloat16), LAYOUTS[layout][1])
    grad_out = torch.randn_like(out)
    got = kernel.op("additive_coupling_bwd")(out, h16, grad_out, passive, reverse)
    assert got[2].dtype == torch.bfloat16
    oracle = reference.additive_coupling_bwd(*f64(out, h32, grad_out), passive, reverse)
    eager = reference.additive_coupling_bwd(out, h16, grad_out, passive, reverse)
    for g, e, o, what in zip(got, eager, oracle, ("inverse", "grad", "grad")):
        _assert_bf16_as_good_as_eager(g.float(), e.float(), o, what)


# ---- actnorm + 1x1 conv folded into one channel map ----


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd_map", "inv_map"])
@x_layouts
@shapes
def test_channel_affine_fwd(kernel: Kernel, shape, channels_last, reverse):
    b, c, height, width = shape
    x = to_layout(torch.randn(shape, device=kernel.device), channels_last)
    cmap = channel_map(c, height * width, kernel.device, reverse)
    logdet = torch.randn(b, device=kernel.device)
    before = logdet.clone()
    y = kernel.op("channel_affine_fwd")(x, cmap.matrix, cmap.offset, cmap.logdet_term, logdet)
    assert is_layout(y, channels_last)
    assert_rel_close(y, reference.channel_affine(*f64(x, cmap.matrix, cmap.offset)), "forward")
    assert_rel_close(logdet - before, cmap.logdet_term.expand(b), "forward")


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=[f"out_grad_{k}" for k in LAYOUTS])
@shapes
def test_channel_affine_bwd(kernel: Kernel, shape, layout):
    """(inp, grad_inp, grad_matrix, grad_offset), out and grad_out in independent layouts."""
    _, c, height, width = shape
    out_cl, grad_cl = LAYOUTS[layout]
    cmap = channel_map(c, height * width, kernel.device)
    out = to_layout(torch.randn(shape, device=kernel.device), out_cl)
    grad_out = to_layout(torch.randn(shape, device=kernel.device), grad_cl)
    args = (cmap.matrix, cmap.matrix_inv, cmap.inv_offset)
    got = kernel.op("channel_affine_bwd")(out, grad_out, *args)
    want = reference.channel_affine_bwd(*f64(out, grad_out, *args))
    assert is_layout(got[0], out_cl) and is_layout(got[1], out_cl)
    assert got[2].shape == (c, c) and got[3].shape == (c,)
    assert got[2].dtype == got[3].dtype == torch.float32
    for g, w, what in zip(got, want, ("inverse", "grad", "grad", "grad")):
        assert_rel_close(g, w, what)


def test_logdet_accumulates_over_calls(kernel: Kernel):
    """Repeated calls of every log-det op add into one pre-filled buffer, in place."""
    x = torch.randn(2, 12, 5, 3, device=kernel.device)
    h = torch.randn(2, 24, 5, 3, device=kernel.device)
    cmap = channel_map(12, 15, kernel.device)
    _, dlogdet = reference.affine_coupling_fwd(*f64(x, h), 0, True, EPS)
    logdet = torch.full((2,), 3.0, device=kernel.device)
    for _ in range(2):
        kernel.op("affine_coupling_fwd")(x, h, logdet, 0, True, EPS)
        kernel.op("channel_affine_fwd")(x, cmap.matrix, cmap.offset, cmap.logdet_term, logdet)
    kernel.op("affine_coupling_inv")(x, h, logdet, 0, True, EPS)  # subtracts one dlogdet
    assert_rel_close(logdet - 3.0, dlogdet + 2 * cmap.logdet_term, "forward")


# ---- strides the kernels take as they are ----


def _channel_slice(device: str) -> torch.Tensor:
    """12 channels of a 20-channel NCHW tensor: not dense, but its pixels still collapse
    (stride_h == W * stride_w)."""
    return torch.randn(2, 20, 6, 7, device=device)[:, 3:15]


def test_additive_coupling_takes_channel_slices(kernel: Kernel):
    """x and h both channel slices of wider tensors."""
    x, h = _channel_slice(kernel.device), _channel_slice(kernel.device)[:, :6]
    y = kernel.op("additive_coupling_fwd")(x, h, 6)
    assert_rel_close(y, reference.additive_coupling_fwd(*f64(x, h), 6)[0], "forward")


def test_channel_slice_is_handled(kernel: Kernel):
    x = _channel_slice(kernel.device)
    cmap = channel_map(12, 42, kernel.device)
    logdet = torch.zeros(2, device=kernel.device)
    y = kernel.op("channel_affine_fwd")(x, cmap.matrix, cmap.offset, cmap.logdet_term, logdet)
    assert_rel_close(y, reference.channel_affine(*f64(x, cmap.matrix, cmap.offset)), "forward")


def test_column_major_matrix_is_handled(kernel: Kernel):
    """A transposed view as the channel map (e.g. W.t() of a parameter)."""
    x = torch.randn(2, 12, 6, 7, device=kernel.device)
    cmap = channel_map(12, 42, kernel.device)
    matrix = cmap.matrix.t().contiguous().t()
    logdet = torch.zeros(2, device=kernel.device)
    y = kernel.op("channel_affine_fwd")(x, matrix, cmap.offset, cmap.logdet_term, logdet)
    assert_rel_close(y, reference.channel_affine(*f64(x, cmap.matrix, cmap.offset)), "forward")


@pytest.mark.parametrize("op_name", ["channel_affine_bwd", "affine_coupling_bwd", "additive_coupling_bwd"])
def test_bwd_takes_a_channel_slice_and_an_expanded_gradient(kernel: Kernel, op_name):
    """The gradient of a sum arrives expanded (stride 0 everywhere), here with a channel-slice
    output."""
    out = _channel_slice(kernel.device)
    grad_out = torch.ones((), device=kernel.device).expand(out.shape)
    if op_name == "channel_affine_bwd":
        cmap = channel_map(12, 42, kernel.device)
        args = (cmap.matrix, cmap.matrix_inv, cmap.inv_offset)
        got = kernel.op(op_name)(out, grad_out, *args)
        want = reference.channel_affine_bwd(*f64(out, grad_out, *args))
    elif op_name == "additive_coupling_bwd":
        h = torch.randn(2, 6, 6, 7, device=kernel.device)
        got = kernel.op(op_name)(out, h, grad_out, 6, True)
        want = reference.additive_coupling_bwd(*f64(out, h, grad_out), 6, True)
    else:
        h = torch.randn(2, 24, 6, 7, device=kernel.device)
        grad_logdet = torch.ones((), device=kernel.device).expand(2)
        got = kernel.op(op_name)(out, h, grad_out, grad_logdet, 0, True, EPS, False)
        want = reference.affine_coupling_bwd(*f64(out, h, grad_out, grad_logdet), 0, True, EPS, False)
    for g, w in zip(got, want):
        assert_rel_close(g, w, "grad")


# ---- the public wrappers with backend=<kernel backend> against backend="reference" ----


def _actnorm_params(channels: int, device: str) -> tuple[torch.Tensor, ...]:
    """(weight, logs, bias): W orthogonal plus noise, a random ActNorm."""
    weight = torch.linalg.qr(torch.randn(channels, channels))[0] + 0.05 * torch.randn(channels, channels)
    return weight.to(device), 0.2 * torch.randn(channels, device=device), torch.randn(channels, device=device)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
@x_layouts
@pytest.mark.parametrize("channels", [12, 96])
def test_public_actnorm_conv(kernel: Kernel, channels, channels_last, reverse):
    x = to_layout(torch.randn(2, channels, 6, 5, device=kernel.device), channels_last)
    params = _actnorm_params(channels, kernel.device)
    op = fk.ops.actnorm_conv_inv if reverse else fk.ops.actnorm_conv_fwd
    results = {}
    for backend in (kernel.backend, "reference"):
        logdet = torch.ones(2, device=kernel.device)
        y, logdet_out = op(x, *params, logdet, backend=backend)
        assert logdet_out is logdet  # the ops add in place
        results[backend] = (y, logdet)
    assert_rel_close(results[kernel.backend][0], results["reference"][0], "inverse" if reverse else "forward")
    assert_rel_close(results[kernel.backend][1], results["reference"][1], "forward")


@pytest.mark.parametrize("reverse", [False, True], ids=["of_forward", "of_inverse"])
@x_layouts
@pytest.mark.parametrize("channels", [12, 96])
def test_public_actnorm_conv_bwd(kernel: Kernel, channels, channels_last, reverse):
    out = to_layout(torch.randn(2, channels, 6, 5, device=kernel.device), channels_last)
    grad_out, grad_logdet = torch.randn_like(out), torch.randn(2, device=kernel.device)
    args = (out, grad_out, grad_logdet, *_actnorm_params(channels, kernel.device))
    got = fk.ops.actnorm_conv_bwd(*args, reverse=reverse, backend=kernel.backend)
    want = fk.ops.actnorm_conv_bwd(*args, reverse=reverse, backend="reference")
    for g, w, what in zip(got, want, ("inverse", "grad", "grad", "grad", "grad")):
        assert_rel_close(g, w, what)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
@shift_firsts
@passive_kinds
def test_public_affine_coupling(kernel: Kernel, passive_kind, shift_first, reverse):
    passive = PASSIVE[passive_kind](12)
    x, h = coupling_inputs((2, 12, 5, 7), passive, "cl", kernel.device)
    op = fk.ops.affine_coupling_inv if reverse else fk.ops.affine_coupling_fwd
    results = {}
    for backend in (kernel.backend, "reference"):
        logdet = torch.ones(2, device=kernel.device)
        y, logdet_out = op(x, h, logdet, passive=passive, shift_first=shift_first, backend=backend)
        assert logdet_out is logdet
        results[backend] = (y, logdet)
    for g, w in zip(results[kernel.backend], results["reference"]):
        assert_rel_close(g, w, "forward")


@reverses
@shift_firsts
@passive_kinds
def test_public_affine_coupling_bwd(kernel: Kernel, passive_kind, shift_first, reverse):
    passive = PASSIVE[passive_kind](12)
    out, h = coupling_inputs((2, 12, 5, 7), passive, "cl", kernel.device)
    grad_out, grad_logdet = torch.randn_like(out), torch.randn(2, device=kernel.device)
    kw = {"passive": passive, "shift_first": shift_first, "reverse": reverse}
    got = fk.ops.affine_coupling_bwd(out, h, grad_out, grad_logdet, backend=kernel.backend, **kw)
    want = fk.ops.affine_coupling_bwd(out, h, grad_out, grad_logdet, backend="reference", **kw)
    for g, w in zip(got, want):
        assert_rel_close(g, w, "grad")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
@passive_kinds
def test_public_additive_coupling(kernel: Kernel, passive_kind, reverse):
    """Against the reference; the log-det buffer comes back as the same tensor, bitwise unchanged."""
    passive = PASSIVE[passive_kind](12)
    x, h = additive_inputs((2, 12, 5, 7), passive, "cl", kernel.device)
    op = fk.ops.additive_coupling_inv if reverse else fk.ops.additive_coupling_fwd
    results = {}
    for backend in (kernel.backend, "reference"):
        logdet = torch.randn(2, device=kernel.device)
        before = logdet.clone()
        y, logdet_out = op(x, h, logdet, passive=passive, backend=backend)
        assert logdet_out is logdet and torch.equal(logdet, before)
        results[backend] = y
    assert_rel_close(results[kernel.backend], results["reference"], "inverse" if reverse else "forward")


@reverses
@passive_kinds
def test_public_additive_coupling_bwd(kernel: Kernel, passive_kind, reverse):
    passive = PASSIVE[passive_kind](12)
    out, h = additive_inputs((2, 12, 5, 7), passive, "cl", kernel.device)
    grad_out = torch.randn_like(out)
    kw = {"passive": passive, "reverse": reverse}
    got = fk.ops.additive_coupling_bwd(out, h, grad_out, backend=kernel.backend, **kw)
    want = fk.ops.additive_coupling_bwd(out, h, grad_out, backend="reference", **kw)
    assert got[1] is not grad_out  # a fresh tensor: the caller adds the subnet path into it in place
    for g, w in zip(got, want):
        assert_rel_close(g, w, "grad")


@pytest.mark.parametrize("wrapper", ["affine_coupling_bwd", "additive_coupling_bwd", "actnorm_conv_bwd"])
def test_bwd_wrappers_accept_upstream_gradients_in_any_layout(kernel: Kernel, wrapper):
    """A gradient whose H and W do not collapse (here a transposed one) is made dense by the
    public *_bwd wrappers instead of being refused by the kernels."""
    out = torch.randn(2, 6, 4, 5, device=kernel.device)
    grad = torch.randn(2, 6, 5, 4, device=kernel.device).transpose(2, 3)
    grad_logdet = torch.randn(2, device=kernel.device)
    if wrapper == "affine_coupling_bwd":
        args, kw = (out, torch.randn(2, 6, 4, 5, device=kernel.device), grad, grad_logdet), {"passive": 3}
    elif wrapper == "additive_coupling_bwd":
        args, kw = (out, torch.randn(2, 3, 4, 5, device=kernel.device), grad), {"passive": 3}
    else:
        args, kw = (out, grad, grad_logdet, *_actnorm_params(6, kernel.device)), {}
    got = getattr(fk.ops, wrapper)(*args, backend=kernel.backend, **kw)
    want = getattr(fk.ops, wrapper)(*args, backend="reference", **kw)
    for g, w in zip(got, want):
        assert_rel_close(g, w, "grad")


# ---- end to end: a memory-saving SRFlow level on the kernels vs float64 stored activations ----

C, COND = 12, 6  # level-1 SRFlow channels, a small conditioning tensor


def _check_level(kernel: Kernel, case: LevelCase, channels_last: bool = False) -> None:
    """Memory saving on the kernels: outputs and every gradient (x, cond, parameters) within the
    fp32 noise of float64 stored-activation autograd (tests/oracle.py)."""
    reference = case.reference()
    saving = copy.deepcopy(case.seq).to(kernel.device)
    saving.memory_saving = True
    x, cond, cot = (to_layout(t.to(kernel.device), channels_last) for t in (case.x, case.cond, case.cot))
    with fk.use_backend(kernel.backend):
        assert select_backend(None, x) == kernel.backend  # the kernels ran, not a fallback
        got = outputs_and_grads(saving, x, cond, cot, case.cot_ld.to(kernel.device), case.reverse)
    reference.check(got, f"{kernel.backend} on {kernel.device}")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
@x_layouts
def test_flow_sequence_gradients(kernel: Kernel, channels_last, reverse, one_thread):
    """4 steps (2 transitional, 2 conditional couplings) with trained-like weights, odd sizes; the
    inverse direction on a latent-like (half-scale) input."""
    _check_level(kernel, level_case(4, C, COND, (5, 7), reverse=reverse), channels_last)


def test_flow_sequence_gradients_additive(kernel: Kernel, one_thread):
    """The same with conditional additive couplings (Glow's volume-preserving variant)."""
    _check_level(kernel, level_case(4, C, COND, (5, 7), coupling=fk.AdditiveCoupling))


@pytest.mark.slow
def test_flow_sequence_54_steps(kernel: Kernel, one_thread):
    """SRFlow depth (2 + 52 steps, subnets smoothed: tests/oracle.py), trained-like weights, the
    smallest shapes with a batch reduction and odd sizes: reconstruction drift in the recompute
    stays within the fp32 noise."""
    x, cond, cot, cot_ld = level_inputs(2, C, COND, (3, 5))
    with fk.use_backend("reference"):  # trained_level initialises the ActNorms on the CPU
        seq = smooth_relus_(trained_level(54, C, COND, x, cond))
    _check_level(kernel, LevelCase(seq, x, cond, cot, cot_ld, reverse=False))


# ---- GPU: the CUDA kernels against the Triton kernels ----


@pytest.mark.gpu
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16], ids=["h_fp32", "h_bf16"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", [SHAPES[3], pytest.param((16, 12, 80, 80), id="level1-b16")])
def test_cuda_matches_triton(shape, layout, h_dtype):
    cuda, triton = kernel_backend("cuda", "cuda"), kernel_backend("triton", "cuda")
    passive = shape[1] // 2
    x, h = coupling_inputs(shape, passive, layout, "cuda")
    h = h.to(h_dtype)
    lds = [torch.zeros(shape[0], device="cuda") for _ in range(2)]
    y_cuda = cuda.op("affine_coupling_fwd")(x, h, lds[0], passive, True, EPS)
    y_triton = triton.op("affine_coupling_fwd")(x, h, lds[1], passive, True, EPS)
    assert_rel_close(y_cuda, y_triton, "forward")
    assert_rel_close(lds[0], lds[1], "forward")
    g, gl = torch.randn_like(x), torch.randn(shape[0], device="cuda")
    args = (x, h, g, gl, passive, True, EPS, False)
    for a, b in zip(cuda.op("affine_coupling_bwd")(*args), triton.op("affine_coupling_bwd")(*args)):
        # bf16 grad_h: both round the same float32 value, but 1-ulp float32 differences can flip
        # a rounding; allow one bf16 ulp relative to the largest element.
        assert_rel_close(a.float(), b.float(), "grad", tol=2.0**-8 if a.dtype == torch.bfloat16 else None)
    shifts = h[:, :passive].contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
    assert_rel_close(
        cuda.op("additive_coupling_fwd")(x, shifts, passive),
        triton.op("additive_coupling_fwd")(x, shifts, passive),
        "forward",
    )
    add_args = (x, shifts, g, passive, True)
    for a, b in zip(cuda.op("additive_coupling_bwd")(*add_args), triton.op("additive_coupling_bwd")(*add_args)):
        assert_rel_close(a.float(), b.float(), "grad")  # the additive grad_h is +-grad_out: rounded alike
    cmap = channel_map(shape[1], shape[2] * shape[3], "cuda")
    map_args = (x, cmap.matrix, cmap.offset, cmap.logdet_term)
    assert_rel_close(
        cuda.op("channel_affine_fwd")(*map_args, lds[0]), triton.op("channel_affine_fwd")(*map_args, lds[1]), "forward"
    )
    bwd_args = (x, g, cmap.matrix, cmap.matrix_inv, cmap.inv_offset)
    for a, b in zip(cuda.op("channel_affine_bwd")(*bwd_args), triton.op("channel_affine_bwd")(*bwd_args)):
        assert_rel_close(a, b, "grad")
