"""flowkernels: fused Glow/SRFlow flow-step kernels with memory-saving invertible backprop.

Layers (``forward(x, cond=None, logdet=None) -> (y, logdet)``, ``inverse`` likewise):
ActNorm2d, InvConv1x1, AffineCoupling, AdditiveCoupling, CondAffineCoupling, FlowStep, Squeeze,
Split2d, FlowSequence; the multi-scale container MultiScaleFlow and Glow on it. Fused ops:
:mod:`flowkernels.ops`. Oracle: :mod:`flowkernels.reference`. Backends: :mod:`flowkernels.dispatch`.
"""

from . import cpu_isa, ops, reference
from .dispatch import (
    BACKENDS,
    BackendUnavailableError,
    check_backend_available,
    get_backend,
    select_backend,
    set_backend,
    use_backend,
    validate_backend,
)
from .glow import Glow
from .layers import (
    ActNorm,
    ActNorm2d,
    AdditiveCoupling,
    AffineCoupling,
    CondAffineCoupling,
    CondProjection,
    Conv2dActNorm,
    Conv2dZeros,
    Coupling,
    FlowLevel,
    FlowSequence,
    FlowStep,
    GaussianPrior,
    InvConv1x1,
    InvertibleModule,
    LevelGuard,
    MultiScaleFlow,
    Split2d,
    Squeeze,
    Subnet,
    initialize_actnorms,
    make_subnet,
    validate_keep_every,
    validate_scale_floor,
)
from .memory import saved_tensor_bytes

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ActNorm",
    "ActNorm2d",
    "AdditiveCoupling",
    "AffineCoupling",
    "BackendUnavailableError",
    "CondAffineCoupling",
    "CondProjection",
    "Conv2dActNorm",
    "Conv2dZeros",
    "Coupling",
    "FlowLevel",
    "FlowSequence",
    "FlowStep",
    "GaussianPrior",
    "Glow",
    "InvConv1x1",
    "InvertibleModule",
    "LevelGuard",
    "MultiScaleFlow",
    "Split2d",
    "Squeeze",
    "Subnet",
    "check_backend_available",
    "cpu_isa",
    "get_backend",
    "initialize_actnorms",
    "make_subnet",
    "ops",
    "reference",
    "saved_tensor_bytes",
    "select_backend",
    "set_backend",
    "use_backend",
    "validate_backend",
    "validate_keep_every",
    "validate_scale_floor",
]
