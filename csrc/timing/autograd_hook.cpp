#include "timing/autograd_hook.h"

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>

namespace stepscope::timing {
namespace {

// Runs on autograd's thread when the gradient reaches the output, inside the graph task, so the
// final callback belongs to this backward pass. The callback holds a plain pointer: the hook that
// queues it owns a reference to the Timeline and outlives the callback (the graph task keeps its
// root, and through its edges every node it reached, until after the final callbacks; a leaf's
// tensor hook lives on the leaf). A shared_ptr capture would cost a heap-allocated
// std::function and two atomic reference counts per backward, ~2 us in a training step.
// Backward ends in a callback queued by the first final callback: the engine runs callbacks
// queued while it runs them, in order, so this one runs after every callback queued during the
// pass itself. DistributedDataParallel's reducer queues one when its last bucket is ready and
// waits there for the gradient all-reduce; a callback queued at backward begin would run before
// it and leave that wait in `other`.
void gradient_reached(const std::shared_ptr<Timeline>& tl) {
  if (tl->backward_begin()) {
    Timeline* t = tl.get();
    torch::autograd::Engine::get_default_engine().queue_callback([t] {
      torch::autograd::Engine::get_default_engine().queue_callback([t] { t->backward_end(); });
    });
  }
}

struct BackwardBegin final : torch::autograd::FunctionPreHook {
  explicit BackwardBegin(std::shared_ptr<Timeline> tl) : tl_(std::move(tl)) {}

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    gradient_reached(tl_);
    return grads;
  }

  std::shared_ptr<Timeline> tl_;
};

}  // namespace

bool hook_backward(const at::Tensor& output, const std::shared_ptr<Timeline>& tl) {
  if (!output.requires_grad()) return false;
  const auto& fn = output.grad_fn();
  if (fn) {
    fn->add_pre_hook(std::make_unique<BackwardBegin>(tl));
  } else {
    output.register_hook([tl](const at::Tensor&) { gradient_reached(tl); });
  }
  return true;
}

}  // namespace stepscope::timing
