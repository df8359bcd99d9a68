// Gradient statistics: the layout, the histogram, the CPU body against a float64 reference, the
// device-agnostic ATen body (the one registered for CUDA) against the CPU body, the argument
// checks, and the GradStats class, all on CPU through the dispatcher.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <vector>

#include "health/grad_stats.h"
#include "health/layout.h"

namespace sh = stepscope::health;

namespace {

using Grads = std::vector<std::optional<at::Tensor>>;

sh::GradList to_list(const Grads& g) {
  sh::GradList l;
  for (const auto& t : g) l.push_back(t);
  return l;
}

void call_op(const Grads& g, at::Tensor& state, int64_t step, int64_t slot) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("stepscope::grad_stats_update", "")
                             .typed<void(const sh::GradList&, at::Tensor&, int64_t, int64_t)>();
  op.call(to_list(g), state, step, slot);
}

double ref_norm(const at::Tensor& g) { return g.to(at::kDouble).norm().item<double>(); }

// A mixed list: dtypes, a transposed and an expanded (stride 0) gradient, an empty one, a None.
Grads mixed_grads(uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({7, 5}), torch::randn({33}).to(at::kHalf), torch::randn({4, 9}).to(at::kBFloat16),
          torch::randn({6, 3}, at::kDouble).t(), torch::randn({1, 5}).expand({4, 5}), std::nullopt,
          torch::randn({0, 3}), torch::randn({3, 4, 5}).permute({2, 0, 1})};
}

}  // namespace

TEST(HealthLayout, BlocksTileTheState) {
  const sh::HealthLayout l(5, 7);
  EXPECT_EQ(l.numel, sh::HealthLayout::kFixedLen + 8 * 5 + 3 * 7);
  EXPECT_EQ(l.bytes(), 8 * l.numel);
  EXPECT_EQ(l.hist, sh::kHeaderLen);
  EXPECT_EQ(l.norm_last, sh::kHeaderLen + sh::kHistLen);
  EXPECT_EQ(l.no_grad_steps + 5, l.ring_step);
  EXPECT_EQ(l.ring_nonfinite + 7, l.numel);
}

TEST(HealthHist, BinsAndQuantiles) {
  EXPECT_EQ(sh::hist_bin(0.0), 0);
  EXPECT_EQ(sh::hist_bin(1e-13), 0);
  EXPECT_EQ(sh::hist_bin(1e12), sh::kHistOverflow);
  EXPECT_EQ(sh::hist_bin(std::nan("")), sh::kHistNonfinite);
  EXPECT_EQ(sh::hist_bin(std::numeric_limits<double>::infinity()), sh::kHistNonfinite);
  for (double x : {1e-11, 3e-5, 1.0, 2.5, 7e8}) {
    const int64_t b = sh::hist_bin(x);
    EXPECT_LE(sh::hist_edge(b), x * (1 + 1e-12));
    EXPECT_GT(sh::hist_edge(b + 1), x * (1 - 1e-12));
  }
  std::vector<double> hist(sh::kHistLen, 0.0);
  EXPECT_EQ(sh::hist_quantile(hist.data(), 0.5), 0.0);
  hist[sh::hist_bin(2.0)] = 10;
  hist[sh::kHistNonfinite] = 100;  // non-finite norms are not part of the quantiles
  const double half_bin = std::pow(10.0, 1.0 / (2.0 * sh::kBinsPerDecade));
  EXPECT_NEAR(sh::hist_quantile(hist.data(), 0.5) / 2.0, 1.0, half_bin - 1);
}

TEST(HealthCpu, MatchesFloat64Reference) {
  const Grads g = mixed_grads(1);
  at::Tensor state = sh::new_state(static_cast<int64_t>(g.size()), 4, at::TensorOptions());
  call_op(g, state, 10, 0);
  const sh::HealthReading r = sh::read_state(state, static_cast<int64_t>(g.size()));
  double sq = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    if (!g[i]) {
      EXPECT_TRUE(r.params[i].no_grad_last);
      EXPECT_EQ(r.params[i].no_grad_steps, 1);
      continue;
    }
    const double n = ref_norm(*g[i]);
    sq += n * n;
    // float64 gradients sum in float64; narrower ones in float32 blocks (grad_stats_cpu.cpp).
    const double rel = g[i]->scalar_type() == at::kDouble ? 1e-12 : 1e-6;
    EXPECT_NEAR(r.params[i].norm_last, n, rel * (1 + n)) << "parameter " << i;
    EXPECT_FALSE(r.params[i].no_grad_last);
  }
  EXPECT_EQ(r.steps, 1);
  EXPECT_NEAR(r.grad_norm.last, std::sqrt(sq), 1e-6 * std::sqrt(sq));
  EXPECT_EQ(r.grad_norm.count, 1);
  EXPECT_EQ(r.first_nonfinite_step, -1);
  EXPECT_EQ(r.first_nonfinite_param, -1);
  ASSERT_EQ(r.recent.size(), 1u);
  EXPECT_EQ(r.recent[0].step, 10);
}

TEST(HealthCpu, CountsNonfiniteElementsAndNamesTheFirst) {
  at::Tensor state = sh::new_state(3, 8, at::TensorOptions());
  for (int64_t step = 0; step < 5; ++step) {
    at::Tensor a = torch::randn({10}), b = torch::randn({4, 4}).to(at::kHalf), c = torch::randn({3});
    if (step == 2) {
      b[1][2] = std::numeric_limits<float>::quiet_NaN();
      b[3][0] = std::numeric_limits<float>::infinity();
      c[0] = -std::numeric_limits<float>::infinity();
    }
    if (step == 4) a[0] = std::numeric_limits<float>::quiet_NaN();
    call_op({a, b, c}, state, 100 + step, step % 8);
  }
  const sh::HealthReading r = sh::read_state(state, 3);
  EXPECT_EQ(r.nonfinite_steps, 2);
  EXPECT_EQ(r.first_nonfinite_step, 102);
  EXPECT_EQ(r.first_nonfinite_param, 1);
  EXPECT_EQ(r.params[0].nonfinite_elements, 1);
  EXPECT_EQ(r.params[1].nonfinite_elements, 2);
  EXPECT_EQ(r.params[2].nonfinite_elements, 1);
  EXPECT_EQ(r.params[1].nonfinite_steps, 1);
  EXPECT_EQ(r.grad_norm.count, 3);
  EXPECT_EQ(r.recent[2].nonfinite, 3);
  EXPECT_TRUE(std::isnan(r.recent[4].grad_norm));
  EXPECT_TRUE(std::isfinite(r.params[1].norm_max));
}

TEST(HealthAten, AgreesWithCpuBody) {
  const int64_t p = 8;
  at::Tensor cpu = sh::new_state(p, 3, at::TensorOptions());
  at::Tensor aten = cpu.clone();
  for (int64_t step = 0; step < 7; ++step) {
    Grads g = mixed_grads(100 + step);
    if (step == 3) g[0]->view(-1)[4] = std::numeric_limits<float>::quiet_NaN();
    if (step == 5) g[2] = std::nullopt;
    const sh::GradStatsInputs in = sh::prepare_grad_stats(to_list(g), cpu, step, step % 3);
    sh::grad_stats_cpu(in, cpu);
    sh::grad_stats_aten(in, aten);
  }
  // Norms: float32 accumulation in _foreach_norm against float64; counts: identical here, since the
  // one non-finite parameter has a single NaN (the ATen body counts parameters, not elements).
  EXPECT_TRUE(torch::allclose(cpu, aten, 1e-5, 1e-9, /*equal_nan=*/true))
      << (cpu - aten).abs().nan_to_num(0).max().item<double>();
  const sh::HealthReading r = sh::read_state(aten, p);
  EXPECT_EQ(r.first_nonfinite_step, 3);
  EXPECT_EQ(r.first_nonfinite_param, 0);
  EXPECT_EQ(r.params[2].no_grad_steps, 1);
  EXPECT_EQ(r.params[5].no_grad_steps, 7);
}

TEST(HealthAten, AllAbsentAndEmpty) {
  at::Tensor s = sh::new_state(2, 2, at::TensorOptions());
  const sh::GradStatsInputs in = sh::prepare_grad_stats(to_list({std::nullopt, std::nullopt}), s, 0, 0);
  sh::grad_stats_aten(in, s);
  const sh::HealthReading r = sh::read_state(s, 2);
  EXPECT_EQ(r.params[0].no_grad_steps, 1);
  EXPECT_EQ(r.grad_norm.last, 0.0);
  at::Tensor s0 = sh::new_state(0, 1, at::TensorOptions());
  sh::grad_stats_aten(sh::prepare_grad_stats(to_list({}), s0, 0, 0), s0);
  EXPECT_EQ(sh::read_state(s0, 0).steps, 1);
}

TEST(HealthRing, WrapsOldestFirst) {
  sh::GradStats gs(1, 4);
  for (int64_t step = 0; step < 10; ++step) gs.update({torch::full({2}, static_cast<float>(step))}, step * 3);
  const sh::HealthReading r = gs.read();
  ASSERT_EQ(r.recent.size(), 4u);
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(r.recent[k].step, (6 + k) * 3);
    EXPECT_NEAR(r.recent[k].grad_norm, (6 + k) * std::sqrt(2.0), 1e-6);
  }
  EXPECT_EQ(r.grad_norm.count, 10);
  EXPECT_EQ(r.grad_norm.min, 0.0);
  EXPECT_NEAR(r.grad_norm.max, 9 * std::sqrt(2.0), 1e-6);
  gs.reset();
  EXPECT_EQ(gs.read().steps, 0);
  EXPECT_TRUE(gs.read().recent.empty());
}

TEST(HealthApi, UpdateFromParameters) {
  torch::nn::Linear lin(4, 3);
  torch::nn::Linear unused(2, 2);
  std::vector<at::Tensor> params = lin->parameters();
  for (const auto& p : unused->parameters()) params.push_back(p);
  sh::GradStats gs(static_cast<int64_t>(params.size()), 16);
  for (int64_t step = 0; step < 3; ++step) {
    lin->zero_grad();
    lin->forward(torch::randn({8, 4})).pow(2).sum().backward();
    gs.update_from_params(params, step);
  }
  const sh::HealthReading r = gs.read();
  EXPECT_EQ(r.steps, 3);
  EXPECT_EQ(r.params[0].no_grad_steps, 0);
  EXPECT_EQ(r.params[2].no_grad_steps, 3);
  EXPECT_EQ(r.params[3].no_grad_steps, 3);
  EXPECT_NEAR(r.params[0].norm_last, ref_norm(lin->weight.grad()), 1e-5);
}

TEST(HealthChecks, RefuseBadCalls) {
  at::Tensor s = sh::new_state(1, 2, at::TensorOptions());
  const auto throws = [&](const Grads& g, at::Tensor st, int64_t step, int64_t slot, const char* words) {
    try {
      call_op(g, st, step, slot);
      ADD_FAILURE() << "no error for: " << words;
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
  };
  throws({torch::randn({3})}, s.to(at::kFloat), 0, 0, "state must be float64");
  throws({torch::randn({3}), torch::randn({3})}, s, 0, 0, "with P = 2");
  throws({torch::randn({3})}, s, 0, 2, "slot must be in [0, ring) = [0, 2)");
  throws({torch::randn({3})}, s, -1, 0, "step must be >= 0");
  throws({torch::ones({3}, at::kInt)}, s, 0, 0, "grads[0] must be float32");
  throws({torch::randn({3}).to_sparse()}, s, 0, 0, "sparse gradients are not supported");
  throws({torch::randn({3})}, s.narrow(0, 1, s.numel() - 1), 0, 0, "contiguous 1-D tensor");
  EXPECT_EQ(sh::read_state(s, 1).steps, 0);  // nothing was touched
}
