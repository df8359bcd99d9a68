// Regression metrics: the state, its update (one op, CPU/CUDA/Meta), its merge and its compute.
//
// The state is float64 [K * kFields] for K outputs, viewed [K, kFields]: per output the count of
// finite (pred, target) pairs, the means and centred second moments of the predictions, the
// targets and the errors e = pred - target, their co-moment, and the plain sums that need no
// centring (|e|, |e| / max(|target|, eps), max |e|). Means and moments merge by Chan et al.'s
// pairwise rule rather than by a sum, so a large constant offset (1e6) costs no digits: sums of
// squares would lose them to cancellation. A consequence: two states are combined by merge(),
// never by adding them (the distributed compute gathers the ranks' states and merges them).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace stepscope::regression {

enum Field : int {
  kCount = 0,     // finite (pred, target) pairs
  kMeanP,         // mean of the predictions
  kMeanT,         // mean of the targets
  kM2P,           // sum of squared deviations of the predictions from their mean
  kM2T,           // ... of the targets
  kCoPT,          // sum of (pred - mean_p)(target - mean_t)
  kMeanE,         // mean of e = pred - target
  kM2E,           // sum of squared deviations of e from its mean
  kSumAbsE,       // sum of |e|
  kMaxAbsE,       // max |e| (0 while nothing is counted)
  kSumApe,        // sum of |e| / max(|target|, kMapeEps)
  kNonfinite,     // pairs left out because the prediction or the target was NaN/Inf
  kFields
};

// torchmetrics' MeanAbsolutePercentageError clamps |target| below at this value.
constexpr double kMapeEps = 1.17e-06;

// The checks shared by every implementation: preds and target of the same shape, [N, num_outputs]
// (num_outputs = 1 takes any shape, flattened), preds floating, target floating or integer, the
// state float64 [num_outputs * kFields], contiguous, all three on one device. Returns preds and
// target as [N] or [N, num_outputs] (views where the strides allow).
struct Inputs {
  at::Tensor preds, target;
  int64_t n = 0;
};
Inputs prepare(const at::Tensor& preds, const at::Tensor& target, const at::Tensor& state, int64_t num_outputs);

// Accumulates one batch into state in place. update_cpu is the CPU kernel (one pass, fixed-size
// blocks merged in a fixed order, so the result does not depend on the thread count);
// update_aten is the same computation in ATen ops (the CUDA implementation: no host sync, a
// handful of launches), callable on any device.
void update_cpu(const at::Tensor& preds, const at::Tensor& target, at::Tensor& state, int64_t num_outputs);
void update_aten(const at::Tensor& preds, const at::Tensor& target, at::Tensor& state, int64_t num_outputs);

// Merges `other` (one state [K * kFields], or several stacked [R, K * kFields], merged in row order)
// into `state` in place, on the state's device, without a host sync.
void merge(const at::Tensor& state, const at::Tensor& other);

// The metrics, as tensors on the state's device: for each name, the average over the outputs
// (scikit-learn's multioutput="uniform_average") and "<name>_per_output" [K] ("raw_values"):
// mse, rmse, mae, r2, explained_variance, pearson, mape; max_error (the largest over the outputs,
// and per output); samples and nonfinite (int64 totals, and per output).
std::vector<std::pair<std::string, at::Tensor>> compute(const at::Tensor& state);

}  // namespace stepscope::regression
