// _C.StepHook, the callable objects that StepHooks hands out (step_hook.cpp): vectorcall, inert
// when copied, a standard-library no-op when pickled.
#pragma once

#include <Python.h>

#include <unordered_map>

namespace stepscope::python::hook {

enum Kind : int { kForwardPre, kForwardPost, kOptimizerPre, kOptimizerPost, kModulePre, kModulePost, kKinds };
extern const char* const kKindNames[kKinds];  // forward_pre, ...: the StepHooks attribute names

// Runs a live hook of one kind: (its StepHooks object, the call's positional arguments).
using Fn = PyObject* (*)(PyObject* owner, PyObject* const* args, Py_ssize_t nargs);

// Makes the StepHook type, whose live hooks of kind k call fns[k]; null with a Python error set.
PyTypeObject* make_type(const Fn (&fns)[kKinds]);
// A new hook of `kind` over `owner` (a strong reference; null: an inert hook); null on error.
PyObject* make(PyObject* owner, int kind);

// Reading a hook's call. check_args: false with a TypeError set unless nargs == want.
bool check_args(const char* name, Py_ssize_t nargs, Py_ssize_t want);
// The first tensor that requires grad in a forward's output (borrowed), or null: a tensor, or
// nested in tuples, lists and dicts (namedtuples and model-output dict classes included).
PyObject* first_grad_tensor(PyObject* output, int depth = 0);
// The frame that called the running hook (borrowed; hooks are C functions and have no frame of
// their own), and whether a frame is on the calling thread's stack: the call is still running.
const void* calling_frame();
bool on_stack(PyObject* frame);

// Global optimizer hooks: whether an optimizer holds any monitored parameter, asked of `fn`
// (owns(optimizer), Python; null: every optimizer is the model's) once per optimizer object, never
// per step, and remembered through a weak reference (which tells a live entry from a reused
// address); at most 64 entries before the dead ones are forgotten.
struct Owners {
  PyObject* fn = nullptr;  // strong reference, or null
  // 1 yes, 0 no, -1 with a Python error set.
  int holds_ours(PyObject* opt);
  void clear();  // drops fn and every entry (the owner's tp_clear)

 private:
  struct Seen {
    PyObject* ref;  // weak reference to the optimizer (strong reference to the weakref)
    bool ours;
  };
  std::unordered_map<PyObject*, Seen> seen_;
};

}  // namespace stepscope::python::hook
