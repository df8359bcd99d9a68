// The gradient-statistics state: one contiguous float64 vector per GradStats, laid out by
// HealthLayout(P parameters, a ring of R steps). Its size is fixed when it is made,
//   numel = kHeaderLen + kHistLen + 8 * P + 3 * R   (8 bytes each),
// so a run of any length keeps it on the device without growing it, reset is one fill, and a
// report reads it with one device-to-host copy.
//
// No ATen here: the kernels, the reader and the GoogleTests use this header directly.
#pragma once

#include <cmath>
#include <cstdint>

namespace stepscope::health {

// The global norm's histogram: kBinsPerDecade log-spaced bins per decade over
// [10^kLogMin, 10^kLogMax), then an underflow bin (below 10^kLogMin, zero included) at the front
// and an overflow bin (10^kLogMax and up) and a non-finite bin at the back. A quantile read from
// it is the geometric middle of its bin: within a factor 10^(1 / (2 * kBinsPerDecade)) (1.8 %)
// of a sample in that bin.
inline constexpr int64_t kBinsPerDecade = 64;
inline constexpr int64_t kLogMin = -12;
inline constexpr int64_t kLogMax = 12;
inline constexpr int64_t kLogBins = (kLogMax - kLogMin) * kBinsPerDecade;
inline constexpr int64_t kHistLen = kLogBins + 3;   // underflow, the log bins, overflow, non-finite
inline constexpr int64_t kHistOverflow = kLogBins + 1;
inline constexpr int64_t kHistNonfinite = kLogBins + 2;

// The scalar header, in this order at the front of the state.
enum Header : int64_t {
  kSteps = 0,          // updates accumulated
  kLastStep,           // the step number of the last update
  kLastNorm,           // its global gradient norm
  kLastNonfinite,      // its non-finite count (elements on CPU, parameters on CUDA)
  kCount,              // updates whose global norm was finite: the streaming statistics' count
  kSum,                // sum of those global norms
  kSumSq,              // sum of their squares
  kMin,                // their minimum (+inf while kCount is 0)
  kMax,                // their maximum (0 while kCount is 0)
  kNonfiniteSteps,     // updates with a non-finite gradient (or global norm)
  kFirstNonfiniteStep,   // the step number of the first of them; -1 while none
  kFirstNonfiniteParam,  // the index of its first non-finite parameter; -1 while none
  kHeaderLen
};

// Histogram bin of a global norm (the CUDA path computes the same formula with tensor ops).
inline int64_t hist_bin(double norm) {
  if (!std::isfinite(norm)) return kHistNonfinite;
  if (!(norm > 0.0)) return 0;
  const double b = std::floor((std::log10(norm) - static_cast<double>(kLogMin)) * kBinsPerDecade) + 1.0;
  return b < 0.0 ? 0 : b > static_cast<double>(kHistOverflow) ? kHistOverflow : static_cast<int64_t>(b);
}

// Lower edge of log bin b (1 <= b <= kHistOverflow; kHistOverflow's is 10^kLogMax).
inline double hist_edge(int64_t b) {
  return std::pow(10.0, static_cast<double>(kLogMin) + static_cast<double>(b - 1) / kBinsPerDecade);
}

// Offsets (in elements) of every block; per-parameter blocks are [P], ring blocks [R], indexed
// by the parameter's position in the grads list and by the ring slot.
struct HealthLayout {
  int64_t params = 0;      // P
  int64_t ring = 0;        // R
  int64_t hist = kHeaderLen;  // [kHistLen] the global norm's histogram
  int64_t norm_last = 0;      // [P] the norm of the last gradient seen (kept over steps without one)
  int64_t norm_max = 0;       // [P] the largest finite norm
  int64_t norm_sum = 0;       // [P] sum of the finite norms
  int64_t nonfinite_last = 0;   // [P] non-finite count in the last update
  int64_t nonfinite_total = 0;  // [P] non-finite count over all updates
  int64_t nonfinite_steps = 0;  // [P] updates in which the parameter's gradient was non-finite
  int64_t no_grad_last = 0;     // [P] 1 if the last update had no gradient for it, else 0
  int64_t no_grad_steps = 0;    // [P] updates without a gradient for it
  int64_t ring_step = 0;       // [R] step number of the update in each slot (-1: empty)
  int64_t ring_norm = 0;       // [R] its global norm
  int64_t ring_nonfinite = 0;  // [R] its non-finite count
  int64_t numel = 0;

  static constexpr int64_t kFixedLen = kHeaderLen + kHistLen;
  static constexpr int64_t kPerParam = 8;
  static constexpr int64_t kPerSlot = 3;

  HealthLayout() = default;
  HealthLayout(int64_t p, int64_t r) : params(p), ring(r) {
    int64_t at = kFixedLen;
    for (int64_t* block : {&norm_last, &norm_max, &norm_sum, &nonfinite_last, &nonfinite_total, &nonfinite_steps,
                           &no_grad_last, &no_grad_steps}) {
      *block = at;
      at += p;
    }
    for (int64_t* block : {&ring_step, &ring_norm, &ring_nonfinite}) {
      *block = at;
      at += r;
    }
    numel = at;
  }
  int64_t bytes() const { return numel * 8; }
};

// The named blocks, for _C.health_layout and the tests.
struct HealthBlock {
  const char* name;
  int64_t HealthLayout::*offset;
};
inline constexpr HealthBlock kHealthBlocks[] = {
    {"hist", &HealthLayout::hist},
    {"norm_last", &HealthLayout::norm_last},
    {"norm_max", &HealthLayout::norm_max},
    {"norm_sum", &HealthLayout::norm_sum},
    {"nonfinite_last", &HealthLayout::nonfinite_last},
    {"nonfinite_total", &HealthLayout::nonfinite_total},
    {"nonfinite_steps", &HealthLayout::nonfinite_steps},
    {"no_grad_last", &HealthLayout::no_grad_last},
    {"no_grad_steps", &HealthLayout::no_grad_steps},
    {"ring_step", &HealthLayout::ring_step},
    {"ring_norm", &HealthLayout::ring_norm},
    {"ring_nonfinite", &HealthLayout::ring_nonfinite},
};

}  // namespace stepscope::health
