// stepscope._C: the pybind11 module. The only file that includes Python headers. Tensor ops are
// not bound here (they are TORCH_LIBRARY ops, reached as torch.ops.stepscope.*); this module
// holds build information, the metrics configuration/compute functions and the stateful C++
// classes.
#include <torch/extension.h>

#include "build_info.h"
#include "metrics/accumulator.h"
#include "metrics/layout.h"
#include "nvtx/nvtx.h"
#include "timing/autograd_hook.h"
#include "timing/timeline.h"

namespace py = pybind11;
using stepscope::metrics::Config;

namespace {

Config config_from(int64_t task, int64_t num_classes, std::vector<int64_t> top_k, std::optional<int64_t> ignore_index,
                   double threshold, int64_t input_kind, bool confusion_matrix) {
  Config c = stepscope::metrics::make_config(task, num_classes, top_k, ignore_index.has_value(),
                                             ignore_index.value_or(0), threshold, input_kind, confusion_matrix);
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
  d["confmat"] = l.confmat;
  d["numel"] = l.numel;
  return d;
}

py::dict series_dict(const stepscope::timing::SeriesSummary& s) {
  py::dict d;
  d["count"] = s.count;
  d["total"] = s.total;
  d["mean"] = s.mean;
  d["std"] = s.std;
  d["min"] = s.min;
  d["max"] = s.max;
  if (s.has_quantiles) {
    d["p50"] = s.p50;
    d["p90"] = s.p90;
    d["p99"] = s.p99;
  }
  return d;
}

py::dict named_dict(const std::vector<stepscope::timing::NamedSummary>& v, bool device) {
  py::dict d;
  for (const auto& n : v) {
    py::dict e;
    e["host"] = series_dict(n.host);
    e["device"] = device ? py::object(series_dict(n.device)) : py::object(py::none());
    d[py::str(n.name)] = e;
  }
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "stepscope native core";

  m.def(
      "build_info",
      [] {
        const auto b = stepscope::build_info();
        py::dict d;
        d["torch_version"] = b.torch_version;
        d["cuda"] = b.cuda ? py::object(py::str(b.cuda_version)) : py::object(py::none());
        py::list archs;
        if (b.cuda) {
          std::string a = b.cuda_archs;
          for (char& ch : a) ch = (ch == ',' || ch == ' ') ? ';' : ch;
          size_t start = 0;
          while (start <= a.size()) {
            const size_t end = a.find(';', start);
            const std::string tok = a.substr(start, end == std::string::npos ? std::string::npos : end - start);
            if (!tok.empty()) archs.append(tok);
            if (end == std::string::npos) break;
            start = end + 1;
          }
        }
        d["cuda_archs"] = archs;
        d["nvtx"] = b.nvtx;
        return d;
      },
      "What this build was compiled with: torch_version, cuda (toolkit version or None), cuda_archs, nvtx.");

  py::class_<Config>(m, "MetricsConfig",
                     "A validated metrics configuration: the state layout and the compute formulas.")
      .def(py::init(&config_from), py::arg("task"), py::arg("num_classes"), py::arg("top_k"), py::arg("ignore_index"),
           py::arg("threshold"), py::arg("input_kind"), py::arg("confusion_matrix"))
      .def_property_readonly("numel", [](const Config& c) { return stepscope::metrics::make_layout(c).numel; })
      .def_property_readonly("layout", [](const Config& c) { return layout_dict(stepscope::metrics::make_layout(c)); })
      .def(
          "compute",
          [](const Config& c, const at::Tensor& state, double beta) {
            py::dict d;
            for (auto& [k, v] : stepscope::metrics::compute_metrics(c, state, beta)) d[py::str(k)] = v;
            return d;
          },
          py::arg("state"), py::arg("beta") = 1.0)
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
          py::arg("state"));

  // ---- timing: the Timeline behind stepscope.Monitor. The boundary methods run inside hooks
  // (backward ones on autograd's thread), so each is one clock read, at most one event record and
  // the Timeline's own mutex, which is never held while calling back into Python.
  using stepscope::timing::Timeline;
  py::class_<Timeline, std::shared_ptr<Timeline>>(m, "Timeline",
                       "Phase boundaries -> host/device phase statistics, NVTX ranges and a ring of recent steps.")
      .def(py::init([](bool device, bool nvtx, int ring, int event_pool, int64_t capture_begin, int64_t capture_end) {
             TORCH_CHECK_VALUE(ring > 0, "stepscope: ring must be > 0; got ", ring);
             TORCH_CHECK_VALUE(event_pool > 1, "stepscope: event_pool must be > 1; got ", event_pool);
             stepscope::timing::TimelineOptions o;
             o.device = device;
             o.nvtx = nvtx;
             o.ring = ring;
             o.event_pool = event_pool;
             o.capture_begin = capture_begin;
             o.capture_end = capture_end;
             return std::make_shared<Timeline>(o);
           }),
           py::arg("device") = false, py::arg("nvtx") = true, py::arg("ring") = 256, py::arg("event_pool") = 2048,
           py::arg("capture_begin") = -1, py::arg("capture_end") = -1)
      .def("forward_begin", &Timeline::forward_begin, py::arg("eval") = false, py::arg("batch") = -1)
      .def("forward_end", &Timeline::forward_end)
      .def("backward_begin", &Timeline::backward_begin)
      .def("backward_end", &Timeline::backward_end)
      .def("optimizer_begin", &Timeline::optimizer_begin)
      .def("optimizer_end", &Timeline::optimizer_end, py::arg("end_step") = true)
      .def("step", &Timeline::step)
      .def("user_series", &Timeline::user_series, py::arg("name"))
      .def("user_begin", &Timeline::user_begin, py::arg("id"))
      .def("user_end", &Timeline::user_end, py::arg("id"))
      .def("register_module", &Timeline::register_module, py::arg("name"))
      .def("module_begin", &Timeline::module_begin, py::arg("id"))
      .def("module_end", &Timeline::module_end, py::arg("id"))
      .def("hook_backward",
           [](const std::shared_ptr<Timeline>& self, const at::Tensor& output) {
             return stepscope::timing::hook_backward(output, self);
           },
           py::arg("output"),
           "C++ pre-hook on output.grad_fn: backward_begin() when the gradient reaches it, backward_end() at "
           "autograd's final callback. False when output has no grad_fn.")
      .def("poll", &Timeline::poll)
      .def("open", &Timeline::open)
      .def("close", &Timeline::close)
      .def_property_readonly("steps", &Timeline::steps)
      .def_property_readonly("device", &Timeline::device)
      .def("report",
           [](Timeline& tl) {
             const auto r = tl.report();
             py::dict d;
             d["phases"] = named_dict(r.phases, r.device);
             d["user"] = named_dict(r.user, r.device);
             d["modules"] = named_dict(r.modules, r.device);
             d["steps"] = r.steps;
             d["samples"] = r.samples;
             d["step_host_total"] = r.step_host_total;
             d["dropped_device_samples"] = r.dropped_device_samples;
             d["pending_device_samples"] = r.pending_device_samples;
             d["device"] = r.device;
             return d;
           },
           "Statistics so far (seconds); completed CUDA events are resolved first, none is waited for.")
      .def("recent_steps",
           [](const Timeline& tl) {
             py::list out;
             for (const auto& s : tl.recent_steps()) {
               py::dict d;
               d["step"] = s.index;
               d["t0"] = s.t0 * 1e-9;
               d["t1"] = s.t1 * 1e-9;
               d["samples"] = s.samples;
               py::dict host;
               for (int i = 0; i < stepscope::timing::kNumPartition; ++i)
                 host[stepscope::timing::phase_name(static_cast<stepscope::timing::Phase>(i))] = s.host[i];
               d["host"] = host;
               py::list spans;
               for (int i = 0; i < s.n_spans; ++i)
                 spans.append(py::make_tuple(
                     stepscope::timing::phase_name(static_cast<stepscope::timing::Phase>(s.spans[i].phase)),
                     s.spans[i].t0 * 1e-9, s.spans[i].t1 * 1e-9));
               d["spans"] = spans;
               d["truncated_spans"] = s.truncated;
               out.append(d);
             }
             return out;
           },
           "The ring of the last steps, oldest first: host seconds per phase and raw spans (seconds since start).");

  m.attr("ECE_BINS") = stepscope::metrics::kNumEceBins;
  m.attr("DEFAULT_CONFMAT_LIMIT") = stepscope::metrics::kDefaultConfmatLimit;

  // ---- nvtx: _C.nvtx, the NVTX ranges in the "stepscope" domain (csrc/nvtx). Thin: the
  // Python layer (stepscope/nvtx.py) adds the context manager/decorator. Names are taken as
  // const char* (no std::string copy); a tool copies or registers them during the call.
  {
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
    // The general forms, for the Monitor's Python side and tests.
    n.def(
        "push",
        [](nv::Phase p, const char* name, int64_t payload, uint32_t argb) {
          nv::push(p, name, payload, argb);
        },
        py::arg("phase"), py::arg("name") = nullptr, py::arg("payload") = -1, py::arg("argb") = 0);
    n.def("pop", &nv::pop);
    n.def(
        "start",
        [](nv::Phase p, const char* name, int64_t payload, uint32_t argb) {
          return nv::start(p, name, payload, argb);
        },
        py::arg("phase"), py::arg("name") = nullptr, py::arg("payload") = -1, py::arg("argb") = 0,
        "Start a range that may end on another thread; returns its id (0 when nothing listens).");
    n.def("end", &nv::end, py::arg("id"));
    n.def("capture_begin", &nv::capture_begin,
          "Open the capture window: cudaProfilerStart (CUDA builds, CUDA in use) and the 'capture' range.");
    n.def("capture_end", &nv::capture_end);
    n.def("capture_open", &nv::capture_open);
    n.def("time_push_pop_ns", &nv::time_push_pop_ns, py::arg("n"),
          "Benchmark: n push/pop pairs in a C++ loop; returns nanoseconds per pair.");
  }
}
