// The ring as JSON text (ring_json.h). Each value is computed with the same double operations, in
// the same order, as the Python writers (stepscope/run.py's ring entries, stepscope/export/trace.py),
// so that both give the same numbers; CMakeLists.txt compiles this file with -ffp-contract=off so
// that no a + b * c becomes one rounding instead of two.
#include "timing/ring_json.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <string_view>
#include <unordered_map>

#include "timing/phase_stats.h"
#include "timing/ring_rows.h"

namespace stepscope::timing {
namespace {

using namespace rows;  // timing/ring_rows.h: what the ring writers share

class Json {
 public:
  std::string out;

  Json& raw(std::string_view s) {
    out.append(s);
    return *this;
  }
  Json& num(double v) {  // Python's float repr digits; ".0" keeps an integral value a float
    if (!std::isfinite(v)) return raw("null");
    char buf[32];
    const auto r = std::to_chars(buf, buf + sizeof(buf), v);
    const std::string_view t(buf, static_cast<size_t>(r.ptr - buf));
    out.append(t);
    if (t.find_first_of(".e") == std::string_view::npos) out.append(".0");
    return *this;
  }
  Json& integer(int64_t v) {
    char buf[24];
    const auto r = std::to_chars(buf, buf + sizeof(buf), v);
    out.append(buf, static_cast<size_t>(r.ptr - buf));
    return *this;
  }
  Json& boolean(bool v) { return raw(v ? "true" : "false"); }
  Json& str(std::string_view s) {
    static const char* hex = "0123456789abcdef";
    out.push_back('"');
    for (const char c : s) {
      const auto u = static_cast<unsigned char>(c);
      if (c == '"' || c == '\\') {
        out.push_back('\\');
        out.push_back(c);
      } else if (u < 0x20) {
        out.append("\\u00");
        out.push_back(hex[u >> 4]);
        out.push_back(hex[u & 15]);
      } else {
        out.push_back(c);  // UTF-8 as it is: valid JSON, read back as the same str
      }
    }
    out.push_back('"');
    return *this;
  }
  Json& key(std::string_view k) {  // ,"k": (the caller writes the first member's '{' itself)
    out.push_back(',');
    return str(k).raw(":");
  }
};

// Python's int(round(x * 1e9)): seconds of integer nanoseconds back to nanoseconds (half-even).
int64_t ns_of(double seconds) { return static_cast<int64_t>(std::nearbyint(seconds * 1e9)); }

class Names {  // span names, each read from the Timeline once; references stay valid
 public:
  explicit Names(const Timeline& tl) : tl_(tl) {}
  const std::string& operator()(const SpanRecord& r) {
    if (r.kind == SpanRecord::kPartition) {
      auto& p = partition_[r.phase];
      if (p.empty()) p = phase_name(static_cast<Phase>(r.phase));
      return p;
    }
    auto& m = r.kind == SpanRecord::kUser ? user_ : module_;
    const auto it = m.find(r.id);
    return it != m.end() ? it->second : m.emplace(r.id, tl_.span_name(r.kind, r.id)).first->second;
  }

 private:
  const Timeline& tl_;
  std::string partition_[static_cast<int>(Phase::kCount)];
  std::unordered_map<int, std::string> user_, module_;  // nodes: a name's address stays put
};

void span_list(Json& j, const StepRecord& s, Names& names, int kind) {
  j.raw("[");
  bool first = true;
  for (int i = 0; i < s.n_spans; ++i) {
    const SpanRecord& r = s.spans[i];
    if (r.kind != kind) continue;
    j.raw(first ? "[" : ",[").str(names(r)).raw(",").num(r.t0 * 1e-9).raw(",").num(r.t1 * 1e-9).raw("]");
    first = false;
  }
  j.raw("]");
}

void device_list(Json& j, const StepRecord& s, Names& names) {
  j.raw("[");
  bool first = true;
  for (int i = 0; i < s.n_spans; ++i) {
    const SpanRecord& r = s.spans[i];
    if (!device_span(r)) continue;
    j.raw(first ? "[" : ",[").str(names(r)).raw(",").num(device_s(r.t0, r.lag0_us));
    j.raw(",").num(device_s(r.t1, r.lag1_us)).raw("]");
    first = false;
  }
  j.raw("]");
}

void ring_entry(Json& j, const StepRecord& s, Names& names, const Joined& joined) {
  j.raw("{\"step\":").integer(s.index);
  j.key("t0").num(s.t0 * 1e-9).key("t1").num(s.t1 * 1e-9).key("samples").integer(s.samples);
  j.key("host").raw("{");
  for (int i = 0; i < kNumPartition; ++i) {
    if (i) j.raw(",");
    j.str(phase_name(static_cast<Phase>(i))).raw(":").num(s.host[i]);
  }
  j.raw("}").key("truncated_spans").integer(s.truncated).key("memory");
  if (s.memory.allocated < 0) {
    j.raw("null");
  } else {
    j.raw("{\"allocated\":").integer(s.memory.allocated).key("reserved").integer(s.memory.reserved).raw("}");
  }
  j.key("warmup").boolean(s.warmup).key("device_timed").boolean(s.device_timed);
  for (const auto& [k, m] : {std::pair{"grad_norm", &joined.grad_norm}, std::pair{"loss", &joined.loss}}) {
    const double* v = Joined::find(*m, s.index);
    j.key(k);
    v ? j.num(*v) : j.raw("null");
  }
  static constexpr std::pair<const char*, int> kLists[] = {
      {"spans", SpanRecord::kPartition},
      {"user_spans", SpanRecord::kUser},
      {"module_spans", SpanRecord::kModule}};
  for (const auto& [k, kind] : kLists) span_list(j.key(k), s, names, kind);
  device_list(j.key("device_spans"), s, names);
  j.raw("}");
}

// ------------------------------------------------------------------------------- trace
// Trace tracks ("tid"s) within the rank's process, as in stepscope/export/trace.py.
constexpr int kTidSteps = 1;
constexpr int kTidHost = 2;  // partition phases, user phases and modules nested under them
constexpr int kMaxOverflowTracks = 8;
constexpr int kTidDevice = kTidHost + kMaxOverflowTracks + 1;

struct Span {  // a host or device span event, placed on a track once all are known
  int64_t t0, t1;
  int prio;  // 0 partition, 1 user, 2 module: a phase is the parent at equal starts
  int64_t step;
  const std::string* name;
  const char* cat;
  const std::string* color;
};

class Trace {
 public:
  Trace(const Timeline& tl, const TraceOptions& o) : o_(o), names_(tl), joined_(o.join) {}

  std::string write(const std::vector<StepRecord>& ring) {
    ev_.out.reserve(ring.size() * 1536);
    for (const StepRecord& s : ring) step(s);
    const int tracks = place();
    device();
    Json meta;
    meta.raw("[{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":").integer(o_.pid);
    meta.raw(",\"args\":{\"name\":").str("stepscope rank " + std::to_string(o_.pid)).raw("}}");
    meta.raw(",{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":").integer(o_.pid);
    meta.raw(",\"args\":{\"sort_index\":").integer(o_.pid).raw("}}");
    thread(meta, kTidSteps, "steps");
    thread(meta, kTidHost, "host phases");
    for (int k = 1; k < tracks; ++k)
      thread(meta, kTidHost + k, "host phases (overlapping " + std::to_string(k) + ")");
    if (!device_.empty()) thread(meta, kTidDevice, "device phases (CUDA, on the host clock)");
    meta.out.append(ev_.out);
    meta.raw("]");
    return std::move(meta.out);
  }

 private:
  const std::string* color(const std::string& key) const {
    const auto it = o_.colors.find(key);
    return it == o_.colors.end() ? nullptr : &it->second;
  }

  void thread(Json& j, int tid, const std::string& name) const {
    j.raw(",{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":").integer(o_.pid).raw(",\"tid\":").integer(tid);
    j.raw(",\"args\":{\"name\":").str(name).raw("}}");
    j.raw(",{\"name\":\"thread_sort_index\",\"ph\":\"M\",\"pid\":").integer(o_.pid);
    j.raw(",\"tid\":").integer(tid);
    j.raw(",\"args\":{\"sort_index\":").integer(tid).raw("}}");
  }

  // A complete ("X") event up to its args' step; the caller closes it.
  Json& x(const std::string& name, const char* cat, int64_t t0, int64_t t1) {
    ev_.raw(",{\"name\":").str(name).key("cat").str(cat).raw(",\"ph\":\"X\"");
    ev_.key("ts").num(static_cast<double>(t0) / 1e3);
    ev_.key("dur").num(t1 > t0 ? static_cast<double>(t1 - t0) / 1e3 : 0.0);
    return ev_.key("pid").integer(o_.pid).raw(",\"args\":{\"step\":");
  }

  Json& color_of(const std::string* c) { return c ? ev_.str(*c) : ev_.raw("null"); }

  void counter(const char* name, int64_t t1, double v) {
    if (!std::isfinite(v)) return;  // no counter point for a non-finite value
    ev_.raw(",{\"name\":").str(name).raw(",\"ph\":\"C\"").key("ts").num(static_cast<double>(t1) / 1e3);
    ev_.key("pid").integer(o_.pid).raw(",\"args\":{").str(name).raw(":").num(v).raw("}}");
  }

  void step(const StepRecord& s) {
    const int64_t t0 = ns_of(s.t0 * 1e-9), t1 = ns_of(s.t1 * 1e-9);
    x("step " + std::to_string(s.index), "step", t0, t1).integer(s.index).key("samples").integer(s.samples);
    ev_.key("color");
    color_of(color("step"));
    ev_.raw("},\"tid\":").integer(kTidSteps).raw("}");
    static const char* kCats[] = {"phase", "user", "module"};
    for (int kind = 0; kind < 3; ++kind) {
      for (int i = 0; i < s.n_spans; ++i) {
        const SpanRecord& r = s.spans[i];
        if (r.kind != kind) continue;
        const std::string& name = names_(r);
        spans_.push_back({ns_of(r.t0 * 1e-9), ns_of(r.t1 * 1e-9), kind, s.index, &name, kCats[kind],
                          color(kind == SpanRecord::kPartition ? name : std::string(kCats[kind]))});
      }
    }
    for (int i = 0; i < s.n_spans; ++i) {
      const SpanRecord& r = s.spans[i];
      if (!device_span(r)) continue;
      const std::string& name = names_(r);
      const int64_t a = ns_of(device_s(r.t0, r.lag0_us)), b = ns_of(device_s(r.t1, r.lag1_us));
      device_.push_back({a, b, 0, s.index, &name, "device", color(name)});
    }
    const double host_s = host_seconds(s);
    if (s.samples != 0 && host_s > 0) counter("samples/s", t1, static_cast<double>(s.samples) / host_s);
    const double* norm = Joined::find(joined_.grad_norm, s.index);
    const double* loss = Joined::find(joined_.loss, s.index);
    if (norm) counter("grad_norm", t1, *norm);
    if (loss) counter("loss", t1, *loss);
    double rate;
    if (step_mfu(s, o_.join, rate)) counter("mfu", t1, rate);
    if (step_tokens_per_s(s, o_.join, rate)) counter("tokens/s", t1, rate);
    if (s.memory.allocated >= 0) {
      ev_.raw(",{\"name\":\"CUDA memory\",\"ph\":\"C\"").key("ts").num(static_cast<double>(t1) / 1e3);
      ev_.key("pid").integer(o_.pid).raw(",\"args\":{\"allocated MiB\":").num(s.memory.allocated / 1048576.0);
      ev_.key("reserved MiB").num(s.memory.reserved / 1048576.0).raw("}}");
    }
  }

  void span_event(const Span& sp, int tid, int64_t t0, int64_t t1) {
    x(*sp.name, sp.cat, t0, t1).integer(sp.step).key("color");
    color_of(sp.color);
    ev_.raw("},\"tid\":").integer(tid).raw("}");
  }

  // trace.py's _place: tracks that each nest properly (a stack of ends per track); a span that
  // overlaps its neighbour without nesting goes to the next track; after the last, it is left out.
  int place() {
    std::vector<const Span*> rest;
    rest.reserve(spans_.size());
    for (const Span& sp : spans_) rest.push_back(&sp);
    std::stable_sort(rest.begin(), rest.end(), [](const Span* a, const Span* b) {
      if (a->t0 != b->t0) return a->t0 < b->t0;
      if (a->prio != b->prio) return a->prio < b->prio;
      return a->t1 - a->t0 > b->t1 - b->t0;
    });
    int tracks = 0;
    std::vector<const Span*> left;
    std::vector<int64_t> stack;
    while (!rest.empty() && tracks < kMaxOverflowTracks + 1) {
      left.clear();
      stack.clear();
      for (const Span* sp : rest) {
        while (!stack.empty() && stack.back() <= sp->t0) stack.pop_back();
        if (!stack.empty() && sp->t1 > stack.back()) {
          left.push_back(sp);
          continue;
        }
        stack.push_back(sp->t1);
        span_event(*sp, kTidHost + tracks, sp->t0, sp->t1);
      }
      ++tracks;
      rest.swap(left);
    }
    return tracks;
  }

  // One device track, in order: a span starts no earlier than the previous one ended.
  void device() {
    std::stable_sort(device_.begin(), device_.end(), [](const Span& a, const Span& b) {
      return a.t0 != b.t0 ? a.t0 < b.t0 : a.t1 < b.t1;
    });
    bool any = false;
    int64_t end = 0;
    for (const Span& sp : device_) {
      const int64_t a = any ? std::max(sp.t0, end) : sp.t0;
      const int64_t b = std::max(a, sp.t1);
      span_event(sp, kTidDevice, a, b);
      end = b;
      any = true;
    }
  }

  const TraceOptions& o_;
  Names names_;
  const Joined joined_;
  Json ev_;  // the events after the metadata, each opened by ','
  std::vector<Span> spans_, device_;
};

}  // namespace

std::string ring_json(const Timeline& tl, const RingJoin& join) {
  const std::vector<StepRecord> ring = tl.recent_steps();
  Names names(tl);
  const Joined joined(join);
  Json j;
  j.out.reserve(ring.size() * 768);
  j.raw("[");
  for (size_t i = 0; i < ring.size(); ++i) {
    if (i) j.raw(",");
    ring_entry(j, ring[i], names, joined);
  }
  j.raw("]");
  return std::move(j.out);
}

std::string trace_events_json(const Timeline& tl, const TraceOptions& opts) {
  return Trace(tl, opts).write(tl.recent_steps());
}

}  // namespace stepscope::timing
