// CPU multiclass update: one pass over the predictions, accumulating into the float64 state
// (binary and multilabel: elementwise_cpu.cpp).
//
// Where the CPU has AVX2/FMA/F16C each row goes to the SIMD row kernel (row_simd.h): contiguous
// float32/float16/bfloat16 rows are read in place (half types converted in registers), strided ones
// gathered into a small float buffer first. Otherwise (and for float64, or with the SIMD path
// switched off) the row is converted to float (double for float64) in that buffer and reduced by
// short loops written so that GCC vectorises them (finite check, max, target rank, sum of exp).
// Large inputs are split over at::parallel_for (chunked.h); each chunk keeps its own copy of the
// O(C) part of the state and logs confusion-matrix cells as indices, so the C x C matrix is never
// copied per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "metrics/row_math.h"
#include "metrics/row_simd.h"
#include "metrics/chunked.h"
#include "metrics/update.h"

namespace stepscope::metrics {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define STEPSCOPE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define STEPSCOPE_CLONES
#endif

struct RowSummary {
  bool finite;
  int32_t argmax;
  int32_t above;
  double max;
  double min;  // for the multiclass 'auto' rule: is every value in [0, 1]?
  double sumexp;
  double xt;  // the target's value as read (float, or double for float64 input)
};

// Reductions over one contiguous row, in two vectorisable loops: (finite check, max, target
// rank) then sum of exp. The tie rules (first index of the max, a lower index ranks above an
// equal target) are torch.argmax's and stepscope's top-k definition. A non-finite value turns
// the running x * 0 sum into NaN, which flags the row without a branch in the loop.
float sum_exp_shifted_portable(const float* x, int64_t C, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < C; ++j) s += exp_nonpos(x[j] - m);
  return s;
}

float sum_exp_shifted(const float* x, int64_t C, float m) { return sum_exp_shifted_portable(x, C, m); }

template <typename T>
inline RowSummary summarize_row_impl(const T* x, int64_t C, int64_t t, bool want_sumexp) {
  RowSummary r{};
  const T xt = x[t];
  T m = x[0];
  T mn = x[0];
  T poison = 0;
  int32_t above = 0;
#pragma omp simd reduction(max : m) reduction(min : mn) reduction(+ : above, poison)
  for (int64_t j = 0; j < C; ++j) {
    const T v = x[j];
    poison += v * T(0);
    m = v > m ? v : m;
    mn = v < mn ? v : mn;
    above += (v > xt) | ((v == xt) & (j < t));
  }
  r.finite = poison == T(0);
  if (!r.finite) return r;
  int64_t arg = 0;
  while (x[arg] != m) ++arg;
  double se = 0.0;
  if (want_sumexp) {
    if constexpr (std::is_same_v<T, float>) {
      se = sum_exp_shifted(x, C, m);
    } else {
      for (int64_t j = 0; j < C; ++j) se += std::exp(x[j] - m);
    }
  }
  r.argmax = static_cast<int32_t>(arg);
  r.above = above;
  r.max = static_cast<double>(m);
  r.min = static_cast<double>(mn);
  r.sumexp = se;
  r.xt = static_cast<double>(xt);
  return r;
}

// float rows get an AVX2 clone picked at load time (the baseline build targets plain x86-64).
STEPSCOPE_CLONES RowSummary summarize_row(const float* x, int64_t C, int64_t t, bool want_sumexp) {
  return summarize_row_impl(x, C, t, want_sumexp);
}
RowSummary summarize_row(const double* x, int64_t C, int64_t t, bool want_sumexp) {
  return summarize_row_impl(x, C, t, want_sumexp);
}

// One row of C values at stride sC, through the SIMD kernels when allowed (half and bfloat16
// converted in registers; a strided row gathered into buf first), else the portable loops.
template <typename scalar_t, typename compute_t>
RowSummary reduce_row(const scalar_t* row, int64_t C, int64_t sC, int64_t t, bool want_sumexp, bool use_simd,
                      compute_t* buf) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (use_simd) {
      simd::RowOut o;
      const auto* bits = reinterpret_cast<const uint16_t*>(row);
      if (sC != 1) {
        for (int64_t j = 0; j < C; ++j) buf[j] = static_cast<float>(row[j * sC]);
        o = simd::row_f32(buf, C, t, want_sumexp);
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        o = simd::row_f32(row, C, t, want_sumexp);
      } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
        o = simd::row_f16(bits, C, t, want_sumexp);
      } else {
        o = simd::row_bf16(bits, C, t, want_sumexp);
      }
      return RowSummary{o.finite, o.argmax, o.above, o.max, o.min, o.sumexp, o.xt};
    }
  }
  const compute_t* x = buf;
  if (std::is_same_v<scalar_t, compute_t> && sC == 1) {
    x = reinterpret_cast<const compute_t*>(row);
  } else {
    for (int64_t j = 0; j < C; ++j) buf[j] = static_cast<compute_t>(row[j * sC]);
  }
  return summarize_row(x, C, t, want_sumexp);
}

// Adds one reading of a sample (loss, calibration slot) at `base`, laid out as the state's
// loss, ece_count, ece_conf, ece_acc (kReadingLen values).
inline void add_reading(double* base, double loss, float conf, bool hit) {
  const int bin = ece_bin(conf);
  base[0] += loss;
  base[1 + bin] += 1.0;
  base[1 + kEceSlots + bin] += conf;
  base[1 + 2 * kEceSlots + bin] += hit;
}

// Multiclass 'auto': keeps the reading the whole batch calls for (probabilities iff every value
// was in [0, 1]) and clears the scratch, which is zero again between updates.
void fold_pending(const Layout& lay, double* state) {
  const bool logits = state[lay.pending + 2 * kReadingLen] != 0.0;
  const double* src = state + lay.pending + (logits ? 0 : kReadingLen);
  for (int64_t i = 0; i < kReadingLen; ++i) state[lay.loss + i] += src[i];
  std::fill(state + lay.pending, state + lay.pending + kPendingLen, 0.0);
}

template <typename scalar_t, typename target_t>
void multiclass_cpu(const UpdateInputs& in, double* state) {
  using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Config& cfg = in.cfg;
  const Layout& lay = in.lay;
  const int64_t C = in.c, D = in.d;
  const scalar_t* P = in.preds.const_data_ptr<scalar_t>();
  const target_t* T = static_cast<const target_t*>(in.target.const_data_ptr());
  const int64_t sN = in.preds.stride(0), sC = in.preds.stride(1), sD = in.preds.stride(2);
  const int64_t tN = in.target.stride(0), tD = in.target.stride(1);
  const bool is_auto = lay.pending >= 0;
  const bool has_ignore = cfg.ignore_index.has_value();
  const int64_t ignore = cfg.ignore_index.value_or(0);
  const bool want_logits = cfg.input != InputKind::kProbs;
  const bool direct = std::is_same_v<scalar_t, compute_t> && sC == 1;
  const bool keep_cells = lay.confmat >= 0;
  const bool use_simd = !std::is_same_v<scalar_t, double> && simd::enabled();

  run_chunked(in.n * D, C, lay, state, [&](double* acc, int64_t b, int64_t e, std::vector<int64_t>& cells) {
    std::vector<compute_t> buf(direct ? 1 : C);
    if (keep_cells) cells.reserve(e - b);
    // 'auto': once this chunk saw a value outside [0, 1] the batch is logits, and the
    // probabilities reading (which would be thrown away) is no longer kept.
    bool outside = false;
    double* const logits_at = is_auto ? acc + lay.pending : acc + lay.loss;
    double* const probs_at = is_auto ? acc + lay.pending + kReadingLen : acc + lay.loss;
    for (int64_t s = b; s < e; ++s) {
      const int64_t n = D == 1 ? s : s / D, d = D == 1 ? 0 : s % D;  // no division for plain rows
      const int64_t t = static_cast<int64_t>(T[n * tN + d * tD]);
      const scalar_t* row = P + n * sN + d * sD;
      const bool ignored = has_ignore && t == ignore;
      if (ignored || t < 0 || t >= C) {
        // Skipped rows do not take part in the 'auto' rule either (torchmetrics' calibration drops
        // ignored rows before its range check).
        acc[ignored ? lay.ignored : lay.invalid] += 1.0;
        continue;
      }
      const RowSummary r = reduce_row(row, C, sC, t, want_logits, use_simd, buf.data());
      if (!r.finite) {
        acc[lay.nonfinite] += 1.0;
        outside = true;
        continue;
      }
      outside = outside || r.min < 0.0 || r.max > 1.0;
      const int64_t p = r.argmax;
      const bool hit = p == t;
      acc[lay.tp + t] += hit;
      acc[lay.pred + p] += 1.0;
      acc[lay.target + t] += 1.0;
      acc[lay.valid] += 1.0;
      if (keep_cells) cells.push_back(t * C + p);
      for (int64_t i = 0; i < lay.num_topk; ++i) acc[lay.topk + i] += r.above < cfg.top_k[i];
      if (want_logits) {
        add_reading(logits_at, std::log(r.sumexp) + r.max - r.xt,
                    static_cast<float>(static_cast<compute_t>(1.0 / r.sumexp)), hit);
      }
      if (!want_logits || (is_auto && !outside)) {
        add_reading(probs_at, -std::log(r.xt), static_cast<float>(r.max), hit);
      }
    }
    if (is_auto && outside) acc[lay.pending + 2 * kReadingLen] += 1.0;
  });
  if (is_auto) fold_pending(lay, state);
}

}  // namespace

void update_cpu(const UpdateInputs& in, const at::Tensor& state) {
  double* st = state.data_ptr<double>();
  if (in.cfg.task != Task::kMulticlass) {
    elementwise_update_cpu(in, st);
    return;
  }
  STEPSCOPE_DISPATCH_PREDS(in.preds.scalar_type(), "classification_update_cpu", [&] {
    STEPSCOPE_DISPATCH_TARGET(in.target.scalar_type(), "classification_update_cpu",
                              [&] { multiclass_cpu<scalar_t, target_t>(in, st); });
  });
}

}  // namespace stepscope::metrics
