// Streaming statistics with fixed memory: Welford moments and a mergeable log-bucket histogram.
// No ATen here, so the GoogleTests exercise the math directly.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace stepscope::timing {

// count/total/mean/std/min/max in one pass (Welford: no catastrophic cancellation over 10^9
// samples of similar size).
class Stats {
 public:
  void add(double x);
  void merge(const Stats& o);
  int64_t count() const { return n_; }
  double total() const { return total_; }
  double mean() const { return n_ ? mean_ : 0.0; }
  double std() const;  // population standard deviation
  double min() const { return n_ ? min_ : 0.0; }
  double max() const { return n_ ? max_ : 0.0; }

  // The raw state as kMoments doubles (count, mean, m2, total, min, max) and back: how the
  // statistics of several processes travel in one float64 buffer. The round trip is exact.
  static constexpr int kMoments = 6;
  void to_moments(double* out) const;
  static Stats from_moments(const double* in);  // throws std::invalid_argument on a bad count

  // The statistics of the samples added to `later` after it was `earlier` (a copy taken then):
  // the count and total subtract exactly, the mean and second moment by the reverse of merge().
  // The extremes are exact only where the interval renewed them (later's min below earlier's, max
  // above); elsewhere they are unknown here and set to NaN (Series::since fills them from its
  // histogram).
  static Stats since(const Stats& later, const Stats& earlier);

 private:
  int64_t n_ = 0;
  double mean_ = 0, m2_ = 0, total_ = 0, min_ = 0, max_ = 0;
};

// Log-bucket histogram of positive values (DDSketch's bucket rule): bucket i holds
// (gamma^(i-1), gamma^i] with gamma = (1 + a) / (1 - a), and a quantile is answered with
// 2 gamma^i / (gamma + 1), within relative error a of the sample of that rank. a = 0.5% here,
// so p50/p90/p99 stay inside the 1% the reports promise. Values are nanoseconds; the fixed
// bucket range [1 ns, ~1.1e13 ns = 3 h] keeps every histogram the same size, so histograms of
// several processes merge by adding counts. Out-of-range values are clamped to the end buckets.
class LogHistogram {
 public:
  static constexpr double kRelativeError = 0.005;
  static constexpr double kMinValue = 1.0;
  static constexpr int kBuckets = 3040;

  LogHistogram();
  void add(double x);
  void merge(const LogHistogram& o);
  int64_t count() const { return n_; }
  // The value at rank floor(q * (count - 1)) of the sorted samples, within kRelativeError
  // (clamped to the exact min and max). 0 when empty.
  double quantile(double q) const;
  const std::vector<uint64_t>& buckets() const { return counts_; }
  static int bucket_of(double x);
  static double bucket_value(int i);
  double min() const { return n_ ? min_ : 0.0; }
  double max() const { return n_ ? max_ : 0.0; }
  // A histogram from kBuckets counts (whole numbers >= 0, as doubles: float64 holds counts up
  // to 2^53 exactly) and the exact extremes; the count is their sum. With the counts, min and
  // max of another histogram it answers every quantile exactly as that one does.
  static LogHistogram from_counts(const double* counts, double min, double max);  // throws std::invalid_argument
  // The samples added to `later` after it was `earlier`: bucket counts subtract exactly, so every
  // quantile is the one a histogram of those samples alone gives, but for the extremes (and the
  // quantiles clamped to them): exact where the interval renewed them, otherwise the value of the
  // lowest (highest) occupied bucket, within kRelativeError of the true extreme.
  static LogHistogram since(const LogHistogram& later, const LogHistogram& earlier);

 private:
  std::vector<uint64_t> counts_;
  int64_t n_ = 0;
  double min_ = 0, max_ = 0;
};

// What the reports read for one series (one phase, host or device).
struct Series {
  Stats stats;
  LogHistogram hist;
  void add(double ns) {
    stats.add(ns);
    hist.add(ns);
  }
  // Stats::since and LogHistogram::since, the histogram's extremes standing in for unknown ones.
  static Series since(const Series& later, const Series& earlier);
};

}  // namespace stepscope::timing
