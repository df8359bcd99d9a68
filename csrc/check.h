// Argument checks shared by every op. Each message names the argument, what was expected and
// what arrived, and every check runs before any kernel is launched, so a bad call changes
// nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace stepscope {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << ']';
  return o.str();
}

// The floating dtypes the kernels read (STEPSCOPE_DISPATCH_PREDS): float32, float16, bfloat16 and
// float64. float8 and complex are floating to ATen but not read here.
inline bool is_read_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

}  // namespace stepscope

// STEPSCOPE_CHECK(cond, "message parts", ...): a c10::Error (ValueError in Python) prefixed
// "stepscope: ".
#define STEPSCOPE_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "stepscope: ", __VA_ARGS__)

#define STEPSCOPE_CHECK_DEVICE(t, ref)                                                             \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), "stepscope: ", #t, " must be on the same device as ", \
                    #ref, " (", (ref).device(), "); got ", (t).device())

// The prediction dtypes the kernels read (is_read_float); float64 is refused on CUDA later, after
// the shape checks.
#define STEPSCOPE_CHECK_FLOATING(t)                                                                  \
  TORCH_CHECK_TYPE(stepscope::is_read_float((t).scalar_type()), "stepscope: ", #t,                   \
                   " must be a floating tensor of float32, float16, bfloat16 (or float64 on CPU); got ", \
                   (t).scalar_type())

#define STEPSCOPE_CHECK_INTEGRAL(t)                                                                \
  TORCH_CHECK_TYPE(at::isIntegralType((t).scalar_type(), /*includeBool=*/true), "stepscope: ", #t, \
                   " must be an integer tensor of class indices; got ", (t).scalar_type())
