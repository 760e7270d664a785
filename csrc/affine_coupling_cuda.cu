// CUDA entry points of flowkernels::affine_coupling_{fwd,inv,bwd}: the prologue shared with the CPU
// entry points (coupling_host.h: input checks, views, poisoned outputs), CUDAGuard, the current
// stream, the choice of kernel variant (kernels/coupling_layout.cuh and pick_coupling_kernel below)
// and C10_CUDA_KERNEL_LAUNCH_CHECK after every launch. The kernels and their launch configuration
// are described in kernels/affine_coupling_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "coupling_cuda_host.h"
#include "kernels/affine_coupling_kernels.cuh"

namespace flowkernels {
namespace {

using kernels::coupling_grid;
using kernels::coupling_layout;
using kernels::CouplingLayout;
using kernels::kCouplingThreads;
using kernels::kFinalizeThreads;

// Runtime (layout, shift_first, direction) -> the kernel that `pick` returns for that variant
// (kernels::CouplingVariant) and kShiftFirst.
template <typename Pick>
auto pick_affine_kernel(CouplingLayout layout, bool shift_first, bool direction, Pick&& pick) {
  return FK_BOOL_SWITCH(shift_first, kShiftFirst, [&] {
    return kernels::pick_coupling_variant(layout, direction, [&](auto variant) {
      return pick(std::bool_constant<kShiftFirst>{}, variant);
    });
  });
}

// affine_coupling_fwd (kInverse false, in = x) and affine_coupling_inv (kInverse true, in = y).
template <bool kInverse>
at::Tensor affine_coupling_apply_cuda(const at::Tensor& in, const at::Tensor& h, at::Tensor& logdet, int64_t passive,
                                      bool shift_first, double eps) {
  return dispatch_h<__nv_bfloat16>(h, [&](auto h_tag) {
    using HT = decltype(h_tag);
    const char* name = kInverse ? "y" : "x";
    const CouplingApplyIO<HT> io =
        coupling_apply_prologue<HT>(CouplingKind::kAffine, in, name, h, &logdet, passive, kCouplingCudaTarget);
    if (in.numel() == 0) {
      return io.out.tensor;
    }
    const c10::cuda::CUDAGuard guard(in.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const PixelGeometry& g = io.g;
    const CouplingLayout layout =
        coupling_layout({io.in, io.out.view}, {io.h}, g, static_cast<int>(sizeof(HT)), /*h_pairs=*/true);
    const dim3 grid = coupling_grid(layout, g);
    // One log-det partial per block (interleaved) or per block of an active channel (planar).
    const int64_t parts = layout == CouplingLayout::kInterleaved ? grid.x : (g.channels - passive) * grid.x;
    at::Tensor partials = at::empty({g.batch, parts}, in.options().dtype(at::kFloat));
    const kernels::CouplingApplyParams<HT> prm{.in = io.in,
                                               .h = io.h,
                                               .out = io.out.view,
                                               .partials = partials.data_ptr<float>(),
                                               .pixels = g.pixels,
                                               .channels = static_cast<int>(g.channels),
                                               .passive = static_cast<int>(passive),
                                               .eps = static_cast<float>(eps)};
    // The ternary instantiates both kernels for every variant: instantiations that the other
    // variants need anyway, so the set of compiled kernels is unchanged.
    const auto kernel = pick_affine_kernel(layout, shift_first, kInverse, [](auto shift, auto variant) {
      using V = decltype(variant);
      constexpr bool kShiftFirst = decltype(shift)::value;
      return V::kInterleaved ? &kernels::coupling_apply_interleaved_kernel<HT, kShiftFirst, V::kDirection>
                             : &kernels::coupling_apply_planar_kernel<HT, kShiftFirst, V::kDirection, V::kPlanarVec>;
    });
    kernel<<<grid, kCouplingThreads, 0, stream>>>(prm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    kernels::logdet_finalize_kernel<<<static_cast<unsigned>(g.batch), kFinalizeThreads, 0, stream>>>(
        partials.data_ptr<float>(), parts, kInverse ? -1.0f : 1.0f, logdet.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return io.out.tensor;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_bwd_cuda(const at::Tensor& out, const at::Tensor& h,
                                                                        const at::Tensor& grad_out,
                                                                        const at::Tensor& grad_logdet, int64_t passive,
                                                                        bool shift_first, double eps, bool reverse) {
  return dispatch_h<__nv_bfloat16>(h, [&](auto h_tag) {
    using HT = decltype(h_tag);
    const CouplingBwdIO<HT> io = coupling_bwd_prologue<HT>(CouplingKind::kAffine, out, h, grad_out, &grad_logdet,
                                                           passive, kCouplingCudaTarget);
    if (out.numel() == 0) {
      return io.results();
    }
    const c10::cuda::CUDAGuard guard(out.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const PixelGeometry& g = io.g;
    const CouplingLayout layout =
        coupling_layout({io.out, io.grad_out, io.inp.view, io.grad_inp.view}, {io.h, io.grad_h.view}, g,
                        static_cast<int>(sizeof(HT)), /*h_pairs=*/true);
    const dim3 grid = coupling_grid(layout, g);
    const kernels::CouplingBwdParams<HT> prm{.out = io.out,
                                             .h = io.h,
                                             .grad_out = io.grad_out,
                                             .grad_logdet = grad_logdet.data_ptr<float>(),
                                             .gl_stride = grad_logdet.stride(0),
                                             .inp = io.inp.view,
                                             .grad_inp = io.grad_inp.view,
                                             .grad_h = io.grad_h.view,
                                             .pixels = g.pixels,
                                             .channels = static_cast<int>(g.channels),
                                             .passive = static_cast<int>(passive),
                                             .eps = static_cast<float>(eps)};
    // The ternary instantiates both kernels for every variant: instantiations that the other
    // variants need anyway, so the set of compiled kernels is unchanged.
    const auto kernel = pick_affine_kernel(layout, shift_first, reverse, [](auto shift, auto variant) {
      using V = decltype(variant);
      constexpr bool kShiftFirst = decltype(shift)::value;
      return V::kInterleaved ? &kernels::coupling_bwd_interleaved_kernel<HT, kShiftFirst, V::kDirection>
                             : &kernels::coupling_bwd_planar_kernel<HT, kShiftFirst, V::kDirection, V::kPlanarVec>;
    });
    kernel<<<grid, kCouplingThreads, 0, stream>>>(prm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return io.results();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkernels, CUDA, m) {
  m.impl("affine_coupling_fwd", &affine_coupling_apply_cuda</*kInverse=*/false>);
  m.impl("affine_coupling_inv", &affine_coupling_apply_cuda</*kInverse=*/true>);
  m.impl("affine_coupling_bwd", &affine_coupling_bwd_cuda);
}

}  // namespace flowkernels
