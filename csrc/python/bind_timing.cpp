// _C.Timeline (the clock behind stepscope.Monitor), its report dict and report_from_packed.
#include <torch/extension.h>

#include <cmath>
#include <memory>
#include <vector>

#include "python/bindings.h"
#include "nvtx/nvtx.h"
#include "timing/ring_json.h"
#include "timing/timeline.h"

namespace py = pybind11;

namespace stepscope::python {
namespace {

namespace tm = stepscope::timing;
using tm::Timeline;

const char* phase_str(int phase) { return tm::phase_name(static_cast<tm::Phase>(phase)); }

py::dict series_dict(const tm::SeriesSummary& s) {
  py::dict d;
  d["count"] = s.count;
  d["total"] = s.total;
  d["mean"] = s.mean;
  d["std"] = s.std;
  // An interval's extremes that no histogram can bound (modules keep moments only) are unknown.
  d["min"] = std::isnan(s.min) ? py::object(py::none()) : py::object(py::float_(s.min));
  d["max"] = std::isnan(s.max) ? py::object(py::none()) : py::object(py::float_(s.max));
  if (s.has_quantiles) {
    d["p50"] = s.p50;
    d["p90"] = s.p90;
    d["p99"] = s.p99;
  }
  return d;
}

py::dict named_dict(const std::vector<tm::NamedSummary>& v, bool device) {
  py::dict d;
  for (const auto& n : v) {
    py::dict e;
    e["host"] = series_dict(n.host);
    e["device"] = device ? py::object(series_dict(n.device)) : py::object(py::none());
    if (n.parent != nullptr) e["parent"] = n.parent;
    d[py::str(n.name)] = e;
  }
  return d;
}

// CUDA allocator counters, or None when none were read (CPU, or no step ended yet).
py::object memory_dict(const tm::DeviceMemory& m, bool peaks) {
  if (m.allocated < 0) return py::none();
  py::dict d;
  d["allocated"] = m.allocated;
  d["reserved"] = m.reserved;
  if (peaks) {
    d["peak"] = m.peak_allocated;
    d["peak_reserved"] = m.peak_reserved;
  }
  return d;
}

py::object memory_trend_dict(const tm::Report& r) {
  if (r.memory_trend.steps < 2) return py::none();
  py::dict t;
  t["steps"] = r.memory_trend.steps;
  t["first"] = r.memory_trend.first;
  t["last"] = r.memory_trend.last;
  t["rising_fraction"] = r.memory_trend.rising_fraction;
  return t;
}

py::dict warmup_dict(const tm::WarmupSummary& w, bool device) {
  py::dict host, dev;
  for (int i = 0; i < static_cast<int>(tm::Phase::kCount); ++i) {
    const char* name = phase_str(i);
    host[name] = w.host[i];
    if (device && w.device_count[i] > 0) dev[name] = w.device[i];
  }
  py::dict d;
  d["steps"] = w.steps;
  d["samples"] = w.samples;
  d["host"] = host;
  d["device"] = device ? py::object(dev) : py::object(py::none());
  return d;
}

py::list spikes_list(const tm::Report& r) {
  py::list spikes;
  for (const auto& sp : r.spikes) {
    py::dict e;
    e["step"] = sp.index;
    e["duration"] = sp.duration;
    e["step_median"] = sp.step_median;
    e["phase"] = phase_str(sp.phase);
    e["phase_time"] = sp.phase_time;
    e["phase_median"] = sp.phase_median;
    spikes.append(e);
  }
  return spikes;
}

py::dict report_dict(const tm::Report& r) {
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
  d["warmup"] = warmup_dict(r.warmup, r.device);
  d["memory"] = memory_dict(r.memory, true);
  d["memory_trend"] = memory_trend_dict(r);
  py::dict lag;
  for (const auto& n : r.lag) lag[py::str(n.name)] = series_dict(n.host);
  d["lag"] = r.device ? py::object(lag) : py::object(py::none());
  d["spikes"] = spikes_list(r);
  d["spikes_total"] = r.spikes_total;
  // Device sampling: None where unknown (no device timing; device_every in a merged report).
  d["device_steps"] = r.device_steps;
  d["device_every"] = r.device_every > 0 ? py::object(py::int_(r.device_every)) : py::object(py::none());
  d["device_every_auto"] = r.device_every_auto;
  d["device_events"] = r.device_events;
  d["event_record_cost"] = r.event_record_cost > 0 ? py::object(py::float_(r.event_record_cost)) : py::object(py::none());
  return d;
}

// One ring entry. Times are nanoseconds since start in C++, seconds in Python.
py::dict step_dict(const Timeline& tl, const tm::StepRecord& s) {
  using tm::SpanRecord;
  py::dict d;
  d["step"] = s.index;
  d["t0"] = s.t0 * 1e-9;
  d["t1"] = s.t1 * 1e-9;
  d["samples"] = s.samples;
  py::dict host;
  for (int i = 0; i < tm::kNumPartition; ++i) host[phase_str(i)] = s.host[i];
  d["host"] = host;
  py::list spans, user, modules, device;
  for (int i = 0; i < s.n_spans; ++i) {
    const SpanRecord& r = s.spans[i];
    if (r.kind == SpanRecord::kPartition) {
      const char* name = phase_str(r.phase);
      spans.append(py::make_tuple(name, r.t0 * 1e-9, r.t1 * 1e-9));
      if (!std::isnan(r.lag0_us) && !std::isnan(r.lag1_us))
        device.append(py::make_tuple(name, (r.t0 + 1e3 * r.lag0_us) * 1e-9, (r.t1 + 1e3 * r.lag1_us) * 1e-9));
    } else {
      (r.kind == SpanRecord::kUser ? user : modules)
          .append(py::make_tuple(tl.span_name(r.kind, r.id), r.t0 * 1e-9, r.t1 * 1e-9));
    }
  }
  d["spans"] = spans;
  d["user_spans"] = user;
  d["module_spans"] = modules;
  d["device_spans"] = device;
  d["truncated_spans"] = s.truncated;
  d["memory"] = memory_dict(s.memory, false);
  d["warmup"] = s.warmup;
  d["device_timed"] = s.device_timed;
  return d;
}

py::list recent_steps_list(const Timeline& tl) {
  py::list out;
  for (const auto& s : tl.recent_steps()) out.append(step_dict(tl, s));
  return out;
}

using Pairs = std::vector<std::pair<int64_t, double>>;

tm::RingJoin ring_join(Pairs grad_norm, Pairs loss, double flops_per_step, double peak_flops,
                       double tokens_per_sample) {
  tm::RingJoin j;
  j.grad_norm = std::move(grad_norm);
  j.loss = std::move(loss);
  j.flops_per_step = flops_per_step;
  j.peak_flops = peak_flops;
  j.tokens_per_sample = tokens_per_sample;
  return j;
}

// A ring writer's text, written without the GIL (the Timeline has its own lock), as bytes.
template <class Write>
py::bytes text_bytes(Write write) {
  std::string text;
  {
    py::gil_scoped_release nogil;
    text = write();
  }
  return py::bytes(text);
}

py::bytes ring_json_bytes(const Timeline& tl, Pairs grad_norm, Pairs loss) {
  const tm::RingJoin j = ring_join(std::move(grad_norm), std::move(loss), 0, 0, 0);
  return text_bytes([&] { return tm::ring_json(tl, j); });
}

py::bytes ring_csv_bytes(const Timeline& tl, Pairs grad_norm, Pairs loss, double flops_per_step,
                         double peak_flops, double tokens_per_sample) {
  const tm::RingJoin j =
      ring_join(std::move(grad_norm), std::move(loss), flops_per_step, peak_flops, tokens_per_sample);
  return text_bytes([&] { return tm::ring_csv(tl, j); });
}

py::bytes trace_json_bytes(const Timeline& tl, int64_t pid, std::map<std::string, std::string> colors,
                           Pairs grad_norm, Pairs loss, double flops_per_step, double peak_flops,
                           double tokens_per_sample) {
  tm::TraceOptions o;
  o.pid = pid;
  o.colors = std::move(colors);
  o.join = ring_join(std::move(grad_norm), std::move(loss), flops_per_step, peak_flops, tokens_per_sample);
  return text_bytes([&] { return tm::trace_events_json(tl, o); });
}

std::shared_ptr<Timeline> make_timeline(bool device, bool nvtx, int64_t ring, int event_pool, int64_t capture_begin,
                                        int64_t capture_end, int64_t warmup_steps, int64_t device_every) {
  TORCH_CHECK_VALUE(event_pool > 1, "stepscope: event_pool must be > 1; got ", event_pool);
  TORCH_CHECK_VALUE(warmup_steps >= 0, "stepscope: warmup_steps must be >= 0; got ", warmup_steps);
  TORCH_CHECK_VALUE(device_every >= 0, "stepscope: device_every must be >= 1, or 0 for auto; got ", device_every);
  tm::TimelineOptions o;
  o.device = device;
  o.nvtx = nvtx;
  o.ring = tm::check_ring(ring);
  o.event_pool = event_pool;
  o.capture_begin = capture_begin;
  o.capture_end = capture_end;
  o.warmup_steps = warmup_steps;
  o.device_every = device_every;
  return std::make_shared<Timeline>(o);
}

py::dict report_from_packed(const at::Tensor& packed) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kDouble, "stepscope: packed statistics must be float64; got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() > 0 && packed.numel() % tm::kPackedWords == 0,
                    "stepscope: packed statistics must hold a whole number of buffers of PACKED_WORDS (",
                    tm::kPackedWords, ") doubles; got ", packed.numel());
  const auto c = packed.to(at::kCPU).contiguous();
  tm::Report r;
  {
    py::gil_scoped_release nogil;
    r = tm::report_from_packed(c.data_ptr<double>(), c.numel() / tm::kPackedWords);
  }
  return report_dict(r);
}

}  // namespace

// The boundary methods run inside hooks (backward ones on autograd's thread), so each is one clock
// read, at most one event record and the Timeline's own lock, which is never held while calling
// back into Python.
void bind_timing(py::module_& m) {
  py::class_<tm::TimelineSnapshot, std::shared_ptr<tm::TimelineSnapshot>>(
      m, "TimelineSnapshot", "Timeline.snapshot()'s opaque mark: pass it to Timeline.report(since=...).");
  py::class_<Timeline, std::shared_ptr<Timeline>>(
      m, "Timeline", "Phase boundaries -> host/device phase statistics, NVTX ranges and a ring of recent steps.")
      .def(py::init(&make_timeline), py::arg("device") = false, py::arg("nvtx") = true, py::arg("ring") = 256,
           py::arg("event_pool") = 2048, py::arg("capture_begin") = -1, py::arg("capture_end") = -1,
           py::arg("warmup_steps") = 0, py::arg("device_every") = 0)
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
      .def("poll", &Timeline::poll)
      .def("open", &Timeline::open)
      .def("close", &Timeline::close)
      .def_property_readonly("steps", &Timeline::steps)
      .def("keep_out_step", &Timeline::keep_out_step,
           "The step under way counts as a warm-up step: kept out of every statistic (call it before its first boundary)")
      .def_property_readonly("step_index", &Timeline::step_index,
                             "The index of the step under way (recent_steps' 'step'; reset() keeps it)")
      .def_property_readonly("device", &Timeline::device)
      .def(
          "report",
          [](Timeline& tl, const std::shared_ptr<tm::TimelineSnapshot>& since) {
            return report_dict(tl.report(since.get()));
          },
          py::arg("since") = nullptr,
          "Statistics so far (seconds); completed CUDA events are resolved first, none is waited for. since: a "
          "snapshot() of this Timeline: the statistics of the steps that ended after it (see snapshot).")
      .def(
          "pack",
          [](Timeline& tl, const std::shared_ptr<tm::TimelineSnapshot>& since) {
            return torch::tensor(tl.pack(since.get()), torch::dtype(torch::kFloat64));
          },
          py::arg("since") = nullptr,
          "The raw phase statistics as one float64 tensor of PACKED_WORDS (report_from_packed reads it); since: "
          "those of the steps after a snapshot().")
      .def("snapshot", &Timeline::snapshot,
           "An opaque mark between steps for report(since=...) and pack(since=...): one copy of the statistics, no "
           "device synchronisation. Taken inside a step, it marks that step's end.")
      .def("reset", &Timeline::reset,
           "Forgets every statistic and the ring of recent steps; the step clock, step index and names stay. A step "
           "open at the reset is not counted.")
      .def("recent_steps", &recent_steps_list,
           "The ring of the last steps, oldest first: host seconds per phase, the partition's spans, the user "
           "phases' and modules' spans that ended in the step (name, t0, t1; seconds since start) and, on CUDA, "
           "the partition's spans as the GPU ran them, on the host clock (device_spans; once resolved; none on a step "
           "that device sampling left untimed: device_timed False).")
      .def("ring_json", &ring_json_bytes, py::arg("grad_norm") = Pairs{}, py::arg("loss") = Pairs{},
           "recent_steps() as the JSON array of a run file (bytes, UTF-8), written in C++: non-finite numbers "
           "as null, and each step's grad_norm and loss from the (step, value) pairs given (null where absent).")
      .def("trace_events_json", &trace_json_bytes, py::arg("pid") = 0,
           py::arg("colors") = std::map<std::string, std::string>{}, py::arg("grad_norm") = Pairs{},
           py::arg("loss") = Pairs{}, py::arg("flops_per_step") = 0.0, py::arg("peak_flops") = 0.0,
           py::arg("tokens_per_sample") = 0.0,
           "The ring as the JSON array of a Chrome trace's traceEvents (bytes, UTF-8), written in C++: what "
           "stepscope.export.trace_events builds from the run data (throughput figures 0 = unknown).")
      .def("ring_csv", &ring_csv_bytes, py::arg("grad_norm") = Pairs{}, py::arg("loss") = Pairs{},
           py::arg("flops_per_step") = 0.0, py::arg("peak_flops") = 0.0, py::arg("tokens_per_sample") = 0.0,
           "The ring as the text of stepscope.export.write_csv (bytes, UTF-8), written in C++: what that "
           "function writes from the run data (throughput figures 0 = unknown).");

  m.attr("PACKED_WORDS") = tm::kPackedWords;
  m.attr("MAX_RING") = tm::kMaxRing;
  m.attr("RING_SLOT_BYTES") = tm::kRingSlotBytes;
  m.def("report_from_packed", &report_from_packed, py::arg("packed"),
        "Merges packed Timeline statistics ([n, PACKED_WORDS] or n*PACKED_WORDS float64) into a report dict "
        "shaped like Timeline.report() (user and modules empty). One buffer gives its Timeline's phases exactly.");
  // The one phase table (csrc/phases.h), for report.py and the run files: the Timeline's series
  // (partition first) in order, then the NVTX-only phases; and the boundaries in step order.
  py::list phases;
  for (int i = 0; i < static_cast<int>(nvtx::Phase::kCount); ++i) {
    const PhaseInfo& p = kPhaseTable[i];
    auto opt = [](const char* s) { return s ? py::object(py::str(s)) : py::object(py::none()); };
    phases.append(py::dict(py::arg("name") = p.name, py::arg("nvtx_name") = p.nvtx_name, py::arg("color") = p.argb,
                           py::arg("category") = p.category, py::arg("partition") = i < tm::kNumPartition,
                           py::arg("series") = i < static_cast<int>(tm::Phase::kCount),
                           py::arg("opens") = opt(p.opens), py::arg("closes") = opt(p.closes)));
  }
  m.attr("PHASES") = py::tuple(phases);
  py::list boundaries;
  for (int i = 0; i < tm::kNumPartition; ++i) boundaries.append(boundary_name(i));
  m.attr("BOUNDARIES") = py::tuple(boundaries);
}

}  // namespace stepscope::python
