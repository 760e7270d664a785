"""Backend selection: defaults, explicit refusals with reasons, lazy imports."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import flowkernels as fk
from flowkernels import _layout, _loader, dispatch
from tests.helpers import run_python


def test_default_and_context_manager():
    start = fk.get_backend()
    with fk.use_backend("reference"):
        assert fk.get_backend() == "reference"
        with fk.use_backend("triton"):
            assert fk.get_backend() == "triton"
        assert fk.get_backend() == "reference"
    assert fk.get_backend() == start


def test_invalid_backend_name():
    with pytest.raises(ValueError, match=r"backend: expected one of .* got 'cudnn'"):
        fk.set_backend("cudnn")
    with pytest.raises(ValueError, match="got 'fast'"):
        fk.select_backend("fast", torch.zeros(1, 2, 2, 2))


def test_reference_never_refuses():
    x = torch.zeros(1, 3, 2, 2, dtype=torch.float64)[:, :, ::2]
    assert dispatch.refusals("reference", x) == []
    assert fk.select_backend("reference", x) == "reference"


def test_auto_priority_table():
    """The measured speed order (benchmarks/results/); on a CPU the Triton interpreter is a test
    tool, never chosen automatically."""
    assert dispatch.AUTO_PRIORITY == {"cuda": ("cuda", "triton", "reference"), "cpu": ("cuda", "reference")}


@pytest.mark.parametrize(
    ("device", "refused", "expected"),
    [
        ("cpu", set(), "cuda"),
        ("cpu", {"cuda"}, "reference"),  # triton, even if it could run, is not a CPU choice
        ("cuda", set(), "cuda"),
        ("cuda", {"triton"}, "cuda"),
        ("cuda", {"cuda"}, "triton"),
        ("cuda", {"cuda", "triton"}, "reference"),
    ],
)
def test_auto_takes_the_first_backend_that_does_not_refuse(monkeypatch, device, refused, expected):
    """The walk over AUTO_PRIORITY, with refusals replaced by a chosen set. A stand-in carries
    the device type, so the CUDA row is checked without a GPU."""
    monkeypatch.setattr(dispatch, "refusals", lambda backend, x, h=None: ["refused"] if backend in refused else [])
    x = SimpleNamespace(device=torch.device(device))
    assert fk.select_backend("auto", x) == expected


def test_auto_falls_back_to_the_reference_for_float64():
    """float64 is refused by every kernel backend (the real refusals)."""
    assert fk.select_backend("auto", torch.zeros(2, 4, 3, 3, dtype=torch.float64)) == "reference"


def test_named_backend_lists_every_reason(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 4, 6, 6, dtype=torch.float64)[:, :, ::2]
    h = torch.zeros(2, 8, 3, 6, dtype=torch.float16)
    with pytest.raises(fk.BackendUnavailableError) as info:
        fk.select_backend("triton", x, h)
    msg = str(info.value)
    assert "backend 'triton' cannot take x: shape (2, 4, 3, 6), dtype torch.float64" in msg
    assert "x is on cpu; the Triton kernels need CUDA or TRITON_INTERPRET=1" in msg
    assert "the flow state must be torch.float32" in msg
    assert "the kernels need stride_h == W * stride_w" in msg
    assert "h has dtype torch.float16" in msg


def test_layout_rule_accepts_what_the_kernels_take():
    """One rule (flowkernels._layout): H and W collapse into one pixel axis."""
    x = torch.zeros(2, 8, 3, 5)
    assert _layout.pixel_strides(x) == (120, 15, 1)
    assert _layout.pixel_strides(x.to(memory_format=torch.channels_last)) == (120, 1, 8)
    assert _layout.pixel_strides(x[:, :4]) == (120, 15, 1)  # a channel slice
    assert _layout.pixel_strides(x[..., :1]) == (120, 15, 5)  # W == 1: the pixel stride is stride_h
    assert _layout.pixel_strides(x[..., 1:]) is None  # a crop along W
    assert _layout.layout_reason("x", x[:, :4]) is None
    assert "x: strides (120, 15, 5, 1)" in _layout.layout_reason("x", x[..., 1:])


def test_channel_slices_are_dispatched_to_the_kernels():
    """The kernels and docs/ops.md accept channel slices, so the dispatch must not refuse them."""
    big = torch.randn(2, 8, 4, 5)
    x, h = big[:, :4], torch.randn(2, 8, 4, 5)
    for backend in ("cuda", "triton"):
        assert not [r for r in dispatch.refusals(backend, x, h) if "strides" in r], backend
    if dispatch.refusals("cuda", x, h):
        pytest.skip("the compiled extension is not built here")
    y, logdet = fk.ops.affine_coupling_fwd(x, h, backend="cuda")
    y_ref, logdet_ref = fk.ops.affine_coupling_fwd(x, h, backend="reference")
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(logdet, logdet_ref)


def test_kernel_ops_refuse_to_be_differentiated():
    x = torch.randn(1, 4, 2, 2, requires_grad=True)
    h = torch.randn(1, 8, 2, 2)
    if dispatch.refusals("cuda", x, h):
        pytest.skip("the compiled extension is not built here")
    with pytest.raises(RuntimeError, match="no autograd formula of their own"):
        fk.ops.affine_coupling_fwd(x, h, backend="cuda")


def _python(code: str, **env: str) -> str:
    done = run_python(code, **env)
    done.check_returncode()
    return done.stdout


def test_import_loads_neither_triton_nor_the_extension():
    out = _python("import sys, flowkernels; print('triton' in sys.modules, 'flowkernels._C' in sys.modules)")
    assert out.split() == ["False", "False"]


def test_every_triton_kernel_module_is_registered():
    """``check_backend_available`` loads the Triton kernel modules that ``flowkernels.ops``
    registers (``TRITON_OPS``): a kernel file missing from that list would be left unloaded, and
    a model using it could not be compiled."""
    from flowkernels.ops._common import TRITON_OPS  # noqa: PLC0415

    files = sorted(p.stem for p in Path(fk.ops.__file__).parent.glob("_*_kernels.py"))
    assert files == sorted(f"_{op}_kernels" for op in TRITON_OPS)
    assert sorted(_loader._triton_kernels) == [f"flowkernels.ops.{f}" for f in files]


def test_a_triton_kernel_import_failure_is_a_refusal(monkeypatch: pytest.MonkeyPatch):
    """A Triton kernel module that fails to import (say, under a triton release the kernels do
    not support) is a refusal like a missing triton: the preflight names it, and "auto" passes
    over triton at an op call too, where a process need not have run the preflight (a GPU
    without the CUDA extension), instead of raising an ImportError from inside the op."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(1, 2, 1, 1)
    why = dispatch.refusals("triton", x)
    if why:
        pytest.skip(f"the Triton backend cannot run on the CPU here: {'; '.join(why)}")
    monkeypatch.setattr(_loader, "_triton_kernels", [*_loader._triton_kernels, "flowkernels.ops._missing_kernels"])
    monkeypatch.delitem(_loader._loaded, "triton")  # restored at teardown: the backend loaded, as before
    failed = "the Triton kernels failed to import: flowkernels.ops._missing_kernels: ModuleNotFoundError"
    assert [r for r in dispatch.refusals("triton", x) if r.startswith(failed)]
    with pytest.raises(fk.BackendUnavailableError, match=failed):
        fk.check_backend_available("triton", "cpu")
    monkeypatch.setitem(dispatch.AUTO_PRIORITY, "cpu", ("triton", "reference"))
    fk.check_backend_available("auto", "cpu")
    assert fk.select_backend("auto", x) == "reference"
    x, h = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    y, logdet = fk.ops.affine_coupling_fwd(x, h, passive=2, backend="auto")
    y_ref, logdet_ref = fk.ops.affine_coupling_fwd(x, h, passive=2, backend="reference")
    torch.testing.assert_close((y, logdet), (y_ref, logdet_ref), rtol=0, atol=0)


def test_environment_variable_sets_the_initial_default():
    assert _python("import flowkernels; print(flowkernels.get_backend())", FLOWKERNELS_BACKEND="reference").strip() == (
        "reference"
    )
    with pytest.raises(subprocess.CalledProcessError):
        _python("import flowkernels", FLOWKERNELS_BACKEND="nope")


def test_check_backend_available_is_a_preflight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Applications check a backend against a device before writing anything: the reference and
    "auto" always run; a backend with reasons raises BackendUnavailableError naming them."""
    fk.check_backend_available("reference", "cpu")
    fk.check_backend_available("auto", "cpu")
    fk.check_backend_available(None, "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fk.BackendUnavailableError, match=r"backend 'triton' cannot run on cpu: .*TRITON_INTERPRET"):
        fk.check_backend_available("triton", "cpu")
    with pytest.raises(ValueError, match="backend: expected one of"):
        fk.check_backend_available("gpu", "cpu")


@pytest.mark.gpu
def test_auto_takes_the_cuda_kernels_on_a_gpu():
    """With the extension built for CUDA (scripts/gpu_check.sh checks the build), "auto" runs the
    CUDA kernels on a GPU: were it to refuse them (a CPU-only build, a wrong reason), every GPU
    test of "auto" would still pass, on triton or the reference."""
    assert fk.select_backend("auto", torch.zeros(1, 2, 1, 1, device="cuda")) == "cuda"
