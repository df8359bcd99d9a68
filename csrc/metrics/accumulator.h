// The classification-metrics accumulator for C++ programs (the Python ClassificationMetrics
// drives the same op and the same compute functions).
//
//   stepscope::metrics::Config cfg;  cfg.num_classes = 10;  cfg.top_k = {1, 5};
//   stepscope::metrics::Accumulator acc(cfg, torch::kCUDA);
//   acc.update(logits, labels);               // one kernel, no host sync
//   auto m = acc.compute();                   // tensors on the device; m["accuracy"], m["f1_macro"]
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "metrics/layout.h"

namespace stepscope::metrics {

// Metric formulas over a state vector, on the state's device, with no host read. Keys:
//   multiclass / multilabel: accuracy (micro), and <metric>_<average> for metric in accuracy,
//     precision, recall, f1, specificity, iou (+ fbeta when beta != 1) and average in micro,
//     macro, weighted, per_class; mean_iou; top<k>_accuracy (multiclass); confusion_matrix
//     (multiclass when kept: int64 [C, C]; multilabel: [L, 2, 2]).
//   binary: accuracy, precision, recall, f1, specificity, iou (+ fbeta), confusion_matrix [2, 2].
//   all: loss (mean), ece, samples, nonfinite, invalid_target, ignored.
// Float metrics are float32 (computed in float64); counts are int64. zero_division is 0.
// The formulas are tables by name in compute.cpp. Each of these functions takes a parsed OpArgs
// (its layout built once) or, for convenience, a Config, checked and laid out for that one call.
std::vector<std::pair<std::string, at::Tensor>> compute_metrics(const OpArgs& args, const at::Tensor& state,
                                                                double beta = 1.0);
std::vector<std::pair<std::string, at::Tensor>> compute_metrics(const Config& cfg, const at::Tensor& state,
                                                                double beta = 1.0);

// The confusion matrix (multiclass [C, C], binary [2, 2], multilabel [L, 2, 2]), rows =
// targets. normalize: "none" (int64 counts), "true" (rows sum to 1), "pred" (columns), "all".
at::Tensor confusion_matrix(const OpArgs& args, const at::Tensor& state, const std::string& normalize = "none");
at::Tensor confusion_matrix(const Config& cfg, const at::Tensor& state, const std::string& normalize = "none");

// The one host read: raises if any target was out of range (naming how many) and, with warn,
// warns (TORCH_WARN) on non-finite predictions. Returns {nonfinite, invalid, ignored}.
std::vector<int64_t> check_state(const OpArgs& args, const at::Tensor& state, bool warn = true);
std::vector<int64_t> check_state(const Config& cfg, const at::Tensor& state, bool warn = true);

// The one wording of the non-finite warning (check_state's TORCH_WARN, Python's warnings.warn).
std::string nonfinite_message(const Config& cfg, int64_t count);

// Throws (ValueError) unless beta > 0: compute_metrics' check, also run when a Python metric is built.
void check_beta(double beta);

class Accumulator {
 public:
  Accumulator(Config cfg, c10::Device device);

  // Accumulates a batch through torch.ops.stepscope.classification_update (CPU or CUDA).
  void update(const at::Tensor& preds, const at::Tensor& target);
  // check_state() (one small host read), then compute_metrics().
  std::map<std::string, at::Tensor> compute(double beta = 1.0, bool check = true) const;
  void reset();

  const at::Tensor& state() const { return state_; }
  void load_state(const at::Tensor& state);
  const Config& config() const { return args_.cfg; }
  const Layout& layout() const { return args_.lay; }
  const OpArgs& op_args() const { return args_; }

 private:
  OpArgs args_;  // checked and laid out once, at construction
  at::Tensor state_;
};

}  // namespace stepscope::metrics
