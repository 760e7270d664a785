// C++ CPU kernels of flowkernels::affine_coupling_{fwd,inv,bwd} (schemas: ops.cpp; math:
// kernels/coupling_math.h, oracle: reference.affine_coupling_{fwd,inv,bwd}).
//
// Work is split into tasks of (sample, block of kPixelBlock pixels), run by at::parallel_for
// (OpenMP; setup.py compiles with -fopenmp, see _C.with_openmp). A task walks the channels of its
// block one row at a time (cpu_rows.h: rows gathered into float buffers where needed), and the
// row math runs in a vectorised loop (`omp simd`, exp / log from cpu_vec.h, AVX-512 / AVX2 /
// baseline variants picked per call). Each task sums its log s (a float per row, added into a
// double) into its own slot; the slots are added per sample in task order afterwards, so the
// log-det does not depend on the thread count.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "coupling_host.h"
#include "cpu_rows.h"
#include "cpu_vec.h"
#include "kernels/coupling_math.h"

namespace flowkernels {
namespace {

// Pixels per task: a row buffer is 2 KiB, a channels_last block of 12 channels 24 KiB (L1/L2), and
// a level-1 batch (16 x 6400 pixels) gives ~200 tasks to balance over the threads.
constexpr int64_t kPixelBlock = 512;

// ---- row kernels: contiguous float rows of n elements, vectorised ----

FK_ALWAYS_INLINE float row_sigmoid(float raw) { return 1.0f / (1.0f + vec_exp(-(raw + 2.0f))); }

template <bool kShiftFirst, bool kInverse>
FK_ALWAYS_INLINE float apply_row_impl(const float* x, const float* t, const float* raw, float* y, int64_t n, float eps) {
  float ld = 0.0f;
#pragma omp simd reduction(+ : ld)
  for (int64_t k = 0; k < n; ++k) {
    const float s = row_sigmoid(raw[k]) + eps;
    y[k] = kInverse ? coupling_inverse<kShiftFirst>(x[k], t[k], s) : coupling_forward<kShiftFirst>(x[k], t[k], s);
    ld += vec_log(s);
  }
  return ld;
}

// y = forward / inverse of x; returns the row's sum of log s (float, <= kPixelBlock terms).
FK_ALWAYS_INLINE float apply_row_body(const float* x, const float* t, const float* raw, float* y, int64_t n,
                                       float eps, bool shift_first, bool inverse) {
  if (shift_first) {
    return inverse ? apply_row_impl<true, true>(x, t, raw, y, n, eps) : apply_row_impl<true, false>(x, t, raw, y, n, eps);
  }
  return inverse ? apply_row_impl<false, true>(x, t, raw, y, n, eps) : apply_row_impl<false, false>(x, t, raw, y, n, eps);
}

FK_CPU_VARIANTS(float, apply_row,
                (const float* x, const float* t, const float* raw, float* y, int64_t n, float eps, bool shift_first,
                 bool inverse),
                (x, t, raw, y, n, eps, shift_first, inverse))

struct BwdRows {
  float* inp;
  float* grad_inp;
  float* grad_shift;
  float* grad_raw;
};

template <bool kShiftFirst, bool kReverse>
FK_ALWAYS_INLINE void bwd_row_impl(const float* o, const float* g, const float* t, const float* raw, float gl, float eps,
                         BwdRows out, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float sig = row_sigmoid(raw[k]);
    const CouplingGrads r = coupling_backward_scaled<kShiftFirst, kReverse>(o[k], g[k], t[k], {sig + eps, sig}, gl);
    out.inp[k] = r.inp;
    out.grad_inp[k] = r.grad_inp;
    out.grad_shift[k] = r.grad_shift;
    out.grad_raw[k] = r.grad_raw;
  }
}

FK_ALWAYS_INLINE void bwd_row_body(const float* o, const float* g, const float* t, const float* raw, float gl,
                                   float eps, BwdRows out, int64_t n, bool shift_first, bool reverse) {
  if (shift_first) {
    reverse ? bwd_row_impl<true, true>(o, g, t, raw, gl, eps, out, n)
            : bwd_row_impl<true, false>(o, g, t, raw, gl, eps, out, n);
  } else {
    reverse ? bwd_row_impl<false, true>(o, g, t, raw, gl, eps, out, n)
            : bwd_row_impl<false, false>(o, g, t, raw, gl, eps, out, n);
  }
}

FK_CPU_VARIANTS(void, bwd_row,
                (const float* o, const float* g, const float* t, const float* raw, float gl, float eps, BwdRows out,
                 int64_t n, bool shift_first, bool reverse),
                (o, g, t, raw, gl, eps, out, n, shift_first, reverse))

// ---- tasks ----

template <typename HT>
void coupling_apply(const CouplingApplyIO<HT>& io, float* logdet, int64_t passive, bool shift_first, float eps,
                    bool inverse) {
  const FlowView<const float>& in = io.in;
  const FlowView<const HT>& h = io.h;
  const FlowView<float>& out = io.out.view;
  const TaskGrid tasks(io.g, kPixelBlock);
  std::vector<double> partial(tasks.count, 0.0);  // one slot per task, written by its one thread

  parallel_rows<4>(tasks, io.g.channels, [&](const TaskRows<4>& r, int64_t c) {
    const float* src = in.ptr(r.b, c, r.p0);
    float* dst = out.ptr(r.b, c, r.p0);
    if (c < passive) {
      copy_row(src, in.s.p, dst, out.s.p, r.n);
      return;
    }
    const int64_t a = c - passive;
    const float* x = load_row(src, in.s.p, r.n, r.buf[0]);
    const float* t = load_row(h.ptr(r.b, 2 * a, r.p0), h.s.p, r.n, r.buf[1]);
    const float* raw = load_row(h.ptr(r.b, 2 * a + 1, r.p0), h.s.p, r.n, r.buf[2]);
    float* y = out_row(dst, out.s.p, r.buf[3]);
    partial[r.task] += static_cast<double>(apply_row(x, t, raw, y, r.n, eps, shift_first, inverse));
    store_row(y, dst, out.s.p, r.n);
  });

  // Fixed-order reduction of the task partials: deterministic for any thread count.
  for (int64_t b = 0; b < io.g.batch; ++b) {
    double sum = 0.0;
    for (int64_t k = 0; k < tasks.tiles_per_sample; ++k) {
      sum += partial[b * tasks.tiles_per_sample + k];
    }
    logdet[b] += static_cast<float>(inverse ? -sum : sum);
  }
}

template <typename HT>
void coupling_bwd(const CouplingBwdIO<HT>& io, const at::Tensor& grad_logdet, int64_t passive, bool shift_first,
                  float eps, bool reverse) {
  const FlowView<const float>& out = io.out;
  const FlowView<const HT>& h = io.h;
  const FlowView<const float>& grad_out = io.grad_out;
  const FlowView<float>& inp = io.inp.view;
  const FlowView<float>& grad_inp = io.grad_inp.view;
  const FlowView<HT>& grad_h = io.grad_h.view;
  const float* gl_ptr = grad_logdet.data_ptr<float>();
  const int64_t gl_stride = grad_logdet.stride(0);

  parallel_rows<8>(TaskGrid(io.g, kPixelBlock), io.g.channels, [&](const TaskRows<8>& r, int64_t c) {
    const float* o_src = out.ptr(r.b, c, r.p0);
    const float* g_src = grad_out.ptr(r.b, c, r.p0);
    float* i_dst = inp.ptr(r.b, c, r.p0);
    float* gi_dst = grad_inp.ptr(r.b, c, r.p0);
    if (c < passive) {
      // Passive channels: unchanged, and only the direct gradient (the subnet path is the caller's).
      copy_row(o_src, out.s.p, i_dst, inp.s.p, r.n);
      copy_row(g_src, grad_out.s.p, gi_dst, grad_inp.s.p, r.n);
      return;
    }
    const int64_t a = c - passive;
    HT* gt_dst = grad_h.ptr(r.b, 2 * a, r.p0);
    HT* gr_dst = grad_h.ptr(r.b, 2 * a + 1, r.p0);
    const BwdRows res{out_row(i_dst, inp.s.p, r.buf[4]), out_row(gi_dst, grad_inp.s.p, r.buf[5]),
                      out_row(gt_dst, grad_h.s.p, r.buf[6]), out_row(gr_dst, grad_h.s.p, r.buf[7])};
    bwd_row(load_row(o_src, out.s.p, r.n, r.buf[0]), load_row(g_src, grad_out.s.p, r.n, r.buf[1]),
            load_row(h.ptr(r.b, 2 * a, r.p0), h.s.p, r.n, r.buf[2]),
            load_row(h.ptr(r.b, 2 * a + 1, r.p0), h.s.p, r.n, r.buf[3]), gl_ptr[r.b * gl_stride], eps, res, r.n,
            shift_first, reverse);
    store_row(res.inp, i_dst, inp.s.p, r.n);
    store_row(res.grad_inp, gi_dst, grad_inp.s.p, r.n);
    store_row(res.grad_shift, gt_dst, grad_h.s.p, r.n);
    store_row(res.grad_raw, gr_dst, grad_h.s.p, r.n);
  });
}

// affine_coupling_fwd (kInverse false, in = x) and affine_coupling_inv (kInverse true, in = y).
template <bool kInverse>
at::Tensor affine_coupling_apply_cpu(const at::Tensor& in, const at::Tensor& h, at::Tensor& logdet, int64_t passive,
                                     bool shift_first, double eps) {
  return dispatch_h<c10::BFloat16>(h, [&](auto h_tag) {
    using HT = decltype(h_tag);
    const char* name = kInverse ? "y" : "x";
    const CouplingApplyIO<HT> io =
        coupling_apply_prologue<HT>(CouplingKind::kAffine, in, name, h, &logdet, passive, kCpuTarget);
    if (in.numel() > 0) {
      coupling_apply(io, logdet.data_ptr<float>(), passive, shift_first, static_cast<float>(eps), kInverse);
    }
    return io.out.tensor;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_bwd_cpu(const at::Tensor& out, const at::Tensor& h,
                                                                       const at::Tensor& grad_out,
                                                                       const at::Tensor& grad_logdet, int64_t passive,
                                                                       bool shift_first, double eps, bool reverse) {
  return dispatch_h<c10::BFloat16>(h, [&](auto h_tag) {
    using HT = decltype(h_tag);
    const CouplingBwdIO<HT> io =
        coupling_bwd_prologue<HT>(CouplingKind::kAffine, out, h, grad_out, &grad_logdet, passive, kCpuTarget);
    if (out.numel() > 0) {
      coupling_bwd(io, grad_logdet, passive, shift_first, static_cast<float>(eps), reverse);
    }
    return io.results();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkernels, CPU, m) {
  m.impl("affine_coupling_fwd", &affine_coupling_apply_cpu</*kInverse=*/false>);
  m.impl("affine_coupling_inv", &affine_coupling_apply_cpu</*kInverse=*/true>);
  m.impl("affine_coupling_bwd", &affine_coupling_bwd_cpu);
}

}  // namespace flowkernels
