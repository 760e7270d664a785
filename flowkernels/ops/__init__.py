"""Fused flow ops, one file per op; each dispatches to the Triton, CUDA/C++ or reference backend.

Importing this package loads neither triton nor the compiled extension: each is imported on
first use of its backend.
"""

from .actnorm_conv import actnorm_conv_bwd, actnorm_conv_fwd, actnorm_conv_inv, fold
from .additive_coupling import additive_coupling_bwd, additive_coupling_fwd, additive_coupling_inv
from .affine_coupling import SRFLOW_EPS, affine_coupling_bwd, affine_coupling_fwd, affine_coupling_inv

__all__ = [
    "SRFLOW_EPS",
    "actnorm_conv_bwd",
    "actnorm_conv_fwd",
    "actnorm_conv_inv",
    "additive_coupling_bwd",
    "additive_coupling_fwd",
    "additive_coupling_inv",
    "affine_coupling_bwd",
    "affine_coupling_fwd",
    "affine_coupling_inv",
    "fold",
]
