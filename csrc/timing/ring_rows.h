// What the ring's text writers share (ring_json.cpp, ring_csv.cpp): a step's host seconds, its
// device spans in seconds, its MFU and tokens/s, and the health series joined by step. Internal to
// those files, both compiled with -ffp-contract=off, so that these inline rules round alike.
#pragma once

#include <cmath>
#include <cstdint>
#include <unordered_map>

#include "timing/ring_json.h"

namespace stepscope::timing::rows {

// A partition span's interval as the GPU ran it (bind_timing.cpp's device_spans), in seconds.
inline double device_s(int64_t t, float lag_us) { return (static_cast<double>(t) + 1e3 * lag_us) * 1e-9; }

inline bool device_span(const SpanRecord& r) {
  return r.kind == SpanRecord::kPartition && !std::isnan(r.lag0_us) && !std::isnan(r.lag1_us);
}

inline double host_seconds(const StepRecord& s) {
  double sum = 0;  // Python's sum(host.values()): left to right, from 0
  for (int i = 0; i < kNumPartition; ++i) sum += s.host[i];
  return sum;
}

// stepscope/diagnose_throughput.py's step_rates: a step's MFU and tokens/s from its host time and
// the report's FLOPs per step, peak and tokens per sample; false where one of them is unknown (0).
inline bool step_mfu(const StepRecord& s, const RingJoin& j, double& out) {
  const double host_s = host_seconds(s);
  if (!(host_s > 0 && j.flops_per_step != 0 && j.peak_flops != 0)) return false;
  out = j.flops_per_step / host_s / j.peak_flops;
  return true;
}

inline bool step_tokens_per_s(const StepRecord& s, const RingJoin& j, double& out) {
  const double host_s = host_seconds(s);
  if (!(host_s > 0 && j.tokens_per_sample != 0 && s.samples != 0)) return false;
  out = j.tokens_per_sample * static_cast<double>(s.samples) / host_s;
  return true;
}

struct Joined {  // RingJoin's series by step (a later entry replaces an earlier one)
  std::unordered_map<int64_t, double> grad_norm, loss;
  explicit Joined(const RingJoin& j) {
    for (const auto& [s, v] : j.grad_norm) grad_norm[s] = v;
    for (const auto& [s, v] : j.loss) loss[s] = v;
  }
  static const double* find(const std::unordered_map<int64_t, double>& m, int64_t step) {
    const auto it = m.find(step);
    return it == m.end() ? nullptr : &it->second;
  }
};

}  // namespace stepscope::timing::rows
