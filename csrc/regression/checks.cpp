// The regression update's argument checks, shared by its CPU, CUDA and Meta implementations so
// that all three accept and refuse the same calls, before anything is touched.
#include <ATen/ATen.h>

#include "check.h"
#include "regression/regression.h"

namespace stepscope::regression {

Inputs prepare(const at::Tensor& preds, const at::Tensor& target, const at::Tensor& state, int64_t num_outputs) {
  STEPSCOPE_CHECK(num_outputs >= 1, "num_outputs must be >= 1; got ", num_outputs);
  TORCH_CHECK_TYPE(is_read_float(preds.scalar_type()), "stepscope: preds must be a floating tensor of float32, "
                   "float16, bfloat16 or float64; got ", preds.scalar_type());
  const auto tt = target.scalar_type();
  TORCH_CHECK_TYPE(is_read_float(tt) || at::isIntegralType(tt, /*includeBool=*/true), "stepscope: target must be "
                   "a real tensor (floating or integer); got ", tt);
  TORCH_CHECK_TYPE(state.scalar_type() == at::kDouble, "stepscope: state must be float64; got ", state.scalar_type());
  STEPSCOPE_CHECK(!preds.is_sparse() && !target.is_sparse(), "preds and target must be dense tensors");
  STEPSCOPE_CHECK_DEVICE(target, preds);
  STEPSCOPE_CHECK_DEVICE(state, preds);
  STEPSCOPE_CHECK(state.dim() == 1 && state.numel() == num_outputs * kFields && state.is_contiguous(),
                  "state must be a contiguous float64 vector of ", num_outputs * kFields, " (", kFields,
                  " per output); got ", shape_str(state.sizes()));
  STEPSCOPE_CHECK(preds.sizes() == target.sizes(), "preds and target must have the same shape; got preds ",
                  shape_str(preds.sizes()), " and target ", shape_str(target.sizes()));
  Inputs in;
  if (num_outputs == 1) {
    in.preds = preds.reshape({-1});
    in.target = target.reshape({-1});
  } else {
    STEPSCOPE_CHECK(preds.dim() == 2 && preds.size(1) == num_outputs, "with num_outputs=", num_outputs,
                    " preds and target must be [N, ", num_outputs, "]; got ", shape_str(preds.sizes()));
    in.preds = preds;
    in.target = target;
  }
  in.n = in.preds.size(0);
  return in;
}

}  // namespace stepscope::regression
