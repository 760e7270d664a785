// Which instruction-set variant the C++ CPU kernels' hot loops run (cpu_vec.h builds each loop
// for every variant). The default is the best variant this CPU supports; set_cpu_isa lowers it,
// so that one machine can run (and test) every variant it supports: an AVX-512 machine the AVX2
// and baseline code of an AVX2-only one. Variants differ in vector width and FMA contraction,
// hence in float rounding, never in what they compute.
#pragma once

#include <string>
#include <vector>

namespace flowkernels {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The variant the kernels run now (an atomic read: cheap enough per row or tile).
CpuIsa cpu_isa();

// Names of the variants, lowest first: "baseline" (the build's target, x86-64), "avx2"
// (x86-64-v3: AVX2 + FMA), "avx512" (x86-64-v4). This CPU's supported ones / all built ones.
std::vector<std::string> supported_cpu_isas();
std::vector<std::string> built_cpu_isas();
std::string cpu_isa_name();

// Select a variant by name; ValueError naming the supported ones if this CPU cannot run it.
void set_cpu_isa(const std::string& name);

}  // namespace flowkernels
