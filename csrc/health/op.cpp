// The gradient-statistics op in one place: its schema and every implementation's registration
// (CPU, CUDA, Meta). The bodies live in grad_stats_cpu.cpp and grad_stats_aten.cpp; every one of
// them is entered through prepare_grad_stats (grad_stats_checks.cpp), so all three accept and
// refuse the same calls.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include "health/grad_stats.h"

namespace stepscope::health {
namespace {

struct Call {
  GradList grads;
  at::Tensor state;
  int64_t step = 0, slot = 0;
};

Call pop_call(c10::Stack& stack) {
  const size_t base = stack.size() - 4;
  Call c{stack[base].toOptionalTensorList(), stack[base + 1].toTensor(), stack[base + 2].toInt(),
         stack[base + 3].toInt()};
  torch::jit::drop(stack, 4);
  return c;
}

using Body = void (*)(const GradStatsInputs&, const at::Tensor&);

template <Body B>
void update_entry(const c10::OperatorHandle&, c10::Stack* stack) {
  const Call c = pop_call(*stack);
  B(prepare_grad_stats(c.grads, c.state, c.step, c.slot), c.state);
}

// The fake implementation torch.compile and opcheck trace with: the same checks, touching nothing.
void update_meta(const c10::OperatorHandle&, c10::Stack* stack) {
  const Call c = pop_call(*stack);
  if (c.state.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    check_grad_stats_kinds(c.grads, c.state);
  } else {
    (void)prepare_grad_stats(c.grads, c.state, c.step, c.slot);
  }
}

template <auto Fn>
torch::CppFunction boxed() {
  return torch::CppFunction::makeFromBoxedFunction<Fn>();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stepscope, m) {
  // Accumulates one optimizer step's gradients into `state` IN PLACE (Tensor(a!): torch.compile
  // functionalises it, CUDA graphs replay it); never synchronises with the host.
  //   grads: one entry per parameter that requires a gradient, None where it has none this step.
  //   state: float64 [health_layout(len(grads), ring).numel] on the gradients' device
  //          (csrc/health/layout.h); its size gives the ring.
  //   step:  the caller's step number (>= 0), recorded in the ring and for the first non-finite step.
  //   slot:  the ring slot to write, update k (from 0) writing k % ring: the op cannot read the
  //          update count off the device without a sync, so the caller keeps it.
  m.def("grad_stats_update(Tensor?[] grads, Tensor(a!) state, int step, int slot) -> ()");
}

TORCH_LIBRARY_IMPL(stepscope, CPU, m) { m.impl("grad_stats_update", boxed<&update_entry<grad_stats_cpu>>()); }
TORCH_LIBRARY_IMPL(stepscope, Meta, m) { m.impl("grad_stats_update", boxed<&update_meta>()); }
// A sparse gradient sends the call to the sparse key: the checks there refuse it by name.
TORCH_LIBRARY_IMPL(stepscope, SparseCPU, m) { m.impl("grad_stats_update", boxed<&update_meta>()); }
#if defined(STEPSCOPE_WITH_CUDA)
TORCH_LIBRARY_IMPL(stepscope, CUDA, m) { m.impl("grad_stats_update", boxed<&update_entry<grad_stats_aten>>()); }
TORCH_LIBRARY_IMPL(stepscope, SparseCUDA, m) { m.impl("grad_stats_update", boxed<&update_meta>()); }
#endif

}  // namespace stepscope::health
