// stepscope._C: the pybind11 module, assembled from one binding function per area
// (csrc/python/bindings.h). Tensor ops are not bound here (they are TORCH_LIBRARY ops, reached as
// torch.ops.stepscope.*); this module holds build information, the metrics configuration/compute
// functions and the stateful C++ classes.
#include <torch/extension.h>

#include "python/bindings.h"

PYBIND11_MODULE(_C, m) {
  namespace sp = stepscope::python;
  m.doc() = "stepscope native core";
  sp::bind_build(m);
  sp::bind_metrics(m);
  sp::bind_timing(m);
  sp::bind_step_hooks(m);  // after bind_timing: step_hooks() takes a Timeline
  sp::bind_nvtx(m);
  sp::bind_health(m);
  sp::bind_regression(m);
}
