// Per-module sampling's hook gates (step_modules.h).
#include "python/step_modules.h"

#include <limits>

namespace stepscope::python::hook {

bool Modules::put(const Gate& g, bool in) {
  if (in) return PyObject_SetItem(g.dict, g.key, g.hook) == 0;
  if (PyObject_DelItem(g.dict, g.key) == 0) return true;
  if (!PyErr_ExceptionMatches(PyExc_KeyError)) return false;
  PyErr_Clear();  // already out: its handle was removed, or it never went in
  return true;
}

bool Modules::add(PyObject* module, PyObject* id) {
  const long i = PyLong_AsLong(id);
  if (i == -1 && PyErr_Occurred()) return false;
  if (i < 0 || i > std::numeric_limits<int>::max()) {
    PyErr_Format(PyExc_ValueError, "stepscope: module id out of range: %ld", i);
    return false;
  }
  ids_[module] = static_cast<int>(i);
  return true;
}

bool Modules::gate(PyObject* dict, PyObject* key, PyObject* hook) {
  Py_INCREF(dict);
  Py_INCREF(key);
  Py_INCREF(hook);
  gates_.push_back(Gate{dict, key, hook});
  return sampling_ || put(gates_.back(), false);
}

bool Modules::step_start(int64_t steps) {
  const bool want = every_ > 0 && steps % every_ == 0;
  if (want == sampling_) return true;
  sampling_ = want;
  for (const Gate& g : gates_) {
    if (!put(g, want)) return false;
  }
  return true;
}

void Modules::clear_gates() {
  std::vector<Gate> gone;
  gone.swap(gates_);  // a finaliser run by a DECREF below must find no half-cleared entry
  for (const Gate& g : gone) {
    Py_DECREF(g.dict);
    Py_DECREF(g.key);
    Py_DECREF(g.hook);
  }
}

int Modules::traverse(visitproc visit, void* arg) const {
  for (const Gate& g : gates_) {
    Py_VISIT(g.dict);
    Py_VISIT(g.key);
    Py_VISIT(g.hook);
  }
  return 0;
}

}  // namespace stepscope::python::hook
