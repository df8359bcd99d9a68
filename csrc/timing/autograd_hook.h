// Backward boundaries without Python: a C++ pre-hook on a model output's grad_fn marks the
// backward's begin and queues autograd's final callback for its end. A Python hook costs ~10 µs
// per backward here (the engine takes the GIL and boxes the gradients); this costs well under 1.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

#include "timing/timeline.h"

namespace stepscope::timing {

// Returns false when `output` has no grad_fn (a leaf, or no grad): the caller falls back to a
// tensor hook. The hook and the queued callback hold `tl`, so it outlives them.
bool hook_backward(const at::Tensor& output, const std::shared_ptr<Timeline>& tl);

}  // namespace stepscope::timing
