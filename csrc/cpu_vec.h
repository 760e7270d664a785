// Helpers of the C++ CPU kernels: runtime ISA selection of the hot loops and vectorisable
// float32 exp / log.
//
// The extension is compiled for the baseline x86-64 ISA (it must import on any machine), so the
// hot loops are built three times with GCC's target_clones, for the x86-64 ISA levels v4
// (AVX-512), v3 (AVX2 + FMA) and the baseline, and the loader picks one per machine through an
// ifunc that tests CPU features. ("arch=haswell" would be chosen by CPU model and so never on
// AMD.) Within one machine results are fixed; across machines the vector width, and so the order
// of float partial sums, can differ.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FK_CPU_CLONES
#endif

// Everything a cloned loop calls must be inlined into it: only then is it compiled for the
// clone's ISA, and only then does `omp simd` vectorise the loop (GCC gives up on calls).
#if defined(__GNUC__)
#define FK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FK_ALWAYS_INLINE inline
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
