// The step rule above the Timeline (timing/step_machine.h tells it).
#include "timing/step_machine.h"

#include <algorithm>
#include <utility>

namespace stepscope::timing {

StepMachine::StepMachine(std::shared_ptr<Timeline> tl, size_t optimizers, StepHost* host)
    : tl_(std::move(tl)),
      host_(host != nullptr ? host : &default_host_),
      n_opts_(optimizers),
      thread_(std::this_thread::get_id()) {}

StepMachine::~StepMachine() { release_all(); }

void StepMachine::keep(Token& slot, Token t) {
  if (t != nullptr) host_->hold(t);
  const Token old = slot;
  slot = t;
  if (old != nullptr) host_->release(old);
}

void StepMachine::drop(Token& slot) {
  // Cleared before the release, which may run the host's code (a Python finaliser).
  const Token old = slot;
  slot = nullptr;
  if (old != nullptr) host_->release(old);
}

void StepMachine::release_all() {
  drop(opt_in_);
  drop(opt_frame_);
  drop(fwd_frame_);
}

bool StepMachine::claim_thread(bool training) {
  const std::thread::id me = std::this_thread::get_id();
  if (me == thread_) {
    thread_claimed_ = thread_claimed_ || training;
    return true;
  }
  if (!training || thread_claimed_) return false;
  thread_ = me;
  thread_claimed_ = true;
  return true;
}

void StepMachine::end_raised_step() {
  // The step's time up to here counts as the optimizer's, and the step goes on.
  drop(opt_in_);
  drop(opt_frame_);
  opt_depth_ = 0;
  if (!opt_foreign_) tl_->optimizer_end(false);
  opt_foreign_ = false;
}

void StepMachine::settle() {
  if (fwd_depth_ > 0 && !host_->live(fwd_frame_)) {
    for (; fwd_depth_ > 0; --fwd_depth_) tl_->forward_end();  // its time runs to here
    drop(fwd_frame_);
  }
  if (opt_depth_ > 0 && !host_->live(opt_frame_)) end_raised_step();
}

bool StepMachine::forward_begin(bool eval, int64_t batch, Token call) {
  if (!claim_thread(!eval)) return false;
  if (fwd_depth_ > 0 || opt_depth_ > 0) settle();
  if (opt_depth_ != 0 && opt_foreign_ && !eval) {  // inside a global-hook optimizer's closure
    opt_foreign_ = false;
    tl_->optimizer_begin();
  }
  if (fwd_depth_++ == 0) keep(fwd_frame_, call);
  tl_->forward_begin(eval, batch);
  return true;
}

bool StepMachine::forward_end() {
  if (!on_training_thread() || fwd_depth_ == 0) return false;
  if (--fwd_depth_ == 0) drop(fwd_frame_);
  tl_->forward_end();
  return true;
}

int StepMachine::optimizer_begin(Token opt, Token call) {
  if (!claim_thread(true)) return 0;
  if (fwd_depth_ > 0 || opt_depth_ > 0) settle();
  if (opt_depth_ != 0) {
    // The open step is still running: a nested super().step(), or another optimizer stepping
    // inside it (its closure), which is part of this step.
    if (opt_in_ == opt) ++opt_depth_;
    return 0;
  }
  if (n_opts_ == 0) {
    const int ours = host_->owns(opt);
    if (ours <= 0) return ours;  // another model's optimizer (nothing to time), or failed
  }
  keep(opt_in_, opt);
  keep(opt_frame_, call);
  opt_depth_ = 1;
  opt_foreign_ = n_opts_ == 0 && !tl_->forward_seen();
  if (!opt_foreign_) tl_->optimizer_begin();
  return 1;
}

bool StepMachine::optimizer_end(Token opt) {
  if (opt_in_ != opt || opt_depth_ == 0 || !on_training_thread()) return false;
  if (--opt_depth_ > 0) return false;
  drop(opt_frame_);
  if (opt_foreign_) {  // stepped without this model running in it
    opt_foreign_ = false;
    drop(opt_in_);
    return false;
  }
  bool end = true;
  if (n_opts_ > 1) {
    if (std::find(stepped_.begin(), stepped_.end(), opt_in_) == stepped_.end()) stepped_.push_back(opt_in_);
    end = stepped_.size() >= n_opts_;
  }
  drop(opt_in_);
  tl_->optimizer_end(end);
  if (end) ended();
  return end;
}

bool StepMachine::claim(bool training) {
  if (!claim_thread(training)) return false;
  settle();
  return true;
}

bool StepMachine::optimizer_end_marked() {
  if (!claim_thread(true)) return false;
  settle();
  const int64_t before = tl_->steps();
  tl_->optimizer_end(true);
  if (tl_->steps() == before) return false;
  ended();
  return true;
}

bool StepMachine::step() {
  if (!claim_thread(true)) return false;
  settle();
  if (!tl_->step()) return false;
  ended();
  return true;
}

}  // namespace stepscope::timing
