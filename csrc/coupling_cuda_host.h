// Host side of the CUDA coupling entry points (affine_coupling_cuda.cu, additive_coupling_cuda.cu):
// the shared prologues (coupling_host.h), the thread mappings (kernels/coupling_layout.cuh) and
// the grid limits they imply.
#pragma once

#include <cstdint>
#include <limits>

#include "coupling_host.h"
#include "kernels/coupling_layout.cuh"

namespace flowkernels {

// Grid dimensions y and z hold channels and samples; x covers a sample's pixels (planar) or its
// C x P elements, 4 per thread (interleaved).
inline constexpr KernelTarget kCouplingCudaTarget{
    c10::DeviceType::CUDA,
    GridLimits{.samples = 65535,
               .channels = 65535,
               .elements = std::numeric_limits<int32_t>::max() * int64_t(kernels::kCouplingThreads)}};

}  // namespace flowkernels
