"""Tests of the compiled extension ``flowkernels._C`` alone (C++ on CPU; CUDA under the ``gpu``
marker): that it is built with OpenMP, its input checks and their messages, its registration
(opcheck), and the determinism of its reductions. Its results against the reference, shared with
the Triton kernels, are in tests/test_kernels.py.

Run: ``PYTHONPATH=. python -m pytest tests/test_cpp_kernels.py -q`` (needs the extension built,
``pip install --no-build-isolation -e .``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from flowkernels._loader import load_extension
from flowkernels.cpu_isa import cpu_isa, set_cpu_isa, supported_cpu_isas, use_cpu_isa
from tests.helpers import run_python
from tests.kernel_grid import (
    CPU_ISAS,
    DEVICES,
    EPS,
    Kernel,
    channel_map,
    coupling_inputs,
    kernel_backend,
    selected_isa,
)


@pytest.fixture
def cpp() -> Kernel:
    return kernel_backend("cuda", "cpu")


@pytest.fixture(params=CPU_ISAS)
def cpp_isa(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    """The C++ kernels in each instruction-set variant this CPU supports."""
    kernel = kernel_backend("cuda", "cpu", request.param)
    with selected_isa(kernel):
        yield kernel


def test_build_has_openmp():
    """The extension is required here (CI builds it), so this fails, naming how to build it, where
    it is missing. at::parallel_for is an OpenMP region compiled into _C: without -fopenmp it runs
    serially."""
    assert load_extension().with_openmp


# ---- instruction-set variants (flowkernels.cpu_isa) ----


def test_default_variant_is_the_best_this_cpu_supports():
    supported = supported_cpu_isas()
    assert supported[0] == "baseline" and set(supported) <= set(CPU_ISAS)
    assert cpu_isa() == supported[-1]


def test_use_cpu_isa_selects_and_restores():
    best = cpu_isa()
    with use_cpu_isa("baseline"):
        assert cpu_isa() == "baseline"
    assert cpu_isa() == best


@pytest.mark.parametrize("name", ["avx1024", "AVX2", ""])
def test_unknown_variant_is_refused(name: str):
    with pytest.raises(
        ValueError, match=rf"cpu_isa: expected one of the variants this CPU supports \(baseline.*got '{name}'"
    ):
        set_cpu_isa(name)


def test_variants_are_different_code(cpp: Kernel):
    """The switch really changes the code that runs: with FMA contraction and another vector
    width, a 12-channel map over 4096 pixels rounds differently in some element."""
    if len(supported_cpu_isas()) < 2:
        pytest.skip(f"this CPU runs only {supported_cpu_isas()}")
    x = torch.randn(2, 12, 64, 64)
    cmap = channel_map(12, 4096, "cpu")
    outs = []
    for isa in supported_cpu_isas():
        with use_cpu_isa(isa):
            outs.append(cpp.op("channel_affine_fwd")(x, cmap.matrix, cmap.offset, cmap.logdet_term, torch.zeros(2)))
    assert not torch.equal(outs[0], outs[-1])


def test_environment_variable_sets_the_initial_variant():
    done = run_python("import flowkernels.cpu_isa as c; print(c.cpu_isa())", FLOWKERNELS_CPU_ISA="baseline")
    assert done.returncode == 0 and done.stdout.strip() == "baseline", done.stderr
    bad = run_python("import flowkernels.cpu_isa as c; c.cpu_isa()", FLOWKERNELS_CPU_ISA="avx1024")
    assert bad.returncode != 0 and "FLOWKERNELS_CPU_ISA: cpu_isa: expected one of the variants" in bad.stderr


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
def test_affine_coupling_rejects_bad_inputs(cpp: Kernel, case):
    make, message = COUPLING_ERRORS[case]
    x, h, ld, passive = make(*_good_coupling())
    with pytest.raises(_error_type(message), match=message):
        cpp.op("affine_coupling_fwd")(x, h, ld, passive, True, EPS)


ADDITIVE_ERRORS = {
    "x_float64": (lambda x, h: (x.double(), h, 3), r"x: expected dtype float32"),
    "h_affine_shape": (  # an affine coupling's h (shift and scale) where one shift per channel is expected
        lambda x, h: (x, torch.cat([h, h], dim=1), 3),
        r"h: expected shape \(2, 3, 4, 5\) \(one shift each for the 3 active channels of x\), got \[2, 6, 4, 5\]",
    ),
    "h_float16": (lambda x, h: (x, h.half(), 3), r"h: expected dtype float32 or bfloat16, got Half"),
    "passive_range": (lambda x, h: (x, h, -1), r"passive: expected 0 <= passive < 6.*got -1"),
    "h_3d": (lambda x, h: (x, h[0], 3), r"h: expected a 4-D \(B, C, H, W\) tensor, got shape \[3, 4, 5\]"),
}


@pytest.mark.parametrize("case", list(ADDITIVE_ERRORS))
def test_additive_coupling_rejects_bad_inputs(cpp: Kernel, case):
    make, message = ADDITIVE_ERRORS[case]
    x, h, passive = make(torch.randn(2, 6, 4, 5), torch.randn(2, 3, 4, 5))
    with pytest.raises(_error_type(message), match=message):
        cpp.op("additive_coupling_fwd")(x, h, passive)


def test_additive_coupling_bwd_rejects_bad_inputs(cpp: Kernel):
    out, h = torch.randn(2, 6, 4, 5), torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"grad_out: expected shape \[2, 6, 4, 5\].*got \[2, 6, 4, 4\]"):
        cpp.op("additive_coupling_bwd")(out, h, out[..., :4], 3, False)
    with pytest.raises(TypeError, match=r"grad_out: expected dtype float32, got Double"):
        cpp.op("additive_coupling_bwd")(out, h, out.double(), 3, True)


def test_affine_coupling_bwd_rejects_bad_inputs(cpp: Kernel):
    x, h, _ = _good_coupling()
    with pytest.raises(ValueError, match=r"grad_out: expected shape \[2, 6, 4, 5\].*got \[2, 6, 4, 4\]"):
        cpp.op("affine_coupling_bwd")(x, h, x[..., :4], torch.zeros(2), 3, True, EPS, False)
    with pytest.raises(ValueError, match=r"grad_logdet: expected shape \(2,\)"):
        cpp.op("affine_coupling_bwd")(x, h, x, torch.zeros(2, 1), 3, True, EPS, False)
    with pytest.raises(TypeError, match=r"grad_out: expected dtype float32, got Double"):
        cpp.op("affine_coupling_bwd")(x, h, x.double(), torch.zeros(2), 3, True, EPS, False)


MAP_ERRORS = {
    "matrix_shape": (lambda x, m, o, t, ld: (x, m[:4], o, t, ld), r"matrix: expected shape \[5, 5\].*got \[4, 5\]"),
    "matrix_float64": (lambda x, m, o, t, ld: (x, m.double(), o, t, ld), r"matrix: expected dtype float32"),
    "offset_shape": (lambda x, m, o, t, ld: (x, m, o[:3], t, ld), r"offset: expected shape \[5\].*got \[3\]"),
    "term_two_elements": (lambda x, m, o, t, ld: (x, m, o, torch.zeros(2), ld), r"logdet_term: expected a one-element"),
    "logdet_strided": (lambda x, m, o, t, ld: (x, m, o, t, torch.zeros(4)[::2]), r"logdet: expected a contiguous"),
    "x_float64": (lambda x, m, o, t, ld: (x.double(), m, o, t, ld), r"x: expected dtype float32"),
}


@pytest.mark.parametrize("case", list(MAP_ERRORS))
def test_channel_affine_rejects_bad_inputs(cpp: Kernel, case):
    make, message = MAP_ERRORS[case]
    args = make(torch.randn(2, 5, 3, 4), torch.randn(5, 5), torch.randn(5), torch.tensor(0.0), torch.zeros(2))
    with pytest.raises(_error_type(message), match=message):
        cpp.op("channel_affine_fwd")(*args)


def test_channel_affine_bwd_rejects_bad_inputs(cpp: Kernel):
    out, m = torch.randn(2, 5, 3, 4), torch.randn(5, 5)
    with pytest.raises(ValueError, match=r"grad_out: expected shape \[2, 5, 3, 4\]"):
        cpp.op("channel_affine_bwd")(out, out[:1], m, m, torch.zeros(5))
    with pytest.raises(ValueError, match=r"matrix_inv: expected shape \[5, 5\]"):
        cpp.op("channel_affine_bwd")(out, out, m, m[:, :2], torch.zeros(5))


# ---- registration ----


def _opcheck_cases(kernel: Kernel) -> dict[str, tuple]:
    x, h = coupling_inputs((2, 6, 4, 5), 3, "cl", kernel.device)
    cmap = channel_map(6, 20, kernel.device)
    logdet = torch.zeros(2, device=kernel.device)
    grad_logdet = torch.randn(2, device=kernel.device)
    return {
        "channel_affine_fwd": (x, cmap.matrix, cmap.offset, cmap.logdet_term, logdet),
        "channel_affine_bwd": (x, torch.randn_like(x), cmap.matrix, cmap.matrix_inv, cmap.inv_offset),
        "affine_coupling_fwd": (x, h, logdet, 3, True, EPS),
        "affine_coupling_inv": (x, h, logdet, 3, False, EPS),
        "affine_coupling_bwd": (x, h.bfloat16(), torch.randn_like(x), grad_logdet, 3, True, EPS, True),
        "additive_coupling_fwd": (x, h[:, :3], 3),
        "additive_coupling_inv": (x, h[:, :3].contiguous(), 3),
        "additive_coupling_bwd": (x, h[:, :3].bfloat16(), torch.randn_like(x), 3, True),
    }


# The ops mutate the log-det buffer and carry no autograd formula of their own (the FlowSequence
# unit differentiates through them), so test_autograd_registration does not apply: test the
# schema (declared mutation and no aliasing of outputs), the fakes against the real kernels, and
# tracing through AOT dispatch with dynamic shapes (functionalisation of the mutation).
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize(
    "op_name",
    [
        "channel_affine_fwd",
        "channel_affine_bwd",
        *(f"{kind}_coupling_{d}" for kind in ("affine", "additive") for d in ("fwd", "inv", "bwd")),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, op_name):
    kernel = kernel_backend("cuda", device)
    torch.library.opcheck(kernel.op(op_name).default, _opcheck_cases(kernel)[op_name], test_utils=OPCHECK_UTILS)


# ---- determinism ----


def test_cpu_reductions_do_not_depend_on_the_thread_count(cpp_isa: Kernel):
    cpp = cpp_isa
    x = torch.randn(4, 12, 40, 40)
    h = torch.randn(4, 12, 40, 40)
    cmap = channel_map(12, 1600, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            ld = torch.zeros(4)
            cpp.op("affine_coupling_fwd")(x, h, ld, 6, True, EPS)
            additive = cpp.op("additive_coupling_bwd")(x, h[:, :6], h, 6, False)  # elementwise, 2 tasks per sample
            results.append(
                (ld, *additive, *cpp.op("channel_affine_bwd")(x, h, cmap.matrix, cmap.matrix_inv, cmap.inv_offset)[2:])
            )
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_reductions_are_bitwise_reproducible():
    cuda = kernel_backend("cuda", "cuda")
    x = torch.randn(8, 12, 80, 80, device="cuda")
    h = torch.randn(8, 12, 80, 80, device="cuda")
    big = torch.randn(8, 96, 20, 20, device="cuda")
    small, large = channel_map(12, 6400, "cuda"), channel_map(96, 400, "cuda")
    outs = []
    for _ in range(2):
        ld = torch.zeros(8, device="cuda")
        cuda.op("affine_coupling_fwd")(x, h, ld, 6, True, EPS)
        small_grads = cuda.op("channel_affine_bwd")(x, h, small.matrix, small.matrix_inv, small.inv_offset)[2:]
        large_grads = cuda.op("channel_affine_bwd")(big, big, large.matrix, large.matrix_inv, large.inv_offset)[2:]
        outs.append((ld, *small_grads, *large_grads))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
