// health::Watch, the Monitor's training health without Python: once per step, the modes (skip
// drops the gradients, raise keeps the weights), the sampled update ratio against SGD by hand,
// the loss ring, and the cases that switch it off instead of failing the training.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cctype>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "health/watch.h"

namespace sh = stepscope::health;

namespace {

struct Model {
  std::vector<at::Tensor> params;
  explicit Model(uint64_t seed) {
    torch::manual_seed(seed);
    params = {torch::randn({6, 4}).requires_grad_(), torch::randn({6}).requires_grad_()};
  }
  void backward() {
    auto x = torch::randn({3, 4});
    (torch::matmul(x, params[0].t()) + params[1]).pow(2).mean().backward();
  }
  void sgd(double lr) {
    torch::NoGradGuard g;
    for (auto& p : params) {
      if (p.grad().defined()) p.sub_(lr * p.grad());
    }
  }
  void zero() {
    for (auto& p : params) p.mutable_grad() = at::Tensor();
  }
};

const std::vector<std::string> kNames = {"w", "b"};

}  // namespace

TEST(HealthWatch, OncePerStepAndTheRatioOfSgd) {
  Model m(3);
  sh::WatchOptions o;
  o.ratio_every = 2;
  sh::Watch w(m.params, kNames, o);
  std::vector<double> hand;
  for (int64_t step = 0; step < 5; ++step) {
    m.backward();
    if (step % 2 == 0) {
      double dw2 = 0, w2 = 0;
      for (auto& p : m.params) {
        dw2 += (0.1 * p.grad()).pow(2).sum().item<double>();
        w2 += p.detach().pow(2).sum().item<double>();
      }
      hand.push_back(std::sqrt(dw2 / w2));
    }
    EXPECT_EQ(w.before_update(step), sh::Watch::kProceed);
    EXPECT_EQ(w.before_update(step), sh::Watch::kProceed);  // a second optimizer: not measured again
    m.sgd(0.1);
    w.after_update();
    m.zero();
  }
  EXPECT_EQ(w.read().steps, 5);
  const auto samples = w.read_ratio();
  ASSERT_EQ(samples.size(), hand.size());
  for (size_t k = 0; k < samples.size(); ++k) {
    double dw2 = 0, w2 = 0;
    for (size_t i = 0; i < 2; ++i) {
      dw2 += samples[k].dw[i] * samples[k].dw[i];
      w2 += samples[k].w[i] * samples[k].w[i];
    }
    EXPECT_EQ(samples[k].step, static_cast<int64_t>(2 * k));
    EXPECT_NEAR(std::sqrt(dw2 / w2), hand[k], 1e-6 * hand[k]);
  }
}

TEST(HealthWatch, SkipDropsTheGradientsAndRaiseKeepsThem) {
  for (auto mode : {sh::OnNonfinite::kSkip, sh::OnNonfinite::kRaise, sh::OnNonfinite::kWarn}) {
    Model m(5);
    sh::WatchOptions o;
    o.nonfinite = mode;
    sh::Watch w(m.params, kNames, o);
    m.backward();
    m.params[1].mutable_grad()[2] = std::numeric_limits<float>::quiet_NaN();
    const auto out = w.before_update(0);
    if (mode == sh::OnNonfinite::kSkip) {
      EXPECT_EQ(out, sh::Watch::kSkipped);
      EXPECT_FALSE(m.params[0].grad().defined());
      EXPECT_FALSE(m.params[1].grad().defined());
      EXPECT_EQ(w.skipped(), 1);
    } else if (mode == sh::OnNonfinite::kRaise) {
      EXPECT_EQ(out, sh::Watch::kRaise);
      EXPECT_TRUE(m.params[1].grad().defined());
      EXPECT_NE(w.nonfinite_message().find("step 0 in 'b'"), std::string::npos) << w.nonfinite_message();
      EXPECT_EQ(w.before_update(0), sh::Watch::kRaise);  // the retry of a raised step is measured
    } else {
      EXPECT_EQ(out, sh::Watch::kProceed);
    }
    EXPECT_EQ(w.read().first_nonfinite_param, 1);
  }
}

TEST(HealthWatch, LossRingAndFirstNonfinite) {
  Model m(7);
  sh::WatchOptions o;
  o.ring = 3;
  sh::Watch w(m.params, kNames, o);
  for (int64_t step = 0; step < 5; ++step) {
    w.observe_loss(torch::tensor({step == 1 ? std::numeric_limits<float>::infinity() : 0.5f * step}), step);
  }
  const auto r = w.read_loss();
  EXPECT_EQ(r.count, 5);
  EXPECT_EQ(r.first_nonfinite_step, 1);
  ASSERT_EQ(r.recent.size(), 3u);
  EXPECT_EQ(r.recent.front().first, 2);
  EXPECT_DOUBLE_EQ(r.recent.back().second, 2.0);
  EXPECT_THROW(w.observe_loss(torch::ones({2}), 5), c10::ValueError);
  EXPECT_THROW(w.observe_loss(torch::tensor({1}), 5), c10::TypeError);
  w.reset();
  EXPECT_EQ(w.read_loss().count, 0);
}

TEST(HealthWatch, RefusedGradientsSwitchItOff) {
  auto emb = torch::randn({5, 3}).requires_grad_();
  sh::Watch w({emb}, {"emb"});
  emb.mutable_grad() = torch::randn({5, 3}).to_sparse();
  EXPECT_EQ(w.before_update(0), sh::Watch::kProceed);
  std::string why = w.disabled();
  for (char& c : why) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  EXPECT_NE(why.find("sparse"), std::string::npos) << w.disabled();
  EXPECT_EQ(w.before_update(1), sh::Watch::kProceed);  // off: nothing more is measured
  EXPECT_EQ(w.read().steps, 0);

  sh::WatchOptions o;
  o.ratio_max_bytes = 16;
  Model m(9);
  sh::Watch small(m.params, kNames, o);
  EXPECT_NE(small.ratio_off().find("ratio_max_bytes"), std::string::npos);
  EXPECT_THROW(sh::Watch(m.params, {"only one"}), c10::Error);
  EXPECT_THROW(sh::parse_nonfinite("ignore"), c10::ValueError);
}
