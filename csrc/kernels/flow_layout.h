// Plain layout structs shared by the host glue (CPU and CUDA) and the device kernels.
// No torch here, so that the kernels under csrc/kernels/ are torch-free.
#pragma once

#include <cstdint>
#include <type_traits>

// Small shared helpers are always inlined: the CPU row loops only vectorise with them inlined.
#if defined(__CUDACC__)
#define FK_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FK_HOST_DEVICE inline __attribute__((always_inline))
#else
#define FK_HOST_DEVICE inline
#endif

namespace flowkernels {

// Element strides of a (B, C, H, W) tensor read as (B, C, P) with P = H*W pixels: element
// (b, c, p) sits at b * b + c * c + p * p. Dense NCHW has p == 1, dense channels_last c == 1.
struct PixelStrides {
  int64_t b;
  int64_t c;
  int64_t p;

  FK_HOST_DEVICE int64_t at(int64_t bi, int64_t ci, int64_t pi) const { return bi * b + ci * c + pi * p; }
};

// The address and pixel strides of one tensor, whatever its element type: what the host-side
// layout tests of the CUDA launchers look at. Every FlowView converts to it.
struct FlowAddress {
  const void* data;
  PixelStrides s;
};

// A (B, C, H, W) tensor read as (B, C, P) through its pixel strides; T is const for inputs.
// Kernel parameter structs hold one per tensor, so a tensor's pointer and strides travel together.
template <typename T>
struct FlowView {
  T* data;
  PixelStrides s;

  FK_HOST_DEVICE T* ptr(int64_t b, int64_t c, int64_t p) const { return data + s.at(b, c, p); }
  FK_HOST_DEVICE T* sample(int64_t b) const { return data + b * s.b; }
  operator FlowAddress() const { return FlowAddress{data, s}; }

  // An output view passes where an input view is expected, as T* converts to const T* (the
  // backward's rebuilt input is written by one kernel and read by the next).
  // (SFINAE, not a C++20 requires-clause: torch 2.11's extension build compiles as C++17)
  template <typename U, typename = std::enable_if_t<std::is_same_v<U, const T> && !std::is_const_v<T>>>
  operator FlowView<U>() const {
    return FlowView<U>{data, s};
  }
};

struct PixelGeometry {
  int64_t batch;
  int64_t channels;
  int64_t pixels;  // H * W
};

}  // namespace flowkernels
