// Gradient statistics: the update op's front end and bodies, the reader, and the C++ API.
//
// The op, stepscope::grad_stats_update (registered in csrc/health/op.cpp), accumulates one
// optimizer step's gradients into a HealthLayout state in place, on the gradients' device, with
// no host sync. The CPU body (grad_stats_cpu.cpp) reads each gradient once and counts its
// non-finite elements exactly; the CUDA body (grad_stats_aten.cpp) is built from ATen ops
// (one fused _foreach_norm, then small ops on the stacked norms) and counts a parameter once per
// step when its norm is non-finite, until a fused kernel lands.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "health/layout.h"

namespace stepscope::health {

using GradList = c10::List<std::optional<at::Tensor>>;

// One call's inputs after every check passed: the layout implied by len(grads) and the state's
// size, and the gradients in order (undefined where the parameter had none).
struct GradStatsInputs {
  HealthLayout lay;
  std::vector<at::Tensor> grads;
  int64_t step = 0;
  int64_t slot = 0;
};

// Every check of one call, shared by the CPU, CUDA and Meta registrations (grad_stats_checks.cpp).
GradStatsInputs prepare_grad_stats(const GradList& grads, const at::Tensor& state, int64_t step, int64_t slot);
// The checks that need no concrete sizes (all the Meta impl can do under symbolic shapes).
void check_grad_stats_kinds(const GradList& grads, const at::Tensor& state);

// The bodies, called after prepare_grad_stats. grad_stats_aten is device-agnostic (ATen ops only):
// registered for CUDA, and run on CPU by the GoogleTests to check it against grad_stats_cpu.
void grad_stats_cpu(const GradStatsInputs& in, const at::Tensor& state);
void grad_stats_aten(const GradStatsInputs& in, const at::Tensor& state);

// A tensor the CPU body reads as it is: dense, strided, on the CPU in a dtype it reads, with no
// dispatch key beyond the CPU backend's, autograd's and autocast's (which every tensor carries), so
// no tensor subclass, functorch wrapper or other device.
bool plain_cpu(const at::Tensor& t);
// A plain_cpu tensor's squared L2 norm by grad_stats_cpu's read (float64 total, nothing allocated).
double sum_sq_cpu(const at::Tensor& t);

// Sets a state to "no update yet" (min +inf, first non-finite -1, ring slots empty), in place.
void reset_state(const at::Tensor& state, int64_t params);
// A fresh state of HealthLayout(params, ring).numel float64 elements on `options`' device.
at::Tensor new_state(int64_t params, int64_t ring, const at::TensorOptions& options);

// The global norm's streaming statistics. Quantiles come from the histogram (layout.h).
struct NormStats {
  int64_t count = 0;  // updates with a finite global norm
  double mean = 0, std = 0, min = 0, max = 0, last = 0, p50 = 0, p90 = 0, p99 = 0;
};
struct ParamStats {
  double norm_last = 0, norm_max = 0, norm_mean = 0;
  int64_t nonfinite_elements = 0;  // CUDA: parameters with a non-finite norm, once per step
  int64_t nonfinite_steps = 0, no_grad_steps = 0;
  bool no_grad_last = false;
};
struct RingEntry {
  int64_t step = 0;
  double grad_norm = 0;
  int64_t nonfinite = 0;
};
// Everything the state holds, read on the host (read() copies the state once).
struct HealthReading {
  int64_t steps = 0;
  NormStats grad_norm;
  std::vector<ParamStats> params;
  int64_t nonfinite_steps = 0;
  int64_t first_nonfinite_step = -1;
  int64_t first_nonfinite_param = -1;
  std::vector<RingEntry> recent;  // oldest first
};

// Reads a state (any device; one copy to the host). The ring is read assuming update k (from 0)
// wrote slot k % ring, as GradStats does.
HealthReading read_state(const at::Tensor& state, int64_t params);
// The q-quantile (0 <= q <= 1) of the finite global norms, from the histogram: numpy's rank
// q * (n - 1), rounded down, located in its bin; that bin's geometric middle (the edge for the
// under/overflow bins). 0 when no finite norm was seen.
double hist_quantile(const double* hist, double q);

// The C++ API: one state, the op called through the dispatcher (so the state's device picks the
// implementation), a host counter for the ring slot. LibTorch programs use it directly.
class GradStats {
 public:
  GradStats(int64_t params, int64_t ring = 256, at::Device device = at::kCPU);
  // One optimizer step's gradients, one entry per parameter (std::nullopt: no gradient).
  void update(const std::vector<std::optional<at::Tensor>>& grads, int64_t step);
  // The parameters themselves: reads p.grad() (undefined: no gradient).
  void update_from_params(const std::vector<at::Tensor>& params, int64_t step);
  HealthReading read() const { return read_state(state_, lay_.params); }
  void reset();
  const at::Tensor& state() const { return state_; }
  const HealthLayout& layout() const { return lay_; }

 private:
  // update_from_params's path for plain CPU gradients (grad_stats.cpp); false: take the op.
  bool update_cpu_direct(const std::vector<at::Tensor>& params, int64_t step);
  HealthLayout lay_;
  at::Tensor state_;
  int64_t updates_ = 0;
};

}  // namespace stepscope::health
