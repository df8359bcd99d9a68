// The regression update, merge and compute in ATen ops: the CUDA update (no host sync; a handful
// of launches, in place of a kernel of its own), the merge of states (forward's batch into the
// running state, the ranks' states in the distributed compute) and the formulas.
#include <ATen/ATen.h>

#include "check.h"
#include "regression/regression.h"

namespace stepscope::regression {
namespace {

at::Tensor col(const at::Tensor& s, Field f) { return s.select(1, f); }

at::Tensor as_rows(const at::Tensor& state) { return state.view({-1, kFields}); }

}  // namespace

void update_aten(const at::Tensor& preds, const at::Tensor& target, at::Tensor& state, int64_t num_outputs) {
  const Inputs in = prepare(preds, target, state, num_outputs);
  if (in.n == 0) return;
  const at::Tensor p = in.preds.to(at::kDouble).reshape({in.n, num_outputs});
  const at::Tensor t = in.target.to(at::kDouble).reshape({in.n, num_outputs});
  const at::Tensor ok = at::isfinite(p).logical_and_(at::isfinite(t));
  const at::Tensor cnt = ok.sum(0, false, at::kDouble);
  const at::Tensor safe = cnt.clamp_min(1);
  const at::Tensor zero = at::zeros({}, p.options());
  const at::Tensor pz = at::where(ok, p, zero), tz = at::where(ok, t, zero), ez = pz - tz;
  // Corrected two-pass: deviations from the first-pass mean, whose own mean corrects it.
  auto moments = [&](const at::Tensor& x) {
    const at::Tensor m0 = x.sum(0) / safe;
    const at::Tensor d = at::where(ok, x - m0, zero);
    const at::Tensor sd = d.sum(0);
    return std::make_pair(m0 + sd / safe, d - sd / safe);
  };
  auto [mp, a] = moments(pz);
  auto [mt, b] = moments(tz);
  auto [me, c] = moments(ez);
  a = at::where(ok, a, zero);
  b = at::where(ok, b, zero);
  c = at::where(ok, c, zero);
  const at::Tensor ae = ez.abs();
  const at::Tensor ape = at::where(ok, ae / t.abs().clamp_min(kMapeEps), zero);
  const at::Tensor batch = at::stack({cnt, mp, mt, (a * a).sum(0), (b * b).sum(0), (a * b).sum(0), me, (c * c).sum(0),
                                      ae.sum(0), ae.amax(0), ape.sum(0), static_cast<double>(in.n) - cnt}, 1);
  merge(state, batch.reshape({-1}));
}

void merge(const at::Tensor& state, const at::Tensor& other) {
  TORCH_CHECK_TYPE(state.scalar_type() == at::kDouble && other.scalar_type() == at::kDouble,
                   "stepscope: regression states are float64; got ", state.scalar_type(), " and ", other.scalar_type());
  STEPSCOPE_CHECK_DEVICE(other, state);
  STEPSCOPE_CHECK(state.dim() == 1 && state.numel() % kFields == 0 && state.numel() > 0 && state.is_contiguous(),
                  "state must be a contiguous float64 vector of num_outputs x ", kFields, "; got ",
                  shape_str(state.sizes()));
  const int64_t len = state.numel();
  STEPSCOPE_CHECK((other.dim() == 1 && other.numel() == len) || (other.dim() == 2 && other.size(1) == len),
                  "the state to merge must be [", len, "] or [R, ", len, "]; got ", shape_str(other.sizes()));
  const at::Tensor rows = other.dim() == 1 ? other.unsqueeze(0) : other;
  const at::Tensor a = as_rows(state);
  for (int64_t r = 0; r < rows.size(0); ++r) {
    const at::Tensor b = rows[r].reshape({-1, kFields});
    const at::Tensor na = col(a, kCount), nb = col(b, kCount), n = na + nb;
    const at::Tensor some = n > 0;
    const at::Tensor w = at::where(some, nb / n, at::zeros({}, n.options()));
    const at::Tensor g = at::where(some, na * nb / n, at::zeros({}, n.options()));
    const at::Tensor dp = col(b, kMeanP) - col(a, kMeanP), dt = col(b, kMeanT) - col(a, kMeanT),
                     de = col(b, kMeanE) - col(a, kMeanE);
    const at::Tensor merged = at::stack(
        {n, col(a, kMeanP) + dp * w, col(a, kMeanT) + dt * w, col(a, kM2P) + col(b, kM2P) + dp * dp * g,
         col(a, kM2T) + col(b, kM2T) + dt * dt * g, col(a, kCoPT) + col(b, kCoPT) + dp * dt * g,
         col(a, kMeanE) + de * w, col(a, kM2E) + col(b, kM2E) + de * de * g, col(a, kSumAbsE) + col(b, kSumAbsE),
         at::maximum(col(a, kMaxAbsE), col(b, kMaxAbsE)), col(a, kSumApe) + col(b, kSumApe),
         col(a, kNonfinite) + col(b, kNonfinite)},
        1);
    a.copy_(merged);
  }
}

std::vector<std::pair<std::string, at::Tensor>> compute(const at::Tensor& state) {
  TORCH_CHECK_TYPE(state.scalar_type() == at::kDouble, "stepscope: state must be float64; got ", state.scalar_type());
  STEPSCOPE_CHECK(state.dim() == 1 && state.numel() % kFields == 0 && state.numel() > 0,
                  "state must be a float64 vector of num_outputs x ", kFields, "; got ", shape_str(state.sizes()));
  const at::Tensor s = as_rows(state);
  const at::Tensor n = col(s, kCount), me = col(s, kMeanE), m2t = col(s, kM2T), m2e = col(s, kM2E);
  const at::Tensor nan = at::full({}, std::numeric_limits<double>::quiet_NaN(), n.options());
  const at::Tensor one = at::ones({}, n.options()), zero = at::zeros({}, n.options());
  const at::Tensor sse = m2e + n * me * me;
  // scikit-learn's force_finite rule (r2_score, explained_variance_score): a constant target
  // scores 1 when the error term is 0 too, else 0; fewer than two samples: NaN.
  auto score = [&](const at::Tensor& num) {
    const at::Tensor v = at::where(m2t != 0, 1 - num / m2t, at::where(num == 0, one, zero));
    return at::where(n >= 2, v, nan);
  };
  const at::Tensor m2p = col(s, kM2P);
  // scipy.stats.pearsonr: NaN for a constant input (or under two samples), clipped to [-1, 1].
  const at::Tensor r = (col(s, kCoPT) / (m2p * m2t).sqrt()).clamp(-1, 1);
  const at::Tensor pearson = at::where((m2p > 0).logical_and(m2t > 0).logical_and(n >= 2), r, nan);
  const at::Tensor mse = sse / n;
  const at::Tensor max_err = at::where(n > 0, col(s, kMaxAbsE), nan);
  std::vector<std::pair<std::string, at::Tensor>> per = {
      {"mse", mse}, {"rmse", mse.sqrt()}, {"mae", col(s, kSumAbsE) / n}, {"r2", score(sse)},
      {"explained_variance", score(m2e)}, {"pearson", pearson}, {"mape", col(s, kSumApe) / n}};
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (auto& [k, v] : per) out.emplace_back(k, v.mean());
  out.emplace_back("max_error", max_err.amax());
  const at::Tensor samples = n.to(at::kLong), nonfinite = col(s, kNonfinite).to(at::kLong);
  out.emplace_back("samples", samples.sum());
  out.emplace_back("nonfinite", nonfinite.sum());
  for (auto& [k, v] : per) out.emplace_back(k + "_per_output", v.contiguous());
  out.emplace_back("max_error_per_output", max_err.contiguous());
  out.emplace_back("samples_per_output", samples);
  out.emplace_back("nonfinite_per_output", nonfinite);
  return out;
}

}  // namespace stepscope::regression
