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
