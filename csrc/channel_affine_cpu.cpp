// C++ CPU kernels of flowkernels::channel_affine_{fwd,bwd}: the per-pixel affine channel map
// out = matrix @ inp + offset (schemas: ops.cpp; oracle: reference.channel_affine{,_bwd}).
//
// Work is split into tasks of (sample, tile of pixels). A task gathers its C x n tile into a
// thread-local channel-major buffer through the (batch, channel, pixel) strides (a row copy for
// NCHW, a transpose for channels_last), runs the C x C map on the tile (register-blocked, pixels
// vectorised by `omp simd`, AVX-512 / AVX2 / baseline variants: cpu_vec.h) and scatters
// the result, so both layouts share one compute loop. float32 throughout, as the reference.
//
// Backward parameter gradients (grad_matrix = sum grad_out inp^T, grad_offset = sum grad_out):
// each task forms its tile's float sums (<= tile_pixels terms), which are added into a double
// accumulator of its *chunk*; the tasks are split into a fixed number of chunks that depends on
// the shape only, and the chunks are added in order at the end, so the result does not depend on
// the thread count. The accumulator memory is bounded (kMaxChunks x C x (C + 1) doubles).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "channel_affine_host.h"
#include "cpu_common.h"
#include "cpu_vec.h"

namespace flowkernels {
namespace {

constexpr int64_t kMaxChunks = 64;

// Pixels per task, a multiple of kPixelVec: the four tiles of the backward (4 x C x n floats,
// <= 256 KiB) stay in L2, and long rows amortise the Gram kernel's horizontal sums.
inline int64_t tile_pixels(int64_t channels) {
  return std::max<int64_t>(64, std::min<int64_t>(256, (16384 / std::max<int64_t>(channels, 1)) / 16 * 16));
}

// A (C, C) or (C,) float32 parameter read through its strides into a dense row-major copy.
std::vector<float> dense_matrix(const at::Tensor& m, bool transpose) {
  const int64_t n = m.size(0);
  const float* p = m.data_ptr<float>();
  std::vector<float> out(n * n);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t src = transpose ? j * m.stride(0) + i * m.stride(1) : i * m.stride(0) + j * m.stride(1);
      out[i * n + j] = p[src];
    }
  }
  return out;
}

std::vector<float> dense_vector(const at::Tensor& v) {
  std::vector<float> out(v.size(0));
  const float* p = v.data_ptr<float>();
  for (int64_t i = 0; i < v.size(0); ++i) {
    out[i] = p[i * v.stride(0)];
  }
  return out;
}

// tile[c * ld + (p - p0)] = t[b, c, p] for p in [p0, p0 + n): one strided read per element, the
// writes along the tile row (vectorised: contiguous for NCHW, gathers for channels_last).
FK_ALWAYS_INLINE void gather_body(FlowView<const float> t, int64_t b, int64_t p0, int64_t n, int64_t channels,
                                   float* tile, int64_t ld) {
  for (int64_t c = 0; c < channels; ++c) {
    const float* src = t.ptr(b, c, p0);
    float* dst = tile + c * ld;
    if (t.s.p == 1) {
      std::memcpy(dst, src, n * sizeof(float));
      continue;
    }
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      dst[k] = src[k * t.s.p];
    }
  }
}

FK_CPU_VARIANTS(void, gather,
                (FlowView<const float> t, int64_t b, int64_t p0, int64_t n, int64_t channels, float* tile, int64_t ld),
                (t, b, p0, n, channels, tile, ld))

FK_ALWAYS_INLINE void scatter_body(const float* tile, int64_t ld, int64_t channels, int64_t b, int64_t p0, int64_t n,
                                   FlowView<float> t) {
  for (int64_t c = 0; c < channels; ++c) {
    const float* src = tile + c * ld;
    float* dst = t.ptr(b, c, p0);
    if (t.s.p == 1) {
      std::memcpy(dst, src, n * sizeof(float));
      continue;
    }
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      dst[k * t.s.p] = src[k];
    }
  }
}

FK_CPU_VARIANTS(void, scatter,
                (const float* tile, int64_t ld, int64_t channels, int64_t b, int64_t p0, int64_t n, FlowView<float> t),
                (tile, ld, channels, b, p0, n, t))

// out[i, k] = offset[i] + sum_j m[i, j] in[j, k] for k < n; m dense row-major C x C, offset may
// be null; rows at stride ld (a multiple of kPixelVec, so reading a whole last block of kPixelVec
// columns stays inside the tile buffer; the columns past n are computed and dropped). Register
// blocking: 4 output rows x kPixelVec pixels of accumulators, one pass over the C inputs.
constexpr int64_t kPixelVec = 16;

template <int kRows>
FK_ALWAYS_INLINE void map_rows(const float* m, const float* offset, const float* in, float* out, int64_t channels, int64_t n,
                     int64_t ld, int64_t i) {
  for (int64_t k0 = 0; k0 < n; k0 += kPixelVec) {
    float acc[kRows][kPixelVec];
    for (int r = 0; r < kRows; ++r) {
      const float init = offset != nullptr ? offset[i + r] : 0.0f;
      for (int64_t k = 0; k < kPixelVec; ++k) {
        acc[r][k] = init;
      }
    }
    for (int64_t j = 0; j < channels; ++j) {
      const float* x = in + j * ld + k0;
      for (int r = 0; r < kRows; ++r) {
        const float mij = m[(i + r) * channels + j];
#pragma omp simd
        for (int64_t k = 0; k < kPixelVec; ++k) {
          acc[r][k] += mij * x[k];
        }
      }
    }
    const int64_t kn = std::min(kPixelVec, n - k0);
    for (int r = 0; r < kRows; ++r) {
      std::memcpy(out + (i + r) * ld + k0, acc[r], kn * sizeof(float));
    }
  }
}

FK_ALWAYS_INLINE void map_tile_body(const float* m, const float* offset, const float* in, float* out,
                                    int64_t channels, int64_t n, int64_t ld) {
  int64_t i = 0;
  for (; i + 4 <= channels; i += 4) {
    map_rows<4>(m, offset, in, out, channels, n, ld, i);
  }
  for (; i < channels; ++i) {
    map_rows<1>(m, offset, in, out, channels, n, ld, i);
  }
}

FK_CPU_VARIANTS(void, map_tile,
                (const float* m, const float* offset, const float* in, float* out, int64_t channels, int64_t n,
                 int64_t ld),
                (m, offset, in, out, channels, n, ld))

// acc[i, j] += sum_{k < n} g[i, k] col_j[k] for the C x (C + 1) Gram block of one tile, with
// col_j = in[j] for j < C and ones for j = C (grad_offset). 2 x 4 register blocks: 6 row loads
// per 8 multiply-adds; the float sums (<= the tile's pixels) go into the double accumulator.
FK_ALWAYS_INLINE void gram_tile_body(const float* g, const float* in, const float* ones, int64_t channels,
                                     int64_t n, int64_t ld, double* acc) {
  const int64_t cols = channels + 1;
  auto col = [&](int64_t j) { return j < channels ? in + j * ld : ones; };
  for (int64_t i = 0; i < channels; i += 2) {
    const bool two = i + 1 < channels;
    const float* g0 = g + i * ld;
    const float* g1 = two ? g0 + ld : g0;
    for (int64_t j = 0; j < cols; j += 4) {
      const float* c0 = col(j);
      const float* c1 = col(std::min(j + 1, cols - 1));
      const float* c2 = col(std::min(j + 2, cols - 1));
      const float* c3 = col(std::min(j + 3, cols - 1));
      float s00 = 0.0f, s01 = 0.0f, s02 = 0.0f, s03 = 0.0f, s10 = 0.0f, s11 = 0.0f, s12 = 0.0f, s13 = 0.0f;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
      for (int64_t k = 0; k < n; ++k) {
        const float a0 = g0[k], a1 = g1[k];
        const float b0 = c0[k], b1 = c1[k], b2 = c2[k], b3 = c3[k];
        s00 += a0 * b0;
        s01 += a0 * b1;
        s02 += a0 * b2;
        s03 += a0 * b3;
        s10 += a1 * b0;
        s11 += a1 * b1;
        s12 += a1 * b2;
        s13 += a1 * b3;
      }
      const float sums[2][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}};
      for (int r = 0; r < (two ? 2 : 1); ++r) {
        for (int q = 0; q < 4 && j + q < cols; ++q) {
          acc[(i + r) * cols + j + q] += static_cast<double>(sums[r][q]);
        }
      }
    }
  }
}

FK_CPU_VARIANTS(void, gram_tile,
                (const float* g, const float* in, const float* ones, int64_t channels, int64_t n, int64_t ld,
                 double* acc),
                (g, in, ones, channels, n, ld, acc))

at::Tensor channel_affine_fwd_cpu(const at::Tensor& x, const at::Tensor& matrix, const at::Tensor& offset,
                                const at::Tensor& logdet_term, at::Tensor& logdet) {
  const ChannelAffineIO io = channel_affine_prologue(x, matrix, offset, logdet_term, logdet, kCpuTarget);
  const PixelGeometry& g = io.g;
  float* ld = logdet.data_ptr<float>();
  const float term = *logdet_term.data_ptr<float>();
  for (int64_t b = 0; b < g.batch; ++b) {
    ld[b] += term;
  }
  if (x.numel() == 0) {
    return io.y.tensor;
  }
  const std::vector<float> m = dense_matrix(matrix, false);
  const std::vector<float> off = dense_vector(offset);
  const TaskGrid tasks(g, tile_pixels(g.channels));
  const int64_t c = g.channels;

  at::parallel_for(0, tasks.count, tasks.grain, [&](int64_t begin, int64_t end) {
    std::vector<float> in_tile(c * tasks.tile), out_tile(c * tasks.tile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = tasks.sample(task), p0 = tasks.first_pixel(task), n = tasks.pixels_in(task);
      gather(io.x, b, p0, n, c, in_tile.data(), tasks.tile);
      map_tile(m.data(), off.data(), in_tile.data(), out_tile.data(), c, n, tasks.tile);
      scatter(out_tile.data(), tasks.tile, c, b, p0, n, io.y.view);
    }
  });
  return io.y.tensor;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_affine_bwd_cpu(const at::Tensor& out,
                                                                                const at::Tensor& grad_out,
                                                                                const at::Tensor& matrix,
                                                                                const at::Tensor& matrix_inv,
                                                                                const at::Tensor& inv_offset) {
  const ChannelAffineBwdIO io = channel_affine_bwd_prologue(out, grad_out, matrix, matrix_inv, inv_offset, kCpuTarget);
  const PixelGeometry& g = io.g;
  const int64_t c = g.channels;
  const TaskGrid tasks(g, tile_pixels(c));
  // G = [grad_matrix | grad_offset], C x (C + 1), per chunk of tasks.
  const int64_t cols = c + 1;
  const int64_t chunks = std::max<int64_t>(1, std::min(tasks.count, kMaxChunks));
  std::vector<double> acc(chunks * c * cols, 0.0);

  if (out.numel() > 0) {
    const std::vector<float> m_inv = dense_matrix(matrix_inv, false);
    const std::vector<float> m_t = dense_matrix(matrix, true);
    const std::vector<float> inv_off = dense_vector(inv_offset);

    // Grain in chunks: the chunk sums are fixed by the shape, only their scheduling varies.
    const int64_t chunk_grain = task_grain(tasks.count / chunks * std::min(g.pixels, tasks.tile) * c);
    at::parallel_for(0, chunks, chunk_grain, [&](int64_t begin, int64_t end) {
      const int64_t ld = tasks.tile;
      std::vector<float> o_tile(c * ld), g_tile(c * ld), i_tile(c * ld), gi_tile(c * ld), ones(ld, 1.0f);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        double* a = acc.data() + chunk * c * cols;
        const int64_t t0 = chunk * tasks.count / chunks, t1 = (chunk + 1) * tasks.count / chunks;
        for (int64_t task = t0; task < t1; ++task) {
          const int64_t b = tasks.sample(task), p0 = tasks.first_pixel(task), n = tasks.pixels_in(task);
          gather(io.out, b, p0, n, c, o_tile.data(), ld);
          gather(io.grad_out, b, p0, n, c, g_tile.data(), ld);
          map_tile(m_inv.data(), inv_off.data(), o_tile.data(), i_tile.data(), c, n, ld);
          map_tile(m_t.data(), nullptr, g_tile.data(), gi_tile.data(), c, n, ld);
          scatter(i_tile.data(), ld, c, b, p0, n, io.inp.view);
          scatter(gi_tile.data(), ld, c, b, p0, n, io.grad_inp.view);
          gram_tile(g_tile.data(), i_tile.data(), ones.data(), c, n, ld, a);
        }
      }
    });
  }

  // Chunks in order: the same sums for any thread count.
  float* gm = io.grad_matrix.data_ptr<float>();
  float* go = io.grad_offset.data_ptr<float>();
  for (int64_t i = 0; i < c; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      double sum = 0.0;
      for (int64_t k = 0; k < chunks; ++k) {
        sum += acc[(k * c + i) * cols + j];
      }
      if (j < c) {
        gm[i * c + j] = static_cast<float>(sum);
      } else {
        go[i] = static_cast<float>(sum);
      }
    }
  }
  return io.results();
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkernels, CPU, m) {
  m.impl("channel_affine_fwd", &channel_affine_fwd_cpu);
  m.impl("channel_affine_bwd", &channel_affine_bwd_cpu);
}

}  // namespace flowkernels
