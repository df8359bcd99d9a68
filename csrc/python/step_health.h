// Training health in the Monitor's optimizer hooks (step_hooks.cpp): a health::Watch run at the
// outermost step of the model's optimizers. In the pre hook the gradients are final and the update
// has not run; a step(closure) (LBFGS, Lightning) computes its gradients inside step(), so they
// are measured at its post hook instead (nothing can be skipped then). Raise mode raises
// FloatingPointError from the hook: before the update, or after it for a closure step.
#pragma once

#include <Python.h>

#include <memory>

#include "health/watch.h"
#include "timing/timeline.h"

namespace stepscope::python::hook {

class Health {
 public:
  void set(std::shared_ptr<stepscope::health::Watch> w) {
    watch_ = std::move(w);
    pending_ = false;
  }
  bool on() const { return watch_ != nullptr; }
  // The step's loss, kept on its device (Watch::observe_loss; no host read).
  void observe(const at::Tensor& loss, int64_t step) {
    if (watch_) watch_->observe_loss(loss, step);
  }
  // An optimizer step opened (its hook's args tuple and kwargs dict). false: a Python error is set.
  bool pre(const stepscope::timing::Timeline& tl, PyObject* args, PyObject* kwargs);
  // The outermost optimizer step of `step` ended; ended: it ended the training step (the last of
  // its optimizers), where the update ratio's sample is taken. false: a Python error is set.
  bool post(int64_t step, bool ended);

 private:
  bool raised(stepscope::health::Watch::Outcome out, bool ran);
  std::shared_ptr<stepscope::health::Watch> watch_;
  bool pending_ = false;  // a step(closure): measured at the post hook
};

}  // namespace stepscope::python::hook
