// CPU update for binary and multilabel: every element is a sample of its label. Contiguous
// float32/float16/bfloat16 rows go through the SIMD kernel (row_simd.h), the rest (float64, strided
// or extra dims) through the portable loop; both follow binary_element's rules.
//
// 'auto' is decided in the same pass: the whole batch is probabilities iff every value (ignored
// positions included) lies in [0, 1], a NaN counting as outside. The update first reads the batch
// as probabilities into scratch, stopping everywhere at the first value outside; if there was one,
// the batch is read again as logits (for logits that stop comes within the first few values), else
// the scratch is added to the state. No host sync and no second pass over a batch of probabilities.
#include <ATen/ATen.h>

#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "metrics/chunked.h"
#include "metrics/row_math.h"
#include "metrics/row_simd.h"

namespace stepscope::metrics {
namespace {

struct ElemCall {
  const UpdateInputs& in;
  double* acc;
  int64_t b, e;  // samples (n, d) of this chunk
  bool logits, check_range;
};

// The portable loop over [b, e); false when check_range met a value outside [0, 1].
template <typename scalar_t, typename target_t>
bool elementwise_portable(const ElemCall& c) {
  // float64 preds are read, thresholded and checked for finiteness as double (a float would round
  // p = 0.50000001 to 0.5 and overflow finite values past 3.4e38 to inf).
  using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const UpdateInputs& in = c.in;
  const Layout& lay = in.lay;
  double* acc = c.acc;
  const int64_t L = in.c, D = in.d;
  const scalar_t* P = in.preds.const_data_ptr<scalar_t>();
  const target_t* T = static_cast<const target_t*>(in.target.const_data_ptr());
  const int64_t sN = in.preds.stride(0), sL = in.preds.stride(1), sD = in.preds.stride(2);
  const int64_t tN = in.target.stride(0), tL = in.target.stride(1), tD = in.target.stride(2);
  const compute_t thr = static_cast<compute_t>(in.cfg.threshold);
  const bool has_ignore = in.cfg.ignore_index.has_value();
  const int64_t ignore = in.cfg.ignore_index.value_or(0);
  const bool per_label_valid = lay.valid_len > 1;
  for (int64_t s = c.b; s < c.e; ++s) {
    const int64_t n = s / D, d = s % D;
    for (int64_t l = 0; l < L; ++l) {
      const compute_t x = static_cast<compute_t>(P[n * sN + l * sL + d * sD]);
      if (c.check_range && !(x >= compute_t(0) && x <= compute_t(1))) return false;
      const int64_t y = static_cast<int64_t>(T[n * tN + l * tL + d * tD]);
      if (has_ignore && y == ignore) {
        acc[lay.ignored] += 1.0;
        continue;
      }
      if (y != 0 && y != 1) {
        acc[lay.invalid] += 1.0;
        continue;
      }
      if (!std::isfinite(x)) {
        acc[lay.nonfinite] += 1.0;
        continue;
      }
      const ElementResultT<compute_t> r = binary_element(x, c.logits, thr, y);
      acc[lay.tp + l] += r.pred && y;
      acc[lay.pred + l] += r.pred;
      acc[lay.target + l] += static_cast<double>(y);
      acc[lay.valid + (per_label_valid ? l : 0)] += 1.0;
      acc[lay.loss] += r.loss;
      const int bin = ece_bin(static_cast<float>(r.prob));
      acc[lay.ece_count + bin] += 1.0;
      acc[lay.ece_conf + bin] += r.prob;
      acc[lay.ece_acc + bin] += static_cast<double>(y);
    }
  }
  return true;
}

// Rows [b, e) of contiguous [N, L] preds and target through the SIMD kernel, in pieces small
// enough for its int32 counters.
template <typename scalar_t, typename target_t>
bool elementwise_simd(const ElemCall& c) {
  const UpdateInputs& in = c.in;
  const Layout& lay = in.lay;
  const int64_t L = in.c;
  simd::ElemArgs a{};
  a.L = L;
  a.xkind = std::is_same_v<scalar_t, float>       ? simd::XKind::kF32
            : std::is_same_v<scalar_t, at::Half> ? simd::XKind::kF16
                                                  : simd::XKind::kBF16;
  a.ykind = std::is_same_v<target_t, int64_t>   ? simd::YKind::kI64
            : std::is_same_v<target_t, int32_t> ? simd::YKind::kI32
                                                : simd::YKind::kU8;
  a.logits = c.logits;
  a.check_range = c.check_range;
  a.threshold = static_cast<float>(in.cfg.threshold);
  a.has_ignore = in.cfg.ignore_index.has_value();
  a.ignore = in.cfg.ignore_index.value_or(0);
  std::vector<int32_t> counts(4 * (L + 8));
  const int64_t piece = std::max<int64_t>(1, (int64_t{1} << 26) / L);
  for (int64_t r = c.b; r < c.e; r += piece) {
    std::fill(counts.begin(), counts.end(), 0);
    simd::ElemSums s;
    s.tp = counts.data();
    s.pc = s.tp + L + 8;
    s.tc = s.pc + L + 8;
    s.vc = s.tc + L + 8;
    a.x = in.preds.const_data_ptr<scalar_t>() + r * L;
    a.y = static_cast<const target_t*>(in.target.const_data_ptr()) + r * L;
    a.rows = std::min(piece, c.e - r);
    if (!simd::elementwise(a, s)) return false;
    double* acc = c.acc;
    for (int64_t l = 0; l < L; ++l) {
      acc[lay.tp + l] += s.tp[l];
      acc[lay.pred + l] += s.pc[l];
      acc[lay.target + l] += s.tc[l];
      acc[lay.valid + (lay.valid_len > 1 ? l : 0)] += s.vc[l];
    }
    acc[lay.loss] += s.loss;
    acc[lay.ignored] += static_cast<double>(s.ignored);
    acc[lay.invalid] += static_cast<double>(s.invalid);
    acc[lay.nonfinite] += static_cast<double>(s.nonfinite);
    for (int64_t i = 0; i < kEceSlots; ++i) {
      acc[lay.ece_count + i] += s.ece_count[i];
      acc[lay.ece_conf + i] += s.ece_conf[i];
      acc[lay.ece_acc + i] += s.ece_acc[i];
    }
  }
  return true;
}

template <typename scalar_t, typename target_t>
void elementwise_typed(const UpdateInputs& in, double* state) {
  const Layout& lay = in.lay;
  const int64_t L = in.c;
  const bool contiguous = in.d == 1 && in.preds.stride(1) == 1 && in.target.stride(1) == 1 &&
                          (in.n == 1 || (in.preds.stride(0) == L && in.target.stride(0) == L));
  const bool simd_ok = !std::is_same_v<scalar_t, double> && contiguous && simd::enabled();
  auto pass = [&](bool logits, bool check, double* into, std::atomic<bool>* stop) {
    run_chunked(in.n * in.d, L, lay, into, [&](double* acc, int64_t b, int64_t e, std::vector<int64_t>&) {
      if (stop != nullptr && stop->load(std::memory_order_relaxed)) return;
      const ElemCall c{in, acc, b, e, logits, check};
      bool ok = true;
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (simd_ok) ok = elementwise_simd<scalar_t, target_t>(c);
      }
      if (!simd_ok) ok = elementwise_portable<scalar_t, target_t>(c);
      if (!ok) stop->store(true, std::memory_order_relaxed);
    });
  };
  if (in.cfg.input != InputKind::kAuto) {
    pass(in.cfg.input == InputKind::kLogits, false, state, nullptr);
    return;
  }
  std::atomic<bool> outside{false};
  std::vector<double> probs(lay.numel, 0.0);
  pass(false, true, probs.data(), &outside);
  if (outside.load()) {
    pass(true, false, state, nullptr);
  } else {
    for (int64_t i = 0; i < lay.numel; ++i) state[i] += probs[i];
  }
}

}  // namespace

void elementwise_update_cpu(const UpdateInputs& in, double* state) {
  STEPSCOPE_DISPATCH_PREDS(in.preds.scalar_type(), "classification_update_cpu", [&] {
    STEPSCOPE_DISPATCH_TARGET(in.target.scalar_type(), "classification_update_cpu",
                              [&] { elementwise_typed<scalar_t, target_t>(in, state); });
  });
}

}  // namespace stepscope::metrics
