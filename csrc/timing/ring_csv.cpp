// The steps CSV of a live Timeline (ring_json.h's ring_csv), cell for cell what
// stepscope/export/csv.py writes from run data. Compiled with -ffp-contract=off, as ring_json.cpp,
// so that the per-step sums and rates round as Python's do.
#include <charconv>
#include <cmath>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "timing/phase_stats.h"
#include "timing/ring_json.h"
#include "timing/ring_rows.h"

namespace stepscope::timing {
namespace {

using namespace rows;  // timing/ring_rows.h: what the ring writers share

// stepscope/export/csv.py's cells: seconds with 9 fixed decimals, trailing zeros dropped (one kept
// after the point); the health and throughput figures to 9 significant digits; empty when unknown.
void csv_fixed(std::string& out, double v) {
  if (!std::isfinite(v)) return;
  char buf[400];  // the longest %.9f of a double is about 320 characters
  const int n = std::snprintf(buf, sizeof(buf), "%.9f", v);
  std::string_view t(buf, static_cast<size_t>(n));
  while (!t.empty() && t.back() == '0') t.remove_suffix(1);
  out.append(t);
  if (!t.empty() && t.back() == '.') out.push_back('0');
}

void csv_sig(std::string& out, const double* v) {
  if (v == nullptr || !std::isfinite(*v)) return;
  char buf[32];
  out.append(buf, static_cast<size_t>(std::snprintf(buf, sizeof(buf), "%.9g", *v)));
}

void csv_int(std::string& out, int64_t v) {
  char buf[24];
  const auto r = std::to_chars(buf, buf + sizeof(buf), v);
  out.append(buf, static_cast<size_t>(r.ptr - buf));
}

// A step's device seconds per partition phase, when every partition span of it was resolved.
bool device_by_phase(const StepRecord& s, double (&out)[kNumPartition]) {
  int spans = 0, resolved = 0;
  for (int i = 0; i < s.n_spans; ++i) {
    const SpanRecord& r = s.spans[i];
    if (r.kind != SpanRecord::kPartition) continue;
    ++spans;
    if (!device_span(r)) continue;
    ++resolved;
    out[r.phase] += device_s(r.t1, r.lag1_us) - device_s(r.t0, r.lag0_us);
  }
  return resolved > 0 && resolved == spans;
}

struct CsvColumns {  // the optional columns: present when some step of the ring has a value
  bool loss = false, mfu = false, tokens = false;
  CsvColumns(const std::vector<StepRecord>& ring, const RingJoin& j, const Joined& joined) {
    double rate;
    for (const StepRecord& s : ring) {
      const double* v = Joined::find(joined.loss, s.index);
      loss = loss || (v != nullptr && std::isfinite(*v));
      mfu = mfu || step_mfu(s, j, rate);
      tokens = tokens || step_tokens_per_s(s, j, rate);
    }
  }
};

void csv_row(std::string& out, const StepRecord& s, const RingJoin& j, const Joined& joined,
             const CsvColumns& c) {
  const double host_s = host_seconds(s);
  csv_int(out, s.index);
  for (const double v : {s.t0 * 1e-9, s.t1 * 1e-9, host_s}) {
    out.push_back(',');
    csv_fixed(out, v);
  }
  out.push_back(',');
  csv_int(out, s.samples);
  for (const double v : s.host) {
    out.push_back(',');
    csv_fixed(out, v);
  }
  double dev[kNumPartition] = {};
  const bool resolved = device_by_phase(s, dev);
  for (const double v : dev) {
    out.push_back(',');
    if (resolved) csv_fixed(out, v);
  }
  out.push_back(',');
  if (s.memory.allocated >= 0) csv_int(out, s.memory.allocated);
  out.push_back(',');
  if (s.memory.allocated >= 0) csv_int(out, s.memory.reserved);
  out.push_back(',');
  csv_int(out, s.truncated);
  out.push_back(',');
  csv_sig(out, Joined::find(joined.grad_norm, s.index));
  if (c.loss) csv_sig(out.append(","), Joined::find(joined.loss, s.index));
  double rate;
  if (c.mfu) csv_sig(out.append(","), step_mfu(s, j, rate) ? &rate : nullptr);
  if (c.tokens) csv_sig(out.append(","), step_tokens_per_s(s, j, rate) ? &rate : nullptr);
  out.push_back('\n');
}

}  // namespace

std::string ring_csv(const Timeline& tl, const RingJoin& join) {
  const std::vector<StepRecord> ring = tl.recent_steps();
  const Joined joined(join);
  const CsvColumns cols(ring, join, joined);
  std::string out = "step,start_s,end_s,step_s,samples";
  for (const char* suffix : {"_s", "_device_s"}) {
    for (int i = 0; i < kNumPartition; ++i) {
      out.append(",").append(phase_name(static_cast<Phase>(i))).append(suffix);
    }
  }
  out.append(",memory_allocated,memory_reserved,truncated_spans,grad_norm");
  if (cols.loss) out.append(",loss");
  if (cols.mfu) out.append(",mfu");
  if (cols.tokens) out.append(",tokens_per_s");
  out.push_back('\n');
  out.reserve(out.size() + ring.size() * 160);
  for (const StepRecord& s : ring) csv_row(out, s, join, joined, cols);
  return out;
}

}  // namespace stepscope::timing
