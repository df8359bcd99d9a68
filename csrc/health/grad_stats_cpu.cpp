// The CPU body of grad_stats_update: one read of each gradient (its squared L2 norm: float64
// gradients in float64; narrower ones in float32 blocks summed in float64 where the CPU has AVX2,
// see sum_sq_avx2, and in float64 otherwise), then the state's blocks updated in place with plain
// stores. Non-finite elements are
// counted exactly, by a second pass that runs only for a gradient whose sum of squares came out
// non-finite: a NaN or inf element always makes that sum non-finite, so a finite sum proves there
// is none and a healthy step reads every gradient once. (The converse fails only for float64
// gradients past 1e154, whose squares overflow: such a step counts as non-finite, with 0 elements.)
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "dispatch.h"
#include "health/grad_stats.h"

namespace stepscope::health {
namespace {

// Calls row(ptr, n, stride) over the tensor's elements as rows of its last dimension; one row for
// a tensor that is non-overlapping and dense (any dim order: the elements fill numel slots from
// data_ptr, as strides are never negative). Stride-0 (expanded) gradients count each element.
template <typename T, typename Row>
void for_each_row(const at::Tensor& g, Row&& row) {
  const T* base = g.const_data_ptr<T>();
  if (g.is_non_overlapping_and_dense()) return row(base, g.numel(), int64_t{1});
  const int64_t d = g.dim();
  const auto sizes = g.sizes();
  const auto strides = g.strides();
  std::vector<int64_t> idx(d, 0);
  const int64_t rows = g.numel() / sizes[d - 1];
  for (int64_t r = 0; r < rows; ++r) {
    int64_t off = 0;
    for (int64_t k = 0; k < d - 1; ++k) off += idx[k] * strides[k];
    row(base + off, sizes[d - 1], strides[d - 1]);
    for (int64_t k = d - 2; k >= 0 && ++idx[k] == sizes[k]; --k) idx[k] = 0;
  }
}

// Sixteen independent float64 lanes: the compiler packs them into vector registers without
// reassociating any sum (no -ffast-math needed); the AVX2 clone of the dense float64 loop (picked
// at load time by the CPU's features) does four lanes per instruction. Sixteen, not eight: an add
// waits about four cycles for the previous one into the same register, so four registers in
// flight keep the adder busy where two left it idle half the time.
inline double sum_lanes16(const double* a) {
  double h[8];
  for (int k = 0; k < 8; ++k) h[k] = a[k] + a[k + 8];
  return ((h[0] + h[1]) + (h[2] + h[3])) + ((h[4] + h[5]) + (h[6] + h[7]));
}

template <typename T>
inline double sum_sq_lanes(const T* p, int64_t n) {
  double a[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int k = 0; k < 16; ++k) {
      const double v = static_cast<double>(p[i + k]);
      a[k] += v * v;
    }
  }
  for (; i < n; ++i) {
    const double v = static_cast<double>(p[i]);
    a[i & 15] += v * v;
  }
  return sum_lanes16(a);
}

#if defined(__x86_64__)
__attribute__((target_clones("avx2", "default"))) double sum_sq_dense(const double* p, int64_t n) {
  return sum_sq_lanes(p, n);
}
#else
double sum_sq_dense(const double* p, int64_t n) { return sum_sq_lanes(p, n); }
#endif
#if defined(__x86_64__)
// float32, float16 (through F16C) and bfloat16 (a shift) widened eight at a time with AVX2: c10's
// portable 16-bit conversions cost several times the norm itself. The same sixteen lanes and order
// of additions as sum_sq_lanes.
template <typename T>
__attribute__((target("avx2,f16c"))) inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return std::is_same_v<T, c10::Half> ? _mm256_cvtph_ps(h)
                                        : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// float32 and narrower: each square (exact in float32's range up to rounding) goes into one of 32
// float32 lanes by FMA, and every kBlock elements the lanes are added into float64. A lane then
// sums kBlock / 32 = 16 squares, for a relative error below 16 * 2^-24 ~ 1e-6 on the tensor's sum
// (torch's own norms, clip_grad_norm_'s included, sum in float32 throughout). It is four times
// fewer instructions than widening every element to float64, which made the norm compute-bound
// (~14 us for the 134k gradients of a 256-wide MLP, hot in cache). A square past float32's range
// (|g| > 1.8e19) makes the sum inf; read_grad then sums that tensor again in float64.
constexpr int64_t kBlock = 512;

__attribute__((target("avx2"))) inline double sum_pd(__m256 a) {
  const __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
  alignas(32) double h[4];
  _mm256_store_pd(h, d);
  return (h[0] + h[1]) + (h[2] + h[3]);
}

template <typename T>
__attribute__((target("avx2,f16c,fma"))) double sum_sq_avx2(const T* p, int64_t n) {
  double total = 0;
  int64_t i = 0;
  const int64_t whole = n - n % 32;
  while (i < whole) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const int64_t end = std::min(whole, i + kBlock);
    for (; i < end; i += 32) {
      for (int k = 0; k < 4; ++k) {
        const __m256 v = load8(p + i + 8 * k);
        acc[k] = _mm256_fmadd_ps(v, v, acc[k]);
      }
    }
    total += (sum_pd(acc[0]) + sum_pd(acc[1])) + (sum_pd(acc[2]) + sum_pd(acc[3]));
  }
  for (; i < n; ++i) {
    const double v = static_cast<double>(static_cast<float>(p[i]));
    total += v * v;
  }
  return total;
}

bool has_avx2_f16c() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

template <typename T>
double sum_sq_dense(const T* p, int64_t n) {
#if defined(__x86_64__)
  if (has_avx2_f16c()) return sum_sq_avx2(p, n);
#endif
  return sum_sq_lanes(p, n);
}

template <typename T>
double sum_sq_lanes_strided(const T* p, int64_t n, int64_t stride) {
  if (stride == 1) return sum_sq_lanes(p, n);
  double a = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(p[i * stride]);
    a += v * v;
  }
  return a;
}

template <typename T>
double sum_sq(const T* p, int64_t n, int64_t stride) {
  return stride == 1 ? sum_sq_dense(p, n) : sum_sq_lanes_strided(p, n, stride);
}

template <typename T>
int64_t count_nonfinite(const T* p, int64_t n, int64_t stride) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += !std::isfinite(static_cast<double>(p[i * stride]));
  return c;
}

struct GradRead {
  double sq = 0;          // sum of squares, float64
  int64_t nonfinite = 0;  // non-finite elements
};

GradRead read_grad(const at::Tensor& g) {
  GradRead r;
  if (g.numel() == 0) return r;
  STEPSCOPE_DISPATCH_PREDS(g.scalar_type(), "grad_stats_update", [&] {
    for_each_row<scalar_t>(g, [&](const scalar_t* p, int64_t n, int64_t s) { r.sq += sum_sq(p, n, s); });
    if (!std::isfinite(r.sq)) {
      for_each_row<scalar_t>(g, [&](const scalar_t* p, int64_t n, int64_t s) { r.nonfinite += count_nonfinite(p, n, s); });
      if (r.nonfinite == 0) {  // every element finite: a float32 square overflowed; float64 holds it
        r.sq = 0;
        for_each_row<scalar_t>(g, [&](const scalar_t* p, int64_t n, int64_t s) { r.sq += sum_sq_lanes_strided(p, n, s); });
      }
    }
  });
  return r;
}

// The per-step scalars after the per-parameter pass.
struct StepTotals {
  double sq = 0;
  int64_t nonfinite = 0;
  int64_t first_bad = -1;
};

StepTotals update_params(const GradStatsInputs& in, double* s) {
  const HealthLayout& l = in.lay;
  StepTotals t;
  for (int64_t i = 0; i < l.params; ++i) {
    const at::Tensor& g = in.grads[i];
    s[l.nonfinite_last + i] = 0;
    if (!g.defined()) {
      s[l.no_grad_last + i] = 1;
      s[l.no_grad_steps + i] += 1;
      continue;
    }
    const GradRead r = read_grad(g);
    const double norm = std::sqrt(r.sq);
    s[l.no_grad_last + i] = 0;
    s[l.norm_last + i] = norm;
    if (r.nonfinite > 0 || !std::isfinite(norm)) {
      s[l.nonfinite_last + i] = static_cast<double>(r.nonfinite);
      s[l.nonfinite_total + i] += static_cast<double>(r.nonfinite);
      s[l.nonfinite_steps + i] += 1;
      if (t.first_bad < 0) t.first_bad = i;
    } else {
      s[l.norm_max + i] = std::max(s[l.norm_max + i], norm);
      s[l.norm_sum + i] += norm;
    }
    t.sq += r.sq;
    t.nonfinite += r.nonfinite;
  }
  return t;
}

}  // namespace

double sum_sq_cpu(const at::Tensor& t) { return read_grad(t).sq; }

void grad_stats_cpu(const GradStatsInputs& in, const at::Tensor& state) {
  double* s = state.data_ptr<double>();
  const HealthLayout& l = in.lay;
  const StepTotals t = update_params(in, s);
  const double gn = std::sqrt(t.sq);
  const double step = static_cast<double>(in.step);
  const bool bad = t.first_bad >= 0 || !std::isfinite(gn);
  s[kSteps] += 1;
  s[kLastStep] = step;
  s[kLastNorm] = gn;
  s[kLastNonfinite] = static_cast<double>(t.nonfinite);
  if (bad) {
    s[kNonfiniteSteps] += 1;
    if (s[kFirstNonfiniteStep] < 0) {
      s[kFirstNonfiniteStep] = step;
      s[kFirstNonfiniteParam] = static_cast<double>(t.first_bad);
    }
  } else {
    s[kCount] += 1;
    s[kSum] += gn;
    s[kSumSq] += gn * gn;
    s[kMin] = std::min(s[kMin], gn);
    s[kMax] = std::max(s[kMax], gn);
  }
  s[l.hist + hist_bin(gn)] += 1;
  s[l.ring_step + in.slot] = step;
  s[l.ring_norm + in.slot] = gn;
  s[l.ring_nonfinite + in.slot] = static_cast<double>(t.nonfinite);
}

}  // namespace stepscope::health
