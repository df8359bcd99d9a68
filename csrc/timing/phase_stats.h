// The Timeline's statistics (PhaseStats): the per-phase host and device series, user phases and
// modules, step and sample counts, the warm-up totals and spikes; and what is read out of them:
// the Report, the snapshot an interval subtracts, the packed buffers torch.distributed gathers
// and the plain-text summary. Host and device times in ns here, seconds in a Report. No ATen or
// CUDA. Not thread-safe: the Timeline calls it under its lock.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "phases.h"
#include "timing/event_pool.h"
#include "timing/ring.h"
#include "timing/stats.h"

namespace stepscope::timing {

// Phase and kNumPartition: phases.h. The report name of a series.
const char* phase_name(Phase p);

struct SeriesSummary {
  int64_t count = 0;
  double total = 0, mean = 0, std = 0, min = 0, max = 0, p50 = 0, p90 = 0, p99 = 0;  // seconds
  bool has_quantiles = false;
};

struct NamedSummary {
  std::string name;
  SeriesSummary host, device;
  const char* parent = nullptr;  // user phases: the partition phase open at their (last) begin
};

// Totals of the warm-up steps, per Phase (seconds); device totals over resolved samples only.
struct WarmupSummary {
  int64_t steps = 0;
  int64_t samples = 0;
  std::array<double, static_cast<size_t>(Phase::kCount)> host{}, device{};
  std::array<int64_t, static_cast<size_t>(Phase::kCount)> device_count{};
};

// A step slower than kSpikeFactor x the running median step, and the phase that grew most
// against its own running median (absolute excess).
struct SpikeRecord {
  int64_t index = 0;
  double duration = 0;     // seconds
  double step_median = 0;  // the running median step when it happened (seconds)
  int phase = 0;           // Phase
  double phase_time = 0, phase_median = 0;  // seconds, in this step / running median
};

struct Report {
  std::vector<NamedSummary> phases;   // data .. optimizer, step, eval_forward, eval
  std::vector<NamedSummary> user;     // mon.phase(name) / ScopedPhase(tl, "name")
  std::vector<NamedSummary> modules;  // per-module forward (no quantiles)
  int64_t steps = 0;
  int64_t samples = 0;
  double step_host_total = 0;  // seconds
  int64_t dropped_device_samples = 0;
  int64_t pending_device_samples = 0;
  bool device = false;
  WarmupSummary warmup;
  DeviceMemory memory;  // at the last step's end (-1 without device timing)
  // Allocated memory over the ring's steps (CUDA): first and last value and the share of
  // step-to-step changes that rose; steps = 0 without device timing.
  struct MemoryTrend {
    int64_t steps = 0, first = 0, last = 0;
    double rising_fraction = 0;
  } memory_trend;
  // CUDA queue lag per boundary (named by the boundary: forward_begin .. optimizer_end): how long
  // after the host reached it the GPU did. Empty without device timing.
  std::vector<NamedSummary> lag;
  std::vector<SpikeRecord> spikes;  // the last kMaxSpikes, oldest first
  int64_t spikes_total = 0;         // every spike seen, listed or not
  // Device sampling (timing/device_sampling.h): the steady steps that were device-timed (the
  // device series and shares cover these only), the current one-in-k (0: unknown, as in a merged
  // report), whether k is chosen automatically, the CUDA events recorded at phase boundaries
  // (one per boundary of a timed step, warm-up and attach included) and the host cost of one
  // record as the loop pays it, measured over the auto mode's last window of steps (seconds; 0
  // until one was measured, and with a fixed device_every).
  int64_t device_steps = 0;
  int64_t device_every = 0;
  bool device_every_auto = false;
  int64_t device_events = 0;
  double event_record_cost = 0;
};

// The statistics at one moment (Timeline::snapshot), which report(since) and pack(since) subtract to
// give the figures of the steps after it. Opaque outside the Timeline; a few hundred KB (its
// histograms), taken once per interval (an epoch, a log line), never per step.
struct TimelineSnapshot {
  uint64_t owner = 0;  // Timeline::id() of the Timeline it was taken from
  bool ready = false;           // false while it waits for the end of the step it was taken in
  uint64_t generation = 0;      // Timeline::reset() calls before it was filled
  std::array<Series, static_cast<size_t>(Phase::kCount)> host, dev;
  std::array<Series, kNumPartition> lag;
  std::vector<Series> user_host, user_dev;
  std::vector<Stats> module_host, module_dev;
  int64_t steps = 0, samples = 0, dropped = 0, device_steps = 0, device_events = 0;
  double step_host_total = 0;  // ns
  WarmupSummary warmup;
  uint64_t spikes = 0;      // spikes seen before it
  int64_t first_step = 0;   // index of the first step after it
};

// Spike rule: slower than 3x the running median step (the issue tracker of tools that flag
// "slow steps" uses 2-3x; 3x keeps a GC pause or a checkpoint, not ordinary jitter). The running
// median is a multiplicative streaming estimate (one word per series, updated per step), so the
// check costs a few multiplications at step end; it starts after kSpikeMinSteps steady steps.
constexpr double kSpikeFactor = 3.0;
constexpr int64_t kSpikeMinSteps = 5;
constexpr int kMaxSpikes = 32;

// A series' summary in seconds, less its past `base` (null: all of it).
SeriesSummary summary_of(const Series& s, const Series* base);

// User phases (Series: histograms) or modules (Stats: moments only), by registered id.
template <typename StatT>
struct NamedSeries {
  std::vector<std::string> names;
  std::vector<StatT> host, dev;
  std::vector<const char*> parent;  // the partition phase open at the (last) begin
  int add(const std::string& name) {
    names.push_back(name);
    host.emplace_back();
    dev.emplace_back();
    parent.push_back(nullptr);
    return static_cast<int>(names.size() - 1);
  }
};

class PhaseStats {
 public:
  static constexpr int kSeries = static_cast<int>(Phase::kCount);

  // A phase's host time of the open step (warm: a warm-up step's, totalled apart). Samples wait in
  // a small buffer that fold() moves into the series: a boundary inside a hook then only stores
  // two words, and the series' code and histograms, cold by then, are touched once per fold.
  void add_host(int series, double ns, bool warm) {
    if (warm) {
      warm_.host[series] += ns * 1e-9;
      return;
    }
    if (n_pending_ == kHostPending) fold();
    pending_[n_pending_++] = HostSample{series, ns};
  }
  void fold();
  // A resolved device time: kind 0 a phase, 1 a user phase, 2 a module (DeviceSpan::Kind).
  void add_device(int kind, int id, bool warm, double ns);
  // A step ended (its phases' host ns, their total, its samples): counted as a steady step, where
  // it is checked for a spike (index: its step index), or totalled with the warm-up.
  void end_step(const double (&phase_ns)[kNumPartition], double total_ns, int64_t samples, bool warm, int64_t index);

  NamedSeries<Series>& users() { return users_; }
  NamedSeries<Stats>& modules() { return modules_; }
  const NamedSeries<Series>& users() const { return users_; }
  const NamedSeries<Stats>& modules() const { return modules_; }
  int64_t steps() const { return steps_ + warm_.steps; }  // warm-up included
  uint64_t generation() const { return generation_; }

  // Forgets every statistic (names stay) and counts the reset (snapshots of before it go stale).
  void reset();
  // Copies the statistics into a snapshot (after fold()); device series only with `device`.
  void fill(TimelineSnapshot& s, bool device) const;
  // Fills the statistics' part of a report (after fold()): phases, user phases, modules, counts,
  // warm-up and spikes, less those of `base` (null: everything so far).
  void report(Report& r, const TimelineSnapshot* base, bool device) const;
  // The phase series of kPackedWords less base into v (the header's first words: pack()).
  void pack(double* v, const TimelineSnapshot* base, bool device) const;

 private:
  void check_spike(const double (&phase_ns)[kNumPartition], double total_ns, int64_t index);

  std::array<Series, kSeries> host_, dev_;
  struct HostSample {
    int series;
    double ns;
  };
  static constexpr int kHostPending = 128;  // folded every ~18 steps
  std::array<HostSample, kHostPending> pending_;
  int n_pending_ = 0;
  NamedSeries<Series> users_;
  NamedSeries<Stats> modules_;
  int64_t steps_ = 0, samples_ = 0;  // steady steps
  double step_host_total_ = 0;        // ns
  WarmupSummary warm_;
  uint64_t generation_ = 0;  // reset() calls
  // Spikes: running medians (ns) of the step and of each phase's per-step total.
  double med_step_ = 0;
  double med_phase_[kNumPartition] = {};
  Ring<SpikeRecord> spikes_{kMaxSpikes};
};

// Allocated memory over a run of steps (StepRecord::memory, oldest first), from index `first`.
template <typename Steps>
Report::MemoryTrend memory_trend(const Steps& steps, int64_t first) {
  Report::MemoryTrend t;
  int64_t prev = -1, rises = 0, n = 0;
  for (size_t k = 0; k < steps.size(); ++k) {
    if (steps[k].index < first) continue;
    const int64_t a = steps[k].memory.allocated;
    if (a < 0) continue;
    if (n == 0) t.first = a;
    if (prev >= 0 && a > prev) ++rises;
    prev = a;
    ++n;
  }
  t.steps = n;
  t.last = prev;
  t.rising_fraction = n > 1 ? static_cast<double>(rises) / static_cast<double>(n - 1) : 0.0;
  return t;
}

// Packed raw statistics: one fixed-size float64 buffer per process, so that torch.distributed
// gathers every rank's in one all_gather, and any set of them merges into the summaries a local
// report() gives (same Stats, same histogram quantile code: one buffer gives back its Timeline's
// report() phases exactly). Layout: kPackedHeader words (tag, Phase::kCount, kBuckets, device,
// steps, samples, step host ns, dropped and pending device samples, device-timed steps), then per phase, host
// then device: Stats moments, histogram min and max, kBuckets counts. User phases and modules
// are left out (their names differ between processes). ~390 KB.
constexpr int kPackedHeader = 10;
constexpr int kPackedSeries = Stats::kMoments + 2 + LogHistogram::kBuckets;
constexpr int kPackedWords = kPackedHeader + 2 * static_cast<int>(Phase::kCount) * kPackedSeries;
// Merges n packed buffers laid end to end (n * kPackedWords doubles): series add up; steps is the
// most any buffer has (ranks step together), samples, device sample counts and device-timed steps
// add up (like the device series' counts), the step host total is the largest (ranks run at once),
// device is any buffer's. Throws
// std::invalid_argument on a buffer of another layout or with corrupt counts.
Report report_from_packed(const double* buffers, int64_t n);

// A plain-text table of a report for LibTorch loops: host (and device) count, mean, p50, p90, p99,
// total and share per phase. Monitor.summary() (report.py) is another, wider table (max, user
// phases under their parent, modules, memory, warm-up, spikes).
std::string format_summary(const Report& r);

}  // namespace stepscope::timing
