// Training health in the Monitor's optimizer hooks (step_health.h).
#include "python/step_health.h"

#include <torch/csrc/Exceptions.h>

#include <string>

namespace stepscope::python::hook {
namespace {

// torch's step wrapper hands its hooks the step's own args: (optimizer, closure?) and kwargs.
bool has_closure(PyObject* args, PyObject* kwargs) {
  if (PyTuple_Check(args) && PyTuple_GET_SIZE(args) > 1 && PyTuple_GET_ITEM(args, 1) != Py_None) return true;
  if (!PyDict_Check(kwargs)) return false;
  PyObject* c = PyDict_GetItemString(kwargs, "closure");  // borrowed
  return c != nullptr && c != Py_None;
}

// A Python error raised under a watch call (a tensor subclass's __torch_dispatch__, DTensor for one)
// switches the watch off instead of failing the training step.
template <typename F>
stepscope::health::Watch::Outcome guarded(stepscope::health::Watch& w, F&& f) {
  try {
    return f();
  } catch (python_error& e) {  // torch/csrc/Exceptions.h, global namespace
    e.persist();  // takes the error off the interpreter
    w.switch_off(std::string("a gradient the statistics cannot read: ") + e.what());
    return stepscope::health::Watch::kProceed;
  }
}

}  // namespace

bool Health::raised(stepscope::health::Watch::Outcome out, bool ran) {
  if (out != stepscope::health::Watch::kRaise) return false;
  PyErr_SetString(PyExc_FloatingPointError, watch_->nonfinite_message(ran).c_str());
  return true;
}

bool Health::pre(const stepscope::timing::Timeline& tl, PyObject* args, PyObject* kwargs) {
  if (!watch_) return true;
  pending_ = has_closure(args, kwargs);
  const int64_t step = tl.step_index();
  return pending_ || !raised(guarded(*watch_, [&] { return watch_->before_update(step); }), false);
}

bool Health::post(int64_t step, bool ended) {
  if (!watch_) return true;
  auto out = stepscope::health::Watch::kProceed;
  if (pending_) out = guarded(*watch_, [&] { return watch_->before_update(step, /*measure_only=*/true); });
  pending_ = false;
  if (ended) {
    guarded(*watch_, [&] {
      watch_->after_update();
      return stepscope::health::Watch::kProceed;
    });
  }
  return !raised(out, true);
}

}  // namespace stepscope::python::hook
