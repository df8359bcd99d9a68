// The ring as text (timing/ring_json.h) from plain LibTorch: the run file's recent_steps, the CSV and
// the trace's events. Their values against the Python writers are tested in Python
// (test_files.py, test_export.py); here, the text itself: escaping, numbers, joins and counts.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "timing/ring_json.h"
#include "timing/timeline.h"

using namespace stepscope::timing;

namespace {

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size())) ++n;
  return n;
}

void run_steps(Timeline& tl, int steps, const std::string& user) {
  const int mod = tl.register_module("enc");
  for (int s = 0; s < steps; ++s) {
    tl.forward_begin(false, 4);
    tl.module_begin(mod);
    tl.module_end(mod);
    tl.forward_end();
    EXPECT_TRUE(tl.backward_begin());
    tl.backward_end();
    { ScopedPhase u(tl, user); }
    { ScopedPhase o(tl, Phase::kOptimizer); }
  }
}

}  // namespace

TEST(RingJson, RecentStepsEscapedJoinedAndShortestNumbers) {
  Timeline tl({.device = false, .nvtx = false});
  run_steps(tl, 3, "a\"b\\\n");
  RingJoin j;
  const double inf = std::numeric_limits<double>::infinity();
  j.grad_norm = {{0, 1.0}, {1, 0.5}, {1, 0.1}, {2, inf}};
  j.loss = {{2, 1e-7}};
  const std::string text = ring_json(tl, j);
  ASSERT_EQ(text.rfind("[{\"step\":0,", 0), 0u) << text.substr(0, 40);
  EXPECT_EQ(text.back(), ']');
  EXPECT_EQ(count(text, "{\"step\":"), 3u);
  EXPECT_EQ(count(text, "\"a\\\"b\\\\\\u000a\""), 3u);  // the user span's name, escaped
  EXPECT_EQ(count(text, "[\"enc\","), 3u);
  EXPECT_NE(text.find("\"grad_norm\":1.0,"), std::string::npos);  // an integral value stays a float
  EXPECT_NE(text.find("\"grad_norm\":0.1,"), std::string::npos);  // the later of two values
  EXPECT_NE(text.find("\"grad_norm\":null,\"loss\":1e-07,"), std::string::npos);  // non-finite: null
  EXPECT_EQ(count(text, "\"loss\":null"), 2u);
  EXPECT_EQ(count(text, "\"memory\":null"), 3u);  // no device memory without CUDA
  EXPECT_EQ(count(text, "\"device_spans\":[]"), 3u);
}

TEST(RingJson, TraceEventsCountsTracksAndCounters) {
  Timeline tl({.device = false, .nvtx = false});
  run_steps(tl, 4, "clip");
  TraceOptions o;
  o.pid = 7;
  o.colors = {{"step", "#123456"}, {"user", "#ABCDEF"}};
  o.join.grad_norm = {{1, 2.0}, {2, std::nan("")}};
  o.join.flops_per_step = 1e9;
  o.join.peak_flops = 1e12;
  const std::string text = trace_events_json(tl, o);
  ASSERT_EQ(text.rfind("[{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":7,", 0), 0u) << text.substr(0, 60);
  EXPECT_EQ(text.back(), ']');
  // Per step: its own span, six phases, one user span and one module span.
  EXPECT_EQ(count(text, "\"ph\":\"X\""), 4u * (1 + kNumPartition + 2));
  EXPECT_EQ(count(text, "\"cat\":\"step\""), 4u);
  EXPECT_EQ(count(text, "\"color\":\"#123456\""), 4u);
  EXPECT_EQ(count(text, "\"color\":\"#ABCDEF\""), 4u);
  EXPECT_EQ(count(text, "\"name\":\"grad_norm\""), 1u);  // no point for the NaN, none where unknown
  EXPECT_EQ(count(text, "\"name\":\"mfu\""), 4u);
  EXPECT_EQ(count(text, "\"name\":\"samples/s\""), 4u);
  // Every event is the rank's (a metadata event's args hold a name too).
  EXPECT_EQ(count(text, "\"pid\":7"), count(text, "{\"name\":") - count(text, "\"args\":{\"name\":"));
  EXPECT_EQ(count(text, "\"name\":\"thread_name\""), 2u);  // steps and host phases: everything nests
  EXPECT_EQ(text.find("device phases"), std::string::npos);
}

TEST(RingJson, CsvColumnsCellsAndJoins) {
  Timeline tl({.device = false, .nvtx = false});
  run_steps(tl, 3, "u");
  RingJoin j;
  j.grad_norm = {{0, 2.0}, {1, std::nan("")}, {2, 1.0 / 3.0}};
  const std::string plain = ring_csv(tl, j);
  const std::string head = plain.substr(0, plain.find('\n'));
  EXPECT_EQ(head.rfind("step,start_s,end_s,step_s,samples,", 0), 0u) << head;
  EXPECT_EQ(head.substr(head.size() - 58), "memory_allocated,memory_reserved,truncated_spans,grad_norm");
  EXPECT_EQ(count(plain, "\n"), 4u);  // the header and one row per step
  EXPECT_NE(plain.find(",,,0,2\n"), std::string::npos);  // no memory without CUDA; 2.0 as %.9g
  EXPECT_NE(plain.find(",,,0,\n"), std::string::npos);  // a NaN norm: an empty cell
  EXPECT_NE(plain.find(",,,0,0.333333333\n"), std::string::npos);
  j.loss = {{1, 0.25}};
  j.flops_per_step = 1e6;
  j.peak_flops = 1e12;
  j.tokens_per_sample = 8;
  const std::string full = ring_csv(tl, j);
  EXPECT_NE(full.find("grad_norm,loss,mfu,tokens_per_s\n"), std::string::npos);
  EXPECT_NE(full.find(",0.25,"), std::string::npos);
  EXPECT_EQ(count(full, "\n"), 4u);
}
