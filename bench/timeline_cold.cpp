// What one Timeline boundary costs where hooks really run: between two boundaries a training
// step streams megabytes through the caches, so the boundary's code and data are cold. This loop
// evicts the caches (writes a buffer larger than the last-level cache) before every boundary and
// times the call alone; the same loop without eviction gives the warm cost. Prints the median
// per boundary and per step (six boundaries).
//
//   build/timeline_cold_bench [--steps 400] [--evict-mb 64]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "timing/timeline.h"

namespace {

using Clock = std::chrono::steady_clock;
using stepscope::timing::Timeline;

std::vector<char> g_junk;
volatile long g_sink = 0;

void evict() {
  long s = 0;
  for (size_t i = 0; i < g_junk.size(); i += 64) {
    g_junk[i] = static_cast<char>(g_junk[i] + 1);
    s += g_junk[i];
  }
  g_sink = s;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 400;
  int evict_mb = 64;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--steps") == 0) steps = std::max(30, std::atoi(argv[i + 1]));
    if (std::strcmp(argv[i], "--evict-mb") == 0) evict_mb = std::max(1, std::atoi(argv[i + 1]));
  }
  g_junk.assign(static_cast<size_t>(evict_mb) << 20, 1);

  const char* names[] = {"forward_begin", "forward_end", "backward_begin", "backward_end", "optimizer_begin",
                         "optimizer_end (ends the step)"};
  std::printf("%-30s %12s %12s\n", "boundary (ns, median)", "cold", "warm");
  double total[2] = {0, 0};
  std::vector<double> cost[2][6];
  for (int cold = 1; cold >= 0; --cold) {
    Timeline tl;  // NVTX on (a no-op without a tool, as in a run outside nsys), no device
    const std::function<void()> calls[6] = {
        [&] { tl.forward_begin(false, 64); }, [&] { tl.forward_end(); }, [&] { tl.backward_begin(); },
        [&] { tl.backward_end(); },           [&] { tl.optimizer_begin(); }, [&] { tl.optimizer_end(true); }};
    for (int s = 0; s < steps; ++s) {
      for (int k = 0; k < 6; ++k) {
        if (cold) evict();
        const auto a = Clock::now();
        calls[k]();
        const auto b = Clock::now();
        if (s >= 20) cost[cold][k].push_back(std::chrono::duration<double, std::nano>(b - a).count());
      }
    }
  }
  for (int k = 0; k < 6; ++k) {
    const double c = median(cost[1][k]), w = median(cost[0][k]);
    total[1] += c;
    total[0] += w;
    std::printf("%-30s %12.0f %12.0f\n", names[k], c, w);
  }
  std::printf("%-30s %12.0f %12.0f\n", "per step (6 boundaries)", total[1], total[0]);
  std::printf("reproduce: timeline_cold_bench --steps %d --evict-mb %d\n", steps, evict_mb);
  return 0;
}
