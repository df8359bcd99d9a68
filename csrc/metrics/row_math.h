// Per-sample math shared by the CPU and CUDA update kernels. No ATen: plain floats, so the
// GoogleTests check it directly and both devices use one definition of every rule.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "metrics/layout.h"

namespace stepscope::metrics {

STEPSCOPE_HD bool is_finite_bits(float x) {
  // Bit test instead of std::isfinite: stays correct under any floating-point flags.
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(x);
#else
  std::memcpy(&u, &x, sizeof(u));
#endif
  return (u & 0x7f800000u) != 0x7f800000u;
}

// Cephes' expf constants, shared by exp_nonpos below and the CPU update's AVX2 copy of it
// (update_cpu.cpp), so that both compute the same polynomial: x = n ln2 + r with ln2 split in
// two parts (kExpLn2Hi exact in float), exp(r) ~ 1 + r + r^2 (p0 r^5 + ... + p5).
inline constexpr float kExpMinArg = -87.0f;
inline constexpr float kExpLog2e = 1.44269504088896341f;
inline constexpr float kExpLn2Hi = 0.693359375f;
inline constexpr float kExpLn2Lo = -2.12194440e-4f;
inline constexpr float kExpP0 = 1.9875691500e-4f;
inline constexpr float kExpP1 = 1.3981999507e-3f;
inline constexpr float kExpP2 = 8.3334519073e-3f;
inline constexpr float kExpP3 = 4.1665795894e-2f;
inline constexpr float kExpP4 = 1.6666665459e-1f;
inline constexpr float kExpP5 = 5.0000001201e-1f;

// exp(x) for x <= 0 to about 1 ulp (Cephes' polynomial), branch-free so the CPU row loops
// vectorise without -ffast-math. Arguments below -87 flush to exp(-87) ~ 1.6e-38, which cannot
// move a sum that already holds exp(0) = 1.
STEPSCOPE_HD float exp_nonpos(float x) {
  x = x < kExpMinArg ? kExpMinArg : x;
  const float fx = x * kExpLog2e + 0.5f;
  float n = static_cast<float>(static_cast<int32_t>(fx));
  n = n > fx ? n - 1.0f : n;  // floor without floorf, which needs SSE4.1 to vectorise
  const float r = x - n * kExpLn2Hi - n * kExpLn2Lo;
  float y = kExpP0;
  y = y * r + kExpP1;
  y = y * r + kExpP2;
  y = y * r + kExpP3;
  y = y * r + kExpP4;
  y = y * r + kExpP5;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
#if defined(__CUDA_ARCH__)
  scale = __int_as_float(bits);
#else
  std::memcpy(&scale, &bits, sizeof(scale));
#endif
  return y * scale;
}

// Online reduction of one multiclass row: max, its first index (torch.argmax's tie rule),
// sum of exp(x - max) (log-sum-exp in one pass), and the rank of the target: the number of
// classes j with x_j > x_t, or x_j == x_t and j < t (the lower index wins a tie).
struct RowState {
  float max;
  float sumexp;
  int32_t argmax;
  int32_t above;
  bool nonfinite;
};

STEPSCOPE_HD RowState row_identity() {
  return RowState{-std::numeric_limits<float>::infinity(), 0.0f, std::numeric_limits<int32_t>::max(), 0,
                  false};
}

template <bool kSumExp>
STEPSCOPE_HD void row_push(RowState& s, float x, int32_t j, float xt, int32_t t) {
  if (!is_finite_bits(x)) {
    s.nonfinite = true;
    return;
  }
  s.above += (x > xt) || (x == xt && j < t);
  if (x > s.max) {
    if (kSumExp) s.sumexp = s.sumexp * exp_nonpos(s.max - x) + 1.0f;
    s.max = x;
    s.argmax = j;
  } else {
    if (kSumExp) s.sumexp += exp_nonpos(x - s.max);
    if (x == s.max && j < s.argmax) s.argmax = j;
  }
}

template <bool kSumExp>
STEPSCOPE_HD RowState row_merge(const RowState& a, const RowState& b) {
  RowState r;
  r.nonfinite = a.nonfinite || b.nonfinite;
  r.above = a.above + b.above;
  const bool take_b = b.max > a.max || (b.max == a.max && b.argmax < a.argmax);
  r.max = take_b ? b.max : a.max;
  r.argmax = take_b ? b.argmax : a.argmax;
  if (kSumExp) {
    // An empty side has sumexp 0 and max -inf; skip it rather than form exp(-inf - -inf).
    const float ea = a.sumexp > 0.0f ? a.sumexp * exp_nonpos(a.max - r.max) : 0.0f;
    const float eb = b.sumexp > 0.0f ? b.sumexp * exp_nonpos(b.max - r.max) : 0.0f;
    r.sumexp = ea + eb;
  } else {
    r.sumexp = 0.0f;
  }
  return r;
}

// What one finished multiclass sample contributes.
struct SampleResult {
  int32_t pred;   // argmax
  int32_t rank;   // classes ranked above the target
  float conf;     // max softmax probability (logits) or max probability (probs)
  double loss;    // cross-entropy of the target
};

STEPSCOPE_HD SampleResult finish_row(const RowState& s, float xt, bool logits) {
  SampleResult r;
  r.pred = s.argmax;
  r.rank = s.above;
  if (logits) {
    r.conf = 1.0f / s.sumexp;  // exp(max - lse) = 1 / sum(exp(x - max))
    r.loss = static_cast<double>(std::log(s.sumexp)) + static_cast<double>(s.max) - static_cast<double>(xt);
  } else {
    r.conf = s.max;
    r.loss = -static_cast<double>(std::log(xt));
  }
  return r;
}

// Binary / multilabel element: probability, hard prediction and binary cross-entropy, in T: float
// for float32/float16/bfloat16 inputs, double for float64 ones (CPU), so that a float64 probability
// is compared with the threshold without being rounded to float first.
template <typename T>
struct ElementResultT {
  T prob;
  bool pred;
  double loss;
};
using ElementResult = ElementResultT<float>;

template <typename T>
STEPSCOPE_HD ElementResultT<T> binary_element(T x, bool logits, T threshold, int64_t y) {
  ElementResultT<T> r;
  const T yf = static_cast<T>(y);
  if (logits) {
    const T ax = x < T(0) ? -x : x;
    r.prob = T(1) / (T(1) + std::exp(-x));
    // max(x, 0) - x*y + log(1 + exp(-|x|)): BCE with logits without overflow.
    r.loss = static_cast<double>((x > T(0) ? x : T(0)) - x * yf + std::log1p(std::exp(-ax)));
  } else {
    r.prob = x;
    // torch.nn.BCELoss clamps each log at -100 so that p in {0, 1} stays finite.
    const T lp = std::log(x) < T(-100) ? T(-100) : std::log(x);
    const T lq = std::log(T(1) - x) < T(-100) ? T(-100) : std::log(T(1) - x);
    r.loss = -static_cast<double>(yf * lp + (T(1) - yf) * lq);
  }
  r.pred = r.prob > threshold;
  return r;
}

}  // namespace stepscope::metrics
