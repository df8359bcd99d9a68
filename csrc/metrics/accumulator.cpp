#include "metrics/accumulator.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include "check.h"

namespace stepscope::metrics {

Accumulator::Accumulator(Config cfg, c10::Device device) : args_(std::move(cfg)) {
  state_ = at::zeros({args_.lay.numel}, at::TensorOptions().dtype(at::kDouble).device(device));
}

void Accumulator::update(const at::Tensor& preds, const at::Tensor& target) {
  // Through the dispatcher, exactly as torch.ops.stepscope.classification_update from Python.
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("stepscope::classification_update", "");
  c10::Stack stack;
  stack.reserve(OpArgs::kFirst + OpArgs::kCount);
  stack.emplace_back(preds);
  stack.emplace_back(target);
  stack.emplace_back(state_);
  args_.push(stack);
  op.callBoxed(&stack);
}

std::map<std::string, at::Tensor> Accumulator::compute(double beta, bool check) const {
  if (check) check_state(args_, state_);
  std::map<std::string, at::Tensor> out;
  for (auto& [k, v] : compute_metrics(args_, state_, beta)) out.emplace(k, v);
  return out;
}

void Accumulator::reset() { state_.zero_(); }

void Accumulator::load_state(const at::Tensor& state) {
  STEPSCOPE_CHECK(state.dim() == 1 && state.numel() == args_.lay.numel && state.scalar_type() == at::kDouble,
                  "load_state: expected a float64 state of ", args_.lay.numel, " elements; got ", state.scalar_type(),
                  " ", shape_str(state.sizes()));
  state_.copy_(state);
}

}  // namespace stepscope::metrics
