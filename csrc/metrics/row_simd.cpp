// AVX2/FMA/F16C multiclass row kernels (see row_simd.h). A row is read twice while it sits in
// L1/L2: pass one keeps max, min, a NaN/Inf poison sum and the target's rank in vector
// registers (the rank loop is split at t: x_j >= x_t counts before t, x_j > x_t from t on, so
// no per-lane index is needed); pass two finds the first index of the max and sums exp(x - max).
#include "metrics/row_simd.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "metrics/row_math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define STEPSCOPE_SIMD_X86 1
#define STEPSCOPE_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace stepscope::metrics::simd {
namespace {

bool cpu_has_simd() {
#if defined(STEPSCOPE_SIMD_X86)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool env_allows() {
  const char* v = std::getenv("STEPSCOPE_CPU_SIMD");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

std::atomic<bool> g_on{cpu_has_simd() && env_allows()};

}  // namespace

bool enabled() { return g_on.load(std::memory_order_relaxed); }

bool set_enabled(bool on) { return g_on.exchange(on && cpu_has_simd()); }

#if defined(STEPSCOPE_SIMD_X86)
namespace {

struct LoadF32 {
  using T = float;
  STEPSCOPE_AVX2 static __m256 load(const T* p) { return _mm256_loadu_ps(p); }
  static float one(T v) { return v; }
};
struct LoadF16 {
  using T = uint16_t;
  STEPSCOPE_AVX2 static __m256 load(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  STEPSCOPE_AVX2 static float one(T v) { return _cvtsh_ss(v); }
};
struct LoadBF16 {
  using T = uint16_t;
  STEPSCOPE_AVX2 static __m256 load(const T* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static float one(T v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};

// The first n < 8 values at p, zero-padded, and the mask of those n lanes.
template <class L>
STEPSCOPE_AVX2 inline __m256 load_part(const typename L::T* p, int64_t n, __m256& mask) {
  typename L::T tmp[8] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
  mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  return L::load(tmp);
}

struct Pass1 {
  __m256 mx, mn, poison;
  __m256i cnt;
};

template <bool kGe>
STEPSCOPE_AVX2 inline void step1(Pass1& a, __m256 v, __m256 vt) {
  a.mx = _mm256_max_ps(a.mx, v);
  a.mn = _mm256_min_ps(a.mn, v);
  a.poison = _mm256_fmadd_ps(v, _mm256_setzero_ps(), a.poison);  // Inf * 0 and NaN give NaN
  const __m256 c = _mm256_cmp_ps(v, vt, kGe ? _CMP_GE_OQ : _CMP_GT_OQ);
  a.cnt = _mm256_sub_epi32(a.cnt, _mm256_castps_si256(c));
}

// Pass one over [j0, j1): ranks with >= (before t) or > (from t on).
template <class L, bool kGe>
STEPSCOPE_AVX2 void pass1(const typename L::T* x, int64_t j0, int64_t j1, __m256 vt, Pass1& a, Pass1& b) {
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    step1<kGe>(a, L::load(x + j), vt);
    step1<kGe>(b, L::load(x + j + 8), vt);
  }
  if (j + 8 <= j1) {
    step1<kGe>(a, L::load(x + j), vt);
    j += 8;
  }
  if (j < j1) {
    __m256 m;
    const __m256 v = load_part<L>(x + j, j1 - j, m);
    // Padding lanes: max/min see -inf/+inf, the rank and the poison their zeros masked off.
    b.mx = _mm256_max_ps(b.mx, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, m));
    b.mn = _mm256_min_ps(b.mn, _mm256_blendv_ps(_mm256_set1_ps(INFINITY), v, m));
    b.poison = _mm256_fmadd_ps(v, _mm256_setzero_ps(), b.poison);
    const __m256 c = _mm256_and_ps(_mm256_cmp_ps(v, vt, kGe ? _CMP_GE_OQ : _CMP_GT_OQ), m);
    b.cnt = _mm256_sub_epi32(b.cnt, _mm256_castps_si256(c));
  }
}

STEPSCOPE_AVX2 inline float hmax(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
STEPSCOPE_AVX2 inline float hmin(__m256 v) {
  __m128 h = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_min_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_min_ss(h, _mm_movehdup_ps(h)));
}
STEPSCOPE_AVX2 inline float hsum(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}
STEPSCOPE_AVX2 inline int32_t hsum_i(__m256i v) {
  alignas(32) int32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), v);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// exp(v) for v <= 0: row_math.h's exp_nonpos, 8 lanes (arguments below kExpMinArg clamp to it).
STEPSCOPE_AVX2 inline __m256 exp8(__m256 v) {
  v = _mm256_max_ps(v, _mm256_set1_ps(kExpMinArg));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(v, _mm256_set1_ps(kExpLog2e), _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExpLn2Lo), _mm256_fnmadd_ps(n, _mm256_set1_ps(kExpLn2Hi), v));
  __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(kExpP0), r, _mm256_set1_ps(kExpP1));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP2));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP3));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP4));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP5));
  y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(y, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Pass two: the first index of m (needs m to occur in the row) and, if asked, sum(exp(x - m)).
template <class L>
STEPSCOPE_AVX2 int32_t pass2(const typename L::T* x, int64_t C, float m, bool want, float& sumexp) {
  const __m256 vm = _mm256_set1_ps(m);
  int64_t first = -1;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= C; j += 16) {
    const __m256 v0 = L::load(x + j), v1 = L::load(x + j + 8);
    if (first < 0) {
      const int mk = _mm256_movemask_ps(_mm256_cmp_ps(v0, vm, _CMP_EQ_OQ)) |
                     (_mm256_movemask_ps(_mm256_cmp_ps(v1, vm, _CMP_EQ_OQ)) << 8);
      if (mk) {
        first = j + __builtin_ctz(mk);
        if (!want) return static_cast<int32_t>(first);
      }
    }
    if (want) {
      s0 = _mm256_add_ps(s0, exp8(_mm256_sub_ps(v0, vm)));
      s1 = _mm256_add_ps(s1, exp8(_mm256_sub_ps(v1, vm)));
    }
  }
  if (j + 8 <= C) {
    const __m256 v = L::load(x + j);
    const int mk = _mm256_movemask_ps(_mm256_cmp_ps(v, vm, _CMP_EQ_OQ));
    if (first < 0 && mk) first = j + __builtin_ctz(mk);
    if (want) s0 = _mm256_add_ps(s0, exp8(_mm256_sub_ps(v, vm)));
    j += 8;
  }
  if (j < C && (want || first < 0)) {
    __m256 msk;
    const __m256 v = load_part<L>(x + j, C - j, msk);
    const int mk = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, vm, _CMP_EQ_OQ), msk));
    if (first < 0 && mk) first = j + __builtin_ctz(mk);
    if (want) s1 = _mm256_add_ps(s1, _mm256_and_ps(exp8(_mm256_sub_ps(v, vm)), msk));
  }
  if (want) sumexp = hsum(_mm256_add_ps(s0, s1));
  return static_cast<int32_t>(first);
}

template <class L>
STEPSCOPE_AVX2 RowOut row(const typename L::T* x, int64_t C, int64_t t, bool want_sumexp) {
  RowOut r{};
  r.xt = L::one(x[t]);
  const __m256 vt = _mm256_set1_ps(r.xt);
  Pass1 a{_mm256_set1_ps(-INFINITY), _mm256_set1_ps(INFINITY), _mm256_setzero_ps(), _mm256_setzero_si256()};
  Pass1 b = a;
  pass1<L, true>(x, 0, t, vt, a, b);
  pass1<L, false>(x, t, C, vt, a, b);
  r.finite = hsum(_mm256_add_ps(a.poison, b.poison)) == 0.0f;
  if (!r.finite) return r;
  r.max = hmax(_mm256_max_ps(a.mx, b.mx));
  r.min = hmin(_mm256_min_ps(a.mn, b.mn));
  r.above = hsum_i(_mm256_add_epi32(a.cnt, b.cnt));
  r.argmax = pass2<L>(x, C, r.max, want_sumexp, r.sumexp);
  return r;
}

}  // namespace

STEPSCOPE_AVX2 RowOut row_f32(const float* x, int64_t C, int64_t t, bool want_sumexp) {
  return row<LoadF32>(x, C, t, want_sumexp);
}
STEPSCOPE_AVX2 RowOut row_f16(const uint16_t* x, int64_t C, int64_t t, bool want_sumexp) {
  return row<LoadF16>(x, C, t, want_sumexp);
}
STEPSCOPE_AVX2 RowOut row_bf16(const uint16_t* x, int64_t C, int64_t t, bool want_sumexp) {
  return row<LoadBF16>(x, C, t, want_sumexp);
}

#else  // no x86 SIMD: enabled() is always false, so these are never called

RowOut row_f32(const float*, int64_t, int64_t, bool) { std::abort(); }
RowOut row_f16(const uint16_t*, int64_t, int64_t, bool) { std::abort(); }
RowOut row_bf16(const uint16_t*, int64_t, int64_t, bool) { std::abort(); }

#endif

}  // namespace stepscope::metrics::simd
