// Per-element math of the affine and the additive coupling, shared by the C++ CPU and the CUDA
// kernels so that both compute exactly the formulas of reference.affine_coupling_{fwd,inv,bwd} and
// reference.additive_coupling_{fwd,inv,bwd} (same operation order). All arithmetic is float32; h
// (float32 or bfloat16) is converted to float before it gets here.
#pragma once

#include <math.h>

#include "flow_layout.h"

namespace flowkernels {

// s = sigmoid(raw + 2) + eps >= eps; sig is kept for ds/draw = sig * (1 - sig). expf, not a fast
// intrinsic: the forward must match the reference within 1e-5 relative. (The CPU kernels use
// the same formula with the vectorisable vec_exp of cpu_vec.h.)
struct CouplingScale {
  float s;
  float sig;
};

FK_HOST_DEVICE CouplingScale coupling_scale(float raw, float eps) {
  const float sig = 1.0f / (1.0f + expf(-(raw + 2.0f)));
  return CouplingScale{sig + eps, sig};
}

// Forward: y = (x + t) * s (SRFlow, shift first) or x * s + t (Glow).
template <bool kShiftFirst>
FK_HOST_DEVICE float coupling_forward(float x, float t, float s) {
  return kShiftFirst ? (x + t) * s : x * s + t;
}

// Inverse: x = y / s - t or (y - t) / s. Divides by s >= eps: errors in y grow by up to 1 / eps.
template <bool kShiftFirst>
FK_HOST_DEVICE float coupling_inverse(float y, float t, float s) {
  return kShiftFirst ? y / s - t : (y - t) / s;
}

struct CouplingGrads {
  float inp;         // the rebuilt input of the call that produced `out`
  float grad_inp;    // dL/dinp
  float grad_shift;  // dL/dh[:, 2a]
  float grad_raw;    // dL/dh[:, 2a + 1]
};

// Backward with recompute from the output o of the forward (kReverse = false) or of the inverse
// (kReverse = true); g = dL/do, gl = dL/dlogdet of the sample, sc the scale of h's raw entry.
// Formulas: reference.affine_coupling_bwd.
template <bool kShiftFirst, bool kReverse>
FK_HOST_DEVICE CouplingGrads coupling_backward_scaled(float o, float g, float t, CouplingScale sc, float gl) {
  const float s = sc.s;
  CouplingGrads r;
  float g_s;
  if (!kReverse) {
    if (kShiftFirst) {
      r.inp = o / s - t;  // s >= eps
      r.grad_shift = g * s;
      g_s = (g * o + gl) / s;
    } else {
      r.inp = (o - t) / s;  // s >= eps
      r.grad_shift = g;
      g_s = g * r.inp + gl / s;
    }
    r.grad_inp = g * s;
  } else {
    if (kShiftFirst) {
      r.inp = (o + t) * s;
      r.grad_shift = -g;
      g_s = -(g * (o + t) + gl) / s;
    } else {
      r.inp = o * s + t;
      r.grad_shift = -g / s;
      g_s = -(g * o + gl) / s;
    }
    r.grad_inp = g / s;  // s >= eps
  }
  r.grad_raw = g_s * sc.sig * (1.0f - sc.sig);
  return r;
}

template <bool kShiftFirst, bool kReverse>
FK_HOST_DEVICE CouplingGrads coupling_backward(float o, float g, float t, float raw, float gl, float eps) {
  return coupling_backward_scaled<kShiftFirst, kReverse>(o, g, t, coupling_scale(raw, eps), gl);
}

// Additive coupling (NICE, Glow's additive variant): y = x + t, x = y - t; log-det 0.
template <bool kInverse>
FK_HOST_DEVICE float additive_apply(float v, float t) {
  return kInverse ? v - t : v + t;
}

struct AdditiveGrads {
  float inp;         // the rebuilt input of the call that produced `out`
  float grad_shift;  // dL/dh[:, a]; dL/dinp is g itself
};

// Backward with recompute from the output o of the forward (kReverse = false) or of the inverse
// (kReverse = true); g = dL/do. Formulas: reference.additive_coupling_bwd.
template <bool kReverse>
FK_HOST_DEVICE AdditiveGrads additive_backward(float o, float g, float t) {
  return kReverse ? AdditiveGrads{o + t, -g} : AdditiveGrads{o - t, g};
}

}  // namespace flowkernels
