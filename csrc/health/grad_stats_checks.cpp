// Checks for the gradient-statistics op: what every implementation registered in
// csrc/health/op.cpp (the Meta one too, which checks and touches nothing) calls first.
#include <ATen/ATen.h>

#include "check.h"
#include "health/grad_stats.h"

namespace stepscope::health {

void check_grad_stats_kinds(const GradList& grads, const at::Tensor& state) {
  STEPSCOPE_CHECK(state.defined(), "state must be defined");
  TORCH_CHECK_TYPE(state.scalar_type() == at::kDouble, "stepscope: state must be float64; got ", state.scalar_type());
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::optional<at::Tensor> g = grads[i];
    if (!g.has_value() || !g->defined()) continue;
    STEPSCOPE_CHECK(g->layout() == at::kStrided, "grads[", i, "] is a ", g->layout(),
                    " tensor; sparse gradients are not supported (densify them, or leave that parameter out)");
    TORCH_CHECK_TYPE(is_read_float(g->scalar_type()), "stepscope: grads[", i,
                     "] must be float32, float16, bfloat16 or float64; got ", g->scalar_type());
    TORCH_CHECK_VALUE(g->device() == state.device(), "stepscope: grads[", i,
                      "] must be on the same device as state (", state.device(), "); got ", g->device());
  }
}

GradStatsInputs prepare_grad_stats(const GradList& grads, const at::Tensor& state, int64_t step, int64_t slot) {
  check_grad_stats_kinds(grads, state);
  const int64_t p = static_cast<int64_t>(grads.size());
  const int64_t rest = state.numel() - HealthLayout::kFixedLen - HealthLayout::kPerParam * p;
  STEPSCOPE_CHECK(state.dim() == 1 && state.is_contiguous() && rest >= HealthLayout::kPerSlot &&
                      rest % HealthLayout::kPerSlot == 0,
                  "state must be a contiguous 1-D tensor of health_layout(P, ring).numel = ", HealthLayout::kFixedLen,
                  " + ", HealthLayout::kPerParam, " * P + ", HealthLayout::kPerSlot, " * ring elements with P = ", p,
                  " (one per entry of grads) and ring >= 1; got ", shape_str(state.sizes()));
  GradStatsInputs in;
  in.lay = HealthLayout(p, rest / HealthLayout::kPerSlot);
  STEPSCOPE_CHECK(slot >= 0 && slot < in.lay.ring, "slot must be in [0, ring) = [0, ", in.lay.ring, "); got ", slot);
  STEPSCOPE_CHECK(step >= 0, "step must be >= 0 (-1 marks 'no step' in the state); got ", step);
  in.step = step;
  in.slot = slot;
  in.grads.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::optional<at::Tensor> g = grads[i];
    in.grads.push_back(g.has_value() ? *g : at::Tensor());
  }
  return in;
}

}  // namespace stepscope::health
