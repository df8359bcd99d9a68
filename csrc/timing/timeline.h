// The training-step Timeline: hooks (Python) or a C++ loop report phase boundaries; the
// Timeline turns them into a partition of each step with no unexplained time, host times from
// std::chrono::steady_clock, device times from pooled CUDA events, NVTX ranges, and bounded
// statistics.
//
//   stepscope::timing::Timeline tl({.device = torch::cuda::is_available()});
//   for (...) {
//     { stepscope::timing::ScopedPhase p(tl, stepscope::timing::Phase::kForward); out = model(x); }
//     loss = criterion(out, y);
//     { stepscope::timing::ScopedPhase p(tl, stepscope::timing::Phase::kBackward); loss.backward(); }
//     { stepscope::timing::ScopedPhase p(tl, stepscope::timing::Phase::kOptimizer); opt.step(); }  // ends the step
//   }
//   std::cout << stepscope::timing::format_summary(tl.report());
//
// Components. The Timeline is the facade: one lock over the step's partition and NVTX ranges
// (here, timeline.cpp), the named spans and the ring of recent steps (timeline_spans.cpp), the
// device side (DeviceTimer, timing/device_timer.h: pooled events held by EventRef, queue lag,
// sampling) and the statistics (PhaseStats, timing/phase_stats.h: series, warm-up, spikes, the
// Report and packed buffers). A loop that reports hook calls rather than boundaries (several
// optimizers, nested or raised optimizer steps, interrupted forwards, other threads) puts a
// StepMachine (timing/step_machine.h) in front of it.
//
// Partition. Every boundary closes the span open since the previous one and names it by the
// boundary that closes it: forward begin closes `data`, forward end closes `forward`, backward
// begin closes `loss`, backward end closes `backward`, optimizer begin closes `other`, optimizer
// end closes `optimizer` and ends the step (so does step(), closing `other`). Spans therefore add
// up to the step exactly. Gradient accumulation is several forward/backward pairs in one step;
// the gap between a backward end and the next forward is that micro-batch's `data`.
// `loss` also holds autograd's start-up before the gradient reaches the model's output (the loss's
// own backward nodes; for a long unrolled graph the engine's set-up: a 999-step LSTM showed 0.67 s
// of loss against 0.025 s of criterion).
// Eval forwards (no grad, inference mode, eval()) are timed as `eval_forward` and the time from
// the first eval forward to the next training boundary is left out of the training step. The
// evaluation stretch, from its first eval forward to the end of its last one, is the `eval` series
// (the time between eval forwards included, so that nothing of an evaluation is in no phase); the
// time after its last forward up to the training boundary stays in the training phase it paused.
// Per-module spans inside an eval forward are not counted in the module statistics (a module
// timed in training keeps training figures only).
//
// Threads. Backward boundaries arrive on autograd's thread; every public method takes the
// Timeline's one lock (a spin lock, timing/spin_lock.h).
// NVTX: the step, data, loss, backward and other ranges are start/end ranges (they may end on
// another thread); forward, optimizer, eval, module and user ranges are push/pop (they begin and
// end on the calling thread). The exact sequence of one training step (payload = step N):
//   step start       start(kData)
//   forward_begin    start(kStep, "step N"), end(data), push(kForward)
//                                                      forward_end     pop(), start(kLoss)
//   backward_begin   end(loss), start(kBackward)       backward_end    end(backward), start(kOther)
//   optimizer_begin  end(other), push(kOptimizer)
//   optimizer_end    pop(), end(step), [capture_end() if N+1 == capture_end,
//                    capture_begin() if N+1 == capture_begin], then step N+1 starts as above
// The step range opens at the step's first training boundary (usually forward_begin), so the
// trace never holds a step that did not happen (after the last step, before detach); the data
// range before it is its own range. (step() instead of an optimizer: end(other), end(step), ...).
// Closure-driven steps (LBFGS, Lightning's automatic optimization: the model runs inside
// optimizer.step(closure)). A training forward that begins after optimizer_begin and before
// optimizer_end makes the step a closure step: optimizer_begin's statistics wait for that
// forward or for optimizer_end, so the time up to the closure's forward is `data`, and inside
// the closure data/forward/loss/backward are as above; `optimizer` is the time from the
// closure's backward end to optimizer_end. A closure called again in the same step (LBFGS's
// line search) closes `optimizer` at its forward: the optimizer's work between closure calls.
// One optimizer_begin/optimizer_end pair is one step however many closure calls it holds. An
// optimizer_begin inside an open forward (a forward marked by hand around the optimizer step,
// as Lightning's callback does) also opens a closure step and closes nothing. NVTX in a closure
// step: optimizer_begin end(data), push(kOptimizer) as usual; the closure's forward_begin pops
// it (the optimizer's prelude, counted as data) and pushes kForward; the closure's backward_end
// end(backward), start(kOptimizer); optimizer_end or the next closure forward ends it.
// Eval forwards: push(kEval)/pop();
// modules: push(kModule, name)/pop(); user phases: push(kUser, name)/pop(). close() ends what is
// open. All of it lives in start_step, open_step_range, finish_step, cursor_start, cursor_push,
// end_cursor_range and the eval methods of timeline.cpp, and the user/module methods of
// timeline_spans.cpp. With options.nvtx false none is emitted.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "nvtx/nvtx.h"
#include "timing/device_timer.h"
#include "timing/event_pool.h"
#include "timing/phase_stats.h"
#include "phases.h"
#include "timing/ring.h"
#include "timing/spin_lock.h"
#include "timing/stats.h"

namespace stepscope::timing {

struct TimelineOptions {
  bool device = false;       // record CUDA events (ignored without CUDA at build or run time)
  bool nvtx = true;          // emit NVTX ranges through stepscope::nvtx (when a tool is attached)
  int ring = 256;            // steps kept raw for traces: 1 .. kMaxRing (kRingSlotBytes each)
  int event_pool = 2048;     // CUDA events at most in flight
  int64_t capture_begin = -1;  // nvtx::capture_begin() when step `capture_begin` starts ...
  int64_t capture_end = -1;    // ... and capture_end() when step `capture_end` starts (range semantics)
  // The first `warmup_steps` steps are kept out of every statistic (histograms, moments, shares,
  // samples/s, spikes) and only totalled apart (Report::warmup): compilation, CUDA-graph
  // recording, autotuning and allocator growth happen there and would skew every mean.
  int64_t warmup_steps = 0;
  // Device timing on one step in `device_every` (timing/device_sampling.h); 0 = auto: as often as
  // keeps the event records' host cost near 1% of the step. Host times are kept on every step.
  int64_t device_every = 0;
};

struct SpanRecord {  // 32 bytes: the ring holds kMaxSpans of these per step
  enum Kind : int8_t { kPartition = 0, kUser = 1, kModule = 2 };
  int64_t t0 = 0, t1 = 0;  // ns since the Timeline was created
  int32_t id = -1;         // user phase or module id (span_name() names it)
  int16_t phase = 0;       // Phase (kPartition spans)
  int8_t kind = kPartition;
  // CUDA (partition spans): the queue lag at the span's opening and closing boundary, in us, so
  // that the GPU ran the phase over [t0 + lag0, t1 + lag1] on the host clock (DeviceClock); NaN
  // until its events are resolved, and without device timing.
  float lag0_us = std::numeric_limits<float>::quiet_NaN(), lag1_us = std::numeric_limits<float>::quiet_NaN();
};
static_assert(sizeof(SpanRecord) == 32);

struct StepRecord {
  static constexpr int kMaxSpans = 64;
  // User and module spans stop being kept this many slots before the end, so that a model with
  // many modules cannot push the step's own partition spans out of the record.
  static constexpr int kPartitionReserve = 16;
  int64_t index = 0;
  uint64_t serial = 0;     // unique per started step (a step cut by close() keeps its index, not this)
  int64_t t0 = 0, t1 = 0;  // ns since the Timeline was created
  double host[kNumPartition] = {};  // seconds per phase
  int64_t samples = 0;
  int n_spans = 0;
  int truncated = 0;  // spans beyond kMaxSpans
  bool warmup = false;
  bool device_timed = false;  // CUDA events were recorded for this step (device sampling)
  DeviceMemory memory;  // CUDA allocator counters at the step's end (-1 without device timing)
  std::array<SpanRecord, kMaxSpans> spans;
};

// The ring's ceiling: every slot is allocated up front (one StepRecord each), so the ring is what
// sets the Timeline's memory. 65536 slots are about 143 MB.
constexpr int kMaxRing = 1 << 16;
constexpr size_t kRingSlotBytes = sizeof(StepRecord);
// `ring` checked as it enters (TimelineOptions, Monitor): throws c10::ValueError naming it.
int check_ring(int64_t ring);

class Timeline : private DeviceSink {
 public:
  explicit Timeline(TimelineOptions opts = {});
  ~Timeline();
  Timeline(const Timeline&) = delete;
  Timeline& operator=(const Timeline&) = delete;

  // Boundaries. eval: the forward runs without grad / in inference mode / in eval(); batch:
  // samples in it (< 0: unknown). Nested forwards (a model called inside itself) are ignored.
  void forward_begin(bool eval = false, int64_t batch = -1);
  void forward_end();
  bool backward_begin();  // false when a backward is already open (a second output's hook)
  void backward_end();
  void optimizer_begin();
  // end_step=false: more optimizers step in this step (several optimizers given).
  void optimizer_end(bool end_step = true);
  // Ends the step where no optimizer hook does (GradScaler skipping). A no-op when nothing
  // happened since the last step ended. Returns whether a step ended.
  bool step();
  // Whether the open step has seen a training forward (a Monitor on global optimizer hooks
  // ignores optimizers stepping without its model).
  bool forward_seen() const;

  int user_series(const std::string& name);  // index for user_begin/user_end
  void user_begin(int id);
  void user_end(int id);
  int register_module(const std::string& name);
  void module_begin(int id);
  void module_end(int id);

  // Resolves completed CUDA events (cudaEventQuery only); called at each step end.
  void poll();
  // Closes open NVTX ranges and the capture window and forgets the open step (detach); the
  // statistics stay readable. open() starts a fresh step clock (attach again).
  void close();
  void open();

  // Statistics so far; with `since`, those of the steps after that snapshot (see snapshot()).
  Report report(const TimelineSnapshot* since = nullptr);
  // The raw statistics behind report()'s phases as kPackedWords doubles (see report_from_packed);
  // with `since`, those of the steps after that snapshot, so that ranks can gather an interval.
  std::vector<double> pack(const TimelineSnapshot* since = nullptr);

  // Interval statistics. A snapshot marks a point between steps: report(snap) then gives the figures
  // of the steps that ended after it, as a fresh Timeline fed those steps would (phases, step,
  // shares, samples/s, spikes, user phases and modules; warm-up steps never count). Counts, totals
  // and histogram buckets subtract exactly (so do the quantiles); means and standard deviations come
  // from reversing the moments' merge (exact up to rounding); an interval's min and max are exact
  // where it renewed them, else the value of its lowest / highest occupied histogram bucket (within
  // LogHistogram::kRelativeError), and unknown (NaN) for modules, which keep no histogram. A snapshot
  // taken inside a step (after its first boundary) waits for that step's end: the interval then
  // begins with the next step, so that no step is split between two intervals. Device samples resolve
  // a step or two late: those of steps before the snapshot still pending at it
  // (Report::pending_device_samples) count in the interval. Costs one copy of the statistics, no
  // device synchronisation and nothing per step.
  std::shared_ptr<TimelineSnapshot> snapshot();
  // Forgets every statistic (phases, user phases, modules, counts, warm-up totals, spikes, lags, the
  // ring of recent steps), keeping the step clock, the step index (NVTX payloads, capture window),
  // device sampling and the registered names. A step open at the reset (one whose first boundary
  // came before it) is not counted when it ends; device samples of earlier steps are dropped when
  // they resolve. Snapshots taken before a reset give the figures since the reset.
  void reset();
  std::vector<StepRecord> recent_steps() const;
  // The name of a user (SpanRecord::kUser) or module (kModule) span's id.
  std::string span_name(int kind, int id) const;
  int64_t steps() const;  // every completed step, warm-up included
  // The step under way is kept out of every statistic as a warm-up step is (totalled apart in
  // Report::warmup): a step slowed on purpose, the Monitor counting its FLOPs. Boundaries it
  // already recorded stay counted: call it before the step's first boundary.
  void keep_out_step();
  // The index of the step under way (NVTX payloads, recent_steps' "step"; not reset by reset()).
  int64_t step_index() const;
  bool device() const { return timer_.enabled(); }
  uint64_t id() const { return id_; }  // unique per Timeline in the process (never reused)

 private:
  struct Open {  // an open user or module span
    int64_t t0 = 0;
    EventRef ev;
    int depth = 0;
    bool timed = false;  // began on a device-timed step
    bool eval = false;   // began inside an eval forward: not counted (modules)
  };
  enum class State { kIdle, kForward, kAfterForward, kBackward, kAfterBackward, kOptimizer, kAfterOptimizer };

  int64_t now_ns() const {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - origin_).count();
  }
  // An event for a boundary of the open step when it is device-timed (DeviceTimer::record).
  EventRef record_event(int64_t now) { return timer_.record(now, timer_.timed()); }
  // The step-ending boundary also opens the next step: it records when either step is timed.
  bool end_boundary_wanted() const {
    return timer_.timed() || timer_.next_timed(step_index_ + 1 < opts_.warmup_steps);
  }
  // Records the phase and ends its NVTX range (with nvtx false the range is left open: a
  // deferred optimizer_begin recorded at optimizer_end, whose optimizer range is open).
  void boundary(Phase closes, int64_t now, EventRef ev, bool nvtx = true);
  void finish_step(int64_t now);  // at the step-ending boundary, whose event is ev_.last
  void flush_optimizer_begin();  // records a deferred optimizer_begin as the end of `other`
  void start_step(int64_t now, const EventRef& ev);
  void end_cursor_range();
  void cursor_start(nvtx::Phase p);
  void cursor_push(nvtx::Phase p);
  void open_locked();
  void open_step_range();
  void add_host(int series, double ns) {
    if (!discard_) stats_.add_host(series, ns, warm_);  // none of a step cut by reset()
  }
  const char* open_phase_name() const;
  void fold_host() { stats_.fold(); }
  // A device span of the open step over these events (DeviceTimer::queue).
  void queue_or_drop(int kind, int id, std::initializer_list<const EventRef*> events, int slot = -1) {
    timer_.queue(kind, id, warm_, step_serial_, events, slot);
  }
  // DeviceSink: resolved device times into the statistics, and the ring's span records.
  void device_time(const DeviceSpan& d, double ns) override;
  SpanRecord* span_record(uint64_t serial, int slot) override;
  void poll_locked() { timer_.poll(); }
  void fill_snapshot(TimelineSnapshot& s) const;
  void fill_waiting_snapshots();  // at the end of the step they were taken in
  Report report_locked(const TimelineSnapshot* since);
  // The snapshot report(since) and pack(since) subtract: nullptr for everything so far (none given,
  // or taken before the last reset), `scratch` filled now for one still waiting for its step's end.
  const TimelineSnapshot* base_of(const TimelineSnapshot* since, TimelineSnapshot& scratch) const;
  template <typename G>
  int group_add(G& g, const std::string& name, size_t limit);
  template <typename G>
  void group_begin(G& g, int id);
  template <typename G>
  void group_end(G& g, int id);

  TimelineOptions opts_;
  uint64_t id_;
  std::chrono::steady_clock::time_point origin_;
  mutable SpinLock mu_;
  DeviceTimer timer_;  // before every EventRef below, which release into its pool

  // The statistics (phases, user phases, modules, counts, warm-up, spikes; folded at close(),
  // report() and when its buffer of host samples fills).
  PhaseStats stats_;
  // User phases and per-module spans: named, re-entrant (an inner re-entry counts once), timed
  // on the host and, on CUDA, by an event pair. User phases keep histograms (Series); modules
  // keep moments only (Stats), so that a model with thousands of modules stays small.
  template <typename StatT>
  struct SpanGroup {
    int kind;          // DeviceSpan kind: kUser, kModule
    nvtx::Phase phase;
    const char* what;  // for error messages
    NamedSeries<StatT>& series;  // in stats_
    std::vector<Open> open;
  };
  SpanGroup<Series> users_{DeviceSpan::kUser, nvtx::Phase::kUser, "user phase", stats_.users(), {}};
  SpanGroup<Stats> modules_{DeviceSpan::kModule, nvtx::Phase::kModule, "module", stats_.modules(), {}};

  State state_ = State::kIdle;
  int fwd_depth_ = 0;
  bool fwd_eval_ = false;
  int64_t last_ns_ = 0;
  // The open step's events (empty ones without device timing): the last boundary's, the step's
  // opening one, the pair an eval pause carries, the open eval forward's and a deferred
  // optimizer_begin's. Each holds its own reference; close() drops them all at once.
  struct StepEvents {
    EventRef last, step, carry_a, carry_b, eval, opt;
  } ev_;
  // Eval pause: the training span cut at the first eval forward, carried to the next boundary.
  bool paused_ = false;
  int64_t carry_ns_ = 0, carry_t0_ = 0;
  int64_t eval_t0_ = 0;
  int64_t pause_t0_ = 0;  // the evaluation stretch's first eval forward
  void end_eval_stretch();  // records the `eval` series of an open pause, up to its last eval forward

  // Closure-driven steps (see the top of this file): optimizer_begin's boundary waits here until
  // the step shows whether a closure runs inside it.
  bool opt_deferred_ = false;
  int64_t opt_ns_ = 0;
  bool in_closure_ = false;  // the optimizer step is open and its closure has run the model
  bool step_forward_ = false;  // a training forward began in the open step

  int64_t step_index_ = 0;
  uint64_t step_serial_ = 0;
  bool step_active_ = false;
  bool step_has_pause_ = false;
  int64_t step_t0_ = 0;
  int64_t step_samples_ = 0;
  double step_phase_[kNumPartition] = {};
  StepRecord cur_;
  Ring<StepRecord> ring_;
  // Interval statistics: snapshots waiting for the open step's end, and the open step being one
  // that a reset cut (its samples go nowhere; DeviceTimer drops its device samples).
  std::vector<std::shared_ptr<TimelineSnapshot>> snap_waiting_;
  bool discard_ = false;
  bool warm_ = false;  // the open step is a warm-up step
  DeviceMemory memory_;  // read at each step's end on CUDA

  uint64_t nvtx_step_ = 0, nvtx_cursor_ = 0;
  bool pushed_ = false;  // a forward/optimizer push range is open ...
  std::thread::id push_thread_;  // ... on this thread
  bool capturing_ = false;
  bool closed_ = false;
};

// RAII boundary pair for C++ loops: kForward, kBackward or kOptimizer (which ends the step).
// batch: samples in a forward (samples/s).
class ScopedPhase {
 public:
  ScopedPhase(Timeline& tl, Phase p, int64_t batch = -1);
  ScopedPhase(Timeline& tl, const std::string& user_phase);
  ~ScopedPhase();
  ScopedPhase(const ScopedPhase&) = delete;
  ScopedPhase& operator=(const ScopedPhase&) = delete;

 private:
  Timeline& tl_;
  Phase phase_;
  int user_ = -1;
  bool open_ = true;
};

}  // namespace stepscope::timing
