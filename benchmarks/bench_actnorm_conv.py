"""Benchmark the fused ActNorm + 1x1 conv op against eager and compiled PyTorch.

Providers: ``eager`` (flowkernels.reference, autograd for the backward), ``compile``
(torch.compile of the same), ``triton``, ``cuda`` (the compiled extension). Modes: ``fwd``,
``inv``, ``bwd`` (backward with recompute from the output for the kernels; autograd backward of
a stored graph for eager) and ``full`` (forward + backward). GB/s counts each tensor read or
written once (x, y, and for bwd out, grad_out, inp, grad_inp).

    python -m benchmarks.bench_actnorm_conv [--device cuda] [--smoke] [--out DIR]
"""

from __future__ import annotations

import torch

from benchmarks.common import Unsupported, kernel_case, op_main, reference_case
from flowkernels import dispatch, ops, reference

SRFLOW_SHAPES = [(16, 12, 80, 80), (16, 24, 40, 40), (16, 96, 20, 20)]  # 4x levels 1-3 at 160x160 HR
SMOKE_SHAPES = [(2, 12, 8, 8)]


def _params(c: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    w = (q + 0.05 * torch.randn(c, c, dtype=torch.float64)).float().to(device)
    return w, (0.2 * torch.randn(c)).to(device), (0.3 * torch.randn(c)).to(device)


def factory(case: dict, provider: str, mode: str, device: torch.device):
    b, c, h, w_ = case["batch"], case["channels"], case["height"], case["width"]
    fmt = torch.channels_last if case["layout"] == "channels_last" else torch.contiguous_format
    x = torch.randn(b, c, h, w_, device=device).contiguous(memory_format=fmt)
    weight, logs, bias = _params(c, device)
    g_out, g_ld = torch.randn_like(x), torch.randn(b, device=device)
    tensor_bytes = x.numel() * 4
    nbytes = {"fwd": 2, "inv": 2, "bwd": 4, "full": 6}[mode] * tensor_bytes
    if provider in ("eager", "compile"):
        fwd, inv = reference.actnorm_conv_fwd, reference.actnorm_conv_inv
        return reference_case(fwd, inv, provider, mode, [x, weight, logs, bias], (), (g_out, g_ld)), nbytes
    why = dispatch.refusals(provider, x)
    if why:
        raise Unsupported("; ".join(why))
    w64 = weight.double()
    stats = {"weight_inv": torch.linalg.inv(w64), "logabsdet": torch.linalg.slogdet(w64)[1]}
    logdet = torch.zeros(b, device=device)
    op = ops.actnorm_conv_inv if mode == "inv" else ops.actnorm_conv_fwd
    with torch.no_grad():
        y, _ = ops.actnorm_conv_fwd(x, weight, logs, bias, logdet, backend=provider, **stats)

    def bwd() -> object:
        return ops.actnorm_conv_bwd(
            y, g_out, g_ld, weight, logs, bias, weight_inv=stats["weight_inv"], backend=provider
        )

    return kernel_case(mode, lambda: op(x, weight, logs, bias, logdet, backend=provider, **stats), bwd), nbytes


def cases(smoke: bool, levels: list[int]) -> list[dict]:
    shapes = SMOKE_SHAPES if smoke else [SRFLOW_SHAPES[level - 1] for level in levels]
    return [
        {"batch": b, "channels": c, "height": h, "width": w, "layout": layout}
        for b, c, h, w in shapes
        for layout in ("nchw", "channels_last")
    ]


def main() -> None:
    op_main("actnorm_conv", __doc__, cases, factory)


if __name__ == "__main__":
    main()
