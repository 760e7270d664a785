// Host prologues of flowkernels::channel_affine_{fwd,bwd}, the per-pixel channel affine map
// out = matrix @ inp + offset (oracle: reference.channel_affine{,_bwd}), shared by the CPU and CUDA
// entry points (channel_affine_cpu.cpp, channel_affine_cuda.cu): the input checks, the views of the
// inputs and the freshly allocated (poisoned) outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "host_common.h"

namespace flowkernels {

// Inputs of out = matrix @ x + offset (channel_affine_fwd, and the inverse map of channel_affine_bwd):
// x a 4-D float32 flow state, matrix (C, C), offset (C,), float32.
inline void check_channel_affine_inputs(const at::Tensor& x, const char* x_name, const at::Tensor& matrix,
                                        const char* m_name, const at::Tensor& offset, const char* off_name) {
  check_flow_state(x, x_name);
  const int64_t c = x.size(1);
  check_param(matrix, m_name, {c, c}, x, x_name);
  check_param(offset, off_name, {c}, x, x_name);
}

// Inputs of channel_affine_bwd: out, grad_out (same shape), the forward matrix and the inverse map
// (matrix_inv, inv_offset).
inline void check_channel_affine_bwd_inputs(const at::Tensor& out, const at::Tensor& grad_out,
                                            const at::Tensor& matrix, const at::Tensor& matrix_inv,
                                            const at::Tensor& inv_offset) {
  check_channel_affine_inputs(out, "out", matrix_inv, "matrix_inv", inv_offset, "inv_offset");
  const int64_t c = out.size(1);
  check_param(matrix, "matrix", {c, c}, out, "out");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == at::kFloat, "grad_out: expected dtype float32, got ", grad_out.scalar_type());
  check_same_shape(grad_out, "grad_out", out, "out");
  check_same_device(grad_out, "grad_out", out, "out");
}

inline void check_logdet_term(const at::Tensor& term, const at::Tensor& x) {
  TORCH_CHECK_VALUE(term.numel() == 1 && term.scalar_type() == at::kFloat,
              "logdet_term: expected a one-element float32 tensor, got ", term.scalar_type(), " of shape ",
              term.sizes());
  check_same_device(term, "logdet_term", x, "x");
}

// channel_affine_fwd: y = matrix @ x + offset.
struct ChannelAffineIO {
  PixelGeometry g;
  FlowView<const float> x;
  FlowOutput<float> y;
};

inline ChannelAffineIO channel_affine_prologue(const at::Tensor& x, const at::Tensor& matrix, const at::Tensor& offset,
                                               const at::Tensor& logdet_term, const at::Tensor& logdet,
                                               const KernelTarget& target) {
  check_channel_affine_inputs(x, "x", matrix, "matrix", offset, "offset");
  check_device_type(x, "x", target.device);
  check_logdet_term(logdet_term, x);
  check_logdet(logdet, x, "x");
  const FlowView<const float> x_view = flow_view<const float>(x, "x");
  const PixelGeometry g = geometry(x);
  check_grid(g, "x", target);
  return {.g = g, .x = x_view, .y = new_output_like<float>(x, "y")};
}

// channel_affine_bwd: the rebuilt input, its gradient and the parameter gradients.
struct ChannelAffineBwdIO {
  PixelGeometry g;
  FlowView<const float> out;
  FlowView<const float> grad_out;
  FlowOutput<float> inp;
  FlowOutput<float> grad_inp;
  at::Tensor grad_matrix;  // (C, C), contiguous
  at::Tensor grad_offset;  // (C,)

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> results() const {
    return {inp.tensor, grad_inp.tensor, grad_matrix, grad_offset};
  }
};

inline ChannelAffineBwdIO channel_affine_bwd_prologue(const at::Tensor& out, const at::Tensor& grad_out,
                                                      const at::Tensor& matrix, const at::Tensor& matrix_inv,
                                                      const at::Tensor& inv_offset, const KernelTarget& target) {
  check_channel_affine_bwd_inputs(out, grad_out, matrix, matrix_inv, inv_offset);
  const FlowView<const float> out_view = flow_view<const float>(out, "out");
  const FlowView<const float> grad_out_view = flow_view<const float>(grad_out, "grad_out");
  check_device_type(out, "out", target.device);
  const PixelGeometry g = geometry(out);
  check_grid(g, "out", target);
  const int64_t c = g.channels;
  return {.g = g,
          .out = out_view,
          .grad_out = grad_out_view,
          .inp = new_output_like<float>(out, "inp"),
          .grad_inp = new_output_like<float>(out, "grad_inp"),
          .grad_matrix = new_output(at::empty({c, c}, out.options())),
          .grad_offset = new_output(at::empty({c}, out.options()))};
}

}  // namespace flowkernels
