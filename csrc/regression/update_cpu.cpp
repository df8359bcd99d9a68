// The regression update's CPU kernel. One pass over the batch in blocks of kBlock rows: each
// block's finite pairs are read into registers-sized scratch as float64, their means found with
// a shift by the block's first value (a constant column gives a mean equal to it, and moments of
// exactly 0) and their centred moments summed in a second pass over the scratch; blocks merge by
// Chan's rule into their chunk, chunks (a fixed number of rows each) into the state in order, so
// the result does not depend on how many threads ran.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dispatch.h"
#include "regression/merge_rule.h"
#include "regression/regression.h"

namespace stepscope::regression {
namespace {

constexpr int64_t kBlock = 256;
constexpr int64_t kChunkRows = 64 * kBlock;

// The block's statistics of m finite pairs (m > 0) into out (zeroed by the caller but for kNonfinite).
void block_stats(const double* p, const double* t, int64_t m, double* out) {
  const double sp = p[0], st = t[0], se = p[0] - t[0];
  double dp = 0, dt = 0, de = 0;
  for (int64_t i = 0; i < m; ++i) {
    dp += p[i] - sp;
    dt += t[i] - st;
    de += (p[i] - t[i]) - se;
  }
  const double mp = sp + dp / m, mt = st + dt / m, me = se + de / m;
  double m2p = 0, m2t = 0, cpt = 0, m2e = 0, sae = 0, mae = 0, sape = 0;
  for (int64_t i = 0; i < m; ++i) {
    const double a = p[i] - mp, b = t[i] - mt, e = p[i] - t[i], c = e - me, ae = std::fabs(e);
    m2p += a * a;
    m2t += b * b;
    cpt += a * b;
    m2e += c * c;
    sae += ae;
    mae = std::max(mae, ae);
    sape += ae / std::max(std::fabs(t[i]), kMapeEps);
  }
  out[kCount] = static_cast<double>(m);
  out[kMeanP] = mp;
  out[kMeanT] = mt;
  out[kM2P] = m2p;
  out[kM2T] = m2t;
  out[kCoPT] = cpt;
  out[kMeanE] = me;
  out[kM2E] = m2e;
  out[kSumAbsE] = sae;
  out[kMaxAbsE] = mae;
  out[kSumApe] = sape;
}

template <typename P, typename T>
void run(const at::Tensor& preds, const at::Tensor& target, double* state, int64_t n, int64_t k) {
  const P* pp = preds.const_data_ptr<P>();
  const T* tp = target.const_data_ptr<T>();
  const int64_t ps0 = preds.stride(0), ps1 = preds.dim() > 1 ? preds.stride(1) : 0;
  const int64_t ts0 = target.stride(0), ts1 = target.dim() > 1 ? target.stride(1) : 0;
  const int64_t chunks = (n + kChunkRows - 1) / kChunkRows;
  std::vector<double> acc(static_cast<size_t>(chunks * k * kFields), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    double p[kBlock], t[kBlock], blk[kFields];
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t r_end = std::min(n, (c + 1) * kChunkRows);
      for (int64_t r0 = c * kChunkRows; r0 < r_end; r0 += kBlock) {
        const int64_t r1 = std::min(r_end, r0 + kBlock);
        for (int64_t j = 0; j < k; ++j) {
          int64_t m = 0;
          for (int64_t r = r0; r < r1; ++r) {
            const double a = static_cast<double>(pp[r * ps0 + j * ps1]);
            const double b = static_cast<double>(tp[r * ts0 + j * ts1]);
            p[m] = a;
            t[m] = b;
            m += std::isfinite(a) && std::isfinite(b);
          }
          double* dst = acc.data() + (c * k + j) * kFields;
          dst[kNonfinite] += static_cast<double>(r1 - r0 - m);
          if (m == 0) continue;
          std::fill(blk, blk + kFields, 0.0);
          block_stats(p, t, m, blk);
          merge_fields(dst, blk);
        }
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t j = 0; j < k; ++j) merge_fields(state + j * kFields, acc.data() + (c * k + j) * kFields);
  }
}

}  // namespace

void update_cpu(const at::Tensor& preds, const at::Tensor& target, at::Tensor& state, int64_t num_outputs) {
  const Inputs in = prepare(preds, target, state, num_outputs);
  if (in.n == 0) return;
  const at::Tensor tgt = at::isFloatingType(in.target.scalar_type()) ? in.target : in.target.to(at::kDouble);
  double* s = state.data_ptr<double>();
  STEPSCOPE_DISPATCH_PREDS(in.preds.scalar_type(), "regression_update", [&] {
    using P = scalar_t;
    STEPSCOPE_DISPATCH_PREDS(tgt.scalar_type(), "regression_update", [&] {
      run<P, scalar_t>(in.preds, tgt, s, in.n, num_outputs);
    });
  });
}

}  // namespace stepscope::regression
