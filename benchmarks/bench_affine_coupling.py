"""Benchmark the fused affine coupling / injector op against eager and compiled PyTorch.

Providers and modes as in bench_actnorm_conv.py. Cases: SRFlow's level shapes, both memory
formats, the injector (passive 0, h has 2C channels) and the coupling (passive C/2, h has C
channels), and bf16 subnet outputs at level 1. GB/s counts each tensor read or written once:
fwd/inv read x and h and write y; bwd reads out, h, grad_out and writes inp, grad_inp, grad_h.

    python -m benchmarks.bench_affine_coupling [--device cuda] [--smoke] [--out DIR]
"""

from __future__ import annotations

import torch

from benchmarks.bench_actnorm_conv import SMOKE_SHAPES, SRFLOW_SHAPES
from benchmarks.common import Unsupported, kernel_case, op_main, reference_case
from flowkernels import dispatch, ops, reference


def factory(case: dict, provider: str, mode: str, device: torch.device):
    b, c, hh, ww = case["batch"], case["channels"], case["height"], case["width"]
    passive = 0 if case["stage"] == "injector" else c // 2
    fmt = torch.channels_last if case["layout"] == "channels_last" else torch.contiguous_format
    h_dtype = getattr(torch, case["h_dtype"])
    x = torch.randn(b, c, hh, ww, device=device).contiguous(memory_format=fmt)
    h = torch.randn(b, 2 * (c - passive), hh, ww, device=device).to(h_dtype).contiguous(memory_format=fmt)
    g_out, g_ld = torch.randn_like(x), torch.randn(b, device=device)
    xb, hb = x.numel() * 4, h.numel() * h.element_size()
    nbytes = {"fwd": 2 * xb + hb, "inv": 2 * xb + hb, "bwd": 4 * xb + 2 * hb, "full": 6 * xb + 3 * hb}[mode]
    if provider in ("eager", "compile"):
        fwd, inv = reference.affine_coupling_fwd, reference.affine_coupling_inv
        return reference_case(fwd, inv, provider, mode, [x, h], (passive,), (g_out, g_ld)), nbytes
    why = dispatch.refusals(provider, x, h)
    if why:
        raise Unsupported("; ".join(why))
    logdet = torch.zeros(b, device=device)
    op = ops.affine_coupling_inv if mode == "inv" else ops.affine_coupling_fwd
    with torch.no_grad():
        y, _ = ops.affine_coupling_fwd(x, h, logdet, passive=passive, backend=provider)

    def bwd() -> object:
        return ops.affine_coupling_bwd(y, h, g_out, g_ld, passive=passive, backend=provider)

    return kernel_case(mode, lambda: op(x, h, logdet, passive=passive, backend=provider), bwd), nbytes


def cases(smoke: bool, levels: list[int]) -> list[dict]:
    shapes = SMOKE_SHAPES if smoke else [SRFLOW_SHAPES[level - 1] for level in levels]
    out = []
    for i, (b, c, h, w) in enumerate(shapes):
        for layout in ("nchw", "channels_last"):
            for stage in ("injector", "coupling"):
                for h_dtype in ("float32", "bfloat16") if i == 0 else ("float32",):
                    out.append(
                        {
                            "batch": b,
                            "channels": c,
                            "height": h,
                            "width": w,
                            "layout": layout,
                            "stage": stage,
                            "h_dtype": h_dtype,
                        }
                    )
    return out


def main() -> None:
    op_main("affine_coupling", __doc__, cases, factory)


if __name__ == "__main__":
    main()
