"""The only place test tolerances live (DESIGN.md section 7). Relative errors are
max|actual - expected| / max|expected|.

Rule for every bound: place it between the measured noise (float32 rounding, over several seeds)
and the smallest real failure it exists to catch, near their geometric middle, and record both
numbers next to it. A bound at the noise fails spuriously on the next harmless numerical change;
a bound at the failure lets a regression through.
"""

from __future__ import annotations

import torch
from torch import Tensor

REL_TOL = {
    "forward": 1e-5,  # fp32 kernels vs the reference
    "inverse": 1e-5,
    "grad": 1e-5,  # one op's gradients vs the reference
    "grad_level": 1e-4,  # memory-saving vs stored-activation autograd through a full level
    "logdet_jacobian": 1e-5,  # log-det vs brute-force float64 Jacobian
}
ROUND_TRIP_ABS = {
    "module": 1e-5,  # x -> z -> x of one layer, unit-scale inputs
    # 54 SRFlow-depth steps (and the 12-step tiny SRFlows) with trained-like weights, max |x - x'|
    # of unit-scale inputs. Noise, worst of 5 seeds on the reference and C++ backends: 1.2e-5
    # (tests/test_memory_saving.py), 1.3e-5 (tiny 8x), 4.0e-5 (the 54-step 4x flow on a 48x48
    # crop). Smallest failures: one 1x1 weight off by 1e-4 between encode and decode (a stale
    # cached inverse after one optimiser step) 8.4e-4 (2.7e-3 at 54 steps); the coupling inverse
    # without its eps 1.4e-3 (2.3e-2 at 54 steps). An offset of 1e-5 (8.4e-5) is below it.
    "sequence_54": 2e-4,
}
# Our SRFlow against the official code's own outputs (tests/test_srflow_official.py), relative
# max-abs over max-abs. Measured worst over both fixtures, the reference and C++ backends, memory
# saving on and off: NLL 1.2e-6, latents/decode/samples 1.5e-6, gradients 3.6e-6 (float32
# rounding of two implementations). A misread official detail shows far above: the RRDB taps
# before their in-place LeakyReLU gave 0.12 (NLL), 0.30 (decode) and 1.3 (gradients).
OFFICIAL_REL_TOL = {"nll": 1e-5, "image": 1e-4, "grad": 1e-4}
# An fp32 path against float64 stored-activation autograd (tests/oracle.py): its worst relative
# error over all outputs and gradients may be FP32_PATH_RATIO times that of fp32 stored-activation
# autograd on the same input (floored at FP32_NOISE_FLOOR, a handful of fp32 roundings).
# Measured, 8-step trained-like levels, 24 kink-free seeds, both directions, AVX2 and baseline
# code: plain fp32 reaches 6.9e-7 to 1.8e-6; memory saving (reference, C++ per-step, batched)
# 6.2e-7 to 1.7e-6, at most 2.0x plain. Failures: one ReLU kink crossed, 3.7e-3 (3,400x); a
# misplaced eps or a stale inverse, 1e-4 and up (100x and up).
FP32_PATH_RATIO = 10.0
FP32_NOISE_FLOOR = 1e-6
# Kink-free inputs: every ReLU input of the float64 run at least KINK_MARGIN x its call's largest
# away from 0, 8x the measured deviation of the ReLU inputs of every fp32 path (forward and the
# memory-saving recompute) from float64, relative to the call's largest: at most 6.1e-7 at 8
# steps (6 seeds x 4 paths). About half of the 8-step draws pass. At 54 steps the deviation is
# 2.6e-6 and no input is that far from every kink: those tests smooth the ReLUs (tests/oracle.py).
KINK_MARGIN = 5e-6
# SRFlow's evaluation against the official test.py / Measure.py on the official imresize's own
# outputs (tests/test_srflow_official_eval.py): PSNR, SSIM and LR-PSNR absolute, in dB (SSIM: units).
# Measured 0.0 on all four fixture cases (the same uint8 arithmetic). The failure it catches: an
# LR made by rounding once after both imresize passes (the float path) moves LR-PSNR by 0.014 to
# 0.14 dB on these cases (8-11% of the LR values off by 1-2 levels).
OFFICIAL_METRIC_ATOL = 1e-6
BF16_ERROR_RATIO = 2.0  # a bf16 kernel may err at most 2x eager bf16, both measured against fp32


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max|a - e| / max|e|, NaN-aware: any NaN in ``actual`` gives inf."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(actual).all()):
        return float("inf")
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_rel_close(actual: Tensor, expected: Tensor, what: str, tol: float | None = None) -> None:
    """Assert the relative error is within ``REL_TOL[what]`` and report where it is worst."""
    tol = REL_TOL[what] if tol is None else tol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    if err <= tol:
        return
    diff = (actual.detach().double() - expected.detach().double()).abs()
    n_nan = int(torch.isnan(actual).sum())
    worst = tuple(int(i) for i in torch.unravel_index(torch.nan_to_num(diff, nan=float("inf")).argmax(), diff.shape))
    raise AssertionError(
        f"{what}: relative error {err:.3e} exceeds {tol:.0e}; {n_nan} NaN, worst at {worst}: "
        f"actual {actual[worst].item():.6g} vs expected {expected[worst].item():.6g}"
    )
