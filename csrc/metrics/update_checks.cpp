// Checks and canonical views for the update op: what every implementation registered in
// op.cpp (the Meta one too, which runs the checks and touches nothing) calls first.
#include <ATen/ATen.h>

#include <limits>

#include "check.h"
#include "metrics/update.h"

namespace stepscope::metrics {

bool is_kernel_target_dtype(at::ScalarType t) {
  return t == at::kLong || t == at::kInt || t == at::kByte || t == at::kBool;
}

namespace {

// Targets in a dtype the kernels read. Narrow integer dtypes fit int32; uint32 does not and uint64
// not even int64, so they are widened (uint32) or reinterpreted (uint64) as int64 with every value
// past INT64_MAX, which wraps negative, replaced by one that is out of range for any configuration
// and is not ignore_index: an out-of-range label counts as invalid_target, never as a class or as
// ignored. Device ops only (no host read).
at::Tensor kernel_target(const at::Tensor& target, std::optional<int64_t> ignore_index) {
  const at::ScalarType t = target.scalar_type();
  if (is_kernel_target_dtype(t)) return target;
  if (t == at::kUInt32) return target.to(at::kLong);
  if (t == at::kUInt64) {
    const at::Tensor v = target.view(at::kLong);
    const int64_t past = ignore_index == std::numeric_limits<int64_t>::max() ? std::numeric_limits<int64_t>::max() - 1
                                                                              : std::numeric_limits<int64_t>::max();
    return at::where(v < 0, at::scalar_tensor(past, v.options()), v);
  }
  return target.to(at::kInt);
}

}  // namespace

void check_update_kinds(const at::Tensor& preds, const at::Tensor& target, const at::Tensor& state) {
  STEPSCOPE_CHECK_FLOATING(preds);
  STEPSCOPE_CHECK_INTEGRAL(target);
  STEPSCOPE_CHECK_DEVICE(target, preds);
  STEPSCOPE_CHECK_DEVICE(state, preds);
  TORCH_CHECK_TYPE(state.scalar_type() == at::kDouble, "stepscope: state must be float64; got ", state.scalar_type());
}

UpdateInputs prepare_update(const at::Tensor& preds, const at::Tensor& target, const at::Tensor& state, OpArgs args) {
  UpdateInputs in(std::move(args));
  const Layout& lay = in.lay;

  STEPSCOPE_CHECK(preds.defined() && target.defined() && state.defined(), "preds, target and state must be defined");
  check_update_kinds(preds, target, state);
  STEPSCOPE_CHECK(state.dim() == 1 && state.numel() == lay.numel && state.is_contiguous(),
                  "state must be a contiguous 1-D tensor of ", lay.numel, " elements for this configuration; got ",
                  shape_str(state.sizes()), " (build it with the same task, num_classes, top_k and confusion_matrix)");

  const auto ps = preds.sizes();
  const auto ts = target.sizes();
  if (in.cfg.task == Task::kMulticlass) {
    const int64_t C = lay.classes;
    STEPSCOPE_CHECK(preds.dim() >= 2, "preds must have shape [N, C] or [N, C, d1, ...] with C = num_classes = ", C,
                    "; got ", shape_str(ps));
    STEPSCOPE_CHECK(ps[1] == C, "preds has ", ps[1], " classes in dim 1 but num_classes = ", C, "; got preds ",
                    shape_str(ps));
    bool ok = target.dim() == preds.dim() - 1 && ts[0] == ps[0];
    for (int64_t i = 2; ok && i < preds.dim(); ++i) ok = ts[i - 1] == ps[i];
    STEPSCOPE_CHECK(ok, "target must have shape [N] or [N, d1, ...] matching preds [N, C, d1, ...]; got preds ",
                    shape_str(ps), " and target ", shape_str(ts));
    in.n = ps[0];
    in.c = C;
    in.d = 1;
    for (int64_t i = 2; i < preds.dim(); ++i) in.d *= ps[i];
    in.preds = preds.reshape({in.n, in.c, in.d});
    in.target = target.reshape({in.n, in.d});
  } else {
    const bool binary = in.cfg.task == Task::kBinary;
    STEPSCOPE_CHECK(binary ? preds.dim() >= 1 : preds.dim() >= 2,
                    binary ? "preds must have shape [N, ...] for the binary task; got a scalar"
                           : "preds must have shape [N, L] or [N, L, d1, ...] for the multilabel task; got ",
                    binary ? "" : shape_str(ps));
    STEPSCOPE_CHECK(ps.equals(ts), "target must have the same shape as preds for the ", task_name(in.cfg.task),
                    " task; got preds ", shape_str(ps), " and target ", shape_str(ts));
    if (!binary) {
      STEPSCOPE_CHECK(ps[1] == lay.classes, "preds has ", ps[1], " labels in dim 1 but num_labels = ", lay.classes,
                      "; got preds ", shape_str(ps));
    }
    in.n = ps[0];
    in.c = binary ? 1 : ps[1];
    in.d = 1;
    for (int64_t i = binary ? 1 : 2; i < preds.dim(); ++i) in.d *= ps[i];
    in.preds = preds.reshape({in.n, in.c, in.d});
    in.target = target.reshape({in.n, in.c, in.d});
  }
  // After the shape checks, so that a CUDA call refuses what a CPU one refuses, in the same words.
  TORCH_CHECK_TYPE(preds.device().is_cpu() || preds.scalar_type() != at::kDouble || preds.device().is_meta(),
                   "stepscope: float64 preds are supported on CPU only; got them on ", preds.device());
  in.target = kernel_target(in.target, in.cfg.ignore_index);
  return in;
}

}  // namespace stepscope::metrics
