// The one place that defines stepscope's operator schemas. Each implementation file registers
// its own dispatch key (CPU in csrc/metrics/update_cpu.cpp, CUDA in cuda/metrics_update.cu,
// Meta in csrc/metrics/update_checks.cpp).
#include <torch/library.h>

TORCH_LIBRARY(stepscope, m) {
  // Accumulates one batch of classification predictions into `state` IN PLACE (hence the
  // Tensor(a!) annotation: torch.compile functionalises it, CUDA graphs replay it). Reads the
  // predictions once; never synchronises with the host.
  //   task: 0 binary, 1 multiclass, 2 multilabel.  input_kind: 0 auto, 1 logits, 2 probs.
  //   state: float64 [layout.numel] on preds' device, laid out by metrics::make_layout.
  m.def(
      "classification_update(Tensor preds, Tensor target, Tensor(a!) state, int task, int num_classes, "
      "int[] top_k, int? ignore_index, float threshold, int input_kind, bool confusion_matrix) -> ()");
}
