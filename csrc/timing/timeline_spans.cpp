// The Timeline's named spans (user phases, per-module forwards), the ring of recent steps, where
// resolved device times go (the Timeline as DeviceTimer's sink) and ScopedPhase.
#include <c10/util/Exception.h>

#include <limits>
#include <string>

#include "nvtx/nvtx.h"
#include "timing/timeline.h"

namespace stepscope::timing {
namespace {

constexpr size_t kMaxUserSeries = 256;  // distinct user phase names: each keeps two histograms

}  // namespace

template <typename G>
int Timeline::group_add(G& g, const std::string& name, size_t limit) {
  std::lock_guard<SpinLock> lock(mu_);
  const auto& names = g.series.names;
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return static_cast<int>(i);
  TORCH_CHECK(names.size() < limit, "stepscope: more than ", limit, " distinct ", g.what,
              " names; phase names must be fixed labels, not per-step strings");
  g.open.emplace_back();
  return g.series.add(name);
}

template <typename G>
void Timeline::group_begin(G& g, int id) {
  std::lock_guard<SpinLock> lock(mu_);
  TORCH_CHECK(id >= 0 && static_cast<size_t>(id) < g.open.size(), "stepscope: unknown ", g.what, " id ", id);
  Open& o = g.open[id];
  if (o.depth++ > 0) return;  // re-entered inside itself: the outer span counts
  o.t0 = now_ns();
  o.ev = record_event(o.t0);
  o.timed = timer_.timed();
  // A module's statistics are its training forwards: an eval forward of a sampled step (eval mode
  // often runs another path, e.g. beam search or no dropout) would mix two workloads in one mean.
  o.eval = g.kind == modules_.kind && fwd_depth_ > 0 && fwd_eval_;
  g.series.parent[id] = open_phase_name();
  if (opts_.nvtx) nvtx::push(g.phase, g.series.names[id].c_str(), step_index_);
}

template <typename G>
void Timeline::group_end(G& g, int id) {
  std::lock_guard<SpinLock> lock(mu_);
  TORCH_CHECK(id >= 0 && static_cast<size_t>(id) < g.open.size(), "stepscope: unknown ", g.what, " id ", id);
  Open& o = g.open[id];
  if (o.depth == 0 || --o.depth > 0) return;
  const int64_t now = now_ns();
  const EventRef ev = record_event(now);
  if (!warm_ && !discard_ && !o.eval) g.series.host[id].add(static_cast<double>(now - o.t0));
  // A span that crosses from a timed step into an untimed one (or back) has no device time, and
  // that is no dropped sample.
  if (timer_.timed() && o.timed && !o.eval) queue_or_drop(g.kind, id, {&o.ev, &ev});
  o.ev.reset();
  if (cur_.n_spans < StepRecord::kMaxSpans - StepRecord::kPartitionReserve) {
    const int8_t kind = g.kind == users_.kind ? SpanRecord::kUser : SpanRecord::kModule;
    cur_.spans[cur_.n_spans++] = SpanRecord{o.t0, now, id, 0, kind};
  } else {
    ++cur_.truncated;
  }
  if (opts_.nvtx) nvtx::pop();
}

const char* Timeline::open_phase_name() const {
  if (fwd_depth_ > 0 && fwd_eval_) return phase_name(Phase::kEvalForward);
  switch (state_) {
    case State::kIdle:
      return phase_name(Phase::kData);
    case State::kForward:
      return phase_name(Phase::kForward);
    case State::kAfterForward:
      return phase_name(Phase::kLoss);
    case State::kBackward:
      return phase_name(Phase::kBackward);
    case State::kOptimizer:
      return phase_name(Phase::kOptimizer);
    case State::kAfterBackward:
    case State::kAfterOptimizer:
      return phase_name(Phase::kOther);
  }
  return phase_name(Phase::kData);
}

int Timeline::user_series(const std::string& name) { return group_add(users_, name, kMaxUserSeries); }
void Timeline::user_begin(int id) { group_begin(users_, id); }
void Timeline::user_end(int id) { group_end(users_, id); }
int Timeline::register_module(const std::string& name) {
  return group_add(modules_, name, std::numeric_limits<size_t>::max());
}
void Timeline::module_begin(int id) { group_begin(modules_, id); }
void Timeline::module_end(int id) { group_end(modules_, id); }


void Timeline::device_time(const DeviceSpan& d, double ns) { stats_.add_device(d.kind, d.id, d.warm, ns); }

SpanRecord* Timeline::span_record(uint64_t serial, int slot) {
  // One of the newest in the ring (events resolve a step or two late), else the open step; a step
  // already pushed out of the ring, or cut by close(), is simply not found. The ring comes first:
  // a step's end pushes its record and then polls, while cur_ still carries the same serial, and
  // the pushed copy is the one that is kept.
  for (size_t k = ring_.size(); k-- > 0;) {
    StepRecord& r = ring_[k];
    if (r.serial == serial) return slot < r.n_spans ? &r.spans[slot] : nullptr;
    if (r.serial < serial) break;
  }
  if (serial == cur_.serial) return slot < cur_.n_spans ? &cur_.spans[slot] : nullptr;
  return nullptr;
}

std::vector<StepRecord> Timeline::recent_steps() const {
  std::lock_guard<SpinLock> g(mu_);
  std::vector<StepRecord> v;
  v.reserve(ring_.size());
  for (size_t i = 0; i < ring_.size(); ++i) v.push_back(ring_[i]);
  return v;
}

std::string Timeline::span_name(int kind, int id) const {
  std::lock_guard<SpinLock> g(mu_);
  const auto& names = kind == SpanRecord::kUser ? users_.series.names : modules_.series.names;
  TORCH_CHECK(kind != SpanRecord::kPartition && id >= 0 && static_cast<size_t>(id) < names.size(),
              "stepscope: no span name for kind ", kind, " id ", id);
  return names[id];
}

ScopedPhase::ScopedPhase(Timeline& tl, Phase p, int64_t batch) : tl_(tl), phase_(p) {
  switch (p) {
    case Phase::kForward:
      tl_.forward_begin(false, batch);
      break;
    case Phase::kBackward:
      open_ = tl_.backward_begin();
      break;
    case Phase::kOptimizer:
      tl_.optimizer_begin();
      break;
    default:
      TORCH_CHECK(false, "stepscope: ScopedPhase takes kForward, kBackward or kOptimizer (data, loss and other are "
                  "the gaps between them); got ", phase_name(p));
  }
}

ScopedPhase::ScopedPhase(Timeline& tl, const std::string& user_phase) : tl_(tl), phase_(Phase::kCount) {
  user_ = tl_.user_series(user_phase);
  tl_.user_begin(user_);
}

ScopedPhase::~ScopedPhase() {
  if (!open_) return;
  if (user_ >= 0) {
    tl_.user_end(user_);
    return;
  }
  switch (phase_) {
    case Phase::kForward:
      tl_.forward_end();
      break;
    case Phase::kBackward:
      tl_.backward_end();
      break;
    case Phase::kOptimizer:
      tl_.optimizer_end(true);
      break;
    default:
      break;
  }
}


}  // namespace stepscope::timing
