// The Timeline's read-outs: report() and pack() (from its components' figures), and intervals
// (snapshot, reset). The statistics themselves: timing/phase_stats.cpp.
#include <c10/util/Exception.h>

#include "timing/timeline.h"

namespace stepscope::timing {

Report Timeline::report(const TimelineSnapshot* since) {
  std::lock_guard<SpinLock> g(mu_);
  poll_locked();
  fold_host();
  return report_locked(since);
}

const TimelineSnapshot* Timeline::base_of(const TimelineSnapshot* since, TimelineSnapshot& scratch) const {
  if (since == nullptr) return nullptr;
  TORCH_CHECK_VALUE(since->owner == id_, "stepscope: since must be a snapshot of this Timeline (Monitor); got one "
                    "taken from another");
  if (!since->ready) {  // its step has not ended: no step ended after it yet
    fill_snapshot(scratch);
    return &scratch;
  }
  return since->generation == stats_.generation() ? since : nullptr;
}

void Timeline::fill_snapshot(TimelineSnapshot& s) const {
  s.owner = id_;
  stats_.fill(s, timer_.enabled());
  if (timer_.enabled()) s.lag = timer_.lag();
  s.dropped = timer_.dropped();
  s.device_steps = timer_.device_steps();
  s.device_events = timer_.events();
  s.first_step = step_index_;
  s.ready = true;
}

std::shared_ptr<TimelineSnapshot> Timeline::snapshot() {
  auto s = std::make_shared<TimelineSnapshot>();
  std::lock_guard<SpinLock> g(mu_);
  s->owner = id_;
  if (step_active_ && !closed_) {
    snap_waiting_.push_back(s);  // filled by finish_step (or close)
    return s;
  }
  poll_locked();
  fold_host();
  fill_snapshot(*s);
  return s;
}

void Timeline::reset() {
  std::lock_guard<SpinLock> g(mu_);
  poll_locked();  // what resolves now is dropped with the rest; what resolves later, by its serial
  stats_.reset();
  ring_.clear();
  // The open step began before the reset when a boundary closed one of its phases: half of it is
  // forgotten, so none of it counts. Otherwise (between steps) it is the first step after the reset.
  const bool began = step_active_ && !closed_;
  discard_ = began;
  timer_.reset(began ? step_serial_ : step_serial_ - 1);
}

Report Timeline::report_locked(const TimelineSnapshot* since) {
  TimelineSnapshot scratch;
  const TimelineSnapshot* b = base_of(since, scratch);
  const bool device = timer_.enabled();
  Report r;
  r.device = device;
  stats_.report(r, b, device);
  r.dropped_device_samples = timer_.dropped() - (b ? b->dropped : 0);
  r.pending_device_samples = timer_.pending();
  r.memory = memory_;
  r.memory_trend = memory_trend(ring_, b ? b->first_step : 0);
  if (device) {
    // Named by the boundary that closes each phase (the phase table's `closes`).
    for (int i = 0; i < kNumPartition; ++i)
      r.lag.push_back(NamedSummary{boundary_name(i), summary_of(timer_.lag()[i], b ? &b->lag[i] : nullptr), {}});
  }
  r.device_steps = timer_.device_steps() - (b ? b->device_steps : 0);
  r.device_every = timer_.every();
  r.device_every_auto = timer_.auto_every();
  r.device_events = timer_.events() - (b ? b->device_events : 0);
  r.event_record_cost = timer_.record_ns() * 1e-9;
  return r;
}

std::vector<double> Timeline::pack(const TimelineSnapshot* since) {
  std::lock_guard<SpinLock> g(mu_);
  poll_locked();
  fold_host();
  TimelineSnapshot scratch;
  const TimelineSnapshot* b = base_of(since, scratch);
  std::vector<double> v(kPackedWords, 0.0);
  stats_.pack(v.data(), b, timer_.enabled());
  v[7] = static_cast<double>(timer_.dropped() - (b ? b->dropped : 0));
  v[8] = static_cast<double>(timer_.pending());
  v[9] = static_cast<double>(timer_.device_steps() - (b ? b->device_steps : 0));
  return v;
}

}  // namespace stepscope::timing
