// Device sampling (timing/device_sampling.h): the rule that picks one step in k, the schedule it
// drives through the Timeline's protocol, and the device clock's re-anchoring after untimed steps.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "timing/device_clock.h"
#include "timing/device_sampling.h"
#include "timing/timeline.h"

using namespace stepscope::timing;

TEST(DeviceSamplingRule, ChoosesKFromRecordCostEventsAndStep) {
  // The small MLP step measured on a virtualised host: 10 us per record, 7 boundaries, 1 ms.
  EXPECT_EQ(choose_device_every(10e3, 7, 1e6), 7);
  EXPECT_EQ(choose_device_every(10e3, 7, 1.2e6), 6);   // ceil(5.83)
  EXPECT_EQ(choose_device_every(10e3, 7, 7e6), 1);     // exactly 1%
  EXPECT_EQ(choose_device_every(10e3, 7, 7.01e6), 1);  // GPU-bound, several ms: every step
  EXPECT_EQ(choose_device_every(10e3, 7, 6.9e6), 2);
  EXPECT_EQ(choose_device_every(2e3, 6, 50e6), 1);     // a bare-metal host, a large step
  EXPECT_EQ(choose_device_every(10e3, 7, 1e6, 0.05), 2);
  // Unknown inputs time every step rather than guess.
  for (double bad : {0.0, -1.0, std::nan("")}) {
    EXPECT_EQ(choose_device_every(bad, 7, 1e6), 1);
    EXPECT_EQ(choose_device_every(10e3, bad, 1e6), 1);
    EXPECT_EQ(choose_device_every(10e3, 7, bad), 1);
  }
  EXPECT_EQ(choose_device_every(1e9, 1e3, 1.0), kMaxDeviceEvery);
}

namespace {

// Drives a DeviceSampler as the Timeline does: the step-ending boundary records an event when the
// step or the next one is timed, then end_step(), then begin_step() of the next step. Checks at
// each timed step that its opening boundary had an event, and counts events as the Timeline does.
struct Drive {
  DeviceSampler s;
  int64_t warmup;
  int64_t index = 0, events = 0, timed_steady = 0;
  bool timed;
  std::vector<bool> flags;
  Drive(int64_t every, int64_t warmup_steps, double record_ns) : s(every), warmup(warmup_steps) {
    s.set_record_ns(record_ns);
    const bool want = s.next_timed(0 < warmup);  // attach: the first step's opening boundary
    if (want) ++events;
    s.opened(events);
    timed = s.begin_step(0 < warmup);
    EXPECT_TRUE(timed);
    EXPECT_TRUE(want);
  }
  void step(double step_ns) {
    const bool warm = index < warmup;
    flags.push_back(timed);
    if (timed) events += 5;  // forward_begin .. optimizer_begin
    const bool end_wanted = timed || s.next_timed(index + 1 < warmup);
    if (end_wanted) ++events;  // optimizer_end
    if (!warm && timed) ++timed_steady;
    s.end_step(warm, timed, step_ns, events);
    ++index;
    timed = s.begin_step(index < warmup);
    if (timed) {
      EXPECT_TRUE(end_wanted) << "step " << index << " is timed but its opening boundary recorded nothing";
    }
  }
};

}  // namespace

TEST(DeviceSamplingSchedule, FixedEveryAfterWarmup) {
  Drive d(4, 2, 0);
  for (int i = 0; i < 22; ++i) d.step(1e6);
  const std::vector<bool> want = {true, true,                            // warm-up
                                  true, false, false, false, true, false, false, false,
                                  true, false, false, false, true, false, false, false,
                                  true, false, false, false};
  EXPECT_EQ(d.flags, want);
  EXPECT_EQ(d.s.every(), 4);
  EXPECT_FALSE(d.s.auto_mode());
  // Warm-up steps chain (6 each, one shared opening), then each timed steady step costs 7.
  EXPECT_EQ(d.events, 1 + 6 * 2 + 7 * 5);
}

TEST(DeviceSamplingSchedule, EveryStepWithOne) {
  Drive d(1, 0, 10e3);
  for (int i = 0; i < 100; ++i) d.step(1e6);
  EXPECT_EQ(d.timed_steady, 100);
  EXPECT_EQ(d.events, 1 + 6 * 100);  // one event per boundary, shared by the steps it separates
}

TEST(DeviceSamplingSchedule, AutoSamplesASmallHostBoundStep) {
  Drive d(0, 3, 10e3);  // 10 us per record, 1 ms steps
  EXPECT_TRUE(d.s.auto_mode());
  for (int i = 0; i < 3 + kAutoFirst; ++i) d.step(1e6);
  EXPECT_EQ(d.timed_steady, kAutoFirst);  // every step until the first choice
  // 6 events per step plus the one that opens it: ceil(7 * 10 us / (1% of 1 ms)) = 7.
  EXPECT_EQ(d.s.every(), 7);
  const int64_t before = d.timed_steady;
  for (int i = 0; i < 700; ++i) d.step(1e6);
  const int64_t timed = d.timed_steady - before;
  EXPECT_GE(timed, 700 / 8);
  EXPECT_LE(timed, 700 / 7 + 1);
  // Isolated timed steps record 7 events each (the opening one in the step before): k stays.
  EXPECT_EQ(d.s.every(), 7);
  EXPECT_EQ(d.s.events_per_step(), 7.0);
}

TEST(DeviceSamplingSchedule, AutoKeepsEveryStepWhenGpuBound) {
  Drive d(0, 0, 10e3);
  for (int i = 0; i < 500; ++i) d.step(10e6);  // a 10 ms step: 70 us of records is 0.7%
  EXPECT_EQ(d.s.every(), 1);
  EXPECT_EQ(d.timed_steady, 500);
}

TEST(DeviceSamplingSchedule, AutoFollowsTheStepTimeBothWays) {
  Drive d(0, 0, 10e3);
  for (int i = 0; i < kAutoFirst; ++i) d.step(0.2e6);  // a fast start (the host runs ahead)
  EXPECT_EQ(d.s.every(), 35);                          // ceil(7 * 10e3 / 2e3)
  for (int i = 0; i < 2 * kAutoEvery; ++i) d.step(20e6);  // the queue filled: GPU-bound
  EXPECT_EQ(d.s.every(), 1);
  // Once back to k = 1, every step is timed again (the Drive checks each opening boundary).
  const int64_t before = d.timed_steady;
  for (int i = 0; i < kAutoEvery; ++i) d.step(20e6);
  EXPECT_EQ(d.timed_steady - before, kAutoEvery);
  for (int i = 0; i < 3 * kAutoEvery; ++i) d.step(1e6);
  EXPECT_EQ(d.s.every(), 7);
}

TEST(DeviceSamplingSchedule, AutoWithoutARecordCostTimesEveryStep) {
  Drive d(0, 0, 0);  // no CUDA: nothing measured
  for (int i = 0; i < 200; ++i) d.step(1e6);
  EXPECT_EQ(d.s.every(), 1);
}

TEST(DeviceSamplingClock, ReanchorsAtTheFirstBoundaryAfterAGap) {
  // The last timed step's end reached the GPU at 1000 ns (the anchor). Untimed steps follow; the
  // next timed step opens with an event the host recorded at 50'000 and the GPU reached at 50'200,
  // but the chained elapsed time (GPU clock a little fast over the gap) says 48'000 after the
  // anchor, i.e. 49'000: before the host even recorded it. Placing the opening event first clamps
  // it to 50'000, and the phase then chains from there, off by 200 ns instead of 1'200.
  DeviceClock c;
  c.anchor(1000);
  EXPECT_DOUBLE_EQ(c.place(48'000, 50'000, 60'000), 0);  // re-anchored at the opening boundary
  EXPECT_DOUBLE_EQ(c.anchor_ns(), 50'000);
  // The phase: 3'000 ns on the GPU, closing event recorded by the host at 52'000.
  const double lag = c.place(3'000, 52'000, 60'000);
  EXPECT_DOUBLE_EQ(lag, 1'000);  // truth: 50'200 + 3'000 - 52'000 = 1'200
  // Chaining straight from the old anchor across the gap, as one elapsed time, is worse.
  DeviceClock across;
  across.anchor(1000);
  EXPECT_DOUBLE_EQ(across.place(48'000 + 3'000, 52'000, 60'000), 0);  // clamped, 1'200 off
}

TEST(DeviceSamplingTimeline, CpuTimelineReportsNoDeviceSampling) {
  // Without CUDA (or with device=false) nothing is sampled: no events, no device steps, k unknown.
  Timeline tl({.device = false, .nvtx = false, .device_every = 3});
  for (int i = 0; i < 10; ++i) {
    { ScopedPhase f(tl, Phase::kForward); }
    { ScopedPhase b(tl, Phase::kBackward); }
    { ScopedPhase o(tl, Phase::kOptimizer); }
  }
  const Report r = tl.report();
  EXPECT_EQ(r.steps, 10);
  EXPECT_EQ(r.device_steps, 0);
  EXPECT_EQ(r.device_events, 0);
  EXPECT_EQ(r.device_every, 0);
  EXPECT_FALSE(r.device_every_auto);
  for (const auto& s : tl.recent_steps()) EXPECT_FALSE(s.device_timed);
  // The packed header carries the device-timed steps (word 9), summed over buffers.
  std::vector<double> v = tl.pack();
  v[9] = 4;
  std::vector<double> two(v);
  two.insert(two.end(), v.begin(), v.end());
  EXPECT_EQ(report_from_packed(two.data(), 2).device_steps, 8);
  EXPECT_EQ(report_from_packed(two.data(), 2).steps, 10);
}

TEST(DeviceSamplingSchedule, AutoUsesTheCostMeasuredWhereItIsPaid) {
  // The attach-time guess says 1 us per record; in the loop each event costs the host 20 us (a
  // record behind a busy stream on a virtualised host). The measured cost must win, and the step
  // time the rule compares it with excludes that cost.
  DeviceSampler s(0);
  s.set_record_ns(1e3);
  int64_t events = 1;
  double cost = 0;
  s.opened(events);
  bool timed = s.begin_step(false);
  for (int i = 0; i < kAutoFirst + kAutoEvery; ++i) {
    const int64_t n = timed ? 6 : (s.next_timed(false) ? 1 : 0);
    events += n;
    cost += 20e3 * static_cast<double>(n);
    // 1 ms of host work, plus what recording cost this step.
    s.end_step(false, timed, 1e6 + 20e3 * static_cast<double>(n), events, cost);
    timed = s.begin_step(false);
  }
  EXPECT_DOUBLE_EQ(s.record_ns(), 20e3);
  EXPECT_EQ(s.every(), 14);  // ceil(7 * 20 us / (1% of 1 ms))
}

TEST(DeviceSamplingSchedule, AutoTimesEveryStepWhileTheGpuIsQueued) {
  // A GPU-bound loop with a full launch queue: records wait for room and read as costly, but every
  // boundary lags the host by milliseconds, so recording costs the loop nothing: k = 1.
  DeviceSampler s(0);
  s.set_record_ns(2e3);
  int64_t events = 1;
  double cost = 0;
  s.opened(events);
  bool timed = s.begin_step(false);
  for (int i = 0; i < kAutoFirst + 2 * kAutoEvery; ++i) {
    const int64_t n = timed ? 6 : (s.next_timed(false) ? 1 : 0);
    events += n;
    cost += 300e3 * static_cast<double>(n);
    s.end_step(false, timed, 9e6, events, cost, timed ? 5e6 : std::numeric_limits<double>::infinity());
    timed = s.begin_step(false);
  }
  EXPECT_EQ(s.every(), 1);
  // The same costs with the GPU keeping up (lag of microseconds): sampled.
  DeviceSampler h(0);
  h.set_record_ns(2e3);
  events = 1;
  cost = 0;
  h.opened(events);
  timed = h.begin_step(false);
  for (int i = 0; i < kAutoFirst; ++i) {
    const int64_t n = timed ? 6 : (h.next_timed(false) ? 1 : 0);
    events += n;
    cost += 300e3 * static_cast<double>(n);
    h.end_step(false, timed, 9e6, events, cost, 20e3);
    timed = h.begin_step(false);
  }
  EXPECT_GT(h.every(), 1);
}
