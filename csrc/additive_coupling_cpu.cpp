// C++ CPU kernels of flowkernels::additive_coupling_{fwd,inv,bwd} (schemas: ops.cpp; math:
// kernels/coupling_math.h, oracle: reference.additive_coupling_{fwd,inv,bwd}).
//
// The work split and row plumbing of the affine coupling (cpu_rows.h: tasks of one sample and a
// block of kPixelBlock pixels, channel rows gathered into float buffers where needed), with a
// vectorised add / subtract per row (AVX-512 / AVX2 / baseline variants picked per call). The
// log-determinant is 0: nothing is reduced.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <tuple>

#include "coupling_host.h"
#include "cpu_rows.h"
#include "cpu_vec.h"
#include "kernels/coupling_math.h"

namespace flowkernels {
namespace {

// Pixels per task, as the affine kernels (affine_coupling_cpu.cpp): 2 KiB rows, ~200 tasks at level 1.
constexpr int64_t kPixelBlock = 512;

// ---- row kernels: contiguous float rows of n elements, vectorised ----

template <bool kInverse>
FK_ALWAYS_INLINE void shift_row_impl(const float* x, const float* t, float* y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    y[k] = additive_apply<kInverse>(x[k], t[k]);
  }
}

// y = x + t (x - t for the inverse).
FK_ALWAYS_INLINE void shift_row_body(const float* x, const float* t, float* y, int64_t n, bool inverse) {
  inverse ? shift_row_impl<true>(x, t, y, n) : shift_row_impl<false>(x, t, y, n);
}

FK_CPU_VARIANTS(void, shift_row, (const float* x, const float* t, float* y, int64_t n, bool inverse),
                (x, t, y, n, inverse))

template <bool kReverse>
FK_ALWAYS_INLINE void unshift_row_impl(const float* o, const float* g, const float* t, float* inp, float* grad_t,
                                       int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const AdditiveGrads r = additive_backward<kReverse>(o[k], g[k], t[k]);
    inp[k] = r.inp;
    grad_t[k] = r.grad_shift;
  }
}

// The rebuilt input and dL/dt of one row (dL/dinp is g itself).
FK_ALWAYS_INLINE void unshift_row_body(const float* o, const float* g, const float* t, float* inp, float* grad_t,
                                       int64_t n, bool reverse) {
  reverse ? unshift_row_impl<true>(o, g, t, inp, grad_t, n) : unshift_row_impl<false>(o, g, t, inp, grad_t, n);
}

FK_CPU_VARIANTS(void, unshift_row,
                (const float* o, const float* g, const float* t, float* inp, float* grad_t, int64_t n, bool reverse),
                (o, g, t, inp, grad_t, n, reverse))

// ---- tasks ----

template <typename HT>
void additive_apply_rows(const CouplingApplyIO<HT>& io, int64_t passive, bool inverse) {
  const FlowView<const float>& in = io.in;
  const FlowView<const HT>& h = io.h;
  const FlowView<float>& out = io.out.view;
  parallel_rows<3>(TaskGrid(io.g, kPixelBlock), io.g.channels, [&](const TaskRows<3>& r, int64_t c) {
    const float* src = in.ptr(r.b, c, r.p0);
    float* dst = out.ptr(r.b, c, r.p0);
    if (c < passive) {
      copy_row(src, in.s.p, dst, out.s.p, r.n);
      return;
    }
    float* y = out_row(dst, out.s.p, r.buf[2]);
    shift_row(load_row(src, in.s.p, r.n, r.buf[0]), load_row(h.ptr(r.b, c - passive, r.p0), h.s.p, r.n, r.buf[1]),
              y, r.n, inverse);
    store_row(y, dst, out.s.p, r.n);
  });
}

template <typename HT>
void additive_bwd_rows(const CouplingBwdIO<HT>& io, int64_t passive, bool reverse) {
  const FlowView<const float>& out = io.out;
  const FlowView<const HT>& h = io.h;
  const FlowView<const float>& grad_out = io.grad_out;
  const FlowView<float>& inp = io.inp.view;
  const FlowView<float>& grad_inp = io.grad_inp.view;
  const FlowView<HT>& grad_h = io.grad_h.view;
  parallel_rows<5>(TaskGrid(io.g, kPixelBlock), io.g.channels, [&](const TaskRows<5>& r, int64_t c) {
    const float* o_src = out.ptr(r.b, c, r.p0);
    const float* g_src = grad_out.ptr(r.b, c, r.p0);
    float* i_dst = inp.ptr(r.b, c, r.p0);
    // dL/dinp = dL/dout on every channel (the subnet path of the passive ones is the caller's).
    copy_row(g_src, grad_out.s.p, grad_inp.ptr(r.b, c, r.p0), grad_inp.s.p, r.n);
    if (c < passive) {
      copy_row(o_src, out.s.p, i_dst, inp.s.p, r.n);
      return;
    }
    HT* gt_dst = grad_h.ptr(r.b, c - passive, r.p0);
    float* i_row = out_row(i_dst, inp.s.p, r.buf[3]);
    float* gt_row = out_row(gt_dst, grad_h.s.p, r.buf[4]);
    unshift_row(load_row(o_src, out.s.p, r.n, r.buf[0]), load_row(g_src, grad_out.s.p, r.n, r.buf[1]),
                load_row(h.ptr(r.b, c - passive, r.p0), h.s.p, r.n, r.buf[2]), i_row, gt_row, r.n, reverse);
    store_row(i_row, i_dst, inp.s.p, r.n);
    store_row(gt_row, gt_dst, grad_h.s.p, r.n);
  });
}

// additive_coupling_fwd (kInverse false, in = x) and additive_coupling_inv (kInverse true, in = y).
template <bool kInverse>
at::Tensor additive_coupling_apply_cpu(const at::Tensor& in, const at::Tensor& h, int64_t passive) {
  return dispatch_h<c10::BFloat16>(h, [&](auto h_tag) {
    using HT = decltype(h_tag);
    const CouplingApplyIO<HT> io = coupling_apply_prologue<HT>(CouplingKind::kAdditive, in, kInverse ? "y" : "x", h,
                                                               /*logdet=*/nullptr, passive, kCpuTarget);
    if (in.numel() > 0) {
      additive_apply_rows(io, passive, kInverse);
    }
    return io.out.tensor;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> additive_coupling_bwd_cpu(const at::Tensor& out, const at::Tensor& h,
                                                                         const at::Tensor& grad_out, int64_t passive,
                                                                         bool reverse) {
  return dispatch_h<c10::BFloat16>(h, [&](auto h_tag) {
    using HT = decltype(h_tag);
    const CouplingBwdIO<HT> io = coupling_bwd_prologue<HT>(CouplingKind::kAdditive, out, h, grad_out,
                                                           /*grad_logdet=*/nullptr, passive, kCpuTarget);
    if (out.numel() > 0) {
      additive_bwd_rows(io, passive, reverse);
    }
    return io.results();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkernels, CPU, m) {
  m.impl("additive_coupling_fwd", &additive_coupling_apply_cpu</*kInverse=*/false>);
  m.impl("additive_coupling_inv", &additive_coupling_apply_cpu</*kInverse=*/true>);
  m.impl("additive_coupling_bwd", &additive_coupling_bwd_cpu);
}

}  // namespace flowkernels
