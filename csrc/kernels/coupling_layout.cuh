// Thread mappings of the CUDA coupling kernels (affine_coupling_kernels.cuh,
// additive_coupling_kernels.cuh) and the host-side choice between them (torch-free).
//
// * planar (x NCHW, or any layout as the scalar fallback): grid (ceil(P / (256 * V)), C, B); a
//   block is one channel of one sample, a thread V consecutive pixels. V = 4 (16-byte accesses of
//   the flow state, 4-element accesses of h) when every tensor allows it (planar_vec_ok), else 1
//   with arbitrary (batch, channel, pixel) strides.
// * interleaved (x, y dense channels_last, h channels_last): grid (ceil(P*C / 1024), B); a thread
//   takes 4 consecutive elements of the sample's (P, C) plane (one float4 of x and y, possibly
//   spanning two pixels) and, for each active element, its entries of h (the affine kernels' (shift,
//   raw) pair is one 8-byte access, pair_ok).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "cuda_common.cuh"
#include "flow_layout.h"

namespace flowkernels {
namespace kernels {

constexpr int kCouplingThreads = 256;

// 4 unit-stride pixels per access: float4 of float32 tensors, 4 elements of h.
inline bool planar_vec_ok(const FlowAddress& t, const PixelGeometry& g, int elem_bytes) {
  const PixelStrides& s = t.s;
  return s.p == 1 && g.pixels % 4 == 0 && s.c % 4 == 0 && (s.b % 4 == 0 || g.batch == 1) &&
         aligned(t.data, 4 * elem_bytes);
}

// A float32 tensor whose sample plane is dense channels_last, read 4 elements at a time.
inline bool interleaved_vec_ok(const FlowAddress& t, const PixelGeometry& g) {
  const PixelStrides& s = t.s;
  return s.c == 1 && s.p == g.channels && (g.pixels * g.channels) % 4 == 0 && (s.b % 4 == 0 || g.batch == 1) &&
         aligned(t.data, 16);
}

// h (or grad_h) of the affine ops read as adjacent (shift, raw) pairs.
inline bool pair_ok(const FlowAddress& t, const PixelGeometry& g, int elem_bytes) {
  const PixelStrides& s = t.s;
  return s.c == 1 && s.p % 2 == 0 && (s.b % 2 == 0 || g.batch == 1) && aligned(t.data, 2 * elem_bytes);
}

// Thread mappings of the coupling kernels, fastest first.
enum class CouplingLayout { kInterleaved, kPlanarVec, kPlanar };

// The fastest mapping that every tensor of the call allows: `state` the float32 flow tensors (the
// input, the output and their gradients), `subnet` h and grad_h, of h_bytes per element. The
// interleaved mapping reads the affine ops' h as (shift, raw) pairs and the additive ops' h one
// element at a time, channel-contiguous so that neighbouring threads read neighbouring shifts.
inline CouplingLayout coupling_layout(std::initializer_list<FlowAddress> state,
                                      std::initializer_list<FlowAddress> subnet, const PixelGeometry& g, int h_bytes,
                                      bool h_pairs) {
  bool interleaved = g.channels > 1;
  bool planar_vec = true;
  for (const FlowAddress& t : state) {
    interleaved = interleaved && interleaved_vec_ok(t, g);
    planar_vec = planar_vec && planar_vec_ok(t, g, 4);
  }
  for (const FlowAddress& t : subnet) {
    interleaved = interleaved && (h_pairs ? pair_ok(t, g, h_bytes) : t.s.c == 1);
    planar_vec = planar_vec && planar_vec_ok(t, g, h_bytes);
  }
  if (interleaved) {
    return CouplingLayout::kInterleaved;
  }
  return planar_vec ? CouplingLayout::kPlanarVec : CouplingLayout::kPlanar;
}

inline dim3 coupling_grid(CouplingLayout layout, const PixelGeometry& g) {
  if (layout == CouplingLayout::kInterleaved) {
    return dim3(ceil_div(g.pixels * g.channels, kCouplingThreads * 4), g.batch);
  }
  return dim3(ceil_div(g.pixels, kCouplingThreads * (layout == CouplingLayout::kPlanarVec ? 4 : 1)), g.channels,
              g.batch);
}

// One instantiation of a coupling kernel family: its thread mapping and direction flag (kInverse
// for *_coupling_{fwd,inv}, kReverse for *_coupling_bwd), as compile-time constants.
template <CouplingLayout kLayoutV, bool kDirectionV>
struct CouplingVariant {
  static constexpr bool kDirection = kDirectionV;
  static constexpr bool kInterleaved = kLayoutV == CouplingLayout::kInterleaved;
  static constexpr bool kPlanarVec = kLayoutV == CouplingLayout::kPlanarVec;
};

// Runtime (layout, direction) -> the kernel that `pick` returns for that CouplingVariant: the
// launcher picks the instantiation once (STYLE.md 13).
template <typename Pick>
auto pick_coupling_variant(CouplingLayout layout, bool direction, Pick&& pick) {
  return FK_BOOL_SWITCH(direction, kDirection, [&] {
    if (layout == CouplingLayout::kInterleaved) {
      return pick(CouplingVariant<CouplingLayout::kInterleaved, kDirection>{});
    }
    if (layout == CouplingLayout::kPlanarVec) {
      return pick(CouplingVariant<CouplingLayout::kPlanarVec, kDirection>{});
    }
    return pick(CouplingVariant<CouplingLayout::kPlanar, kDirection>{});
  });
}

}  // namespace kernels
}  // namespace flowkernels
