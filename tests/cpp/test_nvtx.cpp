// The NVTX layer as a tool sees it: this executable runs with NVTX_INJECTION64_PATH pointing at
// tests/nvtx_inject (ctest sets it), and every test reads back the lines the injection library
// wrote for the calls it made. NVTX reads the variable once, at the first call in the process,
// so the log path is fixed in main() before any NVTX call; each test reads only the lines
// written since it began (ctest runs each test in its own process; a direct run shares one).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "nvtx/nvtx.h"

namespace nv = stepscope::nvtx;

namespace {

std::string g_log;

struct Event {
  std::string name;
  std::map<std::string, std::string> f;
  const std::string& operator[](const std::string& k) const {
    static const std::string none = "<absent>";
    auto it = f.find(k);
    return it == f.end() ? none : it->second;
  }
};

std::vector<Event> read_log() {
  std::vector<Event> out;
  std::ifstream in(g_log);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::string tok;
    Event e;
    std::getline(ss, e.name, '\t');
    while (std::getline(ss, tok, '\t')) {
      const auto eq = tok.find('=');
      if (eq != std::string::npos) e.f[tok.substr(0, eq)] = tok.substr(eq + 1);
    }
    out.push_back(e);
  }
  return out;
}

// The range/mark events in the stepscope domain written since the fixture began.
class Nvtx : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!nv::compiled_in()) GTEST_SKIP() << "built without the NVTX headers";
    if (!nv::tool_attached()) {
      GTEST_SKIP() << "NVTX_INJECTION64_PATH does not name the test injection library";
    }
    nv::set_enabled(true);
    start_ = read_log().size();
  }
  std::vector<Event> since() const {
    auto all = read_log();
    std::vector<Event> out;
    for (size_t i = start_; i < all.size(); ++i) {
      const auto& n = all[i].name;
      if (all[i]["domain"] == "stepscope" &&
          (n == "DomainRangePushEx" || n == "DomainRangePop" || n == "DomainRangeStartEx" ||
           n == "DomainRangeEnd" || n == "DomainMarkEx"))
        out.push_back(all[i]);
    }
    return out;
  }
  size_t start_ = 0;
};

std::string hex(uint32_t c) {
  char b[16];
  std::snprintf(b, sizeof(b), "0x%08X", c);
  return b;
}

// An event's identity as the assertions spell it: "Push forward", "Start step 0 #0", "Pop" ...
std::string brief(const Event& e) {
  static const std::map<std::string, std::string> kShort = {
      {"DomainRangePushEx", "Push"}, {"DomainRangePop", "Pop"}, {"DomainRangeStartEx", "Start"},
      {"DomainRangeEnd", "End"}, {"DomainMarkEx", "Mark"}};
  std::string s = kShort.at(e.name);
  if (e.name == "DomainRangePop" || e.name == "DomainRangeEnd") return s;
  s += " " + e["msg"];
  if (e["payload"] != "-") s += " #" + e["payload"];
  return s;
}

void expect_phase_style(const Event& e, nv::Phase p) {
  EXPECT_EQ(e["color"], hex(nv::phase_color(p))) << brief(e);
  EXPECT_EQ(e["category"], std::to_string(nv::phase_category(p))) << brief(e);
}

TEST_F(Nvtx, DomainCategoriesAndRegisteredNames) {
  const auto all = read_log();
  int creates = 0;
  std::map<std::string, std::string> categories;
  std::vector<std::string> strings;
  for (const auto& e : all) {
    if (e.name == "DomainCreateA" && e["domain"] == "stepscope") ++creates;
    if (e.name == "DomainNameCategoryA" && e["domain"] == "stepscope") categories[e["category"]] = e["name"];
    if (e.name == "DomainRegisterStringA" && e["domain"] == "stepscope") strings.push_back(e["string"]);
  }
  EXPECT_EQ(creates, 1);
  for (int i = 0; i < static_cast<int>(nv::Phase::kCount); ++i) {
    const auto p = static_cast<nv::Phase>(i);
    EXPECT_EQ(categories[std::to_string(nv::phase_category(p))], nv::phase_name(p));
    EXPECT_NE(std::find(strings.begin(), strings.end(), nv::phase_name(p)), strings.end())
        << nv::phase_name(p);
  }
}

// One training step as the Monitor drives it: step and the phases that may end on autograd's
// thread are start/end, forward/optimizer/modules push/pop.
TEST_F(Nvtx, TrainingStepSequence) {
  for (int64_t step = 0; step < 3; ++step) {
    const std::string name = "step " + std::to_string(step);
    const uint64_t s = nv::start(nv::Phase::kStep, name.c_str(), step);
    nv::push(nv::Phase::kForward);
    nv::push(nv::Phase::kModule, "encoder");
    nv::pop();
    nv::pop();
    nv::end(nv::start(nv::Phase::kLoss));
    nv::end(nv::start(nv::Phase::kBackward));
    nv::end(nv::start(nv::Phase::kOther));
    nv::push(nv::Phase::kOptimizer);
    nv::pop();
    nv::end(s);
  }
  const auto ev = since();
  std::vector<std::string> got;
  for (const auto& e : ev) got.push_back(brief(e));
  std::vector<std::string> want;
  for (int step = 0; step < 3; ++step) {
    const std::string n = std::to_string(step);
    for (const char* s : {"Start step " , "Push forward", "Push encoder", "Pop", "Pop", "Start loss", "End",
                          "Start backward", "End", "Start other", "End", "Push optimizer", "Pop", "End"}) {
      std::string w = s;
      if (w == "Start step ") w += n + " #" + n;
      want.push_back(w);
    }
  }
  EXPECT_EQ(got, want);

  // Styles: each phase its colour and category; names registered except the step's.
  for (const auto& e : ev) {
    if (e.name != "DomainRangePushEx" && e.name != "DomainRangeStartEx") continue;
    const std::string& m = e["msg"];
    if (m.rfind("step ", 0) == 0) {
      expect_phase_style(e, nv::Phase::kStep);
      EXPECT_EQ(e["msgtype"], "ascii");
      continue;
    }
    EXPECT_EQ(e["msgtype"], "registered") << m;
    const nv::Phase p = m == "forward"    ? nv::Phase::kForward
                        : m == "encoder"  ? nv::Phase::kModule
                        : m == "loss"     ? nv::Phase::kLoss
                        : m == "backward" ? nv::Phase::kBackward
                        : m == "other"    ? nv::Phase::kOther
                                          : nv::Phase::kOptimizer;
    expect_phase_style(e, p);
  }
  // Every start is ended, by id.
  std::map<std::string, int> open;
  for (const auto& e : ev) {
    if (e.name == "DomainRangeStartEx") ++open[e["id"]];
    if (e.name == "DomainRangeEnd") --open[e["id"]];
  }
  for (const auto& [id, n] : open) EXPECT_EQ(n, 0) << "range id " << id;
}

TEST_F(Nvtx, PushPopBalancedPerThread) {
  auto work = [](const char* name) {
    for (int i = 0; i < 50; ++i) {
      nv::Range outer(name);
      nv::Range inner(nv::Phase::kForward);
    }
  };
  std::thread a(work, "thread a"), b(work, "thread b");
  a.join();
  b.join();
  std::map<std::string, std::vector<std::string>> stacks;
  std::map<std::string, int> pushes;
  for (const auto& e : since()) {
    auto& st = stacks[e["tid"]];
    if (e.name == "DomainRangePushEx") {
      st.push_back(e["msg"]);
      ++pushes[e["tid"]];
      if (st.size() == 2) EXPECT_EQ(st[1], "forward");
    } else if (e.name == "DomainRangePop") {
      ASSERT_FALSE(st.empty()) << "pop with nothing pushed on thread " << e["tid"];
      st.pop_back();
    }
  }
  ASSERT_EQ(pushes.size(), 2u);
  for (const auto& [tid, n] : pushes) EXPECT_EQ(n, 100) << tid;
  for (const auto& [tid, st] : stacks) EXPECT_TRUE(st.empty()) << tid;
}

TEST_F(Nvtx, RangeEndedOnAnotherThread) {
  const uint64_t id = nv::start(nv::Phase::kBackward);
  ASSERT_NE(id, 0u);
  std::thread t([id] { nv::end(id); });  // autograd's thread ends backward
  t.join();
  const auto ev = since();
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[0].name, "DomainRangeStartEx");
  EXPECT_EQ(ev[1].name, "DomainRangeEnd");
  EXPECT_EQ(ev[0]["id"], ev[1]["id"]);
  EXPECT_NE(ev[0]["tid"], ev[1]["tid"]);
  expect_phase_style(ev[0], nv::Phase::kBackward);
}

TEST_F(Nvtx, RaiiRangeColourAndMarks) {
  {
    nv::Range r("load batch");
    nv::Range g("custom", 0x00FF00);  // no alpha byte: opaque
    nv::mark("checkpoint", 7);
  }
  nv::mark(nv::Phase::kData, "data stall", -1, 0xFF123456u);
  const auto ev = since();
  std::vector<std::string> got;
  for (const auto& e : ev) got.push_back(brief(e));
  EXPECT_EQ(got, (std::vector<std::string>{"Push load batch", "Push custom", "Mark checkpoint #7", "Pop",
                                           "Pop", "Mark data stall"}));
  expect_phase_style(ev[0], nv::Phase::kUser);
  EXPECT_EQ(ev[0]["msgtype"], "registered");
  EXPECT_EQ(ev[1]["color"], "0xFF00FF00");
  expect_phase_style(ev[2], nv::Phase::kUser);
  EXPECT_EQ(ev[5]["color"], "0xFF123456");
  EXPECT_EQ(ev[5]["category"], std::to_string(nv::phase_category(nv::Phase::kData)));
}

TEST_F(Nvtx, SwitchOffEmitsNothingAndStillClosesOpenRanges) {
  nv::push(nv::Phase::kForward);                 // on: reaches the tool
  const uint64_t id = nv::start(nv::Phase::kBackward);
  nv::set_enabled(false);
  EXPECT_FALSE(nv::enabled());
  nv::push(nv::Phase::kOptimizer);               // off: skipped ...
  EXPECT_EQ(nv::start(nv::Phase::kLoss), 0u);
  nv::mark("hidden");
  nv::set_enabled(true);
  nv::pop();                                     // ... so its pop is skipped too
  nv::pop();                                     // pops forward
  nv::end(id);
  nv::set_enabled(false);
  nv::pop();                                     // unmatched: ignored
  nv::set_enabled(true);
  std::vector<std::string> got;
  for (const auto& e : since()) got.push_back(brief(e));
  EXPECT_EQ(got, (std::vector<std::string>{"Push forward", "Start backward", "Pop", "End"}));
}

TEST_F(Nvtx, CaptureWindow) {
  EXPECT_FALSE(nv::capture_open());
  nv::capture_begin();
  EXPECT_TRUE(nv::capture_open());
  nv::capture_begin();  // already open: no second range
  nv::push(nv::Phase::kForward);
  nv::pop();
  nv::capture_end();
  nv::capture_end();    // none open: no-op
  EXPECT_FALSE(nv::capture_open());
  const auto ev = since();
  std::vector<std::string> got;
  for (const auto& e : ev) got.push_back(brief(e));
  ASSERT_EQ(got, (std::vector<std::string>{"Start capture", "Push forward", "Pop", "End"}));
  EXPECT_EQ(ev[0]["msgtype"], "registered");
  EXPECT_EQ(ev[0]["id"], ev[3]["id"]);
  expect_phase_style(ev[0], nv::Phase::kCapture);
}

TEST_F(Nvtx, ToolAttachedCostIsMeasured) {
  const double ns = nv::time_push_pop_ns(1000);
  EXPECT_GT(ns, 0.0);
  EXPECT_EQ(since().size(), 2000u);
}

// Without a tool (ctest runs this one without NVTX_INJECTION64_PATH): every call is a safe
// no-op, start() hands out 0, and the capture window still opens and closes.
TEST(NvtxNoTool, EveryCallIsASafeNoOp) {
  if (nv::tool_attached()) GTEST_SKIP() << "a tool is attached in this process";
  EXPECT_EQ(nv::enabled(), nv::compiled_in());
  nv::push(nv::Phase::kForward);
  nv::pop();
  nv::pop();  // unmatched: harmless
  EXPECT_EQ(nv::start(nv::Phase::kStep, "step 0", 0), 0u);
  nv::end(0);
  nv::mark("m", 3);
  { nv::Range r("scoped"); }
  nv::capture_begin();
  EXPECT_TRUE(nv::capture_open());
  nv::capture_end();
  EXPECT_FALSE(nv::capture_open());
  nv::set_enabled(false);
  EXPECT_FALSE(nv::enabled());
  nv::set_enabled(true);
  EXPECT_GT(nv::time_push_pop_ns(1000), 0.0);
}

}  // namespace

int main(int argc, char** argv) {
  // Must precede the first NVTX call: the injection library reads it when NVTX initialises.
  bool own_log = false;
  if (const char* p = std::getenv("STEPSCOPE_NVTX_LOG"); p != nullptr && *p != '\0') {
    g_log = p;
  } else {
    g_log = "/tmp/stepscope_nvtx_gtest_" + std::to_string(getpid()) + ".log";
    setenv("STEPSCOPE_NVTX_LOG", g_log.c_str(), 1);
    own_log = true;
  }
  ::testing::InitGoogleTest(&argc, argv);
  const int rc = RUN_ALL_TESTS();
  if (own_log) std::remove(g_log.c_str());
  return rc;
}
