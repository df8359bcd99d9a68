// The gradient-statistics helpers of _C: the state's layout, reset and read. The update itself is
// a TORCH_LIBRARY op (csrc/health/op.cpp), reached as torch.ops.stepscope.grad_stats_update.
#include <torch/extension.h>

#include "check.h"
#include "health/grad_stats.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace stepscope::python {
namespace {

namespace sh = stepscope::health;

py::dict layout_dict(int64_t params, int64_t ring) {
  STEPSCOPE_CHECK(params >= 0 && ring >= 1, "health_layout needs params >= 0 and ring >= 1; got ", params, ", ",
                  ring);
  const sh::HealthLayout l(params, ring);
  py::dict d;
  for (const auto& b : sh::kHealthBlocks) d[b.name] = l.*b.offset;
  d["params"] = l.params;
  d["ring"] = l.ring;
  d["numel"] = l.numel;
  d["bytes"] = l.bytes();
  return d;
}

py::dict reading_dict(const at::Tensor& state, int64_t params) {
  using namespace pybind11::literals;
  const sh::HealthReading r = sh::read_state(state, params);
  const sh::NormStats& n = r.grad_norm;
  py::list ps, recent;
  for (const sh::ParamStats& p : r.params) {
    ps.append(py::dict("norm_last"_a = p.norm_last, "norm_max"_a = p.norm_max, "norm_mean"_a = p.norm_mean,
                       "nonfinite_elements"_a = p.nonfinite_elements, "nonfinite_steps"_a = p.nonfinite_steps,
                       "no_grad_steps"_a = p.no_grad_steps, "no_grad_last"_a = p.no_grad_last));
  }
  for (const sh::RingEntry& e : r.recent) {
    recent.append(py::dict("step"_a = e.step, "grad_norm"_a = e.grad_norm, "nonfinite"_a = e.nonfinite));
  }
  return py::dict("steps"_a = r.steps,
                  "grad_norm"_a = py::dict("count"_a = n.count, "mean"_a = n.mean, "std"_a = n.std, "min"_a = n.min,
                                           "max"_a = n.max, "p50"_a = n.p50, "p90"_a = n.p90, "p99"_a = n.p99,
                                           "last"_a = n.last),
                  "params"_a = ps, "nonfinite_steps"_a = r.nonfinite_steps,
                  "first_nonfinite_step"_a = r.first_nonfinite_step,
                  "first_nonfinite_param"_a = r.first_nonfinite_param, "recent"_a = recent);
}

}  // namespace

void bind_health(py::module_& m) {
  m.def("health_layout", &layout_dict, py::arg("params"), py::arg("ring"),
        "Offsets of the gradient-statistics state's blocks for P parameters and a ring of R steps, its "
        "numel and bytes (8 * numel).");
  m.def("health_reset", &sh::reset_state, py::arg("state"), py::arg("params"),
        "Sets a gradient-statistics state to 'no update yet', in place.");
  m.def("health_read", &reading_dict, py::arg("state"), py::arg("params"),
        "Reads a gradient-statistics state (one copy to the host): the statistics by parameter index.");
  m.attr("HEALTH_BINS_PER_DECADE") = sh::kBinsPerDecade;
  m.attr("HEALTH_LOG_RANGE") = py::make_tuple(sh::kLogMin, sh::kLogMax);
}

}  // namespace stepscope::python
