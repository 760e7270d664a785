// Helpers of the C++ CPU kernels: the instruction-set variants of the hot loops and vectorisable
// float32 exp / log.
//
// The extension is compiled for the baseline x86-64 ISA (it must import on any machine), so each
// hot loop is built three times, for the x86-64 ISA levels v4 (AVX-512), v3 (AVX2 + FMA) and the
// baseline (FK_CPU_VARIANTS), and a switch on cpu_isa() picks one per call: the best this CPU
// supports unless flowkernels.ops.set_cpu_isa lowers it (cpu_isa.h). The variants differ in
// vector width and FMA contraction, so the order and rounding of float partial sums differ
// between them (and so between machines); the tests run every variant a machine supports.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_isa.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define FK_CPU_VARIANTS_BUILT 1
#else
#define FK_CPU_VARIANTS_BUILT 0
#endif

// Everything a variant calls must be inlined into it: only then is it compiled for the variant's
// ISA, and only then does `omp simd` vectorise the loop (GCC gives up on calls).
#if defined(__GNUC__)
#define FK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FK_ALWAYS_INLINE inline
#endif

// FK_CPU_VARIANTS(ret, name, (params), (args)) defines `ret name(params)`, which runs
// `name##_body(args)` (an FK_ALWAYS_INLINE function) compiled for the variant cpu_isa() selects.
#if FK_CPU_VARIANTS_BUILT
#define FK_CPU_VARIANTS(ret, name, params, args)                                         \
  __attribute__((target("arch=x86-64-v4"))) ret name##_avx512 params { return name##_body args; } \
  __attribute__((target("arch=x86-64-v3"))) ret name##_avx2 params { return name##_body args; }   \
  ret name##_baseline params { return name##_body args; }                                \
  ret name params {                                                                      \
    switch (cpu_isa()) {                                                                 \
      case CpuIsa::kAvx512:                                                              \
        return name##_avx512 args;                                                       \
      case CpuIsa::kAvx2:                                                                \
        return name##_avx2 args;                                                         \
      default:                                                                           \
        return name##_baseline args;                                                     \
    }                                                                                    \
  }
#else
#define FK_CPU_VARIANTS(ret, name, params, args) \
  ret name params { return name##_body args; }
#endif

namespace flowkernels {

FK_ALWAYS_INLINE float bits_to_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

FK_ALWAYS_INLINE int32_t float_to_bits(float f) {
  int32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// exp(x) for float32, vectorisable (no libm call, no branches): x = n ln2 + r with |r| <= ln2/2
// (ln2 split in two for an exact reduction), exp(r) by the Cephes expf polynomial, 2^n through
// the exponent bits. Within ~1 ulp of expf on [-87.3, 88.3]; x is clamped there (exp(-87.3) =
// 1.2e-38, the smallest normal range; exp(88.3) = 2.2e38), NaN propagates.
FK_ALWAYS_INLINE float vec_exp(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 shifts out the fraction
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float n_finite = n == n ? n : 0.0f;  // NaN: any scale, p is already NaN
  return p * bits_to_float((static_cast<int32_t>(n_finite) + 127) << 23);
}

// log(x) for positive normal float32 x, vectorisable: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) by the Cephes logf polynomial, e ln2 added in two parts. Within ~1 ulp of logf; NaN
// propagates. The couplings only take logs of s = sigmoid(.) + eps in [1e-4, 1 + eps].
FK_ALWAYS_INLINE float vec_log(float x) {
  const int32_t bits = float_to_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  float r = m + y;
  r += e * 0.693359375f;
  return r + (x - x);  // x - x: 0 for finite x, NaN for NaN
}

}  // namespace flowkernels
