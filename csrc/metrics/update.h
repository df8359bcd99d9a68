// The update op's shared front end: argument checks and canonical views, used by the CPU,
// CUDA and Meta implementations alike so that all three accept and refuse the same calls.
// The registrations that call it are in csrc/metrics/op.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

#include "metrics/layout.h"

namespace stepscope::metrics {

// One update's inputs after every check passed: the call's parsed configuration (cfg, lay) and
// its tensors reshaped (as views where the strides allow) to the two forms the kernels know:
//   multiclass            preds [N, C, D]  target [N, D]
//   binary / multilabel   preds [N, L, D]  target [N, L, D]   (binary: L = 1)
// D is the product of the extra dims (1 without them); each extra position is a sample.
struct UpdateInputs : OpArgs {
  explicit UpdateInputs(OpArgs args) : OpArgs(std::move(args)) {}
  at::Tensor preds;
  at::Tensor target;
  int64_t n = 0;
  int64_t c = 0;
  int64_t d = 1;
  bool empty() const { return n == 0 || d == 0; }
};

// Every check of one call (args were checked when they were parsed), then the canonical views.
UpdateInputs prepare_update(const at::Tensor& preds, const at::Tensor& target, const at::Tensor& state, OpArgs args);

// The dtype and device checks, which need no concrete sizes: all that the Meta impl can check while
// tracing with symbolic sizes (the rest runs again in the real kernel). Part of prepare_update.
void check_update_kinds(const at::Tensor& preds, const at::Tensor& target, const at::Tensor& state);

// Target dtypes the kernels read directly; others are converted to int32 first (one extra op).
bool is_kernel_target_dtype(at::ScalarType t);

// Per-device bodies, called by the registered impls (op.cpp) after prepare_update.
void update_cpu(const UpdateInputs& in, const at::Tensor& state);
#if defined(STEPSCOPE_WITH_CUDA)
void update_cuda(const UpdateInputs& in, const at::Tensor& state);
#endif

}  // namespace stepscope::metrics
