// The gradient-statistics helpers of _C: the state's layout, reset and read. The update itself is
// a TORCH_LIBRARY op (csrc/health/op.cpp), reached as torch.ops.stepscope.grad_stats_update.
#include <torch/extension.h>

#include "check.h"
#include "health/grad_stats.h"
#include "health/watch.h"
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

// The ring's entries, built with the C API: pybind11's keyword dicts cost about 1.5 us each, which
// made a 256-step read about 0.45 ms (most of a Lightning step log).
py::list recent_list(const std::vector<sh::RingEntry>& recent) {
  static PyObject* const keys[] = {PyUnicode_InternFromString("step"), PyUnicode_InternFromString("grad_norm"),
                                   PyUnicode_InternFromString("nonfinite")};
  py::list out(recent.size());
  for (size_t i = 0; i < recent.size(); ++i) {
    const sh::RingEntry& e = recent[i];
    py::dict d;
    const py::object values[] = {py::int_(e.step), py::float_(e.grad_norm), py::int_(e.nonfinite)};
    for (int k = 0; k < 3; ++k)
      if (PyDict_SetItem(d.ptr(), keys[k], values[k].ptr()) != 0) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), d.release().ptr());
  }
  return out;
}

py::dict reading_to_dict(const sh::HealthReading& r) {
  using namespace pybind11::literals;
  const sh::NormStats& n = r.grad_norm;
  py::list ps;
  for (const sh::ParamStats& p : r.params) {
    ps.append(py::dict("norm_last"_a = p.norm_last, "norm_max"_a = p.norm_max, "norm_mean"_a = p.norm_mean,
                       "nonfinite_elements"_a = p.nonfinite_elements, "nonfinite_steps"_a = p.nonfinite_steps,
                       "no_grad_steps"_a = p.no_grad_steps, "no_grad_last"_a = p.no_grad_last));
  }
  const py::list recent = recent_list(r.recent);
  return py::dict("steps"_a = r.steps,
                  "grad_norm"_a = py::dict("count"_a = n.count, "mean"_a = n.mean, "std"_a = n.std, "min"_a = n.min,
                                           "max"_a = n.max, "p50"_a = n.p50, "p90"_a = n.p90, "p99"_a = n.p99,
                                           "last"_a = n.last),
                  "params"_a = ps, "nonfinite_steps"_a = r.nonfinite_steps,
                  "first_nonfinite_step"_a = r.first_nonfinite_step,
                  "first_nonfinite_param"_a = r.first_nonfinite_param, "recent"_a = recent);
}

py::dict reading_dict(const at::Tensor& state, int64_t params) { return reading_to_dict(sh::read_state(state, params)); }

std::shared_ptr<sh::Watch> make_watch(std::vector<at::Tensor> params, std::vector<std::string> names, int64_t ring,
                                      const std::string& nonfinite, int64_t ratio_every, int64_t ratio_samples,
                                      int64_t ratio_max_bytes) {
  sh::WatchOptions o;
  o.ring = ring;
  o.nonfinite = sh::parse_nonfinite(nonfinite);
  o.ratio_every = ratio_every;
  o.ratio_samples = ratio_samples;
  o.ratio_max_bytes = ratio_max_bytes;
  return std::make_shared<sh::Watch>(std::move(params), std::move(names), o);
}

// Everything a Watch holds, on the host: the gradient reading (by parameter index), the loss ring,
// the update ratio's samples, and the state of the watch itself.
py::dict watch_read(const sh::Watch& w) {
  using namespace pybind11::literals;
  sh::HealthReading r;
  sh::LossReading loss;
  std::vector<sh::RatioSample> ratio;
  {
    py::gil_scoped_release nogil;  // device-to-host copies
    r = w.read();
    loss = w.read_loss();
    ratio = w.read_ratio();
  }
  py::list losses, samples;
  losses = py::list(loss.recent.size());
  for (size_t i = 0; i < loss.recent.size(); ++i) {
    PyObject* t = Py_BuildValue("(Ld)", static_cast<long long>(loss.recent[i].first), loss.recent[i].second);
    if (t == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(losses.ptr(), static_cast<Py_ssize_t>(i), t);
  }
  for (const auto& e : ratio) samples.append(py::make_tuple(e.step, py::cast(e.dw), py::cast(e.w)));
  const sh::GradStats* st = w.stats();
  return py::dict("grads"_a = reading_to_dict(r), "counts"_a = (st != nullptr && !st->state().is_cpu()) ? "parameters" : "elements",
                  "loss"_a = py::dict("count"_a = loss.count, "recent"_a = losses,
                                      "first_nonfinite_step"_a = loss.first_nonfinite_step),
                  "ratio"_a = samples, "mode"_a = sh::nonfinite_name(w.options().nonfinite), "skipped"_a = w.skipped(),
                  "disabled"_a = w.disabled(), "ratio_off"_a = w.ratio_off(), "ratio_every"_a = w.options().ratio_every,
                  "state_bytes"_a = st != nullptr ? st->layout().bytes() : 0, "param_bytes"_a = w.ratio_bytes());
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
  py::class_<sh::Watch, std::shared_ptr<sh::Watch>>(m, "HealthWatch",
                                                    "Training health at each optimizer step (csrc/health/watch.h)")
      .def(py::init(&make_watch), py::arg("params"), py::arg("names"), py::arg("ring") = 256,
           py::arg("nonfinite") = "warn", py::arg("ratio_every") = 100, py::arg("ratio_samples") = 64,
           py::arg("ratio_max_bytes") = int64_t{1} << 30)
      .def("before_update", [](sh::Watch& w, int64_t step, bool measure_only) {
             return static_cast<int>(w.before_update(step, measure_only)); },
           py::arg("step"), py::arg("measure_only") = false,
           "The gradients are final: 0 go on, 1 skipped (gradients dropped), 2 raise (non-finite)")
      .def("after_update", &sh::Watch::after_update, "The update ran (the sampled update ratio)")
      .def("observe_loss", &sh::Watch::observe_loss, py::arg("loss"), py::arg("step"),
           "Keeps the step's loss on its device (no host read)")
      .def("reset", &sh::Watch::reset)
      .def("read", &watch_read, "Everything held, on the host (a few device-to-host copies)")
      .def("nonfinite_message", &sh::Watch::nonfinite_message, py::arg("ran") = false)
      .def_property_readonly("names", &sh::Watch::names)
      .def_property_readonly("disabled", &sh::Watch::disabled);
  m.attr("HEALTH_BINS_PER_DECADE") = sh::kBinsPerDecade;
  m.attr("HEALTH_LOG_RANGE") = py::make_tuple(sh::kLogMin, sh::kLogMax);
}

}  // namespace stepscope::python
