// _C.MetricsConfig and the metrics constants. The update itself is not bound here: it is a
// TORCH_LIBRARY op (csrc/metrics/op.cpp), reached as torch.ops.stepscope.*.
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

#include <string>

#include "check.h"
#include "metrics/accumulator.h"
#include "metrics/binned.h"
#include "metrics/layout.h"
#include "metrics/row_simd.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace stepscope::python {
namespace {

using stepscope::metrics::OpArgs;

// MetricsConfig(*op_args): the op's configuration arguments as Python passes them to the op,
// converted by the op's own schema types and parsed by OpArgs::parse, the op's one parser.
OpArgs config_from(const py::args& a) {
  const auto& schema = c10::Dispatcher::singleton().findSchemaOrThrow("stepscope::classification_update", "").schema();
  // The trailing arguments with a default in the schema (thresholds) may be left out, as from
  // earlier callers.
  size_t required = OpArgs::kCount;
  while (required > 0 && schema.arguments()[OpArgs::kFirst + required - 1].default_value()) --required;
  STEPSCOPE_CHECK(a.size() >= required && a.size() <= OpArgs::kCount, "MetricsConfig takes the update op's ",
                  OpArgs::kCount, " configuration arguments (the last ", OpArgs::kCount - required,
                  " optional); got ", a.size());
  c10::Stack stack;
  for (size_t i = 0; i < OpArgs::kCount; ++i) {
    const auto& arg = schema.arguments()[OpArgs::kFirst + i];
    stack.push_back(i < a.size() ? torch::jit::toIValue(a[i], arg.type()) : *arg.default_value());
  }
  return OpArgs::parse(stack, 0);
}

py::dict layout_dict(const stepscope::metrics::Layout& l) {
  py::dict d;
  for (const auto& b : stepscope::metrics::kLayoutBlocks) d[b.name] = l.*b.offset;
  d["classes"] = l.classes;
  d["num_topk"] = l.num_topk;
  d["valid_len"] = l.valid_len;
  d["dense"] = l.dense;
  d["numel"] = l.numel;
  return d;
}

py::dict compute_dict(const OpArgs& c, const at::Tensor& state, double beta) {
  py::dict d;
  for (auto& [k, v] : stepscope::metrics::compute_metrics(c, state, beta)) d[py::str(k)] = v;
  return d;
}

}  // namespace

void bind_metrics(py::module_& m) {
  py::class_<OpArgs>(m, "MetricsConfig",
                     "A validated metrics configuration, built from the update op's configuration arguments "
                     "(MetricsConfig(*op_args)): the state layout and the compute formulas.")
      .def(py::init(&config_from))
      .def_property_readonly("numel", [](const OpArgs& c) { return c.lay.numel; })
      .def_property_readonly("layout", [](const OpArgs& c) { return layout_dict(c.lay); })
      .def("compute", &compute_dict, py::arg("state"), py::arg("beta") = 1.0)
      .def(
          "confusion_matrix",
          [](const OpArgs& c, const at::Tensor& state, const std::string& normalize) {
            return stepscope::metrics::confusion_matrix(c, state, normalize);
          },
          py::arg("state"), py::arg("normalize") = "none")
      .def(
          "check",
          // Python raises the non-finite warning itself (a TORCH_WARN from here would only reach stderr).
          [](const OpArgs& c, const at::Tensor& state) { return stepscope::metrics::check_state(c, state, false); },
          py::arg("state"))
      .def(
          "nonfinite_message",
          [](const OpArgs& c, int64_t count) { return stepscope::metrics::nonfinite_message(c.cfg, count); },
          py::arg("count"));
  m.def("check_beta", &stepscope::metrics::check_beta, py::arg("beta"), "ValueError unless beta > 0.");
  // Tests and benches: the CPU update's SIMD path on (where the CPU has AVX2/FMA/F16C) or off
  // (the portable loops); returns the previous setting. STEPSCOPE_CPU_SIMD=0 starts it off.
  m.def("_set_cpu_simd", &stepscope::metrics::simd::set_enabled, py::arg("on"));
  m.def("_set_binned_aten_on_cpu", &stepscope::metrics::set_binned_aten_on_cpu, py::arg("on"),
        "Tests: fill the binned AUROC/AP histograms with the ATen pass (the CUDA one) on the CPU too.");
  m.def("_cpu_simd", &stepscope::metrics::simd::enabled);

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
