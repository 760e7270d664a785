// C++ CPU kernels of flowkernels::affine_coupling_{fwd,inv,bwd} (schemas: ops.cpp; math:
// kernels/coupling_math.h, oracle: reference.affine_coupling_{fwd,inv,bwd}).
//
// Work is split into tasks of (sample, block of kPixelBlock pixels), run by at::parallel_for
// (OpenMP; setup.py compiles with -fopenmp, see _C.with_openmp). A task walks the channels of its
// block one row (one channel, n <= kPixelBlock pixels) at a time: rows with unit pixel stride
// (NCHW, float32) are used in place, others (channels_last, bfloat16 h) are gathered into
// thread-local float buffers, and the row math runs in a vectorised loop (`omp simd`, exp / log
// from cpu_vec.h, AVX-512 / AVX2 / baseline code picked at load time). Each task sums its log s (a float
// per row, added into a double) into its own slot; the slots are added per sample in task order
// afterwards, so the log-det does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"
#include "flow_checks.h"
#include "kernels/coupling_math.h"

namespace flowkernels {
namespace {

// Pixels per task: a row buffer is 2 KiB, a channels_last block of 12 channels 24 KiB (L1/L2), and
// a level-1 batch (16 x 6400 pixels) gives ~200 tasks to balance over the threads.
constexpr int64_t kPixelBlock = 512;

struct TaskGrid {
  int64_t blocks_per_sample;
  int64_t count;
  int64_t grain;  // tasks per parallel chunk (task_grain)

  TaskGrid(const PixelGeometry& g)
      : blocks_per_sample((g.pixels + kPixelBlock - 1) / kPixelBlock),
        count(g.batch * blocks_per_sample),
        grain(task_grain(std::min(g.pixels, kPixelBlock) * g.channels)) {}

  int64_t sample(int64_t task) const { return task / blocks_per_sample; }
  int64_t first_pixel(int64_t task) const { return (task % blocks_per_sample) * kPixelBlock; }
};

// n values at `stride` as a float row: the memory itself when it already is one, else `buf`.
template <typename T>
const float* load_row(const T* src, int64_t stride, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) {
      return src;
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    buf[k] = static_cast<float>(src[k * stride]);
  }
  return buf;
}

// Where a kernel writes an output row: the tensor itself when it is a float row, else `buf`
// (then store_row converts and scatters it; float -> bfloat16 rounds to nearest even).
template <typename T>
float* out_row(T* dst, int64_t stride, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) {
      return dst;
    }
  }
  return buf;
}

template <typename T>
void store_row(const float* row, T* dst, int64_t stride, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) {
      return;  // written in place
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    dst[k * stride] = static_cast<T>(row[k]);
  }
}

void copy_row(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t n) {
  if (src_stride == 1 && dst_stride == 1) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    dst[k * dst_stride] = src[k * src_stride];
  }
}

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
FK_CPU_CLONES float apply_row(const float* x, const float* t, const float* raw, float* y, int64_t n, float eps,
                              bool shift_first, bool inverse) {
  if (shift_first) {
    return inverse ? apply_row_impl<true, true>(x, t, raw, y, n, eps) : apply_row_impl<true, false>(x, t, raw, y, n, eps);
  }
  return inverse ? apply_row_impl<false, true>(x, t, raw, y, n, eps) : apply_row_impl<false, false>(x, t, raw, y, n, eps);
}

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

FK_CPU_CLONES void bwd_row(const float* o, const float* g, const float* t, const float* raw, float gl, float eps,
                           BwdRows out, int64_t n, bool shift_first, bool reverse) {
  if (shift_first) {
    reverse ? bwd_row_impl<true, true>(o, g, t, raw, gl, eps, out, n)
            : bwd_row_impl<true, false>(o, g, t, raw, gl, eps, out, n);
  } else {
    reverse ? bwd_row_impl<false, true>(o, g, t, raw, gl, eps, out, n)
            : bwd_row_impl<false, false>(o, g, t, raw, gl, eps, out, n);
  }
}

// ---- tasks ----

template <typename HT>
void coupling_apply(const at::Tensor& in, const at::Tensor& h, at::Tensor& out, at::Tensor& logdet, int64_t passive,
                    bool shift_first, float eps, bool inverse) {
  const PixelGeometry g = geometry(in);
  const PixelStrides is = pixel_strides(in, inverse ? "y" : "x");
  const PixelStrides hs = pixel_strides(h, "h");
  const PixelStrides os = pixel_strides(out, "output");
  const float* in_ptr = in.data_ptr<float>();
  const HT* h_ptr = h.data_ptr<HT>();
  float* out_ptr = out.data_ptr<float>();
  const TaskGrid tasks(g);
  std::vector<double> partial(tasks.count, 0.0);

  at::parallel_for(0, tasks.count, tasks.grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(4 * kPixelBlock);
    float* bx = buf.data();
    float* bt = bx + kPixelBlock;
    float* br = bt + kPixelBlock;
    float* by = br + kPixelBlock;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = tasks.sample(task), p0 = tasks.first_pixel(task);
      const int64_t n = std::min(kPixelBlock, g.pixels - p0);
      double ld = 0.0;
      for (int64_t c = 0; c < g.channels; ++c) {
        const float* src = in_ptr + is.at(b, c, p0);
        float* dst = out_ptr + os.at(b, c, p0);
        if (c < passive) {
          copy_row(src, is.p, dst, os.p, n);
          continue;
        }
        const int64_t a = c - passive;
        const float* x = load_row(src, is.p, n, bx);
        const float* t = load_row(h_ptr + hs.at(b, 2 * a, p0), hs.p, n, bt);
        const float* raw = load_row(h_ptr + hs.at(b, 2 * a + 1, p0), hs.p, n, br);
        float* y = out_row(dst, os.p, by);
        ld += static_cast<double>(apply_row(x, t, raw, y, n, eps, shift_first, inverse));
        store_row(y, dst, os.p, n);
      }
      partial[task] = ld;
    }
  });

  // Fixed-order reduction of the task partials: deterministic for any thread count.
  float* ld_ptr = logdet.data_ptr<float>();
  for (int64_t b = 0; b < g.batch; ++b) {
    double sum = 0.0;
    for (int64_t k = 0; k < tasks.blocks_per_sample; ++k) {
      sum += partial[b * tasks.blocks_per_sample + k];
    }
    ld_ptr[b] += static_cast<float>(inverse ? -sum : sum);
  }
}

template <typename HT>
void coupling_bwd(const at::Tensor& out, const at::Tensor& h, const at::Tensor& grad_out,
                  const at::Tensor& grad_logdet, at::Tensor& inp, at::Tensor& grad_inp, at::Tensor& grad_h,
                  int64_t passive, bool shift_first, float eps, bool reverse) {
  const PixelGeometry g = geometry(out);
  const PixelStrides os = pixel_strides(out, "out");
  const PixelStrides hs = pixel_strides(h, "h");
  const PixelStrides gs = pixel_strides(grad_out, "grad_out");
  const PixelStrides is = pixel_strides(inp, "inp");
  const PixelStrides gis = pixel_strides(grad_inp, "grad_inp");
  const PixelStrides ghs = pixel_strides(grad_h, "grad_h");
  const float* o_ptr = out.data_ptr<float>();
  const HT* h_ptr = h.data_ptr<HT>();
  const float* g_ptr = grad_out.data_ptr<float>();
  const float* gl_ptr = grad_logdet.data_ptr<float>();
  const int64_t gl_stride = grad_logdet.stride(0);
  float* i_ptr = inp.data_ptr<float>();
  float* gi_ptr = grad_inp.data_ptr<float>();
  HT* gh_ptr = grad_h.data_ptr<HT>();
  const TaskGrid tasks(g);

  at::parallel_for(0, tasks.count, tasks.grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(8 * kPixelBlock);
    float* rows[8];
    for (int r = 0; r < 8; ++r) {
      rows[r] = buf.data() + r * kPixelBlock;
    }
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = tasks.sample(task), p0 = tasks.first_pixel(task);
      const int64_t n = std::min(kPixelBlock, g.pixels - p0);
      const float gl = gl_ptr[b * gl_stride];
      for (int64_t c = 0; c < g.channels; ++c) {
        const float* o_src = o_ptr + os.at(b, c, p0);
        const float* g_src = g_ptr + gs.at(b, c, p0);
        float* i_dst = i_ptr + is.at(b, c, p0);
        float* gi_dst = gi_ptr + gis.at(b, c, p0);
        if (c < passive) {
          // Passive channels: unchanged, and only the direct gradient (the subnet path is the caller's).
          copy_row(o_src, os.p, i_dst, is.p, n);
          copy_row(g_src, gs.p, gi_dst, gis.p, n);
          continue;
        }
        const int64_t a = c - passive;
        HT* gt_dst = gh_ptr + ghs.at(b, 2 * a, p0);
        HT* gr_dst = gh_ptr + ghs.at(b, 2 * a + 1, p0);
        const BwdRows res{out_row(i_dst, is.p, rows[4]), out_row(gi_dst, gis.p, rows[5]),
                          out_row(gt_dst, ghs.p, rows[6]), out_row(gr_dst, ghs.p, rows[7])};
        bwd_row(load_row(o_src, os.p, n, rows[0]), load_row(g_src, gs.p, n, rows[1]),
                load_row(h_ptr + hs.at(b, 2 * a, p0), hs.p, n, rows[2]),
                load_row(h_ptr + hs.at(b, 2 * a + 1, p0), hs.p, n, rows[3]), gl, eps, res, n, shift_first, reverse);
        store_row(res.inp, i_dst, is.p, n);
        store_row(res.grad_inp, gi_dst, gis.p, n);
        store_row(res.grad_shift, gt_dst, ghs.p, n);
        store_row(res.grad_raw, gr_dst, ghs.p, n);
      }
    }
  });
}

// Runtime (dtype, flags) -> template instantiation, once per call in the launcher (STYLE.md 13).
template <typename F>
void dispatch_h(const at::Tensor& h, F&& f) {
  if (h.scalar_type() == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    f(float{});
  }
}

at::Tensor coupling_apply_cpu(const at::Tensor& in, const at::Tensor& h, at::Tensor& logdet, int64_t passive,
                              bool shift_first, double eps, bool inverse) {
  const char* name = inverse ? "y" : "x";
  check_coupling_inputs(in, name, h, passive);
  check_device_type(in, name, c10::DeviceType::CPU);
  check_logdet(logdet, in, name);
  pixel_strides(in, name);
  pixel_strides(h, "h");
  at::Tensor out = at::empty_like(in);
  maybe_poison(out);
  if (in.numel() == 0) {
    return out;
  }
  const float e = static_cast<float>(eps);
  dispatch_h(h, [&](auto h_tag) {
    coupling_apply<decltype(h_tag)>(in, h, out, logdet, passive, shift_first, e, inverse);
  });
  return out;
}

at::Tensor affine_coupling_fwd_cpu(const at::Tensor& x, const at::Tensor& h, at::Tensor& logdet, int64_t passive,
                                   bool shift_first, double eps) {
  return coupling_apply_cpu(x, h, logdet, passive, shift_first, eps, /*inverse=*/false);
}

at::Tensor affine_coupling_inv_cpu(const at::Tensor& y, const at::Tensor& h, at::Tensor& logdet, int64_t passive,
                                   bool shift_first, double eps) {
  return coupling_apply_cpu(y, h, logdet, passive, shift_first, eps, /*inverse=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_bwd_cpu(const at::Tensor& out, const at::Tensor& h,
                                                                       const at::Tensor& grad_out,
                                                                       const at::Tensor& grad_logdet, int64_t passive,
                                                                       bool shift_first, double eps, bool reverse) {
  check_coupling_bwd_inputs(out, h, grad_out, grad_logdet, passive);
  check_device_type(out, "out", c10::DeviceType::CPU);
  pixel_strides(out, "out");
  pixel_strides(h, "h");
  pixel_strides(grad_out, "grad_out");
  at::Tensor inp = at::empty_like(out);
  at::Tensor grad_inp = at::empty_like(out);
  at::Tensor grad_h = at::empty_like(h);
  maybe_poison(inp);
  maybe_poison(grad_inp);
  maybe_poison(grad_h);
  if (out.numel() == 0) {
    return {inp, grad_inp, grad_h};
  }
  const float e = static_cast<float>(eps);
  dispatch_h(h, [&](auto h_tag) {
    coupling_bwd<decltype(h_tag)>(out, h, grad_out, grad_logdet, inp, grad_inp, grad_h, passive, shift_first, e,
                                  reverse);
  });
  return {inp, grad_inp, grad_h};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkernels, CPU, m) {
  m.impl("affine_coupling_fwd", &affine_coupling_fwd_cpu);
  m.impl("affine_coupling_inv", &affine_coupling_inv_cpu);
  m.impl("affine_coupling_bwd", &affine_coupling_bwd_cpu);
}

}  // namespace flowkernels
