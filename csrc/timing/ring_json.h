// The ring of recent steps written as text straight from its records: the run file's
// "recent_steps" and the Chrome trace's "traceEvents" (JSON), and the steps CSV, in O(ring) with
// no object per span.
//
// Building the same text through Python objects (a dict per step, a tuple per span, json.dumps)
// took about 300 ms for a save and 550 ms for a trace of a 4096-step ring; most of it was making
// and walking some 10^5 small objects. These write the text directly. Python's
// stepscope.run.save and stepscope.export.trace_events stay the reference: the tests parse both
// and compare them value by value (python/stepscope/export/trace.py says what each event means).
//
// Numbers are written in the shortest form that reads back to the same double; a non-finite one
// is written as null (JSON has no NaN), as the Python writers do.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "timing/timeline.h"

namespace stepscope::timing {

// What the ring's records do not hold, joined to them by step index.
struct RingJoin {
  // (step, value) of the global gradient norm and of the loss (training health); a step listed
  // twice takes its later value; a step not listed gets null.
  std::vector<std::pair<int64_t, double>> grad_norm, loss;
  // Throughput (the report's FLOPs per step, the peak FLOP/s, tokens per sample): 0 = unknown.
  double flops_per_step = 0, peak_flops = 0, tokens_per_sample = 0;
};

// The "recent_steps" array of a run file: per step, its index, t0/t1 and spans in seconds since
// the Timeline started, host seconds per partition phase, samples, memory, the warm-up and
// device-timing flags, and the joined grad_norm and loss.
std::string ring_json(const Timeline& tl, const RingJoin& join);

struct TraceOptions {
  int64_t pid = 0;  // the rank: one trace process per rank
  // NVTX colour ("#RRGGBB") by phase name, and by "step", "user" and "module"; absent: null.
  std::map<std::string, std::string> colors;
  RingJoin join;
};

// The "traceEvents" array of the run's Chrome trace (metadata events first).
std::string trace_events_json(const Timeline& tl, const TraceOptions& opts);

// The text of stepscope.export.write_csv for a live Timeline: a header, then one row per ring step
// (its columns: that function's docstring), the same cells as the Python writer of run data.
std::string ring_csv(const Timeline& tl, const RingJoin& join);

}  // namespace stepscope::timing
