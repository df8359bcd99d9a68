// The Timeline's CUDA events: recording them at boundaries, the device spans waiting for them,
// resolving them without blocking (cudaEventQuery only) and placing the GPU's phases on the host
// clock (timing/device_clock.h).
#include <algorithm>
#include <initializer_list>

#include "timing/timeline.h"

namespace stepscope::timing {

bool Timeline::end_boundary_wanted() const {
  return dev_step_ || sampler_.next_timed(step_index_ + 1 < opts_.warmup_steps);
}

int Timeline::record_event_if(int64_t now, bool want) {
  if (!device_ || !want) return -1;
  int s = pool_.record();
  if (s < 0) {
    poll_locked();  // completed events free their slots; still nothing free: the GPU lags, drop
    s = pool_.record();
  }
  if (s >= 0) {
    pool_.stamp(s, now);
    ++events_;
  }
  // What device timing costs the host, measured where it is paid (an event record on a busy
  // stream costs far more than on the idle one measured at attach): the sampler's input.
  dev_cost_ns_ += now_ns() - now;
  return s;
}


void Timeline::queue_or_drop(int kind, int id, std::initializer_list<int> events, int slot) {
  // A boundary whose event could not be recorded (the pool ran dry: the GPU lags) loses the sample.
  for (int s : events)
    if (s < 0) {
      ++dropped_;
      return;
    }
  const int* e = events.begin();
  const bool two = events.size() == 4;  // an eval pause cut the span in two
  const int a1 = two ? e[2] : -1, b1 = two ? e[3] : -1;
  for (int s : events) pool_.ref(s);
  pending_.push_back(DevSpan{kind, id, warm_, e[0], e[1], a1, b1, step_serial_, slot});
}

SpanRecord* Timeline::span_record(uint64_t serial, int slot) {
  // One of the newest in the ring (events resolve a step or two late), else the open step; a step
  // already pushed out of the ring, or cut by close(), is simply not found. The ring comes first:
  // a step's end pushes its record and then polls, while cur_ still carries the same serial, and
  // the pushed copy is the one that is kept.
  for (size_t k = ring_.size(); k-- > 0;) {
    StepRecord& r = ring_[k];
    if (r.serial == serial) return slot < r.n_spans ? &r.spans[slot] : nullptr;
    if (r.serial < serial) break;
  }
  if (serial == cur_.serial) return slot < cur_.n_spans ? &cur_.spans[slot] : nullptr;
  return nullptr;
}

void Timeline::pool_unref(int slot) {
  if (slot >= 0) pool_.unref(slot);
}


void Timeline::poll() {
  std::lock_guard<SpinLock> g(mu_);
  poll_locked();
}

void Timeline::place_on_host_clock(const DevSpan& d, float m0, float m1, double seen) {
  // The boundary that closed the phase is the span's last event; the event before it opened the
  // phase. When the opening event is the clock's anchor (the usual chain: consecutive boundaries),
  // the phase's own elapsed time places it. Otherwise (the first phase of a device-timed step after
  // untimed ones, an eval pause, a dropped sample, a re-attach) the clock re-anchors at the opening
  // event first: one more elapsed-time query against the anchor places it, clamped into its own
  // window (DeviceClock::place), so that the phase then chains from a boundary of its own step and
  // the gap's drift is corrected where it can be, not carried into the phase.
  const bool two = d.a1 >= 0;
  const int open = two ? d.a1 : d.a0, close = two ? d.b1 : d.b0;
  if (open != anchor_ev_) {
    const float m = pool_.elapsed_ms(anchor_ev_, open);
    if (m < 0) return;  // failed, or recorded before the anchor: no lag sample, keep the anchor
    clock_.place(m * 1e6, static_cast<double>(pool_.stamp(open)), seen);
    pool_.ref(open);
    pool_unref(anchor_ev_);
    anchor_ev_ = open;
  }
  const double elapsed_ms = two ? m1 : m0;
  const double lag = clock_.place(elapsed_ms * 1e6, static_cast<double>(pool_.stamp(close)), seen);
  if (!d.warm && d.serial > reset_serial_) lag_[d.id].add(std::max(lag, 1.0));  // the histogram's floor is 1 ns
  lag_min_ns_ = std::min(lag_min_ns_, lag);
  if (!two && d.slot >= 0) {
    // The span's device interval for the trace: it closed at the placed time, and opened the
    // phase's own elapsed time before.
    if (SpanRecord* r = span_record(d.serial, d.slot)) {
      const double opened = clock_.anchor_ns() - m0 * 1e6;
      r->lag1_us = static_cast<float>(lag * 1e-3);
      r->lag0_us = static_cast<float>((opened - static_cast<double>(pool_.stamp(open))) * 1e-3);
    }
  }
  pool_.ref(close);
  pool_unref(anchor_ev_);
  anchor_ev_ = close;
}

void Timeline::poll_locked() {
  // In order, stopping at the first span still in flight: cheap, and a span recorded later on the
  // same stream cannot be complete before it anyway.
  const double seen = static_cast<double>(now_ns());
  while (!pending_.empty()) {
    const DevSpan& d = pending_.front();
    bool failed = false;
    for (int s : {d.a0, d.b0, d.a1, d.b1}) {
      if (s < 0) continue;
      const int q = pool_.query(s);
      if (q == 0) return;
      if (q < 0) failed = true;
    }
    double ms = 0;
    if (!failed) {
      const float m0 = pool_.elapsed_ms(d.a0, d.b0);
      const float m1 = d.a1 >= 0 ? pool_.elapsed_ms(d.a1, d.b1) : 0.f;
      failed = m0 < 0 || m1 < 0;
      ms = static_cast<double>(m0) + static_cast<double>(m1);
      if (!failed && d.kind == 0 && d.id < kNumPartition && anchor_ev_ >= 0) place_on_host_clock(d, m0, m1, seen);
    }
    if (d.serial <= reset_serial_) {
      // A step before the last reset(): forgotten with it.
    } else if (failed) {
      ++dropped_;
    } else {
      const double ns = ms * 1e6;
      if (d.warm) {
        if (d.kind == 0) {
          warm_sum_.device[d.id] += ns * 1e-9;
          ++warm_sum_.device_count[d.id];
        }
      } else if (d.kind == 0) {
        dev_[d.id].add(ns);
      } else if (d.kind == users_.kind) {
        users_.dev[d.id].add(ns);
      } else {
        modules_.dev[d.id].add(ns);
      }
    }
    for (int s : {d.a0, d.b0, d.a1, d.b1}) pool_unref(s);
    pending_.pop_front();
  }
}


}  // namespace stepscope::timing
