// CUDA entry points of flowkernels::channel_affine_{fwd,bwd}: the prologue shared with the CPU entry
// points (channel_affine_host.h: input checks, views, poisoned outputs), CUDAGuard, the current
// stream, the choice of kernel variant (small_layout and the switches below) and
// C10_CUDA_KERNEL_LAUNCH_CHECK after every launch. The kernels and their launch configuration are
// described in kernels/channel_affine_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "channel_affine_host.h"
#include "kernels/channel_affine_kernels.cuh"

namespace flowkernels {
namespace {

using kernels::ceil_div;
using kernels::MatrixView;

// Grid dimension y (small C) or z (GEMM) holds the samples, x the pixels in blocks.
constexpr KernelTarget kCudaTarget{
    c10::DeviceType::CUDA, GridLimits{.samples = 65535, .pixels = std::numeric_limits<int32_t>::max()}};

MatrixView matrix_view(const at::Tensor& m, bool transpose = false) {
  return transpose ? MatrixView{m.data_ptr<float>(), m.stride(1), m.stride(0)}
                   : MatrixView{m.data_ptr<float>(), m.stride(0), m.stride(1)};
}

// Runtime C -> the smallest kCMax (a multiple of 4) that holds it, as a compile-time constant.
template <typename F>
void cmax_switch(int64_t channels, F&& f) {
  switch (kernels::small_cmax(channels)) {
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 12:
      return f(std::integral_constant<int, 12>{});
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 24:
      return f(std::integral_constant<int, 24>{});
    default:
      return f(std::integral_constant<int, 32>{});
  }
}

// The fastest small-C layout that every tensor of the call allows.
int small_layout(std::initializer_list<FlowAddress> tensors, const PixelGeometry& g) {
  for (int layout : {kernels::kPlanarVec, kernels::kChannelVec}) {
    bool ok = true;
    for (const FlowAddress& t : tensors) {
      ok = ok && kernels::map_layout_ok(layout, t, g);
    }
    if (ok) {
      return layout;
    }
  }
  return kernels::kGeneric;
}

template <typename F>
void layout_switch(int layout, F&& f) {
  switch (layout) {
    case kernels::kPlanarVec:
      return f(std::integral_constant<int, kernels::kPlanarVec>{});
    case kernels::kChannelVec:
      return f(std::integral_constant<int, kernels::kChannelVec>{});
    default:
      return f(std::integral_constant<int, kernels::kGeneric>{});
  }
}

// out = matrix @ in + offset on the current stream (the small-C kernel or the tiled GEMM).
void launch_channel_affine(const kernels::ChannelAffineParams& prm, const PixelGeometry& g, int layout,
                           cudaStream_t stream) {
  if (g.channels > kernels::kMaxSmallChannels) {
    const dim3 grid(ceil_div(g.pixels, kernels::kTileN), ceil_div(g.channels, kernels::kTileM), g.batch);
    FK_BOOL_SWITCH(prm.in.s.c == 1, kChannelsFast, [&] {
      kernels::channel_affine_gemm_kernel<kChannelsFast><<<grid, kernels::kGemmThreads, 0, stream>>>(prm);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  cmax_switch(g.channels, [&](auto cmax) {
    constexpr int kCMax = decltype(cmax)::value;
    layout_switch(layout, [&](auto layout_tag) {
      constexpr int kLayout = decltype(layout_tag)::value;
      if constexpr (kLayout != kernels::kPlanarVec || kCMax <= 16) {
        constexpr int kPix = kernels::kMapThreads * kernels::SmallMapConfig<kLayout>::kVec;
        const dim3 grid(ceil_div(g.pixels, kPix), g.batch);
        kernels::channel_affine_small_kernel<kCMax, kLayout><<<grid, kernels::kMapThreads, 0, stream>>>(prm);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        TORCH_CHECK(false, "internal: the planar float4 layout takes at most 16 channels, got ", g.channels);
      }
    });
  });
}

at::Tensor channel_affine_fwd_cuda(const at::Tensor& x, const at::Tensor& matrix, const at::Tensor& offset,
                                 const at::Tensor& logdet_term, at::Tensor& logdet) {
  const ChannelAffineIO io = channel_affine_prologue(x, matrix, offset, logdet_term, logdet, kCudaTarget);
  const PixelGeometry& g = io.g;
  if (g.batch == 0) {
    return io.y.tensor;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kernels::ChannelAffineParams prm{.in = io.x,
                                   .out = io.y.view,
                                   .matrix = matrix_view(matrix),
                                   .offset = offset.data_ptr<float>(),
                                   .offset_stride = offset.stride(0),
                                   .logdet_term = logdet_term.data_ptr<float>(),
                                   .logdet = logdet.data_ptr<float>(),
                                   .pixels = g.pixels,
                                   .channels = static_cast<int>(g.channels)};
  if (g.pixels == 0) {
    // No pixels: only the log-det term. One block per sample adds it; the map writes nothing.
    const PixelGeometry one{g.batch, g.channels, 1};
    prm.pixels = 0;
    launch_channel_affine(prm, one, kernels::kGeneric, stream);
    return io.y.tensor;
  }
  launch_channel_affine(prm, g, small_layout({io.x, io.y.view}, g), stream);
  return io.y.tensor;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_affine_bwd_cuda(const at::Tensor& out,
                                                                                 const at::Tensor& grad_out,
                                                                                 const at::Tensor& matrix,
                                                                                 const at::Tensor& matrix_inv,
                                                                                 const at::Tensor& inv_offset) {
  const ChannelAffineBwdIO io = channel_affine_bwd_prologue(out, grad_out, matrix, matrix_inv, inv_offset, kCudaTarget);
  const PixelGeometry& g = io.g;
  const int64_t c = g.channels;
  if (out.numel() == 0) {
    io.grad_matrix.zero_();
    io.grad_offset.zero_();
    return io.results();
  }
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = out.options().dtype(at::kFloat);
  const int64_t entries = c * (c + 1);
  at::Tensor partials;

  if (c <= kernels::kMaxSmallChannels) {
    const int layout = small_layout({io.out, io.grad_out, io.inp.view, io.grad_inp.view}, g);
    kernels::ChannelAffineBwdParams prm{.out = io.out,
                                        .grad_out = io.grad_out,
                                        .inp = io.inp.view,
                                        .grad_inp = io.grad_inp.view,
                                        .matrix_inv = matrix_view(matrix_inv),
                                        .inv_offset = inv_offset.data_ptr<float>(),
                                        .inv_offset_stride = inv_offset.stride(0),
                                        .matrix = matrix_view(matrix),
                                        .partials = nullptr,  // sized by the grid below
                                        .pixels = g.pixels,
                                        .channels = static_cast<int>(c)};
    cmax_switch(c, [&](auto cmax) {
      constexpr int kCMax = decltype(cmax)::value;
      layout_switch(layout, [&](auto layout_tag) {
        constexpr int kLayout = decltype(layout_tag)::value;
        if constexpr (kLayout != kernels::kPlanarVec || kCMax <= 16) {
          using Cfg = kernels::SmallMapConfig<kLayout>;
          const dim3 grid(ceil_div(g.pixels, Cfg::kBwdPixels), g.batch);
          partials = at::empty({static_cast<int64_t>(grid.x) * grid.y, entries}, f32);
          prm.partials = partials.data_ptr<float>();
          kernels::channel_affine_bwd_small_kernel<kCMax, kLayout><<<grid, Cfg::kBwdThreads, 0, stream>>>(prm);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          TORCH_CHECK(false, "internal: the planar float4 layout takes at most 16 channels, got ", c);
        }
      });
    });
  } else {
    // inp = matrix_inv @ out + inv_offset; grad_inp = matrix^T @ grad_out (transpose by strides).
    const kernels::ChannelAffineParams to_inp{.in = io.out,
                                              .out = io.inp.view,
                                              .matrix = matrix_view(matrix_inv),
                                              .offset = inv_offset.data_ptr<float>(),
                                              .offset_stride = inv_offset.stride(0),
                                              .logdet_term = nullptr,
                                              .logdet = nullptr,
                                              .pixels = g.pixels,
                                              .channels = static_cast<int>(c)};
    launch_channel_affine(to_inp, g, kernels::kGeneric, stream);
    const kernels::ChannelAffineParams to_grad{.in = io.grad_out,
                                               .out = io.grad_inp.view,
                                               .matrix = matrix_view(matrix, /*transpose=*/true),
                                               .offset = nullptr,
                                               .offset_stride = 0,
                                               .logdet_term = nullptr,
                                               .logdet = nullptr,
                                               .pixels = g.pixels,
                                               .channels = static_cast<int>(c)};
    launch_channel_affine(to_grad, g, kernels::kGeneric, stream);

    // Pixel chunks: about 512 blocks in all (~4 per SM), at least 256 pixels per chunk. The
    // split depends on the shape only, so the sums are the same on every run and card.
    const int64_t total = g.batch * g.pixels;
    const int64_t tiles = ceil_div(c, kernels::kTileM) * ceil_div(c + 1, kernels::kTileN);
    const int64_t target_chunks = std::max<int64_t>(1, 512 / tiles);
    const int64_t chunk =
        std::max<int64_t>(256, ceil_div(ceil_div(total, target_chunks), kernels::kTileK) * kernels::kTileK);
    const int64_t chunks = ceil_div(total, chunk);
    TORCH_CHECK(chunks <= 65535, "out: too many pixels (", total, ") for the gradient reduction grid");
    partials = at::empty({chunks, entries}, f32);
    const kernels::GramParams gp{.grad_out = io.grad_out,
                                 .inp = io.inp.view,
                                 .partials = partials.data_ptr<float>(),
                                 .pixels = g.pixels,
                                 .total = total,
                                 .chunk = chunk,
                                 .channels = static_cast<int>(c)};
    const dim3 grid(ceil_div(c, kernels::kTileM), ceil_div(c + 1, kernels::kTileN), chunks);
    FK_BOOL_SWITCH(io.grad_out.s.c == 1 && io.inp.view.s.c == 1, kChannelsFast, [&] {
      kernels::gram_partial_kernel<kChannelsFast><<<grid, kernels::kGemmThreads, 0, stream>>>(gp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  const dim3 block(kernels::kReduceCols, kernels::kReduceRows);
  kernels::gram_reduce_kernel<<<ceil_div(entries, kernels::kReduceCols), block, 0, stream>>>(
      partials.data_ptr<float>(), partials.size(0), static_cast<int>(c), io.grad_matrix.data_ptr<float>(),
      io.grad_offset.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return io.results();
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkernels, CUDA, m) {
  m.impl("channel_affine_fwd", &channel_affine_fwd_cuda);
  m.impl("channel_affine_bwd", &channel_affine_bwd_cuda);
}

}  // namespace flowkernels
