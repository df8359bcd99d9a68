// A LibTorch training loop timed with the stepscope Timeline, scored with the metrics
// Accumulator and watched by the training health (health::Watch), the C++ counterpart of
// `with stepscope.Monitor(model, opt)`:
//
//   ./train_cpp [--steps N] [--cuda]
//
// A tiny MLP learns a synthetic 4-class problem (the class is the quadrant of the first two
// features). Forward, backward and optimizer step are RAII scoped phases; the gaps between them
// (data, loss, other) are timed by the Timeline with nothing to mark. Exits non-zero if the
// summary misses a phase, the model did not learn, or the health readings disagree with the last
// step's gradients, the steps or the losses.
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include "health/watch.h"
#include "metrics/accumulator.h"
#include "timing/timeline.h"

namespace st = stepscope::timing;

int main(int argc, char** argv) {
  int steps = 200;
  bool want_cuda = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) steps = std::atoi(argv[++i]);
    if (std::strcmp(argv[i], "--cuda") == 0) want_cuda = true;
  }
  const bool cuda = want_cuda && torch::cuda::is_available();
  const torch::Device dev = cuda ? torch::kCUDA : torch::kCPU;
  torch::manual_seed(0);

  torch::nn::Sequential model(torch::nn::Linear(16, 64), torch::nn::ReLU(), torch::nn::Linear(64, 4));
  model->to(dev);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));

  stepscope::metrics::Config cfg;
  cfg.num_classes = 4;
  cfg.top_k = {1, 2};
  stepscope::metrics::Accumulator metrics(cfg, dev);

  // The global and per-parameter gradient norms, non-finite counts and missing gradients of every
  // step, the loss, and the update ratio on one step in 50, kept on the device: nothing is read
  // back until read().
  std::vector<torch::Tensor> params;
  std::vector<std::string> names;
  for (const auto& kv : model->named_parameters()) {
    names.push_back(kv.key());
    params.push_back(kv.value());
  }
  stepscope::health::WatchOptions hopts;
  hopts.ratio_every = 50;
  stepscope::health::Watch health(params, names, hopts);

  st::TimelineOptions topts;
  topts.device = cuda;
  st::Timeline tl(topts);
  for (int s = 0; s < steps; ++s) {
    // data: everything before the forward begins
    const auto x = torch::randn({64, 16}, dev);
    const auto y = (x.select(1, 0) > 0).to(torch::kLong) * 2 + (x.select(1, 1) > 0).to(torch::kLong);
    torch::Tensor logits;
    {
      st::ScopedPhase p(tl, st::Phase::kForward, x.size(0));
      logits = model->forward(x);
    }
    // loss: from the forward's end to the backward's begin
    const auto loss = torch::nn::functional::cross_entropy(logits, y);
    health.observe_loss(loss, s);
    {
      st::ScopedPhase p(tl, st::Phase::kBackward);
      opt.zero_grad();
      loss.backward();
    }
    {
      st::ScopedPhase p(tl, "metrics");  // a user phase: one kernel, no host sync
      metrics.update(logits.detach(), y);
    }
    {
      st::ScopedPhase p(tl, "grad_stats");  // gradients final, before the update; no host sync
      health.before_update(s);              // kWarn (the default): always kProceed
    }
    {
      st::ScopedPhase p(tl, st::Phase::kOptimizer);  // its end ends the step
      opt.step();
    }
    health.after_update();  // the sampled update ratio
  }
  const auto report = tl.report();
  const std::string table = st::format_summary(report);
  std::cout << table;
  const auto m = metrics.compute();  // the only host read of the metrics
  const double acc = m.at("accuracy").item<double>();
  std::cout << "train accuracy " << acc << ", top2 " << m.at("top2_accuracy").item<double>() << ", loss "
            << m.at("loss").item<double>() << "\n";

  const auto h = health.read();  // the only host reads of the training health
  const auto losses = health.read_loss();
  const auto ratio = health.read_ratio();
  std::cout << "grad norm mean " << h.grad_norm.mean << ", p50 " << h.grad_norm.p50 << ", max " << h.grad_norm.max
            << ", non-finite steps " << h.nonfinite_steps << ", update ratio samples " << ratio.size() << "\n";
  // The last step's gradients are still in place: its global norm, by hand, in float64.
  double sq = 0;
  for (const auto& q : params) sq += q.grad().to(torch::kDouble).pow(2).sum().item<double>();
  const double by_hand = std::sqrt(sq);

  bool ok = report.steps == steps;
  ok = ok && h.steps == steps && h.grad_norm.count == steps && h.nonfinite_steps == 0 &&
       h.first_nonfinite_step == -1 && std::abs(h.grad_norm.last - by_hand) <= 1e-5 * by_hand;
  ok = ok && losses.count == steps && losses.first_nonfinite_step == -1 &&
       ratio.size() == static_cast<size_t>((steps + 49) / 50) && health.disabled().empty();
  for (const char* ph : {"data", "forward", "loss", "backward", "other", "optimizer", "metrics", "grad_stats"})
    ok = ok && table.find(ph) != std::string::npos;
  double sum = 0;
  for (int i = 0; i < st::kNumPartition; ++i) sum += report.phases[i].host.total;
  ok = ok && std::abs(sum - report.phases[static_cast<int>(st::Phase::kStep)].host.total) < 1e-6;
  ok = ok && report.samples == 64LL * steps && (steps < 100 || acc > 0.8);
  if (!ok) std::cerr << "train_cpp: unexpected summary or accuracy\n";
  return ok ? 0 : 1;
}
