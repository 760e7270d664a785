// Runtime selection of the CPU kernels' instruction-set variant (cpu_isa.h).
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>

#include "cpu_vec.h"

namespace flowkernels {
namespace {

const char* const kNames[] = {"baseline", "avx2", "avx512"};

CpuIsa detect() {
#if FK_CPU_VARIANTS_BUILT
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) {
    return CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("x86-64-v3")) {
    return CpuIsa::kAvx2;
  }
#endif
  return CpuIsa::kBaseline;
}

const CpuIsa kBest = detect();
std::atomic<int> current{static_cast<int>(kBest)};

std::vector<std::string> names_up_to(CpuIsa top) {
  return std::vector<std::string>(kNames, kNames + static_cast<int>(top) + 1);
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) {
    out += (out.empty() ? "" : ", ") + n;
  }
  return out;
}

}  // namespace

CpuIsa cpu_isa() { return static_cast<CpuIsa>(current.load(std::memory_order_relaxed)); }

std::vector<std::string> supported_cpu_isas() { return names_up_to(kBest); }

std::vector<std::string> built_cpu_isas() {
  return names_up_to(FK_CPU_VARIANTS_BUILT ? CpuIsa::kAvx512 : CpuIsa::kBaseline);
}

std::string cpu_isa_name() { return kNames[static_cast<int>(cpu_isa())]; }

void set_cpu_isa(const std::string& name) {
  const std::vector<std::string> supported = supported_cpu_isas();
  for (size_t level = 0; level < supported.size(); ++level) {
    if (supported[level] == name) {
      current.store(static_cast<int>(level), std::memory_order_relaxed);
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "cpu_isa: expected one of the variants this CPU supports (", joined(supported), "; built: ",
                    joined(built_cpu_isas()), "), got '", name, "'");
}

}  // namespace flowkernels
