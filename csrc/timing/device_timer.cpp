// The Timeline's device side (timing/device_timer.h): recording boundary events, resolving the
// device spans without blocking and placing the GPU's phases on the host clock.
#include "timing/device_timer.h"

#include <algorithm>

#include "timing/timeline.h"

namespace stepscope::timing {

DeviceTimer::DeviceTimer(bool device, int event_pool, int64_t device_every,
                         std::chrono::steady_clock::time_point origin, DeviceSink* sink)
    : pool_(event_pool),
      enabled_(device && EventPool::available()),
      origin_(origin),
      sink_(sink),
      sampler_(device_every) {}

EventRef DeviceTimer::anchor(int64_t* now) {
  bool synced = false;
  {
    const EventRef ref = EventRef::adopt(&pool_, pool_.record());
    synced = ref && pool_.synchronize(ref.slot());
  }
  *now = now_ns();
  EventRef ev = record(*now, true);  // the first step is always device-timed
  if (synced && ev) {
    clock_.anchor(static_cast<double>(*now));
    anchor_ev_ = ev.share();
  }
  return ev;
}

void DeviceTimer::end_step(bool warm, bool counted, double total_ns) {
  if (counted && timed_) ++device_steps_;
  if (!enabled_) return;
  sampler_.end_step(warm, timed_, total_ns, events_, static_cast<double>(cost_ns_), lag_min_ns_);
  lag_min_ns_ = std::numeric_limits<double>::infinity();
}

EventRef DeviceTimer::record(int64_t now, bool want) {
  if (!enabled_ || !want) return EventRef();
  int s = pool_.record();
  if (s < 0) {
    poll();  // completed events free their slots; still nothing free: the GPU lags, drop
    s = pool_.record();
  }
  if (s >= 0) {
    pool_.stamp(s, now);
    ++events_;
  }
  // What device timing costs the host, measured where it is paid, in the loop (an event record
  // behind a busy stream costs far more than one on an idle stream): the sampler's input.
  cost_ns_ += now_ns() - now;
  return EventRef::adopt(&pool_, s);
}

void DeviceTimer::queue(int kind, int id, bool warm, uint64_t serial, std::initializer_list<const EventRef*> events,
                        int slot) {
  // A boundary whose event could not be recorded (the pool ran dry: the GPU lags) loses the sample.
  for (const EventRef* e : events)
    if (!*e) {
      ++dropped_;
      return;
    }
  const EventRef* const* e = events.begin();
  const bool two = events.size() == 4;  // an eval pause cut the span in two
  pending_.push_back(DeviceSpan{kind, id, warm, e[0]->share(), e[1]->share(), two ? e[2]->share() : EventRef(),
                                two ? e[3]->share() : EventRef(), serial, slot});
}

void DeviceTimer::read_memory(DeviceMemory* out) const {
  if (enabled_) read_device_memory(pool_.device(), out);
}

void DeviceTimer::reset(uint64_t serial) {
  for (Series& s : lag_) s = Series{};
  dropped_ = 0;
  device_steps_ = 0;
  events_ = 0;
  // The sampler counts the events of each step as a difference of totals: restart its total with
  // ours, or the first step after the reset would count a negative number of events.
  sampler_.opened(0);
  reset_serial_ = serial;
}

void DeviceTimer::place_on_host_clock(const DeviceSpan& d, float m0, float m1, double seen) {
  // The boundary that closed the phase is the span's last event; the event before it opened the
  // phase. When the opening event is the clock's anchor (the usual chain: consecutive boundaries),
  // the phase's own elapsed time places it. Otherwise (the first phase of a device-timed step after
  // untimed ones, an eval pause, a dropped sample, a re-attach) the clock re-anchors at the opening
  // event first: one more elapsed-time query against the anchor places it, clamped into its own
  // window (DeviceClock::place), so that the phase then chains from a boundary of its own step and
  // the gap's drift is corrected where it can be, not carried into the phase.
  const bool two = static_cast<bool>(d.a1);
  const EventRef& open_ref = two ? d.a1 : d.a0;
  const EventRef& close_ref = two ? d.b1 : d.b0;
  const int open = open_ref.slot(), close = close_ref.slot();
  if (open != anchor_ev_.slot()) {
    const float m = pool_.elapsed_ms(anchor_ev_.slot(), open);
    if (m < 0) return;  // failed, or recorded before the anchor: no lag sample, keep the anchor
    clock_.place(m * 1e6, static_cast<double>(pool_.stamp(open)), seen);
    anchor_ev_ = open_ref.share();
  }
  const double elapsed_ms = two ? m1 : m0;
  const double lag = clock_.place(elapsed_ms * 1e6, static_cast<double>(pool_.stamp(close)), seen);
  if (!d.warm && d.serial > reset_serial_) lag_[d.id].add(std::max(lag, 1.0));  // the histogram's floor is 1 ns
  lag_min_ns_ = std::min(lag_min_ns_, lag);
  if (!two && d.slot >= 0) {
    // The span's device interval for the trace: it closed at the placed time, and opened the
    // phase's own elapsed time before.
    if (SpanRecord* r = sink_->span_record(d.serial, d.slot)) {
      const double opened = clock_.anchor_ns() - m0 * 1e6;
      r->lag1_us = static_cast<float>(lag * 1e-3);
      r->lag0_us = static_cast<float>((opened - static_cast<double>(pool_.stamp(open))) * 1e-3);
    }
  }
  anchor_ev_ = close_ref.share();
}

void DeviceTimer::poll(bool cost) {
  // In order, stopping at the first span still in flight: cheap, and a span recorded later on the
  // same stream cannot be complete before it anyway.
  if (pending_.empty()) return;  // always, without device timing
  const int64_t t0 = now_ns();
  const double seen = static_cast<double>(t0);
  while (!pending_.empty()) {
    const DeviceSpan& d = pending_.front();
    bool failed = false, in_flight = false;
    for (const EventRef* e : {&d.a0, &d.b0, &d.a1, &d.b1}) {
      if (!*e) continue;
      const int q = pool_.query(e->slot());
      if (q == 0) {
        in_flight = true;
        break;
      }
      if (q < 0) failed = true;
    }
    if (in_flight) break;
    double ms = 0;
    if (!failed) {
      const float m0 = pool_.elapsed_ms(d.a0.slot(), d.b0.slot());
      const float m1 = d.a1 ? pool_.elapsed_ms(d.a1.slot(), d.b1.slot()) : 0.f;
      failed = m0 < 0 || m1 < 0;
      ms = static_cast<double>(m0) + static_cast<double>(m1);
      if (!failed && d.kind == DeviceSpan::kPhase && d.id < kNumPartition && anchor_ev_)
        place_on_host_clock(d, m0, m1, seen);
    }
    if (d.serial <= reset_serial_) {
      // A step before the last reset(): forgotten with it.
    } else if (failed) {
      ++dropped_;
    } else {
      sink_->device_time(d, ms * 1e6);
    }
    pending_.pop_front();  // releases its events
  }
  if (cost && enabled_) cost_ns_ += now_ns() - t0;
}

}  // namespace stepscope::timing
