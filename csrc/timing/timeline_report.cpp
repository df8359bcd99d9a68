// The Timeline's reports: report(), the plain-text summary, the packed statistics that
// torch.distributed gathers (pack, report_from_packed), and intervals (snapshot, reset).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>

#include <c10/util/Exception.h>

#include "timing/timeline.h"

namespace stepscope::timing {
namespace {

SeriesSummary summarize(const Series& s) {
  SeriesSummary r;
  r.count = s.stats.count();
  r.total = s.stats.total() * 1e-9;
  r.mean = s.stats.mean() * 1e-9;
  r.std = s.stats.std() * 1e-9;
  r.min = s.stats.min() * 1e-9;
  r.max = s.stats.max() * 1e-9;
  r.p50 = s.hist.quantile(0.50) * 1e-9;
  r.p90 = s.hist.quantile(0.90) * 1e-9;
  r.p99 = s.hist.quantile(0.99) * 1e-9;
  r.has_quantiles = true;
  return r;
}

SeriesSummary summarize(const Stats& s) {
  SeriesSummary r;
  r.count = s.count();
  r.total = s.total() * 1e-9;
  r.mean = s.mean() * 1e-9;
  r.std = s.std() * 1e-9;
  r.min = s.min() * 1e-9;
  r.max = s.max() * 1e-9;
  return r;
}

// An interval's summary: `cur` less its past `base` (none: `cur` itself, uncopied).
template <typename S>
SeriesSummary summarize(const S& cur, const S* base) {
  return base ? summarize(S::since(cur, *base)) : summarize(cur);
}

template <typename T>
const T* at_or_null(const std::vector<T>& v, size_t i) {
  return i < v.size() ? &v[i] : nullptr;  // a name registered after the snapshot: nothing to subtract
}

// "SSP1": the first word of a packed buffer, so that a buffer from another build or of another
// kind is refused instead of read as counts.
constexpr double kPackedTag = 1397969969.0;
}  // namespace

void Timeline::check_spike(double total) {
  // Multiplicative streaming median: each sample moves the estimate by a fixed factor towards
  // itself, so it settles where as many samples fall above as below (within about 6%), in O(1)
  // memory and a few multiplications per step.
  constexpr double kUp = 1.0625, kDown = 1.0 / 1.0625;
  auto track = [](double& m, double x) {
    if (m <= 0) {
      m = x;
    } else if (x > m) {
      m *= kUp;
    } else if (x < m) {
      m *= kDown;
    }
  };
  if (steps_done_ >= kSpikeMinSteps && total > kSpikeFactor * med_step_) {
    int grew = 0;
    double most = -1;
    for (int i = 0; i < kNumPartition; ++i) {
      const double excess = step_phase_[i] - med_phase_[i];
      if (excess > most) {
        most = excess;
        grew = i;
      }
    }
    SpikeRecord& sp = spikes_.push();
    sp.index = step_index_;
    sp.duration = total * 1e-9;
    sp.step_median = med_step_ * 1e-9;
    sp.phase = grew;
    sp.phase_time = step_phase_[grew] * 1e-9;
    sp.phase_median = med_phase_[grew] * 1e-9;
  }
  track(med_step_, total);
  for (int i = 0; i < kNumPartition; ++i) track(med_phase_[i], step_phase_[i]);
}

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
  return since->generation == generation_ ? since : nullptr;
}

void Timeline::fill_snapshot(TimelineSnapshot& s) const {
  s.owner = id_;
  s.generation = generation_;
  s.host = host_;
  if (device_) {
    s.dev = dev_;
    s.lag = lag_;
  }
  s.user_host = users_.host;
  s.user_dev = users_.dev;
  s.module_host = modules_.host;
  s.module_dev = modules_.dev;
  s.steps = steps_done_;
  s.samples = samples_done_;
  s.dropped = dropped_;
  s.device_steps = device_steps_;
  s.device_events = events_;
  s.step_host_total = step_host_total_;
  s.warmup = warm_sum_;
  s.spikes = spikes_.pushed();
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
  n_host_pending_ = 0;
  for (auto* series : {&host_, &dev_})
    for (Series& s : *series) s = Series{};
  for (Series& s : lag_) s = Series{};
  for (auto& v : {&users_.host, &users_.dev})
    for (Series& s : *v) s = Series{};
  for (auto& v : {&modules_.host, &modules_.dev})
    for (Stats& s : *v) s = Stats{};
  steps_done_ = samples_done_ = 0;
  step_host_total_ = 0;
  dropped_ = 0;
  device_steps_ = 0;
  events_ = 0;
  warm_sum_ = WarmupSummary{};
  med_step_ = 0;
  std::fill(std::begin(med_phase_), std::end(med_phase_), 0.0);
  spikes_.clear();
  ring_.clear();
  ++generation_;
  // The open step began before the reset when a boundary closed one of its phases: half of it is
  // forgotten, so none of it counts. Otherwise (between steps) it is the first step after the reset.
  const bool began = step_active_ && !closed_;
  discard_ = began;
  reset_serial_ = began ? step_serial_ : step_serial_ - 1;
}

Report Timeline::report_locked(const TimelineSnapshot* since) {
  TimelineSnapshot scratch;
  const TimelineSnapshot* b = base_of(since, scratch);
  Report r;
  r.device = device_;
  for (int i = 0; i < static_cast<int>(Phase::kCount); ++i)
    r.phases.push_back(NamedSummary{phase_name(static_cast<Phase>(i)), summarize(host_[i], b ? &b->host[i] : nullptr),
                                    summarize(dev_[i], b && device_ ? &b->dev[i] : nullptr)});
  for (size_t i = 0; i < users_.names.size(); ++i)
    r.user.push_back(NamedSummary{users_.names[i],
                                  summarize(users_.host[i], b ? at_or_null(b->user_host, i) : nullptr),
                                  summarize(users_.dev[i], b ? at_or_null(b->user_dev, i) : nullptr),
                                  users_.parent[i]});
  for (size_t i = 0; i < modules_.names.size(); ++i)
    r.modules.push_back(NamedSummary{modules_.names[i],
                                     summarize(modules_.host[i], b ? at_or_null(b->module_host, i) : nullptr),
                                     summarize(modules_.dev[i], b ? at_or_null(b->module_dev, i) : nullptr)});
  r.steps = steps_done_ - (b ? b->steps : 0);
  r.samples = samples_done_ - (b ? b->samples : 0);
  r.step_host_total = (step_host_total_ - (b ? b->step_host_total : 0.0)) * 1e-9;
  r.dropped_device_samples = dropped_ - (b ? b->dropped : 0);
  r.pending_device_samples = static_cast<int64_t>(pending_.size());
  r.warmup = warm_sum_;
  if (b) {
    r.warmup.steps -= b->warmup.steps;
    r.warmup.samples -= b->warmup.samples;
    for (size_t i = 0; i < r.warmup.host.size(); ++i) {
      r.warmup.host[i] -= b->warmup.host[i];
      r.warmup.device[i] -= b->warmup.device[i];
      r.warmup.device_count[i] -= b->warmup.device_count[i];
    }
  }
  r.memory = memory_;
  {
    const int64_t first = b ? b->first_step : 0;
    int64_t prev = -1, rises = 0, n = 0;
    for (size_t k = 0; k < ring_.size(); ++k) {
      if (ring_[k].index < first) continue;
      const int64_t a = ring_[k].memory.allocated;
      if (a < 0) continue;
      if (n == 0) r.memory_trend.first = a;
      if (prev >= 0 && a > prev) ++rises;
      prev = a;
      ++n;
    }
    r.memory_trend.steps = n;
    r.memory_trend.last = prev;
    r.memory_trend.rising_fraction = n > 1 ? static_cast<double>(rises) / static_cast<double>(n - 1) : 0.0;
  }
  if (device_) {
    // Named by the boundary that closes each phase (the phase table's `closes`).
    for (int i = 0; i < kNumPartition; ++i)
      r.lag.push_back(NamedSummary{boundary_name(i), summarize(lag_[i], b ? &b->lag[i] : nullptr), {}});
  }
  // The spike ring holds the newest kMaxSpikes; the i-th kept one is spike number pushed - size + i.
  const uint64_t spikes_before = b ? b->spikes : 0;
  for (size_t i = 0; i < spikes_.size(); ++i)
    if (spikes_.pushed() - spikes_.size() + i >= spikes_before) r.spikes.push_back(spikes_[i]);
  r.spikes_total = static_cast<int64_t>(spikes_.pushed() - spikes_before);
  r.device_steps = device_steps_ - (b ? b->device_steps : 0);
  r.device_every = device_ ? sampler_.every() : 0;
  r.device_every_auto = device_ && sampler_.auto_mode();
  r.device_events = events_ - (b ? b->device_events : 0);
  r.event_record_cost = sampler_.record_ns() * 1e-9;
  return r;
}

std::string format_summary(const Report& r) {
  const double step_total = r.phases[static_cast<int>(Phase::kStep)].host.total;
  const double dev_step_total = r.phases[static_cast<int>(Phase::kStep)].device.total;
  std::ostringstream o;
  char line[256];
  std::snprintf(line, sizeof(line), "%-14s %7s %9s %9s %9s %9s %10s %7s", "phase", "count", "mean ms", "p50 ms",
                "p90 ms", "p99 ms", "total s", "share");
  o << line << (r.device ? "   device: mean ms  p50 ms  total s  share" : "") << '\n';
  auto row = [&](const NamedSummary& s, bool share) {
    std::snprintf(line, sizeof(line), "%-14s %7lld %9.3f %9.3f %9.3f %9.3f %10.4f %6.1f%%", s.name.c_str(),
                  static_cast<long long>(s.host.count), s.host.mean * 1e3, s.host.p50 * 1e3, s.host.p90 * 1e3,
                  s.host.p99 * 1e3, s.host.total, share && step_total > 0 ? 100.0 * s.host.total / step_total : 0.0);
    o << line;
    if (r.device) {
      std::snprintf(line, sizeof(line), "   %15.3f %7.3f %8.4f %5.1f%%", s.device.mean * 1e3, s.device.p50 * 1e3,
                    s.device.total,
                    share && dev_step_total > 0 ? 100.0 * s.device.total / dev_step_total : 0.0);
      o << line;
    }
    o << '\n';
  };
  for (int i = 0; i < static_cast<int>(Phase::kCount); ++i) {
    if (r.phases[i].host.count == 0 && i != static_cast<int>(Phase::kStep)) continue;
    row(r.phases[i], i <= static_cast<int>(Phase::kStep));
  }
  for (const auto& u : r.user) row(u, true);
  std::snprintf(line, sizeof(line), "steps %lld, samples/s %.1f, dropped device samples %lld\n",
                static_cast<long long>(r.steps), r.step_host_total > 0 ? r.samples / r.step_host_total : 0.0,
                static_cast<long long>(r.dropped_device_samples));
  o << line;
  if (r.device && r.device_every > 1) {
    std::snprintf(line, sizeof(line), "device: one step in %lld%s, %lld of %lld steps\n",
                  static_cast<long long>(r.device_every), r.device_every_auto ? " (auto)" : "",
                  static_cast<long long>(r.device_steps), static_cast<long long>(r.steps));
    o << line;
  }
  return o.str();
}

std::vector<double> Timeline::pack(const TimelineSnapshot* since) {
  std::lock_guard<SpinLock> g(mu_);
  poll_locked();
  fold_host();
  TimelineSnapshot scratch;
  const TimelineSnapshot* b = base_of(since, scratch);
  std::vector<double> v(kPackedWords, 0.0);
  v[0] = kPackedTag;
  v[1] = static_cast<double>(Phase::kCount);
  v[2] = LogHistogram::kBuckets;
  v[3] = device_ ? 1.0 : 0.0;
  v[4] = static_cast<double>(steps_done_ - (b ? b->steps : 0));
  v[5] = static_cast<double>(samples_done_ - (b ? b->samples : 0));
  v[6] = step_host_total_ - (b ? b->step_host_total : 0.0);
  v[7] = static_cast<double>(dropped_ - (b ? b->dropped : 0));
  v[8] = static_cast<double>(pending_.size());
  v[9] = static_cast<double>(device_steps_ - (b ? b->device_steps : 0));
  double* p = v.data() + kPackedHeader;
  for (int k = 0; k < 2; ++k)
    for (int i = 0; i < static_cast<int>(Phase::kCount); ++i) {
      const Series& cur = k == 0 ? host_[i] : dev_[i];
      const Series* base = b && (k == 0 || device_) ? (k == 0 ? &b->host[i] : &b->dev[i]) : nullptr;
      const Series s = base ? Series::since(cur, *base) : cur;
      s.stats.to_moments(p);
      p[Stats::kMoments] = s.hist.min();
      p[Stats::kMoments + 1] = s.hist.max();
      const auto& c = s.hist.buckets();
      for (int i = 0; i < LogHistogram::kBuckets; ++i) p[Stats::kMoments + 2 + i] = static_cast<double>(c[i]);
      p += kPackedSeries;
    }
  return v;
}

Report report_from_packed(const double* buffers, int64_t n) {
  if (n < 1) throw std::invalid_argument("stepscope: report_from_packed needs at least one buffer");
  constexpr int kSeries = static_cast<int>(Phase::kCount);
  std::array<Series, kSeries> host, dev;
  Report r;
  double step_ns = 0;
  for (int64_t b = 0; b < n; ++b) {
    const double* v = buffers + b * kPackedWords;
    if (v[0] != kPackedTag || v[1] != kSeries || v[2] != LogHistogram::kBuckets)
      throw std::invalid_argument("stepscope: buffer " + std::to_string(b) +
                                  " is not a packed Timeline of this build (layout tag, phase or bucket count differ)");
    r.device = r.device || v[3] != 0;
    r.steps = std::max(r.steps, static_cast<int64_t>(v[4]));
    r.samples += static_cast<int64_t>(v[5]);
    step_ns = std::max(step_ns, v[6]);
    r.dropped_device_samples += static_cast<int64_t>(v[7]);
    r.pending_device_samples += static_cast<int64_t>(v[8]);
    r.device_steps += static_cast<int64_t>(v[9]);
    const double* p = v + kPackedHeader;
    for (auto* series : {&host, &dev})
      for (Series& s : *series) {
        s.stats.merge(Stats::from_moments(p));
        s.hist.merge(LogHistogram::from_counts(p + Stats::kMoments + 2, p[Stats::kMoments], p[Stats::kMoments + 1]));
        p += kPackedSeries;
      }
  }
  r.step_host_total = step_ns * 1e-9;
  for (int i = 0; i < kSeries; ++i) r.phases.push_back(NamedSummary{phase_name(static_cast<Phase>(i)), summarize(host[i]), summarize(dev[i])});
  return r;
}

}  // namespace stepscope::timing
