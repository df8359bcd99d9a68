#include "metrics/accumulator.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "check.h"

namespace stepscope::metrics {

Accumulator::Accumulator(Config cfg, c10::Device device) : cfg_(std::move(cfg)), lay_(make_layout(cfg_)) {
  state_ = at::zeros({lay_.numel}, at::TensorOptions().dtype(at::kDouble).device(device));
}

void Accumulator::update(const at::Tensor& preds, const at::Tensor& target) {
  // Through the dispatcher, exactly as torch.ops.stepscope.classification_update from Python.
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("stepscope::classification_update", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                   c10::IntArrayRef, std::optional<int64_t>, double, int64_t, bool)>();
  op.call(preds, target, state_, static_cast<int64_t>(cfg_.task), cfg_.num_classes, cfg_.top_k, cfg_.ignore_index,
          cfg_.threshold, static_cast<int64_t>(cfg_.input), cfg_.confusion_matrix);
}

std::map<std::string, at::Tensor> Accumulator::compute(double beta, bool check) const {
  if (check) check_state(cfg_, state_);
  std::map<std::string, at::Tensor> out;
  for (auto& [k, v] : compute_metrics(cfg_, state_, beta)) out.emplace(k, v);
  return out;
}

void Accumulator::reset() { state_.zero_(); }

void Accumulator::load_state(const at::Tensor& state) {
  STEPSCOPE_CHECK(state.dim() == 1 && state.numel() == lay_.numel && state.scalar_type() == at::kDouble,
                  "load_state: expected a float64 state of ", lay_.numel, " elements; got ", state.scalar_type(), " ",
                  shape_str(state.sizes()));
  state_.copy_(state);
}

}  // namespace stepscope::metrics
