"""Builders shared by the tests: trained-like layers and inputs."""

from __future__ import annotations

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
            m.weight.add_(torch.randn_like(m.weight) * 0.1)
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
