#include "timing/timeline.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>

#include "nvtx/nvtx.h"

namespace stepscope::timing {
namespace {

constexpr const char* kPhaseNames[] = {"data", "forward", "loss", "backward", "other", "optimizer", "step",
                                       "eval_forward"};
static_assert(sizeof(kPhaseNames) / sizeof(kPhaseNames[0]) == static_cast<size_t>(Phase::kCount));

constexpr size_t kMaxUserSeries = 256;  // distinct user phase names: each keeps two histograms

SeriesSummary summarize(const Series& s) {
  SeriesSummary r;
  r.count = s.stats.count();
  r.total = s.stats.total() * 1e-9;
  r.mean = s.stats.mean() * 1e-9;
  r.std = s.stats.std() * 1e-9;
  r.min = s.stats.min() * 1e-9;
  r.max = s.stats.max() * 1e-9;
  r.p50 = s.hist.quantile(0.50) * 1e-9;
  r.p90 = s.hist.quantile(0.90) * 1e-9;
  r.p99 = s.hist.quantile(0.99) * 1e-9;
  r.has_quantiles = true;
  return r;
}

SeriesSummary summarize(const Stats& s) {
  SeriesSummary r;
  r.count = s.count();
  r.total = s.total() * 1e-9;
  r.mean = s.mean() * 1e-9;
  r.std = s.std() * 1e-9;
  r.min = s.min() * 1e-9;
  r.max = s.max() * 1e-9;
  return r;
}

}  // namespace

const char* phase_name(Phase p) { return kPhaseNames[static_cast<int>(p)]; }

Timeline::Timeline(TimelineOptions opts)
    : opts_(opts),
      device_(opts.device && EventPool::available()),
      origin_(std::chrono::steady_clock::now()),
      pool_(opts.event_pool),
      ring_(static_cast<size_t>(std::max(1, opts.ring))),
      sampler_(opts.device_every) {
  // NVTX decides once per process whether a tool is attached; without one, no range call is made
  // at all (each boundary then touches neither the NVTX code nor the step name's formatting).
  opts_.nvtx = opts.nvtx && nvtx::tool_attached();
  std::lock_guard<SpinLock> g(mu_);
  open_locked();
}

Timeline::~Timeline() { close(); }

void Timeline::open() {
  std::lock_guard<SpinLock> g(mu_);
  if (!closed_) return;
  open_locked();
}

void Timeline::open_locked() {
  closed_ = false;
  if (device_ && !clock_.valid()) {
    // The one synchronisation, at attach and never again: once this event is complete the GPU's
    // queue on this stream is empty, so the next event (the first step's) is reached as soon as
    // it is recorded, and its host record time anchors the device clock (timing/device_clock.h).
    // The host cost of one record is measured first (auto device sampling), on the same stream.
    if (sampler_.auto_mode()) sampler_.set_record_ns(pool_.record_cost_ns(7));
    const int ref = pool_.record();
    const bool synced = ref >= 0 && pool_.synchronize(ref);
    pool_unref(ref);
    const int64_t now = now_ns();
    const int ev = record_event_if(now, true);  // the first step is always device-timed
    if (synced && ev >= 0) {
      clock_.anchor(static_cast<double>(now));
      anchor_ev_ = ev;
      pool_.ref(ev);
    }
    last_ns_ = now;
    last_ev_ = ev;
    sampler_.opened(events_);
    start_step(now, ev);
    return;
  }
  const int64_t now = now_ns();
  const int ev = record_event_if(now, sampler_.next_timed(step_index_ < opts_.warmup_steps));
  last_ns_ = now;
  last_ev_ = ev;  // the record's reference now belongs to "the last boundary"
  sampler_.opened(events_);
  start_step(now, ev);
}

bool Timeline::end_boundary_wanted() const {
  return dev_step_ || sampler_.next_timed(step_index_ + 1 < opts_.warmup_steps);
}

int Timeline::record_event_if(int64_t now, bool want) {
  if (!device_ || !want) return -1;
  int s = pool_.record();
  if (s < 0) {
    poll_locked();  // completed events free their slots; still nothing free: the GPU lags, drop
    s = pool_.record();
  }
  if (s >= 0) {
    pool_.stamp(s, now);
    ++events_;
  }
  // What device timing costs the host, measured where it is paid (an event record on a busy
  // stream costs far more than on the idle one measured at attach): the sampler's input.
  dev_cost_ns_ += now_ns() - now;
  return s;
}

void Timeline::queue(int kind, int id, int a0, int b0, int a1, int b1, int slot) {
  for (int s : {a0, b0, a1, b1})
    if (s >= 0) pool_.ref(s);
  pending_.push_back(DevSpan{kind, id, warm_, a0, b0, a1, b1, step_serial_, slot});
}

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

void Timeline::boundary(Phase closes, int64_t now, int ev, bool nvtx) {
  open_step_range();
  const int i = static_cast<int>(closes);
  const int64_t t0 = paused_ ? carry_t0_ : last_ns_;
  const double ns = static_cast<double>(carry_ns_ + (now - last_ns_));
  add_host(i, ns);
  step_phase_[i] += ns;
  int slot = -1;
  if (cur_.n_spans < StepRecord::kMaxSpans) {
    slot = cur_.n_spans++;
    cur_.spans[slot] = SpanRecord{t0, now, -1, static_cast<int16_t>(i), SpanRecord::kPartition};
  } else {
    ++cur_.truncated;
  }
  if (device_ && dev_step_) {
    if (paused_) {
      if (carry_a_ >= 0 && carry_b_ >= 0 && last_ev_ >= 0 && ev >= 0) {
        queue(0, i, carry_a_, carry_b_, last_ev_, ev);
      } else {
        ++dropped_;
      }
    } else if (last_ev_ >= 0 && ev >= 0) {
      queue(0, i, last_ev_, ev, -1, -1, slot);
    } else {
      ++dropped_;
    }
  }
  pool_unref(carry_a_);
  pool_unref(carry_b_);
  carry_a_ = carry_b_ = -1;
  carry_ns_ = 0;
  paused_ = false;
  pool_unref(last_ev_);
  last_ev_ = ev;  // takes over the record's reference
  last_ns_ = now;
  step_active_ = true;
  if (nvtx) end_cursor_range();  // the phase just closed: so is its NVTX range
}

void Timeline::add_host(int series, double ns) {
  if (warm_) {
    warm_sum_.host[series] += ns * 1e-9;
    return;
  }
  if (n_host_pending_ == kHostPending) fold_host();
  host_pending_[n_host_pending_++] = HostSample{series, ns};
}

void Timeline::fold_host() {
  for (int k = 0; k < n_host_pending_; ++k) host_[host_pending_[k].series].add(host_pending_[k].ns);
  n_host_pending_ = 0;
}

void Timeline::pool_unref(int slot) {
  if (slot >= 0) pool_.unref(slot);
}

void Timeline::end_cursor_range() {
  if (nvtx_cursor_ != 0) {
    nvtx::end(nvtx_cursor_);
    nvtx_cursor_ = 0;
  }
  if (pushed_) {
    // A forward or optimizer push whose end never came (the optimizer raised): pop it where it was
    // pushed; another thread's stack is not ours to pop.
    if (std::this_thread::get_id() == push_thread_) nvtx::pop();
    pushed_ = false;
  }
}

void Timeline::cursor_start(nvtx::Phase p) {
  if (opts_.nvtx) nvtx_cursor_ = nvtx::start(p, nullptr, step_index_);
}

void Timeline::cursor_push(nvtx::Phase p) {
  if (!opts_.nvtx) return;
  nvtx::push(p, nullptr, step_index_);
  pushed_ = true;
  push_thread_ = std::this_thread::get_id();
}

void Timeline::start_step(int64_t now, int ev) {
  step_t0_ = now;
  pool_unref(step_ev_);
  step_ev_ = ev;
  if (ev >= 0) pool_.ref(ev);
  std::fill(std::begin(step_phase_), std::end(step_phase_), 0.0);
  step_samples_ = 0;
  step_active_ = false;
  step_forward_ = false;
  in_closure_ = false;
  step_has_pause_ = false;
  cur_.serial = ++step_serial_;
  cur_.n_spans = 0;
  cur_.truncated = 0;
  state_ = State::kIdle;
  warm_ = step_index_ < opts_.warmup_steps;
  dev_step_ = device_ && sampler_.begin_step(warm_);
  if (capturing_ && step_index_ == opts_.capture_end) {
    nvtx::capture_end();
    capturing_ = false;
  }
  if (!capturing_ && step_index_ == opts_.capture_begin && opts_.capture_end > opts_.capture_begin) {
    nvtx::capture_begin();
    capturing_ = true;
  }
  // The step's NVTX range opens at its first boundary (boundary()), not here: a loop that stops,
  // or code run after the last step but before detach, must not show up as a step in the trace.
  cursor_start(nvtx::Phase::kData);
}

void Timeline::open_step_range() {
  if (!opts_.nvtx || nvtx_step_ != 0) return;
  char name[40];
  std::snprintf(name, sizeof(name), "step %lld", static_cast<long long>(step_index_));
  nvtx_step_ = nvtx::start(nvtx::Phase::kStep, name, step_index_);
}

void Timeline::finish_step(int64_t now, int ev) {
  double total = 0;
  for (int i = 0; i < kNumPartition; ++i) total += step_phase_[i];
  add_host(static_cast<int>(Phase::kStep), total);
  if (device_ && dev_step_) {
    // An eval pause inside the step cuts it in pieces; the device step would include the eval
    // work, so that step's device total is not sampled (its phases still are).
    if (!step_has_pause_) {
      if (step_ev_ >= 0 && ev >= 0) {
        queue(0, static_cast<int>(Phase::kStep), step_ev_, ev);
      } else {
        ++dropped_;
      }
    }
  }
  StepRecord& r = ring_.push();
  r.index = step_index_;
  r.serial = cur_.serial;
  r.t0 = step_t0_;
  r.t1 = now;
  for (int i = 0; i < kNumPartition; ++i) r.host[i] = step_phase_[i] * 1e-9;
  r.samples = step_samples_;
  r.n_spans = cur_.n_spans;
  r.truncated = cur_.truncated;
  r.warmup = warm_;
  r.device_timed = dev_step_;
  if (device_) read_device_memory(pool_.device(), &memory_);
  r.memory = memory_;
  std::copy_n(cur_.spans.begin(), cur_.n_spans, r.spans.begin());
  if (warm_) {
    ++warm_sum_.steps;
    warm_sum_.samples += step_samples_;
  } else {
    check_spike(total);
    if (dev_step_) ++device_steps_;
    ++steps_done_;
    samples_done_ += step_samples_;
    step_host_total_ += total;
  }
  if (nvtx_step_ != 0) {
    nvtx::end(nvtx_step_);
    nvtx_step_ = 0;
  }
  if (device_) {
    sampler_.end_step(warm_, dev_step_, total, events_, static_cast<double>(dev_cost_ns_), lag_min_ns_);
    lag_min_ns_ = std::numeric_limits<double>::infinity();
  }
  ++step_index_;
  const int64_t t_poll = device_ ? now_ns() : 0;
  poll_locked();
  if (device_) dev_cost_ns_ += now_ns() - t_poll;
  start_step(now, ev);
}

void Timeline::check_spike(double total) {
  // Multiplicative streaming median: each sample moves the estimate by a fixed factor towards
  // itself, so it settles where as many samples fall above as below (within about 6%), in O(1)
  // memory and a few multiplications per step.
  constexpr double kUp = 1.0625, kDown = 1.0 / 1.0625;
  auto track = [](double& m, double x) {
    if (m <= 0) {
      m = x;
    } else if (x > m) {
      m *= kUp;
    } else if (x < m) {
      m *= kDown;
    }
  };
  if (steps_done_ >= kSpikeMinSteps && total > kSpikeFactor * med_step_) {
    int grew = 0;
    double most = -1;
    for (int i = 0; i < kNumPartition; ++i) {
      const double excess = step_phase_[i] - med_phase_[i];
      if (excess > most) {
        most = excess;
        grew = i;
      }
    }
    SpikeRecord& sp = spikes_.push();
    sp.index = step_index_;
    sp.duration = total * 1e-9;
    sp.step_median = med_step_ * 1e-9;
    sp.phase = grew;
    sp.phase_time = step_phase_[grew] * 1e-9;
    sp.phase_median = med_phase_[grew] * 1e-9;
  }
  track(med_step_, total);
  for (int i = 0; i < kNumPartition; ++i) track(med_phase_[i], step_phase_[i]);
}

void Timeline::forward_begin(bool eval, int64_t batch) {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_) return;
  if (fwd_depth_++ > 0) return;  // the model called inside its own forward: one forward
  const int64_t now = now_ns();
  const int ev = record_event(now);
  fwd_eval_ = eval;
  if (eval) {
    flush_optimizer_begin();  // an eval forward inside the optimizer step is no closure
    if (!paused_) {
      // Cut the open training span here; it resumes at the next training boundary.
      paused_ = true;
      step_has_pause_ = true;
      carry_t0_ = last_ns_;
      carry_ns_ = now - last_ns_;
      carry_a_ = last_ev_;  // the last boundary's reference moves to the carry
      carry_b_ = ev;
      if (ev >= 0) pool_.ref(ev);
      last_ev_ = -1;
    }
    eval_t0_ = now;
    eval_ev_ = ev;
    if (opts_.nvtx) nvtx::push(nvtx::Phase::kEval, nullptr, step_index_);
    return;
  }
  Phase closes = Phase::kData;
  if (opt_deferred_) {
    // The model runs inside the optimizer's step: a closure. The optimizer's prelude joins data.
    pool_unref(opt_ev_);
    opt_ev_ = -1;
    opt_deferred_ = false;
    in_closure_ = true;
  } else if (in_closure_) {
    closes = Phase::kOptimizer;  // the closure called again (LBFGS): the optimizer worked in between
  }
  boundary(closes, now, ev);
  cursor_push(nvtx::Phase::kForward);
  if (batch > 0) step_samples_ += batch;
  step_forward_ = true;
  state_ = State::kForward;
}

void Timeline::forward_end() {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_ || fwd_depth_ == 0) return;
  if (--fwd_depth_ > 0) return;
  const int64_t now = now_ns();
  const int ev = record_event(now);
  if (fwd_eval_) {
    add_host(static_cast<int>(Phase::kEvalForward), static_cast<double>(now - eval_t0_));
    if (device_ && dev_step_) {
      if (eval_ev_ >= 0 && ev >= 0) {
        queue(0, static_cast<int>(Phase::kEvalForward), eval_ev_, ev);
      } else {
        ++dropped_;
      }
    }
    pool_unref(eval_ev_);
    eval_ev_ = -1;
    // The pause lasts until the next training boundary: training resumes from here.
    pool_unref(last_ev_);
    last_ev_ = ev;
    last_ns_ = now;
    if (opts_.nvtx) nvtx::pop();
    return;
  }
  boundary(Phase::kForward, now, ev);
  cursor_start(nvtx::Phase::kLoss);
  state_ = State::kAfterForward;
}

bool Timeline::backward_begin() {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_ || state_ == State::kBackward) return false;
  flush_optimizer_begin();
  const int64_t now = now_ns();
  const int ev = record_event(now);
  boundary(Phase::kLoss, now, ev);
  cursor_start(nvtx::Phase::kBackward);
  state_ = State::kBackward;
  return true;
}

void Timeline::backward_end() {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_ || state_ != State::kBackward) return;
  const int64_t now = now_ns();
  const int ev = record_event(now);
  boundary(Phase::kBackward, now, ev);
  cursor_start(in_closure_ ? nvtx::Phase::kOptimizer : nvtx::Phase::kOther);
  state_ = State::kAfterBackward;
}

void Timeline::optimizer_begin() {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_ || state_ == State::kOptimizer) return;
  if (fwd_depth_ > 0) {
    // Inside a forward marked by hand around the optimizer step: the closure is that forward.
    if (!fwd_eval_) in_closure_ = true;
    return;
  }
  const int64_t now = now_ns();
  const int ev = record_event(now);
  if (in_closure_) {  // after the closure ran: an ordinary boundary
    boundary(Phase::kOther, now, ev);
  } else {
    // Whether this span is `other` or the prelude of a closure's `data` is known at the next
    // forward or at optimizer_end; the NVTX range cannot wait, so it shows the optimizer call.
    open_step_range();
    end_cursor_range();
    opt_deferred_ = true;
    opt_ns_ = now;
    opt_ev_ = ev;  // the record's reference waits here
  }
  cursor_push(nvtx::Phase::kOptimizer);
  state_ = State::kOptimizer;
}

void Timeline::flush_optimizer_begin() {
  if (!opt_deferred_) return;
  opt_deferred_ = false;
  boundary(Phase::kOther, opt_ns_, opt_ev_, false);  // the optimizer's NVTX range stays open
  opt_ev_ = -1;  // its reference now belongs to the last boundary
}

void Timeline::optimizer_end(bool end_step) {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_) return;
  // A closure step ends here from wherever its closure left off (backward end, usually).
  const bool closure_end = in_closure_ && fwd_depth_ == 0 && state_ != State::kBackward;
  if (state_ != State::kOptimizer && !closure_end) return;
  const int64_t now = now_ns();
  const int ev = end_step ? record_event_if(now, end_boundary_wanted()) : record_event(now);
  flush_optimizer_begin();
  boundary(Phase::kOptimizer, now, ev);
  in_closure_ = false;
  if (end_step) {
    finish_step(now, ev);
  } else {
    cursor_start(nvtx::Phase::kOther);
    state_ = State::kAfterOptimizer;
  }
}

bool Timeline::step() {
  std::lock_guard<SpinLock> g(mu_);
  TORCH_CHECK(fwd_depth_ == 0, "stepscope: step() called inside the model's forward; call it after the "
              "optimizer step (or where the step ends)");
  if (closed_) return false;
  flush_optimizer_begin();
  if (!step_active_) return false;
  const int64_t now = now_ns();
  const int ev = record_event_if(now, end_boundary_wanted());
  boundary(Phase::kOther, now, ev);
  finish_step(now, ev);
  return true;
}

bool Timeline::forward_seen() const {
  std::lock_guard<SpinLock> g(mu_);
  return step_forward_;
}

template <typename G>
int Timeline::group_add(G& g, const std::string& name, size_t limit) {
  std::lock_guard<SpinLock> lock(mu_);
  for (size_t i = 0; i < g.names.size(); ++i)
    if (g.names[i] == name) return static_cast<int>(i);
  TORCH_CHECK(g.names.size() < limit, "stepscope: more than ", limit, " distinct ", g.what,
              " names; phase names must be fixed labels, not per-step strings");
  g.names.push_back(name);
  g.host.emplace_back();
  g.dev.emplace_back();
  g.open.emplace_back();
  g.parent.push_back(nullptr);
  return static_cast<int>(g.names.size() - 1);
}

template <typename G>
void Timeline::group_begin(G& g, int id) {
  std::lock_guard<SpinLock> lock(mu_);
  TORCH_CHECK(id >= 0 && static_cast<size_t>(id) < g.open.size(), "stepscope: unknown ", g.what, " id ", id);
  Open& o = g.open[id];
  if (o.depth++ > 0) return;  // re-entered inside itself: the outer span counts
  o.t0 = now_ns();
  o.ev = record_event(o.t0);
  o.timed = dev_step_;
  g.parent[id] = open_phase_name();
  if (opts_.nvtx) nvtx::push(g.phase, g.names[id].c_str(), step_index_);
}

template <typename G>
void Timeline::group_end(G& g, int id) {
  std::lock_guard<SpinLock> lock(mu_);
  TORCH_CHECK(id >= 0 && static_cast<size_t>(id) < g.open.size(), "stepscope: unknown ", g.what, " id ", id);
  Open& o = g.open[id];
  if (o.depth == 0 || --o.depth > 0) return;
  const int64_t now = now_ns();
  const int ev = record_event(now);
  if (!warm_) g.host[id].add(static_cast<double>(now - o.t0));
  // A span that crosses from a timed step into an untimed one (or back) has no device time, and
  // that is no dropped sample.
  if (device_ && dev_step_ && o.timed) {
    if (o.ev >= 0 && ev >= 0) {
      queue(g.kind, id, o.ev, ev);
    } else {
      ++dropped_;
    }
  }
  pool_unref(o.ev);
  pool_unref(ev);
  o.ev = -1;
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

void Timeline::poll() {
  std::lock_guard<SpinLock> g(mu_);
  poll_locked();
}

void Timeline::place_on_host_clock(const DevSpan& d, float m0, float m1, double seen) {
  // The boundary that closed the phase is the span's last event; the event before it opened the
  // phase. When the opening event is the clock's anchor (the usual chain: consecutive boundaries),
  // the phase's own elapsed time places it. Otherwise (the first phase of a device-timed step after
  // untimed ones, an eval pause, a dropped sample, a re-attach) the clock re-anchors at the opening
  // event first: one more elapsed-time query against the anchor places it, clamped into its own
  // window (DeviceClock::place), so that the phase then chains from a boundary of its own step and
  // the gap's drift is corrected where it can be, not carried into the phase.
  const bool two = d.a1 >= 0;
  const int open = two ? d.a1 : d.a0, close = two ? d.b1 : d.b0;
  if (open != anchor_ev_) {
    const float m = pool_.elapsed_ms(anchor_ev_, open);
    if (m < 0) return;  // failed, or recorded before the anchor: no lag sample, keep the anchor
    clock_.place(m * 1e6, static_cast<double>(pool_.stamp(open)), seen);
    pool_.ref(open);
    pool_unref(anchor_ev_);
    anchor_ev_ = open;
  }
  const double elapsed_ms = two ? m1 : m0;
  const double lag = clock_.place(elapsed_ms * 1e6, static_cast<double>(pool_.stamp(close)), seen);
  if (!d.warm) lag_[d.id].add(std::max(lag, 1.0));  // the histogram's floor is 1 ns
  lag_min_ns_ = std::min(lag_min_ns_, lag);
  if (!two && d.slot >= 0) {
    // The span's device interval for the trace: it closed at the placed time, and opened the
    // phase's own elapsed time before.
    if (SpanRecord* r = span_record(d.serial, d.slot)) {
      const double opened = clock_.anchor_ns() - m0 * 1e6;
      r->lag1_us = static_cast<float>(lag * 1e-3);
      r->lag0_us = static_cast<float>((opened - static_cast<double>(pool_.stamp(open))) * 1e-3);
    }
  }
  pool_.ref(close);
  pool_unref(anchor_ev_);
  anchor_ev_ = close;
}

void Timeline::poll_locked() {
  // In order, stopping at the first span still in flight: cheap, and a span recorded later on the
  // same stream cannot be complete before it anyway.
  const double seen = static_cast<double>(now_ns());
  while (!pending_.empty()) {
    const DevSpan& d = pending_.front();
    bool failed = false;
    for (int s : {d.a0, d.b0, d.a1, d.b1}) {
      if (s < 0) continue;
      const int q = pool_.query(s);
      if (q == 0) return;
      if (q < 0) failed = true;
    }
    double ms = 0;
    if (!failed) {
      const float m0 = pool_.elapsed_ms(d.a0, d.b0);
      const float m1 = d.a1 >= 0 ? pool_.elapsed_ms(d.a1, d.b1) : 0.f;
      failed = m0 < 0 || m1 < 0;
      ms = static_cast<double>(m0) + static_cast<double>(m1);
      if (!failed && d.kind == 0 && d.id < kNumPartition && anchor_ev_ >= 0) place_on_host_clock(d, m0, m1, seen);
    }
    if (failed) {
      ++dropped_;
    } else {
      const double ns = ms * 1e6;
      if (d.warm) {
        if (d.kind == 0) {
          warm_sum_.device[d.id] += ns * 1e-9;
          ++warm_sum_.device_count[d.id];
        }
      } else if (d.kind == 0) {
        dev_[d.id].add(ns);
      } else if (d.kind == users_.kind) {
        users_.dev[d.id].add(ns);
      } else {
        modules_.dev[d.id].add(ns);
      }
    }
    for (int s : {d.a0, d.b0, d.a1, d.b1}) pool_unref(s);
    pending_.pop_front();
  }
}

void Timeline::close() {
  std::lock_guard<SpinLock> g(mu_);
  if (closed_) return;
  end_cursor_range();
  if (nvtx_step_ != 0) {
    nvtx::end(nvtx_step_);
    nvtx_step_ = 0;
  }
  if (capturing_) {
    nvtx::capture_end();
    capturing_ = false;
  }
  // The open step is partial (the loop stopped or raised mid-step): it is not recorded.
  for (int* s : {&last_ev_, &step_ev_, &carry_a_, &carry_b_, &eval_ev_, &opt_ev_}) {
    pool_unref(*s);
    *s = -1;
  }
  for (auto* v : {&users_.open, &modules_.open})
    for (Open& o : *v) {
      pool_unref(o.ev);
      o = Open{};
    }
  paused_ = false;
  carry_ns_ = 0;
  opt_deferred_ = false;
  in_closure_ = false;
  fwd_depth_ = 0;
  state_ = State::kIdle;
  closed_ = true;
  fold_host();  // the partial step's phases still count
  poll_locked();
}

int64_t Timeline::steps() const {
  std::lock_guard<SpinLock> g(mu_);
  return steps_done_ + warm_sum_.steps;
}

Report Timeline::report() {
  std::lock_guard<SpinLock> g(mu_);
  poll_locked();
  fold_host();
  Report r;
  r.device = device_;
  for (int i = 0; i < static_cast<int>(Phase::kCount); ++i)
    r.phases.push_back(NamedSummary{kPhaseNames[i], summarize(host_[i]), summarize(dev_[i])});
  for (size_t i = 0; i < users_.names.size(); ++i)
    r.user.push_back(
        NamedSummary{users_.names[i], summarize(users_.host[i]), summarize(users_.dev[i]), users_.parent[i]});
  for (size_t i = 0; i < modules_.names.size(); ++i)
    r.modules.push_back(NamedSummary{modules_.names[i], summarize(modules_.host[i]), summarize(modules_.dev[i])});
  r.steps = steps_done_;
  r.samples = samples_done_;
  r.step_host_total = step_host_total_ * 1e-9;
  r.dropped_device_samples = dropped_;
  r.pending_device_samples = static_cast<int64_t>(pending_.size());
  r.warmup = warm_sum_;
  r.memory = memory_;
  {
    int64_t prev = -1, rises = 0, n = 0;
    for (size_t k = 0; k < ring_.size(); ++k) {
      const int64_t a = ring_[k].memory.allocated;
      if (a < 0) continue;
      if (n == 0) r.memory_trend.first = a;
      if (prev >= 0 && a > prev) ++rises;
      prev = a;
      ++n;
    }
    r.memory_trend.steps = n;
    r.memory_trend.last = prev;
    r.memory_trend.rising_fraction = n > 1 ? static_cast<double>(rises) / static_cast<double>(n - 1) : 0.0;
  }
  if (device_) {
    // Named by the boundary that closes each phase (diagnose.PHASE_BOUNDS reads these names).
    static constexpr const char* kBoundary[kNumPartition] = {"forward_begin", "forward_end", "backward_begin",
                                                             "backward_end", "optimizer_begin", "optimizer_end"};
    for (int i = 0; i < kNumPartition; ++i) r.lag.push_back(NamedSummary{kBoundary[i], summarize(lag_[i]), {}});
  }
  for (size_t i = 0; i < spikes_.size(); ++i) r.spikes.push_back(spikes_[i]);
  r.spikes_total = static_cast<int64_t>(spikes_.pushed());
  r.device_steps = device_steps_;
  r.device_every = device_ ? sampler_.every() : 0;
  r.device_every_auto = device_ && sampler_.auto_mode();
  r.device_events = events_;
  r.event_record_cost = sampler_.record_ns() * 1e-9;
  return r;
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
  const auto& names = kind == SpanRecord::kUser ? users_.names : modules_.names;
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

std::string format_summary(const Report& r) {
  const double step_total = r.phases[static_cast<int>(Phase::kStep)].host.total;
  const double dev_step_total = r.phases[static_cast<int>(Phase::kStep)].device.total;
  std::ostringstream o;
  char line[256];
  std::snprintf(line, sizeof(line), "%-14s %7s %9s %9s %9s %9s %10s %7s", "phase", "count", "mean ms", "p50 ms",
                "p90 ms", "p99 ms", "total s", "share");
  o << line << (r.device ? "   device: mean ms  p50 ms  total s  share" : "") << '\n';
  auto row = [&](const NamedSummary& s, bool share) {
    std::snprintf(line, sizeof(line), "%-14s %7lld %9.3f %9.3f %9.3f %9.3f %10.4f %6.1f%%", s.name.c_str(),
                  static_cast<long long>(s.host.count), s.host.mean * 1e3, s.host.p50 * 1e3, s.host.p90 * 1e3,
                  s.host.p99 * 1e3, s.host.total, share && step_total > 0 ? 100.0 * s.host.total / step_total : 0.0);
    o << line;
    if (r.device) {
      std::snprintf(line, sizeof(line), "   %15.3f %7.3f %8.4f %5.1f%%", s.device.mean * 1e3, s.device.p50 * 1e3,
                    s.device.total,
                    share && dev_step_total > 0 ? 100.0 * s.device.total / dev_step_total : 0.0);
      o << line;
    }
    o << '\n';
  };
  for (int i = 0; i < static_cast<int>(Phase::kCount); ++i) {
    if (r.phases[i].host.count == 0 && i != static_cast<int>(Phase::kStep)) continue;
    row(r.phases[i], i <= static_cast<int>(Phase::kStep));
  }
  for (const auto& u : r.user) row(u, true);
  std::snprintf(line, sizeof(line), "steps %lld, samples/s %.1f, dropped device samples %lld\n",
                static_cast<long long>(r.steps), r.step_host_total > 0 ? r.samples / r.step_host_total : 0.0,
                static_cast<long long>(r.dropped_device_samples));
  o << line;
  if (r.device && r.device_every > 1) {
    std::snprintf(line, sizeof(line), "device: one step in %lld%s, %lld of %lld steps\n",
                  static_cast<long long>(r.device_every), r.device_every_auto ? " (auto)" : "",
                  static_cast<long long>(r.device_steps), static_cast<long long>(r.steps));
    o << line;
  }
  return o.str();
}

namespace {
// "SSP1": the first word of a packed buffer, so that a buffer from another build or of another
// kind is refused instead of read as counts.
constexpr double kPackedTag = 1397969969.0;
}  // namespace

std::vector<double> Timeline::pack() {
  std::lock_guard<SpinLock> g(mu_);
  poll_locked();
  fold_host();
  std::vector<double> v(kPackedWords, 0.0);
  v[0] = kPackedTag;
  v[1] = static_cast<double>(Phase::kCount);
  v[2] = LogHistogram::kBuckets;
  v[3] = device_ ? 1.0 : 0.0;
  v[4] = static_cast<double>(steps_done_);
  v[5] = static_cast<double>(samples_done_);
  v[6] = step_host_total_;
  v[7] = static_cast<double>(dropped_);
  v[8] = static_cast<double>(pending_.size());
  v[9] = static_cast<double>(device_steps_);
  double* p = v.data() + kPackedHeader;
  for (const auto* series : {&host_, &dev_})
    for (const Series& s : *series) {
      s.stats.to_moments(p);
      p[Stats::kMoments] = s.hist.min();
      p[Stats::kMoments + 1] = s.hist.max();
      const auto& c = s.hist.buckets();
      for (int i = 0; i < LogHistogram::kBuckets; ++i) p[Stats::kMoments + 2 + i] = static_cast<double>(c[i]);
      p += kPackedSeries;
    }
  return v;
}

Report report_from_packed(const double* buffers, int64_t n) {
  if (n < 1) throw std::invalid_argument("stepscope: report_from_packed needs at least one buffer");
  constexpr int kSeries = static_cast<int>(Phase::kCount);
  std::array<Series, kSeries> host, dev;
  Report r;
  double step_ns = 0;
  for (int64_t b = 0; b < n; ++b) {
    const double* v = buffers + b * kPackedWords;
    if (v[0] != kPackedTag || v[1] != kSeries || v[2] != LogHistogram::kBuckets)
      throw std::invalid_argument("stepscope: buffer " + std::to_string(b) +
                                  " is not a packed Timeline of this build (layout tag, phase or bucket count differ)");
    r.device = r.device || v[3] != 0;
    r.steps = std::max(r.steps, static_cast<int64_t>(v[4]));
    r.samples += static_cast<int64_t>(v[5]);
    step_ns = std::max(step_ns, v[6]);
    r.dropped_device_samples += static_cast<int64_t>(v[7]);
    r.pending_device_samples += static_cast<int64_t>(v[8]);
    r.device_steps += static_cast<int64_t>(v[9]);
    const double* p = v + kPackedHeader;
    for (auto* series : {&host, &dev})
      for (Series& s : *series) {
        s.stats.merge(Stats::from_moments(p));
        s.hist.merge(LogHistogram::from_counts(p + Stats::kMoments + 2, p[Stats::kMoments], p[Stats::kMoments + 1]));
        p += kPackedSeries;
      }
  }
  r.step_host_total = step_ns * 1e-9;
  for (int i = 0; i < kSeries; ++i) r.phases.push_back(NamedSummary{kPhaseNames[i], summarize(host[i]), summarize(dev[i])});
  return r;
}

}  // namespace stepscope::timing
