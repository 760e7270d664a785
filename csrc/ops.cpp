// Schemas of the flowkernels ops, declared once. Each backend file registers its own
// implementation with TORCH_LIBRARY_IMPL (<op>_cpu.cpp, <op>_cuda.cu for channel_affine,
// affine_coupling and additive_coupling); fake (meta) implementations are registered from
// Python, each op module's beside its wrappers once this extension loads (flowkernels/ops/*.py,
// @on_extension_load). Semantics: the module docstrings of flowkernels/ops/actnorm_conv.py
// (channel_affine, oracle reference.channel_affine), affine_coupling.py and additive_coupling.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu_isa.h"

TORCH_LIBRARY(flowkernels, m) {
  // y[b, :, p] = matrix @ x[b, :, p] + offset; logdet[b] += logdet_term.
  m.def(
      "channel_affine_fwd("
      "Tensor x, "
      "Tensor matrix, "
      "Tensor offset, "
      "Tensor logdet_term, "
      "Tensor(a!) logdet"
      ") -> Tensor");
  // From the output: inp = matrix_inv @ out + inv_offset, grad_inp = matrix^T @ grad_out,
  // grad_matrix = sum grad_out inp^T, grad_offset = sum grad_out.
  m.def(
      "channel_affine_bwd("
      "Tensor out, "
      "Tensor grad_out, "
      "Tensor matrix, "
      "Tensor matrix_inv, "
      "Tensor inv_offset"
      ") -> (Tensor, Tensor, Tensor, Tensor)");
  // y[:, passive:] = (x2 + shift) * s (shift_first) or x2 * s + shift; logdet[b] += sum log s.
  m.def(
      "affine_coupling_fwd("
      "Tensor x, "
      "Tensor h, "
      "Tensor(a!) logdet, "
      "int passive, "
      "bool shift_first, "
      "float eps"
      ") -> Tensor");
  // x2 = y2 / s - shift (shift_first) or (y2 - shift) / s; logdet[b] -= sum log s.
  m.def(
      "affine_coupling_inv("
      "Tensor y, "
      "Tensor h, "
      "Tensor(a!) logdet, "
      "int passive, "
      "bool shift_first, "
      "float eps"
      ") -> Tensor");
  // From the output of the forward (reverse=false) or inverse: (inp, grad_inp, grad_h).
  m.def(
      "affine_coupling_bwd("
      "Tensor out, "
      "Tensor h, "
      "Tensor grad_out, "
      "Tensor grad_logdet, "
      "int passive, "
      "bool shift_first, "
      "float eps, "
      "bool reverse"
      ") -> (Tensor, Tensor, Tensor)");
  // y[:, passive:] = x2 + shift; the log-det is 0 (no buffer: nothing to add).
  m.def(
      "additive_coupling_fwd("
      "Tensor x, "
      "Tensor h, "
      "int passive"
      ") -> Tensor");
  // x2 = y2 - shift.
  m.def(
      "additive_coupling_inv("
      "Tensor y, "
      "Tensor h, "
      "int passive"
      ") -> Tensor");
  // From the output of the forward (reverse=false) or inverse: (inp, grad_inp = grad_out, grad_h).
  m.def(
      "additive_coupling_bwd("
      "Tensor out, "
      "Tensor h, "
      "Tensor grad_out, "
      "int passive, "
      "bool reverse"
      ") -> (Tensor, Tensor, Tensor)");
}

// Importing the module runs the static registrations above; its attributes describe the build.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef FLOWKERNELS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // at::parallel_for is an OpenMP region compiled into the caller: without -fopenmp the CPU
  // kernels would silently run on one thread.
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  // The instruction-set variant of the C++ CPU kernels (cpu_isa.h); Python API: flowkernels.ops.cpu_isa.
  m.def("cpu_isa", &flowkernels::cpu_isa_name, "the variant the C++ CPU kernels run now");
  m.def("supported_cpu_isas", &flowkernels::supported_cpu_isas, "the variants this CPU can run, lowest first");
  m.def("built_cpu_isas", &flowkernels::built_cpu_isas, "the variants compiled into this build, lowest first");
  m.def("set_cpu_isa", &flowkernels::set_cpu_isa, "select a variant by name", pybind11::arg("name"));
}
