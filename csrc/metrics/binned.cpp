// Binned AUROC and average precision: the histogram update and the formulas (binned.h).
#include "metrics/binned.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>

namespace stepscope::metrics {
namespace {

// Elements per chunk of the update: its temporaries (float scores, int64 slots and indices,
// float64 weights) stay near 30 MB however large the batch.
constexpr int64_t kChunkElems = int64_t{1} << 20;

// Tests run the ATen pass (CUDA's) on the CPU too: _C._set_binned_aten_on_cpu.
std::atomic<bool> g_aten_on_cpu{false};

// [n, C, D] -> [n * D, C]: one row per sample, the classes (labels) along it.
at::Tensor rows_of(const at::Tensor& x) { return x.movedim(1, 2).reshape({-1, x.size(1)}); }

struct Chunk {
  at::Tensor x;     // float32 [R, C]
  at::Tensor pos;   // bool [R, C]: the target is this class (label)
  at::Tensor keep;  // bool [R, C]: counted
};

Chunk chunk(const UpdateInputs& in, int64_t n0, int64_t n) {
  const Config& cfg = in.cfg;
  Chunk c;
  c.x = rows_of(in.preds.narrow(0, n0, n).to(at::kFloat));
  if (cfg.task == Task::kMulticlass) {
    const at::Tensor t = in.target.narrow(0, n0, n).reshape({-1}).to(at::kLong);
    at::Tensor ok = (t >= 0).logical_and_(t < in.c).logical_and_(at::isfinite(c.x).all(1));
    if (cfg.ignore_index) ok.logical_and_(t != *cfg.ignore_index);
    c.keep = ok.unsqueeze(1).expand_as(c.x);
    c.pos = t.unsqueeze(1) == at::arange(in.c, t.options()).unsqueeze(0);
  } else {
    const at::Tensor t = rows_of(in.target.narrow(0, n0, n)).to(at::kLong);
    c.keep = ((t == 0).logical_or_(t == 1)).logical_and_(at::isfinite(c.x));
    if (cfg.ignore_index) c.keep.logical_and_(t != *cfg.ignore_index);
    c.pos = t == 1;
  }
  return c;
}

// "auto": are the predictions probabilities? torchmetrics' rule, as the rest of the update applies
// it: binary/multilabel over the whole batch (NaN counts as outside [0, 1]), multiclass over the
// rows that count. A 0-dim bool on the device (no host read).
at::Tensor reads_probs(const UpdateInputs& in, int64_t rows) {
  at::Tensor all = at::ones({}, in.preds.options().dtype(at::kBool));
  for (int64_t n0 = 0; n0 < in.n; n0 += rows) {
    const Chunk c = chunk(in, n0, std::min(rows, in.n - n0));
    at::Tensor inside = (c.x >= 0).logical_and_(c.x <= 1);
    if (in.cfg.task == Task::kMulticlass) inside.logical_or_(c.keep.logical_not());
    all.logical_and_(inside.all());
  }
  return all;
}

at::Tensor scores(const UpdateInputs& in, const at::Tensor& x, const at::Tensor& probs) {
  const bool multiclass = in.cfg.task == Task::kMulticlass;
  if (in.cfg.input == InputKind::kProbs) return x;
  const at::Tensor s = multiclass ? at::softmax(x, 1) : at::sigmoid(x);
  return probs.defined() ? at::where(probs, x, s) : s;
}

// One class's (label's) curves from its histogram [.., 2, T + 1] (torchmetrics' binned formulas:
// _binary_roc_compute, _binary_auroc_compute, _binary_average_precision_compute).
std::pair<at::Tensor, at::Tensor> curves(const at::Tensor& hist, int64_t T) {
  const at::Tensor neg = hist.select(-2, 0), pos = hist.select(-2, 1);
  auto above = [T](const at::Tensor& h) {  // [.., T]: at threshold i, the count of scores >= t_i
    return h.flip(-1).cumsum(-1).flip(-1).narrow(-1, 1, T);
  };
  const at::Tensor tp = above(pos), fp = above(neg);
  const at::Tensor p = pos.sum(-1, true), n = neg.sum(-1, true);
  const at::Tensor tpr = safe_div(tp, p.expand_as(tp)), fpr = safe_div(fp, n.expand_as(fp));
  const at::Tensor auroc = at::trapezoid(tpr.flip(-1), fpr.flip(-1), -1);
  // Precision and recall at each threshold, then the point (recall 0, precision 1) appended.
  const at::Tensor precision = safe_div(tp, tp + fp), recall = tpr;
  const at::Tensor r = at::cat({recall, at::zeros_like(recall.narrow(-1, 0, 1))}, -1);
  const at::Tensor ap = -((r.narrow(-1, 1, T) - r.narrow(-1, 0, T)) * precision).sum(-1);
  return {auroc, ap};
}


// The CPU pass, one loop over the rows: the scores are ATen's (at::softmax / at::sigmoid, so that
// they equal torchmetrics' to the bit and fall in the same slots), the slot of each score is found
// from the exact threshold values by a guess and a step or two (torch.searchsorted took 45 ns an
// element), and the counts go straight into the histograms.
void binned_update_cpu(const UpdateInputs& in, const at::Tensor& state) {
  const Config& cfg = in.cfg;
  const int64_t T = cfg.thresholds, B = T + 1, C = in.c;
  const bool multiclass = cfg.task == Task::kMulticlass;
  const at::Tensor x = rows_of(in.preds.to(at::kFloat)).contiguous();  // [R, C]
  const at::Tensor t = (multiclass ? in.target.reshape({-1}) : rows_of(in.target)).to(at::kLong).contiguous();
  const float* xp = x.const_data_ptr<float>();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  const int64_t R = x.size(0);
  const bool ign = cfg.ignore_index.has_value();
  const int64_t ig = ign ? *cfg.ignore_index : 0;
  auto row_counts = [&](int64_t r) {  // multiclass: the row's target counts and its values are finite
    const int64_t y = tp[r];
    if (y < 0 || y >= C || (ign && y == ig)) return false;
    for (int64_t k = 0; k < C; ++k) {
      if (!std::isfinite(xp[r * C + k])) return false;
    }
    return true;
  };
  bool probs = cfg.input == InputKind::kProbs;
  if (cfg.input == InputKind::kAuto) {  // the rule the rest of the update applies (reads_probs)
    probs = true;
    for (int64_t r = 0; r < R && probs; ++r) {
      if (multiclass && !row_counts(r)) continue;
      for (int64_t k = 0; k < C; ++k) probs = probs && xp[r * C + k] >= 0.f && xp[r * C + k] <= 1.f;
    }
  }
  const at::Tensor sc = probs ? x : (multiclass ? at::softmax(x, 1) : at::sigmoid(x)).contiguous();
  const float* sp = sc.const_data_ptr<float>();
  const at::Tensor edges_t = at::linspace(0, 1, T, x.options());
  const float* e = edges_t.const_data_ptr<float>();
  auto slot = [&](float v) {  // the count of thresholds <= v
    int64_t c = v <= 0.f ? 0 : (v >= 1.f ? T - 1 : static_cast<int64_t>(v * static_cast<float>(T - 1)));
    while (c < T && e[c] <= v) ++c;
    while (c > 0 && e[c - 1] > v) --c;
    return c;
  };
  double* h = state.data_ptr<double>() + in.lay.binned;
  for (int64_t r = 0; r < R; ++r) {
    if (multiclass && !row_counts(r)) continue;
    for (int64_t k = 0; k < C; ++k) {
      const int64_t i = r * C + k;
      int64_t pos;
      if (multiclass) {
        pos = tp[r] == k;
      } else {
        const int64_t y = tp[i];
        if ((y != 0 && y != 1) || (ign && y == ig) || !std::isfinite(xp[i])) continue;
        pos = y;
      }
      h[(k * 2 + pos) * B + slot(sp[i])] += 1.0;
    }
  }
}

// The ATen pass, on any device (CUDA's): the same counts in chunks of bounded temporaries.
void binned_update_aten(const UpdateInputs& in, const at::Tensor& state) {
  const Layout& lay = in.lay;
  const int64_t T = in.cfg.thresholds, B = T + 1, C = lay.classes;
  at::Tensor hist = state.narrow(0, lay.binned, C * 2 * B);
  const int64_t rows = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, in.c * in.d));
  const at::Tensor probs = in.cfg.input == InputKind::kAuto ? reads_probs(in, rows) : at::Tensor();
  const at::Tensor edges = at::linspace(0, 1, T, in.preds.options().dtype(at::kFloat));
  const at::Tensor base = at::arange(C, state.options().dtype(at::kLong)).mul_(2 * B).unsqueeze(0);
  for (int64_t n0 = 0; n0 < in.n; n0 += rows) {
    const Chunk c = chunk(in, n0, std::min(rows, in.n - n0));
    const at::Tensor s = scores(in, c.x, probs).contiguous();
    const at::Tensor slot = at::searchsorted(edges, s, /*out_int32=*/false, /*right=*/true);
    const at::Tensor idx = base + c.pos.to(at::kLong).mul_(B) + slot;
    hist.index_add_(0, idx.reshape({-1}), c.keep.to(at::kDouble).reshape({-1}));
  }
}

}  // namespace

void set_binned_aten_on_cpu(bool on) { g_aten_on_cpu.store(on); }

void binned_update(const UpdateInputs& in, const at::Tensor& state) {
  if (state.device().is_cpu() && !g_aten_on_cpu.load()) return binned_update_cpu(in, state);
  binned_update_aten(in, state);
}

at::Tensor safe_div(const at::Tensor& num, const at::Tensor& den) {
  const auto zero = den == 0;
  return at::where(zero, at::zeros_like(num), num / at::where(zero, at::ones_like(den), den));
}

void add_binned(std::vector<std::pair<std::string, at::Tensor>>& out, const OpArgs& args, const at::Tensor& state) {
  const Layout& lay = args.lay;
  if (lay.binned < 0) return;
  const int64_t T = args.cfg.thresholds, C = lay.classes;
  const at::Tensor hist = state.narrow(0, lay.binned, C * 2 * (T + 1)).view({C, 2, T + 1});
  auto [auroc, ap] = curves(hist, T);
  if (args.cfg.task == Task::kBinary) {
    out.emplace_back("auroc", auroc.squeeze(0).to(at::kFloat));
    out.emplace_back("average_precision", ap.squeeze(0).to(at::kFloat));
    return;
  }
  // torchmetrics' _reduce_auroc / _reduce_average_precision: macro the plain mean (binned scores are
  // never NaN: a class without a positive scores 0), weighted by the positives' count.
  const at::Tensor support = hist.select(1, 1).sum(-1);
  const bool micro = args.cfg.task == Task::kMultilabel;
  const auto [micro_auroc, micro_ap] = micro ? curves(hist.sum(0), T) : std::pair<at::Tensor, at::Tensor>();
  for (auto [name, v, m] : {std::tuple{"auroc", auroc, micro_auroc}, std::tuple{"average_precision", ap, micro_ap}}) {
    const std::string n = name;
    if (micro) out.emplace_back(n + "_micro", m.to(at::kFloat));
    out.emplace_back(n + "_macro", v.mean().to(at::kFloat));
    out.emplace_back(n + "_weighted", safe_div((v * support).sum(), support.sum()).to(at::kFloat));
    out.emplace_back(n + "_per_class", v.to(at::kFloat));
  }
}

}  // namespace stepscope::metrics
