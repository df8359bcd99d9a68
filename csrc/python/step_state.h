// The state behind _C.StepHooks (step_hooks.cpp) and the framework marks (step_marks.cpp): the
// Timeline, its step machine and what the hooks keep between calls.
#pragma once

#include <Python.h>

#include <cstdint>
#include <memory>

#include "python/step_health.h"
#include "python/step_hook.h"
#include "python/step_modules.h"
#include "timing/step_machine.h"
#include "timing/timeline.h"

namespace stepscope::python {

using stepscope::timing::StepHost;
using stepscope::timing::StepMachine;
using stepscope::timing::Timeline;

// The machine's host: tokens are PyObject* (optimizers, frames), held by strong references.
struct State final : StepHost {
  State(std::shared_ptr<Timeline> timeline, size_t optimizers)
      : tl(std::move(timeline)), machine(tl, optimizers, this) {}
  bool live(Token call) override { return hook::on_stack(obj(call)); }
  void hold(Token t) override { Py_INCREF(obj(t)); }
  void release(Token t) override { Py_DECREF(obj(t)); }
  int owns(Token opt) override { return owners.holds_ours(obj(opt)); }
  static PyObject* obj(Token t) { return const_cast<PyObject*>(static_cast<const PyObject*>(t)); }

  std::shared_ptr<Timeline> tl;
  StepMachine machine;
  int64_t batch = -1;               // samples per forward; < 0: the first input's size along batch_dim
  int64_t batch_dim = 0;
  // Several models (a GAN's generator and discriminator): only this one's training forwards count
  // samples, each model's would count the batch again. Its address, compared and never read (the
  // Monitor holds the model while attached); 0: every hooked model's.
  uintptr_t samples_of = 0;
  hook::Owners owners;              // global hooks: which optimizers are this model's (step_hook.h)
  hook::Modules modules;  // per-module timing: which submodules, on which steps (step_modules.h)
  // Python work at a step's end: on_step_end(sampling) on every print_every-th step (0: never); a
  // countdown, so no step pays for more than a decrement. It starts aligned with the Timeline's step
  // count (steps % print_every == 0).
  PyObject* on_step_end = nullptr;  // strong reference (a bound method's function), or null
  PyObject* on_step_self = nullptr;  // a bound method's object: a weak reference to it, or null
  int64_t print_every = 0;
  int64_t until_print = 0;
  hook::Health health;            // training health at the model's optimizer steps (step_health.h)
  hook::Shapes shapes;            // FLOPs counting: a new input shape's step (step_hook.h)
  int64_t train_forwards = 0;     // training forwards seen ...
  int64_t autocast_forwards = 0;  // ... and how many ran under CUDA autocast (the precision rule)
  bool marked_batch = false;      // a framework mark counted a batch's samples (samples_counted_by)
};

struct Object {
  PyObject_HEAD State* s;
};

// The shape watch at a training forward's start, before forward_begin closes the step's first phase:
// a step that FLOPs counting slows is kept out of the statistics. false with a Python error set.
bool count_forward(State* s, PyObject* input);

// The boundaries a framework's callbacks mark (step_marks.cpp): StepHooks methods, each what
// Monitor.mark does for them in one C call. batch_start(batch) before the training step,
// before_backward(loss), after_backward(), batch_end().
PyObject* mark_batch_start(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* mark_before_backward(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* mark_after_backward(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* mark_batch_end(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

}  // namespace stepscope::python
