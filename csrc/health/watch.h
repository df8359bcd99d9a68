// Training health at each optimizer step, for a loop that reports its steps from hooks (the
// Monitor's, csrc/python/step_hooks.cpp) or by hand (a LibTorch loop): the gradient statistics of
// a fixed list of parameters (GradStats), what to do on a non-finite gradient, the loss the loop
// hands over, and the update-to-weight ratio on sampled steps. Plain LibTorch; nothing here
// reads the device unless a mode asks for it (skip and raise, below).
//
// When, in a step:
//  - before_update(step): the gradients are final and the optimizer has not updated (its pre hook;
//    for a step(closure) optimizer, whose closure computes the gradients inside step(), call it
//    from the post hook with measure_only: the update ran, so nothing can be skipped and no
//    update ratio is sampled that step). Once per step: a second call with the same step number
//    (a second optimizer of the step) does nothing.
//  - after_update(): the step's updates ran (the post hook of its last optimizer): the sampled
//    update ratio is taken here.
//  - observe_loss(loss, step): whenever the loop has the step's loss (no host read).
//
// Non-finite gradients:
//  - kWarn (the default): counted and reported; nothing read on the host during the steps.
//  - kSkip: the step's non-finite count is read on the host (free on CPU; on CUDA a sync of the
//    training stream, every step); when non-zero every watched parameter's gradient is dropped
//    (set undefined, which torch's optimizers skip), so the update does not happen.
//  - kRaise: the same read; when non-zero before_update returns kRaise and the caller raises
//    before the optimizer runs.
// Errors: a gradient the op refuses (sparse, another device, a tensor subclass) switches the watch
// off for the rest of the run and keeps the reason (disabled()); the training goes on. Parameters
// moved to another device before the first measured step (model.to(device) after attach) move the
// state with them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "health/grad_stats.h"

namespace stepscope::health {

enum class OnNonfinite { kWarn, kSkip, kRaise };
OnNonfinite parse_nonfinite(const std::string& mode);  // "warn" | "skip" | "raise"
const char* nonfinite_name(OnNonfinite mode);

struct WatchOptions {
  int64_t ring = 256;               // recent steps kept (gradient norms, losses)
  OnNonfinite nonfinite = OnNonfinite::kWarn;
  int64_t ratio_every = 100;        // the update ratio on one optimizer step in this many; 0: never
  int64_t ratio_samples = 64;       // sampled steps kept
  // The update ratio needs the weights before the update: one copy of the watched parameters,
  // made on a sampled step (kept between samples on the CPU, freed after the step on a GPU: see
  // Watch::copy_before). Off when the parameters are larger than this.
  int64_t ratio_max_bytes = int64_t{1} << 30;
};

// The update ratio's samples: per sampled step, each parameter's ||w_after - w_before|| and
// ||w_before||, so that any grouping's ratio is sqrt(sum dw^2) / sqrt(sum w^2) at read time.
struct RatioSample {
  int64_t step = 0;
  std::vector<double> dw, w;
};

struct LossReading {
  int64_t count = 0;                // losses observed
  std::vector<std::pair<int64_t, double>> recent;  // (step, loss), oldest first, the last `ring`
  int64_t first_nonfinite_step = -1;  // over the whole run
};

class Watch {
 public:
  enum Outcome { kProceed = 0, kSkipped = 1, kRaise = 2 };

  // params: the parameters that require a gradient, one per name (their devices must agree: the
  // state lives on the first one's).
  Watch(std::vector<at::Tensor> params, std::vector<std::string> names, WatchOptions opt = {});

  Outcome before_update(int64_t step, bool measure_only = false);
  void after_update();
  void observe_loss(const at::Tensor& loss, int64_t step);
  void reset();

  HealthReading read() const;             // one device-to-host copy of the gradient state
  LossReading read_loss() const;          // one copy of the loss ring
  std::vector<RatioSample> read_ratio() const;  // one copy of the samples
  // For kRaise: the step and the first non-finite parameter of the last measured step; ran: the
  // update has run (a closure step, measured after it).
  std::string nonfinite_message(bool ran = false) const;

  const std::vector<std::string>& names() const { return names_; }
  const WatchOptions& options() const { return opt_; }
  const std::string& disabled() const { return disabled_; }
  // Stops watching for the rest of the run (why: kept in disabled()). The watch does it itself when
  // the op refuses a gradient; a caller does it for errors only it can see (a Python one).
  void switch_off(const std::string& why);
  // Why the update ratio is off ("" while it is on or was never asked for).
  const std::string& ratio_off() const { return ratio_off_; }
  int64_t skipped() const { return skipped_; }
  int64_t ratio_bytes() const { return param_bytes_; }
  const GradStats* stats() const { return stats_ ? &*stats_ : nullptr; }

 private:
  bool last_nonfinite() const;  // the host read of kSkip/kRaise
  void drop_grads();

  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  WatchOptions opt_;
  std::optional<GradStats> stats_;
  int64_t last_step_ = -1;     // the step measured last (once per step)
  int64_t measured_ = 0;       // steps measured since the last reset
  int64_t skipped_ = 0;
  std::string disabled_;
  // Update ratio.
  int64_t param_bytes_ = 0;
  std::string ratio_off_;
  void copy_before();
  std::vector<at::Tensor> before_;  // the weights before a sampled step's update (see copy_before)
  bool ratio_pending_ = false;      // before_ holds this sample's weights, after_update not yet run
  int64_t before_step_ = -1;
  at::Tensor ratio_;                // [ratio_samples, 2 P] float64: dw then w per sample
  std::vector<int64_t> ratio_steps_;  // the step of each row (-1: empty)
  int64_t ratio_count_ = 0;
  // Loss.
  at::Tensor loss_;                 // [ring + 1] float64: the ring, then the first non-finite step
  std::vector<int64_t> loss_steps_;
  int64_t loss_count_ = 0;
};

}  // namespace stepscope::health
