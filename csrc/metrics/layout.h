// Metric accumulator configuration and the layout of its one state vector.
//
// All state lives in ONE contiguous float64 tensor so that reset is one fill, state_dict is one
// tensor and a distributed sync is one all_reduce. Counts are exact in float64 up to 2^53
// (9e15 samples), far past any training run. The layout is a pure function of the Config, so
// Python, C++ and the kernels agree on it without passing offsets around.
//
// No ATen here (c10::IValue is only named): the kernels and the GoogleTests use this header directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace c10 {
class IValue;  // OpArgs reads and writes the op's boxed arguments; nothing else here needs ATen
}

namespace stepscope::metrics {

enum class Task : int64_t { kBinary = 0, kMulticlass = 1, kMultilabel = 2 };

// How predictions are read. kAuto is torchmetrics' rule for binary/multilabel: if any value of
// the batch lies outside [0, 1] the batch is treated as logits (sigmoid), else as probabilities.
// Multiclass kAuto follows the same rule per update, over the rows that count (ignored and
// out-of-range targets aside, as torchmetrics' calibration does): preds with every value in [0, 1]
// are read as probabilities (softmax outputs), anything else as logits (log_softmax too). The
// argmax and the ranks are the same either way; the loss and the calibration confidence differ,
// so the update accumulates both readings of those until it knows (Layout::pending).
enum class InputKind : int64_t { kAuto = 0, kLogits = 1, kProbs = 2 };

inline constexpr int64_t kNumEceBins = 15;  // torchmetrics CalibrationError's default n_bins
// torchmetrics bins with bucketize over the 16 edges, so a confidence of exactly 1.0 (common
// for confident float32 softmax outputs) falls in a 16th slot of its own; we keep it too.
inline constexpr int64_t kEceSlots = kNumEceBins + 1;
inline constexpr int64_t kDefaultConfmatLimit = 1024;  // C x C kept by default up to this C
inline constexpr int64_t kMaxTopK = 8;                 // top_k values one accumulator tracks
// The part of the state that depends on how predictions are read: loss, then ece_count,
// ece_conf and ece_acc (contiguous in the layout, starting at Layout::loss).
inline constexpr int64_t kReadingLen = 1 + 3 * kEceSlots;
// Multiclass kAuto scratch: the logits reading, the probabilities reading, a flag ("a value
// outside [0, 1] was seen") and a count of finished CUDA blocks. Zero between updates.
inline constexpr int64_t kPendingLen = 2 * kReadingLen + 2;

struct Config {
  Task task = Task::kMulticlass;
  int64_t num_classes = 0;  // multiclass: C; multilabel: L; binary: ignored
  std::vector<int64_t> top_k = {1};  // multiclass only, each k in [1, C]
  std::optional<int64_t> ignore_index;  // target value counted nowhere
  double threshold = 0.5;  // binary / multilabel: positive iff probability > threshold
  InputKind input = InputKind::kAuto;
  bool confusion_matrix = true;  // multiclass only: keep the C x C matrix
  int64_t thresholds = 0;  // binned AUROC / average precision over linspace(0, 1, thresholds); 0: off
};

// The binned block's bound: C x 2 x (thresholds + 1) float64 words at most (128 MiB).
inline constexpr int64_t kMaxBinnedWords = int64_t{1} << 24;

// Offsets (in elements) into the state vector; -1 where a block is absent. Binary is stored
// as one label (tp, predicted, target counts of the positive class); its 2 x 2 confusion
// matrix is derived from them.
struct Layout {
  int64_t classes = 0;     // C; multilabel: L; binary: 1 (one "label": the positive class)
  int64_t num_topk = 0;
  int64_t tp = 0;          // [C] true positives per class (multilabel: per label)
  int64_t pred = 0;        // [C] predicted count per class (tp + fp)
  int64_t target = 0;      // [C] target count per class (tp + fn)
  int64_t valid = 0;       // [1] samples counted; multilabel: [L] elements counted per label
  int64_t valid_len = 1;
  int64_t topk = -1;       // [K] samples whose target ranks within the k-th top_k
  int64_t loss = 0;        // [1] summed cross-entropy (multiclass) or BCE (binary/multilabel)
  int64_t ece_count = 0;   // [kEceSlots] samples per confidence bin
  int64_t ece_conf = 0;    // [kEceSlots] summed confidence per bin
  int64_t ece_acc = 0;     // [kEceSlots] summed accuracy per bin
  int64_t nonfinite = 0;   // [1] samples (elements for binary/multilabel) with NaN/Inf preds
  int64_t invalid = 0;     // [1] targets outside the valid range (and not ignore_index)
  int64_t ignored = 0;     // [1] samples equal to ignore_index
  int64_t pending = -1;    // [kPendingLen] multiclass kAuto only: both readings of one update
                           // until its range is known; folded into loss/ece and zeroed by the
                           // update itself (so always zero between updates)
  int64_t dense = 0;       // end of the O(C) part: everything above
  int64_t confmat = -1;    // [C*C] rows = target, columns = prediction; after the O(C) part, so
                           // that the CPU kernel can keep per-thread copies of that part alone
  int64_t binned = -1;     // [C, 2, thresholds + 1] score histograms of negatives and positives
                           // (metrics/binned.h); filled by its own ATen pass, after the kernel
  int64_t numel = 0;
};

// Checks a Config (throws c10::Error with a message naming the argument) and returns its layout.
Layout make_layout(const Config& cfg);

// The state's blocks, in their order: make_layout places them one after the other, a block whose
// length is 0 for a configuration being absent (offset -1). A new counter is its Layout field and
// one line here (MetricsConfig.layout reads the names from this table too). The order is relied
// on: the reading (loss, ece_*) is contiguous (kReadingLen), nonfinite/invalid/ignored are
// adjacent (one host read), and the confusion matrix and the histograms come last (dense ends
// where the matrix starts).
enum class BlockLen { kClasses, kValid, kTopK, kOne, kEceSlots, kPending, kConfmat, kBinned };
struct LayoutBlock {
  const char* name;
  int64_t Layout::*offset;
  BlockLen len;
};
inline constexpr LayoutBlock kLayoutBlocks[] = {
    {"tp", &Layout::tp, BlockLen::kClasses},
    {"pred", &Layout::pred, BlockLen::kClasses},
    {"target", &Layout::target, BlockLen::kClasses},
    {"valid", &Layout::valid, BlockLen::kValid},
    {"topk", &Layout::topk, BlockLen::kTopK},
    {"loss", &Layout::loss, BlockLen::kOne},
    {"ece_count", &Layout::ece_count, BlockLen::kEceSlots},
    {"ece_conf", &Layout::ece_conf, BlockLen::kEceSlots},
    {"ece_acc", &Layout::ece_acc, BlockLen::kEceSlots},
    {"nonfinite", &Layout::nonfinite, BlockLen::kOne},
    {"invalid", &Layout::invalid, BlockLen::kOne},
    {"ignored", &Layout::ignored, BlockLen::kOne},
    {"pending", &Layout::pending, BlockLen::kPending},
    {"confmat", &Layout::confmat, BlockLen::kConfmat},
    {"binned", &Layout::binned, BlockLen::kBinned},
};

// The update op's configuration arguments: every argument of its schema (csrc/metrics/op.cpp)
// after preds, target and state, parsed and checked once per call into the Config they encode and
// that Config's Layout, which every user then reads instead of building its own. parse() is the one
// reader of that argument list and push() its one writer (the Accumulator's calls); Python's
// MetricsConfig is an OpArgs parsed from the same list.
struct OpArgs {
  static constexpr size_t kFirst = 3;  // preds, target, state come before the configuration
  static constexpr size_t kCount = 8;  // task, num_classes, top_k, ignore_index, threshold, input_kind,
                                       // confusion_matrix, thresholds: the schema's order

  explicit OpArgs(Config c);  // checks c (make_layout)

  // The configuration in [stack[first], stack[first + kCount]) of a call's boxed arguments.
  static OpArgs parse(const std::vector<c10::IValue>& stack, size_t first);
  // Appends the configuration to a call's boxed arguments, in the schema's order.
  void push(std::vector<c10::IValue>& stack) const;

  Config cfg;
  Layout lay;
};

const char* task_name(Task t);

// ECE slot of a confidence in [0, 1]: the same float32 edges as torch.linspace(0, 1, 16) and
// the same rule as torch.bucketize(right=True) - 1, so slot 15 holds exactly 1.0.
#if defined(__CUDACC__)
#define STEPSCOPE_HD __host__ __device__ __forceinline__
#else
#define STEPSCOPE_HD inline
#endif

STEPSCOPE_HD float ece_edge(int i) {
  // torch.linspace(float) computes start + step*i for the first half and end - step*(n-1-i)
  // for the second; reproducing it keeps the edges bit-identical to torchmetrics'.
  const float step = 1.0f / static_cast<float>(kNumEceBins);
  return i < (kNumEceBins + 1) / 2 ? step * static_cast<float>(i)
                                   : 1.0f - step * static_cast<float>(kNumEceBins - i);
}

STEPSCOPE_HD int ece_bin(float conf) {
  int b = static_cast<int>(conf * static_cast<float>(kNumEceBins));
  b = b < 0 ? 0 : (b > kNumEceBins ? static_cast<int>(kNumEceBins) : b);
  // The multiply can land one off an edge; settle on edge(b) <= conf < edge(b + 1).
  while (b > 0 && conf < ece_edge(b)) --b;
  while (b < kNumEceBins && conf >= ece_edge(b + 1)) ++b;
  return b;
}

}  // namespace stepscope::metrics
