// The device-agnostic body of grad_stats_update, built from ATen ops only: registered for CUDA
// (csrc/health/op.cpp), and run on CPU by the GoogleTests against grad_stats_cpu. No op here reads
// a value on the host: every decision (finite or not, the first non-finite step, the histogram
// bin) is a where() or an index on the device.
//
// The norms come from one at::_foreach_norm over all gradients (ATen's fused multi-tensor launch
// on CUDA, when the gradients share a dtype); a parameter without a gradient stands in as an
// one-element zero (norm 0) and is masked out. Non-finite gradients are counted per parameter: 1 for
// each parameter whose norm is non-finite, not per element (that needs a pass of its own per
// tensor, left to a fused kernel).
#include <ATen/ATen.h>

#include <vector>

#include "health/grad_stats.h"

namespace stepscope::health {
namespace {

// [P] float64: 1 where the parameter has a gradient. All present (the usual case) costs no copy;
// otherwise the mask goes to the device from pinned memory, asynchronously.
at::Tensor present_mask(const std::vector<at::Tensor>& grads, const at::TensorOptions& opts) {
  const int64_t p = static_cast<int64_t>(grads.size());
  bool all = true;
  for (const at::Tensor& g : grads) all = all && g.defined();
  if (all) return at::ones({p}, opts);
  const bool device = opts.device().type() != at::kCPU;
  at::Tensor host = at::empty({p}, at::TensorOptions(at::kDouble).pinned_memory(device));
  double* m = host.data_ptr<double>();
  for (int64_t i = 0; i < p; ++i) m[i] = grads[i].defined() ? 1.0 : 0.0;
  return device ? host.to(opts.device(), /*non_blocking=*/true) : host;
}

// [P] float64 norms: float32 accumulation unless a gradient is float64 (the value
// clip_grad_norm_ computes), 0 where there is no gradient.
at::Tensor param_norms(const std::vector<at::Tensor>& grads, const at::Tensor& state) {
  at::ScalarType acc = at::kFloat;
  at::ScalarType first = at::kFloat;
  bool seen = false;
  for (const at::Tensor& g : grads) {
    if (!g.defined()) continue;
    if (!seen) first = g.scalar_type();
    seen = true;
    if (g.scalar_type() == at::kDouble) acc = at::kDouble;
  }
  if (!seen) return at::zeros({static_cast<int64_t>(grads.size())}, state.options());
  const at::Tensor none = at::zeros({1}, state.options().dtype(first));
  std::vector<at::Tensor> list;
  list.reserve(grads.size());
  for (const at::Tensor& g : grads) list.push_back(g.defined() ? g : none);
  return at::stack(at::_foreach_norm(list, 2, acc)).to(at::kDouble);
}

at::Tensor block(const at::Tensor& state, int64_t offset, int64_t len) { return state.narrow(0, offset, len); }

void update_header(const GradStatsInputs& in, const at::Tensor& state, const at::Tensor& gn,
                   const at::Tensor& step_nf, const at::Tensor& first_bad) {
  const auto h = [&](int64_t i) { return block(state, i, 1); };
  const at::Tensor ok = at::isfinite(gn) & (step_nf == 0);
  const at::Tensor okd = ok.to(at::kDouble);
  const at::Tensor zero = at::zeros_like(gn);
  const at::Tensor step = at::full_like(gn, static_cast<double>(in.step));
  h(kSteps).add_(1);
  h(kLastStep).fill_(static_cast<double>(in.step));
  h(kLastNorm).copy_(gn);
  h(kLastNonfinite).copy_(step_nf);
  h(kCount).add_(okd);
  h(kSum).add_(at::where(ok, gn, zero));
  h(kSumSq).add_(at::where(ok, gn * gn, zero));
  h(kMin).copy_(at::where(ok, at::minimum(h(kMin), gn), h(kMin)));
  h(kMax).copy_(at::where(ok, at::maximum(h(kMax), gn), h(kMax)));
  h(kNonfiniteSteps).add_(1 - okd);
  const at::Tensor first = at::logical_not(ok) & (h(kFirstNonfiniteStep) < 0);
  h(kFirstNonfiniteParam).copy_(at::where(first, first_bad, h(kFirstNonfiniteParam)));
  h(kFirstNonfiniteStep).copy_(at::where(first, step, h(kFirstNonfiniteStep)));
  // hist_bin (layout.h) with tensor ops: log10(0) = -inf clamps into the underflow bin.
  const at::Tensor b = at::clamp(at::floor((at::log10(gn) - static_cast<double>(kLogMin)) * kBinsPerDecade) + 1, 0,
                                 static_cast<double>(kHistOverflow));
  const at::Tensor bin = at::where(at::isfinite(gn), b, at::full_like(gn, static_cast<double>(kHistNonfinite)));
  // A one-hot add rather than index_add_/index_put_(accumulate): deterministic on CUDA, so it also
  // runs under torch.use_deterministic_algorithms(True).
  const at::Tensor bins = at::arange(kHistLen, gn.options().dtype(at::kLong));
  block(state, in.lay.hist, kHistLen).add_((bins == bin.to(at::kLong)).to(at::kDouble));
}

}  // namespace

void grad_stats_aten(const GradStatsInputs& in, const at::Tensor& state) {
  const HealthLayout& l = in.lay;
  const int64_t p = l.params;
  const at::TensorOptions opts = state.options();
  const at::Tensor present = present_mask(in.grads, opts);
  const at::Tensor norms = param_norms(in.grads, state);
  const at::Tensor bad = at::logical_not(at::isfinite(norms));  // absent: norm 0, never bad
  const at::Tensor badd = bad.to(at::kDouble);
  const at::Tensor good = at::where(bad, at::zeros_like(norms), norms);
  const at::Tensor has = present > 0;

  block(state, l.norm_last, p).copy_(at::where(has, norms, block(state, l.norm_last, p)));
  block(state, l.norm_max, p).copy_(at::maximum(block(state, l.norm_max, p), good));
  block(state, l.norm_sum, p).add_(good);
  block(state, l.nonfinite_last, p).copy_(badd);
  block(state, l.nonfinite_total, p).add_(badd);
  block(state, l.nonfinite_steps, p).add_(badd);
  block(state, l.no_grad_last, p).copy_(1 - present);
  block(state, l.no_grad_steps, p).add_(1 - present);

  const at::Tensor gn = (norms * norms).sum().sqrt().reshape({1});
  const at::Tensor step_nf = badd.sum().reshape({1});
  // argmax returns the first maximum: the first non-finite parameter when there is one.
  const at::Tensor first_bad =
      p == 0 ? at::full({1}, -1.0, opts)
             : at::where(step_nf > 0, at::argmax(badd).to(at::kDouble).reshape({1}), at::full({1}, -1.0, opts));
  update_header(in, state, gn, step_nf, first_bad);
  block(state, l.ring_step + in.slot, 1).fill_(static_cast<double>(in.step));
  block(state, l.ring_norm + in.slot, 1).copy_(gn);
  block(state, l.ring_nonfinite + in.slot, 1).copy_(step_nf);
}

}  // namespace stepscope::health
