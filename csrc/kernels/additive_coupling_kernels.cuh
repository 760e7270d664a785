// Torch-free CUDA kernels of the additive coupling (fwd / inv / bwd with recompute). The host entry
// points (additive_coupling_cuda.cu) check the inputs, pick the variant and launch.
//
// The thread mappings of the affine kernels (coupling_layout.cuh: planar with 1 or 4 pixels per
// thread, or interleaved over a dense channels_last plane), with one shift per active element
// instead of a (shift, raw) pair. The log-determinant is 0: no reduction, one launch per call.
// Not yet measured on a GPU.
#pragma once

#include "coupling_layout.cuh"
#include "coupling_math.h"
#include "cuda_common.cuh"

namespace flowkernels {
namespace kernels {

template <typename HT>
struct AdditiveApplyParams {
  FlowView<const float> in;  // x (forward) or y (inverse)
  FlowView<const HT> h;      // (B, C - passive, H, W) shifts
  FlowView<float> out;
  int64_t pixels;
  int channels;
  int passive;
};

template <typename HT>
struct AdditiveBwdParams {
  FlowView<const float> out;
  FlowView<const HT> h;
  FlowView<const float> grad_out;
  FlowView<float> inp;
  FlowView<float> grad_inp;
  FlowView<HT> grad_h;
  int64_t pixels;
  int channels;
  int passive;
};

// V consecutive values of a tensor at pixels p0 .. p0 + V - 1: one 4-element vector access for
// V = 4, else a scalar.
template <int V, typename T>
__device__ __forceinline__ void load_v(const T* src, float (&v)[V]) {
  if constexpr (V == 4) {
    load4(src, v);
  } else {
    v[0] = to_float(*src);
  }
}

template <int V, typename T>
__device__ __forceinline__ void store_v(T* dst, const float (&v)[V]) {
  if constexpr (V == 4) {
    store4(dst, v);
  } else {
    *dst = from_float<T>(v[0]);
  }
}

// grid (ceil(P / (kCouplingThreads * V)), C, B).
template <typename HT, bool kInverse, bool kVec>
__global__ void __launch_bounds__(kCouplingThreads) additive_apply_planar_kernel(const AdditiveApplyParams<HT> prm) {
  constexpr int V = kVec ? 4 : 1;
  const int64_t b = blockIdx.z;
  const int c = blockIdx.y;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kCouplingThreads + threadIdx.x) * V;
  if (p0 >= prm.pixels) {  // kVec: P % 4 == 0, so all V pixels are in range
    return;
  }
  float v[V];
  load_v<V>(prm.in.ptr(b, c, p0), v);
  if (c >= prm.passive) {  // uniform over the block
    float t[V];
    load_v<V>(prm.h.ptr(b, c - prm.passive, p0), t);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      v[k] = additive_apply<kInverse>(v[k], t[k]);
    }
  }
  store_v<V>(prm.out.ptr(b, c, p0), v);
}

// grid (ceil(P * C / (kCouplingThreads * 4)), B). Needs in/out dense channels_last, P * C % 4 == 0,
// 16-byte aligned (interleaved_vec_ok); h channel stride 1.
template <typename HT, bool kInverse>
__global__ void __launch_bounds__(kCouplingThreads)
    additive_apply_interleaved_kernel(const AdditiveApplyParams<HT> prm) {
  const int64_t b = blockIdx.y;
  const int64_t e0 = (static_cast<int64_t>(blockIdx.x) * kCouplingThreads + threadIdx.x) * 4;
  if (e0 >= prm.pixels * prm.channels) {
    return;
  }
  float v[4];
  load4(prm.in.sample(b) + e0, v);
  int64_t p = e0 / prm.channels;
  int c = static_cast<int>(e0 - p * prm.channels);
  const HT* h_b = prm.h.sample(b);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (c >= prm.passive) {
      v[k] = additive_apply<kInverse>(v[k], to_float(h_b[p * prm.h.s.p + (c - prm.passive)]));
    }
    if (++c == prm.channels) {
      c = 0;
      ++p;
    }
  }
  store4(prm.out.sample(b) + e0, v);
}

// Backward with recompute, planar mapping (as additive_apply_planar_kernel).
template <typename HT, bool kReverse, bool kVec>
__global__ void __launch_bounds__(kCouplingThreads) additive_bwd_planar_kernel(const AdditiveBwdParams<HT> prm) {
  constexpr int V = kVec ? 4 : 1;
  const int64_t b = blockIdx.z;
  const int c = blockIdx.y;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kCouplingThreads + threadIdx.x) * V;
  if (p0 >= prm.pixels) {
    return;
  }
  float o[V], g[V];
  load_v<V>(prm.out.ptr(b, c, p0), o);
  load_v<V>(prm.grad_out.ptr(b, c, p0), g);
  store_v<V>(prm.grad_inp.ptr(b, c, p0), g);  // dL/dinp = dL/dout on every channel
  if (c >= prm.passive) {
    float t[V], gt[V];
    load_v<V>(prm.h.ptr(b, c - prm.passive, p0), t);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const AdditiveGrads r = additive_backward<kReverse>(o[k], g[k], t[k]);
      o[k] = r.inp;
      gt[k] = r.grad_shift;
    }
    store_v<V>(prm.grad_h.ptr(b, c - prm.passive, p0), gt);
  }
  store_v<V>(prm.inp.ptr(b, c, p0), o);  // passive channels: unchanged
}

// Backward with recompute, interleaved mapping (conditions of additive_apply_interleaved_kernel
// for out, grad_out, inp and grad_inp; h and grad_h channel stride 1).
template <typename HT, bool kReverse>
__global__ void __launch_bounds__(kCouplingThreads) additive_bwd_interleaved_kernel(const AdditiveBwdParams<HT> prm) {
  const int64_t b = blockIdx.y;
  const int64_t e0 = (static_cast<int64_t>(blockIdx.x) * kCouplingThreads + threadIdx.x) * 4;
  if (e0 >= prm.pixels * prm.channels) {
    return;
  }
  float o[4], g[4];
  load4(prm.out.sample(b) + e0, o);
  load4(prm.grad_out.sample(b) + e0, g);
  store4(prm.grad_inp.sample(b) + e0, g);
  const HT* h_b = prm.h.sample(b);
  HT* gh_b = prm.grad_h.sample(b);
  int64_t p = e0 / prm.channels;
  int c = static_cast<int>(e0 - p * prm.channels);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (c >= prm.passive) {
      const int a = c - prm.passive;
      const AdditiveGrads r = additive_backward<kReverse>(o[k], g[k], to_float(h_b[p * prm.h.s.p + a]));
      o[k] = r.inp;
      gh_b[p * prm.grad_h.s.p + a] = from_float<HT>(r.grad_shift);
    }
    if (++c == prm.channels) {
      c = 0;
      ++p;
    }
  }
  store4(prm.inp.sample(b) + e0, o);
}

}  // namespace kernels
}  // namespace flowkernels
