// The pieces of stepscope._C, one per area. csrc/python/ is the only folder that includes Python
// headers; module.cpp calls these in a fixed order: a class must be registered before a function
// whose signature names it (pybind11 writes the docstring signatures at definition time).
#pragma once

#include <pybind11/pybind11.h>

namespace stepscope::python {

void bind_build(pybind11::module_& m);       // build_info()                          bind_build.cpp
void bind_metrics(pybind11::module_& m);     // MetricsConfig, ECE_BINS, ...          bind_metrics.cpp
void bind_timing(pybind11::module_& m);      // Timeline, PACKED_WORDS, report_from_packed  bind_timing.cpp
void bind_step_hooks(pybind11::module_& m);  // StepHooks, step_hooks() (needs Timeline)    step_hooks.cpp
void bind_nvtx(pybind11::module_& m);        // the _C.nvtx submodule                 bind_nvtx.cpp

}  // namespace stepscope::python
