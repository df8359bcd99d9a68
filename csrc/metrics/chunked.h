// The CPU update's chunking over at::parallel_for, shared by the multiclass and elementwise
// kernels (update_cpu.cpp, elementwise_cpu.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "metrics/layout.h"
#include "metrics/update.h"

namespace stepscope::metrics {

// Runs body(acc, begin, end) over [0, work): in one piece straight into the state for small
// inputs, else in chunks with private O(C) accumulators merged in a fixed order (so results do
// not depend on thread timing). body logs confusion-matrix cells into its `cells` vector.
template <typename Body>
inline void run_chunked(int64_t work, int64_t cost_per_item, const Layout& lay, double* state, Body body) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, cost_per_item));
  int64_t chunks = std::min<int64_t>(at::get_num_threads(), (work + grain - 1) / grain);
  // Private copies must be cheap next to the work itself.
  if (chunks > 1 && work * cost_per_item < 8 * lay.dense * chunks) chunks = 1;
  if (chunks <= 1 || at::in_parallel_region()) {
    std::vector<int64_t> cells;
    body(state, 0, work, cells);
    for (int64_t c : cells) state[lay.confmat + c] += 1.0;
    return;
  }
  std::vector<std::vector<double>> acc(chunks, std::vector<double>(lay.dense, 0.0));
  std::vector<std::vector<int64_t>> cells(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) body(acc[c].data(), work * c / chunks, work * (c + 1) / chunks, cells[c]);
  });
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t i = 0; i < lay.dense; ++i) state[i] += acc[c][i];
    for (int64_t cell : cells[c]) state[lay.confmat + cell] += 1.0;
  }
}

// Binary and multilabel (elementwise_cpu.cpp).
void elementwise_update_cpu(const UpdateInputs& in, double* state);

}  // namespace stepscope::metrics
