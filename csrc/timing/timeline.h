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
#include "timing/device_clock.h"
#include "timing/device_sampling.h"
#include "timing/event_pool.h"
#include "phases.h"
#include "timing/ring.h"
#include "timing/spin_lock.h"
#include "timing/stats.h"

namespace stepscope::timing {

// Phase and kNumPartition: phases.h. The report name of a series.
const char* phase_name(Phase p);

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

struct SeriesSummary {
  int64_t count = 0;
  double total = 0, mean = 0, std = 0, min = 0, max = 0, p50 = 0, p90 = 0, p99 = 0;  // seconds
  bool has_quantiles = false;
};

struct NamedSummary {
  std::string name;
  SeriesSummary host, device;
  const char* parent = nullptr;  // user phases: the partition phase open at their (last) begin
};

// Totals of the warm-up steps, per Phase (seconds); device totals over resolved samples only.
struct WarmupSummary {
  int64_t steps = 0;
  int64_t samples = 0;
  std::array<double, static_cast<size_t>(Phase::kCount)> host{}, device{};
  std::array<int64_t, static_cast<size_t>(Phase::kCount)> device_count{};
};

// A step slower than kSpikeFactor x the running median step, and the phase that grew most
// against its own running median (absolute excess).
struct SpikeRecord {
  int64_t index = 0;
  double duration = 0;     // seconds
  double step_median = 0;  // the running median step when it happened (seconds)
  int phase = 0;           // Phase
  double phase_time = 0, phase_median = 0;  // seconds, in this step / running median
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

struct Report {
  std::vector<NamedSummary> phases;   // data .. optimizer, step, eval_forward, eval
  std::vector<NamedSummary> user;     // mon.phase(name) / ScopedPhase(tl, "name")
  std::vector<NamedSummary> modules;  // per-module forward (no quantiles)
  int64_t steps = 0;
  int64_t samples = 0;
  double step_host_total = 0;  // seconds
  int64_t dropped_device_samples = 0;
  int64_t pending_device_samples = 0;
  bool device = false;
  WarmupSummary warmup;
  DeviceMemory memory;  // at the last step's end (-1 without device timing)
  // Allocated memory over the ring's steps (CUDA): first and last value and the share of
  // step-to-step changes that rose; steps = 0 without device timing.
  struct MemoryTrend {
    int64_t steps = 0, first = 0, last = 0;
    double rising_fraction = 0;
  } memory_trend;
  // CUDA queue lag per boundary (named by the boundary: forward_begin .. optimizer_end): how long
  // after the host reached it the GPU did. Empty without device timing.
  std::vector<NamedSummary> lag;
  std::vector<SpikeRecord> spikes;  // the last kMaxSpikes, oldest first
  int64_t spikes_total = 0;         // every spike seen, listed or not
  // Device sampling (timing/device_sampling.h): the steady steps that were device-timed (the
  // device series and shares cover these only), the current one-in-k (0: unknown, as in a merged
  // report), whether k is chosen automatically, the CUDA events recorded at phase boundaries
  // (one per boundary of a timed step, warm-up and attach included) and the host cost of one
  // record measured at attach (seconds; 0 when not measured).
  int64_t device_steps = 0;
  int64_t device_every = 0;
  bool device_every_auto = false;
  int64_t device_events = 0;
  double event_record_cost = 0;
};

// The statistics at one moment (Timeline::snapshot), which report(since) and pack(since) subtract to
// give the figures of the steps after it. Opaque outside the Timeline; a few hundred KB (its
// histograms), taken once per interval (an epoch, a log line), never per step.
struct TimelineSnapshot {
  uint64_t owner = 0;  // Timeline::id() of the Timeline it was taken from
  bool ready = false;           // false while it waits for the end of the step it was taken in
  uint64_t generation = 0;      // Timeline::reset() calls before it was filled
  std::array<Series, static_cast<size_t>(Phase::kCount)> host, dev;
  std::array<Series, kNumPartition> lag;
  std::vector<Series> user_host, user_dev;
  std::vector<Stats> module_host, module_dev;
  int64_t steps = 0, samples = 0, dropped = 0, device_steps = 0, device_events = 0;
  double step_host_total = 0;  // ns
  WarmupSummary warmup;
  uint64_t spikes = 0;      // spikes seen before it
  int64_t first_step = 0;   // index of the first step after it
};

// Spike rule: slower than 3x the running median step (the issue tracker of tools that flag
// "slow steps" uses 2-3x; 3x keeps a GC pause or a checkpoint, not ordinary jitter). The running
// median is a multiplicative streaming estimate (one word per series, updated per step), so the
// check costs a few multiplications at step end; it starts after kSpikeMinSteps steady steps.
constexpr double kSpikeFactor = 3.0;
constexpr int64_t kSpikeMinSteps = 5;
constexpr int kMaxSpikes = 32;

class Timeline {
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
  bool device() const { return device_; }
  uint64_t id() const { return id_; }  // unique per Timeline in the process (never reused)

 private:
  struct Open {  // an open user or module span
    int64_t t0 = 0;
    int ev = -1;
    int depth = 0;
    bool timed = false;  // began on a device-timed step
    bool eval = false;   // began inside an eval forward: not counted (modules)
  };
  struct DevSpan {  // device time to resolve: one or two event pairs (two when eval paused it)
    int kind;       // 0 phase series, 1 user, 2 module
    int id;
    bool warm;      // recorded during a warm-up step: totalled apart
    int a0, b0, a1, b1;
    uint64_t serial;  // the step it belongs to (StepRecord::serial) ...
    int slot;         // ... and its SpanRecord there (-1: none), for the device times
  };
  enum class State { kIdle, kForward, kAfterForward, kBackward, kAfterBackward, kOptimizer, kAfterOptimizer };

  int64_t now_ns() const {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - origin_).count();
  }
  // Records an event for a boundary of the open step when it is device-timed (record_event_if:
  // when `want`); -1 otherwise, or when the pool is exhausted.
  int record_event(int64_t now) { return record_event_if(now, dev_step_); }
  int record_event_if(int64_t now, bool want);
  // The step-ending boundary also opens the next step: it records when either step is timed.
  bool end_boundary_wanted() const;
  void place_on_host_clock(const DevSpan& d, float m0, float m1, double seen);
  // Records the phase and ends its NVTX range (with nvtx false the range is left open: a
  // deferred optimizer_begin recorded at optimizer_end, whose optimizer range is open).
  void boundary(Phase closes, int64_t now, int ev, bool nvtx = true);
  void finish_step(int64_t now, int ev);
  void flush_optimizer_begin();  // records a deferred optimizer_begin as the end of `other`
  void start_step(int64_t now, int ev);
  void end_cursor_range();
  void cursor_start(nvtx::Phase p);
  void cursor_push(nvtx::Phase p);
  void open_locked();
  void open_step_range();
  void pool_unref(int slot);
  void add_host(int series, double ns);
  void check_spike(double total_ns);
  const char* open_phase_name() const;
  void fold_host();
  // Queues a device span over its events' pair (or two pairs, around an eval pause) when every
  // event was recorded, else counts a dropped sample.
  void queue_or_drop(int kind, int id, std::initializer_list<int> events, int slot = -1);
  SpanRecord* span_record(uint64_t serial, int slot);
  void poll_locked();
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
  bool device_;
  std::chrono::steady_clock::time_point origin_;
  mutable SpinLock mu_;
  EventPool pool_;

  std::array<Series, static_cast<int>(Phase::kCount)> host_, dev_;
  // Host samples wait here and are folded into host_ when it fills (every ~18 steps), at close()
  // and at report(): a boundary inside a hook then only stores two words, and the series' code and
  // histograms, cold by then, are touched once per fold instead of at every boundary.
  struct HostSample {
    int series;
    double ns;
  };
  static constexpr int kHostPending = 128;
  std::array<HostSample, kHostPending> host_pending_;
  int n_host_pending_ = 0;
  // User phases and per-module spans: named, re-entrant (an inner re-entry counts once), timed
  // on the host and, on CUDA, by an event pair. User phases keep histograms (Series); modules
  // keep moments only (Stats), so that a model with thousands of modules stays small.
  template <typename StatT>
  struct SpanGroup {
    int kind;          // DevSpan kind: 1 user, 2 module
    nvtx::Phase phase;
    const char* what;  // for error messages
    std::vector<std::string> names;
    std::vector<StatT> host, dev;
    std::vector<Open> open;
    std::vector<const char*> parent;
  };
  SpanGroup<Series> users_{1, nvtx::Phase::kUser, "user phase", {}, {}, {}, {}, {}};
  SpanGroup<Stats> modules_{2, nvtx::Phase::kModule, "module", {}, {}, {}, {}, {}};
  std::deque<DevSpan> pending_;
  int64_t dropped_ = 0;

  State state_ = State::kIdle;
  int fwd_depth_ = 0;
  bool fwd_eval_ = false;
  int64_t last_ns_ = 0;
  int last_ev_ = -1;
  // Eval pause: the training span cut at the first eval forward, carried to the next boundary.
  bool paused_ = false;
  int64_t carry_ns_ = 0, carry_t0_ = 0;
  int carry_a_ = -1, carry_b_ = -1;
  int64_t eval_t0_ = 0;
  int eval_ev_ = -1;
  int64_t pause_t0_ = 0;  // the evaluation stretch's first eval forward
  void end_eval_stretch();  // records the `eval` series of an open pause, up to its last eval forward

  // Closure-driven steps (see the top of this file): optimizer_begin's boundary waits here until
  // the step shows whether a closure runs inside it.
  bool opt_deferred_ = false;
  int64_t opt_ns_ = 0;
  int opt_ev_ = -1;
  bool in_closure_ = false;  // the optimizer step is open and its closure has run the model
  bool step_forward_ = false;  // a training forward began in the open step

  int64_t step_index_ = 0;
  uint64_t step_serial_ = 0;
  bool step_active_ = false;
  bool step_has_pause_ = false;
  int64_t step_t0_ = 0;
  int step_ev_ = -1;
  int64_t step_samples_ = 0;
  double step_phase_[kNumPartition] = {};
  StepRecord cur_;
  Ring<StepRecord> ring_;
  int64_t steps_done_ = 0, samples_done_ = 0;
  // Interval statistics: snapshots waiting for the open step's end, reset() calls, and the open step
  // being one that a reset cut (its samples go nowhere) and the newest step serial it cut (device
  // samples of that step or before are dropped when they resolve).
  std::vector<std::shared_ptr<TimelineSnapshot>> snap_waiting_;
  uint64_t generation_ = 0;
  bool discard_ = false;
  uint64_t reset_serial_ = 0;
  double step_host_total_ = 0;
  // Warm-up: whether the open step is one, and what the warm-up steps add up to.
  bool warm_ = false;
  WarmupSummary warm_sum_;
  // Spikes: running medians (ns) of the step and of each phase's per-step total.
  double med_step_ = 0;
  double med_phase_[kNumPartition] = {};
  Ring<SpikeRecord> spikes_{kMaxSpikes};
  // Queue lag: the device clock mapped onto the host's (timing/device_clock.h), anchored at a
  // resolved boundary event that this Timeline keeps a reference to.
  DeviceClock clock_;
  DeviceMemory memory_;  // read at each step's end on CUDA
  int64_t dev_cost_ns_ = 0;  // host time spent recording and resolving CUDA events, in total
  double lag_min_ns_ = std::numeric_limits<double>::infinity();  // least queue lag placed this step
  int anchor_ev_ = -1;
  std::array<Series, kNumPartition> lag_;
  // Device sampling (timing/device_sampling.h): whether the open step records events, the steady
  // steps that did, and every boundary event recorded.
  DeviceSampler sampler_;
  bool dev_step_ = false;
  int64_t device_steps_ = 0;
  int64_t events_ = 0;

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

// Packed raw statistics: one fixed-size float64 buffer per process, so that torch.distributed
// gathers every rank's in one all_gather, and any set of them merges into the summaries a local
// report() gives (same Stats, same histogram quantile code: one buffer gives back its Timeline's
// report() phases exactly). Layout: kPackedHeader words (tag, Phase::kCount, kBuckets, device,
// steps, samples, step host ns, dropped and pending device samples, device-timed steps), then per phase, host
// then device: Stats moments, histogram min and max, kBuckets counts. User phases and modules
// are left out (their names differ between processes). ~390 KB.
constexpr int kPackedHeader = 10;
constexpr int kPackedSeries = Stats::kMoments + 2 + LogHistogram::kBuckets;
constexpr int kPackedWords = kPackedHeader + 2 * static_cast<int>(Phase::kCount) * kPackedSeries;
// Merges n packed buffers laid end to end (n * kPackedWords doubles): series add up; steps is the
// most any buffer has (ranks step together), samples, device sample counts and device-timed steps
// add up (like the device series' counts), the step host total is the largest (ranks run at once),
// device is any buffer's. Throws
// std::invalid_argument on a buffer of another layout or with corrupt counts.
Report report_from_packed(const double* buffers, int64_t n);

// A plain-text table of a report for LibTorch loops: host (and device) count, mean, p50, p90, p99,
// total and share per phase. Monitor.summary() (report.py) is another, wider table (max, user
// phases under their parent, modules, memory, warm-up, spikes).
std::string format_summary(const Report& r);

}  // namespace stepscope::timing
