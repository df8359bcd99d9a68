// Backward boundaries without Python: a C++ pre-hook on a model output's grad_fn marks the
// backward's begin and queues autograd's final callback for its end. A Python tensor hook would
// make the engine take the GIL and box the gradients on every backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

#include "timing/timeline.h"

namespace stepscope::timing {

// Hooks the backward of `output`: a pre-hook on its grad_fn, or, for a leaf that requires grad
// (a model returning a parameter), a tensor hook, which stays on that tensor as tensor hooks do.
// Returns false when `output` does not require grad. The hook and the queued callback hold `tl`,
// so it outlives them.
bool hook_backward(const at::Tensor& output, const std::shared_ptr<Timeline>& tl);

}  // namespace stepscope::timing
