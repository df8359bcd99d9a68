#include "timing/stats.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace stepscope::timing {

void Stats::add(double x) {
  ++n_;
  total_ += x;
  if (n_ == 1) {
    mean_ = min_ = max_ = x;
    m2_ = 0;
    return;
  }
  const double d = x - mean_;
  mean_ += d / static_cast<double>(n_);
  m2_ += d * (x - mean_);
  min_ = std::min(min_, x);
  max_ = std::max(max_, x);
}

void Stats::merge(const Stats& o) {
  if (o.n_ == 0) return;
  if (n_ == 0) {
    *this = o;
    return;
  }
  // Chan et al.'s pairwise update of the second moment.
  const double n = static_cast<double>(n_ + o.n_);
  const double d = o.mean_ - mean_;
  m2_ += o.m2_ + d * d * static_cast<double>(n_) * static_cast<double>(o.n_) / n;
  mean_ += d * static_cast<double>(o.n_) / n;
  n_ += o.n_;
  total_ += o.total_;
  min_ = std::min(min_, o.min_);
  max_ = std::max(max_, o.max_);
}

void Stats::to_moments(double* out) const {
  out[0] = static_cast<double>(n_);
  out[1] = mean_;
  out[2] = m2_;
  out[3] = total_;
  out[4] = min_;
  out[5] = max_;
}

Stats Stats::from_moments(const double* in) {
  // Counts travel as doubles; anything but a whole number >= 0 below 2^53 is a corrupt buffer.
  if (!(in[0] >= 0 && in[0] <= 9007199254740992.0 && std::floor(in[0]) == in[0]))
    throw std::invalid_argument("stepscope: packed statistics hold a bad sample count: " + std::to_string(in[0]));
  Stats s;
  s.n_ = static_cast<int64_t>(in[0]);
  s.mean_ = in[1];
  s.m2_ = in[2];
  s.total_ = in[3];
  s.min_ = in[4];
  s.max_ = in[5];
  return s;
}

Stats Stats::since(const Stats& later, const Stats& earlier) {
  Stats s;
  if (later.n_ <= earlier.n_) return s;  // nothing added (or `earlier` is not a past of `later`)
  if (earlier.n_ == 0) return later;
  const double n1 = static_cast<double>(later.n_), n0 = static_cast<double>(earlier.n_);
  s.n_ = later.n_ - earlier.n_;
  const double n = static_cast<double>(s.n_);
  s.total_ = later.total_ - earlier.total_;
  // later = merge(earlier, interval): solve merge()'s two updates for the interval's moments. The
  // mean as later's plus a correction keeps the cancellation to the difference of the two means.
  s.mean_ = later.mean_ + (later.mean_ - earlier.mean_) * n0 / n;
  const double d = s.mean_ - earlier.mean_;
  s.m2_ = std::max(0.0, later.m2_ - earlier.m2_ - d * d * n0 * n / n1);
  const double unknown = std::numeric_limits<double>::quiet_NaN();
  s.min_ = later.min_ < earlier.min_ ? later.min_ : unknown;
  s.max_ = later.max_ > earlier.max_ ? later.max_ : unknown;
  return s;
}

double Stats::std() const { return n_ > 1 ? std::sqrt(std::max(0.0, m2_ / static_cast<double>(n_))) : 0.0; }

namespace {
const double kGamma = (1.0 + LogHistogram::kRelativeError) / (1.0 - LogHistogram::kRelativeError);
const double kLogGamma = std::log(kGamma);
}  // namespace

LogHistogram::LogHistogram() : counts_(kBuckets, 0) {}

namespace {
// ln(x) for finite x > 0 without a call into libm: add() runs inside training hooks, where libm's
// code is cold and one std::log cost about a microsecond. x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s) with s = (m - 1) / (m + 1), |s| < 0.172: the series to s^13 leaves an error
// below 1e-12, against buckets 0.01 wide in ln units.
double fast_ln(double x) {
  const auto bits = std::bit_cast<uint64_t>(x);
  int e = static_cast<int>((bits >> 52) & 0x7FF) - 1023;
  double m = std::bit_cast<double>((bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);  // [1, 2)
  if (m > 1.4142135623730951) {
    m *= 0.5;
    ++e;
  }
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  const double series =
      1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11 + s2 * (1.0 / 13))))));
  return static_cast<double>(e) * 0.6931471805599453 + 2.0 * s * series;
}
}  // namespace

int LogHistogram::bucket_of(double x) {
  if (!(x > kMinValue)) return 0;         // also NaN
  if (!(x < 1e300)) return kBuckets - 1;  // also +inf; fast_ln then only sees normal numbers
  const double v = fast_ln(x / kMinValue) / kLogGamma;  // > 0
  auto i = static_cast<int64_t>(v);                      // ceil for v > 0, without libm
  if (static_cast<double>(i) < v) ++i;
  return static_cast<int>(std::min<int64_t>(i, kBuckets - 1));
}

double LogHistogram::bucket_value(int i) {
  if (i == 0) return kMinValue;
  return kMinValue * 2.0 * std::pow(kGamma, i) / (kGamma + 1.0);
}

void LogHistogram::add(double x) {
  ++counts_[bucket_of(x)];
  if (n_ == 0) {
    min_ = max_ = x;
  } else {
    min_ = std::min(min_, x);
    max_ = std::max(max_, x);
  }
  ++n_;
}

void LogHistogram::merge(const LogHistogram& o) {
  if (o.n_ == 0) return;
  for (int i = 0; i < kBuckets; ++i) counts_[i] += o.counts_[i];
  if (n_ == 0) {
    min_ = o.min_;
    max_ = o.max_;
  } else {
    min_ = std::min(min_, o.min_);
    max_ = std::max(max_, o.max_);
  }
  n_ += o.n_;
}

LogHistogram LogHistogram::from_counts(const double* counts, double min, double max) {
  LogHistogram h;
  for (int i = 0; i < kBuckets; ++i) {
    const double c = counts[i];
    if (!(c >= 0 && c <= 9007199254740992.0 && std::floor(c) == c))
      throw std::invalid_argument("stepscope: packed histogram bucket " + std::to_string(i) +
                                  " holds a bad count: " + std::to_string(c));
    h.counts_[i] = static_cast<uint64_t>(c);
    h.n_ += static_cast<int64_t>(c);
  }
  if (h.n_ > 0) {
    h.min_ = min;
    h.max_ = max;
  }
  return h;
}

LogHistogram LogHistogram::since(const LogHistogram& later, const LogHistogram& earlier) {
  LogHistogram h;
  if (later.n_ <= earlier.n_) return h;
  if (earlier.n_ == 0) return later;
  int lo = -1, hi = -1;
  for (int i = 0; i < kBuckets; ++i) {
    // A bucket cannot lose samples; a smaller count means `earlier` is no past of `later`.
    const uint64_t c = later.counts_[i] >= earlier.counts_[i] ? later.counts_[i] - earlier.counts_[i] : 0;
    h.counts_[i] = c;
    h.n_ += static_cast<int64_t>(c);
    if (c > 0) {
      if (lo < 0) lo = i;
      hi = i;
    }
  }
  if (h.n_ == 0) return h;
  h.min_ = later.min_ < earlier.min_ ? later.min_ : std::clamp(bucket_value(lo), later.min_, later.max_);
  h.max_ = later.max_ > earlier.max_ ? later.max_ : std::clamp(bucket_value(hi), later.min_, later.max_);
  return h;
}

Series Series::since(const Series& later, const Series& earlier) {
  Series s{Stats::since(later.stats, earlier.stats), LogHistogram::since(later.hist, earlier.hist)};
  if (s.stats.count() > 0 && (std::isnan(s.stats.min()) || std::isnan(s.stats.max()))) {
    double m[Stats::kMoments];
    s.stats.to_moments(m);
    if (std::isnan(m[4])) m[4] = s.hist.min();
    if (std::isnan(m[5])) m[5] = s.hist.max();
    s.stats = Stats::from_moments(m);
  }
  return s;
}

double LogHistogram::quantile(double q) const {
  if (n_ == 0) return 0.0;
  q = std::clamp(q, 0.0, 1.0);
  // The "lower" rank (numpy's method="lower"): a sample that occurred, never an interpolation; on a
  // short run p99 stays below the max until n = 101 (README, "Where the time goes").
  const auto rank = static_cast<uint64_t>(std::floor(q * static_cast<double>(n_ - 1)));
  if (rank == 0) return min_;  // the extremes are kept exactly
  if (rank + 1 == static_cast<uint64_t>(n_)) return max_;
  uint64_t seen = 0;
  for (int i = 0; i < kBuckets; ++i) {
    seen += counts_[i];
    if (seen > rank) return std::clamp(bucket_value(i), min_, max_);
  }
  return max_;
}

}  // namespace stepscope::timing
