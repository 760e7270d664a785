"""The compiled kernels of flowkernels._C (C++ on CPU; CUDA under the ``gpu`` marker) against the
reference: ``torch.ops.flowkernels.*`` directly and through the public wrappers with
``backend="cuda"``, outputs poisoned (conftest), registration (opcheck), input checks, determinism,
and memory-saving FlowSequence gradients end to end.

Run: ``PYTHONPATH=. python -m pytest tests/test_cpp_kernels.py -q`` (needs the extension built,
``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import flowkernels as fk
from flowkernels import reference
from flowkernels._loader import load_extension, load_triton
from flowkernels.dispatch import select_backend
from tests.helpers import srflow_level, trained_level
from tests.tolerances import BF16_ERROR_RATIO, REL_TOL, assert_rel_close, rel_err

EPS = 1e-4  # SRFlow's affine_eps

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# (B, C, H, W); the kernels see H*W pixels, so odd H/W and P % 4 != 0 take the scalar paths.
SHAPES = [
    pytest.param((1, 4, 5, 7), id="b1-odd"),  # batch 1, odd H and W
    pytest.param((2, 3, 7, 5), id="c3"),  # C = 3: odd split (passive 1 of 3)
    pytest.param((3, 5, 6, 6), id="c5"),  # C = 5 (P % 4 == 0, C % 4 != 0)
    pytest.param((2, 12, 16, 20), id="c12-level1"),  # level-1 SRFlow channels; float4 paths on GPU
    pytest.param((2, 24, 8, 10), id="c24-level2"),  # level-2 channels: the widest one-thread-per-pixel map
    pytest.param((2, 96, 9, 7), id="c96-tiled"),  # level-3 channels: C x C map tiled in 64-row blocks
    pytest.param((1, 192, 5, 6), id="c192-tiled"),  # 8x top level: 3 channel tiles, C + 1 = 193 columns
]
# (x channels_last, h channels_last)
LAYOUTS = {
    "nchw": (False, False),
    "cl": (True, True),
    "x_nchw-h_cl": (False, True),
    "x_cl-h_nchw": (True, False),
}
PASSIVE = ["injector", "coupling"]  # passive = 0 (SRFlow's affine injector) or C // 2


@pytest.fixture(scope="module", autouse=True)
def _extension():
    """The extension must be built (CI builds it); a missing build fails with how to build it."""
    return load_extension()


def _ops():
    return torch.ops.flowkernels


def _fmt(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _is_format(t: torch.Tensor, channels_last: bool) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _passive(kind: str, c: int) -> int:
    return 0 if kind == "injector" else c // 2


def _coupling_inputs(shape, passive: int, layout: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow state and a subnet output whose raw scales reach s ~ 1e-3 (inverse amplification)."""
    b, c, height, width = shape
    x_cl, h_cl = LAYOUTS[layout]
    x = _fmt(torch.randn(shape), x_cl).to(device)
    h = _fmt(2.0 * torch.randn(b, 2 * (c - passive), height, width), h_cl).to(device)
    return x, h


def _map_params(c: int, device: str) -> tuple[torch.Tensor, ...]:
    """A well-conditioned channel map and its inverse (float64 inverse, as fold() does)."""
    matrix = torch.eye(c) + torch.randn(c, c) / (2.0 * c**0.5)
    matrix_inv = torch.linalg.inv(matrix.double()).float()
    return matrix.to(device), torch.randn(c).to(device), matrix_inv.to(device), torch.randn(c).to(device)


def test_build_has_openmp():
    """at::parallel_for is an OpenMP region compiled into _C: without -fopenmp it runs serially."""
    assert load_extension().with_openmp


def test_outputs_are_poisoned_in_this_session():
    """The premise of every comparison below: launchers fill outputs with NaN first."""
    assert os.environ.get("FLOWKERNELS_POISON_OUTPUTS") == "1"


# ---- affine coupling ----


@pytest.mark.parametrize("shift_first", [True, False], ids=["shift_first", "scale_first"])
@pytest.mark.parametrize("passive_kind", PASSIVE)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_affine_coupling_fwd_inv(device, shape, layout, passive_kind, shift_first):
    passive = _passive(passive_kind, shape[1])
    x, h = _coupling_inputs(shape, passive, layout, device)
    ld0 = torch.randn(shape[0], device=device)
    ld = ld0.clone()
    y = _ops().affine_coupling_fwd(x, h, ld, passive, shift_first, EPS)
    y_ref, dlogdet = reference.affine_coupling_fwd(x, h, passive, shift_first, EPS)
    assert_rel_close(y, y_ref, "forward")
    assert_rel_close(ld - ld0, dlogdet, "forward")  # accumulated into the pre-filled buffer
    assert _is_format(y, LAYOUTS[layout][0])

    ld1 = ld.clone()
    y_in = _fmt(y_ref, LAYOUTS[layout][0])
    x_back = _ops().affine_coupling_inv(y_in, h, ld, passive, shift_first, EPS)
    x_ref, dlogdet_inv = reference.affine_coupling_inv(y_in, h, passive, shift_first, EPS)
    assert_rel_close(x_back, x_ref, "inverse")
    assert_rel_close(ld - ld1, dlogdet_inv, "inverse")
    assert _is_format(x_back, LAYOUTS[layout][0])


@pytest.mark.parametrize("reverse", [False, True], ids=["of_forward", "of_inverse"])
@pytest.mark.parametrize("shift_first", [True, False], ids=["shift_first", "scale_first"])
@pytest.mark.parametrize("passive_kind", PASSIVE)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_affine_coupling_bwd(device, shape, layout, passive_kind, shift_first, reverse):
    passive = _passive(passive_kind, shape[1])
    out, h = _coupling_inputs(shape, passive, layout, device)
    grad_out = torch.randn_like(out)
    grad_logdet = torch.randn(shape[0], device=device)
    got = _ops().affine_coupling_bwd(out, h, grad_out, grad_logdet, passive, shift_first, EPS, reverse)
    want = reference.affine_coupling_bwd(out, h, grad_out, grad_logdet, passive, shift_first, EPS, reverse)
    for g, w, what in zip(got, want, ("inverse", "grad", "grad")):
        assert_rel_close(g, w, what)
    x_cl, h_cl = LAYOUTS[layout]
    assert _is_format(got[0], x_cl) and _is_format(got[1], x_cl) and _is_format(got[2], h_cl)
    assert got[2].dtype == h.dtype


def _bf16_check(kernel: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """DESIGN.md 7: the kernel with bf16 h errs at most BF16_ERROR_RATIO x eager PyTorch with the same
    bf16 h, both against the float32-h result (the fp32 tolerance as a floor for ~exact cases)."""
    err_kernel, err_eager = rel_err(kernel, exact), rel_err(eager, exact)
    allowed = BF16_ERROR_RATIO * max(err_eager, REL_TOL[what])
    assert err_kernel <= allowed, f"{what}: bf16 kernel error {err_kernel:.2e} > {allowed:.2e} (eager {err_eager:.2e})"


@pytest.mark.parametrize("direction", ["fwd", "inv", "bwd_of_forward", "bwd_of_inverse"])
@pytest.mark.parametrize("passive_kind", PASSIVE)
@pytest.mark.parametrize("layout", ["nchw", "cl", "x_cl-h_nchw"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[5]])
@pytest.mark.parametrize("device", DEVICES)
def test_affine_coupling_bf16_h(device, shape, layout, passive_kind, direction):
    passive = _passive(passive_kind, shape[1])
    x, h32 = _coupling_inputs(shape, passive, layout, device)
    h16 = h32.to(torch.bfloat16)
    assert _is_format(h16, LAYOUTS[layout][1])
    if direction in ("fwd", "inv"):
        op = _ops().affine_coupling_fwd if direction == "fwd" else _ops().affine_coupling_inv
        ref = reference.affine_coupling_fwd if direction == "fwd" else reference.affine_coupling_inv
        ld = torch.zeros(shape[0], device=device)
        got = op(x, h16, ld, passive, True, EPS)
        eager, eager_ld = ref(x, h16, passive, True, EPS)
        exact, exact_ld = ref(x, h32, passive, True, EPS)
        _bf16_check(got, eager, exact, "forward")
        _bf16_check(ld, eager_ld, exact_ld, "forward")
        return
    reverse = direction == "bwd_of_inverse"
    grad_out, grad_logdet = torch.randn_like(x), torch.randn(shape[0], device=device)
    args = (passive, True, EPS, reverse)
    got = _ops().affine_coupling_bwd(x, h16, grad_out, grad_logdet, *args)
    eager = reference.affine_coupling_bwd(x, h16, grad_out, grad_logdet, *args)
    exact = reference.affine_coupling_bwd(x, h32, grad_out, grad_logdet, *args)
    assert got[2].dtype == torch.bfloat16
    for g, e, w in zip(got, eager, exact):
        _bf16_check(g.float(), e.float(), w, "grad")


# ---- actnorm + 1x1 conv (the channel map) ----


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_channel_affine_fwd(device, shape, channels_last):
    x = _fmt(torch.randn(shape), channels_last).to(device)
    matrix, offset, _, _ = _map_params(shape[1], device)
    term = torch.randn((), device=device)
    ld0 = torch.randn(shape[0], device=device)
    ld = ld0.clone()
    y = _ops().channel_affine_fwd(x, matrix, offset, term, ld)
    assert_rel_close(y, reference.channel_affine(x, matrix, offset), "forward")
    assert_rel_close(ld, ld0 + term, "forward")
    assert _is_format(y, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_channel_affine_bwd(device, shape, channels_last):
    out = _fmt(torch.randn(shape), channels_last).to(device)
    grad_out = _fmt(torch.randn(shape), not channels_last).to(device)  # the two layouts independent
    matrix, _, matrix_inv, inv_offset = _map_params(shape[1], device)
    got = _ops().channel_affine_bwd(out, grad_out, matrix, matrix_inv, inv_offset)
    want = reference.channel_affine_bwd(out, grad_out, matrix, matrix_inv, inv_offset)
    for g, w, what in zip(got, want, ("inverse", "grad", "grad", "grad")):
        assert_rel_close(g, w, what)
    assert _is_format(got[0], channels_last) and _is_format(got[1], channels_last)
    assert got[2].shape == (shape[1], shape[1]) and got[3].shape == (shape[1],)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_are_handled(device):
    """Channel slices (collapsible, not dense), transposed parameters and an expanded (stride 0)
    gradient, as the gradient of a sum arrives."""
    big = torch.randn(2, 20, 6, 7, device=device)
    x = big[:, 3:15]  # 12 channels, strides of a 20-channel tensor
    c = x.shape[1]
    matrix, offset, matrix_inv, inv_offset = _map_params(c, device)
    ld = torch.zeros(2, device=device)
    y = _ops().channel_affine_fwd(x, matrix.t().contiguous().t(), offset, torch.tensor(1.0, device=device), ld)
    assert_rel_close(y, reference.channel_affine(x, matrix, offset), "forward")
    grad_out = torch.ones((), device=device).expand(x.shape)
    got = _ops().channel_affine_bwd(x, grad_out, matrix, matrix_inv, inv_offset)
    want = reference.channel_affine_bwd(x, grad_out, matrix, matrix_inv, inv_offset)
    for g, w in zip(got, want):
        assert_rel_close(g, w, "grad")
    h = torch.randn(2, 2 * c, 6, 7, device=device)
    gl = torch.ones((), device=device).expand(2)
    got = _ops().affine_coupling_bwd(x, h, grad_out, gl, 0, True, EPS, False)
    want = reference.affine_coupling_bwd(x, h, grad_out, gl, 0, True, EPS, False)
    for g, w in zip(got, want):
        assert_rel_close(g, w, "grad")


# ---- the public wrappers with backend="cuda" (CPU tensors: the C++ kernels) ----


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("channels", [12, 96])
@pytest.mark.parametrize("device", DEVICES)
def test_public_actnorm_conv(device, channels, channels_last, reverse):
    x = _fmt(torch.randn(2, channels, 6, 5), channels_last).to(device)
    weight = torch.linalg.qr(torch.randn(channels, channels))[0].to(device) + 0.05 * torch.randn(
        channels, channels, device=device
    )
    logs, bias = 0.2 * torch.randn(channels, device=device), torch.randn(channels, device=device)
    op = fk.ops.actnorm_conv_inv if reverse else fk.ops.actnorm_conv_fwd
    results = {}
    for backend in ("cuda", "reference"):
        ld = torch.ones(2, device=device)
        y, ld_out = op(x, weight, logs, bias, ld, backend=backend)
        assert ld_out is ld
        results[backend] = (y, ld)
    assert_rel_close(results["cuda"][0], results["reference"][0], "inverse" if reverse else "forward")
    assert_rel_close(results["cuda"][1], results["reference"][1], "forward")

    grad_out, grad_logdet = torch.randn_like(x), torch.randn(2, device=device)
    args = (_fmt(results["reference"][0], channels_last), grad_out, grad_logdet, weight, logs, bias)
    got = fk.ops.actnorm_conv_bwd(*args, reverse=reverse, backend="cuda")
    want = fk.ops.actnorm_conv_bwd(*args, reverse=reverse, backend="reference")
    for name, g, w in zip(("inp", "grad_inp", "grad_weight", "grad_logs", "grad_bias"), got, want):
        assert_rel_close(g, w, "grad" if name != "inp" else "inverse")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("shift_first", [True, False], ids=["shift_first", "scale_first"])
@pytest.mark.parametrize("passive_kind", PASSIVE)
@pytest.mark.parametrize("device", DEVICES)
def test_public_affine_coupling(device, passive_kind, shift_first, reverse):
    passive = _passive(passive_kind, 12)
    x, h = _coupling_inputs((2, 12, 5, 7), passive, "cl", device)
    op = fk.ops.affine_coupling_inv if reverse else fk.ops.affine_coupling_fwd
    kw = {"passive": passive, "shift_first": shift_first}
    results = {}
    for backend in ("cuda", "reference"):
        ld = torch.ones(2, device=device)
        y, ld_out = op(x, h, ld, backend=backend, **kw)
        assert ld_out is ld
        results[backend] = (y, ld)
    for g, w in zip(results["cuda"], results["reference"]):
        assert_rel_close(g, w, "forward")
    grad_out, grad_logdet = torch.randn_like(x), torch.randn(2, device=device)
    got = fk.ops.affine_coupling_bwd(x, h, grad_out, grad_logdet, reverse=reverse, backend="cuda", **kw)
    want = fk.ops.affine_coupling_bwd(x, h, grad_out, grad_logdet, reverse=reverse, backend="reference", **kw)
    for g, w in zip(got, want):
        assert_rel_close(g, w, "grad")


# ---- input checks: clear errors naming the argument and the value; a wrong dtype raises
# TypeError, any other bad input ValueError (TORCH_CHECK_TYPE / TORCH_CHECK_VALUE) ----


def _error_type(message: str) -> type[Exception]:
    return TypeError if "dtype" in message else ValueError


def _good_coupling(device: str = "cpu"):
    x = torch.randn(2, 6, 4, 5, device=device)
    return x, torch.randn(2, 6, 4, 5, device=device), torch.zeros(2, device=device)  # passive 3


COUPLING_ERRORS = {
    "x_float64": (lambda x, h, ld: (x.double(), h, ld, 3), r"x: expected dtype float32"),
    "x_3d": (lambda x, h, ld: (x[0], h, ld, 3), r"x: expected a 4-D"),
    "h_shape": (lambda x, h, ld: (x, h[:, :4], ld, 3), r"h: expected shape \(2, 6, 4, 5\).*got \[2, 4, 4, 5\]"),
    "h_float16": (lambda x, h, ld: (x, h.half(), ld, 3), r"h: expected dtype float32 or bfloat16, got Half"),
    "passive_range": (lambda x, h, ld: (x, h, ld, 6), r"passive: expected 0 <= passive < 6.*got 6"),
    "logdet_strided": (lambda x, h, ld: (x, h, torch.zeros(4)[::2], 3), r"logdet: expected a contiguous"),
    "logdet_float64": (lambda x, h, ld: (x, h, ld.double(), 3), r"logdet: expected dtype float32, got Double"),
    "logdet_shape": (lambda x, h, ld: (x, h, torch.zeros(3), 3), r"logdet: expected shape \(2,\).*got \[3\]"),
    "pixels_not_collapsible": (
        lambda x, h, ld: (x.transpose(2, 3), h.transpose(2, 3), ld, 3),
        r"x: H and W must collapse into one pixel axis.*strides",
    ),
}


@pytest.mark.parametrize("case", list(COUPLING_ERRORS))
def test_affine_coupling_rejects_bad_inputs(case):
    make, message = COUPLING_ERRORS[case]
    x, h, ld, passive = make(*_good_coupling())
    with pytest.raises(_error_type(message), match=message):
        _ops().affine_coupling_fwd(x, h, ld, passive, True, EPS)


def test_affine_coupling_bwd_rejects_bad_inputs():
    x, h, _ = _good_coupling()
    with pytest.raises(ValueError, match=r"grad_out: expected shape \[2, 6, 4, 5\].*got \[2, 6, 4, 4\]"):
        _ops().affine_coupling_bwd(x, h, x[..., :4], torch.zeros(2), 3, True, EPS, False)
    with pytest.raises(ValueError, match=r"grad_logdet: expected shape \(2,\)"):
        _ops().affine_coupling_bwd(x, h, x, torch.zeros(2, 1), 3, True, EPS, False)
    with pytest.raises(TypeError, match=r"grad_out: expected dtype float32, got Double"):
        _ops().affine_coupling_bwd(x, h, x.double(), torch.zeros(2), 3, True, EPS, False)


MAP_ERRORS = {
    "matrix_shape": (lambda x, m, o, t, ld: (x, m[:4], o, t, ld), r"matrix: expected shape \[5, 5\].*got \[4, 5\]"),
    "matrix_float64": (lambda x, m, o, t, ld: (x, m.double(), o, t, ld), r"matrix: expected dtype float32"),
    "offset_shape": (lambda x, m, o, t, ld: (x, m, o[:3], t, ld), r"offset: expected shape \[5\].*got \[3\]"),
    "term_two_elements": (lambda x, m, o, t, ld: (x, m, o, torch.zeros(2), ld), r"logdet_term: expected a one-element"),
    "logdet_strided": (lambda x, m, o, t, ld: (x, m, o, t, torch.zeros(4)[::2]), r"logdet: expected a contiguous"),
    "x_float64": (lambda x, m, o, t, ld: (x.double(), m, o, t, ld), r"x: expected dtype float32"),
}


@pytest.mark.parametrize("case", list(MAP_ERRORS))
def test_channel_affine_rejects_bad_inputs(case):
    make, message = MAP_ERRORS[case]
    args = make(torch.randn(2, 5, 3, 4), torch.randn(5, 5), torch.randn(5), torch.tensor(0.0), torch.zeros(2))
    with pytest.raises(_error_type(message), match=message):
        _ops().channel_affine_fwd(*args)


def test_channel_affine_bwd_rejects_bad_inputs():
    out, m = torch.randn(2, 5, 3, 4), torch.randn(5, 5)
    with pytest.raises(ValueError, match=r"grad_out: expected shape \[2, 5, 3, 4\]"):
        _ops().channel_affine_bwd(out, out[:1], m, m, torch.zeros(5))
    with pytest.raises(ValueError, match=r"matrix_inv: expected shape \[5, 5\]"):
        _ops().channel_affine_bwd(out, out, m, m[:, :2], torch.zeros(5))


# ---- registration ----


def _opcheck_cases(device: str):
    x, h = _coupling_inputs((2, 6, 4, 5), 3, "cl", device)
    matrix, offset, matrix_inv, inv_offset = _map_params(6, device)
    ld = torch.zeros(2, device=device)
    term = torch.tensor(0.5, device=device)
    ops = _ops()
    return {
        "channel_affine_fwd": (ops.channel_affine_fwd.default, (x, matrix, offset, term, ld)),
        "channel_affine_bwd": (
            ops.channel_affine_bwd.default,
            (x, torch.randn_like(x), matrix, matrix_inv, inv_offset),
        ),
        "affine_coupling_fwd": (ops.affine_coupling_fwd.default, (x, h, ld, 3, True, EPS)),
        "affine_coupling_inv": (ops.affine_coupling_inv.default, (x, h, ld, 3, False, EPS)),
        "affine_coupling_bwd": (
            ops.affine_coupling_bwd.default,
            (x, h.bfloat16(), torch.randn_like(x), torch.randn(2, device=device), 3, True, EPS, True),
        ),
    }


# The ops mutate the log-det buffer and carry no autograd formula of their own (the FlowSequence
# unit differentiates through them), so test_autograd_registration does not apply: test the
# schema (declared mutation and no aliasing of outputs), the fakes against the real kernels, and
# tracing through AOT dispatch with dynamic shapes (functionalisation of the mutation).
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize(
    "op_name", ["channel_affine_fwd", "channel_affine_bwd", *(f"affine_coupling_{d}" for d in ("fwd", "inv", "bwd"))]
)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, op_name):
    op, args = _opcheck_cases(device)[op_name]
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


# ---- determinism ----


def test_cpu_reductions_do_not_depend_on_the_thread_count():
    x = torch.randn(4, 12, 40, 40)
    h = torch.randn(4, 12, 40, 40)
    matrix, _, matrix_inv, inv_offset = _map_params(12, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            ld = torch.zeros(4)
            _ops().affine_coupling_fwd(x, h, ld, 6, True, EPS)
            results.append((ld, *_ops().channel_affine_bwd(x, h, matrix, matrix_inv, inv_offset)[2:]))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_reductions_are_bitwise_reproducible():
    x = torch.randn(8, 12, 80, 80, device="cuda")
    h = torch.randn(8, 12, 80, 80, device="cuda")
    big = torch.randn(8, 96, 20, 20, device="cuda")
    small_map, large_map = _map_params(12, "cuda"), _map_params(96, "cuda")
    outs = []
    for _ in range(2):
        ld = torch.zeros(8, device="cuda")
        _ops().affine_coupling_fwd(x, h, ld, 6, True, EPS)
        m, _, mi, io = small_map
        small = _ops().channel_affine_bwd(x, h, m, mi, io)[2:]
        m, _, mi, io = large_map
        large = _ops().channel_affine_bwd(big, big, m, mi, io)[2:]
        outs.append((ld, *small, *large))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---- end to end: memory-saving FlowSequence on the compiled kernels ----

C, COND = 12, 6  # level-1 SRFlow channels, a small conditioning tensor


def _sequence_grads(seq: fk.FlowSequence, backend: str, x, cond, cot, cot_ld, reverse: bool = False):
    """Gradients of <z, cot> + <logdet, cot_ld> w.r.t. x, cond and every parameter on ``backend``."""
    with fk.use_backend(backend):
        assert select_backend(None, x) == backend
        x, cond = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
        z, ld = seq.inverse(x, cond) if reverse else seq(x, cond)
        loss = (z * cot).sum() + (ld * cot_ld).sum()
        return list(torch.autograd.grad(loss, [x, cond, *seq.parameters()]))


def _check_sequence(saving: fk.FlowSequence, device: str, x, cond, reverse: bool = False) -> None:
    plain = copy.deepcopy(saving)
    plain.memory_saving = False
    cot, cot_ld = torch.randn_like(x), torch.randn(x.shape[0], device=device)
    got = _sequence_grads(saving, "cuda", x, cond, cot, cot_ld, reverse)
    want = _sequence_grads(plain, "reference", x, cond, cot, cot_ld, reverse)
    names = ["x", "cond", *(n for n, _ in saving.named_parameters())]
    for name, g, w in zip(names, got, want):
        assert rel_err(g, w) <= REL_TOL["grad_level"], f"{name}: {rel_err(g, w):.2e}"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_flow_sequence_gradients_cpu(channels_last, reverse):
    """4 steps (2 transitional, 2 conditional couplings), random trained-like weights."""
    saving = fk.FlowSequence(srflow_level(4, C, COND))
    x = _fmt(torch.randn(2, C, 5, 7), channels_last)
    cond = _fmt(torch.randn(2, COND, 5, 7), channels_last)
    _check_sequence(saving, "cpu", x * (0.5 if reverse else 1.0), cond, reverse)


@pytest.mark.parametrize("device", DEVICES)
def test_flow_sequence_54_steps(device):
    """SRFlow depth on small images: reconstruction drift stays within the level tolerance."""
    x, cond = torch.randn(2, C, 6, 6), torch.randn(2, COND, 6, 6)
    with fk.use_backend("reference"):
        saving = trained_level(54, C, COND, x, cond).to(device)
    _check_sequence(saving, device, x.to(device), cond.to(device))


# ---- GPU: the CUDA kernels against the Triton kernels ----


@pytest.mark.gpu
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16], ids=["h_fp32", "h_bf16"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", [SHAPES[3], pytest.param((16, 12, 80, 80), id="level1-b16")])
def test_cuda_matches_triton(shape, layout, h_dtype):
    load_triton("flowkernels.ops._affine_coupling_kernels")
    load_triton("flowkernels.ops._channel_affine_kernels")
    ops = _ops()
    passive = shape[1] // 2
    x, h = _coupling_inputs(shape, passive, layout, "cuda")
    h = h.to(h_dtype)
    lds = [torch.zeros(shape[0], device="cuda") for _ in range(2)]
    y_cuda = ops.affine_coupling_fwd(x, h, lds[0], passive, True, EPS)
    y_triton = ops.affine_coupling_fwd_triton(x, h, lds[1], passive, True, EPS)
    assert_rel_close(y_cuda, y_triton, "forward")
    assert_rel_close(lds[0], lds[1], "forward")
    g, gl = torch.randn_like(x), torch.randn(shape[0], device="cuda")
    for a, b in zip(
        ops.affine_coupling_bwd(x, h, g, gl, passive, True, EPS, False),
        ops.affine_coupling_bwd_triton(x, h, g, gl, passive, True, EPS, False),
    ):
        # bf16 grad_h: both round the same float32 value, but 1-ulp float32 differences can flip
        # a rounding; allow one bf16 ulp relative to the largest element.
        assert_rel_close(a.float(), b.float(), "grad", tol=2.0**-8 if a.dtype == torch.bfloat16 else None)
    matrix, offset, matrix_inv, inv_offset = _map_params(shape[1], "cuda")
    term = torch.tensor(3.0, device="cuda")
    assert_rel_close(
        ops.channel_affine_fwd(x, matrix, offset, term, lds[0]),
        ops.channel_affine_fwd_triton(x, matrix, offset, term, lds[1]),
        "forward",
    )
    for a, b in zip(
        ops.channel_affine_bwd(x, g, matrix, matrix_inv, inv_offset),
        ops.channel_affine_bwd_triton(x, g, matrix, matrix_inv, inv_offset),
    ):
        assert_rel_close(a, b, "grad")


def test_bwd_wrappers_accept_upstream_gradients_in_any_layout():
    """A gradient whose H and W do not collapse (here a transposed one) is made dense by the
    public *_bwd wrappers instead of being refused by the kernels."""
    out, h = torch.randn(2, 6, 4, 5), torch.randn(2, 6, 4, 5)
    grad = torch.randn(2, 6, 5, 4).transpose(2, 3)
    grad_logdet = torch.randn(2)
    got = fk.ops.affine_coupling_bwd(out, h, grad, grad_logdet, passive=3, backend="cuda")
    want = fk.ops.affine_coupling_bwd(out, h, grad, grad_logdet, passive=3, backend="reference")
    for g, w in zip(got, want):
        assert_rel_close(g, w, "grad")
    weight = torch.linalg.qr(torch.randn(6, 6))[0]
    args = (out, grad, torch.zeros(2), weight, torch.randn(6) * 0.1, torch.randn(6))
    got_map = fk.ops.actnorm_conv_bwd(*args, backend="cuda")
    want_map = fk.ops.actnorm_conv_bwd(*args, backend="reference")
    for g, w in zip(got_map, want_map):
        assert_rel_close(g, w, "grad")
