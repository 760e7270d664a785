"""Tests of the Triton kernels alone (flowkernels/ops/_*_kernels.py): the grid-stride loop of the
channel-map backward, the launchers' layout check, and registration (opcheck). Their results
against the reference, shared with the compiled extension, are in tests/test_kernels.py.

On a CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in
tests/conftest.py); on a GPU (``gpu`` marker, TRITON_INTERPRET=0) they run compiled.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from flowkernels import reference
from tests.kernel_grid import DEVICES, EPS, Kernel, channel_map, f64, kernel_backend, to_layout
from tests.tolerances import assert_rel_close

OPS = [
    "channel_affine_fwd",
    "channel_affine_bwd",
    "affine_coupling_fwd",
    "affine_coupling_inv",
    "affine_coupling_bwd",
    "additive_coupling_fwd",
    "additive_coupling_inv",
    "additive_coupling_bwd",
]


@pytest.fixture(params=DEVICES)
def triton(request: pytest.FixtureRequest) -> Kernel:
    return kernel_backend("triton", request.param)


def test_channel_affine_bwd_many_tiles_per_program(triton: Kernel, monkeypatch: pytest.MonkeyPatch):
    """More pixel tiles than the program cap: programs loop over tiles (grid-stride) and the
    partials still sum to the full reduction. Level-1 channels, 2 * 40 * 40 pixels."""
    kernels = importlib.import_module("flowkernels.ops._channel_affine_kernels")  # loaded by the fixture
    monkeypatch.setattr(kernels, "_BWD_MAX_PROGRAMS", 3)  # 2 * ceil(1600 / 128) = 26 tiles over 3 programs
    shape = (2, 12, 40, 40)
    cmap = channel_map(12, 1600, triton.device)
    out, grad_out = torch.randn(shape, device=triton.device), torch.randn(shape, device=triton.device)
    args = (cmap.matrix, cmap.matrix_inv, cmap.inv_offset)
    got = triton.op("channel_affine_bwd")(out, grad_out, *args)
    want = reference.channel_affine_bwd(*f64(out, grad_out, *args))
    for g, w in zip(got, want):
        assert_rel_close(g, w, "grad")


def test_cropped_width_is_refused_with_reason(triton: Kernel):
    """A crop along W breaks stride_h == W * stride_w: the launcher raises, naming the argument."""
    x = torch.randn(2, 6, 5, 4, device=triton.device)[..., 1:]
    h = torch.randn(2, 12, 5, 3, device=triton.device)
    with pytest.raises(ValueError, match=r"x: strides .* stride_h == W \* stride_w"):
        triton.op("affine_coupling_fwd")(x, h, torch.zeros(2, device=triton.device), 0, True, EPS)


def _opcheck_samples(triton: Kernel) -> dict[str, tuple]:
    """One small sample per op; no input requires grad (the ops have no autograd formula: the
    FlowSequence unit differentiates them by invertible recompute)."""
    c = 12
    x = to_layout(torch.randn(2, c, 5, 3, device=triton.device), channels_last=True)
    h = torch.randn(2, c, 5, 3, device=triton.device)  # passive = C // 2: h has 2 * 6 channels
    cmap = channel_map(c, 15, triton.device)
    logdet = torch.randn(2, device=triton.device)
    return {
        "channel_affine_fwd": (x, cmap.matrix, cmap.offset, cmap.logdet_term, logdet),
        "channel_affine_bwd": (x, h, cmap.matrix, cmap.matrix_inv, cmap.inv_offset),
        "affine_coupling_fwd": (x, h, logdet, c // 2, True, EPS),
        "affine_coupling_inv": (x, h, logdet, c // 2, False, EPS),
        "affine_coupling_bwd": (x, h, x, logdet, c // 2, True, EPS, True),
        "additive_coupling_fwd": (x, h[:, : c // 2], c // 2),
        "additive_coupling_inv": (x, h[:, : c // 2], c // 2),
        "additive_coupling_bwd": (x, h[:, : c // 2], x, c // 2, False),
    }


@pytest.mark.parametrize("name", OPS)
def test_opcheck_schema_and_fake(name):
    """test_schema: the declared mutation (logdet only, fresh outputs) matches what the op does;
    test_faketensor: the fake gives the real outputs' shapes, dtypes and strides (layouts).
    test_autograd_registration is left out: no input requires grad and the ops deliberately
    have no autograd formula, so it would check nothing. test_aot_dispatch_dynamic needs the
    compiled kernels (AOT decomposes a triton_op by tracing its launcher, which the interpreter
    cannot run on fake tensors): see test_opcheck_aot_dispatch (GPU)."""
    triton = kernel_backend("triton", "cpu")
    samples = _opcheck_samples(triton)
    torch.library.opcheck(triton.op(name), samples[name], test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPS)
def test_opcheck_aot_dispatch(name):
    """AOTAutograd with dynamic shapes traces the launcher (wrap_triton) and runs it: the
    decomposition of a mutating triton_op must give the eager results."""
    triton = kernel_backend("triton", "cuda")
    torch.library.opcheck(
        triton.op(name),
        _opcheck_samples(triton)[name],
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
