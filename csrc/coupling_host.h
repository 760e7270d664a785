// Host prologues of the coupling ops, flowkernels::affine_coupling_{fwd,inv,bwd} and
// flowkernels::additive_coupling_{fwd,inv,bwd}, shared by their CPU and CUDA entry points
// (*_coupling_cpu.cpp, *_coupling_cuda.cu): the input checks, the views of the inputs and the
// freshly allocated (poisoned) outputs. HT is h's element type, as dispatch_h picks it.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "host_common.h"

namespace flowkernels {

// What the subnet output h carries per active channel: the affine ops' interleaved (shift, raw
// scale) pair, or the additive ops' shift alone.
enum class CouplingKind { kAffine, kAdditive };

constexpr int64_t h_per_channel(CouplingKind kind) { return kind == CouplingKind::kAffine ? 2 : 1; }

// Subnet output h of a coupling: (B, h_per_channel * (C - passive), H, W), float32 or bfloat16.
inline void check_coupling_inputs(CouplingKind kind, const at::Tensor& x, const char* x_name, const at::Tensor& h,
                                  int64_t passive) {
  check_flow_state(x, x_name);
  const int64_t channels = x.size(1);
  TORCH_CHECK_VALUE(passive >= 0 && passive < channels, "passive: expected 0 <= passive < ", channels,
              " (", x_name, "'s channels), got ", passive);
  TORCH_CHECK_VALUE(h.dim() == 4, "h: expected a 4-D (B, C, H, W) tensor, got shape ", h.sizes());
  const int64_t active = channels - passive;
  const int64_t per_channel = h_per_channel(kind);
  TORCH_CHECK_VALUE(h.size(0) == x.size(0) && h.size(1) == per_channel * active && h.size(2) == x.size(2) &&
                  h.size(3) == x.size(3),
              "h: expected shape (", x.size(0), ", ", per_channel * active, ", ", x.size(2), ", ", x.size(3), ") (",
              kind == CouplingKind::kAffine ? "shift and raw scale interleaved" : "one shift each", " for the ",
              active, " active channels of ", x_name, "), got ", h.sizes());
  TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16,
              "h: expected dtype float32 or bfloat16, got ", h.scalar_type());
  check_same_device(h, "h", x, x_name);
}

// grad_logdet of affine_coupling_bwd: (B,) float32 (any stride: it is read only, and the gradient
// of a sum arrives expanded).
inline void check_grad_logdet(const at::Tensor& grad_logdet, const at::Tensor& out) {
  TORCH_CHECK_VALUE(grad_logdet.dim() == 1 && grad_logdet.size(0) == out.size(0), "grad_logdet: expected shape (",
              out.size(0), ",) to match out's batch, got ", grad_logdet.sizes());
  TORCH_CHECK_TYPE(grad_logdet.scalar_type() == at::kFloat, "grad_logdet: expected dtype float32, got ",
              grad_logdet.scalar_type());
  check_same_device(grad_logdet, "grad_logdet", out, "out");
}

// Inputs of a *_coupling_bwd: out as x above, grad_out like out, and for the affine op grad_logdet.
inline void check_coupling_bwd_inputs(CouplingKind kind, const at::Tensor& out, const at::Tensor& h,
                                      const at::Tensor& grad_out, const at::Tensor* grad_logdet, int64_t passive) {
  check_coupling_inputs(kind, out, "out", h, passive);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == at::kFloat, "grad_out: expected dtype float32, got ", grad_out.scalar_type());
  check_same_shape(grad_out, "grad_out", out, "out");
  check_same_device(grad_out, "grad_out", out, "out");
  if (grad_logdet != nullptr) {
    check_grad_logdet(*grad_logdet, out);
  }
}

// *_coupling_fwd (in = x) or _inv (in = y).
template <typename HT>
struct CouplingApplyIO {
  PixelGeometry g;
  FlowView<const float> in;
  FlowView<const HT> h;
  FlowOutput<float> out;
};

// logdet: the affine ops' in-place log-det buffer, nullptr for the additive ops (which have none).
template <typename HT>
CouplingApplyIO<HT> coupling_apply_prologue(CouplingKind kind, const at::Tensor& in, const char* in_name,
                                            const at::Tensor& h, const at::Tensor* logdet, int64_t passive,
                                            const KernelTarget& target) {
  check_coupling_inputs(kind, in, in_name, h, passive);
  check_device_type(in, in_name, target.device);
  if (logdet != nullptr) {
    check_logdet(*logdet, in, in_name);
  }
  const FlowView<const float> in_view = flow_view<const float>(in, in_name);
  const FlowView<const HT> h_view = flow_view<const HT>(h, "h");
  const PixelGeometry g = geometry(in);
  check_grid(g, in_name, target);
  return {.g = g, .in = in_view, .h = h_view, .out = new_output_like<float>(in, "output")};
}

// *_coupling_bwd: the rebuilt input, its gradient and h's.
template <typename HT>
struct CouplingBwdIO {
  PixelGeometry g;
  FlowView<const float> out;
  FlowView<const HT> h;
  FlowView<const float> grad_out;
  FlowOutput<float> inp;
  FlowOutput<float> grad_inp;
  FlowOutput<HT> grad_h;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> results() const {
    return {inp.tensor, grad_inp.tensor, grad_h.tensor};
  }
};

// grad_logdet: the affine op's, nullptr for the additive op (its log-det is constant).
template <typename HT>
CouplingBwdIO<HT> coupling_bwd_prologue(CouplingKind kind, const at::Tensor& out, const at::Tensor& h,
                                        const at::Tensor& grad_out, const at::Tensor* grad_logdet, int64_t passive,
                                        const KernelTarget& target) {
  check_coupling_bwd_inputs(kind, out, h, grad_out, grad_logdet, passive);
  check_device_type(out, "out", target.device);
  const FlowView<const float> out_view = flow_view<const float>(out, "out");
  const FlowView<const HT> h_view = flow_view<const HT>(h, "h");
  const FlowView<const float> grad_out_view = flow_view<const float>(grad_out, "grad_out");
  const PixelGeometry g = geometry(out);
  check_grid(g, "out", target);
  return {.g = g,
          .out = out_view,
          .h = h_view,
          .grad_out = grad_out_view,
          .inp = new_output_like<float>(out, "inp"),
          .grad_inp = new_output_like<float>(out, "grad_inp"),
          .grad_h = new_output_like<HT>(h, "grad_h")};
}

}  // namespace flowkernels
