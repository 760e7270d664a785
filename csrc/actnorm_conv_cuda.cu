// CUDA entry points of flowkernels::actnorm_conv_{fwd,bwd}: input checks, CUDAGuard, the current
// stream, output allocation (empty_like keeps the memory format), the choice of kernel variant
// (switches below) and C10_CUDA_KERNEL_LAUNCH_CHECK after every launch. The kernels and their
// launch configuration are described in kernels/actnorm_conv_kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>

#include "flow_checks.h"
#include "kernels/actnorm_conv_kernels.cuh"

namespace flowkernels {
namespace {

using kernels::ceil_div;
using kernels::MatrixView;

void check_grid(const PixelGeometry& g, const char* name) {
  TORCH_CHECK(g.batch <= 65535, name, ": the CUDA kernels take at most 65535 samples, got ", g.batch);
  TORCH_CHECK(g.pixels <= std::numeric_limits<int32_t>::max(), name,
              ": the CUDA kernels take at most 2^31 - 1 pixels per sample, got ", g.pixels);
}

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

// The fastest small-C layout that every (pointer, strides) pair of the call allows.
int small_layout(std::initializer_list<std::pair<const void*, PixelStrides>> tensors, const PixelGeometry& g) {
  for (int layout : {kernels::kPlanarVec, kernels::kChannelVec}) {
    bool ok = true;
    for (const auto& t : tensors) {
      ok = ok && kernels::map_layout_ok(layout, t.first, t.second, g);
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
void launch_channel_map(const kernels::ChannelMapParams& prm, const PixelGeometry& g, int layout,
                        cudaStream_t stream) {
  if (g.channels > kernels::kMaxSmallChannels) {
    const dim3 grid(ceil_div(g.pixels, kernels::kTileN), ceil_div(g.channels, kernels::kTileM), g.batch);
    FK_BOOL_SWITCH(prm.in_s.c == 1, kChannelsFast, [&] {
      kernels::channel_map_gemm_kernel<kChannelsFast><<<grid, kernels::kGemmThreads, 0, stream>>>(prm);
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
        kernels::channel_map_small_kernel<kCMax, kLayout><<<grid, kernels::kMapThreads, 0, stream>>>(prm);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        TORCH_CHECK(false, "internal: the planar float4 layout takes at most 16 channels, got ", g.channels);
      }
    });
  });
}

at::Tensor actnorm_conv_fwd_cuda(const at::Tensor& x, const at::Tensor& matrix, const at::Tensor& offset,
                                 const at::Tensor& logdet_term, at::Tensor& logdet) {
  check_map_inputs(x, "x", matrix, "matrix", offset, "offset");
  check_device_type(x, "x", c10::DeviceType::CUDA);
  check_logdet_term(logdet_term, x);
  check_logdet(logdet, x, "x");
  const PixelStrides xs = pixel_strides(x, "x");
  const PixelGeometry g = geometry(x);
  check_grid(g, "x");

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor y = at::empty_like(x);
  maybe_poison(y);
  if (g.batch == 0) {
    return y;
  }
  const PixelStrides ys = pixel_strides(y, "y");
  kernels::ChannelMapParams prm{x.data_ptr<float>(),
                                xs,
                                y.data_ptr<float>(),
                                ys,
                                matrix_view(matrix),
                                offset.data_ptr<float>(),
                                offset.stride(0),
                                logdet_term.data_ptr<float>(),
                                logdet.data_ptr<float>(),
                                g.pixels,
                                static_cast<int>(g.channels)};
  if (g.pixels == 0) {
    // No pixels: only the log-det term. One block per sample adds it; the map writes nothing.
    const PixelGeometry one{g.batch, g.channels, 1};
    prm.pixels = 0;
    launch_channel_map(prm, one, kernels::kGeneric, stream);
    return y;
  }
  launch_channel_map(prm, g, small_layout({{x.data_ptr(), xs}, {y.data_ptr(), ys}}, g), stream);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> actnorm_conv_bwd_cuda(const at::Tensor& out,
                                                                                 const at::Tensor& grad_out,
                                                                                 const at::Tensor& matrix,
                                                                                 const at::Tensor& matrix_inv,
                                                                                 const at::Tensor& inv_offset) {
  check_map_bwd_inputs(out, grad_out, matrix, matrix_inv, inv_offset);
  check_device_type(out, "out", c10::DeviceType::CUDA);
  const PixelStrides os = pixel_strides(out, "out");
  const PixelStrides gs = pixel_strides(grad_out, "grad_out");
  const PixelGeometry g = geometry(out);
  check_grid(g, "out");
  const int64_t c = g.channels;

  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor inp = at::empty_like(out);
  at::Tensor grad_inp = at::empty_like(out);
  const auto f32 = out.options().dtype(at::kFloat);
  at::Tensor grad_matrix = at::empty({c, c}, f32);
  at::Tensor grad_offset = at::empty({c}, f32);
  maybe_poison(inp);
  maybe_poison(grad_inp);
  maybe_poison(grad_matrix);
  maybe_poison(grad_offset);
  if (out.numel() == 0) {
    grad_matrix.zero_();
    grad_offset.zero_();
    return {inp, grad_inp, grad_matrix, grad_offset};
  }
  const PixelStrides is = pixel_strides(inp, "inp");
  const PixelStrides gis = pixel_strides(grad_inp, "grad_inp");
  const int64_t entries = c * (c + 1);
  at::Tensor partials;

  if (c <= kernels::kMaxSmallChannels) {
    const int layout = small_layout(
        {{out.data_ptr(), os}, {grad_out.data_ptr(), gs}, {inp.data_ptr(), is}, {grad_inp.data_ptr(), gis}}, g);
    kernels::ChannelMapBwdParams prm{out.data_ptr<float>(),
                                     os,
                                     grad_out.data_ptr<float>(),
                                     gs,
                                     inp.data_ptr<float>(),
                                     is,
                                     grad_inp.data_ptr<float>(),
                                     gis,
                                     matrix_view(matrix_inv),
                                     inv_offset.data_ptr<float>(),
                                     inv_offset.stride(0),
                                     matrix_view(matrix),
                                     nullptr,
                                     g.pixels,
                                     static_cast<int>(c)};
    cmax_switch(c, [&](auto cmax) {
      constexpr int kCMax = decltype(cmax)::value;
      layout_switch(layout, [&](auto layout_tag) {
        constexpr int kLayout = decltype(layout_tag)::value;
        if constexpr (kLayout != kernels::kPlanarVec || kCMax <= 16) {
          using Cfg = kernels::SmallMapConfig<kLayout>;
          const dim3 grid(ceil_div(g.pixels, Cfg::kBwdPixels), g.batch);
          partials = at::empty({static_cast<int64_t>(grid.x) * grid.y, entries}, f32);
          prm.partials = partials.data_ptr<float>();
          kernels::channel_map_bwd_small_kernel<kCMax, kLayout><<<grid, Cfg::kBwdThreads, 0, stream>>>(prm);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          TORCH_CHECK(false, "internal: the planar float4 layout takes at most 16 channels, got ", c);
        }
      });
    });
  } else {
    // inp = matrix_inv @ out + inv_offset; grad_inp = matrix^T @ grad_out (transpose by strides).
    kernels::ChannelMapParams to_inp{out.data_ptr<float>(),
                                     os,
                                     inp.data_ptr<float>(),
                                     is,
                                     matrix_view(matrix_inv),
                                     inv_offset.data_ptr<float>(),
                                     inv_offset.stride(0),
                                     nullptr,
                                     nullptr,
                                     g.pixels,
                                     static_cast<int>(c)};
    launch_channel_map(to_inp, g, kernels::kGeneric, stream);
    kernels::ChannelMapParams to_grad{grad_out.data_ptr<float>(),
                                      gs,
                                      grad_inp.data_ptr<float>(),
                                      gis,
                                      matrix_view(matrix, /*transpose=*/true),
                                      nullptr,
                                      0,
                                      nullptr,
                                      nullptr,
                                      g.pixels,
                                      static_cast<int>(c)};
    launch_channel_map(to_grad, g, kernels::kGeneric, stream);

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
    kernels::GramParams gp{grad_out.data_ptr<float>(), gs, inp.data_ptr<float>(), is, partials.data_ptr<float>(),
                           g.pixels, total, chunk, static_cast<int>(c)};
    const dim3 grid(ceil_div(c, kernels::kTileM), ceil_div(c + 1, kernels::kTileN), chunks);
    FK_BOOL_SWITCH(gs.c == 1 && is.c == 1, kChannelsFast, [&] {
      kernels::gram_partial_kernel<kChannelsFast><<<grid, kernels::kGemmThreads, 0, stream>>>(gp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  const dim3 block(kernels::kReduceCols, kernels::kReduceRows);
  kernels::gram_reduce_kernel<<<ceil_div(entries, kernels::kReduceCols), block, 0, stream>>>(
      partials.data_ptr<float>(), partials.size(0), static_cast<int>(c), grad_matrix.data_ptr<float>(),
      grad_offset.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {inp, grad_inp, grad_matrix, grad_offset};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkernels, CUDA, m) {
  m.impl("channel_affine_fwd", &actnorm_conv_fwd_cuda);
  m.impl("channel_affine_bwd", &actnorm_conv_bwd_cuda);
}

}  // namespace flowkernels
