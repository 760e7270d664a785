// CUDA entry points of flowkernels::additive_coupling_{fwd,inv,bwd}: the prologue shared with the
// CPU entry points (coupling_host.h), CUDAGuard, the current stream, the thread mapping
// (kernels/coupling_layout.cuh) and C10_CUDA_KERNEL_LAUNCH_CHECK after the launch. The kernels
// are described in kernels/additive_coupling_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "coupling_cuda_host.h"
#include "kernels/additive_coupling_kernels.cuh"

namespace flowkernels {
namespace {

using kernels::coupling_grid;
using kernels::coupling_layout;
using kernels::CouplingLayout;
using kernels::kCouplingThreads;

// additive_coupling_fwd (kInverse false, in = x) and additive_coupling_inv (kInverse true, in = y).
template <bool kInverse>
at::Tensor additive_coupling_apply_cuda(const at::Tensor& in, const at::Tensor& h, int64_t passive) {
  return dispatch_h<__nv_bfloat16>(h, [&](auto h_tag) {
    using HT = decltype(h_tag);
    const CouplingApplyIO<HT> io = coupling_apply_prologue<HT>(CouplingKind::kAdditive, in, kInverse ? "y" : "x", h,
                                                               /*logdet=*/nullptr, passive, kCouplingCudaTarget);
    if (in.numel() == 0) {
      return io.out.tensor;
    }
    const c10::cuda::CUDAGuard guard(in.device());
    const PixelGeometry& g = io.g;
    const CouplingLayout layout =
        coupling_layout({io.in, io.out.view}, {io.h}, g, static_cast<int>(sizeof(HT)), /*h_pairs=*/false);
    const kernels::AdditiveApplyParams<HT> prm{.in = io.in,
                                               .h = io.h,
                                               .out = io.out.view,
                                               .pixels = g.pixels,
                                               .channels = static_cast<int>(g.channels),
                                               .passive = static_cast<int>(passive)};
    // The ternary instantiates both kernels for every variant: instantiations that the other
    // variants need anyway, so the set of compiled kernels is unchanged.
    const auto kernel = kernels::pick_coupling_variant(layout, kInverse, [](auto variant) {
      using V = decltype(variant);
      return V::kInterleaved ? &kernels::additive_apply_interleaved_kernel<HT, V::kDirection>
                             : &kernels::additive_apply_planar_kernel<HT, V::kDirection, V::kPlanarVec>;
    });
    kernel<<<coupling_grid(layout, g), kCouplingThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(prm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return io.out.tensor;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> additive_coupling_bwd_cuda(const at::Tensor& out, const at::Tensor& h,
                                                                          const at::Tensor& grad_out, int64_t passive,
                                                                          bool reverse) {
  return dispatch_h<__nv_bfloat16>(h, [&](auto h_tag) {
    using HT = decltype(h_tag);
    const CouplingBwdIO<HT> io = coupling_bwd_prologue<HT>(CouplingKind::kAdditive, out, h, grad_out,
                                                           /*grad_logdet=*/nullptr, passive, kCouplingCudaTarget);
    if (out.numel() == 0) {
      return io.results();
    }
    const c10::cuda::CUDAGuard guard(out.device());
    const PixelGeometry& g = io.g;
    const CouplingLayout layout =
        coupling_layout({io.out, io.grad_out, io.inp.view, io.grad_inp.view}, {io.h, io.grad_h.view}, g,
                        static_cast<int>(sizeof(HT)), /*h_pairs=*/false);
    const kernels::AdditiveBwdParams<HT> prm{.out = io.out,
                                             .h = io.h,
                                             .grad_out = io.grad_out,
                                             .inp = io.inp.view,
                                             .grad_inp = io.grad_inp.view,
                                             .grad_h = io.grad_h.view,
                                             .pixels = g.pixels,
                                             .channels = static_cast<int>(g.channels),
                                             .passive = static_cast<int>(passive)};
    const auto kernel = kernels::pick_coupling_variant(layout, reverse, [](auto variant) {
      using V = decltype(variant);
      return V::kInterleaved ? &kernels::additive_bwd_interleaved_kernel<HT, V::kDirection>
                             : &kernels::additive_bwd_planar_kernel<HT, V::kDirection, V::kPlanarVec>;
    });
    kernel<<<coupling_grid(layout, g), kCouplingThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(prm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return io.results();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkernels, CUDA, m) {
  m.impl("additive_coupling_fwd", &additive_coupling_apply_cuda</*kInverse=*/false>);
  m.impl("additive_coupling_inv", &additive_coupling_apply_cuda</*kInverse=*/true>);
  m.impl("additive_coupling_bwd", &additive_coupling_bwd_cuda);
}

}  // namespace flowkernels
