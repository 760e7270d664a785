"""Invertible flow layers sharing one contract (see :mod:`flowkernels.layers.base`)."""

from ._cond_parts import CondProjection
from ._contract import StepGrads
from ._unit import invertible_backprop
from .actnorm import ActNorm, ActNorm2d, initialize_actnorms
from .base import InvertibleModule
from .coupling import (
    AdditiveCoupling,
    AffineCoupling,
    CondAffineCoupling,
    Conv2dActNorm,
    Conv2dZeros,
    Coupling,
    Subnet,
    make_subnet,
    validate_scale_floor,
)
from .flowstep import FlowStep
from .invconv import InvConv1x1
from .multiscale import FlowLevel, LevelGuard, MultiScaleFlow
from .prior import GaussianPrior
from .sequence import FlowSequence, validate_keep_every
from .split import Split2d
from .squeeze import Squeeze

__all__ = [
    "CondProjection",
    "ActNorm",
    "ActNorm2d",
    "AdditiveCoupling",
    "AffineCoupling",
    "CondAffineCoupling",
    "Conv2dActNorm",
    "Conv2dZeros",
    "Coupling",
    "FlowLevel",
    "FlowSequence",
    "FlowStep",
    "GaussianPrior",
    "InvConv1x1",
    "InvertibleModule",
    "LevelGuard",
    "MultiScaleFlow",
    "Split2d",
    "Squeeze",
    "StepGrads",
    "Subnet",
    "initialize_actnorms",
    "invertible_backprop",
    "make_subnet",
    "validate_keep_every",
    "validate_scale_floor",
]
