// Torch-free CUDA kernels of the fused ActNorm + 1x1 conv, i.e. the per-pixel channel map
// out[b, :, p] = A @ in[b, :, p] + a (A, a folded in flowkernels/ops/actnorm_conv.py). The host
// entry points (channel_affine_cuda.cu) check the inputs, pick the variant and launch.
//
// Small C (<= 32; SRFlow levels 1-2 have 12 and 24 channels): memory-bound (C/4 FLOP per byte),
// one thread computes whole pixels with the matrix in shared memory, zero-padded to kCMax x kCMax
// (kCMax a multiple of 4 >= C) so that the unrolled loops need no bounds tests and read it as
// broadcast float4s. Three layouts:
//   kPlanarVec  NCHW, kCMax <= 16: a thread maps 4 consecutive pixels (one float4 per channel in
//               and out); block 128 threads = 512 pixels; grid (ceil(P / 512), B). Level 1
//               (B16, 80x80): 13 x 16 = 208 blocks, each thread with C 16-byte loads in flight
//               before the first FMA.
//   kChannelVec channels_last, C % 4 == 0: a thread maps one pixel, its C channels read and
//               written as C/4 float4s; block 128 = 128 pixels; grid (ceil(P / 128), B); level 1:
//               800 blocks.
//   kGeneric    any collapsible strides: one pixel per thread, scalar accesses (coalesced along
//               pixels for NCHW), e.g. NCHW with P % 4 != 0 or C = 24.
// Large C (> 32; 48, 96, 192): arithmetic-bound (24 FLOP/B at C = 96), a tiled FP32 GEMM
// out[b] (C x P) = A (C x C) @ in[b] (C x P): 64x64 output tiles, K steps of 16 through shared
// memory (rows padded to 65 floats: conflict-free for both fill patterns), 256 threads with 4x4
// register tiles strided by 16 so that a half-warp writes 16 consecutive pixels (NCHW) or
// channels (channels_last, kChannelsFast); grid (ceil(P / 64), ceil(C / 64), B). No TF32: the
// forward must match the reference within 1e-5.
//
// Backward (recompute from the output): inp = A_inv @ out + a_inv, grad_inp = A^T @ grad_out,
// grad_matrix = sum_{b,p} grad_out inp^T and grad_offset = sum_{b,p} grad_out. Both reductions
// form one C x (C + 1) Gram matrix G = sum grad_out [inp; 1]^T. Small C: one fused kernel per
// block of pixels computes inp and grad_inp, stages grad_out and inp in shared memory and forms
// the block's G (each warp takes 4x4 tiles of G, lanes split the pixels, butterflies sum the
// lanes) into its own row of a partial buffer. Large C: the GEMM kernel twice (A^T through
// swapped strides) and gram_partial_kernel over pixel chunks. Then gram_reduce_kernel adds the
// partial rows in a fixed order (double): deterministic, no atomics.
//
// Measured on an H200 (B16, CUDA-graph replay, against a device copy of the same bytes measured
// the same way): C12 80x80 forward 4.6 us NCHW (63% of the copy) and 7.3 us channels_last (39%);
// backward 18-24 us (17-22%); C96 20x20 forward 14-17 us, backward 67-74 us.
#pragma once

#include "cuda_common.cuh"

namespace flowkernels {
namespace kernels {

// A (rows, cols) float32 matrix read through its strides (swapping them reads the transpose).
struct MatrixView {
  const float* ptr;
  int64_t row;
  int64_t col;

  FK_HOST_DEVICE float at(int64_t i, int64_t j) const { return ptr[i * row + j * col]; }
};

struct ChannelAffineParams {
  FlowView<const float> in;
  FlowView<float> out;
  MatrixView matrix;
  const float* offset;  // may be null (no offset)
  int64_t offset_stride;
  const float* logdet_term;  // with logdet non-null: logdet[b] += *logdet_term, one thread per sample
  float* logdet;
  int64_t pixels;
  int channels;
};

struct ChannelAffineBwdParams {
  FlowView<const float> out;
  FlowView<const float> grad_out;
  FlowView<float> inp;
  FlowView<float> grad_inp;
  MatrixView matrix_inv;
  const float* inv_offset;
  int64_t inv_offset_stride;
  MatrixView matrix;  // grad_inp = matrix^T @ grad_out
  float* partials;    // (blocks, C * (C + 1)) rows of G
  int64_t pixels;
  int channels;
};

struct GramParams {
  FlowView<const float> grad_out;
  FlowView<const float> inp;
  float* partials;  // (chunks, C * (C + 1))
  int64_t pixels;
  int64_t total;  // B * P: the pixels of all samples, flattened as n = b * P + p
  int64_t chunk;  // pixels per chunk (gridDim.z chunks)
  int channels;
};

enum MapLayout : int { kGeneric = 0, kPlanarVec = 1, kChannelVec = 2 };

constexpr int kMapThreads = 128;
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kGemmThreads = 256;
constexpr int kReduceCols = 32;
constexpr int kReduceRows = 8;

template <int kLayout>
struct SmallMapConfig {
  static constexpr int kVec = kLayout == kPlanarVec ? 4 : 1;  // pixels per thread
  static constexpr int kBwdThreads = kLayout == kPlanarVec ? 64 : 128;
  static constexpr int kBwdPixels = kBwdThreads * kVec;  // pixels per backward block
};

// m_s[i * kCMax + j] = M[i, j] for i, j < C, zero elsewhere (transpose: M[j, i]).
template <int kCMax>
__device__ __forceinline__ void stage_matrix(const MatrixView m, int channels, float* m_s) {
  for (int idx = threadIdx.x; idx < kCMax * kCMax; idx += blockDim.x) {
    const int i = idx / kCMax;
    const int j = idx - i * kCMax;
    m_s[idx] = (i < channels && j < channels) ? m.at(i, j) : 0.0f;
  }
}

template <int kCMax>
__device__ __forceinline__ void stage_vector(const float* v, int64_t stride, int channels, float* v_s) {
  for (int idx = threadIdx.x; idx < kCMax; idx += blockDim.x) {
    v_s[idx] = (v != nullptr && idx < channels) ? v[idx * stride] : 0.0f;
  }
}

// y[r][k] = off[4 i4 + r] + sum_j m[4 i4 + r, j] * x[j][k] for the 4 rows of group i4.
template <int kCMax, int V>
__device__ __forceinline__ void map_rows4(const float* m_s, const float* off_s, const float (&x)[kCMax][V], int i4,
                                          float (&y)[4][V]) {
  const float4* m4 = reinterpret_cast<const float4*>(m_s);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = 4 * i4 + r;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      y[r][k] = off_s[i];
    }
#pragma unroll
    for (int j4 = 0; j4 < kCMax / 4; ++j4) {
      const float4 m = m4[i * (kCMax / 4) + j4];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        y[r][k] = fmaf(m.x, x[4 * j4 + 0][k], y[r][k]);
        y[r][k] = fmaf(m.y, x[4 * j4 + 1][k], y[r][k]);
        y[r][k] = fmaf(m.z, x[4 * j4 + 2][k], y[r][k]);
        y[r][k] = fmaf(m.w, x[4 * j4 + 3][k], y[r][k]);
      }
    }
  }
}

// x[j][k] for the thread's pixels (zero for j >= C). kPlanarVec: pixels p0..p0+3; else pixel p0.
template <int kCMax, int kLayout, int V>
__device__ __forceinline__ void load_pixels(const FlowView<const float>& t, int64_t b, int64_t p0, int channels,
                                            float (&x)[kCMax][V]) {
  if constexpr (kLayout == kPlanarVec) {
#pragma unroll
    for (int j = 0; j < kCMax; ++j) {
      if (j < channels) {
        load4(t.ptr(b, j, p0), x[j]);
      } else {
        x[j][0] = x[j][1] = x[j][2] = x[j][3] = 0.0f;
      }
    }
  } else if constexpr (kLayout == kChannelVec) {
    const float* src = t.ptr(b, 0, p0);
#pragma unroll
    for (int j4 = 0; j4 < kCMax / 4; ++j4) {
      float q[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (4 * j4 < channels) {  // C % 4 == 0
        load4(src + 4 * j4, q);
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        x[4 * j4 + r][0] = q[r];
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kCMax; ++j) {
      x[j][0] = j < channels ? *t.ptr(b, j, p0) : 0.0f;
    }
  }
}

// Stores rows 4 i4 .. 4 i4 + 3 (those < C) of the thread's pixels.
template <int kLayout, int V>
__device__ __forceinline__ void store_rows4(const FlowView<float>& t, int64_t b, int64_t p0, int channels, int i4,
                                            const float (&y)[4][V]) {
  if constexpr (kLayout == kChannelVec) {
    if (4 * i4 < channels) {  // C % 4 == 0
      const float q[4] = {y[0][0], y[1][0], y[2][0], y[3][0]};
      store4(t.ptr(b, 4 * i4, p0), q);
    }
  } else {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = 4 * i4 + r;
      if (i < channels) {
        if constexpr (kLayout == kPlanarVec) {
          store4(t.ptr(b, i, p0), y[r]);
        } else {
          *t.ptr(b, i, p0) = y[r][0];
        }
      }
    }
  }
}

// acc[r][q] += a[r] * x[q]: the rank-1 update of a 4x4 register tile, the inner step of the
// GEMM-like loops (the Gram tiles of the small-C backward, the large-C map and Gram kernels).
__device__ __forceinline__ void fma_4x4(const float (&a)[4], const float (&x)[4], float (&acc)[4][4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      acc[r][q] = fmaf(a[r], x[q], acc[r][q]);
    }
  }
}

// Small-C forward map; grid (ceil(P / (kMapThreads * V)), B).
template <int kCMax, int kLayout>
__global__ void __launch_bounds__(kMapThreads) channel_affine_small_kernel(const ChannelAffineParams prm) {
  static_assert(kCMax % 4 == 0, "kCMax must be a multiple of 4");
  static_assert(kLayout != kPlanarVec || kCMax <= 16, "kPlanarVec keeps 4 x kCMax inputs in registers");
  constexpr int V = SmallMapConfig<kLayout>::kVec;
  __shared__ __align__(16) float m_s[kCMax * kCMax];
  __shared__ float off_s[kCMax];
  stage_matrix<kCMax>(prm.matrix, prm.channels, m_s);
  stage_vector<kCMax>(prm.offset, prm.offset_stride, prm.channels, off_s);
  __syncthreads();
  const int64_t b = blockIdx.y;
  if (prm.logdet != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    prm.logdet[b] += *prm.logdet_term;
  }
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kMapThreads + threadIdx.x) * V;
  if (p0 >= prm.pixels) {  // kPlanarVec: P % 4 == 0
    return;
  }
  float x[kCMax][V];
  load_pixels<kCMax, kLayout, V>(prm.in, b, p0, prm.channels, x);
#pragma unroll
  for (int i4 = 0; i4 < kCMax / 4; ++i4) {
    if (4 * i4 < prm.channels) {
      float y[4][V];
      map_rows4<kCMax, V>(m_s, off_s, x, i4, y);
      store_rows4<kLayout, V>(prm.out, b, p0, prm.channels, i4, y);
    }
  }
}

// Small-C fused backward; grid (ceil(P / kBwdPixels), B); partial row blockIdx.y * gridDim.x + blockIdx.x.
template <int kCMax, int kLayout>
__global__ void __launch_bounds__(SmallMapConfig<kLayout>::kBwdThreads)
    channel_affine_bwd_small_kernel(const ChannelAffineBwdParams prm) {
  static_assert(kCMax % 4 == 0, "kCMax must be a multiple of 4");
  static_assert(kLayout != kPlanarVec || kCMax <= 16, "kPlanarVec keeps 8 x kCMax values in registers");
  using Cfg = SmallMapConfig<kLayout>;
  constexpr int V = Cfg::kVec;
  constexpr int kPix = Cfg::kBwdPixels;
  constexpr int kLd = kPix + 1;  // padded rows of the staged tiles
  __shared__ __align__(16) float minv_s[kCMax * kCMax];
  __shared__ __align__(16) float mt_s[kCMax * kCMax];
  __shared__ float inv_off_s[kCMax];
  __shared__ float zero_s[kCMax];
  __shared__ float go_s[kCMax * kLd];  // grad_out of the block's pixels, channel-major
  __shared__ float in_s[kCMax * kLd];  // rebuilt input of the block's pixels
  const int channels = prm.channels;
  stage_matrix<kCMax>(prm.matrix_inv, channels, minv_s);
  stage_matrix<kCMax>(MatrixView{prm.matrix.ptr, prm.matrix.col, prm.matrix.row}, channels, mt_s);
  stage_vector<kCMax>(prm.inv_offset, prm.inv_offset_stride, channels, inv_off_s);
  stage_vector<kCMax>(nullptr, 0, channels, zero_s);
  __syncthreads();

  // Phase 1: inp and grad_inp of the thread's V pixels; stage grad_out and inp (zero for pixels
  // past P, so they add nothing to G).
  const int64_t b = blockIdx.y;
  const int local = threadIdx.x * V;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kPix + local;
  const bool valid = p0 < prm.pixels;  // kPlanarVec: P % 4 == 0
  float o[kCMax][V];
  float g[kCMax][V];
  if (valid) {
    load_pixels<kCMax, kLayout, V>(prm.out, b, p0, channels, o);
    load_pixels<kCMax, kLayout, V>(prm.grad_out, b, p0, channels, g);
  } else {
#pragma unroll
    for (int j = 0; j < kCMax; ++j) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        o[j][k] = 0.0f;
        g[j][k] = 0.0f;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kCMax; ++j) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      go_s[j * kLd + local + k] = g[j][k];
    }
  }
#pragma unroll
  for (int i4 = 0; i4 < kCMax / 4; ++i4) {
    float y[4][V];
    map_rows4<kCMax, V>(minv_s, inv_off_s, o, i4, y);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        in_s[(4 * i4 + r) * kLd + local + k] = valid ? y[r][k] : 0.0f;
      }
    }
    if (valid) {
      store_rows4<kLayout, V>(prm.inp, b, p0, channels, i4, y);
    }
  }
#pragma unroll
  for (int i4 = 0; i4 < kCMax / 4; ++i4) {
    if (valid && 4 * i4 < channels) {
      float y[4][V];
      map_rows4<kCMax, V>(mt_s, zero_s, g, i4, y);
      store_rows4<kLayout, V>(prm.grad_inp, b, p0, channels, i4, y);
    }
  }
  __syncthreads();

  // Phase 2: G (C x (C + 1)) of the block's pixels; column C is the ones column (grad_offset).
  // A warp takes 4x4 tiles of G; its lanes take pixels lane, lane + 32, ...
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  constexpr int kWarps = Cfg::kBwdThreads / 32;
  const int cols = channels + 1;
  const int tiles_i = (channels + 3) / 4;
  const int tiles_j = (cols + 3) / 4;
  float* row = prm.partials + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * channels * cols;
  for (int t = warp; t < tiles_i * tiles_j; t += kWarps) {
    const int i0 = (t / tiles_j) * 4;
    const int j0 = (t % tiles_j) * 4;
    float acc[4][4] = {};
    for (int p = lane; p < kPix; p += 32) {
      float a[4], x[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        a[r] = go_s[(i0 + r) * kLd + p];  // i0 + r < kCMax: rows >= C are staged zeros
        const int j = j0 + r;
        x[r] = j < channels ? in_s[j * kLd + p] : (j == channels ? 1.0f : 0.0f);
      }
      fma_4x4(a, x, acc);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        acc[r][q] = warp_sum(acc[r][q]);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (i0 + r < channels && j0 + q < cols) {
            row[(i0 + r) * cols + j0 + q] = acc[r][q];
          }
        }
      }
    }
  }
}

// Large-C map, tiled FP32 GEMM; grid (ceil(P / kTileN), ceil(C / kTileM), B).
template <bool kChannelsFast>
__global__ void __launch_bounds__(kGemmThreads) channel_affine_gemm_kernel(const ChannelAffineParams prm) {
  __shared__ float a_s[kTileK][kTileM + 1];
  __shared__ float x_s[kTileK][kTileN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t b = blockIdx.z;
  const int i0 = blockIdx.y * kTileM;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int channels = prm.channels;
  if (prm.logdet != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) {
    prm.logdet[b] += *prm.logdet_term;
  }
  // The thread's outputs: channel i0 + ci(r), pixel p0 + pi(q); the fast index (tx) runs along
  // the unit-stride axis of the output so that stores coalesce.
  auto ci = [&](int r) { return kChannelsFast ? tx + 16 * r : ty + 16 * r; };
  auto pi = [&](int q) { return kChannelsFast ? ty + 16 * q : tx + 16 * q; };
  float acc[4][4] = {};
  for (int k0 = 0; k0 < channels; k0 += kTileK) {
#pragma unroll
    for (int r = 0; r < kTileM * kTileK / kGemmThreads; ++r) {
      const int e = tid + r * kGemmThreads;
      const int kk = e % kTileK;
      const int ii = e / kTileK;
      const int i = i0 + ii;
      const int k = k0 + kk;
      a_s[kk][ii] = (i < channels && k < channels) ? prm.matrix.at(i, k) : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < kTileN * kTileK / kGemmThreads; ++r) {
      const int e = tid + r * kGemmThreads;
      const int kk = kChannelsFast ? e % kTileK : e / kTileN;
      const int pp = kChannelsFast ? e / kTileK : e % kTileN;
      const int k = k0 + kk;
      const int64_t p = p0 + pp;
      x_s[kk][pp] = (k < channels && p < prm.pixels) ? *prm.in.ptr(b, k, p) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], x[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        a[r] = a_s[kk][ci(r)];
        x[r] = x_s[kk][pi(r)];
      }
      fma_4x4(a, x, acc);
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = i0 + ci(r);
    if (i < channels) {
      const float off = prm.offset != nullptr ? prm.offset[i * prm.offset_stride] : 0.0f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t p = p0 + pi(q);
        if (p < prm.pixels) {
          *prm.out.ptr(b, i, p) = acc[r][q] + off;
        }
      }
    }
  }
}

// Large-C Gram partials: G[z] = sum over the pixels of chunk z of grad_out [inp; 1]^T.
// grid (ceil(C / kTileM), ceil((C + 1) / kTileN), chunks); row z of `partials`.
template <bool kChannelsFast>
__global__ void __launch_bounds__(kGemmThreads) gram_partial_kernel(const GramParams prm) {
  __shared__ float g_s[kTileK][kTileM + 1];
  __shared__ float x_s[kTileK][kTileN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int channels = prm.channels;
  const int cols = channels + 1;
  const int i0 = blockIdx.x * kTileM;
  const int j0 = blockIdx.y * kTileN;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.z) * prm.chunk;
  const int64_t n_end = n_begin + prm.chunk < prm.total ? n_begin + prm.chunk : prm.total;
  float acc[4][4] = {};
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileK) {
#pragma unroll
    for (int r = 0; r < kTileM * kTileK / kGemmThreads; ++r) {
      const int e = tid + r * kGemmThreads;
      // Consecutive threads read consecutive channels (channels_last) or pixels (NCHW).
      const int kk = kChannelsFast ? e / kTileM : e % kTileK;
      const int ii = kChannelsFast ? e % kTileM : e / kTileK;
      const int64_t n = n0 + kk;
      float gv = 0.0f, xv = 0.0f;
      if (n < n_end) {
        const int64_t b = n / prm.pixels;
        const int64_t p = n - b * prm.pixels;
        const int i = i0 + ii;
        const int j = j0 + ii;
        gv = i < channels ? *prm.grad_out.ptr(b, i, p) : 0.0f;
        xv = j < channels ? *prm.inp.ptr(b, j, p) : (j == channels ? 1.0f : 0.0f);
      }
      g_s[kk][ii] = gv;
      x_s[kk][ii] = xv;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], x[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        a[r] = g_s[kk][ty + 16 * r];
        x[r] = x_s[kk][tx + 16 * r];
      }
      fma_4x4(a, x, acc);
    }
    __syncthreads();
  }
  float* row = prm.partials + static_cast<int64_t>(blockIdx.z) * channels * cols;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = i0 + ty + 16 * r;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int j = j0 + tx + 16 * q;
      if (i < channels && j < cols) {
        row[i * cols + j] = acc[r][q];
      }
    }
  }
}

// grad_matrix[i, j] = sum_rows partials[row, i * (C + 1) + j], grad_offset[i] the column j = C.
// grid ceil(C * (C + 1) / 32), block (32, 8): threadIdx.y takes rows y, y + 8, ... in order,
// then thread y = 0 adds the 8 sums in order (double): deterministic.
__global__ void __launch_bounds__(kReduceCols* kReduceRows)
    gram_reduce_kernel(const float* partials, int64_t rows, int channels, float* grad_matrix, float* grad_offset) {
  __shared__ double s[kReduceRows][kReduceCols];
  const int cols = channels + 1;
  const int64_t entries = static_cast<int64_t>(channels) * cols;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  double acc = 0.0;
  if (e < entries) {
    for (int64_t r = threadIdx.y; r < rows; r += kReduceRows) {
      acc += static_cast<double>(partials[r * entries + e]);
    }
  }
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && e < entries) {
    double total = 0.0;
#pragma unroll
    for (int k = 0; k < kReduceRows; ++k) {
      total += s[k][threadIdx.x];
    }
    const int i = static_cast<int>(e / cols);
    const int j = static_cast<int>(e - static_cast<int64_t>(i) * cols);
    if (j < channels) {
      grad_matrix[static_cast<int64_t>(i) * channels + j] = static_cast<float>(total);
    } else {
      grad_offset[i] = static_cast<float>(total);
    }
  }
}

// ---- host-side layout tests (torch-free) ----

inline int small_cmax(int64_t channels) {
  return channels <= 4 ? 4 : channels <= 8 ? 8 : channels <= 12 ? 12 : channels <= 16 ? 16 : channels <= 24 ? 24 : 32;
}

constexpr int64_t kMaxSmallChannels = 32;

// Can a tensor of the call take the given small-C layout?
inline bool map_layout_ok(int layout, const FlowAddress& t, const PixelGeometry& g) {
  const PixelStrides& s = t.s;
  const bool batch_ok = s.b % 4 == 0 || g.batch == 1;
  if (layout == kPlanarVec) {
    return small_cmax(g.channels) <= 16 && s.p == 1 && g.pixels % 4 == 0 && s.c % 4 == 0 && batch_ok &&
           aligned(t.data, 16);
  }
  if (layout == kChannelVec) {
    return s.c == 1 && g.channels % 4 == 0 && s.p % 4 == 0 && batch_ok && aligned(t.data, 16);
  }
  return true;
}

}  // namespace kernels
}  // namespace flowkernels
