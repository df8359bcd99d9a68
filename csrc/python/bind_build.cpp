// _C.build_info(): what this build was compiled with.
#include <string>

#include "build_info.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace stepscope::python {
namespace {

// TORCH_CUDA_ARCH_LIST style ("8.0;9.0+PTX", or with commas/spaces) -> ["8.0", "9.0+PTX"].
py::list split_archs(std::string a) {
  py::list archs;
  for (char& ch : a) ch = (ch == ',' || ch == ' ') ? ';' : ch;
  size_t start = 0;
  while (start <= a.size()) {
    const size_t end = a.find(';', start);
    const std::string tok = a.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!tok.empty()) archs.append(tok);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return archs;
}

py::dict build_info_dict() {
  const auto b = stepscope::build_info();
  py::dict d;
  d["torch_version"] = b.torch_version;
  d["cuda"] = b.cuda ? py::object(py::str(b.cuda_version)) : py::object(py::none());
  d["cuda_archs"] = b.cuda ? split_archs(b.cuda_archs) : py::list();
  d["nvtx"] = b.nvtx;
  return d;
}

}  // namespace

void bind_build(py::module_& m) {
  m.def("build_info", &build_info_dict,
        "What this build was compiled with: torch_version, cuda (toolkit version or None), cuda_archs, nvtx.");
}

}  // namespace stepscope::python
