// The boundaries a framework's callbacks mark (the Lightning callback), as StepHooks methods: each
// does in one C call what the callback did in Python through Monitor.mark, the FLOPs counting's
// count_input and Monitor.observe (about 5 us a boundary in Python frames and pybind11 calls; the
// callback marks four times a step). The rules are Monitor.mark's (python/stepscope/_monitor_parts.py's _mark):
// a training boundary claims the training thread first (machine.claim) and is dropped on another
// thread; backward_begin/_end are not claimed.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "python/step_state.h"

namespace stepscope::python {
namespace {

constexpr int kMaxDepth = 32;  // a batch nested deeper is searched no further

// The first tensor, depth first, in a tensor, a list or tuple, or a Mapping's
// values, with dim() > 0 when `sized`; *found a new reference (or left null). false with a Python
// error set.
bool first_tensor(PyObject* batch, bool sized, PyObject** found, int depth = 0) {
  if (THPVariable_Check(batch)) {
    if (!sized || THPVariable_Unpack(batch).dim() > 0) *found = Py_NewRef(batch);
    return true;
  }
  if (depth >= kMaxDepth) return true;
  PyObject* items = nullptr;
  if (PyList_Check(batch) || PyTuple_Check(batch)) {
    items = Py_NewRef(batch);
  } else if (PyDict_Check(batch)) {
    items = PyDict_Values(batch);
  } else {
    static PyObject* const mapping = [] {
      PyObject* abc = PyImport_ImportModule("collections.abc");
      PyObject* m = abc != nullptr ? PyObject_GetAttrString(abc, "Mapping") : nullptr;
      Py_XDECREF(abc);
      return m;
    }();
    if (mapping == nullptr) return false;
    const int is_map = PyObject_IsInstance(batch, mapping);
    if (is_map <= 0) return is_map == 0;
    PyObject* values = PyObject_CallMethod(batch, "values", nullptr);
    if (values == nullptr) return false;
    items = PySequence_List(values);
    Py_DECREF(values);
  }
  if (items == nullptr) return false;
  PyObject* seq = PySequence_Fast(items, "stepscope: a batch's items");
  Py_DECREF(items);
  if (seq == nullptr) return false;
  bool ok = true;
  for (Py_ssize_t i = 0; ok && *found == nullptr && i < PySequence_Fast_GET_SIZE(seq); ++i)
    ok = first_tensor(PySequence_Fast_GET_ITEM(seq, i), sized, found, depth + 1);
  Py_DECREF(seq);
  return ok;
}

State* state_of(PyObject* self) { return reinterpret_cast<Object*>(self)->s; }

// The forward a training step runs ends (count_input(None), then the claimed forward_end).
bool end_forward(State* s) {
  if (!s->shapes.forward_end()) return false;
  if (s->machine.claim(true)) s->tl->forward_end();
  return true;
}

}  // namespace

// batch_start(batch): FLOPs counting with the batch's first tensor, then forward_begin with the
// samples of its first tensor of dim > 0 (the Monitor's batch_size where it has none).
PyObject* mark_batch_start(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!hook::check_args("batch_start", nargs, 1)) return nullptr;
  State* s = state_of(self);
  PyObject *any = nullptr, *sized = nullptr;
  const bool ok = first_tensor(args[0], false, &any) && first_tensor(args[0], true, &sized);
  PyObject* empty = ok ? PyTuple_New(0) : nullptr;
  const bool counted = empty != nullptr && count_forward(s, any != nullptr ? any : empty);
  const int64_t n = sized != nullptr ? THPVariable_Unpack(sized).size(0) : -1;
  Py_XDECREF(empty);
  Py_XDECREF(any);
  Py_XDECREF(sized);
  if (!counted) return nullptr;
  if (!s->machine.claim(true)) Py_RETURN_NONE;  // another thread than the training thread
  s->marked_batch = s->marked_batch || n >= 0;
  s->tl->forward_begin(false, n >= 0 ? n : s->batch);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// before_backward(loss): the forward ends, the loss is kept (a one-element floating tensor, with
// health on), the backward begins.
PyObject* mark_before_backward(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!hook::check_args("before_backward", nargs, 1)) return nullptr;
  State* s = state_of(self);
  if (!end_forward(s)) return nullptr;
  if (s->health.on() && THPVariable_Check(args[0])) {
    const at::Tensor& loss = THPVariable_Unpack(args[0]);
    if (loss.numel() == 1 && loss.is_floating_point()) s->health.observe(loss, s->tl->step_index());
  }
  s->tl->backward_begin();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* mark_after_backward(PyObject* self, PyObject* const* /*args*/, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!hook::check_args("after_backward", nargs, 0)) return nullptr;
  state_of(self)->tl->backward_end();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// batch_end(): a training step that returned None skipped its backward: its forward ends here.
PyObject* mark_batch_end(PyObject* self, PyObject* const* /*args*/, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!hook::check_args("batch_end", nargs, 0)) return nullptr;
  if (!end_forward(state_of(self))) return nullptr;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace stepscope::python
