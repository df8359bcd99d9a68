// Accumulator and compute formulas against a naive reference, through the public C++ API
// (the op is reached through the dispatcher, as a LibTorch program would).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <random>
#include <tuple>

#include "metrics/accumulator.h"
#include "metrics/layout.h"
#include "metrics/row_math.h"
#include "metrics/row_simd.h"

namespace sm = stepscope::metrics;

namespace {

struct Naive {
  std::vector<int64_t> tp, pc, tc;
  std::vector<int64_t> confmat;
  std::vector<int64_t> topk_hits;
  int64_t n = 0, invalid = 0, ignored = 0;
  double loss = 0;
};

Naive naive_multiclass(const torch::Tensor& logits, const torch::Tensor& target, int64_t C,
                       const std::vector<int64_t>& ks, std::optional<int64_t> ignore) {
  Naive r;
  r.tp.assign(C, 0);
  r.pc.assign(C, 0);
  r.tc.assign(C, 0);
  r.confmat.assign(C * C, 0);
  r.topk_hits.assign(ks.size(), 0);
  auto L = logits.to(torch::kDouble).contiguous();
  auto T = target.to(torch::kLong).contiguous();
  const double* x = L.data_ptr<double>();
  const int64_t* t = T.data_ptr<int64_t>();
  for (int64_t i = 0; i < L.size(0); ++i) {
    if (ignore && t[i] == *ignore) {
      r.ignored++;
      continue;
    }
    if (t[i] < 0 || t[i] >= C) {
      r.invalid++;
      continue;
    }
    const double* row = x + i * C;
    int64_t p = 0;
    for (int64_t j = 1; j < C; ++j)
      if (row[j] > row[p]) p = j;
    int64_t above = 0;
    double m = row[p], se = 0;
    for (int64_t j = 0; j < C; ++j) {
      above += row[j] > row[t[i]] || (row[j] == row[t[i]] && j < t[i]);
      se += std::exp(row[j] - m);
    }
    r.loss += std::log(se) + m - row[t[i]];
    r.tp[t[i]] += p == t[i];
    r.pc[p]++;
    r.tc[t[i]]++;
    r.confmat[t[i] * C + p]++;
    for (size_t k = 0; k < ks.size(); ++k) r.topk_hits[k] += above < ks[k];
    r.n++;
  }
  return r;
}

TEST(Layout, ValidatesArguments) {
  sm::Config c;
  c.num_classes = 0;
  EXPECT_THROW(sm::make_layout(c), c10::Error);
  c.num_classes = 5;
  c.top_k = {6};
  EXPECT_THROW(sm::make_layout(c), c10::Error);
  c.top_k = {1, 5};
  const auto l = sm::make_layout(c);
  EXPECT_EQ(l.classes, 5);
  EXPECT_EQ(l.confmat, l.dense);
  EXPECT_EQ(l.numel, l.dense + 25);
}

// OpArgs is the one reader (parse) and writer (push) of the op's configuration arguments: a round
// trip keeps the Config, and the schema has exactly the arguments they fill, in their order.
TEST(OpArgs, PushThenParseKeepsTheConfiguration) {
  sm::Config c;
  c.num_classes = 7;
  c.top_k = {1, 3};
  c.ignore_index = -1;
  c.threshold = 0.25;
  c.input = sm::InputKind::kLogits;
  c.confusion_matrix = false;
  c.thresholds = 17;
  const sm::OpArgs a(c);
  c10::Stack stack{c10::IValue(), c10::IValue()};  // parse() starts where it is told
  a.push(stack);
  ASSERT_EQ(stack.size(), 2 + sm::OpArgs::kCount);
  const sm::OpArgs b = sm::OpArgs::parse(stack, 2);
  EXPECT_EQ(b.cfg.task, c.task);
  EXPECT_EQ(b.cfg.num_classes, c.num_classes);
  EXPECT_EQ(b.cfg.top_k, c.top_k);
  EXPECT_EQ(b.cfg.ignore_index, c.ignore_index);
  EXPECT_EQ(b.cfg.threshold, c.threshold);
  EXPECT_EQ(b.cfg.input, c.input);
  EXPECT_EQ(b.cfg.confusion_matrix, c.confusion_matrix);
  EXPECT_EQ(b.cfg.thresholds, c.thresholds);
  EXPECT_EQ(b.lay.numel, sm::make_layout(c).numel);
  EXPECT_EQ(b.lay.confmat, -1);

  const auto& schema = c10::Dispatcher::singleton().findSchemaOrThrow("stepscope::classification_update", "").schema();
  const std::vector<std::string> names = {"preds", "target", "state", "task", "num_classes", "top_k",
                                          "ignore_index", "threshold", "input_kind", "confusion_matrix"};
  ASSERT_EQ(schema.arguments().size(), sm::OpArgs::kFirst + sm::OpArgs::kCount);
  for (size_t i = 0; i < names.size(); ++i) EXPECT_EQ(schema.arguments()[i].name(), names[i]);
}

// Scores that never share a bin: the binned AUROC and AP are the exact ones (0.75 and 5/6 here).
TEST(Binned, DistinctBinsGiveTheExactScores) {
  sm::Config c;
  c.task = sm::Task::kBinary;
  c.input = sm::InputKind::kProbs;
  c.thresholds = 101;
  sm::Accumulator acc(c, torch::kCPU);
  acc.update(torch::tensor({0.1f, 0.4f, 0.35f, 0.8f}), torch::tensor({0, 0, 1, 1}));
  auto m = acc.compute();
  EXPECT_NEAR(m.at("auroc").item<double>(), 0.75, 1e-6);
  EXPECT_NEAR(m.at("average_precision").item<double>(), 5.0 / 6.0, 1e-6);
  EXPECT_EQ(acc.layout().binned + 2 * 102, acc.layout().numel);
}

TEST(OpArgs, ParseChecksTheConfiguration) {
  sm::Config c;
  c.num_classes = 4;
  c10::Stack stack;
  sm::OpArgs(c).push(stack);
  stack[1] = c10::IValue(int64_t{0});  // num_classes
  EXPECT_THROW(sm::OpArgs::parse(stack, 0), c10::Error);
  stack[1] = c10::IValue(int64_t{4});
  stack[0] = c10::IValue(int64_t{7});  // no such task
  EXPECT_THROW(sm::OpArgs::parse(stack, 0), c10::Error);
}

TEST(RowMath, EceBinMatchesTorchBucketize) {
  auto edges = torch::linspace(0, 1, sm::kNumEceBins + 1, torch::kFloat);
  std::mt19937 g(123);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> xs = {0.f, 1.f, 0.5f, 1.f / 15.f, 2.f / 15.f, 14.f / 15.f};
  for (int i = 0; i < 11; ++i) xs.push_back(edges[i].item<float>());
  for (int i = 0; i < 2000; ++i) xs.push_back(u(g));
  auto xt = torch::tensor(xs);
  auto ref = torch::bucketize(xt, edges, /*out_int32=*/false, /*right=*/true) - 1;
  for (size_t i = 0; i < xs.size(); ++i) EXPECT_EQ(sm::ece_bin(xs[i]), ref[i].item<int64_t>()) << xs[i];
}

TEST(RowMath, ExpNonposIsAccurate) {
  for (float x = -80.f; x <= 0.f; x += 0.013f) {
    const double ref = std::exp(static_cast<double>(x));
    EXPECT_NEAR(sm::exp_nonpos(x) / ref, 1.0, 3e-7) << x;
  }
}

TEST(RowMath, OnlineMergeEqualsSequential) {
  std::mt19937 g(7);
  std::normal_distribution<float> nd(0.f, 3.f);
  for (int rep = 0; rep < 50; ++rep) {
    const int C = 1 + rep * 7;
    std::vector<float> x(C);
    for (auto& v : x) v = nd(g);
    if (C > 3) x[2] = x[1];  // a tie
    const int t = rep % C;
    sm::RowState seq = sm::row_identity(), a = sm::row_identity(), b = sm::row_identity();
    for (int j = 0; j < C; ++j) {
      sm::row_push<true>(seq, x[j], j, x[t], t);
      sm::row_push<true>(j % 2 ? a : b, x[j], j, x[t], t);
    }
    const auto m = sm::row_merge<true>(a, b);
    EXPECT_EQ(m.argmax, seq.argmax);
    EXPECT_EQ(m.above, seq.above);
    EXPECT_NEAR(m.sumexp, seq.sumexp, 1e-5 * seq.sumexp);
    int ref_arg = 0;
    for (int j = 1; j < C; ++j)
      if (x[j] > x[ref_arg]) ref_arg = j;
    EXPECT_EQ(seq.argmax, ref_arg);
  }
}

// Named multiclass cases, run on each device and dtype: the data is fresh every run (seed printed).
struct McCase {
  const char* name;
  int64_t C, N;
  std::optional<int64_t> ignore;
  bool invalid_targets;
};
const McCase kMcCases[] = {
    {"two_classes", 2, 2000, std::nullopt, false},
    {"ten_classes_ignore", 10, 3000, -1, false},
    {"forty_classes_invalid", 40, 1500, std::nullopt, true},
    {"one_class", 1, 300, std::nullopt, false},
    {"empty_batch", 5, 0, -1, false},
    {"thousand_classes", 1000, 400, -1, true},
};

using McParam = std::tuple<McCase, c10::DeviceType, c10::ScalarType>;
class AccumulatorTest : public ::testing::TestWithParam<McParam> {};

TEST_P(AccumulatorTest, MulticlassCountsMatchNaive) {
  const auto& [cs, dev, dtype] = GetParam();
  if (dev == c10::DeviceType::CUDA && !torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (dev == c10::DeviceType::CUDA && dtype == torch::kDouble) GTEST_SKIP() << "float64 preds are CPU-only";
  const uint32_t seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  torch::manual_seed(seed);
  const int64_t C = cs.C, N = cs.N;
  std::vector<int64_t> ks = {1};
  if (C >= 3) ks.push_back(3);
  sm::Config cfg;
  cfg.num_classes = C;
  cfg.top_k = ks;
  cfg.ignore_index = cs.ignore;
  const torch::Device device(dev);
  sm::Accumulator acc(cfg, device);
  // Values of the tested dtype: the reference reads them exactly (upcast to float64).
  auto logits = (torch::randn({N, C}) * 3).to(dtype);
  auto target = torch::randint(cs.ignore ? -1 : 0, C + (cs.invalid_targets ? 1 : 0), {N}, torch::kLong);
  // Two updates, split unevenly: accumulation must equal one pass.
  const int64_t h = N / 3;
  acc.update(logits.slice(0, 0, h).to(device), target.slice(0, 0, h).to(device));
  acc.update(logits.slice(0, h).to(device), target.slice(0, h).to(device));
  const Naive ref = naive_multiclass(logits, target, C, ks, cs.ignore);
  const auto& L = acc.layout();
  auto s = acc.state().cpu();
  for (int64_t c = 0; c < C; ++c) {
    EXPECT_EQ(s[L.tp + c].item<double>(), ref.tp[c]);
    EXPECT_EQ(s[L.pred + c].item<double>(), ref.pc[c]);
    EXPECT_EQ(s[L.target + c].item<double>(), ref.tc[c]);
  }
  for (int64_t i = 0; i < C * C; ++i) EXPECT_EQ(s[L.confmat + i].item<double>(), ref.confmat[i]);
  for (size_t k = 0; k < ks.size(); ++k) EXPECT_EQ(s[L.topk + k].item<double>(), ref.topk_hits[k]);
  EXPECT_EQ(s[L.valid].item<double>(), ref.n);
  EXPECT_EQ(s[L.invalid].item<double>(), ref.invalid);
  EXPECT_EQ(s[L.ignored].item<double>(), ref.ignored);
  EXPECT_NEAR(s[L.loss].item<double>(), ref.loss, 1e-5 * std::max(1.0, ref.loss));

  const auto m = acc.compute(1.0, /*check=*/false);
  const double micro = ref.n ? static_cast<double>(std::accumulate(ref.tp.begin(), ref.tp.end(), int64_t{0})) / ref.n : 0;
  EXPECT_NEAR(m.at("accuracy").item<double>(), micro, 1e-6);
  // Macro F1 over classes that appear in targets or predictions.
  double f1 = 0;
  int used = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t fp = ref.pc[c] - ref.tp[c], fn = ref.tc[c] - ref.tp[c];
    if (ref.tp[c] + fp + fn == 0) continue;
    f1 += 2.0 * ref.tp[c] / (2.0 * ref.tp[c] + fp + fn);
    used++;
  }
  EXPECT_NEAR(m.at("f1_macro").item<double>(), used ? f1 / used : 0.0, 1e-6);
  auto cm = acc.compute(1.0, false).at("confusion_matrix");
  EXPECT_EQ(cm.dtype(), torch::kLong);
  EXPECT_EQ(cm.sum().item<int64_t>(), ref.n);
  if (ref.invalid > 0) {
    EXPECT_THROW(acc.compute(), c10::Error);
  }
  acc.reset();
  EXPECT_EQ(acc.state().abs().sum().item<double>(), 0.0);
}

std::string mc_case_name(const ::testing::TestParamInfo<McParam>& info) {
  const McCase& cs = std::get<0>(info.param);
  const bool cuda = std::get<1>(info.param) == c10::DeviceType::CUDA;
  return std::string(cs.name) + (cuda ? "_cuda_" : "_cpu_") + c10::toString(std::get<2>(info.param));
}

INSTANTIATE_TEST_SUITE_P(DeviceDtype, AccumulatorTest,
                         ::testing::Combine(::testing::ValuesIn(kMcCases),
                                            ::testing::Values(c10::DeviceType::CPU, c10::DeviceType::CUDA),
                                            ::testing::Values(torch::kFloat, torch::kHalf, torch::kBFloat16,
                                                              torch::kDouble)),
                         mc_case_name);

TEST(Accumulator, BadInputIsRefusedBeforeAnyChange) {
  sm::Config cfg;
  cfg.num_classes = 4;
  sm::Accumulator acc(cfg, torch::kCPU);
  EXPECT_THROW(acc.update(torch::randn({8, 5}), torch::zeros({8}, torch::kLong)), c10::Error);
  EXPECT_THROW(acc.update(torch::randn({8, 4}), torch::zeros({7}, torch::kLong)), c10::Error);
  EXPECT_THROW(acc.update(torch::randn({8, 4}), torch::zeros({8}, torch::kFloat)), c10::Error);
  EXPECT_THROW(acc.update(torch::zeros({8, 4}, torch::kLong), torch::zeros({8}, torch::kLong)), c10::Error);
  EXPECT_EQ(acc.state().abs().sum().item<double>(), 0.0);
  try {
    acc.update(torch::randn({64, 4}), torch::zeros({32}, torch::kLong));
    ADD_FAILURE() << "a [64, 4] / [32] update was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("got preds [64, 4] and target [32]"), std::string::npos) << e.what();
  }
}

TEST(RowMath, BinaryElementComparesInTheInputsPrecision) {
  // 0.50000001 rounds to 0.5f: as float it is not above a 0.5 threshold, as double it is.
  EXPECT_FALSE(sm::binary_element(static_cast<float>(0.50000001), false, 0.5f, 1).pred);
  const auto r = sm::binary_element(0.50000001, false, 0.5, 1);
  EXPECT_TRUE(r.pred);
  EXPECT_DOUBLE_EQ(r.prob, 0.50000001);
  // A logit finite in double but past float's range: a probability, not NaN.
  const auto big = sm::binary_element(1e300, true, 0.5, 1);
  EXPECT_TRUE(big.pred);
  EXPECT_EQ(big.prob, 1.0);
  EXPECT_EQ(big.loss, 0.0);
}

TEST(Accumulator, WideUnsignedTargetsCountAsInvalid) {
  sm::Config cfg;
  cfg.num_classes = 4;
  cfg.ignore_index = -1;
  sm::Accumulator acc(cfg, torch::kCPU);
  auto t = torch::tensor({int64_t{3}, int64_t{1}}, torch::kLong).to(torch::kUInt64);
  auto wide = torch::full({3}, -1, torch::kLong).to(torch::kUInt64);  // 2^64 - 1: -1 once wrapped
  acc.update(torch::randn({5, 4}), torch::cat({t, wide}));
  auto m = acc.compute(1.0, /*check=*/false);
  EXPECT_EQ(m.at("samples").item<int64_t>(), 2);
  EXPECT_EQ(m.at("invalid_target").item<int64_t>(), 3);
  EXPECT_EQ(m.at("ignored").item<int64_t>(), 0);
}

TEST(Accumulator, BinaryAndMultilabel) {
  sm::Config cfg;
  cfg.task = sm::Task::kMultilabel;
  cfg.num_classes = 3;
  cfg.top_k = {};
  sm::Accumulator acc(cfg, torch::kCPU);
  auto p = torch::tensor({{0.9f, 0.2f, 0.6f}, {0.1f, 0.8f, 0.4f}});
  auto t = torch::tensor({{1, 0, 0}, {0, 1, 1}});
  acc.update(p, t);
  auto m = acc.compute();
  // per label: l0 tp=1 tn=1; l1 tp=1 tn=1; l2 fp=1 fn=1 -> hamming micro = 4/6
  EXPECT_NEAR(m.at("accuracy").item<double>(), 4.0 / 6.0, 1e-6);
  EXPECT_EQ(m.at("confusion_matrix").sizes(), (std::vector<int64_t>{3, 2, 2}));
}

// The SIMD row kernel against the online reference (row_push) for every short length, each
// target position, ties and a non-finite value; skipped where the CPU has no AVX2/FMA/F16C.
TEST(RowSimd, MatchesTheOnlineReference) {
  if (!sm::simd::enabled()) GTEST_SKIP() << "no AVX2/FMA/F16C (or STEPSCOPE_CPU_SIMD=0)";
  std::mt19937 g(std::random_device{}());
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (int C = 1; C <= 40; ++C) {
    for (int t = 0; t < C; ++t) {
      std::vector<float> x(C);
      for (auto& v : x) v = nd(g);
      if (C > 3) x[C - 1] = x[t];  // a tie with the target
      if (C > 5) x[3] = x[1];
      sm::RowState ref = sm::row_identity();
      for (int j = 0; j < C; ++j) sm::row_push<true>(ref, x[j], j, x[t], t);
      const auto r = sm::simd::row_f32(x.data(), C, t, true);
      ASSERT_TRUE(r.finite);
      EXPECT_EQ(r.argmax, ref.argmax) << "C=" << C << " t=" << t;
      EXPECT_EQ(r.above, ref.above) << "C=" << C << " t=" << t;
      EXPECT_EQ(r.max, ref.max);
      EXPECT_NEAR(r.sumexp, ref.sumexp, 1e-5f * ref.sumexp);
      x[(t + 1) % C] = std::numeric_limits<float>::infinity();
      EXPECT_FALSE(sm::simd::row_f32(x.data(), C, t, true).finite) << "C=" << C;
    }
  }
}

// Every multiclass and elementwise count equal with the SIMD path on and off (the portable loops).
TEST(RowSimd, SwitchedOffGivesTheSameState) {
  if (!sm::simd::enabled()) GTEST_SKIP() << "no AVX2/FMA/F16C (or STEPSCOPE_CPU_SIMD=0)";
  torch::manual_seed(std::random_device{}());
  for (auto task : {sm::Task::kMulticlass, sm::Task::kBinary, sm::Task::kMultilabel}) {
    for (auto dtype : {torch::kFloat, torch::kHalf, torch::kBFloat16}) {
      sm::Config cfg;
      cfg.task = task;
      cfg.num_classes = task == sm::Task::kBinary ? 0 : 13;
      cfg.top_k = task == sm::Task::kMulticlass ? std::vector<int64_t>{1, 3} : std::vector<int64_t>{};
      cfg.ignore_index = -1;
      auto x = (torch::randn(task == sm::Task::kBinary ? std::vector<int64_t>{517} : std::vector<int64_t>{517, 13}) * 3)
                   .to(dtype);
      auto t = task == sm::Task::kMulticlass ? torch::randint(-1, 14, {517}, torch::kLong)
                                             : torch::randint(-1, 3, x.sizes(), torch::kLong);
      sm::Accumulator fast(cfg, torch::kCPU), slow(cfg, torch::kCPU);
      fast.update(x, t);
      const bool prev = sm::simd::set_enabled(false);
      slow.update(x, t);
      sm::simd::set_enabled(prev);
      const auto& L = fast.layout();
      auto a = fast.state().clone(), b = slow.state().clone();
      EXPECT_NEAR(a[L.loss].item<double>(), b[L.loss].item<double>(), 1e-5 * std::abs(b[L.loss].item<double>()));
      a.narrow(0, L.ece_conf, sm::kEceSlots).zero_();
      b.narrow(0, L.ece_conf, sm::kEceSlots).zero_();
      a[L.loss] = 0;
      b[L.loss] = 0;
      EXPECT_TRUE(torch::equal(a, b)) << "task " << static_cast<int>(task) << " dtype " << dtype;
    }
  }
}

}  // namespace
