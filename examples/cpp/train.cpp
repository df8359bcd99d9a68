// A LibTorch training loop timed with the stepscope Timeline and scored with the metrics
// Accumulator, the C++ counterpart of `with stepscope.Monitor(model, opt)`:
//
//   ./train_cpp [--steps N] [--cuda]
//
// A tiny MLP learns a synthetic 4-class problem (the class is the quadrant of the first two
// features). Forward, backward and optimizer step are RAII scoped phases; the gaps between them
// (data, loss, other) are timed by the Timeline with nothing to mark. Exits non-zero if the
// summary misses a phase or the model did not learn.
#include <torch/torch.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

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
      st::ScopedPhase p(tl, st::Phase::kOptimizer);  // its end ends the step
      opt.step();
    }
  }
  const auto report = tl.report();
  const std::string table = st::format_summary(report);
  std::cout << table;
  const auto m = metrics.compute();  // the only host read of the metrics
  const double acc = m.at("accuracy").item<double>();
  std::cout << "train accuracy " << acc << ", top2 " << m.at("top2_accuracy").item<double>() << ", loss "
            << m.at("loss").item<double>() << "\n";

  bool ok = report.steps == steps;
  for (const char* ph : {"data", "forward", "loss", "backward", "other", "optimizer", "metrics"})
    ok = ok && table.find(ph) != std::string::npos;
  double sum = 0;
  for (int i = 0; i < st::kNumPartition; ++i) sum += report.phases[i].host.total;
  ok = ok && std::abs(sum - report.phases[static_cast<int>(st::Phase::kStep)].host.total) < 1e-6;
  ok = ok && report.samples == 64LL * steps && (steps < 100 || acc > 0.8);
  if (!ok) std::cerr << "train_cpp: unexpected summary or accuracy\n";
  return ok ? 0 : 1;
}
