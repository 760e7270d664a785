// Host-side input checks and output helpers shared by the CPU (*_cpu.cpp) and CUDA (*_cuda.cu)
// entry points. Every check names the argument, what was expected and what arrived (STYLE.md 7):
// a wrong dtype raises TypeError (TORCH_CHECK_TYPE), any other bad input ValueError (TORCH_CHECK_VALUE).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "kernels/flow_layout.h"

namespace flowkernels {

// Element strides (batch, channel, pixel) of a (B, C, H, W) tensor whose H and W collapse into one
// pixel axis p = h * W + w at p * stride_p. That holds for dense NCHW (stride_p = 1) and dense
// channels_last (stride_p = C), for channel slices of them and for expanded (stride 0) inputs
// such as the gradient of a sum; other stride patterns are refused (the dispatch makes them dense).
inline PixelStrides pixel_strides(const at::Tensor& t, const char* name) {
  const int64_t height = t.size(2), width = t.size(3);
  int64_t sp = 1;
  bool collapses = true;
  if (width > 1) {
    sp = t.stride(3);
    collapses = height == 1 || t.stride(2) == width * sp;
  } else if (height > 1) {
    sp = t.stride(2);
  }
  TORCH_CHECK_VALUE(collapses, name,
              ": H and W must collapse into one pixel axis (dense NCHW or channels_last), got shape ",
              t.sizes(), " with strides ", t.strides());
  return PixelStrides{t.stride(0), t.stride(1), sp};
}

inline void check_flow_state(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, ": expected a 4-D (B, C, H, W) tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, ": expected dtype float32 (the flow state), got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

inline void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (", ref_name,
              "'s), got ", t.sizes());
}

// A small float32 parameter tensor of an exact shape on ref's device (read through its strides).
inline void check_param(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                        const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape, " to match ", ref_name, "'s ",
              ref.size(1), " channels, got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t.scalar_type());
  check_same_device(t, name, ref, ref_name);
}

// The in-place (B,) float32 log-det buffer: contiguous, because kernels write logdet[b].
inline void check_logdet(const at::Tensor& logdet, const at::Tensor& x, const char* x_name) {
  TORCH_CHECK_VALUE(logdet.dim() == 1 && logdet.size(0) == x.size(0), "logdet: expected shape (",
              x.size(0), ",) to match ", x_name, "'s batch, got ", logdet.sizes());
  TORCH_CHECK_TYPE(logdet.scalar_type() == at::kFloat, "logdet: expected dtype float32, got ",
              logdet.scalar_type());
  TORCH_CHECK_VALUE(logdet.is_contiguous(), "logdet: expected a contiguous buffer (it is updated in place), got strides ",
              logdet.strides());
  check_same_device(logdet, "logdet", x, x_name);
}

// Subnet output h of an affine coupling: (B, 2*(C - passive), H, W), float32 or bfloat16.
inline void check_coupling_inputs(const at::Tensor& x, const char* x_name, const at::Tensor& h,
                                  int64_t passive) {
  check_flow_state(x, x_name);
  const int64_t channels = x.size(1);
  TORCH_CHECK_VALUE(passive >= 0 && passive < channels, "passive: expected 0 <= passive < ", channels,
              " (", x_name, "'s channels), got ", passive);
  TORCH_CHECK_VALUE(h.dim() == 4, "h: expected a 4-D (B, C, H, W) tensor, got shape ", h.sizes());
  const int64_t active = channels - passive;
  TORCH_CHECK_VALUE(h.size(0) == x.size(0) && h.size(1) == 2 * active && h.size(2) == x.size(2) &&
                  h.size(3) == x.size(3),
              "h: expected shape (", x.size(0), ", ", 2 * active, ", ", x.size(2), ", ", x.size(3),
              ") (shift and raw scale interleaved for the ", active, " active channels of ", x_name,
              "), got ", h.sizes());
  TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16,
              "h: expected dtype float32 or bfloat16, got ", h.scalar_type());
  check_same_device(h, "h", x, x_name);
}

// Inputs of affine_coupling_bwd: out as x above, grad_out like out, grad_logdet (B,) float32
// (any stride: it is read only, and the gradient of a sum arrives expanded).
inline void check_coupling_bwd_inputs(const at::Tensor& out, const at::Tensor& h, const at::Tensor& grad_out,
                                      const at::Tensor& grad_logdet, int64_t passive) {
  check_coupling_inputs(out, "out", h, passive);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == at::kFloat, "grad_out: expected dtype float32, got ", grad_out.scalar_type());
  check_same_shape(grad_out, "grad_out", out, "out");
  check_same_device(grad_out, "grad_out", out, "out");
  TORCH_CHECK_VALUE(grad_logdet.dim() == 1 && grad_logdet.size(0) == out.size(0), "grad_logdet: expected shape (",
              out.size(0), ",) to match out's batch, got ", grad_logdet.sizes());
  TORCH_CHECK_TYPE(grad_logdet.scalar_type() == at::kFloat, "grad_logdet: expected dtype float32, got ",
              grad_logdet.scalar_type());
  check_same_device(grad_logdet, "grad_logdet", out, "out");
}

// Inputs of the channel map out = matrix @ x + offset (actnorm_conv_fwd, and the inverse map of
// actnorm_conv_bwd): x a 4-D float32 flow state, matrix (C, C), offset (C,), float32.
inline void check_map_inputs(const at::Tensor& x, const char* x_name, const at::Tensor& matrix, const char* m_name,
                             const at::Tensor& offset, const char* off_name) {
  check_flow_state(x, x_name);
  const int64_t c = x.size(1);
  check_param(matrix, m_name, {c, c}, x, x_name);
  check_param(offset, off_name, {c}, x, x_name);
}

// Inputs of actnorm_conv_bwd: out, grad_out (same shape, both with collapsible pixels), the
// forward matrix and the inverse map (matrix_inv, inv_offset).
inline void check_map_bwd_inputs(const at::Tensor& out, const at::Tensor& grad_out, const at::Tensor& matrix,
                                 const at::Tensor& matrix_inv, const at::Tensor& inv_offset) {
  check_map_inputs(out, "out", matrix_inv, "matrix_inv", inv_offset, "inv_offset");
  const int64_t c = out.size(1);
  check_param(matrix, "matrix", {c, c}, out, "out");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == at::kFloat, "grad_out: expected dtype float32, got ", grad_out.scalar_type());
  check_same_shape(grad_out, "grad_out", out, "out");
  check_same_device(grad_out, "grad_out", out, "out");
  pixel_strides(out, "out");
  pixel_strides(grad_out, "grad_out");
}

inline void check_logdet_term(const at::Tensor& term, const at::Tensor& x) {
  TORCH_CHECK_VALUE(term.numel() == 1 && term.scalar_type() == at::kFloat,
              "logdet_term: expected a one-element float32 tensor, got ", term.scalar_type(), " of shape ",
              term.sizes());
  check_same_device(term, "logdet_term", x, "x");
}

// The kernel registered for one device type only ever sees tensors of it through the dispatcher;
// this guards direct calls of the entry points.
inline void check_device_type(const at::Tensor& t, const char* name, c10::DeviceType type) {
  TORCH_CHECK_VALUE(t.device().type() == type, name, ": expected a ", c10::DeviceTypeName(type, /*lower_case=*/true),
              " tensor, got one on ", t.device());
}

inline PixelGeometry geometry(const at::Tensor& x) {
  return PixelGeometry{x.size(0), x.size(1), x.size(2) * x.size(3)};
}

// CPU kernels: at::parallel_for grain in tasks, so that a parallel chunk holds at least
// kGrainElements elements (ATen's own GRAIN_SIZE). Smaller calls run inline on the calling
// thread: waking OpenMP workers costs more than a tiny op, and far more on a loaded machine.
constexpr int64_t kGrainElements = 32768;

inline int64_t task_grain(int64_t elements_per_task) {
  const int64_t per_task = elements_per_task > 0 ? elements_per_task : 1;
  return (kGrainElements + per_task - 1) / per_task;
}

// tests/conftest.py sets FLOWKERNELS_POISON_OUTPUTS=1: every output is filled with NaN before its
// kernel runs, so elements a kernel forgets to write show up. The variable is read at every call
// (one getenv, negligible next to a kernel), so a test can switch it at any time.
inline bool poison_outputs() {
  const char* value = std::getenv("FLOWKERNELS_POISON_OUTPUTS");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

inline void maybe_poison(at::Tensor& t) {
  if (poison_outputs()) {
    t.fill_(std::numeric_limits<float>::quiet_NaN());
  }
}

}  // namespace flowkernels
