// CPU-only SIMD kernels of the metrics update (AVX2 + FMA + F16C, picked at run time), next to
// the portable loops of update_cpu.cpp. They compute what those loops compute, with the same
// Cephes exp polynomial (row_math.h), so CPU and CUDA results agree; only the float summation
// order of sum(exp) differs. No AVX-512 path: the machines this is tuned on cannot run one.
#pragma once

#include <cstdint>

namespace stepscope::metrics::simd {

// True when the CPU has AVX2, FMA and F16C and the SIMD path is not switched off. The switch
// starts from the environment (STEPSCOPE_CPU_SIMD=0 turns the SIMD path off), read once.
bool enabled();
// Test switch: forces the portable loops (false) or allows the SIMD path again (true). Returns
// the previous setting. Not meant to be flipped while an update is running.
bool set_enabled(bool on);

// One multiclass row reduced: finiteness, max and its first index, min, the target's rank (the
// classes above it: x_j > x_t, or x_j == x_t and j < t), sum of exp(x - max) when asked for, and
// x_t itself, all in float. When !finite the other fields are unset.
struct RowOut {
  bool finite;
  int32_t argmax;
  int32_t above;
  float max;
  float min;
  float sumexp;
  float xt;
};

// Contiguous rows of C >= 1 values; t in [0, C). Half and bfloat16 are passed as their bits and
// converted in registers.
RowOut row_f32(const float* x, int64_t C, int64_t t, bool want_sumexp);
RowOut row_f16(const uint16_t* x, int64_t C, int64_t t, bool want_sumexp);
RowOut row_bf16(const uint16_t* x, int64_t C, int64_t t, bool want_sumexp);

}  // namespace stepscope::metrics::simd

namespace stepscope::metrics::simd {

// Binary / multilabel: `rows` rows of L labels, both preds and target contiguous ([rows, L]).
enum class XKind { kF32, kF16, kBF16 };
enum class YKind { kI64, kI32, kU8 };
struct ElemArgs {
  const void* x;
  const void* y;
  int64_t rows;
  int64_t L;
  XKind xkind;
  YKind ykind;
  bool logits;       // else probabilities
  bool check_range;  // stop (return false) at the first value outside [0, 1] or NaN, ignored ones too
  float threshold;
  bool has_ignore;
  int64_t ignore;
};
// One call's sums; tp/pc/tc/vc are [L + 8] int32 per-label counters the caller zeroed and keeps
// small enough not to overflow (rows * L / 8 < 2^31 per call).
struct ElemSums {
  int32_t* tp;
  int32_t* pc;
  int32_t* tc;
  int32_t* vc;
  double loss = 0.0;
  int64_t ignored = 0, invalid = 0, nonfinite = 0;
  double ece_count[16] = {}, ece_conf[16] = {}, ece_acc[16] = {};
};
// Same rules as binary_element and elementwise_cpu's loop: ignore_index first, then targets not 0/1
// (invalid), then non-finite preds; a counted element adds its BCE, prediction and ECE bin.
// Returns false (sums partial, to be thrown away) when check_range met a value outside [0, 1].
bool elementwise(const ElemArgs& a, ElemSums& s);

}  // namespace stepscope::metrics::simd
