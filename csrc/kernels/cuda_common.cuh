// Torch-free CUDA helpers of the flowkernels kernels: dtype conversion, 16-byte vector access,
// deterministic warp/block reductions and the compile-time switches used by the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "flow_layout.h"

// Runtime bool -> constexpr bool NAME inside the lambda body (apex / flash-attention BOOL_SWITCH):
// the launcher picks the template instantiation once instead of branching inside the kernel.
#define FK_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                 \
    if (COND) {                         \
      constexpr bool NAME = true;       \
      return __VA_ARGS__();             \
    } else {                            \
      constexpr bool NAME = false;      \
      return __VA_ARGS__();             \
    }                                   \
  }()

namespace flowkernels {
namespace kernels {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);  // round to nearest even, as tensor.to(torch.bfloat16)
}

// Four consecutive elements: one 16-byte access for float, one 8-byte access for bfloat16.
struct alignas(8) Bf16x4 {
  __nv_bfloat162 lo;
  __nv_bfloat162 hi;
};

__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
}

__device__ __forceinline__ void load4(const __nv_bfloat16* p, float (&v)[4]) {
  const Bf16x4 q = *reinterpret_cast<const Bf16x4*>(p);
  const float2 lo = __bfloat1622float2(q.lo);
  const float2 hi = __bfloat1622float2(q.hi);
  v[0] = lo.x;
  v[1] = lo.y;
  v[2] = hi.x;
  v[3] = hi.y;
}

__device__ __forceinline__ void store4(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

__device__ __forceinline__ void store4(__nv_bfloat16* p, const float (&v)[4]) {
  Bf16x4 q;
  q.lo = __floats2bfloat162_rn(v[0], v[1]);
  q.hi = __floats2bfloat162_rn(v[2], v[3]);
  *reinterpret_cast<Bf16x4*>(p) = q;
}

// Two consecutive elements (8 bytes of float, 4 of bfloat16): the (shift, raw) pair of one
// channel of a channels_last h.
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ void store2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// Butterfly sum: every lane ends with the same total, summed in a fixed order (deterministic).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over a 1-D block of kThreads threads (a multiple of 32); the result is valid in thread 0.
// `scratch` holds kThreads / 32 values. Every thread of the block must call it.
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_sum: kThreads must be a multiple of 32");
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    scratch[warp] = v;
  }
  __syncthreads();
  T total = T(0);
  if (warp == 0) {
    total = lane < kThreads / 32 ? scratch[lane] : T(0);
    total = warp_sum(total);
  }
  return total;
}

inline bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace kernels
}  // namespace flowkernels
