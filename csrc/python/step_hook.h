// _C.StepHook, the callable objects that StepHooks hands out (step_hook.cpp): vectorcall, inert
// when copied, a standard-library no-op when pickled.
#pragma once

#include <Python.h>

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

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
// The first tensor in a forward's first input (borrowed, or null): the input itself, or nested in
// tuples, lists and dicts (a batch given as {"x": ..., "y": ...} or [x, mask]).
PyObject* first_tensor(PyObject* input);
// A forward's first input (borrowed, or null): its first positional argument, or for a call with
// keywords only (model(**batch)) the first tensor among the keyword arguments' values.
PyObject* first_input(PyObject* args, PyObject* kwargs);
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

// FLOPs counting's shape watch (Monitor(flops="auto"), python/stepscope/_monitor_throughput.py). At
// the first training forward of each step: a key of the first input's dtype and sizes (first_input;
// 0 without a tensor there). For a key not seen before (at most kMaxShapes), fn(key, input) is called at
// that forward's pre hook and returns whether it began counting; while it counts, fn(key, input)
// again at each later training forward of the step, fn(None, False) at the end of each counted
// forward, and fn(None, True) at the step's end. Counting is bounded by forwards (their post hooks
// run on exceptions too), never left on across steps. Each step costs a hash of the sizes and a
// search of `seen`; Python runs only on a new shape's step.
struct Shapes {
  static constexpr size_t kMaxShapes = 64;
  PyObject* fn = nullptr;  // strong reference, or null: off
  std::vector<std::pair<int64_t, int64_t>> seen;  // (key, steps that began with it)
  int64_t unseen_steps = 0;  // steps whose shape came after kMaxShapes others
  // At a training forward's pre hook (input: first_input's): 1 when fn began counting a step (the
  // step is to be kept out of the statistics), 0 otherwise, -1 with a Python error set.
  int forward(PyObject* input);
  // At the end of a forward the step machine tracked; false with a Python error set.
  bool forward_end();
  // At the step's end: false with a Python error set.
  bool step_end();
  void set(PyObject* f);  // a new reference to f (None: off), forgetting every key
  void clear() { Py_CLEAR(fn); }
  PyObject* read() const;  // ([(key, steps)], unseen_steps), a new reference (null on error)

 private:
  bool call(PyObject* key, PyObject* arg, bool* result);
  int64_t key_ = 0;
  bool counting_ = false;  // the step under way is counted
  bool active_ = false;    // inside a counted forward
  bool in_step_ = false;   // a training forward began in the step under way
};

}  // namespace stepscope::python::hook
