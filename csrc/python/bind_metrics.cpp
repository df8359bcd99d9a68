// _C.MetricsConfig and the metrics constants. The update itself is not bound here: it is a
// TORCH_LIBRARY op (csrc/ops.cpp), reached as torch.ops.stepscope.*.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "metrics/accumulator.h"
#include "metrics/layout.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace stepscope::python {
namespace {

using stepscope::metrics::Config;

Config config_from(int64_t task, int64_t num_classes, std::vector<int64_t> top_k, std::optional<int64_t> ignore_index,
                   double threshold, int64_t input_kind, bool confusion_matrix) {
  Config c = stepscope::metrics::make_config(task, num_classes, top_k, ignore_index, threshold, input_kind,
                                             confusion_matrix);
  (void)stepscope::metrics::make_layout(c);  // validates
  return c;
}

py::dict layout_dict(const stepscope::metrics::Layout& l) {
  py::dict d;
  d["classes"] = l.classes;
  d["tp"] = l.tp;
  d["pred"] = l.pred;
  d["target"] = l.target;
  d["valid"] = l.valid;
  d["valid_len"] = l.valid_len;
  d["topk"] = l.topk;
  d["loss"] = l.loss;
  d["ece_count"] = l.ece_count;
  d["ece_conf"] = l.ece_conf;
  d["ece_acc"] = l.ece_acc;
  d["nonfinite"] = l.nonfinite;
  d["invalid"] = l.invalid;
  d["ignored"] = l.ignored;
  d["pending"] = l.pending;
  d["confmat"] = l.confmat;
  d["numel"] = l.numel;
  return d;
}

py::dict compute_dict(const Config& c, const at::Tensor& state, double beta) {
  py::dict d;
  for (auto& [k, v] : stepscope::metrics::compute_metrics(c, state, beta)) d[py::str(k)] = v;
  return d;
}

}  // namespace

void bind_metrics(py::module_& m) {
  py::class_<Config>(m, "MetricsConfig",
                     "A validated metrics configuration: the state layout and the compute formulas.")
      .def(py::init(&config_from), py::arg("task"), py::arg("num_classes"), py::arg("top_k"), py::arg("ignore_index"),
           py::arg("threshold"), py::arg("input_kind"), py::arg("confusion_matrix"))
      .def_property_readonly("numel", [](const Config& c) { return stepscope::metrics::make_layout(c).numel; })
      .def_property_readonly("layout", [](const Config& c) { return layout_dict(stepscope::metrics::make_layout(c)); })
      .def("compute", &compute_dict, py::arg("state"), py::arg("beta") = 1.0)
      .def(
          "confusion_matrix",
          [](const Config& c, const at::Tensor& state, const std::string& normalize) {
            return stepscope::metrics::confusion_matrix(c, state, normalize);
          },
          py::arg("state"), py::arg("normalize") = "none")
      .def(
          "check",
          // Python raises the non-finite warning itself (a TORCH_WARN from here would only reach stderr).
          [](const Config& c, const at::Tensor& state) { return stepscope::metrics::check_state(c, state, false); },
          py::arg("state"))
      .def("nonfinite_message", &stepscope::metrics::nonfinite_message, py::arg("count"));
  m.def("check_beta", &stepscope::metrics::check_beta, py::arg("beta"), "ValueError unless beta > 0.");

  m.attr("ECE_BINS") = stepscope::metrics::kNumEceBins;
  m.attr("DEFAULT_CONFMAT_LIMIT") = stepscope::metrics::kDefaultConfmatLimit;
  // The op's encodings and limits, from the C++ that defines them (Python re-encodes nothing).
  {
    namespace sm = stepscope::metrics;
    py::dict tasks, inputs;
    for (sm::Task t : {sm::Task::kBinary, sm::Task::kMulticlass, sm::Task::kMultilabel})
      tasks[sm::task_name(t)] = static_cast<int64_t>(t);
    inputs["auto"] = static_cast<int64_t>(sm::InputKind::kAuto);
    inputs["logits"] = static_cast<int64_t>(sm::InputKind::kLogits);
    inputs["probs"] = static_cast<int64_t>(sm::InputKind::kProbs);
    m.attr("TASKS") = tasks;
    m.attr("INPUT_KINDS") = inputs;
    m.attr("MAX_TOP_K") = sm::kMaxTopK;
  }
}

}  // namespace stepscope::python
