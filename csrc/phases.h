// The one phase table: every phase stepscope names, its report name, NVTX name, colour and
// category, and for the partition phases the boundaries that open and close them. The Timeline's
// series, the NVTX layer and Python (_C.PHASES and _C.BOUNDARIES; every run file saves a copy, so a
// saved run is read without the extension) all read it. It sits below both timing/ and nvtx/.
//
// One order: the Timeline's timed series first (data .. optimizer partition the step, then step,
// eval_forward and eval; the order is the series index, SpikeRecord::phase and the packed layout),
// then the phases only NVTX ranges have (user, module, capture). The NVTX category ids are
// their own column: they are what a saved Nsight report holds, so they do not follow the order.
//
// `loss` is the time from the forward's end to the gradient reaching the model's output: the
// criterion, and also autograd's start-up before the first backward node of the model runs (the
// loss's own backward, and for a long unrolled graph the engine's set-up of it: a 999-step LSTM
// showed 0.67 s of loss against 0.025 s of criterion). `eval` is each whole evaluation stretch,
// from its first eval forward to the end of its last one before training resumes (the time
// between eval forwards included); `eval_forward` its forwards alone. Both are outside the step.
#pragma once

#include <cstddef>
#include <cstdint>

namespace stepscope {
namespace timing {

// The Timeline's series: the training partition, then the other series kept with histograms.
enum class Phase : int {
  kData = 0,
  kForward,
  kLoss,
  kBackward,
  kOther,
  kOptimizer,
  kStep,
  kEvalForward,
  kEval,  // the whole evaluation stretch (no NVTX range of its own: its forwards have theirs)
  kCount
};
constexpr int kNumPartition = 6;  // kData .. kOptimizer

}  // namespace timing

namespace nvtx {

// NVTX's phases: the Timeline's, with the same values (a timing::Phase converts by value), then
// the NVTX-only ones.
enum class Phase : int {
  kData = static_cast<int>(timing::Phase::kData),
  kForward,
  kLoss,
  kBackward,
  kOther,
  kOptimizer,
  kStep,
  kEval,
  kEvalStretch,
  kUser = static_cast<int>(timing::Phase::kCount),
  kModule,
  kCapture,
  kCount
};
static_assert(static_cast<int>(Phase::kStep) == static_cast<int>(timing::Phase::kStep));
static_assert(static_cast<int>(Phase::kEval) == static_cast<int>(timing::Phase::kEvalForward));
static_assert(static_cast<int>(Phase::kEvalStretch) == static_cast<int>(timing::Phase::kEval));

}  // namespace nvtx

struct PhaseInfo {
  const char* name;       // report, summary and Python name
  const char* nvtx_name;  // NVTX registered string and category name
  uint32_t argb;          // NVTX colour (fixed, so a trace reads the same every run)
  uint32_t category;      // NVTX category id in the "stepscope" domain
  const char* opens;      // partition phases: the boundary that opens it (nullptr for the others)
  const char* closes;     // ... and the one that closes it
};

inline constexpr PhaseInfo kPhaseTable[] = {
    {"data", "data", 0xFFB0B0B0u, 2, "optimizer_end", "forward_begin"},
    {"forward", "forward", 0xFF1F77B4u, 3, "forward_begin", "forward_end"},
    {"loss", "loss", 0xFFFF7F0Eu, 4, "forward_end", "backward_begin"},
    {"backward", "backward", 0xFFD62728u, 5, "backward_begin", "backward_end"},
    {"other", "other", 0xFF9467BDu, 6, "backward_end", "optimizer_begin"},
    {"optimizer", "optimizer", 0xFF2CA02Cu, 7, "optimizer_begin", "optimizer_end"},
    {"step", "step", 0xFF5B5B5Bu, 1, nullptr, nullptr},
    {"eval_forward", "eval", 0xFF17BECFu, 8, nullptr, nullptr},
    {"eval", "evaluation", 0xFF9EDAE5u, 12, nullptr, nullptr},
    {"user", "user", 0xFFBCBD22u, 9, nullptr, nullptr},
    {"module", "module", 0xFF8C564Bu, 10, nullptr, nullptr},
    {"capture", "capture", 0xFFE377C2u, 11, nullptr, nullptr},
};
static_assert(sizeof(kPhaseTable) / sizeof(kPhaseTable[0]) == static_cast<size_t>(nvtx::Phase::kCount));

// The training boundaries in step order (Monitor.mark's names, the queue-lag report's keys,
// _C.BOUNDARIES): boundary i is the one that closes partition phase i.
constexpr const char* boundary_name(int i) { return kPhaseTable[i].closes; }

namespace detail {
constexpr bool same(const char* a, const char* b) { return *a == *b && (*a == '\0' || same(a + 1, b + 1)); }
// Each partition phase opens at the boundary that closes the one before it (data: optimizer_end).
constexpr bool partition_is_a_cycle() {
  for (int i = 0; i < timing::kNumPartition; ++i) {
    const PhaseInfo& p = kPhaseTable[i];
    if (p.opens == nullptr || p.closes == nullptr) return false;
    if (!same(p.opens, boundary_name((i + timing::kNumPartition - 1) % timing::kNumPartition))) return false;
  }
  return true;
}
}  // namespace detail
static_assert(detail::partition_is_a_cycle(), "phases.h: a partition phase must open where the one before it closes");

}  // namespace stepscope
