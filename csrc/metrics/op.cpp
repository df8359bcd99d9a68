// The update op in one place: its schema and every implementation's registration (CPU, CUDA,
// Meta). The bodies live with their device (update_cpu.cpp; cuda/metrics_update.cu, whose
// update_cuda is registered here so that the argument checks, and the exceptions they throw,
// never pass through a CUDA translation unit); every one of them is entered through
// prepare_update (update_checks.cpp), so all three accept and refuse the same calls.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <utility>

#include "metrics/binned.h"
#include "metrics/update.h"

namespace stepscope::metrics {
namespace {

// One call's arguments, taken off the dispatcher's stack (the op returns nothing): the tensors,
// then the configuration, parsed once (OpArgs::parse) for the whole call.
struct Call {
  at::Tensor preds, target, state;
  OpArgs args;
};

Call pop_call(c10::Stack& stack) {
  const size_t base = stack.size() - OpArgs::kFirst - OpArgs::kCount;
  Call c{stack[base].toTensor(), stack[base + 1].toTensor(), stack[base + 2].toTensor(),
         OpArgs::parse(stack, base + OpArgs::kFirst)};
  torch::jit::drop(stack, OpArgs::kFirst + OpArgs::kCount);
  return c;
}

using UpdateBody = void (*)(const UpdateInputs&, const at::Tensor&);

template <UpdateBody Body>
void update_entry(const c10::OperatorHandle&, c10::Stack* stack) {
  Call c = pop_call(*stack);
  const UpdateInputs in = prepare_update(c.preds, c.target, c.state, std::move(c.args));
  if (in.empty()) return;
  Body(in, c.state);
  // The binned histograms: ATen ops on any device, after the kernel (its own pass over the preds).
  if (in.cfg.thresholds > 0) binned_update(in, c.state);
}

// The fake implementation torch.compile and opcheck trace with: the same checks, touching nothing.
void update_meta(const c10::OperatorHandle&, c10::Stack* stack) {
  Call c = pop_call(*stack);
  const bool symbolic = c.preds.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
                        c.target.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
                        c.state.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
  if (symbolic) {
    check_update_kinds(c.preds, c.target, c.state);
  } else {
    (void)prepare_update(c.preds, c.target, c.state, std::move(c.args));
  }
}

template <auto Fn>
torch::CppFunction boxed() {
  return torch::CppFunction::makeFromBoxedFunction<Fn>();
}

}  // namespace

TORCH_LIBRARY(stepscope, m) {
  // Accumulates one batch of classification predictions into `state` IN PLACE (hence the
  // Tensor(a!) annotation: torch.compile functionalises it, CUDA graphs replay it). Reads the
  // predictions once; never synchronises with the host.
  //   task: 0 binary, 1 multiclass, 2 multilabel.  input_kind: 0 auto, 1 logits, 2 probs.
  //   state: float64 [layout.numel] on preds' device, laid out by metrics::make_layout.
  //   thresholds: 0, or the count of linspace(0, 1, .) thresholds of the binned AUROC/AP histograms.
  // The arguments after state are OpArgs (layout.h): its parse() and push() follow this order.
  m.def(
      "classification_update(Tensor preds, Tensor target, Tensor(a!) state, int task, int num_classes, "
      "int[] top_k, int? ignore_index, float threshold, int input_kind, bool confusion_matrix, int thresholds=0) -> ()");
}

TORCH_LIBRARY_IMPL(stepscope, CPU, m) { m.impl("classification_update", boxed<&update_entry<update_cpu>>()); }
TORCH_LIBRARY_IMPL(stepscope, Meta, m) { m.impl("classification_update", boxed<&update_meta>()); }
#if defined(STEPSCOPE_WITH_CUDA)
TORCH_LIBRARY_IMPL(stepscope, CUDA, m) { m.impl("classification_update", boxed<&update_entry<update_cuda>>()); }
#endif

}  // namespace stepscope::metrics
