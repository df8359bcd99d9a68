// Regression metrics from plain LibTorch: the op through the dispatcher against a float64
// two-pass reference at a large offset, the ATen body (the one registered for CUDA) against it,
// the merge of split states against one state, and the argument checks.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <string>

#include "regression/regression.h"

namespace rg = stepscope::regression;

namespace {

void call_op(const at::Tensor& p, const at::Tensor& t, at::Tensor& state, int64_t k) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("stepscope::regression_update", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, at::Tensor&, int64_t)>();
  op.call(p, t, state, k);
}

std::map<std::string, double> scalars(const at::Tensor& state) {
  std::map<std::string, double> out;
  for (auto& [k, v] : rg::compute(state)) {
    if (v.numel() == 1) out[k] = v.to(at::kDouble).item<double>();
  }
  return out;
}

TEST(Regression, MatchesATwoPassReferenceAtAnOffset) {
  torch::manual_seed(7);
  const auto t = torch::randn({100000}, at::kDouble) * 2 + 1e6;
  const auto p = t + 0.5 * torch::randn({100000}, at::kDouble);
  auto state = torch::zeros({rg::kFields}, at::kDouble);
  for (int64_t i = 0; i < 100000; i += 7777) call_op(p.slice(0, i, i + 7777), t.slice(0, i, i + 7777), state, 1);
  const auto e = p - t;
  const double mse = (e * e).mean().item<double>();
  const double var_t = ((t - t.mean()) * (t - t.mean())).mean().item<double>();
  auto got = scalars(state);
  EXPECT_NEAR(got["mse"], mse, 1e-12 * mse);
  EXPECT_NEAR(got["r2"], 1 - mse / var_t, 1e-10);
  EXPECT_NEAR(got["mae"], e.abs().mean().item<double>(), 1e-12);
  EXPECT_EQ(got["samples"], 100000);

  auto aten = torch::zeros({rg::kFields}, at::kDouble);
  rg::update_aten(p, t, aten, 1);
  auto via_aten = scalars(aten);
  for (auto& [k, v] : got) EXPECT_NEAR(via_aten[k], v, 1e-9 * std::max(1.0, std::fabs(v))) << k;
}

TEST(Regression, SplitStatesMergeToTheWhole) {
  torch::manual_seed(3);
  const auto t = torch::randn({3000, 3}, at::kFloat);
  const auto p = t + torch::rand({3000, 3}, at::kFloat);
  auto whole = torch::zeros({3 * rg::kFields}, at::kDouble);
  call_op(p, t, whole, 3);
  auto a = torch::zeros_like(whole), b = torch::zeros_like(whole);
  call_op(p.slice(0, 0, 1000), t.slice(0, 0, 1000), a, 3);
  call_op(p.slice(0, 1000), t.slice(0, 1000), b, 3);
  rg::merge(a, b);
  auto x = scalars(whole), y = scalars(a);
  for (auto& [k, v] : x) EXPECT_NEAR(y[k], v, 1e-12 * std::max(1.0, std::fabs(v))) << k;
}

TEST(Regression, RefusesBadCallsBeforeTouchingTheState) {
  auto state = torch::zeros({2 * rg::kFields}, at::kDouble);
  EXPECT_THROW(call_op(torch::zeros({4, 3}), torch::zeros({4, 3}), state, 2), c10::ValueError);
  EXPECT_THROW(call_op(torch::zeros({4, 2}), torch::zeros({4, 1}), state, 2), c10::ValueError);
  EXPECT_THROW(call_op(torch::zeros({4, 2}, at::kLong), torch::zeros({4, 2}), state, 2), c10::TypeError);
  auto small = torch::zeros({rg::kFields}, at::kDouble);
  EXPECT_THROW(call_op(torch::zeros({4, 2}), torch::zeros({4, 2}), small, 2), c10::ValueError);
  EXPECT_TRUE(state.eq(0).all().item<bool>());
}

}  // namespace
