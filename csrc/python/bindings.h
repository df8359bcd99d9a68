// The pieces of stepscope._C, one per area. csrc/python/ is the only folder that includes Python
// headers; module.cpp calls these in a fixed order: a class must be registered before a function
// whose signature names it (pybind11 writes the docstring signatures at definition time).
#pragma once

#include <pybind11/pybind11.h>

namespace stepscope::python {

void bind_build(pybind11::module_& m);       // bind_build.cpp: build_info()
void bind_metrics(pybind11::module_& m);     // bind_metrics.cpp: MetricsConfig and the metrics constants
void bind_timing(pybind11::module_& m);      // bind_timing.cpp: Timeline, PACKED_WORDS, report_from_packed
void bind_step_hooks(pybind11::module_& m);  // step_hooks.cpp: StepHooks, step_hooks() (after Timeline)
void bind_nvtx(pybind11::module_& m);        // bind_nvtx.cpp: the _C.nvtx submodule
void bind_health(pybind11::module_& m);      // bind_health.cpp: health_layout, health_reset, health_read
void bind_regression(pybind11::module_& m);  // bind_regression.cpp: regression_compute, regression_merge

}  // namespace stepscope::python
