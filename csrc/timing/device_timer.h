// The Timeline's device side: CUDA events recorded at boundaries (EventPool, held by EventRef),
// the device spans waiting for them, resolving them without blocking (cudaEventQuery only), queue
// lag (the GPU's phases placed on the host clock: timing/device_clock.h), device sampling
// (timing/device_sampling.h) and the allocator's counters. Without CUDA at build or run time, or
// with device timing off, enabled() is false and every record is an empty EventRef.
//
// Not thread-safe: the Timeline calls it under its lock.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <initializer_list>
#include <limits>

#include "phases.h"
#include "timing/device_clock.h"
#include "timing/device_sampling.h"
#include "timing/event_pool.h"
#include "timing/stats.h"

namespace stepscope::timing {

struct SpanRecord;

// Device time to resolve: one event pair, or two when an eval pause cut the span.
struct DeviceSpan {
  enum Kind : int { kPhase = 0, kUser = 1, kModule = 2 };
  int kind;
  int id;     // Phase, user phase or module id
  bool warm;  // recorded during a warm-up step: totalled apart
  EventRef a0, b0, a1, b1;  // a1/b1 empty: one pair
  uint64_t serial;  // the step it belongs to (StepRecord::serial) ...
  int slot;         // ... and its SpanRecord there (-1: none), for the device times
};

// Where resolved spans go: the Timeline's statistics and its ring of recent steps.
class DeviceSink {
 public:
  // A resolved span of a step after the last reset (seconds: ns * 1e-9).
  virtual void device_time(const DeviceSpan& d, double ns) = 0;
  // The trace's record of a partition span (serial, slot), or null where it is kept no more.
  virtual SpanRecord* span_record(uint64_t serial, int slot) = 0;

 protected:
  ~DeviceSink() = default;
};

class DeviceTimer {
 public:
  // origin: the Timeline's clock origin (host times are ns since it); sink: must outlive this.
  DeviceTimer(bool device, int event_pool, int64_t device_every, std::chrono::steady_clock::time_point origin,
              DeviceSink* sink);

  bool enabled() const { return enabled_; }

  // Attach. needs_anchor(): the device clock has no reference yet. anchor() makes one, with the one
  // synchronisation there ever is (an event on an idle queue: the next one is reached as soon as it
  // is recorded), and records the first step's opening event at *now, which anchors the clock.
  bool needs_anchor() const { return enabled_ && !clock_.valid(); }
  EventRef anchor(int64_t* now);
  void opened() { sampler_.opened(events_); }

  // Device sampling (timing/device_sampling.h): whether the step about to open (`warm`: a warm-up
  // step) records events, the open step's choice (begin_step) and whether it records (timed()).
  bool next_timed(bool warm) const { return sampler_.next_timed(warm); }
  void begin_step(bool warm) { timed_ = enabled_ && sampler_.begin_step(warm); }
  bool timed() const { return timed_; }
  // A step ended (host total ns); counts it as device-timed when it was and it is steady.
  void end_step(bool warm, bool counted, double total_ns);

  // An event for a boundary at host time `now` when `want`; empty otherwise, and when the pool is
  // exhausted after polling (the GPU lags: the sample is dropped).
  EventRef record(int64_t now, bool want);
  // Queues a device span over its events' pair (or two pairs, around an eval pause) when every
  // event was recorded, else counts a dropped sample.
  void queue(int kind, int id, bool warm, uint64_t serial, std::initializer_list<const EventRef*> events,
             int slot = -1);
  // Resolves the completed spans, in order; nothing waits. cost: count the time it takes as device
  // timing's host cost (the sampler's input; at a step's end).
  void poll(bool cost = false);
  // The allocator's counters of the pool's device (left as they are without device timing).
  void read_memory(DeviceMemory* out) const;

  // Statistics: forget them (spans of step `serial` and before are dropped when they resolve), and
  // the counters a snapshot subtracts.
  void reset(uint64_t serial);
  int64_t dropped() const { return dropped_; }
  int64_t pending() const { return static_cast<int64_t>(pending_.size()); }
  int64_t events() const { return events_; }
  int64_t device_steps() const { return device_steps_; }
  const std::array<Series, kNumPartition>& lag() const { return lag_; }
  int64_t every() const { return enabled_ ? sampler_.every() : 0; }
  bool auto_every() const { return enabled_ && sampler_.auto_mode(); }
  double record_ns() const { return sampler_.record_ns(); }

 private:
  int64_t now_ns() const {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - origin_).count();
  }
  void place_on_host_clock(const DeviceSpan& d, float m0, float m1, double seen);

  EventPool pool_;  // first: every EventRef below releases into it
  bool enabled_;
  std::chrono::steady_clock::time_point origin_;
  DeviceSink* sink_;
  std::deque<DeviceSpan> pending_;
  int64_t dropped_ = 0;
  // Queue lag: the device clock mapped onto the host's, anchored at a resolved boundary event that
  // is kept referenced here.
  DeviceClock clock_;
  EventRef anchor_ev_;
  std::array<Series, kNumPartition> lag_;
  double lag_min_ns_ = std::numeric_limits<double>::infinity();  // least queue lag placed this step
  uint64_t reset_serial_ = 0;  // the newest step serial the last reset() cut
  // Sampling: whether the open step records events, the steady steps that did, every boundary
  // event recorded, and the host time spent recording and resolving them.
  DeviceSampler sampler_;
  bool timed_ = false;
  int64_t device_steps_ = 0;
  int64_t events_ = 0;
  int64_t cost_ns_ = 0;
};

}  // namespace stepscope::timing
