// The update op's shared front end: argument checks and canonical views, used by the CPU,
// CUDA and Meta implementations alike so that all three accept and refuse the same calls.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "metrics/layout.h"

namespace stepscope::metrics {

// One update's inputs after every check passed, reshaped (as views where the strides allow)
// to the two forms the kernels know:
//   multiclass            preds [N, C, D]  target [N, D]
//   binary / multilabel   preds [N, L, D]  target [N, L, D]   (binary: L = 1)
// D is the product of the extra dims (1 without them); each extra position is a sample.
struct UpdateInputs {
  Config cfg;
  Layout lay;
  at::Tensor preds;
  at::Tensor target;
  int64_t n = 0;
  int64_t c = 0;
  int64_t d = 1;
  bool empty() const { return n == 0 || d == 0; }
};

UpdateInputs prepare_update(const at::Tensor& preds, const at::Tensor& target, const at::Tensor& state,
                            int64_t task, int64_t num_classes, c10::IntArrayRef top_k,
                            std::optional<int64_t> ignore_index, double threshold, int64_t input_kind,
                            bool confusion_matrix);

// Target dtypes the kernels read directly; others are converted to int32 first (one extra op).
bool is_kernel_target_dtype(at::ScalarType t);

// Per-device bodies, called by the registered impls after prepare_update.
void update_cpu(const UpdateInputs& in, const at::Tensor& state);
#if defined(STEPSCOPE_WITH_CUDA)
void update_cuda(const UpdateInputs& in, const at::Tensor& state);
#endif

// The op's entry for a device: the one place its signature (the schema in ops.cpp) is spelled
// for a registration. Every check runs in prepare_update, before the body touches anything.
using UpdateBody = void (*)(const UpdateInputs&, const at::Tensor&);
template <UpdateBody Body>
void update_entry(const at::Tensor& preds, const at::Tensor& target, const at::Tensor& state, int64_t task,
                  int64_t num_classes, c10::IntArrayRef top_k, std::optional<int64_t> ignore_index, double threshold,
                  int64_t input_kind, bool confusion_matrix) {
  const UpdateInputs in = prepare_update(preds, target, state, task, num_classes, top_k, ignore_index, threshold,
                                         input_kind, confusion_matrix);
  if (!in.empty()) Body(in, state);
}

}  // namespace stepscope::metrics
