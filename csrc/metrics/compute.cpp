// Metric formulas over the state vector: plain tensor math on the state's device, float64
// throughout, with torchmetrics 1.9's conventions (zero_division = 0; multiclass macro averages
// skip classes with tp + fp + fn == 0; weighted = by support tp + fn).
#include <ATen/ATen.h>

#include <cmath>

#include "check.h"
#include "metrics/accumulator.h"
#include "metrics/binned.h"

namespace stepscope::metrics {
namespace {

struct Counts {
  at::Tensor tp, fp, fn, tn;  // float64 [C]
  at::Tensor valid_total;     // float64 scalar: samples (multiclass/binary) or elements (multilabel)
};

Counts counts(const Layout& lay, const at::Tensor& s) {
  const int64_t C = lay.classes;
  Counts k;
  k.tp = s.narrow(0, lay.tp, C);
  k.fp = s.narrow(0, lay.pred, C) - k.tp;
  k.fn = s.narrow(0, lay.target, C) - k.tp;
  const at::Tensor valid = s.narrow(0, lay.valid, lay.valid_len);
  k.tn = (lay.valid_len == 1 ? valid.expand({C}) : valid) - k.tp - k.fp - k.fn;
  k.valid_total = valid.sum();
  return k;
}

// Averages of a per-class score. Multiclass macro averages skip classes that never occur in
// targets or predictions (tp + fp + fn == 0), as torchmetrics does; multilabel keeps them.
at::Tensor average(const at::Tensor& score, const Counts& k, const std::string& how, bool multiclass) {
  if (how == "per_class") return score;
  at::Tensor w;
  if (how == "weighted") {
    w = k.tp + k.fn;
  } else {
    w = at::ones_like(score);
    if (multiclass) w = at::where(k.tp + k.fp + k.fn == 0, at::zeros_like(w), w);
  }
  return safe_div((w * score).sum(), w.sum());
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat); }

// What a formula reads: the configuration, the state and the counts derived from it once.
struct Inputs {
  const OpArgs& args;
  const at::Tensor& state;
  const Counts& k;
  double b2;  // beta^2
  at::Tensor at(int64_t offset) const { return state[offset]; }
  at::Tensor block(int64_t offset, int64_t len) const { return state.narrow(0, offset, len); }
};

// The count-based scores by name, each one definition for per-class counts ([C]) and for their
// sums (the micro average) alike. Multiclass accuracy is recall (torchmetrics: tn does not count).
// Reported as <name> (binary) or <name>_<average> (multiclass / multilabel); fbeta when beta != 1.
using ScoreFn = at::Tensor (*)(const Counts&, double b2, bool multiclass);
struct Score {
  const char* name;
  ScoreFn fn;
};
const Score kScores[] = {
    {"accuracy",
     [](const Counts& k, double, bool mc) {
       return mc ? safe_div(k.tp, k.tp + k.fn) : safe_div(k.tp + k.tn, k.tp + k.tn + k.fp + k.fn);
     }},
    {"precision", [](const Counts& k, double, bool) { return safe_div(k.tp, k.tp + k.fp); }},
    {"recall", [](const Counts& k, double, bool) { return safe_div(k.tp, k.tp + k.fn); }},
    {"f1", [](const Counts& k, double, bool) { return safe_div(2 * k.tp, 2 * k.tp + k.fp + k.fn); }},
    {"specificity", [](const Counts& k, double, bool) { return safe_div(k.tn, k.tn + k.fp); }},
    {"iou", [](const Counts& k, double, bool) { return safe_div(k.tp, k.tp + k.fp + k.fn); }},
    {"fbeta",
     [](const Counts& k, double b2, bool) { return safe_div((1 + b2) * k.tp, (1 + b2) * k.tp + b2 * k.fn + k.fp); }},
};

// The metrics read from counters of their own, by name, after the scores: a metric with a new
// counter is one line here (beside its block in layout.h / layout.cpp and the kernels that fill it).
using StateFn = at::Tensor (*)(const Inputs&);
struct StateMetric {
  const char* name;
  StateFn fn;
};
const StateMetric kStateMetrics[] = {
    {"loss", [](const Inputs& x) { return f32(safe_div(x.at(x.args.lay.loss), x.k.valid_total)); }},
    // ECE (l1): sum over bins of |acc_bin - conf_bin| * n_bin / n = sum |acc_sum - conf_sum| / n.
    {"ece",
     [](const Inputs& x) {
       const Layout& l = x.args.lay;
       const at::Tensor gap = (x.block(l.ece_acc, kEceSlots) - x.block(l.ece_conf, kEceSlots)).abs();
       return f32(safe_div(gap.sum(), x.block(l.ece_count, kEceSlots).sum()));
     }},
    {"samples", [](const Inputs& x) { return x.k.valid_total.to(at::kLong); }},
    {"nonfinite", [](const Inputs& x) { return x.at(x.args.lay.nonfinite).to(at::kLong); }},
    {"invalid_target", [](const Inputs& x) { return x.at(x.args.lay.invalid).to(at::kLong); }},
    {"ignored", [](const Inputs& x) { return x.at(x.args.lay.ignored).to(at::kLong); }},
};

using Out = std::vector<std::pair<std::string, at::Tensor>>;

// Multiclass IoU is torchmetrics' JaccardIndex: the ignore_index class leaves the micro
// denominator (its false positives too) and the macro average.
void add_iou_multiclass(Out& out, const Inputs& x, const Counts& sums, const at::Tensor& score) {
  const Counts& k = x.k;
  const std::optional<int64_t>& ig = x.args.cfg.ignore_index;
  const bool ignore_class = ig && *ig >= 0 && *ig < x.args.lay.classes;
  const at::Tensor micro = ignore_class ? safe_div(sums.tp, sums.tp + sums.fp + sums.fn - (k.tp + k.fp + k.fn)[*ig])
                                        : safe_div(sums.tp, sums.tp + sums.fp + sums.fn);
  out.emplace_back("iou_micro", f32(micro));
  at::Tensor w = at::where(k.tp + k.fp + k.fn == 0, at::zeros_like(score), at::ones_like(score));
  if (ignore_class) {
    w.index_fill_(0, at::scalar_tensor(*ig, at::TensorOptions().dtype(at::kLong).device(w.device())), 0.0);
  }
  const at::Tensor macro = safe_div((w * score).sum(), w.sum());
  out.emplace_back("iou_macro", f32(macro));
  out.emplace_back("mean_iou", f32(macro));
}

void add_scores(Out& out, const Inputs& x) {
  const Counts& k = x.k;
  const bool multiclass = x.args.cfg.task == Task::kMulticlass;
  const bool fbeta = x.b2 != 1.0;
  if (x.args.cfg.task == Task::kBinary) {
    for (const Score& s : kScores) {
      if (fbeta || std::string(s.name) != "fbeta") out.emplace_back(s.name, f32(s.fn(k, x.b2, false).squeeze(0)));
    }
    return;
  }
  const Counts sums{k.tp.sum(), k.fp.sum(), k.fn.sum(), k.tn.sum(), k.valid_total};
  out.emplace_back("accuracy", f32(kScores[0].fn(sums, x.b2, multiclass)));
  for (const Score& s : kScores) {
    const std::string n = s.name;
    if (n == "fbeta" && !fbeta) continue;
    const at::Tensor score = s.fn(k, x.b2, multiclass);
    if (n == "iou" && multiclass) {
      add_iou_multiclass(out, x, sums, score);
    } else {
      out.emplace_back(n + "_micro", f32(s.fn(sums, x.b2, multiclass)));
      out.emplace_back(n + "_macro", f32(average(score, k, "macro", multiclass)));
      if (n == "iou") out.emplace_back("mean_iou", out.back().second);
    }
    out.emplace_back(n + "_weighted", f32(average(score, k, "weighted", multiclass)));
    out.emplace_back(n + "_per_class", f32(score));
  }
}

// Matthews correlation and Cohen's kappa from the margins of the confusion matrix, never the matrix:
// with c correct of s, and per class p_k predicted and t_k true, pt = sum p_k t_k, pp = sum p_k^2,
// tt = sum t_k^2 (tensors of one shape, broadcast: a scalar, or one per label):
//   MCC   = (c s - pt) / sqrt((s^2 - pp)(s^2 - tt)), 0 where a margin is constant (scikit-learn's
//           rule; torchmetrics gives +-1 or an eps formula in some binary cases);
//   kappa = (p_o - p_e) / (1 - p_e) = (c s - pt) / (s^2 - pt), NaN where the chance agreement is 1
//           (one class alone in targets and predictions, or no sample), as in both.
// float64, like the state: the products stay exact below 2^53 (s up to ~9e7 samples).
struct Agreement {
  at::Tensor mcc, kappa;
};

Agreement agreement(const at::Tensor& c, const at::Tensor& s, const at::Tensor& pt, const at::Tensor& pp,
                    const at::Tensor& tt) {
  const at::Tensor num = c * s - pt;
  const at::Tensor den = (s * s - pp) * (s * s - tt);
  const at::Tensor pos = den > 0;
  return {at::where(pos, num / at::where(pos, den, at::ones_like(den)).sqrt(), at::zeros_like(num)),
          num / (s * s - pt)};
}

// Binary counts (one per label) as a two-class problem: class 0 is the negative one.
Agreement agreement_2x2(const at::Tensor& tp, const at::Tensor& fp, const at::Tensor& fn, const at::Tensor& tn) {
  const at::Tensor p0 = tn + fn, p1 = tp + fp, t0 = tn + fp, t1 = tp + fn;
  return agreement(tp + tn, tp + fp + fn + tn, p0 * t0 + p1 * t1, p0 * p0 + p1 * p1, t0 * t0 + t1 * t1);
}

// Quadratic-weighted kappa, w_ij = (i - j)^2: 1 - sum w O / sum w E with E = t p^T / s. Both sums
// expand into margins, sum i^2 t_i + sum j^2 p_j - 2 (...), so only sum_ij i j O_ij needs the matrix.
at::Tensor kappa_quadratic(const at::Tensor& confmat, const at::Tensor& t, const at::Tensor& p, const at::Tensor& s) {
  const at::Tensor i = at::arange(t.size(0), t.options());
  const at::Tensor i2 = i * i;
  const at::Tensor wo = (i2 * t).sum() + (i2 * p).sum() - 2 * (i * at::mv(confmat, i)).sum();
  const at::Tensor we = ((i2 * t).sum() * p.sum() + t.sum() * (i2 * p).sum() - 2 * (i * t).sum() * (i * p).sum()) / s;
  return 1 - wo / we;
}

void add_agreement(Out& out, const Inputs& x) {
  const Counts& k = x.k;
  const Layout& lay = x.args.lay;
  switch (x.args.cfg.task) {
    case Task::kMulticlass: {
      const at::Tensor p = k.tp + k.fp, t = k.tp + k.fn, s = k.valid_total;
      const Agreement a = agreement(k.tp.sum(), s, (p * t).sum(), (p * p).sum(), (t * t).sum());
      out.emplace_back("mcc", a.mcc);
      out.emplace_back("cohen_kappa", a.kappa);
      if (lay.confmat >= 0) {
        const at::Tensor m = x.block(lay.confmat, lay.classes * lay.classes).view({lay.classes, lay.classes});
        out.emplace_back("cohen_kappa_quadratic", kappa_quadratic(m, t, p, s));
      }
      return;
    }
    case Task::kBinary: {
      const Agreement a = agreement_2x2(k.tp, k.fp, k.fn, k.tn);
      out.emplace_back("mcc", a.mcc.squeeze(0));
      out.emplace_back("cohen_kappa", a.kappa.squeeze(0));
      out.emplace_back("cohen_kappa_quadratic", a.kappa.squeeze(0));  // two classes: every weight is 1
      return;
    }
    case Task::kMultilabel: {
      // torchmetrics' MultilabelMatthewsCorrCoef: one 2x2 summed over the labels (micro).
      out.emplace_back("mcc_micro", agreement_2x2(k.tp.sum(), k.fp.sum(), k.fn.sum(), k.tn.sum()).mcc);
      const at::Tensor per = agreement_2x2(k.tp, k.fp, k.fn, k.tn).mcc;
      out.emplace_back("mcc_macro", per.mean());
      out.emplace_back("mcc_per_class", per);
      return;
    }
  }
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> compute_metrics(const OpArgs& args, const at::Tensor& state,
                                                                double beta) {
  const Layout& lay = args.lay;
  STEPSCOPE_CHECK(state.dim() == 1 && state.numel() == lay.numel && state.scalar_type() == at::kDouble,
                  "state must be float64 [", lay.numel, "] for this configuration; got ", state.scalar_type(), " ",
                  shape_str(state.sizes()));
  check_beta(beta);
  const Counts k = counts(lay, state);
  const Inputs x{args, state, k, beta * beta};
  Out out;
  add_scores(out, x);
  const bool multiclass = args.cfg.task == Task::kMulticlass;
  if (multiclass) {
    const at::Tensor n = state.narrow(0, lay.valid, 1).squeeze(0);
    for (int64_t i = 0; i < lay.num_topk; ++i) {
      out.emplace_back("top" + std::to_string(args.cfg.top_k[i]) + "_accuracy", f32(safe_div(state[lay.topk + i], n)));
    }
  }
  add_agreement(out, x);
  if (lay.confmat >= 0 || !multiclass) out.emplace_back("confusion_matrix", confusion_matrix(args, state, "none"));
  add_binned(out, args, state);
  for (const StateMetric& m : kStateMetrics) out.emplace_back(m.name, m.fn(x));
  return out;
}

at::Tensor confusion_matrix(const OpArgs& args, const at::Tensor& state, const std::string& normalize) {
  const Config& cfg = args.cfg;
  const Layout& lay = args.lay;
  STEPSCOPE_CHECK(normalize == "none" || normalize == "true" || normalize == "pred" || normalize == "all",
                  "normalize must be one of none, true, pred, all; got '", normalize, "'");
  at::Tensor m;
  if (cfg.task == Task::kMulticlass) {
    STEPSCOPE_CHECK(lay.confmat >= 0,
                    "this accumulator keeps no confusion matrix (confusion_matrix=False, the default above ",
                    kDefaultConfmatLimit, " classes)");
    m = state.narrow(0, lay.confmat, lay.classes * lay.classes).view({lay.classes, lay.classes});
  } else {
    const Counts k = counts(lay, state);
    // [[tn, fp], [fn, tp]] per label, as torchmetrics lays out binary/multilabel matrices.
    m = at::stack({k.tn, k.fp, k.fn, k.tp}, 1).view({lay.classes, 2, 2});
    if (cfg.task == Task::kBinary) m = m.squeeze(0);
  }
  if (normalize == "none") return m.to(at::kLong);
  at::Tensor den;
  if (normalize == "true") den = m.sum(-1, true);
  if (normalize == "pred") den = m.sum(-2, true);
  if (normalize == "all") den = m.sum({-2, -1}, true);
  return f32(safe_div(m, den.expand_as(m)));
}

std::vector<int64_t> check_state(const OpArgs& args, const at::Tensor& state, bool warn) {
  const Config& cfg = args.cfg;
  const Layout& lay = args.lay;
  // nonfinite, invalid and ignored are adjacent: one small device-to-host copy.
  const at::Tensor h = state.narrow(0, lay.nonfinite, 3).to(at::kCPU, at::kLong);
  const int64_t* v = h.const_data_ptr<int64_t>();
  if (v[1] > 0) {
    const std::string range = cfg.task == Task::kMulticlass
                                  ? "outside [0, " + std::to_string(lay.classes) + ")"
                                  : std::string("not 0 or 1");
    TORCH_CHECK_VALUE(false, "stepscope: ", v[1], " target value(s) were ", range,
                      cfg.ignore_index ? " and not ignore_index=" + std::to_string(*cfg.ignore_index) : "",
                      "; they were left out of every metric. Fix the labels, or set ignore_index.");
  }
  if (warn && v[0] > 0) TORCH_WARN(nonfinite_message(cfg, v[0]));
  return {v[0], v[1], v[2]};
}

std::vector<std::pair<std::string, at::Tensor>> compute_metrics(const Config& cfg, const at::Tensor& state,
                                                                double beta) {
  return compute_metrics(OpArgs(cfg), state, beta);
}

at::Tensor confusion_matrix(const Config& cfg, const at::Tensor& state, const std::string& normalize) {
  return confusion_matrix(OpArgs(cfg), state, normalize);
}

std::vector<int64_t> check_state(const Config& cfg, const at::Tensor& state, bool warn) {
  return check_state(OpArgs(cfg), state, warn);
}

std::string nonfinite_message(const Config& cfg, int64_t count) {
  return "stepscope: " + std::to_string(count) + (cfg.task == Task::kMulticlass ? " sample(s)" : " element(s)") +
         " had NaN or Inf predictions and were left out of every metric";
}

void check_beta(double beta) {
  // inf would turn every F-beta into inf / inf = NaN; NaN fails every comparison.
  STEPSCOPE_CHECK(std::isfinite(beta) && beta > 0.0, "beta must be a finite number > 0; got ", beta);
}

}  // namespace stepscope::metrics
