#include "metrics/layout.h"

#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>

#include <iterator>
#include <limits>
#include <utility>

namespace stepscope::metrics {

namespace {

constexpr bool follows(int64_t Layout::*a, int64_t Layout::*b) {
  for (size_t i = 0; i + 1 < std::size(kLayoutBlocks); ++i) {
    if (kLayoutBlocks[i].offset == a) return kLayoutBlocks[i + 1].offset == b;
  }
  return false;
}
static_assert(kReadingLen == 1 + 3 * kEceSlots && follows(&Layout::loss, &Layout::ece_count) &&
                  follows(&Layout::ece_count, &Layout::ece_conf) && follows(&Layout::ece_conf, &Layout::ece_acc),
              "the reading (loss, then ece_count, ece_conf, ece_acc) must be contiguous");
static_assert(follows(&Layout::nonfinite, &Layout::invalid) && follows(&Layout::invalid, &Layout::ignored),
              "check_state reads nonfinite, invalid and ignored with one copy");
static_assert(std::size(kLayoutBlocks) > 1 && kLayoutBlocks[std::size(kLayoutBlocks) - 2].len == BlockLen::kConfmat &&
                  kLayoutBlocks[std::size(kLayoutBlocks) - 1].len == BlockLen::kBinned,
              "the confusion matrix, then the histograms, are last: the CPU kernel copies the O(C) part before "
              "them per thread");

}  // namespace

const char* task_name(Task t) {
  switch (t) {
    case Task::kBinary:
      return "binary";
    case Task::kMulticlass:
      return "multiclass";
    case Task::kMultilabel:
      return "multilabel";
  }
  return "?";
}

Layout make_layout(const Config& cfg) {
  TORCH_CHECK_VALUE(cfg.task == Task::kBinary || cfg.task == Task::kMulticlass || cfg.task == Task::kMultilabel,
                    "stepscope: task must be binary (0), multiclass (1) or multilabel (2); got ",
                    static_cast<int64_t>(cfg.task));
  TORCH_CHECK_VALUE(cfg.input == InputKind::kAuto || cfg.input == InputKind::kLogits || cfg.input == InputKind::kProbs,
                    "stepscope: input kind must be auto (0), logits (1) or probs (2); got ",
                    static_cast<int64_t>(cfg.input));
  Layout l;
  if (cfg.task == Task::kBinary) {
    l.classes = 1;
  } else {
    TORCH_CHECK_VALUE(cfg.num_classes >= 1 && cfg.num_classes <= std::numeric_limits<int32_t>::max(),
                      "stepscope: ", cfg.task == Task::kMulticlass ? "num_classes" : "num_labels",
                      " must be in [1, 2^31); got ", cfg.num_classes);
    l.classes = cfg.num_classes;
  }
  if (cfg.task == Task::kMulticlass) {
    for (int64_t k : cfg.top_k) {
      TORCH_CHECK_VALUE(k >= 1 && k <= l.classes, "stepscope: every top_k must be in [1, num_classes=", l.classes,
                        "]; got ", k);
    }
    TORCH_CHECK_VALUE(static_cast<int64_t>(cfg.top_k.size()) <= kMaxTopK, "stepscope: at most ", kMaxTopK,
                      " top_k values; got ", cfg.top_k.size());
    l.num_topk = static_cast<int64_t>(cfg.top_k.size());
  } else {
    TORCH_CHECK_VALUE(cfg.top_k.empty() || (cfg.top_k.size() == 1 && cfg.top_k[0] == 1),
                      "stepscope: top_k applies to the multiclass task only; got it for ", task_name(cfg.task));
    TORCH_CHECK_VALUE(cfg.threshold >= 0.0 && cfg.threshold <= 1.0, "stepscope: threshold must be in [0, 1]; got ",
                      cfg.threshold);
  }
  const int64_t C = l.classes;
  l.valid_len = cfg.task == Task::kMultilabel ? C : 1;
  const bool confmat = cfg.task == Task::kMulticlass && cfg.confusion_matrix;
  TORCH_CHECK_VALUE(!confmat || C <= (int64_t{1} << 16), "stepscope: a confusion matrix of ", C, " x ", C,
                    " classes is too large to keep; pass confusion_matrix=False");
  const int64_t pending = cfg.task == Task::kMulticlass && cfg.input == InputKind::kAuto ? kPendingLen : 0;
  TORCH_CHECK_VALUE(cfg.thresholds == 0 || (cfg.thresholds >= 2 && cfg.thresholds <= kMaxBinnedWords),
                    "stepscope: thresholds must be None (0) or an int >= 2; got ", cfg.thresholds);
  const int64_t binned = cfg.thresholds > 0 ? C * 2 * (cfg.thresholds + 1) : 0;
  TORCH_CHECK_VALUE(binned <= kMaxBinnedWords, "stepscope: binned AUROC / average precision over ", cfg.thresholds,
                    " thresholds for ", C, cfg.task == Task::kMultilabel ? " labels" : " classes", " needs ", C,
                    " x 2 x ", cfg.thresholds + 1, " float64 counters (", binned * 8 / (1 << 20),
                    " MiB), above the bound of 2^24 (128 MiB); use fewer thresholds");
  int64_t o = 0;
  for (const LayoutBlock& b : kLayoutBlocks) {
    if (b.len == BlockLen::kConfmat) l.dense = o;
    int64_t n = 1;
    switch (b.len) {
      case BlockLen::kClasses: n = C; break;
      case BlockLen::kValid: n = l.valid_len; break;
      case BlockLen::kTopK: n = l.num_topk; break;
      case BlockLen::kOne: n = 1; break;
      case BlockLen::kEceSlots: n = kEceSlots; break;
      case BlockLen::kPending: n = pending; break;
      case BlockLen::kConfmat: n = confmat ? C * C : 0; break;
      case BlockLen::kBinned: n = binned; break;
    }
    l.*b.offset = n > 0 ? o : -1;
    o += n;
  }
  l.numel = o;
  return l;
}

OpArgs::OpArgs(Config c) : cfg(std::move(c)), lay(make_layout(cfg)) {}

OpArgs OpArgs::parse(const std::vector<c10::IValue>& stack, size_t first) {
  TORCH_INTERNAL_ASSERT(stack.size() >= first + kCount, "stepscope: the update op takes ", kFirst + kCount,
                        " arguments");
  const c10::IValue* a = stack.data() + first;
  Config c;
  c.task = static_cast<Task>(a[0].toInt());
  c.num_classes = a[1].toInt();
  c.top_k = a[2].toIntVector();
  if (!a[3].isNone()) c.ignore_index = a[3].toInt();
  c.threshold = a[4].toDouble();
  c.input = static_cast<InputKind>(a[5].toInt());
  c.confusion_matrix = a[6].toBool();
  c.thresholds = a[7].toInt();
  return OpArgs(std::move(c));
}

void OpArgs::push(std::vector<c10::IValue>& stack) const {
  stack.emplace_back(static_cast<int64_t>(cfg.task));
  stack.emplace_back(cfg.num_classes);
  stack.emplace_back(c10::IntArrayRef(cfg.top_k));
  stack.emplace_back(cfg.ignore_index ? c10::IValue(*cfg.ignore_index) : c10::IValue());
  stack.emplace_back(cfg.threshold);
  stack.emplace_back(static_cast<int64_t>(cfg.input));
  stack.emplace_back(cfg.confusion_matrix);
  stack.emplace_back(cfg.thresholds);
}

}  // namespace stepscope::metrics
