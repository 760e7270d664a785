"""Builders shared by the tests: trained-like layers and inputs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import flowkernels as fk


@torch.no_grad()
def randomize_(module: nn.Module, scale: float = 0.05) -> nn.Module:
    """Trained-like weights: random ActNorms, non-zero last subnet layers (the zero init would
    make every coupling the same scale and hide errors). The 1x1 weights stay orthogonal-ish."""
    for m in module.modules():
        if isinstance(m, fk.ActNorm):
            m.bias.normal_(0.0, 0.3)
            m.logs.normal_(0.0, 0.2)
            m.initialized = True
        elif isinstance(m, fk.Conv2dZeros):
            m.weight.normal_(0.0, scale)
            m.bias.normal_(0.0, scale)
            m.logs.normal_(0.0, scale)
        elif isinstance(m, fk.InvConv1x1) and not m.lu:
            # spectral norm of the perturbation ~0.2 at any C, so W stays well conditioned
            m.weight.add_(torch.randn_like(m.weight) * (0.1 / m.channels**0.5))
    return module


def cond_step(channels: int, cond_channels: int, hidden: int = 16, backend: str | None = None) -> fk.FlowStep:
    """An SRFlow coupling step (actnorm, 1x1 conv, injector + coupling) with random weights."""
    step = fk.FlowStep(channels, fk.CondAffineCoupling(channels, cond_channels, hidden), backend=backend)
    return randomize_(step)


def srflow_level(depth: int, channels: int, cond_channels: int, hidden: int = 16, transitional: int = 2) -> list:
    """``transitional`` plain steps then ``depth - transitional`` conditional coupling steps."""
    steps = [randomize_(fk.FlowStep(channels)) for _ in range(transitional)]
    steps += [cond_step(channels, cond_channels, hidden) for _ in range(depth - transitional)]
    return steps


@torch.no_grad()
def trained_like_(module: nn.Module, *inputs: torch.Tensor, last_scale: float = 0.02, actnorm_scale: float = 0.05):
    """Weights like those of a model some way into training, for deep (54-step) checks.

    Official init, every ActNorm initialised from ``module(*inputs)`` (so activations stay
    unit-scale through the depth, as in a trained model), then the zero-initialised last
    layers set to N(0, last_scale^2) and every ActNorm perturbed by N(0, actnorm_scale^2).
    Fully random ActNorms (:func:`randomize_`) make a 54-step flow so ill-conditioned that
    float32 cannot invert it, which no trained model is.
    """
    for m in module.modules():
        if isinstance(m, fk.Conv2dZeros):
            m.weight.normal_(0.0, last_scale)
            m.bias.normal_(0.0, last_scale)
            m.logs.normal_(0.0, last_scale)
    was_training = module.training
    fk.initialize_actnorms(module, lambda: module(*inputs))
    for m in module.modules():
        if isinstance(m, fk.ActNorm):
            m.bias.add_(torch.randn_like(m.bias) * actnorm_scale)
            m.logs.add_(torch.randn_like(m.logs) * actnorm_scale)
    module.train(was_training)
    return module


def trained_level(
    depth: int,
    channels: int,
    cond_channels: int,
    x: torch.Tensor,
    cond: torch.Tensor,
    coupling: type[fk.Coupling] = fk.CondAffineCoupling,
    **kw,
):
    """A FlowSequence of one SRFlow level (2 transitional + ``coupling`` steps, hidden 16),
    trained-like on (x, cond)."""
    steps = [fk.FlowStep(channels) for _ in range(2)]
    steps += [fk.FlowStep(channels, coupling(channels, cond_channels, 16)) for _ in range(depth - 2)]
    return trained_like_(fk.FlowSequence(steps, **kw), x, cond)


def level_inputs(batch: int, channels: int, cond_channels: int, hw: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """(x, cond, cotangent of z, cotangent of logdet) for a level of ``channels`` at ``hw``
    (H, W), or hw x hw."""
    height, width = (hw, hw) if isinstance(hw, int) else hw
    return (
        torch.randn(batch, channels, height, width),
        torch.randn(batch, cond_channels, height, width),
        torch.randn(batch, channels, height, width),
        torch.randn(batch),
    )


@contextlib.contextmanager
def cuda_syncs_raise() -> Iterator[None]:
    """Inside, any CUDA op that makes the host wait for the device raises
    (``torch.cuda.set_sync_debug_mode("error")``); the default mode is restored on the way out."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def run_python(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python process (nothing imported or loaded yet), with the repository
    root as working directory and import path and ``env`` added to the environment; its
    output captured as text."""
    root = str(Path(__file__).resolve().parents[1])
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONPATH": root, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
