"""Shared test setup: per-test seeds, poisoned kernel outputs, GPU skipping."""

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs in scripts/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
