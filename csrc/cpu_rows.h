// Row plumbing of the C++ CPU coupling kernels (affine_coupling_cpu.cpp, additive_coupling_cpu.cpp):
// a task (cpu_common.h's TaskGrid: one sample, a block of pixels) walks the channels one row (one
// channel, n <= tile pixels) at a time. Rows with unit pixel stride (NCHW, float32) are used in
// place, others (channels_last, bfloat16 h) are gathered into thread-local float buffers, so that
// the row maths always runs over contiguous floats in a vectorised loop.
#pragma once

#include <ATen/Parallel.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace flowkernels {

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

inline void copy_row(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t n) {
  if (src_stride == 1 && dst_stride == 1) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    dst[k * dst_stride] = src[k * src_stride];
  }
}

// The rows of one task as the row callback sees them: sample b, pixels [p0, p0 + n), and kRows
// thread-local float buffers of tasks.tile floats each.
template <int kRows>
struct TaskRows {
  int64_t task;
  int64_t b;
  int64_t p0;
  int64_t n;
  std::array<float*, kRows> buf;
};

// Runs row(rows, c) for every channel c of every task of `tasks`, the tasks in parallel
// (at::parallel_for); one task is always run by one thread, channel after channel.
template <int kRows, typename Row>
void parallel_rows(const TaskGrid& tasks, int64_t channels, Row&& row) {
  at::parallel_for(0, tasks.count, tasks.grain, [&](int64_t begin, int64_t end) {
    std::vector<float> storage(kRows * tasks.tile);
    TaskRows<kRows> rows{};
    for (int r = 0; r < kRows; ++r) {
      rows.buf[r] = storage.data() + r * tasks.tile;
    }
    for (int64_t task = begin; task < end; ++task) {
      rows.task = task;
      rows.b = tasks.sample(task);
      rows.p0 = tasks.first_pixel(task);
      rows.n = tasks.pixels_in(task);
      for (int64_t c = 0; c < channels; ++c) {
        row(rows, c);
      }
    }
  });
}

}  // namespace flowkernels
