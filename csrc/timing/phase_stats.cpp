// The Timeline's statistics (timing/phase_stats.h): folding samples in, spikes, and reading them
// out as a report, a snapshot, packed buffers (and merging those) or a plain-text table.
#include "timing/phase_stats.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>

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

template <typename StatT>
void named_report(std::vector<NamedSummary>& out, const NamedSeries<StatT>& g, const std::vector<StatT>* base_host,
                  const std::vector<StatT>* base_dev, bool parents) {
  for (size_t i = 0; i < g.names.size(); ++i)
    out.push_back(NamedSummary{g.names[i], summarize(g.host[i], base_host ? at_or_null(*base_host, i) : nullptr),
                               summarize(g.dev[i], base_dev ? at_or_null(*base_dev, i) : nullptr),
                               parents ? g.parent[i] : nullptr});
}

}  // namespace

const char* phase_name(Phase p) { return kPhaseTable[static_cast<int>(p)].name; }

SeriesSummary summary_of(const Series& s, const Series* base) { return summarize(s, base); }

void PhaseStats::fold() {
  for (int k = 0; k < n_pending_; ++k) host_[pending_[k].series].add(pending_[k].ns);
  n_pending_ = 0;
}

void PhaseStats::add_device(int kind, int id, bool warm, double ns) {
  if (warm) {
    if (kind == 0) {
      warm_.device[id] += ns * 1e-9;
      ++warm_.device_count[id];
    }
  } else if (kind == 0) {
    dev_[id].add(ns);
  } else if (kind == 1) {
    users_.dev[id].add(ns);
  } else {
    modules_.dev[id].add(ns);
  }
}

void PhaseStats::end_step(const double (&phase_ns)[kNumPartition], double total_ns, int64_t samples, bool warm,
                          int64_t index) {
  if (warm) {
    ++warm_.steps;
    warm_.samples += samples;
    return;
  }
  check_spike(phase_ns, total_ns, index);
  ++steps_;
  samples_ += samples;
  step_host_total_ += total_ns;
}

void PhaseStats::check_spike(const double (&phase_ns)[kNumPartition], double total, int64_t index) {
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
  if (steps_ >= kSpikeMinSteps && total > kSpikeFactor * med_step_) {
    int grew = 0;
    double most = -1;
    for (int i = 0; i < kNumPartition; ++i) {
      const double excess = phase_ns[i] - med_phase_[i];
      if (excess > most) {
        most = excess;
        grew = i;
      }
    }
    SpikeRecord& sp = spikes_.push();
    sp.index = index;
    sp.duration = total * 1e-9;
    sp.step_median = med_step_ * 1e-9;
    sp.phase = grew;
    sp.phase_time = phase_ns[grew] * 1e-9;
    sp.phase_median = med_phase_[grew] * 1e-9;
  }
  track(med_step_, total);
  for (int i = 0; i < kNumPartition; ++i) track(med_phase_[i], phase_ns[i]);
}

void PhaseStats::reset() {
  n_pending_ = 0;
  for (auto* series : {&host_, &dev_})
    for (Series& s : *series) s = Series{};
  for (auto& v : {&users_.host, &users_.dev})
    for (Series& s : *v) s = Series{};
  for (auto& v : {&modules_.host, &modules_.dev})
    for (Stats& s : *v) s = Stats{};
  steps_ = samples_ = 0;
  step_host_total_ = 0;
  warm_ = WarmupSummary{};
  med_step_ = 0;
  std::fill(std::begin(med_phase_), std::end(med_phase_), 0.0);
  spikes_.clear();
  ++generation_;
}

void PhaseStats::fill(TimelineSnapshot& s, bool device) const {
  s.generation = generation_;
  s.host = host_;
  if (device) s.dev = dev_;
  s.user_host = users_.host;
  s.user_dev = users_.dev;
  s.module_host = modules_.host;
  s.module_dev = modules_.dev;
  s.steps = steps_;
  s.samples = samples_;
  s.step_host_total = step_host_total_;
  s.warmup = warm_;
  s.spikes = spikes_.pushed();
}

void PhaseStats::report(Report& r, const TimelineSnapshot* b, bool device) const {
  for (int i = 0; i < kSeries; ++i)
    r.phases.push_back(NamedSummary{phase_name(static_cast<Phase>(i)), summarize(host_[i], b ? &b->host[i] : nullptr),
                                    summarize(dev_[i], b && device ? &b->dev[i] : nullptr)});
  named_report(r.user, users_, b ? &b->user_host : nullptr, b ? &b->user_dev : nullptr, true);
  named_report(r.modules, modules_, b ? &b->module_host : nullptr, b ? &b->module_dev : nullptr, false);
  r.steps = steps_ - (b ? b->steps : 0);
  r.samples = samples_ - (b ? b->samples : 0);
  r.step_host_total = (step_host_total_ - (b ? b->step_host_total : 0.0)) * 1e-9;
  r.warmup = warm_;
  if (b) {
    r.warmup.steps -= b->warmup.steps;
    r.warmup.samples -= b->warmup.samples;
    for (size_t i = 0; i < r.warmup.host.size(); ++i) {
      r.warmup.host[i] -= b->warmup.host[i];
      r.warmup.device[i] -= b->warmup.device[i];
      r.warmup.device_count[i] -= b->warmup.device_count[i];
    }
  }
  // The spike ring holds the newest kMaxSpikes; the i-th kept one is spike number pushed - size + i.
  const uint64_t spikes_before = b ? b->spikes : 0;
  for (size_t i = 0; i < spikes_.size(); ++i)
    if (spikes_.pushed() - spikes_.size() + i >= spikes_before) r.spikes.push_back(spikes_[i]);
  r.spikes_total = static_cast<int64_t>(spikes_.pushed() - spikes_before);
}

void PhaseStats::pack(double* v, const TimelineSnapshot* b, bool device) const {
  v[0] = kPackedTag;
  v[1] = static_cast<double>(kSeries);
  v[2] = LogHistogram::kBuckets;
  v[3] = device ? 1.0 : 0.0;
  v[4] = static_cast<double>(steps_ - (b ? b->steps : 0));
  v[5] = static_cast<double>(samples_ - (b ? b->samples : 0));
  v[6] = step_host_total_ - (b ? b->step_host_total : 0.0);
  double* p = v + kPackedHeader;
  for (int k = 0; k < 2; ++k)
    for (int i = 0; i < kSeries; ++i) {
      const Series& cur = k == 0 ? host_[i] : dev_[i];
      const Series* base = b && (k == 0 || device) ? (k == 0 ? &b->host[i] : &b->dev[i]) : nullptr;
      const Series s = base ? Series::since(cur, *base) : cur;
      s.stats.to_moments(p);
      p[Stats::kMoments] = s.hist.min();
      p[Stats::kMoments + 1] = s.hist.max();
      const auto& c = s.hist.buckets();
      for (int j = 0; j < LogHistogram::kBuckets; ++j) p[Stats::kMoments + 2 + j] = static_cast<double>(c[j]);
      p += kPackedSeries;
    }
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

}  // namespace stepscope::timing
