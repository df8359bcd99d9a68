// Training health at each optimizer step (watch.h): GradStats over a fixed parameter list, the
// non-finite modes, the loss ring and the sampled update ratio.
#include "health/watch.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "check.h"

namespace stepscope::health {

OnNonfinite parse_nonfinite(const std::string& mode) {
  if (mode == "warn") return OnNonfinite::kWarn;
  if (mode == "skip") return OnNonfinite::kSkip;
  if (mode == "raise") return OnNonfinite::kRaise;
  TORCH_CHECK_VALUE(false, "stepscope: nonfinite must be 'warn', 'skip' or 'raise'; got '", mode, "'");
}

const char* nonfinite_name(OnNonfinite mode) {
  switch (mode) {
    case OnNonfinite::kSkip:
      return "skip";
    case OnNonfinite::kRaise:
      return "raise";
    default:
      return "warn";
  }
}

Watch::Watch(std::vector<at::Tensor> params, std::vector<std::string> names, WatchOptions opt)
    : params_(std::move(params)), names_(std::move(names)), opt_(opt) {
  STEPSCOPE_CHECK(params_.size() == names_.size(), "a Watch takes one name per parameter; got ", params_.size(),
                  " parameters and ", names_.size(), " names");
  STEPSCOPE_CHECK(opt_.ring >= 1, "ring must be >= 1; got ", opt_.ring);
  STEPSCOPE_CHECK(opt_.ratio_every >= 0, "ratio_every must be >= 0 (0: off); got ", opt_.ratio_every);
  STEPSCOPE_CHECK(opt_.ratio_samples >= 1, "ratio_samples must be >= 1; got ", opt_.ratio_samples);
  STEPSCOPE_CHECK(opt_.ratio_max_bytes >= 0, "ratio_max_bytes must be >= 0; got ", opt_.ratio_max_bytes);
  const at::Device device = params_.empty() ? at::Device(at::kCPU) : params_.front().device();
  for (size_t i = 0; i < params_.size(); ++i) {
    STEPSCOPE_CHECK(params_[i].defined(), "parameter ", i, " (", names_[i], ") is undefined");
    param_bytes_ += static_cast<int64_t>(params_[i].nbytes());
    if (params_[i].device() != device && disabled_.empty()) {
      disabled_ = "the parameters are on more than one device (" + device.str() + " and " +
                  params_[i].device().str() + "): gradient statistics need one";
    }
  }
  if (params_.empty()) disabled_ = "no parameter of the models requires a gradient: nothing to watch";
  if (!disabled_.empty()) return;
  stats_.emplace(static_cast<int64_t>(params_.size()), opt_.ring, device);
  if (opt_.ratio_every > 0 && param_bytes_ > opt_.ratio_max_bytes) {
    ratio_off_ = "the parameters are " + std::to_string(param_bytes_) + " bytes, over ratio_max_bytes (" +
                 std::to_string(opt_.ratio_max_bytes) + "): the update ratio would copy them";
  }
  ratio_steps_.assign(static_cast<size_t>(opt_.ratio_samples), -1);
  loss_steps_.assign(static_cast<size_t>(opt_.ring), -1);
}

void Watch::switch_off(const std::string& why) {
  disabled_ = why;
  before_.clear();
  ratio_pending_ = false;
}

Watch::Outcome Watch::before_update(int64_t step, bool measure_only) {
  if (!disabled_.empty() || step == last_step_) return kProceed;
  last_step_ = step;
  if (before_step_ != step) ratio_pending_ = false;  // a sampled step whose end never came
  try {
    // The model moved (model.to(device) keeps its parameter objects) before the first step.
    if (measured_ == 0 && !params_.empty() && params_.front().device() != stats_->state().device()) {
      stats_.emplace(static_cast<int64_t>(params_.size()), opt_.ring, params_.front().device());
    }
    stats_->update_from_params(params_, step);
    ++measured_;
  } catch (const c10::Error& e) {
    switch_off(std::string("a gradient the statistics cannot read: ") + e.what_without_backtrace());
    return kProceed;
  }
  if (opt_.nonfinite != OnNonfinite::kWarn && last_nonfinite()) {
    if (opt_.nonfinite == OnNonfinite::kRaise) {
      last_step_ = -1;  // the raised step does not end: its retry keeps this step number
      return kRaise;
    }
    if (!measure_only) {
      drop_grads();
      ++skipped_;
      return kSkipped;
    }
  }
  if (!measure_only && opt_.ratio_every > 0 && ratio_off_.empty() && step % opt_.ratio_every == 0) {
    copy_before();
    before_step_ = step;
  }
  return kProceed;
}

// The weights before a sampled update, into before_. On the CPU the copy stays allocated between
// samples: freed, a copy past malloc's mmap threshold goes back to the system and every page of the
// next one faults again (about 10k faults, some 30 ms, for the 8 MB of a 1024-wide MLP on a VM). On
// a GPU it is freed after the step: the caching allocator keeps the block for other tensors.
void Watch::copy_before() {
  bool fits = before_.size() == params_.size();
  for (size_t i = 0; fits && i < params_.size(); ++i) {
    const at::Tensor& p = params_[i];
    const at::Tensor& b = before_[i];
    fits = b.sizes() == p.sizes() && b.strides() == p.strides() && b.dtype() == p.dtype() &&
           b.device() == p.device();
  }
  if (fits) {
    for (size_t i = 0; i < params_.size(); ++i) before_[i].copy_(params_[i].detach());
  } else {
    before_.clear();
    before_.reserve(params_.size());
    for (const at::Tensor& p : params_) before_.push_back(p.detach().clone());
  }
  ratio_pending_ = true;
}

void Watch::after_update() {
  if (!ratio_pending_) return;
  ratio_pending_ = false;
  try {
    std::vector<at::Tensor> now;
    now.reserve(params_.size());
    for (const at::Tensor& p : params_) now.push_back(p.detach());
    if (!ratio_.defined()) {
      ratio_ = at::zeros({opt_.ratio_samples, 2 * static_cast<int64_t>(params_.size())},
                         before_.front().options().dtype(at::kDouble));
    }
    const int64_t slot = ratio_count_ % opt_.ratio_samples;
    const int64_t p = static_cast<int64_t>(params_.size());
    at::Tensor row = ratio_.select(0, slot);
    // On the CPU by the gradient read: _foreach_norm(.., kDouble) there converts each tensor to
    // float64 first, a transient copy twice the weights' size.
    const bool direct = ratio_.is_cpu() && std::all_of(before_.begin(), before_.end(), plain_cpu);
    const auto norms_into = [&](int64_t off) {  // ||before_[i]|| into row[off + i]
      if (direct) {
        double* d = row.data_ptr<double>() + off;
        for (int64_t i = 0; i < p; ++i) d[i] = std::sqrt(sum_sq_cpu(before_[static_cast<size_t>(i)]));
      } else {
        row.narrow(0, off, p).copy_(at::stack(at::_foreach_norm(before_, 2, at::kDouble)));
      }
    };
    // ||w|| first, then before_ -= w_now in place (||-dw|| = ||dw||): no second copy of the weights.
    norms_into(p);
    at::_foreach_sub_(before_, now);
    norms_into(0);
    ratio_steps_[static_cast<size_t>(slot)] = before_step_;
    ++ratio_count_;
  } catch (const c10::Error& e) {
    ratio_off_ = std::string("the update ratio failed: ") + e.what_without_backtrace();
    before_.clear();
  }
  if (!before_.empty() && !before_.front().is_cpu()) before_.clear();
}

void Watch::observe_loss(const at::Tensor& loss, int64_t step) {
  TORCH_CHECK_TYPE(loss.defined(), "stepscope: observe() needs a loss tensor");
  TORCH_CHECK_VALUE(loss.numel() == 1, "stepscope: observe() takes the step's loss, one value; got shape ",
                    loss.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(loss.scalar_type()), "stepscope: the loss must be floating point; got ",
                   loss.scalar_type());
  if (!loss_.defined() || loss_.device() != loss.device()) {
    loss_ = at::full({opt_.ring + 1}, std::numeric_limits<double>::quiet_NaN(),
                     at::TensorOptions().device(loss.device()).dtype(at::kDouble));
    loss_.select(0, opt_.ring).fill_(-1.0);
    loss_steps_.assign(static_cast<size_t>(opt_.ring), -1);
    loss_count_ = 0;
  }
  const int64_t slot = loss_count_ % opt_.ring;
  if (loss.is_cpu()) {  // a CPU value is read without any sync, and without a new tensor
    double* d = loss_.data_ptr<double>();
    d[slot] = loss.item<double>();
    if (!std::isfinite(d[slot]) && d[opt_.ring] < 0) d[opt_.ring] = static_cast<double>(step);
  } else {
    const at::Tensor v = loss.detach().reshape({}).to(at::kDouble);
    loss_.select(0, slot).copy_(v);
    at::Tensor first = loss_.select(0, opt_.ring);
    first.copy_(at::where(at::isfinite(v).logical_or(first.ge(0)), first, static_cast<double>(step)));
  }
  loss_steps_[static_cast<size_t>(slot)] = step;
  ++loss_count_;
}

void Watch::reset() {
  if (stats_) stats_->reset();
  measured_ = 0;
  last_step_ = -1;
  skipped_ = 0;
  ratio_pending_ = false;
  ratio_steps_.assign(ratio_steps_.size(), -1);
  ratio_count_ = 0;
  if (loss_.defined()) {
    loss_.fill_(std::numeric_limits<double>::quiet_NaN());
    loss_.select(0, opt_.ring).fill_(-1.0);
  }
  loss_steps_.assign(loss_steps_.size(), -1);
  loss_count_ = 0;
}

bool Watch::last_nonfinite() const {
  const at::Tensor& s = stats_->state();
  // CPU: a plain read. CUDA: .item() waits for the training stream (the cost kSkip/kRaise state).
  const double n = s.is_cpu() ? s.data_ptr<double>()[kLastNonfinite] : s.select(0, kLastNonfinite).item<double>();
  return n > 0;
}

void Watch::drop_grads() {
  for (at::Tensor& p : params_) {
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
  }
}

HealthReading Watch::read() const {
  if (!stats_) return HealthReading{};
  return stats_->read();
}

LossReading Watch::read_loss() const {
  LossReading r;
  r.count = loss_count_;
  if (!loss_.defined()) return r;
  const at::Tensor h = loss_.to(at::kCPU);
  const double* d = h.data_ptr<double>();
  r.first_nonfinite_step = static_cast<int64_t>(d[opt_.ring]);
  const int64_t n = std::min(loss_count_, opt_.ring);
  for (int64_t k = loss_count_ - n; k < loss_count_; ++k) {
    const int64_t slot = k % opt_.ring;
    r.recent.emplace_back(loss_steps_[static_cast<size_t>(slot)], d[slot]);
  }
  return r;
}

std::vector<RatioSample> Watch::read_ratio() const {
  std::vector<RatioSample> out;
  if (!ratio_.defined()) return out;
  const at::Tensor h = ratio_.to(at::kCPU).contiguous();
  const double* d = h.data_ptr<double>();
  const int64_t p = static_cast<int64_t>(params_.size());
  const int64_t n = std::min(ratio_count_, opt_.ratio_samples);
  for (int64_t k = ratio_count_ - n; k < ratio_count_; ++k) {
    const int64_t slot = k % opt_.ratio_samples;
    const double* row = d + slot * 2 * p;
    out.push_back(RatioSample{ratio_steps_[static_cast<size_t>(slot)], std::vector<double>(row, row + p),
                              std::vector<double>(row + p, row + 2 * p)});
  }
  return out;
}

std::string Watch::nonfinite_message(bool ran) const {
  if (!stats_) return "stepscope: non-finite gradient";
  const at::Tensor h = stats_->state().to(at::kCPU);
  const double* d = h.data_ptr<double>();
  const HealthLayout& l = stats_->layout();
  std::string first;
  int64_t params = 0;
  for (int64_t i = 0; i < l.params; ++i) {
    if (d[l.nonfinite_last + i] > 0) {
      if (first.empty()) first = names_[static_cast<size_t>(i)];
      ++params;
    }
  }
  return "stepscope: non-finite gradient at step " + std::to_string(static_cast<int64_t>(d[kLastStep])) + " in " +
         (first.empty() ? std::string("the global norm") : "'" + first + "'") +
         (params > 1 ? " and " + std::to_string(params - 1) + " more parameter(s)" : "") +
         " (nonfinite='raise'); " +
         (ran ? "the optimizer step had run (a step(closure) is measured after it)" : "the optimizer step did not run");
}

}  // namespace stepscope::health
