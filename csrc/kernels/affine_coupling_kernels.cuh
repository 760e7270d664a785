// Torch-free CUDA kernels of the affine coupling (fwd / inv / bwd with recompute). The host entry
// points (affine_coupling_cuda.cu) check the inputs, pick the variant and launch.
//
// Two thread mappings, chosen by x's layout so that the flow state streams through coalesced,
// 16-byte accesses:
//
// * planar (x NCHW, or any layout as the scalar fallback): grid (ceil(P / (256 * V)), C, B); a
//   block is one channel of one sample, a thread V consecutive pixels. V = 4 (one float4 of x and
//   y, one float4 / 8-byte bf16x4 of shift and of raw scale) when every pointer is 16-byte
//   aligned (8 for bf16 h), pixels are unit-stride in all tensors and P, channel and batch
//   strides are multiples of 4; V = 1 with arbitrary (batch, channel, pixel) strides otherwise.
//   Level-1 SRFlow (B16, C12, 80x80) gives 7 x 12 x 16 = 1344 blocks of 256 threads: ~1.3
//   waves of 2048 threads on 132 SMs, each thread with three 16-byte loads in flight.
// * interleaved (x, y dense channels_last, h channels_last): grid (ceil(P*C / 1024), B); a
//   thread takes 4 consecutive elements of the sample's (P, C) plane (one float4 of x and y,
//   possibly spanning two pixels) and, for each active element, its (shift, raw) pair, adjacent
//   in channels_last h, as one 8-byte (4-byte bf16) load. Level 1: 75 x 16 = 1200 blocks.
//
// Log-det: each block reduces its sum of log s (warp butterflies, then the warps in order) and
// writes it to its own slot of a (B, parts) float buffer; logdet_finalize_kernel then adds each
// sample's slots in a fixed order (double) into logdet[b]. No atomics, so the log-det is bitwise
// reproducible run to run; the cost is one extra launch of B small blocks.
//
// Measured on an H200 (B16, C12, 80x80, fp32 h, CUDA-graph replay, against a device copy of the
// same bytes measured the same way): forward 6.4-7.5 us (NCHW) and 8.3 us (channels_last), 41-53%
// of the copy, of which the finalize launch is a fixed ~2 us; backward 6.5-9.3 us (NCHW, 84-88%)
// and 10.6-17.7 us (channels_last, 47-52%).
#pragma once

#include "coupling_layout.cuh"
#include "coupling_math.h"
#include "cuda_common.cuh"

namespace flowkernels {
namespace kernels {

constexpr int kFinalizeThreads = 128;

template <typename HT>
struct CouplingApplyParams {
  FlowView<const float> in;  // x (forward) or y (inverse)
  FlowView<const HT> h;
  FlowView<float> out;
  float* partials;  // (B, parts) block sums of log s
  int64_t pixels;
  int channels;
  int passive;
  float eps;
};

template <typename HT>
struct CouplingBwdParams {
  FlowView<const float> out;
  FlowView<const HT> h;
  FlowView<const float> grad_out;
  const float* grad_logdet;
  int64_t gl_stride;
  FlowView<float> inp;
  FlowView<float> grad_inp;
  FlowView<HT> grad_h;
  int64_t pixels;
  int channels;
  int passive;
  float eps;
};

template <bool kShiftFirst, bool kInverse>
__device__ __forceinline__ float coupling_apply_element(float v, float t, float raw, float eps, float& ld) {
  const CouplingScale sc = coupling_scale(raw, eps);
  ld += logf(sc.s);
  return kInverse ? coupling_inverse<kShiftFirst>(v, t, sc.s) : coupling_forward<kShiftFirst>(v, t, sc.s);
}

// The shift and raw scale of active channel a (rows 2a and 2a + 1 of h) at pixels p0 .. p0 + V - 1
// of sample b: one 4-element vector access each for V = 4, else scalars.
template <int V, typename HT>
__device__ __forceinline__ void load_shift_raw(const FlowView<const HT>& h, int64_t b, int a, int64_t p0, float (&t)[V],
                                               float (&raw)[V]) {
  const HT* hs = h.ptr(b, 2 * a, p0);
  const HT* hr = hs + h.s.c;
  if constexpr (V == 4) {
    load4(hs, t);
    load4(hr, raw);
  } else {
    t[0] = to_float(*hs);
    raw[0] = to_float(*hr);
  }
}

// grid (ceil(P / (kCouplingThreads * V)), C, B); partial slot (c - passive) * gridDim.x + blockIdx.x
// of sample b, parts = (C - passive) * gridDim.x.
template <typename HT, bool kShiftFirst, bool kInverse, bool kVec>
__global__ void __launch_bounds__(kCouplingThreads) coupling_apply_planar_kernel(const CouplingApplyParams<HT> prm) {
  constexpr int V = kVec ? 4 : 1;
  __shared__ float scratch[kCouplingThreads / 32];
  const int64_t b = blockIdx.z;
  const int c = blockIdx.y;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kCouplingThreads + threadIdx.x) * V;
  const bool active = c >= prm.passive;  // uniform over the block
  float ld = 0.0f;
  if (p0 < prm.pixels) {  // kVec: P % 4 == 0, so all V pixels are in range
    const float* src = prm.in.ptr(b, c, p0);
    float v[V];
    if constexpr (kVec) {
      load4(src, v);
    } else {
      v[0] = *src;
    }
    if (active) {
      float t[V], raw[V];
      load_shift_raw<V>(prm.h, b, c - prm.passive, p0, t, raw);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v[k] = coupling_apply_element<kShiftFirst, kInverse>(v[k], t[k], raw[k], prm.eps, ld);
      }
    }
    float* dst = prm.out.ptr(b, c, p0);
    if constexpr (kVec) {
      store4(dst, v);
    } else {
      *dst = v[0];
    }
  }
  if (active) {
    const float total = block_sum<kCouplingThreads>(ld, scratch);
    if (threadIdx.x == 0) {
      const int64_t parts = static_cast<int64_t>(prm.channels - prm.passive) * gridDim.x;
      prm.partials[b * parts + static_cast<int64_t>(c - prm.passive) * gridDim.x + blockIdx.x] = total;
    }
  }
}

// grid (ceil(P * C / (kCouplingThreads * 4)), B); partial slot blockIdx.x of sample b, parts = gridDim.x.
// Needs in/out dense channels_last (channel stride 1, pixel stride C), P * C % 4 == 0, 16-byte
// aligned; h channel stride 1 with even pixel and batch strides.
template <typename HT, bool kShiftFirst, bool kInverse>
__global__ void __launch_bounds__(kCouplingThreads)
    coupling_apply_interleaved_kernel(const CouplingApplyParams<HT> prm) {
  __shared__ float scratch[kCouplingThreads / 32];
  const int64_t b = blockIdx.y;
  const int64_t plane = prm.pixels * prm.channels;
  const int64_t e0 = (static_cast<int64_t>(blockIdx.x) * kCouplingThreads + threadIdx.x) * 4;
  float ld = 0.0f;
  if (e0 < plane) {
    float v[4];
    load4(prm.in.sample(b) + e0, v);
    int64_t p = e0 / prm.channels;
    int c = static_cast<int>(e0 - p * prm.channels);
    const HT* h_b = prm.h.sample(b);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (c >= prm.passive) {
        const float2 th = load2(h_b + p * prm.h.s.p + 2 * (c - prm.passive));
        v[k] = coupling_apply_element<kShiftFirst, kInverse>(v[k], th.x, th.y, prm.eps, ld);
      }
      if (++c == prm.channels) {
        c = 0;
        ++p;
      }
    }
    store4(prm.out.sample(b) + e0, v);
  }
  const float total = block_sum<kCouplingThreads>(ld, scratch);
  if (threadIdx.x == 0) {
    prm.partials[b * gridDim.x + blockIdx.x] = total;
  }
}

// One block per sample: logdet[b] += sign * (sum of the sample's `parts` partials), added in a
// fixed order in double.
__global__ void __launch_bounds__(kFinalizeThreads)
    logdet_finalize_kernel(const float* partials, int64_t parts, float sign, float* logdet) {
  __shared__ double scratch[kFinalizeThreads / 32];
  const float* row = partials + static_cast<int64_t>(blockIdx.x) * parts;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < parts; i += kFinalizeThreads) {
    acc += static_cast<double>(row[i]);
  }
  const double total = block_sum<kFinalizeThreads>(acc, scratch);
  if (threadIdx.x == 0) {
    logdet[blockIdx.x] += static_cast<float>(sign * total);
  }
}

// Backward with recompute, planar mapping (as coupling_apply_planar_kernel, no reduction).
template <typename HT, bool kShiftFirst, bool kReverse, bool kVec>
__global__ void __launch_bounds__(kCouplingThreads) coupling_bwd_planar_kernel(const CouplingBwdParams<HT> prm) {
  constexpr int V = kVec ? 4 : 1;
  const int64_t b = blockIdx.z;
  const int c = blockIdx.y;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kCouplingThreads + threadIdx.x) * V;
  if (p0 >= prm.pixels) {
    return;
  }
  float o[V], g[V];
  const float* o_src = prm.out.ptr(b, c, p0);
  const float* g_src = prm.grad_out.ptr(b, c, p0);
  float* i_dst = prm.inp.ptr(b, c, p0);
  float* gi_dst = prm.grad_inp.ptr(b, c, p0);
  if constexpr (kVec) {
    load4(o_src, o);
    load4(g_src, g);
  } else {
    o[0] = *o_src;
    g[0] = *g_src;
  }
  if (c < prm.passive) {
    // Passive channels: unchanged, and only the direct gradient (the subnet path is the caller's).
    if constexpr (kVec) {
      store4(i_dst, o);
      store4(gi_dst, g);
    } else {
      *i_dst = o[0];
      *gi_dst = g[0];
    }
    return;
  }
  const int a = c - prm.passive;
  float t[V], raw[V];
  load_shift_raw<V>(prm.h, b, a, p0, t, raw);
  HT* ghs = prm.grad_h.ptr(b, 2 * a, p0);
  HT* ghr = ghs + prm.grad_h.s.c;
  const float gl = prm.grad_logdet[b * prm.gl_stride];
  float inp[V], gi[V], gt[V], gr[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const CouplingGrads r = coupling_backward<kShiftFirst, kReverse>(o[k], g[k], t[k], raw[k], gl, prm.eps);
    inp[k] = r.inp;
    gi[k] = r.grad_inp;
    gt[k] = r.grad_shift;
    gr[k] = r.grad_raw;
  }
  if constexpr (kVec) {
    store4(i_dst, inp);
    store4(gi_dst, gi);
    store4(ghs, gt);
    store4(ghr, gr);
  } else {
    *i_dst = inp[0];
    *gi_dst = gi[0];
    *ghs = from_float<HT>(gt[0]);
    *ghr = from_float<HT>(gr[0]);
  }
}

// Backward with recompute, interleaved mapping (conditions of coupling_apply_interleaved_kernel,
// for out, grad_out, inp and grad_inp; h and grad_h with the pair conditions).
template <typename HT, bool kShiftFirst, bool kReverse>
__global__ void __launch_bounds__(kCouplingThreads) coupling_bwd_interleaved_kernel(const CouplingBwdParams<HT> prm) {
  const int64_t b = blockIdx.y;
  const int64_t plane = prm.pixels * prm.channels;
  const int64_t e0 = (static_cast<int64_t>(blockIdx.x) * kCouplingThreads + threadIdx.x) * 4;
  if (e0 >= plane) {
    return;
  }
  float o[4], g[4];
  load4(prm.out.sample(b) + e0, o);
  load4(prm.grad_out.sample(b) + e0, g);
  const float gl = prm.grad_logdet[b * prm.gl_stride];
  const HT* h_b = prm.h.sample(b);
  HT* gh_b = prm.grad_h.sample(b);
  int64_t p = e0 / prm.channels;
  int c = static_cast<int>(e0 - p * prm.channels);
  float inp[4], gi[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (c >= prm.passive) {
      const int a = c - prm.passive;
      const float2 th = load2(h_b + p * prm.h.s.p + 2 * a);
      const CouplingGrads r = coupling_backward<kShiftFirst, kReverse>(o[k], g[k], th.x, th.y, gl, prm.eps);
      store2(gh_b + p * prm.grad_h.s.p + 2 * a, r.grad_shift, r.grad_raw);
      inp[k] = r.inp;
      gi[k] = r.grad_inp;
    } else {
      inp[k] = o[k];
      gi[k] = g[k];
    }
    if (++c == prm.channels) {
      c = 0;
      ++p;
    }
  }
  store4(prm.inp.sample(b) + e0, inp);
  store4(prm.grad_inp.sample(b) + e0, gi);
}

}  // namespace kernels
}  // namespace flowkernels
