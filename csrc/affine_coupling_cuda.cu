// CUDA entry points of flowkernels::affine_coupling_{fwd,inv,bwd}: the prologue shared with the CPU
// entry points (affine_coupling_host.h: input checks, views, poisoned outputs), CUDAGuard, the
// current stream, the choice of kernel variant (coupling_layout and pick_coupling_kernel below) and
// C10_CUDA_KERNEL_LAUNCH_CHECK after every launch. The kernels and their launch configuration are
// described in kernels/affine_coupling_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <limits>
#include <tuple>

#include "affine_coupling_host.h"
#include "kernels/affine_coupling_kernels.cuh"

namespace flowkernels {
namespace {

using kernels::ceil_div;
using kernels::kCouplingThreads;
using kernels::kFinalizeThreads;

// Grid dimensions y and z hold channels and samples; x covers a sample's pixels (planar) or its
// C x P elements, 4 per thread (interleaved).
constexpr KernelTarget kCudaTarget{
    c10::DeviceType::CUDA,
    GridLimits{.samples = 65535,
               .channels = 65535,
               .elements = std::numeric_limits<int32_t>::max() * int64_t(kCouplingThreads)}};

// Thread mappings of the coupling kernels, fastest first.
enum class CouplingLayout { kInterleaved, kPlanarVec, kPlanar };

// The fastest mapping that every tensor of the call allows: `state` the float32 flow tensors (the
// input, the output and their gradients), `subnet` h and grad_h, of h_bytes per element.
CouplingLayout coupling_layout(std::initializer_list<FlowAddress> state, std::initializer_list<FlowAddress> subnet,
                               const PixelGeometry& g, int h_bytes) {
  bool interleaved = g.channels > 1;
  bool planar_vec = true;
  for (const FlowAddress& t : state) {
    interleaved = interleaved && kernels::interleaved_vec_ok(t, g);
    planar_vec = planar_vec && kernels::planar_vec_ok(t, g, 4);
  }
  for (const FlowAddress& t : subnet) {
    interleaved = interleaved && kernels::pair_ok(t, g, h_bytes);
    planar_vec = planar_vec && kernels::planar_vec_ok(t, g, h_bytes);
  }
  if (interleaved) {
    return CouplingLayout::kInterleaved;
  }
  return planar_vec ? CouplingLayout::kPlanarVec : CouplingLayout::kPlanar;
}

dim3 coupling_grid(CouplingLayout layout, const PixelGeometry& g) {
  if (layout == CouplingLayout::kInterleaved) {
    return dim3(ceil_div(g.pixels * g.channels, kCouplingThreads * 4), g.batch);
  }
  return dim3(ceil_div(g.pixels, kCouplingThreads * (layout == CouplingLayout::kPlanarVec ? 4 : 1)), g.channels,
              g.batch);
}

// One instantiation of a coupling kernel family: thread mapping and compile-time flags.
// kDirection is kInverse for affine_coupling_{fwd,inv} and kReverse for affine_coupling_bwd.
template <CouplingLayout kLayoutV, bool kShiftFirstV, bool kDirectionV>
struct CouplingVariant {
  static constexpr bool kShiftFirst = kShiftFirstV;
  static constexpr bool kDirection = kDirectionV;
  static constexpr bool kInterleaved = kLayoutV == CouplingLayout::kInterleaved;
  static constexpr bool kPlanarVec = kLayoutV == CouplingLayout::kPlanarVec;
};

// Runtime (layout, shift_first, direction) -> the kernel that `pick` returns for that
// CouplingVariant: the launcher picks the instantiation once (STYLE.md 13).
template <typename Pick>
auto pick_coupling_kernel(CouplingLayout layout, bool shift_first, bool direction, Pick&& pick) {
  return FK_BOOL_SWITCH(shift_first, kShiftFirst, [&] {
    return FK_BOOL_SWITCH(direction, kDirection, [&] {
      if (layout == CouplingLayout::kInterleaved) {
        return pick(CouplingVariant<CouplingLayout::kInterleaved, kShiftFirst, kDirection>{});
      }
      if (layout == CouplingLayout::kPlanarVec) {
        return pick(CouplingVariant<CouplingLayout::kPlanarVec, kShiftFirst, kDirection>{});
      }
      return pick(CouplingVariant<CouplingLayout::kPlanar, kShiftFirst, kDirection>{});
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
    const CouplingApplyIO<HT> io = coupling_apply_prologue<HT>(in, name, h, logdet, passive, kCudaTarget);
    if (in.numel() == 0) {
      return io.out.tensor;
    }
    const c10::cuda::CUDAGuard guard(in.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const PixelGeometry& g = io.g;
    const CouplingLayout layout = coupling_layout({io.in, io.out.view}, {io.h}, g, static_cast<int>(sizeof(HT)));
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
    const auto kernel = pick_coupling_kernel(layout, shift_first, kInverse, [](auto variant) {
      using V = decltype(variant);
      return V::kInterleaved ? &kernels::coupling_apply_interleaved_kernel<HT, V::kShiftFirst, V::kDirection>
                             : &kernels::coupling_apply_planar_kernel<HT, V::kShiftFirst, V::kDirection, V::kPlanarVec>;
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
    const CouplingBwdIO<HT> io = coupling_bwd_prologue<HT>(out, h, grad_out, grad_logdet, passive, kCudaTarget);
    if (out.numel() == 0) {
      return io.results();
    }
    const c10::cuda::CUDAGuard guard(out.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const PixelGeometry& g = io.g;
    const CouplingLayout layout = coupling_layout({io.out, io.grad_out, io.inp.view, io.grad_inp.view},
                                                  {io.h, io.grad_h.view}, g, static_cast<int>(sizeof(HT)));
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
    const auto kernel = pick_coupling_kernel(layout, shift_first, reverse, [](auto variant) {
      using V = decltype(variant);
      return V::kInterleaved ? &kernels::coupling_bwd_interleaved_kernel<HT, V::kShiftFirst, V::kDirection>
                             : &kernels::coupling_bwd_planar_kernel<HT, V::kShiftFirst, V::kDirection, V::kPlanarVec>;
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
