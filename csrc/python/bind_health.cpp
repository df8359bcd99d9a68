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
  const sh::HealthReading r = sh::read_state(state, params);
  py::dict g;
  const sh::NormStats& n = r.grad_norm;
  g["count"] = n.count;
  for (auto [k, v] : {std::pair{"mean", n.mean}, {"std", n.std}, {"min", n.min}, {"max", n.max}, {"p50", n.p50},
                      {"p90", n.p90}, {"p99", n.p99}, {"last", n.last}}) {
    g[k] = v;
  }
  py::list ps;
  for (const sh::ParamStats& p : r.params) {
    py::dict e;
    e["norm_last"] = p.norm_last;
    e["norm_max"] = p.norm_max;
    e["norm_mean"] = p.norm_mean;
    e["nonfinite_elements"] = p.nonfinite_elements;
    e["nonfinite_steps"] = p.nonfinite_steps;
    e["no_grad_steps"] = p.no_grad_steps;
    e["no_grad_last"] = p.no_grad_last;
    ps.append(e);
  }
  py::list recent;
  for (const sh::RingEntry& e : r.recent) {
    py::dict d;
    d["step"] = e.step;
    d["grad_norm"] = e.grad_norm;
    d["nonfinite"] = e.nonfinite;
    recent.append(d);
  }
  py::dict d;
  d["steps"] = r.steps;
  d["grad_norm"] = g;
  d["params"] = ps;
  d["nonfinite_steps"] = r.nonfinite_steps;
  d["first_nonfinite_step"] = r.first_nonfinite_step;
  d["first_nonfinite_param"] = r.first_nonfinite_param;
  d["recent"] = recent;
  return d;
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
