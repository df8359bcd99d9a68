// Metric formulas over the state vector: plain tensor math on the state's device, float64
// throughout, with torchmetrics 1.9's conventions (zero_division = 0; multiclass macro averages
// skip classes with tp + fp + fn == 0; weighted = by support tp + fn).
#include <ATen/ATen.h>

#include <cmath>

#include "check.h"
#include "metrics/accumulator.h"

namespace stepscope::metrics {
namespace {

at::Tensor safe_div(const at::Tensor& num, const at::Tensor& den) {
  const auto zero = den == 0;
  return at::where(zero, at::zeros_like(num), num / at::where(zero, at::ones_like(den), den));
}

struct Counts {
  at::Tensor tp, fp, fn, tn;  // float64 [C]
  at::Tensor valid_total;     // float64 scalar: samples (multiclass/binary) or elements (multilabel)
};

Counts counts(const Config& cfg, const Layout& lay, const at::Tensor& s) {
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

// The one definition of each count-based score, for per-class counts ([C]) and for their sums
// (the micro average) alike. Multiclass accuracy is recall (torchmetrics: tn does not count).
at::Tensor score(const std::string& n, const Counts& k, double b2, bool multiclass) {
  const at::Tensor &tp = k.tp, &fp = k.fp, &fn = k.fn, &tn = k.tn;
  if (n == "precision") return safe_div(tp, tp + fp);
  if (n == "recall") return safe_div(tp, tp + fn);
  if (n == "f1") return safe_div(2 * tp, 2 * tp + fp + fn);
  if (n == "fbeta") return safe_div((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp);
  if (n == "specificity") return safe_div(tn, tn + fp);
  if (n == "iou") return safe_div(tp, tp + fp + fn);
  if (n == "accuracy") return multiclass ? safe_div(tp, tp + fn) : safe_div(tp + tn, tp + tn + fp + fn);
  TORCH_INTERNAL_ASSERT(false, n);
  return at::Tensor();
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> compute_metrics(const Config& cfg, const at::Tensor& state,
                                                                double beta) {
  const Layout lay = make_layout(cfg);
  STEPSCOPE_CHECK(state.dim() == 1 && state.numel() == lay.numel && state.scalar_type() == at::kDouble,
                  "state must be float64 [", lay.numel, "] for this configuration; got ", state.scalar_type(), " ",
                  shape_str(state.sizes()));
  check_beta(beta);
  const Counts k = counts(cfg, lay, state);
  const bool multiclass = cfg.task == Task::kMulticlass;
  const at::Tensor& tp = k.tp;
  const at::Tensor& fp = k.fp;
  const at::Tensor& fn = k.fn;
  const double b2 = beta * beta;
  const bool ignore_class =
      multiclass && cfg.ignore_index && *cfg.ignore_index >= 0 && *cfg.ignore_index < lay.classes;

  std::vector<std::pair<std::string, at::Tensor>> out;
  auto per_class_scores = [&](const char* name) -> at::Tensor { return score(name, k, b2, multiclass); };
  const Counts sums{tp.sum(), fp.sum(), fn.sum(), k.tn.sum(), k.valid_total};
  auto micro = [&](const std::string& n) -> at::Tensor {
    // IoU (torchmetrics' JaccardIndex): the ignore_index class's false positives leave the
    // denominator too.
    if (n == "iou" && ignore_class) {
      return safe_div(sums.tp, sums.tp + sums.fp + sums.fn - (tp + fp + fn)[*cfg.ignore_index]);
    }
    return score(n, sums, b2, multiclass);
  };

  std::vector<const char*> names = {"accuracy", "precision", "recall", "f1", "specificity", "iou"};
  if (beta != 1.0) names.push_back("fbeta");
  if (cfg.task == Task::kBinary) {
    for (const char* n : names) out.emplace_back(n, f32(per_class_scores(n).squeeze(0)));
  } else {
    out.emplace_back("accuracy", f32(micro("accuracy")));
    for (const char* n : names) {
      const at::Tensor score = per_class_scores(n);
      out.emplace_back(std::string(n) + "_micro", f32(micro(n)));
      if (std::string(n) == "iou" && multiclass) {
        // JaccardIndex's macro also drops the ignore_index class.
        at::Tensor w = at::where(tp + fp + fn == 0, at::zeros_like(score), at::ones_like(score));
        if (ignore_class) {
          w.index_fill_(0, at::scalar_tensor(*cfg.ignore_index, at::TensorOptions().dtype(at::kLong).device(w.device())),
                        0.0);
        }
        const at::Tensor macro = safe_div((w * score).sum(), w.sum());
        out.emplace_back("iou_macro", f32(macro));
        out.emplace_back("mean_iou", f32(macro));
      } else {
        out.emplace_back(std::string(n) + "_macro", f32(average(score, k, "macro", multiclass)));
        if (std::string(n) == "iou") out.emplace_back("mean_iou", out.back().second);
      }
      out.emplace_back(std::string(n) + "_weighted", f32(average(score, k, "weighted", multiclass)));
      out.emplace_back(std::string(n) + "_per_class", f32(score));
    }
  }
  if (multiclass) {
    const at::Tensor n = state.narrow(0, lay.valid, 1).squeeze(0);
    for (int64_t i = 0; i < lay.num_topk; ++i) {
      out.emplace_back("top" + std::to_string(cfg.top_k[i]) + "_accuracy", f32(safe_div(state[lay.topk + i], n)));
    }
  }
  if (lay.confmat >= 0 || !multiclass) out.emplace_back("confusion_matrix", confusion_matrix(cfg, state, "none"));
  out.emplace_back("loss", f32(safe_div(state[lay.loss], k.valid_total)));
  // ECE (l1): sum over bins of |acc_bin - conf_bin| * n_bin / n = sum |acc_sum - conf_sum| / n.
  const at::Tensor ece_n = state.narrow(0, lay.ece_count, kEceSlots).sum();
  const at::Tensor gap = (state.narrow(0, lay.ece_acc, kEceSlots) - state.narrow(0, lay.ece_conf, kEceSlots)).abs();
  out.emplace_back("ece", f32(safe_div(gap.sum(), ece_n)));
  out.emplace_back("samples", k.valid_total.to(at::kLong));
  out.emplace_back("nonfinite", state[lay.nonfinite].to(at::kLong));
  out.emplace_back("invalid_target", state[lay.invalid].to(at::kLong));
  out.emplace_back("ignored", state[lay.ignored].to(at::kLong));
  return out;
}

at::Tensor confusion_matrix(const Config& cfg, const at::Tensor& state, const std::string& normalize) {
  const Layout lay = make_layout(cfg);
  STEPSCOPE_CHECK(normalize == "none" || normalize == "true" || normalize == "pred" || normalize == "all",
                  "normalize must be one of none, true, pred, all; got '", normalize, "'");
  at::Tensor m;
  if (cfg.task == Task::kMulticlass) {
    STEPSCOPE_CHECK(lay.confmat >= 0,
                    "this accumulator keeps no confusion matrix (confusion_matrix=False, the default above ",
                    kDefaultConfmatLimit, " classes)");
    m = state.narrow(0, lay.confmat, lay.classes * lay.classes).view({lay.classes, lay.classes});
  } else {
    const Counts k = counts(cfg, lay, state);
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

std::vector<int64_t> check_state(const Config& cfg, const at::Tensor& state, bool warn) {
  const Layout lay = make_layout(cfg);
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

std::string nonfinite_message(const Config& cfg, int64_t count) {
  return "stepscope: " + std::to_string(count) + (cfg.task == Task::kMulticlass ? " sample(s)" : " element(s)") +
         " had NaN or Inf predictions and were left out of every metric";
}

void check_beta(double beta) {
  // inf would turn every F-beta into inf / inf = NaN; NaN fails every comparison.
  STEPSCOPE_CHECK(std::isfinite(beta) && beta > 0.0, "beta must be a finite number > 0; got ", beta);
}

}  // namespace stepscope::metrics
