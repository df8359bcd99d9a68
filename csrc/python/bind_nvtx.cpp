// _C.nvtx: the NVTX ranges in the "stepscope" domain (csrc/nvtx). Thin: the Python layer
// (stepscope/nvtx.py) adds the context manager/decorator. Names are taken as const char* (no
// std::string copy); a tool copies or registers them during the call.
#include <torch/extension.h>

#include <cstdint>

#include "nvtx/nvtx.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace stepscope::python {

void bind_nvtx(py::module_& m) {
  namespace nv = stepscope::nvtx;
  py::module_ n = m.def_submodule("nvtx", "NVTX ranges in the stepscope domain");
  py::enum_<nv::Phase> phase(n, "Phase");
  for (int i = 0; i < static_cast<int>(nv::Phase::kCount); ++i) {
    const auto p = static_cast<nv::Phase>(i);
    phase.value(nv::phase_name(p), p);
  }
  n.attr("DOMAIN") = nv::kDomainName;
  n.def("compiled_in", &nv::compiled_in, "Built with the NVTX v3 headers.");
  n.def("enabled", &nv::enabled, "Compiled in and not switched off by set_enabled(False).");
  n.def("set_enabled", &nv::set_enabled, py::arg("on"),
        "Process-wide switch for all stepscope NVTX ranges; ranges already open still close.");
  n.def("tool_attached", &nv::tool_attached,
        "Whether a tool (nsys, ncu, an NVTX_INJECTION64_PATH library) receives the ranges.");
  n.def("phase_name", &nv::phase_name, py::arg("phase"));
  n.def("phase_color", &nv::phase_color, py::arg("phase"), "ARGB colour of a phase's ranges.");
  n.def("phase_category", &nv::phase_category, py::arg("phase"), "NVTX category id of a phase.");
  // User ranges (Phase.user): the calls behind stepscope.nvtx.range/mark, kept positional
  // and enum-free because they run on every range.
  n.def("range_push", [](const char* name, uint32_t argb) { nv::push(nv::Phase::kUser, name, -1, argb); });
  n.def("range_pop", &nv::pop);
  n.def("mark", [](const char* name, int64_t payload, uint32_t argb) {
    nv::mark(nv::Phase::kUser, name, payload, argb);
  });
  // The capture window (the Timeline opens it in C++; tests/python/test_nvtx.py drives it on CUDA).
  n.def("capture_begin", &nv::capture_begin,
        "Open the capture window: cudaProfilerStart (CUDA builds, CUDA in use) and the 'capture' range.");
  n.def("capture_end", &nv::capture_end);
  n.def("capture_open", &nv::capture_open);
  n.def("time_push_pop_ns", &nv::time_push_pop_ns, py::arg("n"),
        "Benchmark: n push/pop pairs in a C++ loop; returns nanoseconds per pair.");
}

}  // namespace stepscope::python
