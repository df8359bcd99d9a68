// The Timeline's step clock: attach and detach, the training boundaries and the partition of
// each step (timing/timeline.h tells the rules). Device events: timing/device_timer.cpp (the
// Timeline's sink for them: timeline_spans.cpp); user phases and modules: timeline_spans.cpp;
// reports: timeline_report.cpp.
#include "timing/timeline.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <limits>

#include "nvtx/nvtx.h"

namespace stepscope::timing {

namespace {
uint64_t next_timeline_id() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

int check_ring(int64_t ring) {
  TORCH_CHECK_VALUE(ring >= 1 && ring <= kMaxRing, "stepscope: ring must be an int from 1 to ", kMaxRing,
                    " (recent steps kept raw, ", kRingSlotBytes, " bytes each, allocated up front); got ", ring);
  return static_cast<int>(ring);
}

Timeline::Timeline(TimelineOptions opts)
    : opts_(opts),
      id_(next_timeline_id()),
      origin_(std::chrono::steady_clock::now()),
      timer_(opts.device, opts.event_pool, opts.device_every, origin_, this),
      ring_(static_cast<size_t>(check_ring(opts.ring))) {
  // NVTX decides once per process whether a tool is attached; without one, no range call is made
  // at all (each boundary then touches neither the NVTX code nor the step name's formatting).
  opts_.nvtx = opts.nvtx && nvtx::tool_attached();
  std::lock_guard<SpinLock> g(mu_);
  open_locked();
}

Timeline::~Timeline() { close(); }

void Timeline::open() {
  std::lock_guard<SpinLock> g(mu_);
  if (!closed_) return;
  open_locked();
}

void Timeline::open_locked() {
  closed_ = false;
  int64_t now = 0;
  if (timer_.needs_anchor()) {
    // The one synchronisation, at attach and never again (DeviceTimer::anchor); the first step is
    // always device-timed.
    ev_.last = timer_.anchor(&now);
  } else {
    now = now_ns();
    ev_.last = timer_.record(now, timer_.next_timed(step_index_ < opts_.warmup_steps));
  }
  last_ns_ = now;  // the record's reference now belongs to "the last boundary"
  timer_.opened();
  start_step(now, ev_.last);
}


void Timeline::boundary(Phase closes, int64_t now, EventRef ev, bool nvtx) {
  open_step_range();
  if (paused_) end_eval_stretch();
  const int i = static_cast<int>(closes);
  const int64_t t0 = paused_ ? carry_t0_ : last_ns_;
  const double ns = static_cast<double>(carry_ns_ + (now - last_ns_));
  add_host(i, ns);
  step_phase_[i] += ns;
  int slot = -1;
  if (cur_.n_spans < StepRecord::kMaxSpans) {
    slot = cur_.n_spans++;
    cur_.spans[slot] = SpanRecord{t0, now, -1, static_cast<int16_t>(i), SpanRecord::kPartition};
  } else {
    ++cur_.truncated;
  }
  if (timer_.timed()) {
    if (paused_) {
      queue_or_drop(0, i, {&ev_.carry_a, &ev_.carry_b, &ev_.last, &ev});
    } else {
      queue_or_drop(0, i, {&ev_.last, &ev}, slot);
    }
  }
  ev_.carry_a.reset();
  ev_.carry_b.reset();
  carry_ns_ = 0;
  paused_ = false;
  ev_.last = std::move(ev);  // takes over the record's reference
  last_ns_ = now;
  step_active_ = true;
  if (nvtx) end_cursor_range();  // the phase just closed: so is its NVTX range
}

void Timeline::end_eval_stretch() {
  // last_ns_ is the last eval forward's end (eval forwards move it; training boundaries end the
  // pause): the stretch ends there, and what follows belongs to the training phase it paused.
  if (last_ns_ > pause_t0_) add_host(static_cast<int>(Phase::kEval), static_cast<double>(last_ns_ - pause_t0_));
}

void Timeline::end_cursor_range() {
  if (nvtx_cursor_ != 0) {
    nvtx::end(nvtx_cursor_);
    nvtx_cursor_ = 0;
  }
  if (pushed_) {
    // A forward or optimizer push whose end never came (the optimizer raised): pop it where it was
    // pushed; another thread's stack is not ours to pop.
    if (std::this_thread::get_id() == push_thread_) nvtx::pop();
    pushed_ = false;
  }
}

void Timeline::cursor_start(nvtx::Phase p) {
  if (opts_.nvtx) nvtx_cursor_ = nvtx::start(p, nullptr, step_index_);
}

void Timeline::cursor_push(nvtx::Phase p) {
  if (!opts_.nvtx) return;
  nvtx::push(p, nullptr, step_index_);
  pushed_ = true;
  push_thread_ = std::this_thread::get_id();
}

void Timeline::start_step(int64_t now, const EventRef& ev) {
  step_t0_ = now;
  ev_.step = ev.share();
  std::fill(std::begin(step_phase_), std::end(step_phase_), 0.0);
  step_samples_ = 0;
  step_active_ = false;
  step_forward_ = false;
  in_closure_ = false;
  step_has_pause_ = false;
  cur_.serial = ++step_serial_;
  cur_.n_spans = 0;
  cur_.truncated = 0;
  state_ = State::kIdle;
  warm_ = step_index_ < opts_.warmup_steps;
  timer_.begin_step(warm_);
  if (capturing_ && step_index_ == opts_.capture_end) {
    nvtx::capture_end();
    capturing_ = false;
  }
  if (!capturing_ && step_index_ == opts_.capture_begin && opts_.capture_end > opts_.capture_begin) {
    nvtx::capture_begin();
    capturing_ = true;
  }
  // The step's NVTX range opens at its first boundary (boundary()), not here: a loop that stops,
  // or code run after the last step but before detach, must not show up as a step in the trace.
  cursor_start(nvtx::Phase::kData);
}

void Timeline::open_step_range() {
  if (!opts_.nvtx || nvtx_step_ != 0) return;
  char name[40];
  std::snprintf(name, sizeof(name), "step %lld", static_cast<long long>(step_index_));
  nvtx_step_ = nvtx::start(nvtx::Phase::kStep, name, step_index_);
}

void Timeline::finish_step(int64_t now) {
  double total = 0;
  for (int i = 0; i < kNumPartition; ++i) total += step_phase_[i];
  add_host(static_cast<int>(Phase::kStep), total);
  if (timer_.timed()) {
    // An eval pause inside the step cuts it in pieces; the device step would include the eval
    // work, so that step's device total is not sampled (its phases still are).
    if (!step_has_pause_) queue_or_drop(0, static_cast<int>(Phase::kStep), {&ev_.step, &ev_.last});
  }
  StepRecord& r = ring_.push();
  r.index = step_index_;
  r.serial = cur_.serial;
  r.t0 = step_t0_;
  r.t1 = now;
  for (int i = 0; i < kNumPartition; ++i) r.host[i] = step_phase_[i] * 1e-9;
  r.samples = step_samples_;
  r.n_spans = cur_.n_spans;
  r.truncated = cur_.truncated;
  r.warmup = warm_;
  r.device_timed = timer_.timed();
  timer_.read_memory(&memory_);
  r.memory = memory_;
  std::copy_n(cur_.spans.begin(), cur_.n_spans, r.spans.begin());
  if (discard_) {
    ring_.clear();  // a step cut by reset() is kept nowhere, the ring included
  } else {
    stats_.end_step(step_phase_, total, step_samples_, warm_, step_index_);
  }
  if (nvtx_step_ != 0) {
    nvtx::end(nvtx_step_);
    nvtx_step_ = 0;
  }
  timer_.end_step(warm_, !discard_ && !warm_, total);
  ++step_index_;
  timer_.poll(true);  // its time is device timing's cost
  discard_ = false;
  if (!snap_waiting_.empty()) fill_waiting_snapshots();
  start_step(now, ev_.last);
}

void Timeline::forward_begin(bool eval, int64_t batch) {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_) return;
  if (fwd_depth_++ > 0) return;  // the model called inside its own forward: one forward
  const int64_t now = now_ns();
  EventRef ev = record_event(now);
  fwd_eval_ = eval;
  if (eval) {
    flush_optimizer_begin();  // an eval forward inside the optimizer step is no closure
    if (!paused_) {
      // Cut the open training span here; it resumes at the next training boundary.
      paused_ = true;
      step_has_pause_ = true;
      pause_t0_ = now;
      carry_t0_ = last_ns_;
      carry_ns_ = now - last_ns_;
      ev_.carry_a = std::move(ev_.last);  // the last boundary's reference moves to the carry
      ev_.carry_b = ev.share();
    }
    eval_t0_ = now;
    ev_.eval = std::move(ev);
    if (opts_.nvtx) nvtx::push(nvtx::Phase::kEval, nullptr, step_index_);
    return;
  }
  Phase closes = Phase::kData;
  if (opt_deferred_) {
    // The model runs inside the optimizer's step: a closure. The optimizer's prelude joins data.
    ev_.opt.reset();
    opt_deferred_ = false;
    in_closure_ = true;
  } else if (in_closure_) {
    closes = Phase::kOptimizer;  // the closure called again (LBFGS): the optimizer worked in between
  }
  boundary(closes, now, std::move(ev));
  cursor_push(nvtx::Phase::kForward);
  if (batch > 0 && closes != Phase::kOptimizer) step_samples_ += batch;  // a closure again: the same batch
  step_forward_ = true;
  state_ = State::kForward;
}

void Timeline::forward_end() {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_ || fwd_depth_ == 0) return;
  if (--fwd_depth_ > 0) return;
  const int64_t now = now_ns();
  EventRef ev = record_event(now);
  if (fwd_eval_) {
    add_host(static_cast<int>(Phase::kEvalForward), static_cast<double>(now - eval_t0_));
    if (timer_.timed()) queue_or_drop(0, static_cast<int>(Phase::kEvalForward), {&ev_.eval, &ev});
    ev_.eval.reset();
    // The pause lasts until the next training boundary: training resumes from here.
    ev_.last = std::move(ev);
    last_ns_ = now;
    if (opts_.nvtx) nvtx::pop();
    return;
  }
  boundary(Phase::kForward, now, std::move(ev));
  cursor_start(nvtx::Phase::kLoss);
  state_ = State::kAfterForward;
}

bool Timeline::backward_begin() {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_ || state_ == State::kBackward) return false;
  flush_optimizer_begin();
  const int64_t now = now_ns();
  boundary(Phase::kLoss, now, record_event(now));
  cursor_start(nvtx::Phase::kBackward);
  state_ = State::kBackward;
  return true;
}

void Timeline::backward_end() {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_ || state_ != State::kBackward) return;
  const int64_t now = now_ns();
  boundary(Phase::kBackward, now, record_event(now));
  cursor_start(in_closure_ ? nvtx::Phase::kOptimizer : nvtx::Phase::kOther);
  state_ = State::kAfterBackward;
}

void Timeline::optimizer_begin() {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_ || state_ == State::kOptimizer) return;
  if (fwd_depth_ > 0) {
    // Inside a forward marked by hand around the optimizer step: the closure is that forward.
    if (!fwd_eval_) in_closure_ = true;
    return;
  }
  const int64_t now = now_ns();
  EventRef ev = record_event(now);
  if (in_closure_) {  // after the closure ran: an ordinary boundary
    boundary(Phase::kOther, now, std::move(ev));
  } else {
    // Whether this span is `other` or the prelude of a closure's `data` is known at the next
    // forward or at optimizer_end; the NVTX range cannot wait, so it shows the optimizer call.
    open_step_range();
    end_cursor_range();
    opt_deferred_ = true;
    opt_ns_ = now;
    ev_.opt = std::move(ev);  // the record's reference waits here
  }
  cursor_push(nvtx::Phase::kOptimizer);
  state_ = State::kOptimizer;
}

void Timeline::flush_optimizer_begin() {
  if (!opt_deferred_) return;
  opt_deferred_ = false;
  // The optimizer's NVTX range stays open; the event's reference now belongs to the last boundary.
  boundary(Phase::kOther, opt_ns_, std::move(ev_.opt), false);
}

void Timeline::optimizer_end(bool end_step) {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_) return;
  // A closure step ends here from wherever its closure left off (backward end, usually).
  const bool closure_end = in_closure_ && fwd_depth_ == 0 && state_ != State::kBackward;
  if (state_ != State::kOptimizer && !closure_end) return;
  const int64_t now = now_ns();
  EventRef ev = end_step ? timer_.record(now, end_boundary_wanted()) : record_event(now);
  flush_optimizer_begin();
  boundary(Phase::kOptimizer, now, std::move(ev));
  in_closure_ = false;
  if (end_step) {
    finish_step(now);
  } else {
    cursor_start(nvtx::Phase::kOther);
    state_ = State::kAfterOptimizer;
  }
}

bool Timeline::step() {
  std::lock_guard<SpinLock> g(mu_);
  TORCH_CHECK(fwd_depth_ == 0, "stepscope: step() called inside the model's forward; call it after the "
              "optimizer step (or where the step ends)");
  if (closed_) return false;
  flush_optimizer_begin();
  if (!step_active_) return false;
  const int64_t now = now_ns();
  boundary(Phase::kOther, now, timer_.record(now, end_boundary_wanted()));
  finish_step(now);
  return true;
}

bool Timeline::forward_seen() const {
  std::lock_guard<SpinLock> g(mu_);
  return step_forward_;
}


void Timeline::close() {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_) return;
  end_cursor_range();
  if (nvtx_step_ != 0) {
    nvtx::end(nvtx_step_);
    nvtx_step_ = 0;
  }
  if (capturing_) {
    nvtx::capture_end();
    capturing_ = false;
  }
  if (paused_) end_eval_stretch();  // an evaluation that no training followed
  // The open step is partial (the loop stopped or raised mid-step): it is not recorded.
  ev_ = StepEvents{};
  for (auto* v : {&users_.open, &modules_.open})
    for (Open& o : *v) o = Open{};
  paused_ = false;
  carry_ns_ = 0;
  opt_deferred_ = false;
  in_closure_ = false;
  fwd_depth_ = 0;
  state_ = State::kIdle;
  closed_ = true;
  fold_host();  // the partial step's phases still count
  poll_locked();
  discard_ = false;
  if (!snap_waiting_.empty()) fill_waiting_snapshots();
}

void Timeline::poll() {
  std::lock_guard<SpinLock> g(mu_);
  poll_locked();
}

void Timeline::fill_waiting_snapshots() {
  fold_host();
  for (auto& s : snap_waiting_) fill_snapshot(*s);
  snap_waiting_.clear();
}

int64_t Timeline::step_index() const {
  std::lock_guard<SpinLock> g(mu_);
  return step_index_;
}

void Timeline::keep_out_step() {
  std::lock_guard<SpinLock> g(mu_);
  warm_ = true;
}

int64_t Timeline::steps() const {
  std::lock_guard<SpinLock> g(mu_);
  return stats_.steps();
}

}  // namespace stepscope::timing
