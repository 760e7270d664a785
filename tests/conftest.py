"""Shared test setup: per-test seeds, poisoned kernel outputs, no TF32, GPU skipping."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

# Kernel launchers fill every output with NaN before launching when this is set, so elements a
# kernel forgets to write show up as NaN in the comparisons (read by flowkernels at launch).
os.environ.setdefault("FLOWKERNELS_POISON_OUTPUTS", "1")


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs in scripts/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
