// The regression metrics' compute and merge (the update is the TORCH_LIBRARY op
// torch.ops.stepscope.regression_update, csrc/regression/op.cpp).
#include <torch/extension.h>

#include "regression/regression.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace stepscope::python {

void bind_regression(py::module_& m) {
  namespace rg = stepscope::regression;
  m.attr("REGRESSION_FIELDS") = static_cast<int>(rg::kFields);
  m.def(
      "regression_compute",
      [](const at::Tensor& state) {
        py::dict d;
        for (auto& [k, v] : rg::compute(state)) d[py::str(k)] = v;
        return d;
      },
      py::arg("state"), "The regression metrics of a state (csrc/regression/regression.h), on its device.");
  m.def("regression_merge", &rg::merge, py::arg("state"), py::arg("other"),
        "Merges other ([S] or [R, S]) into state in place (Chan's rule; never add two states).");
  m.def("_regression_update_aten",
        [](const at::Tensor& p, const at::Tensor& t, at::Tensor s, int64_t k) { rg::update_aten(p, t, s, k); }, py::arg("preds"), py::arg("target"), py::arg("state"),
        py::arg("num_outputs"), "The update in ATen ops (the CUDA implementation), callable on any device.");
}

}  // namespace stepscope::python
