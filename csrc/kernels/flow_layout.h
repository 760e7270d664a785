// Plain layout structs shared by the host glue (CPU and CUDA) and the device kernels.
// No torch here, so that the kernels under csrc/kernels/ are torch-free.
#pragma once

#include <cstdint>

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

struct PixelGeometry {
  int64_t batch;
  int64_t channels;
  int64_t pixels;  // H * W
};

}  // namespace flowkernels
