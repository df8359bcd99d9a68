// The host side of gradient statistics: making and resetting a state, reading it (quantiles from
// the histogram), and the C++ API class, which calls the op through the dispatcher (plain CPU
// gradients excepted: update_cpu_direct).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "check.h"
#include "health/grad_stats.h"

namespace stepscope::health {

void reset_state(const at::Tensor& state, int64_t params) {
  STEPSCOPE_CHECK(params >= 0, "params must be >= 0; got ", params);
  const int64_t ring = (state.numel() - HealthLayout::kFixedLen - HealthLayout::kPerParam * params) /
                       HealthLayout::kPerSlot;
  const HealthLayout l(params, std::max<int64_t>(ring, 1));
  TORCH_CHECK_TYPE(state.scalar_type() == at::kDouble, "stepscope: state must be float64; got ", state.scalar_type());
  STEPSCOPE_CHECK(state.dim() == 1 && state.numel() == l.numel && ring >= 1,
                  "state must be a 1-D tensor of health_layout(", params, ", ring).numel elements; got ",
                  shape_str(state.sizes()));
  state.zero_();
  state.narrow(0, kMin, 1).fill_(std::numeric_limits<double>::infinity());
  state.narrow(0, kFirstNonfiniteStep, 2).fill_(-1.0);
  state.narrow(0, l.ring_step, l.ring).fill_(-1.0);
}

at::Tensor new_state(int64_t params, int64_t ring, const at::TensorOptions& options) {
  STEPSCOPE_CHECK(params >= 0 && ring >= 1, "a state needs params >= 0 and ring >= 1; got params = ", params,
                  ", ring = ", ring);
  at::Tensor s = at::empty({HealthLayout(params, ring).numel}, options.dtype(at::kDouble));
  reset_state(s, params);
  return s;
}

double hist_quantile(const double* hist, double q) {
  double n = 0;
  for (int64_t b = 0; b < kHistNonfinite; ++b) n += hist[b];
  if (n <= 0) return 0.0;
  const double rank = std::floor(std::clamp(q, 0.0, 1.0) * (n - 1));
  double seen = 0;
  for (int64_t b = 0; b < kHistNonfinite; ++b) {
    seen += hist[b];
    if (seen > rank) {
      if (b == 0) return std::pow(10.0, static_cast<double>(kLogMin));
      if (b == kHistOverflow) return hist_edge(kHistOverflow);
      return std::sqrt(hist_edge(b) * hist_edge(b + 1));
    }
  }
  return hist_edge(kHistOverflow);
}

namespace {

NormStats norm_stats(const double* s) {
  NormStats g;
  g.count = static_cast<int64_t>(s[kCount]);
  g.last = s[kLastNorm];
  if (g.count == 0) return g;
  const double n = s[kCount];
  g.mean = s[kSum] / n;
  g.std = n > 1 ? std::sqrt(std::max(0.0, (s[kSumSq] - n * g.mean * g.mean) / (n - 1))) : 0.0;
  g.min = s[kMin];
  g.max = s[kMax];
  const double* hist = s + kHeaderLen;
  // A histogram quantile is the middle of its bin: kept inside the exact [min, max].
  g.p50 = std::clamp(hist_quantile(hist, 0.50), g.min, g.max);
  g.p90 = std::clamp(hist_quantile(hist, 0.90), g.min, g.max);
  g.p99 = std::clamp(hist_quantile(hist, 0.99), g.min, g.max);
  return g;
}

}  // namespace

HealthReading read_state(const at::Tensor& state, int64_t params) {
  const at::Tensor host = state.to(at::kCPU).contiguous();  // the one device-to-host copy
  const int64_t ring = (host.numel() - HealthLayout::kFixedLen - HealthLayout::kPerParam * params) /
                       HealthLayout::kPerSlot;
  const HealthLayout l(params, ring);
  STEPSCOPE_CHECK(host.scalar_type() == at::kDouble && ring >= 1 && host.numel() == l.numel,
                  "state is not a gradient-statistics state for ", params, " parameters; got ",
                  shape_str(host.sizes()), " ", host.scalar_type());
  const double* s = host.const_data_ptr<double>();
  HealthReading r;
  r.steps = static_cast<int64_t>(s[kSteps]);
  r.grad_norm = norm_stats(s);
  r.nonfinite_steps = static_cast<int64_t>(s[kNonfiniteSteps]);
  r.first_nonfinite_step = static_cast<int64_t>(s[kFirstNonfiniteStep]);
  r.first_nonfinite_param = static_cast<int64_t>(s[kFirstNonfiniteParam]);
  r.params.resize(params);
  for (int64_t i = 0; i < params; ++i) {
    ParamStats& p = r.params[i];
    p.norm_last = s[l.norm_last + i];
    p.norm_max = s[l.norm_max + i];
    p.nonfinite_elements = static_cast<int64_t>(s[l.nonfinite_total + i]);
    p.nonfinite_steps = static_cast<int64_t>(s[l.nonfinite_steps + i]);
    p.no_grad_steps = static_cast<int64_t>(s[l.no_grad_steps + i]);
    p.no_grad_last = s[l.no_grad_last + i] != 0;
    const double finite = static_cast<double>(r.steps - p.no_grad_steps - p.nonfinite_steps);
    p.norm_mean = finite > 0 ? s[l.norm_sum + i] / finite : 0.0;
  }
  const int64_t kept = std::min(r.steps, ring);
  for (int64_t k = r.steps - kept; k < r.steps; ++k) {
    const int64_t slot = k % ring;
    r.recent.push_back({static_cast<int64_t>(s[l.ring_step + slot]), s[l.ring_norm + slot],
                        static_cast<int64_t>(s[l.ring_nonfinite + slot])});
  }
  return r;
}

GradStats::GradStats(int64_t params, int64_t ring, at::Device device)
    : lay_(params, ring), state_(new_state(params, ring, at::TensorOptions().device(device))) {}

void GradStats::update(const std::vector<std::optional<at::Tensor>>& grads, int64_t step) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("stepscope::grad_stats_update", "")
                             .typed<void(const GradList&, at::Tensor&, int64_t, int64_t)>();
  GradList list;
  list.reserve(grads.size());
  for (const auto& g : grads) list.push_back(g);
  op.call(list, state_, step, updates_ % lay_.ring);
  ++updates_;  // after the call: a refused update takes no slot
}

bool plain_cpu(const at::Tensor& g) {
  const c10::DispatchKeySet keys =
      g.key_set() - c10::autograd_dispatch_keyset_with_ADInplaceOrView - c10::autocast_dispatch_keyset;
  return keys == c10::DispatchKeySet(c10::DispatchKey::CPU) && g.layout() == at::kStrided &&
         is_read_float(g.scalar_type());
}

// The Monitor's call at every optimizer step. For plain CPU gradients it runs the CPU body itself,
// past the dispatcher: what the op's CPU registration runs, without boxing the gradients into a list
// of IValues and out again, which cost about as much as reading a small model's gradients. Any other
// gradient takes the op, which sends it where it belongs (or refuses it by name).
bool GradStats::update_cpu_direct(const std::vector<at::Tensor>& params, int64_t step) {
  if (!state_.is_cpu() || step < 0 || c10::impl::TorchDispatchModeTLS::any_modes_set()) return false;
  GradStatsInputs in;
  in.grads.reserve(params.size());
  for (const at::Tensor& p : params) {
    const at::Tensor& g = p.grad();
    if (g.defined() && !plain_cpu(g)) return false;
    in.grads.push_back(g);
  }
  in.lay = lay_;
  in.step = step;
  in.slot = updates_ % lay_.ring;
  grad_stats_cpu(in, state_);
  ++updates_;
  return true;
}

void GradStats::update_from_params(const std::vector<at::Tensor>& params, int64_t step) {
  if (update_cpu_direct(params, step)) return;
  std::vector<std::optional<at::Tensor>> grads;
  grads.reserve(params.size());
  for (const at::Tensor& p : params) {
    const at::Tensor& g = p.grad();
    grads.push_back(g.defined() ? std::optional<at::Tensor>(g) : std::nullopt);
  }
  update(grads, step);
}

void GradStats::reset() {
  reset_state(state_, lay_.params);
  updates_ = 0;
}

}  // namespace stepscope::health
