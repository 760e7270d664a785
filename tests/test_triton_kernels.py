"""The Triton kernels (flowkernels/ops/_*_kernels.py) against the reference oracle.

Without a CUDA device the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set
here before triton is first imported) on tiny CPU shapes; with one they run compiled on CUDA.
Every output is compared with ``flowkernels.reference`` run in float64 on the same float32
inputs (fp32 kernels: relative error <= REL_TOL), bf16 subnet outputs by the error ratio against
eager PyTorch in bf16 (DESIGN.md section 7). Outputs are NaN-poisoned before each launch
(tests/conftest.py), so unwritten elements fail the comparisons.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: triton.jit picks the interpreter at decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import flowkernels as fk  # noqa: E402
from flowkernels import reference  # noqa: E402
from flowkernels._loader import load_triton  # noqa: E402
from flowkernels.ops import fold  # noqa: E402
from tests.helpers import trained_level  # noqa: E402
from tests.tolerances import BF16_ERROR_RATIO, REL_TOL, assert_rel_close, rel_err  # noqa: E402

_channel_affine_kernels = load_triton("flowkernels.ops._channel_affine_kernels")  # registers the *_triton ops
INTERPRETED = not isinstance(_channel_affine_kernels._channel_affine_fwd_kernel, triton.runtime.JITFunction)
load_triton("flowkernels.ops._affine_coupling_kernels")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.flowkernels
EPS = fk.ops.SRFLOW_EPS

if not INTERPRETED and DEVICE == "cpu":
    pytest.skip("TRITON_INTERPRET=1 was not in effect when triton was imported", allow_module_level=True)


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """Tiny CPU convolutions (the subnets of the end-to-end checks) are several times slower with
    two intra-op threads than with one on the 2-core CI machine; restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fmt(t: torch.Tensor, layout: str) -> torch.Tensor:
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return t.to(DEVICE).contiguous(memory_format=memory_format)


def _is_layout(t: torch.Tensor, layout: str) -> bool:
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return t.is_contiguous(memory_format=memory_format)


def _f64(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.double() for t in ts]


# ----------------------------------------------------------------------------------------------
# channel_affine: y = matrix @ x + offset per pixel, and its backward with recompute


ACTNORM_SHAPES = [
    pytest.param((2, 12, 6, 5), id="level1-small"),  # level-1 SRFlow (small): C = 12 after the squeeze
    pytest.param((1, 3, 5, 7), id="batch1-C3-oddHW"),  # batch 1, C = 3, odd H/W (one padded block)
    pytest.param((3, 5, 4, 3), id="C5"),  # odd channel count
    pytest.param((2, 24, 3, 5), id="level2-C24"),  # level-2 SRFlow: C = 24, a 32-channel block
    pytest.param((1, 96, 4, 3), id="C96-tiled"),  # top level of 4x: two 64-channel blocks, K loop
    pytest.param((1, 192, 3, 3), id="C192-tiled"),  # top level of 8x: three 64-channel blocks
    pytest.param((2, 12, 7, 1), id="W1"),  # W = 1: the pixel stride is stride_h
]
LAYOUTS = ["contiguous", "channels_last"]


def _channel_map(c: int, pixels: int, reverse: bool) -> fk.ops.actnorm_conv.ChannelAffine:
    """Folded trained-like parameters: W orthogonal + noise, random ActNorm."""
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    weight = (q + 0.1 * torch.randn(c, c, dtype=torch.float64)).float()
    logs, bias = 0.2 * torch.randn(c), 0.3 * torch.randn(c)
    cmap = fold(weight, logs, bias, pixels, reverse=reverse)
    return type(cmap)(*(t.to(DEVICE) for t in cmap))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd-map", "inv-map"])
@pytest.mark.parametrize("shape", ACTNORM_SHAPES)
def test_channel_affine_fwd(shape, reverse, layout):
    b, c, h, w = shape
    x = _fmt(torch.randn(shape), layout)
    cmap = _channel_map(c, h * w, reverse)
    logdet = torch.randn(b, device=DEVICE)  # pre-filled: the op must add, not overwrite
    before = logdet.clone()
    y = ops.channel_affine_fwd_triton(x, cmap.matrix, cmap.offset, cmap.logdet_term, logdet)
    assert _is_layout(y, layout)
    assert_rel_close(y, reference.channel_affine(*_f64(x, cmap.matrix, cmap.offset)), "forward")
    assert_rel_close(logdet - before, cmap.logdet_term.expand(b), "forward")


@pytest.mark.parametrize("grad_layout", LAYOUTS, ids=["grad-nchw", "grad-cl"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["out-nchw", "out-cl"])
@pytest.mark.parametrize("shape", ACTNORM_SHAPES)
def test_channel_affine_bwd(shape, layout, grad_layout):
    _, c, h, w = shape
    cmap = _channel_map(c, h * w, reverse=False)
    out = _fmt(torch.randn(shape), layout)
    grad_out = _fmt(torch.randn(shape), grad_layout)
    got = ops.channel_affine_bwd_triton(out, grad_out, cmap.matrix, cmap.matrix_inv, cmap.inv_offset)
    want = reference.channel_affine_bwd(*_f64(out, grad_out, cmap.matrix, cmap.matrix_inv, cmap.inv_offset))
    assert _is_layout(got[0], layout) and _is_layout(got[1], layout)
    assert got[2].dtype == got[3].dtype == torch.float32
    for name, g, w_ in zip(("inp", "grad_inp", "grad_matrix", "grad_offset"), got, want):
        assert_rel_close(g, w_, "forward" if name == "inp" else "grad")


def test_channel_affine_bwd_many_tiles_per_program():
    """More pixel tiles than the program cap: programs loop over tiles (grid-stride) and the
    partials still sum to the full reduction. Level-1 channels, 2 * 40 * 40 pixels."""
    shape = (2, 12, 40, 40)
    cmap = _channel_map(12, 1600, reverse=False)
    out, grad_out = _fmt(torch.randn(shape), "contiguous"), _fmt(torch.randn(shape), "contiguous")
    saved = _channel_affine_kernels._BWD_MAX_PROGRAMS
    _channel_affine_kernels._BWD_MAX_PROGRAMS = 3  # 2 * ceil(1600 / 128) = 26 tiles over 3 programs
    try:
        got = ops.channel_affine_bwd_triton(out, grad_out, cmap.matrix, cmap.matrix_inv, cmap.inv_offset)
    finally:
        _channel_affine_kernels._BWD_MAX_PROGRAMS = saved
    want = reference.channel_affine_bwd(*_f64(out, grad_out, cmap.matrix, cmap.matrix_inv, cmap.inv_offset))
    for g, w_ in zip(got, want):
        assert_rel_close(g, w_, "grad")


# ----------------------------------------------------------------------------------------------
# affine coupling / injector


AFFINE_SHAPES = [
    pytest.param((2, 12, 6, 5), id="level1-small"),  # level-1 SRFlow (small)
    pytest.param((1, 6, 5, 7), id="batch1-oddHW"),  # batch 1, odd H/W
    pytest.param((2, 3, 3, 4), id="C3"),  # odd C: passive 1 of 3
    pytest.param((1, 96, 3, 2), id="C96-two-blocks"),  # two 64-channel blocks
    pytest.param((2, 12, 7, 1), id="W1"),  # W = 1
]
# (x layout, h layout): the subnet output may come back in another layout than the flow state.
PAIRS = [
    pytest.param(("contiguous", "contiguous"), id="x-nchw-h-nchw"),
    pytest.param(("channels_last", "channels_last"), id="x-cl-h-cl"),
    pytest.param(("contiguous", "channels_last"), id="x-nchw-h-cl"),
    pytest.param(("channels_last", "contiguous"), id="x-cl-h-nchw"),
]
PASSIVE = pytest.mark.parametrize("half", [False, True], ids=["injector", "coupling"])
SHIFT_FIRST = pytest.mark.parametrize("shift_first", [True, False], ids=["shift-first", "scale-first"])
REVERSE = pytest.mark.parametrize("reverse", [False, True], ids=["from-fwd", "from-inv"])


def _affine_inputs(shape, layouts, half: bool, h_dtype=torch.float32):
    b, c, height, width = shape
    passive = c // 2 if half else 0
    x = _fmt(torch.randn(shape), layouts[0])
    h32 = _fmt(0.5 * torch.randn(b, 2 * (c - passive), height, width), layouts[1])
    return x, h32, h32.to(h_dtype), passive


@pytest.mark.parametrize("pair", PAIRS)
@SHIFT_FIRST
@PASSIVE
@pytest.mark.parametrize("shape", AFFINE_SHAPES)
def test_affine_coupling_fwd(shape, half, shift_first, pair):
    x, h, _, passive = _affine_inputs(shape, pair, half)
    logdet = torch.randn(shape[0], device=DEVICE)
    before = logdet.clone()
    y = ops.affine_coupling_fwd_triton(x, h, logdet, passive, shift_first, EPS)
    want, dlogdet = reference.affine_coupling_fwd(*_f64(x, h), passive, shift_first, EPS)
    assert _is_layout(y, pair[0])
    assert_rel_close(y, want, "forward")
    assert_rel_close(logdet - before, dlogdet, "forward")


@pytest.mark.parametrize("pair", PAIRS)
@SHIFT_FIRST
@PASSIVE
@pytest.mark.parametrize("shape", AFFINE_SHAPES)
def test_affine_coupling_inv(shape, half, shift_first, pair):
    y, h, _, passive = _affine_inputs(shape, pair, half)
    logdet = torch.randn(shape[0], device=DEVICE)
    before = logdet.clone()
    x = ops.affine_coupling_inv_triton(y, h, logdet, passive, shift_first, EPS)
    want, dlogdet = reference.affine_coupling_inv(*_f64(y, h), passive, shift_first, EPS)
    assert _is_layout(x, pair[0])
    assert_rel_close(x, want, "inverse")
    assert_rel_close(logdet - before, dlogdet, "inverse")


@pytest.mark.parametrize("pair", PAIRS)
@REVERSE
@SHIFT_FIRST
@PASSIVE
@pytest.mark.parametrize("shape", AFFINE_SHAPES)
def test_affine_coupling_bwd(shape, half, shift_first, reverse, pair):
    out, h, _, passive = _affine_inputs(shape, pair, half)
    grad_out = _fmt(torch.randn(shape), pair[1])  # a third layout mix: grad_out follows h
    grad_logdet = torch.randn(shape[0], device=DEVICE)
    got = ops.affine_coupling_bwd_triton(out, h, grad_out, grad_logdet, passive, shift_first, EPS, reverse)
    want = reference.affine_coupling_bwd(
        *_f64(out, h, grad_out, grad_logdet), passive, shift_first, EPS, reverse=reverse
    )
    assert _is_layout(got[0], pair[0]) and _is_layout(got[2], pair[1])
    for name, g, w_ in zip(("inp", "grad_inp", "grad_h"), got, want):
        assert_rel_close(g, w_, "inverse" if name == "inp" else "grad")


def _assert_bf16_as_good_as_eager(got, eager, oracle, what: str) -> None:
    """Kernel error with bf16 h at most BF16_ERROR_RATIO x eager PyTorch's error with the same
    bf16 h, both against the fp32-h oracle (floored at the fp32 tolerance)."""
    err, err_eager = rel_err(got, oracle), rel_err(eager, oracle)
    bound = BF16_ERROR_RATIO * max(err_eager, REL_TOL["forward"])
    assert err <= bound, f"{what}: bf16 kernel error {err:.2e} > {BF16_ERROR_RATIO} x eager bf16 {err_eager:.2e}"


BF16_SHAPES = AFFINE_SHAPES[:2]
BF16_PAIRS = PAIRS[:3]


@pytest.mark.parametrize("pair", BF16_PAIRS)
@SHIFT_FIRST
@PASSIVE
@pytest.mark.parametrize("direction", ["fwd", "inv"])
@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_affine_coupling_bf16_h(shape, direction, half, shift_first, pair):
    x, h32, h16, passive = _affine_inputs(shape, pair, half, torch.bfloat16)
    op = ops.affine_coupling_fwd_triton if direction == "fwd" else ops.affine_coupling_inv_triton
    ref = reference.affine_coupling_fwd if direction == "fwd" else reference.affine_coupling_inv
    logdet = torch.zeros(shape[0], device=DEVICE)
    got = op(x, h16, logdet, passive, shift_first, EPS)
    oracle, oracle_ld = ref(*_f64(x, h32), passive, shift_first, EPS)
    eager, eager_ld = ref(x, h16, passive, shift_first, EPS)
    _assert_bf16_as_good_as_eager(got, eager, oracle, direction)
    _assert_bf16_as_good_as_eager(logdet, eager_ld, oracle_ld, f"{direction} logdet")


@pytest.mark.parametrize("pair", BF16_PAIRS)
@REVERSE
@SHIFT_FIRST
@PASSIVE
@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_affine_coupling_bwd_bf16_h(shape, half, shift_first, reverse, pair):
    out, h32, h16, passive = _affine_inputs(shape, pair, half, torch.bfloat16)
    grad_out, grad_logdet = _fmt(torch.randn(shape), pair[0]), torch.randn(shape[0], device=DEVICE)
    args = (passive, shift_first, EPS, reverse)
    got = ops.affine_coupling_bwd_triton(out, h16, grad_out, grad_logdet, *args)
    assert got[2].dtype == torch.bfloat16
    oracle = reference.affine_coupling_bwd(*_f64(out, h32, grad_out, grad_logdet), *args)
    eager = reference.affine_coupling_bwd(out, h16, grad_out, grad_logdet, *args)
    for name, g, e, o in zip(("inp", "grad_inp", "grad_h"), got, eager, oracle):
        _assert_bf16_as_good_as_eager(g, e, o, name)


# ----------------------------------------------------------------------------------------------
# logdet accumulation, strides, registration


def test_logdet_accumulates_over_calls():
    """Two calls of each log-det op add twice into one pre-filled buffer (in place)."""
    shape, c = (2, 12, 5, 3), 12
    x = _fmt(torch.randn(shape), "contiguous")
    h = _fmt(torch.randn(2, 2 * c, 5, 3), "contiguous")
    cmap = _channel_map(c, 15, reverse=False)
    _, dlogdet = reference.affine_coupling_fwd(x, h, 0, True, EPS)
    logdet = torch.full((2,), 3.0, device=DEVICE)
    for _ in range(2):
        ops.affine_coupling_fwd_triton(x, h, logdet, 0, True, EPS)
        ops.channel_affine_fwd_triton(x, cmap.matrix, cmap.offset, cmap.logdet_term, logdet)
    ops.affine_coupling_inv_triton(x, h, logdet, 0, True, EPS)
    assert_rel_close(logdet - 3.0, dlogdet + 2 * cmap.logdet_term, "forward")


def test_channel_slice_is_handled():
    """A channel slice of an NCHW tensor is not dense, but its pixels are still addressed as
    p * stride_w (stride_h == W * stride_w): the kernels take its strides as they are."""
    big = _fmt(torch.randn(2, 16, 5, 3), "contiguous")
    x = big[:, 2:14]
    cmap = _channel_map(12, 15, reverse=False)
    y = ops.channel_affine_fwd_triton(x, cmap.matrix, cmap.offset, cmap.logdet_term, torch.zeros(2, device=DEVICE))
    assert_rel_close(y, reference.channel_affine(*_f64(x, cmap.matrix, cmap.offset)), "forward")


def test_cropped_width_is_refused_with_reason():
    """A crop along W breaks stride_h == W * stride_w: the launcher raises, naming the argument."""
    x = _fmt(torch.randn(2, 6, 5, 4), "contiguous")[..., 1:]
    h = _fmt(torch.randn(2, 12, 5, 3), "contiguous")
    with pytest.raises(ValueError, match=r"x: strides .* stride_h == W \* stride_w"):
        ops.affine_coupling_fwd_triton(x, h, torch.zeros(2, device=DEVICE), 0, True, EPS)


def _opcheck_samples() -> dict[str, tuple]:
    """One small sample per op; no input requires grad (the ops have no autograd formula: the
    FlowSequence unit differentiates them by invertible recompute)."""
    c = 12
    x = _fmt(torch.randn(2, c, 5, 3), "channels_last")
    h = _fmt(torch.randn(2, c, 5, 3), "contiguous")  # passive = C // 2: h has 2 * 6 channels
    cmap = _channel_map(c, 15, reverse=False)
    logdet = torch.randn(2, device=DEVICE)
    return {
        "channel_affine_fwd": (ops.channel_affine_fwd_triton, (x, cmap.matrix, cmap.offset, cmap.logdet_term, logdet)),
        "channel_affine_bwd": (ops.channel_affine_bwd_triton, (x, h, cmap.matrix, cmap.matrix_inv, cmap.inv_offset)),
        "affine_coupling_fwd": (ops.affine_coupling_fwd_triton, (x, h, logdet, c // 2, True, EPS)),
        "affine_coupling_inv": (ops.affine_coupling_inv_triton, (x, h, logdet, c // 2, False, EPS)),
        "affine_coupling_bwd": (ops.affine_coupling_bwd_triton, (x, h, x, logdet, c // 2, True, EPS, True)),
    }


OPS = [
    "channel_affine_fwd",
    "channel_affine_bwd",
    "affine_coupling_fwd",
    "affine_coupling_inv",
    "affine_coupling_bwd",
]


@pytest.mark.parametrize("name", OPS)
def test_opcheck_schema_and_fake(name):
    """test_schema: the declared mutation (logdet only, fresh outputs) matches what the op does;
    test_faketensor: the fake gives the real outputs' shapes, dtypes and strides (layouts).
    test_autograd_registration is left out: no input requires grad and the ops deliberately
    have no autograd formula, so it would check nothing. test_aot_dispatch_dynamic needs the
    compiled kernels (AOT decomposes a triton_op by tracing its launcher, which the interpreter
    cannot run on fake tensors): see test_opcheck_aot_dispatch (GPU)."""
    op, args = _opcheck_samples()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPS)
def test_opcheck_aot_dispatch(name):
    """AOTAutograd with dynamic shapes traces the launcher (wrap_triton) and runs it: the
    decomposition of a mutating triton_op must give the eager results."""
    op, args = _opcheck_samples()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ----------------------------------------------------------------------------------------------
# end to end: a conditional SRFlow level with backend="triton" and memory saving


C, COND = 12, 5


def _level_grads(seq: fk.FlowSequence, backend: str, x, cond, cot, cot_ld) -> list[torch.Tensor]:
    """(z, logdet, dL/dx, dL/dcond, dL/dparams) of L = <z, cot> + <logdet, cot_ld>."""
    x, cond = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    with fk.use_backend(backend):
        z, ld = seq(x, cond)
        loss = (z * cot).sum() + (ld * cot_ld).sum()
        grads = torch.autograd.grad(loss, [x, cond, *seq.parameters()])
    return [z.detach(), ld.detach(), *grads]


def _check_level(depth: int, layout: str, hw: tuple[int, int], keep_every: int | None = None) -> None:
    x = _fmt(torch.randn(2, C, *hw), layout)
    cond = _fmt(torch.randn(2, COND, *hw), layout)
    cot, cot_ld = _fmt(torch.randn(2, C, *hw), layout), torch.randn(2, device=DEVICE)
    with fk.use_backend("reference"):  # trained_level initialises the ActNorms on the CPU
        plain = trained_level(depth, C, COND, x.cpu(), cond.cpu(), memory_saving=False).to(DEVICE)
    saving = copy.deepcopy(plain)
    saving.memory_saving, saving.keep_every = True, keep_every
    got = _level_grads(saving, "triton", x, cond, cot, cot_ld)
    want = _level_grads(plain, "reference", x, cond, cot, cot_ld)
    names = ["z", "logdet", "x", "cond", *(n for n, _ in plain.named_parameters())]
    errors = {n: rel_err(g, w_) for n, g, w_ in zip(names, got, want)}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= REL_TOL["grad_level"], f"{worst}: relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flow_sequence_triton_matches_reference(layout):
    """8 steps (2 transitional + 6 conditional couplings), backend="triton" with memory saving
    vs the reference backend with stored activations: outputs and every gradient (x, cond,
    parameters) within the full-level tolerance."""
    _check_level(8, layout, (5, 3))


def test_flow_sequence_triton_54_steps():
    """SRFlow depth (2 + 52 steps), trained-like weights (tests.helpers.trained_level), smallest
    shapes with a batch reduction and odd sizes: 2 x 12 x 3 x 5."""
    _check_level(54, "contiguous", (3, 5))
