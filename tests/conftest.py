"""Shared test setup: the environment of the kernels, per-test seeds, no TF32, GPU skipping.

The environment is set here, once, before any test module is imported, and nowhere else:

* ``TRITON_INTERPRET=1``: Triton decides at decoration whether a ``@triton.jit`` function runs
  compiled or under its interpreter: for its own helpers (the combine functions of ``tl.sum``
  and friends) when triton is imported, for ours when flowkernels first loads a Triton kernel
  module. So triton is imported right here, after the variable is set: a test that clears the
  variable for itself (test_dispatch.py) cannot then be the first to import it and leave
  compiled helpers that the interpreted kernels cannot call. ``flowkernels.dispatch`` reads the
  variable at each call, to decide whether the Triton backend can take CPU tensors. Set by
  default so the Triton kernels run on the CPU; a GPU run exports ``TRITON_INTERPRET=0`` to run
  them compiled (scripts/gpu_check.sh does; Triton and flowkernels both read "0" as off).
* ``FLOWKERNELS_POISON_OUTPUTS=1``: kernel launchers fill every output with NaN before launching,
  so elements a kernel forgets to write show up as NaN in the comparisons (read at launch).

Inner loop: ``pytest -m "not slow"`` leaves out the long tests (54-step checks, DDP, training and
CLI runs end to end, torch.compile, benchmark smoke runs); ``make test`` runs everything.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from flowkernels._loader import triton_reason

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FLOWKERNELS_POISON_OUTPUTS", "1")
triton_reason()  # imports triton if it is installed (the Triton tests skip, with this reason, if not)


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Fresh inputs per test (the seed differs between tests) that a failure can reproduce."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 tolerances need fp32 convolutions and matmuls on GPUs: with cuDNN's TF32 default
    (10-bit mantissa) the recomputed subnet outputs of the memory-saving backward, and
    Inductor's convolutions, differ by ~1e-3 from the stored ones. Restored after each test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from threads, and on a small shared machine
    a competing process stalls OpenMP's barrier waits (measured 10-20x slower training steps with
    2 threads on 2 busy cores). For the SRFlow training and CLI tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory):
    """A folder with three of the photos that ship with scikit-image, as PNG files."""
    from srflow.data import write_bundled_photos

    folder = tmp_path_factory.mktemp("photos")
    write_bundled_photos(folder, ("astronaut", "chelsea", "coffee"))
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs in scripts/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
