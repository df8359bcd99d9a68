// AVX2/FMA/F16C multiclass row kernels (see row_simd.h). A row is read twice while it sits in
// L1/L2: pass one keeps max, min, a NaN/Inf poison sum and the target's rank in vector
// registers (x_j >= x_t counts before t's vector, x_j > x_t after it, a lane mask only in t's
// own vector and the tail); pass two finds the first index of the max and sums exp(x - max),
// and, being bound by the exp's arithmetic, prefetches the next row meanwhile, so that pass one
// of the next row no longer waits on DRAM while no arithmetic runs.
// A tail is one vector ending at the row's end, so no row is read past its end or staged
// through memory (only rows shorter than 8 are).
#include "metrics/row_simd.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "metrics/row_math.h"
#include "metrics/simd_math.h"


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

struct Pass1 {
  __m256 mx, mn, poison;
  __m256i cnt;
};

STEPSCOPE_AVX2 inline __m256i iota8() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

template <int kCmp>
STEPSCOPE_AVX2 inline void step1(Pass1& a, __m256 v, __m256 vt) {
  a.mx = _mm256_max_ps(a.mx, v);
  a.mn = _mm256_min_ps(a.mn, v);
  a.poison = _mm256_fmadd_ps(v, _mm256_setzero_ps(), a.poison);  // Inf * 0 and NaN give NaN
  a.cnt = _mm256_sub_epi32(a.cnt, _mm256_castps_si256(_mm256_cmp_ps(v, vt, kCmp)));
}

// A vector of row values from index jb on, of which the lanes in `present` are counted in the
// rank: x_j >= x_t for j < t, x_j > x_t from t on. Every lane holds a value of the row (a tail
// overlaps the vector before it, a short row is padded with x_0), so max, min and poison take all.
STEPSCOPE_AVX2 inline void step1_mixed(Pass1& a, __m256 v, __m256 vt, int64_t jb, int64_t t, __m256 present) {
  a.mx = _mm256_max_ps(a.mx, v);
  a.mn = _mm256_min_ps(a.mn, v);
  a.poison = _mm256_fmadd_ps(v, _mm256_setzero_ps(), a.poison);
  const __m256 before = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(t - jb)), iota8()));
  const __m256 c = _mm256_blendv_ps(_mm256_cmp_ps(v, vt, _CMP_GT_OQ), _mm256_cmp_ps(v, vt, _CMP_GE_OQ), before);
  a.cnt = _mm256_sub_epi32(a.cnt, _mm256_castps_si256(_mm256_and_ps(c, present)));
}

// Full vectors in [j0, j1) (j1 - j0 a multiple of 8), all ranked with one comparison.
template <class L, int kCmp>
STEPSCOPE_AVX2 inline void pass1_run(const typename L::T* x, int64_t j0, int64_t j1, __m256 vt, Pass1& a, Pass1& b) {
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    step1<kCmp>(a, L::load(x + j), vt);
    step1<kCmp>(b, L::load(x + j + 8), vt);
  }
  if (j < j1) step1<kCmp>(a, L::load(x + j), vt);
}

// The last C % 8 values (C >= 8: one vector ending at C, its first lanes already counted) or a
// short row padded with x_0; jb is the index of lane 0, present the lanes not yet counted.
template <class L>
STEPSCOPE_AVX2 inline __m256 tail_vector(const typename L::T* x, int64_t C, int64_t& jb, __m256& present) {
  const int64_t rem = C % 8;
  if (C >= 8) {
    jb = C - 8;
    present = _mm256_castsi256_ps(_mm256_cmpgt_epi32(iota8(), _mm256_set1_epi32(static_cast<int>(7 - rem))));
    return L::load(x + jb);
  }
  jb = 0;
  present = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(C)), iota8()));
  if constexpr (std::is_same_v<L, LoadF32>) {
    const __m256 v = _mm256_maskload_ps(x, _mm256_castps_si256(present));
    return _mm256_blendv_ps(_mm256_set1_ps(x[0]), v, present);
  } else {
    typename L::T tmp[8];
    for (int64_t i = 0; i < 8; ++i) tmp[i] = x[i < C ? i : 0];
    return L::load(tmp);
  }
}

template <class L>
STEPSCOPE_AVX2 void pass1(const typename L::T* x, int64_t C, int64_t t, __m256 vt, Pass1& a, Pass1& b) {
  const int64_t C8 = C & ~int64_t{7}, tv = t & ~int64_t{7};
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  if (tv < C8) {
    pass1_run<L, _CMP_GE_OQ>(x, 0, tv, vt, a, b);
    step1_mixed(b, L::load(x + tv), vt, tv, t, all);
    pass1_run<L, _CMP_GT_OQ>(x, tv + 8, C8, vt, a, b);
  } else {
    pass1_run<L, _CMP_GE_OQ>(x, 0, C8, vt, a, b);
  }
  if (C8 < C) {
    int64_t jb;
    __m256 present;
    const __m256 v = tail_vector<L>(x, C, jb, present);
    step1_mixed(b, v, vt, jb, t, present);
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

// Pass two: the first index of m (needs m to occur in the row) and, if asked, sum(exp(x - m)).
// The exp work is compute-bound while the next row still sits in DRAM, so this pass asks for the
// next C values (the next row when rows are contiguous; a harmless hint otherwise), one 64-byte
// line at a time, into L1 when a row fits there and L2 when it does not; rows under 2 KiB are left
// to the hardware prefetcher.
template <class L>
STEPSCOPE_AVX2 int32_t pass2(const typename L::T* x, int64_t C, float m, bool want, float& sumexp) {
  const __m256 vm = _mm256_set1_ps(m);
  int64_t first = -1;
  __m256 s0 = _mm256_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(x + C);
  constexpr int64_t kSize = sizeof(typename L::T);
  const bool ask = C * kSize >= 2048, to_l1 = C * kSize <= 16384;
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
      if (ask && (j * kSize) % 64 == 0) {
        if (to_l1) {
          _mm_prefetch(ahead + j * kSize, _MM_HINT_T0);
        } else {
          _mm_prefetch(ahead + j * kSize, _MM_HINT_T1);
        }
      }
      s0 = _mm256_add_ps(s0, _mm256_add_ps(exp8(_mm256_sub_ps(v0, vm)), exp8(_mm256_sub_ps(v1, vm))));
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
    int64_t jb;
    __m256 msk;
    const __m256 v = tail_vector<L>(x, C, jb, msk);
    const int mk = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, vm, _CMP_EQ_OQ), msk));
    if (first < 0 && mk) first = jb + __builtin_ctz(mk);
    if (want) s0 = _mm256_add_ps(s0, _mm256_and_ps(exp8(_mm256_sub_ps(v, vm)), msk));
  }
  if (want) sumexp = hsum(s0);
  return static_cast<int32_t>(first);
}

// A row shorter than 8: one vector (padded with x_0), both passes on it in registers.
template <class L>
STEPSCOPE_AVX2 RowOut row_short(const typename L::T* x, int64_t C, int64_t t, bool want_sumexp) {
  RowOut r{};
  r.xt = L::one(x[t]);
  int64_t jb;
  __m256 present;
  const __m256 v = tail_vector<L>(x, C, jb, present);
  r.finite = hsum(_mm256_mul_ps(v, _mm256_setzero_ps())) == 0.0f;
  if (!r.finite) return r;
  const __m256 vt = _mm256_set1_ps(r.xt);
  const __m256 before = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(t)), iota8()));
  const __m256 c = _mm256_blendv_ps(_mm256_cmp_ps(v, vt, _CMP_GT_OQ), _mm256_cmp_ps(v, vt, _CMP_GE_OQ), before);
  r.above = __builtin_popcount(_mm256_movemask_ps(_mm256_and_ps(c, present)));
  r.max = hmax(v);
  r.min = hmin(v);
  const __m256 vm = _mm256_set1_ps(r.max);
  r.argmax = __builtin_ctz(_mm256_movemask_ps(_mm256_cmp_ps(v, vm, _CMP_EQ_OQ)));  // x_0 pads: first wins
  if (want_sumexp) r.sumexp = hsum(_mm256_and_ps(exp8(_mm256_sub_ps(v, vm)), present));
  return r;
}

template <class L>
STEPSCOPE_AVX2 RowOut row(const typename L::T* x, int64_t C, int64_t t, bool want_sumexp) {
  if (C < 8) return row_short<L>(x, C, t, want_sumexp);
  RowOut r{};
  r.xt = L::one(x[t]);
  const __m256 vt = _mm256_set1_ps(r.xt);
  Pass1 a{_mm256_set1_ps(-INFINITY), _mm256_set1_ps(INFINITY), _mm256_setzero_ps(), _mm256_setzero_si256()};
  Pass1 b = a;
  pass1<L>(x, C, t, vt, a, b);
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
