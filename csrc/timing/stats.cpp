#include "timing/stats.h"

#include <algorithm>
#include <cmath>

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

double Stats::std() const { return n_ > 1 ? std::sqrt(std::max(0.0, m2_ / static_cast<double>(n_))) : 0.0; }

namespace {
const double kGamma = (1.0 + LogHistogram::kRelativeError) / (1.0 - LogHistogram::kRelativeError);
const double kLogGamma = std::log(kGamma);
}  // namespace

LogHistogram::LogHistogram() : counts_(kBuckets, 0) {}

int LogHistogram::bucket_of(double x) {
  if (!(x > kMinValue)) return 0;
  const int i = static_cast<int>(std::ceil(std::log(x / kMinValue) / kLogGamma));
  return std::min(i, kBuckets - 1);
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

double LogHistogram::quantile(double q) const {
  if (n_ == 0) return 0.0;
  q = std::clamp(q, 0.0, 1.0);
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
