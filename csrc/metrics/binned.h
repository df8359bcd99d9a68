// Binned AUROC and average precision (ClassificationMetrics(thresholds=T)): per class (one-vs-rest
// for multiclass, per label for multilabel) a histogram of the positive and of the negative
// samples' scores over the T + 1 gaps of torch.linspace(0, 1, T), the state's `binned` block
// [C, 2, T + 1] (negatives, then positives; slot b holds the scores s with exactly b thresholds
// <= s). torchmetrics' binned curves keep a 2 x 2 matrix per threshold, T of them; the suffix sums
// of these histograms give every one of those matrices.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "metrics/layout.h"
#include "metrics/update.h"

namespace stepscope::metrics {

// Adds one update's scores to the histograms, on the state's device (no host sync). Rows (elements for binary/multilabel) left out of the other metrics (a
// NaN/Inf prediction, an out-of-range or ignored target) are left out here too.
// On the CPU, one C++ loop over the rows; elsewhere (CUDA) ATen ops in chunks of bounded temporaries.
void binned_update(const UpdateInputs& in, const at::Tensor& state);

// Tests: run the ATen pass (the CUDA one) on the CPU as well.
void set_binned_aten_on_cpu(bool on);

// auroc / average_precision (binary), and <name>_macro, _weighted, _per_class (and _micro for
// multilabel), with torchmetrics' binned formulas; float32 like the other scores.
void add_binned(std::vector<std::pair<std::string, at::Tensor>>& out, const OpArgs& args, const at::Tensor& state);

// num / den, 0 where den == 0 (torchmetrics' zero_division=0): the formulas' one division, shared
// by compute.cpp and binned.cpp.
at::Tensor safe_div(const at::Tensor& num, const at::Tensor& den);

}  // namespace stepscope::metrics
