// Work split of the C++ CPU kernels: tasks of (sample, tile of consecutive pixels), run by
// at::parallel_for (OpenMP; setup.py compiles with -fopenmp, see _C.with_openmp).
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/flow_layout.h"

namespace flowkernels {

// at::parallel_for grain in tasks, so that a parallel chunk holds at least kGrainElements
// elements (ATen's own GRAIN_SIZE). Smaller calls run inline on the calling thread: waking OpenMP
// workers costs more than a tiny op, and far more on a loaded machine.
constexpr int64_t kGrainElements = 32768;

inline int64_t task_grain(int64_t elements_per_task) {
  const int64_t per_task = elements_per_task > 0 ? elements_per_task : 1;
  return (kGrainElements + per_task - 1) / per_task;
}

// Tasks numbered sample-major: task t covers pixels [first_pixel(t), first_pixel(t) + pixels_in(t))
// of sample(t), all channels. The split depends on the shape only, never on the thread count.
struct TaskGrid {
  int64_t tile;  // pixels per task (the last task of a sample may have fewer)
  int64_t pixels;
  int64_t tiles_per_sample;
  int64_t count;
  int64_t grain;  // tasks per parallel chunk (task_grain of one task's elements)

  TaskGrid(const PixelGeometry& g, int64_t tile_size)
      : tile(tile_size),
        pixels(g.pixels),
        tiles_per_sample((g.pixels + tile_size - 1) / tile_size),
        count(g.batch * tiles_per_sample),
        grain(task_grain(std::min(g.pixels, tile_size) * g.channels)) {}

  int64_t sample(int64_t task) const { return task / tiles_per_sample; }
  int64_t first_pixel(int64_t task) const { return (task % tiles_per_sample) * tile; }
  int64_t pixels_in(int64_t task) const { return std::min(tile, pixels - first_pixel(task)); }
};

}  // namespace flowkernels
