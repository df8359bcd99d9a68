// AVX2/FMA/F16C binary and multilabel kernel (see row_simd.h): sigmoid, log1p and the BCE in
// vector registers, 8 elements a step, with the 'auto' range check in the same pass.
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "metrics/layout.h"
#include "metrics/row_simd.h"
#include "metrics/simd_math.h"

namespace stepscope::metrics::simd {

#if defined(STEPSCOPE_SIMD_X86)
namespace {

struct LoadY32 {
  using T = int32_t;
  STEPSCOPE_AVX2 static __m256i load(const T* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
};
struct LoadY8 {
  using T = uint8_t;
  STEPSCOPE_AVX2 static __m256i load(const T* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
};
struct LoadY64 {
  using T = int64_t;
};

struct Targets {
  __m256i y, is01, isign;
};

// Eight targets as int32 lanes with the masks of 0/1 values and of ignore_index, tested at the
// target's own width (an int64 2^32 is neither 0 nor ignore_index 0).
template <class LY>
STEPSCOPE_AVX2 inline Targets load_targets(const typename LY::T* p, int64_t ignore, bool has_ignore) {
  Targets t;
  if constexpr (std::is_same_v<LY, LoadY64>) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4));
    const __m256i not1 = _mm256_set1_epi64x(~int64_t{1}), z = _mm256_setzero_si256();
    const __m256i lo = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    auto pack = [lo](__m256i u, __m256i v) STEPSCOPE_AVX2 {
      return _mm256_set_m128i(_mm256_castsi256_si128(_mm256_permutevar8x32_epi32(v, lo)),
                              _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(u, lo)));
    };
    t.y = pack(a, b);
    t.is01 = pack(_mm256_cmpeq_epi64(_mm256_and_si256(a, not1), z), _mm256_cmpeq_epi64(_mm256_and_si256(b, not1), z));
    const __m256i ig = _mm256_set1_epi64x(ignore);
    t.isign = has_ignore ? pack(_mm256_cmpeq_epi64(a, ig), _mm256_cmpeq_epi64(b, ig)) : z;
  } else {
    using T = typename LY::T;
    t.y = LY::load(p);
    t.is01 = _mm256_cmpeq_epi32(_mm256_and_si256(t.y, _mm256_set1_epi32(~1)), _mm256_setzero_si256());
    const bool fits = ignore >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
                      ignore <= static_cast<int64_t>(std::numeric_limits<T>::max());
    t.isign = has_ignore && fits ? _mm256_cmpeq_epi32(t.y, _mm256_set1_epi32(static_cast<int32_t>(ignore)))
                                 : _mm256_setzero_si256();
  }
  return t;
}

struct Acc {
  __m256i tp, pc, tc, vc, ignored, invalid, nonfinite;
  __m256d loss0, loss1;
};

// The calibration histogram (count, confidence, accuracy per bin) in four interleaved copies.
struct Hist {
  double h[4][kEceSlots][3] = {};
};

template <bool kLogits>
STEPSCOPE_AVX2 inline void loss_and_prob(__m256 x, __m256 yf, __m256& loss, __m256& prob) {
  if constexpr (kLogits) {
    const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), ax));
    const __m256 u = _mm256_add_ps(_mm256_set1_ps(1.0f), e);
    const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), u);
    prob = _mm256_blendv_ps(_mm256_mul_ps(e, inv), inv, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
    // log1p(e) = log(u) + (e - (u - 1)) / u: the rounding of u = 1 + e put back.
    const __m256 c = _mm256_sub_ps(e, _mm256_sub_ps(u, _mm256_set1_ps(1.0f)));
    const __m256 l1p = _mm256_fmadd_ps(c, inv, log8(u));
    loss = _mm256_add_ps(_mm256_fnmadd_ps(x, yf, _mm256_max_ps(x, _mm256_setzero_ps())), l1p);
  } else {
    prob = x;
    const __m256 lo = _mm256_set1_ps(-100.0f);  // max(lo, v) keeps a NaN v, as binary_element does
    const __m256 lp = _mm256_max_ps(lo, log8(x));
    const __m256 lq = _mm256_max_ps(lo, log8(_mm256_sub_ps(_mm256_set1_ps(1.0f), x)));
    // y is 0 or 1: picking the one log is binary_element's y lp + (1 - y) lq without its roundings.
    // (The other log times 0 keeps its NaN, for probabilities outside [0, 1] given as such.)
    const __m256 pos = _mm256_cmp_ps(yf, _mm256_setzero_ps(), _CMP_NEQ_OQ);
    const __m256 other = _mm256_mul_ps(_mm256_blendv_ps(lp, lq, pos), _mm256_setzero_ps());
    loss = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_add_ps(_mm256_blendv_ps(lq, lp, pos), other));
  }
}

// One step of 8 elements; `present` masks lanes past the end. Returns false on an out-of-range
// value under check_range. kOneLabel: all lanes are one label (binary), else labels l..l+7.
template <bool kLogits, bool kOneLabel>
STEPSCOPE_AVX2 inline bool step(__m256 x, const Targets& t, __m256i present, const ElemArgs& a, Acc& acc,
                                ElemSums& s, Hist& hist, int64_t l) {
  if (a.check_range) {
    const __m256 in = _mm256_and_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ),
                                    _mm256_cmp_ps(x, _mm256_set1_ps(1.0f), _CMP_LE_OQ));
    if (!_mm256_testc_si256(_mm256_castps_si256(in), present)) return false;
  }
  const __m256i notign = _mm256_andnot_si256(t.isign, present);
  const __m256i ok = _mm256_and_si256(notign, t.is01);
  const __m256i finite =
      _mm256_castps_si256(_mm256_cmp_ps(_mm256_mul_ps(x, _mm256_setzero_ps()), _mm256_setzero_ps(), _CMP_EQ_OQ));
  const __m256i use = _mm256_and_si256(ok, finite);
  acc.ignored = _mm256_sub_epi32(acc.ignored, _mm256_and_si256(t.isign, present));
  acc.invalid = _mm256_sub_epi32(acc.invalid, _mm256_andnot_si256(t.is01, notign));
  acc.nonfinite = _mm256_sub_epi32(acc.nonfinite, _mm256_andnot_si256(finite, ok));
  const __m256i y1 = _mm256_and_si256(use, _mm256_cmpeq_epi32(t.y, _mm256_set1_epi32(1)));
  const __m256 yf = _mm256_and_ps(_mm256_castsi256_ps(y1), _mm256_set1_ps(1.0f));
  __m256 loss, prob;
  loss_and_prob<kLogits>(x, yf, loss, prob);
  const __m256i pred = _mm256_and_si256(
      use, _mm256_castps_si256(_mm256_cmp_ps(prob, _mm256_set1_ps(a.threshold), _CMP_GT_OQ)));
  loss = _mm256_and_ps(loss, _mm256_castsi256_ps(use));
  acc.loss0 = _mm256_add_pd(acc.loss0, _mm256_cvtps_pd(_mm256_castps256_ps128(loss)));
  acc.loss1 = _mm256_add_pd(acc.loss1, _mm256_cvtps_pd(_mm256_extractf128_ps(loss, 1)));
  const __m256i tp = _mm256_and_si256(pred, y1);
  if constexpr (kOneLabel) {
    acc.tp = _mm256_sub_epi32(acc.tp, tp);
    acc.pc = _mm256_sub_epi32(acc.pc, pred);
    acc.tc = _mm256_sub_epi32(acc.tc, y1);
    acc.vc = _mm256_sub_epi32(acc.vc, use);
  } else {
    auto add = [](int32_t* p, __m256i m) STEPSCOPE_AVX2 {
      __m256i* q = reinterpret_cast<__m256i*>(p);
      _mm256_storeu_si256(q, _mm256_sub_epi32(_mm256_loadu_si256(q), m));
    };
    add(s.tp + l, tp);
    add(s.pc + l, pred);
    add(s.tc + l, y1);
    add(s.vc + l, use);
  }
  int mk = _mm256_movemask_ps(_mm256_castsi256_ps(use));
  if (mk == 0) return true;
  const __m256i bin = _mm256_min_epi32(
      _mm256_max_epi32(_mm256_cvttps_epi32(_mm256_mul_ps(prob, _mm256_set1_ps(static_cast<float>(kNumEceBins)))),
                       _mm256_setzero_si256()),
      _mm256_set1_epi32(static_cast<int>(kNumEceBins)));
  alignas(32) int32_t bins[8], ys[8];
  alignas(32) float probs[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(bins), bin);
  _mm256_store_si256(reinterpret_cast<__m256i*>(ys), y1);
  _mm256_store_ps(probs, prob);
  for (; mk; mk &= mk - 1) {
    const int i = __builtin_ctz(mk);
    double* h = hist.h[i & 3][bins[i]];  // four copies: neighbours in one bin do not wait on each other
    h[0] += 1.0;
    h[1] += probs[i];
    h[2] -= ys[i];  // -1 for a positive target
  }
  return true;
}

template <class LX, class LY>
STEPSCOPE_AVX2 inline void load_part(const typename LX::T* xp, const typename LY::T* yp, int64_t n,
                                     const ElemArgs& a, __m256& x, Targets& t, __m256i& present) {
  typename LX::T xs[8] = {};
  typename LY::T ys[8] = {};
  for (int64_t i = 0; i < n; ++i) {
    xs[i] = xp[i];
    ys[i] = yp[i];
  }
  x = LX::load(xs);
  t = load_targets<LY>(ys, a.ignore, a.has_ignore);
  present = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <class LX, class LY, bool kLogits, bool kOneLabel>
STEPSCOPE_AVX2 bool run_rows(const ElemArgs& a, Acc& acc, ElemSums& s, Hist& hist) {
  const auto* X = static_cast<const typename LX::T*>(a.x);
  const auto* Y = static_cast<const typename LY::T*>(a.y);
  const __m256i all = _mm256_set1_epi32(-1);
  const int64_t rows = kOneLabel ? 1 : a.rows, len = kOneLabel ? a.rows * a.L : a.L;
  for (int64_t r = 0; r < rows; ++r) {
    const auto* xr = X + r * len;
    const auto* yr = Y + r * len;
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
      const Targets t = load_targets<LY>(yr + j, a.ignore, a.has_ignore);
      if (!step<kLogits, kOneLabel>(LX::load(xr + j), t, all, a, acc, s, hist, j)) return false;
    }
    if (j < len) {
      __m256 x;
      Targets t;
      __m256i present;
      load_part<LX, LY>(xr + j, yr + j, len - j, a, x, t, present);
      if (!step<kLogits, kOneLabel>(x, t, present, a, acc, s, hist, j)) return false;
    }
  }
  return true;
}

STEPSCOPE_AVX2 inline int64_t hsum_i(__m256i v) {
  alignas(32) int32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), v);
  int64_t s = 0;
  for (int32_t x : l) s += x;  // subtracting a true mask (-1) counted up
  return s;
}

template <class LX, class LY, bool kLogits>
STEPSCOPE_AVX2 bool run(const ElemArgs& a, ElemSums& s) {
  const __m256i z = _mm256_setzero_si256();
  Acc acc{z, z, z, z, z, z, z, _mm256_setzero_pd(), _mm256_setzero_pd()};
  Hist hist;
  const bool ok = a.L == 1 ? run_rows<LX, LY, kLogits, true>(a, acc, s, hist)
                           : run_rows<LX, LY, kLogits, false>(a, acc, s, hist);
  if (!ok) return false;
  for (int64_t b = 0; b < kEceSlots; ++b) {
    for (const auto& c : hist.h) {
      s.ece_count[b] += c[b][0];
      s.ece_conf[b] += c[b][1];
      s.ece_acc[b] += c[b][2];
    }
  }
  if (a.L == 1) {
    s.tp[0] += static_cast<int32_t>(hsum_i(acc.tp));
    s.pc[0] += static_cast<int32_t>(hsum_i(acc.pc));
    s.tc[0] += static_cast<int32_t>(hsum_i(acc.tc));
    s.vc[0] += static_cast<int32_t>(hsum_i(acc.vc));
  }
  s.ignored += hsum_i(acc.ignored);
  s.invalid += hsum_i(acc.invalid);
  s.nonfinite += hsum_i(acc.nonfinite);
  alignas(32) double l0[4], l1[4];
  _mm256_store_pd(l0, acc.loss0);
  _mm256_store_pd(l1, acc.loss1);
  s.loss += ((l0[0] + l0[1]) + (l0[2] + l0[3])) + ((l1[0] + l1[1]) + (l1[2] + l1[3]));
  return true;
}

template <class LX>
bool dispatch_y(const ElemArgs& a, ElemSums& s) {
  switch (a.ykind) {
    case YKind::kI64:
      return a.logits ? run<LX, LoadY64, true>(a, s) : run<LX, LoadY64, false>(a, s);
    case YKind::kI32:
      return a.logits ? run<LX, LoadY32, true>(a, s) : run<LX, LoadY32, false>(a, s);
    default:
      return a.logits ? run<LX, LoadY8, true>(a, s) : run<LX, LoadY8, false>(a, s);
  }
}

}  // namespace

bool elementwise(const ElemArgs& a, ElemSums& s) {
  switch (a.xkind) {
    case XKind::kF32:
      return dispatch_y<LoadF32>(a, s);
    case XKind::kF16:
      return dispatch_y<LoadF16>(a, s);
    default:
      return dispatch_y<LoadBF16>(a, s);
  }
}

#else

bool elementwise(const ElemArgs&, ElemSums&) { std::abort(); }

#endif

}  // namespace stepscope::metrics::simd
