// CUDA entry points of flowkernels::affine_coupling_{fwd,inv,bwd}: input checks, CUDAGuard, the
// current stream, output allocation (empty_like keeps the memory format), the choice of kernel
// variant (switches below) and C10_CUDA_KERNEL_LAUNCH_CHECK after every launch. The kernels and
// their launch configuration are described in kernels/affine_coupling_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "flow_checks.h"
#include "kernels/affine_coupling_kernels.cuh"

namespace flowkernels {
namespace {

using kernels::ceil_div;
using kernels::kCouplingThreads;
using kernels::kFinalizeThreads;

// Grid dimensions y and z hold channels and samples.
void check_grid(const PixelGeometry& g, const char* name) {
  TORCH_CHECK(g.batch <= 65535, name, ": the CUDA kernels take at most 65535 samples, got ", g.batch);
  TORCH_CHECK(g.channels <= 65535, name, ": the CUDA kernels take at most 65535 channels, got ", g.channels);
  TORCH_CHECK(g.pixels * g.channels <= std::numeric_limits<int32_t>::max() * int64_t(kCouplingThreads),
              name, ": a sample of ", g.channels, " x ", g.pixels, " elements is too large for one grid");
}

template <typename F>
void dispatch_h(const at::Tensor& h, F&& f) {
  if (h.scalar_type() == at::kBFloat16) {
    f(__nv_bfloat16{});
  } else {
    f(float{});
  }
}

template <typename HT>
const HT* h_data(const at::Tensor& h) {
  return reinterpret_cast<const HT*>(h.data_ptr());
}

at::Tensor coupling_apply_cuda(const at::Tensor& in, const at::Tensor& h, at::Tensor& logdet, int64_t passive,
                               bool shift_first, double eps, bool inverse) {
  const char* name = inverse ? "y" : "x";
  check_coupling_inputs(in, name, h, passive);
  check_device_type(in, name, c10::DeviceType::CUDA);
  check_logdet(logdet, in, name);
  const PixelStrides in_s = pixel_strides(in, name);
  const PixelStrides h_s = pixel_strides(h, "h");
  const PixelGeometry g = geometry(in);
  check_grid(g, name);

  const c10::cuda::CUDAGuard guard(in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty_like(in);
  maybe_poison(out);
  if (in.numel() == 0) {
    return out;
  }
  const PixelStrides out_s = pixel_strides(out, "output");
  const int64_t h_bytes = h.element_size();

  const bool interleaved = g.channels > 1 && kernels::interleaved_vec_ok(in.data_ptr(), in_s, g) &&
                           kernels::interleaved_vec_ok(out.data_ptr(), out_s, g) &&
                           kernels::pair_ok(h.data_ptr(), h_s, g, h_bytes);
  const bool vec = kernels::planar_vec_ok(in.data_ptr(), in_s, g, 4) &&
                   kernels::planar_vec_ok(out.data_ptr(), out_s, g, 4) &&
                   kernels::planar_vec_ok(h.data_ptr(), h_s, g, h_bytes);
  const int64_t active = g.channels - passive;
  dim3 grid;
  int64_t parts;
  if (interleaved) {
    grid = dim3(ceil_div(g.pixels * g.channels, kCouplingThreads * 4), g.batch);
    parts = grid.x;
  } else {
    grid = dim3(ceil_div(g.pixels, kCouplingThreads * (vec ? 4 : 1)), g.channels, g.batch);
    parts = active * grid.x;
  }
  at::Tensor partials = at::empty({g.batch, parts}, in.options().dtype(at::kFloat));

  dispatch_h(h, [&](auto h_tag) {
    using HT = decltype(h_tag);
    kernels::CouplingApplyParams<HT> prm{in.data_ptr<float>(),
                                         in_s,
                                         h_data<HT>(h),
                                         h_s,
                                         out.data_ptr<float>(),
                                         out_s,
                                         partials.data_ptr<float>(),
                                         g.pixels,
                                         static_cast<int>(g.channels),
                                         static_cast<int>(passive),
                                         static_cast<float>(eps)};
    FK_BOOL_SWITCH(shift_first, kShiftFirst, [&] {
      FK_BOOL_SWITCH(inverse, kInverse, [&] {
        if (interleaved) {
          kernels::coupling_apply_interleaved_kernel<HT, kShiftFirst, kInverse>
              <<<grid, kCouplingThreads, 0, stream>>>(prm);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          FK_BOOL_SWITCH(vec, kVec, [&] {
            kernels::coupling_apply_planar_kernel<HT, kShiftFirst, kInverse, kVec>
                <<<grid, kCouplingThreads, 0, stream>>>(prm);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      });
    });
  });
  kernels::logdet_finalize_kernel<<<static_cast<unsigned>(g.batch), kFinalizeThreads, 0, stream>>>(
      partials.data_ptr<float>(), parts, inverse ? -1.0f : 1.0f, logdet.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor affine_coupling_fwd_cuda(const at::Tensor& x, const at::Tensor& h, at::Tensor& logdet, int64_t passive,
                                    bool shift_first, double eps) {
  return coupling_apply_cuda(x, h, logdet, passive, shift_first, eps, /*inverse=*/false);
}

at::Tensor affine_coupling_inv_cuda(const at::Tensor& y, const at::Tensor& h, at::Tensor& logdet, int64_t passive,
                                    bool shift_first, double eps) {
  return coupling_apply_cuda(y, h, logdet, passive, shift_first, eps, /*inverse=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_bwd_cuda(const at::Tensor& out, const at::Tensor& h,
                                                                        const at::Tensor& grad_out,
                                                                        const at::Tensor& grad_logdet, int64_t passive,
                                                                        bool shift_first, double eps, bool reverse) {
  check_coupling_bwd_inputs(out, h, grad_out, grad_logdet, passive);
  check_device_type(out, "out", c10::DeviceType::CUDA);
  const PixelStrides out_s = pixel_strides(out, "out");
  const PixelStrides h_s = pixel_strides(h, "h");
  const PixelStrides go_s = pixel_strides(grad_out, "grad_out");
  const PixelGeometry g = geometry(out);
  check_grid(g, "out");

  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor inp = at::empty_like(out);
  at::Tensor grad_inp = at::empty_like(out);
  at::Tensor grad_h = at::empty_like(h);
  maybe_poison(inp);
  maybe_poison(grad_inp);
  maybe_poison(grad_h);
  if (out.numel() == 0) {
    return {inp, grad_inp, grad_h};
  }
  const PixelStrides inp_s = pixel_strides(inp, "inp");
  const PixelStrides gi_s = pixel_strides(grad_inp, "grad_inp");
  const PixelStrides gh_s = pixel_strides(grad_h, "grad_h");
  const int64_t h_bytes = h.element_size();

  const bool interleaved =
      g.channels > 1 && kernels::interleaved_vec_ok(out.data_ptr(), out_s, g) &&
      kernels::interleaved_vec_ok(grad_out.data_ptr(), go_s, g) &&
      kernels::interleaved_vec_ok(inp.data_ptr(), inp_s, g) &&
      kernels::interleaved_vec_ok(grad_inp.data_ptr(), gi_s, g) && kernels::pair_ok(h.data_ptr(), h_s, g, h_bytes) &&
      kernels::pair_ok(grad_h.data_ptr(), gh_s, g, h_bytes);
  const bool vec = kernels::planar_vec_ok(out.data_ptr(), out_s, g, 4) &&
                   kernels::planar_vec_ok(grad_out.data_ptr(), go_s, g, 4) &&
                   kernels::planar_vec_ok(inp.data_ptr(), inp_s, g, 4) &&
                   kernels::planar_vec_ok(grad_inp.data_ptr(), gi_s, g, 4) &&
                   kernels::planar_vec_ok(h.data_ptr(), h_s, g, h_bytes) &&
                   kernels::planar_vec_ok(grad_h.data_ptr(), gh_s, g, h_bytes);
  const dim3 grid = interleaved
                        ? dim3(ceil_div(g.pixels * g.channels, kCouplingThreads * 4), g.batch)
                        : dim3(ceil_div(g.pixels, kCouplingThreads * (vec ? 4 : 1)), g.channels, g.batch);

  dispatch_h(h, [&](auto h_tag) {
    using HT = decltype(h_tag);
    kernels::CouplingBwdParams<HT> prm{out.data_ptr<float>(),
                                       out_s,
                                       h_data<HT>(h),
                                       h_s,
                                       grad_out.data_ptr<float>(),
                                       go_s,
                                       grad_logdet.data_ptr<float>(),
                                       grad_logdet.stride(0),
                                       inp.data_ptr<float>(),
                                       inp_s,
                                       grad_inp.data_ptr<float>(),
                                       gi_s,
                                       reinterpret_cast<HT*>(grad_h.data_ptr()),
                                       gh_s,
                                       g.pixels,
                                       static_cast<int>(g.channels),
                                       static_cast<int>(passive),
                                       static_cast<float>(eps)};
    FK_BOOL_SWITCH(shift_first, kShiftFirst, [&] {
      FK_BOOL_SWITCH(reverse, kReverse, [&] {
        if (interleaved) {
          kernels::coupling_bwd_interleaved_kernel<HT, kShiftFirst, kReverse>
              <<<grid, kCouplingThreads, 0, stream>>>(prm);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          FK_BOOL_SWITCH(vec, kVec, [&] {
            kernels::coupling_bwd_planar_kernel<HT, kShiftFirst, kReverse, kVec>
                <<<grid, kCouplingThreads, 0, stream>>>(prm);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      });
    });
  });
  return {inp, grad_inp, grad_h};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkernels, CUDA, m) {
  m.impl("affine_coupling_fwd", &affine_coupling_fwd_cuda);
  m.impl("affine_coupling_inv", &affine_coupling_inv_cuda);
  m.impl("affine_coupling_bwd", &affine_coupling_bwd_cuda);
}

}  // namespace flowkernels
