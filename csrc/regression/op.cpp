// The regression update op: its schema and its registrations (CPU kernel, CUDA in ATen ops, Meta
// for torch.compile), each entered through prepare() so that all three refuse the same calls.
#include <torch/library.h>

#include "regression/regression.h"

namespace stepscope::regression {
namespace {

// Under torch.compile's symbolic sizes only what needs no concrete size is checked here; the real
// kernel checks the rest when it runs.
void update_meta(const at::Tensor& preds, const at::Tensor& target, at::Tensor& state, int64_t num_outputs) {
  const bool symbolic = preds.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
                        target.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
                        state.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
  if (!symbolic) (void)prepare(preds, target, state, num_outputs);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stepscope, m) {
  // Accumulates one batch of regression predictions into `state` IN PLACE (float64
  // [num_outputs * 12], regression.h's fields); never synchronises with the host.
  m.def("regression_update(Tensor preds, Tensor target, Tensor(a!) state, int num_outputs) -> ()");
}

TORCH_LIBRARY_IMPL(stepscope, CPU, m) { m.impl("regression_update", &update_cpu); }
TORCH_LIBRARY_IMPL(stepscope, Meta, m) { m.impl("regression_update", &update_meta); }
#if defined(STEPSCOPE_WITH_CUDA)
TORCH_LIBRARY_IMPL(stepscope, CUDA, m) { m.impl("regression_update", &update_aten); }
#endif

}  // namespace stepscope::regression
