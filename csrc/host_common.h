// Host-side helpers shared by the CPU (*_cpu.cpp) and CUDA (*_cuda.cu) entry points: input checks,
// checked tensor views, poisoned outputs, the subnet-output dtype switch and the CUDA grid limits.
// The per-op prologues built from them are in channel_affine_host.h and coupling_host.h.
// Every check names the argument, what was expected and what arrived (STYLE.md 7): a wrong dtype
// raises TypeError (TORCH_CHECK_TYPE), any other bad input ValueError (TORCH_CHECK_VALUE).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

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

// The view a kernel reads t through, after its dtype has been checked (T is float or h's element
// type, const for inputs); refuses strides whose pixels do not collapse (pixel_strides).
template <typename T>
FlowView<T> flow_view(const at::Tensor& t, const char* name) {
  TORCH_INTERNAL_ASSERT(t.element_size() == static_cast<int64_t>(sizeof(T)), name, ": a view of ", sizeof(T),
                        "-byte elements of a ", t.scalar_type(), " tensor");
  return FlowView<T>{static_cast<T*>(t.data_ptr()), pixel_strides(t, name)};
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

// The kernel registered for one device type only ever sees tensors of it through the dispatcher;
// this guards direct calls of the entry points.
inline void check_device_type(const at::Tensor& t, const char* name, c10::DeviceType type) {
  TORCH_CHECK_VALUE(t.device().type() == type, name, ": expected a ", c10::DeviceTypeName(type, /*lower_case=*/true),
              " tensor, got one on ", t.device());
}

inline PixelGeometry geometry(const at::Tensor& x) {
  return PixelGeometry{x.size(0), x.size(1), x.size(2) * x.size(3)};
}

// The largest input the launch grids of one CUDA op cover (grid dimensions y and z take at most
// 65535 blocks, x at most 2^31 - 1); each op sets the bounds its grids need.
struct GridLimits {
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  int64_t samples = kNone;
  int64_t channels = kNone;
  int64_t pixels = kNone;    // per sample
  int64_t elements = kNone;  // channels x pixels of one sample
};

// What an entry point runs on: the device type its tensors must have and, for CUDA, the grid
// limits of its kernels. The prologues check both before they allocate any output.
struct KernelTarget {
  c10::DeviceType device;
  std::optional<GridLimits> grid;
};

inline constexpr KernelTarget kCpuTarget{c10::DeviceType::CPU, std::nullopt};

// The input's geometry against the target's grid limits, if it has any.
inline void check_grid(const PixelGeometry& g, const char* name, const KernelTarget& target) {
  if (!target.grid) {
    return;
  }
  const GridLimits& limits = *target.grid;
  TORCH_CHECK_VALUE(g.batch <= limits.samples, name, ": the CUDA kernels take at most ", limits.samples,
                    " samples, got ", g.batch);
  TORCH_CHECK_VALUE(g.channels <= limits.channels, name, ": the CUDA kernels take at most ", limits.channels,
                    " channels, got ", g.channels);
  TORCH_CHECK_VALUE(g.pixels <= limits.pixels, name, ": the CUDA kernels take at most ", limits.pixels,
                    " pixels per sample, got ", g.pixels);
  TORCH_CHECK_VALUE(g.channels * g.pixels <= limits.elements, name, ": the CUDA kernels take at most ",
                    limits.elements, " elements per sample, got ", g.channels, " channels x ", g.pixels, " pixels");
}

// tests/conftest.py sets FLOWKERNELS_POISON_OUTPUTS=1: every output is filled with NaN before its
// kernel runs, so elements a kernel forgets to write show up. The variable is read at every call
// (one getenv, negligible next to a kernel), so a test can switch it at any time.
inline bool poison_outputs() {
  const char* value = std::getenv("FLOWKERNELS_POISON_OUTPUTS");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

// A freshly allocated output, NaN-poisoned when the tests ask for it.
inline at::Tensor new_output(at::Tensor t) {
  if (poison_outputs()) {
    t.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  return t;
}

// An output tensor of the flow shape and the view its kernel writes it through.
template <typename T>
struct FlowOutput {
  at::Tensor tensor;
  FlowView<T> view;
};

// Shaped like `like`, whose memory format empty_like keeps.
template <typename T>
FlowOutput<T> new_output_like(const at::Tensor& like, const char* name) {
  at::Tensor t = new_output(at::empty_like(like));
  return FlowOutput<T>{t, flow_view<T>(t, name)};
}

// Runtime dtype of the subnet output h -> its element type, once per call in the entry point
// (STYLE.md 13): Bf16 is the backend's bfloat16 type (c10::BFloat16 or __nv_bfloat16). f checks
// h's dtype first, so a dtype other than bfloat16 or float32 takes the float branch and fails there.
template <typename Bf16, typename F>
decltype(auto) dispatch_h(const at::Tensor& h, F&& f) {
  if (h.scalar_type() == at::kBFloat16) {
    return f(Bf16{});
  }
  return f(float{});
}

}  // namespace flowkernels
