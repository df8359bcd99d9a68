// Which steps record CUDA events. An event record costs the host what a kernel launch costs (about
// 10 us on a virtualised host), so on a small host-bound step (~1 ms, ~7 boundaries) recording on
// every step would cost several percent of it. Device times are therefore sampled: one step in
// `every` is device-timed (all of its boundaries record, the one that opens it included); the other
// steps record no event at all, and their host times are kept as usual. No ATen or CUDA here, so
// the GoogleTests exercise the rule directly.
//
// every = 0 (auto) chooses k from what recording costs against the step:
//   k = max(1, ceil(events_per_step * record_cost / (budget * host_step)))   budget = 1%
// so that recording costs at most ~1% of the host's step; a GPU-bound step (host step = device step
// of several ms) keeps k = 1. The record cost is measured where it is paid: the Timeline passes its
// running total of host time spent recording and resolving events, and each window's cost per event
// is the one the choice uses (on a virtualised host a record behind a busy stream was seen to cost
// ten times one on an idle stream, so a cost measured apart from the loop misleads). The step time
// (less that cost) and the events per timed step are the means over the steady steps since the
// last choice, where a timed step's events are those recorded from its first boundary to its end,
// plus the one that opens it
// (shared with the step before when that one is timed too: 6 + 1 for a plain step). Auto times every
// step for the first kAutoFirst steady steps (there is no step time yet), then chooses k and again
// every kAutoEvery steady steps, as the step time settles.
//
// A queued GPU makes recording free: when every boundary placed in a window lagged the host by at
// least kQueuedLagNs (the GPU runs that far behind, so the host waits on it anyway, and an event
// record may itself wait for room in the launch queue, which would read as a huge cost), k is 1.
//
// Warm-up steps are always device-timed: there are few of them, their device totals are reported
// apart, and the compilation and autotuning they hold is what a person wants to see on the device.
// The first steady step is device-timed, then one in k.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace stepscope::timing {

constexpr double kDeviceBudget = 0.01;  // the share of the host's step that event records may cost
constexpr int64_t kAutoFirst = 8;       // steady steps before the first choice
constexpr int64_t kAutoEvery = 32;      // steady steps between later choices
constexpr int64_t kMaxDeviceEvery = 1 << 20;
constexpr double kQueuedLagNs = 1e6;  // least lag of a window above which the GPU is the bottleneck

// The rule above. 1 whenever an input is unknown (<= 0): time every step rather than guess.
inline int64_t choose_device_every(double record_ns, double events_per_step, double step_ns,
                                   double budget = kDeviceBudget) {
  if (!(record_ns > 0) || !(events_per_step > 0) || !(step_ns > 0) || !(budget > 0)) return 1;
  const double k = std::ceil(events_per_step * record_ns / (budget * step_ns));
  if (!(k < static_cast<double>(kMaxDeviceEvery))) return kMaxDeviceEvery;
  return std::max<int64_t>(1, static_cast<int64_t>(k));
}

class DeviceSampler {
 public:
  // every >= 1: one step in `every`; 0: auto.
  explicit DeviceSampler(int64_t every = 0) : auto_(every <= 0), every_(every <= 0 ? 1 : every) {}

  bool auto_mode() const { return auto_; }
  int64_t every() const { return every_; }
  void set_record_ns(double ns) { record_ns_ = ns; }
  double record_ns() const { return record_ns_; }
  // Events per timed step at the last choice (0 before it).
  double events_per_step() const { return events_per_step_; }

  // Whether the next step to begin will be device-timed (the boundary that ends the current step
  // opens it, so it records an event when either step is timed).
  bool next_timed(bool next_warm) const { return next_warm || countdown_ == 0; }

  // At attach, after the first step's opening boundary: the events counted so far are no step's.
  void opened(int64_t events_total) { last_total_ = events_total; }

  // A step begins: whether it is device-timed. Call once per step, in order.
  bool begin_step(bool warm) {
    if (warm) return true;
    const bool timed = countdown_ == 0;
    countdown_ = timed ? every_ - 1 : countdown_ - 1;
    return timed;
  }

  // A steady step ended: its host time and the Timeline's running count of events recorded.
  // Auto mode chooses k here (kAutoFirst steps after the first steady step, then every kAutoEvery).
  // A new k applies from the next timed step on: steps already promised stay promised.
  // `cost_total_ns`: the Timeline's running total of host time spent on device timing (< 0: not
  // measured; the record cost stays what set_record_ns() gave, which the GoogleTests use).
  // `lag_min_ns`: the least queue lag of the boundaries placed during this step (+inf: none).
  void end_step(bool warm, bool timed, double step_ns, int64_t events_total, double cost_total_ns = -1,
                double lag_min_ns = std::numeric_limits<double>::infinity()) {
    const int64_t during = events_total - last_total_;  // recorded in this step, its end included
    last_total_ = events_total;
    const double cost = cost_total_ns >= 0 ? cost_total_ns - last_cost_ : 0;
    if (cost_total_ns >= 0) last_cost_ = cost_total_ns;
    if (warm) return;
    ++steady_;
    win_ns_ += step_ns;
    win_cost_ += cost;
    win_lag_min_ = std::min(win_lag_min_, lag_min_ns);
    win_all_events_ += during;
    ++win_steps_;
    if (timed) {
      ++win_timed_;
      win_events_ += during;
    }
    if (!auto_) return;
    const bool due = steady_ == kAutoFirst || (steady_ > kAutoFirst && (steady_ - kAutoFirst) % kAutoEvery == 0);
    if (!due) return;
    if (win_timed_ > 0) {
      events_per_step_ = static_cast<double>(win_events_) / static_cast<double>(win_timed_) + 1.0;
      if (win_cost_ > 0 && win_all_events_ > 0) record_ns_ = win_cost_ / static_cast<double>(win_all_events_);
      const double step = (win_ns_ - win_cost_) / static_cast<double>(win_steps_);
      every_ = choose_device_every(record_ns_, events_per_step_, step > 0 ? step : win_ns_ / win_steps_);
      if (std::isfinite(win_lag_min_) && win_lag_min_ >= kQueuedLagNs) every_ = 1;
      // A smaller k shortens the wait, but never to zero from here: the boundary that opens the next
      // step has already passed without an event.
      if (countdown_ > 0) countdown_ = std::max<int64_t>(1, std::min(countdown_, every_ - 1));
    }
    // A window with no timed step keeps k (it cannot tell the events per step) and the next window
    // restarts from here.
    win_ns_ = win_cost_ = 0;
    win_lag_min_ = std::numeric_limits<double>::infinity();
    win_steps_ = win_timed_ = win_events_ = win_all_events_ = 0;
  }

 private:
  bool auto_;
  int64_t every_;
  int64_t countdown_ = 0;  // steady steps until the next timed one
  double record_ns_ = 0;
  double events_per_step_ = 0;
  int64_t steady_ = 0;
  int64_t last_total_ = 0;
  double last_cost_ = 0;
  double win_ns_ = 0, win_cost_ = 0;
  double win_lag_min_ = std::numeric_limits<double>::infinity();
  int64_t win_steps_ = 0, win_timed_ = 0, win_events_ = 0, win_all_events_ = 0;
};

}  // namespace stepscope::timing
