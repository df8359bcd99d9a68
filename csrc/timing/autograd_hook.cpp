#include "timing/autograd_hook.h"

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>

namespace stepscope::timing {
namespace {

struct BackwardBegin final : torch::autograd::FunctionPreHook {
  explicit BackwardBegin(std::shared_ptr<Timeline> tl) : tl_(std::move(tl)) {}

  // Runs on autograd's thread when the gradient reaches the output, inside the graph task, so
  // the final callback belongs to this backward pass.
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    if (tl_->backward_begin()) {
      std::shared_ptr<Timeline> tl = tl_;
      torch::autograd::Engine::get_default_engine().queue_callback([tl] { tl->backward_end(); });
    }
    return grads;
  }

  std::shared_ptr<Timeline> tl_;
};

}  // namespace

bool hook_backward(const at::Tensor& output, const std::shared_ptr<Timeline>& tl) {
  const auto& fn = output.grad_fn();
  if (!fn) return false;
  fn->add_pre_hook(std::make_unique<BackwardBegin>(tl));
  return true;
}

}  // namespace stepscope::timing
