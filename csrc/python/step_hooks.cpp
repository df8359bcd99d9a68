// _C.StepHooks: the Monitor's hooks as plain CPython callables. nn.Module and the optimizers call
// a hook on every forward and step; through pybind11's dispatcher each call costs microseconds
// in a real training step (its caches are cold by then), so each hook is a small vectorcall
// object (_C.StepHook) over one State struct. They run with the GIL held; only the Timeline is
// shared with autograd's thread, and it has its own lock.
//
// What the hooks do over their life (the Monitor's lifecycle rules):
//  - Copies. A hook lives in the module's hook dicts, so copy.deepcopy(model) (EMA and teacher
//    copies, AveragedModel) and pickling (torch.save(model)) reach it. A copied hook is inert: it
//    times nothing, and the first forward of the copy removes every inert hook from the copy's
//    hook dicts. A pickled hook is a no-op callable of the standard library, so a checkpoint
//    taken while attached loads where stepscope is not installed (its hook entries then stay as
//    no-ops). Optimizers pickle and copy without their hooks (torch's Optimizer.__getstate__).
//  - Calls that never returned. A forward interrupted by a KeyboardInterrupt (torch runs
//    always_call forward hooks only for an Exception) and an optimizer step that raised leave no
//    post hook. The outermost hooked forward and optimizer step keep a reference to the Python
//    frame that called their pre hook (torch's _call_impl, the optimizer's step wrapper); a later
//    boundary that finds one still open looks for that frame on the current thread's stack, and
//    if it is not there the call is over. Only that rare path walks the stack; the frame is
//    released at the matching post hook.
//  - Threads. The training thread is the first to run a training boundary (a training forward,
//    an optimizer step, step() or a mark) after the hooks are made; until one has, the thread
//    that made them. Forwards, optimizer steps and step() on any other thread are ignored, so a
//    background evaluator calling the same model does not move the training step. Backward
//    boundaries come from autograd (timing/autograd_hook.cpp), on whichever thread it runs them.
//  - Other models' optimizers. With global optimizer hooks (optimizers=0) the hooks see every
//    optimizer in the process; one that holds none of the monitored parameters is ignored (decided
//    once per optimizer object).
//  - The Monitor's callback is held through a weak reference to its object: the hooks never keep
//    a Monitor alive (it removes them when it goes).
#include <ATen/autocast_mode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>
// After Python.h (torch/extension.h includes it): the member flags of StepHook.__vectorcalloffset__.
#include <structmember.h>

#include <algorithm>
#include <cstddef>
#include <limits>
#include <memory>
#include <unordered_map>
#include <vector>

#include "python/bindings.h"
#include "timing/autograd_hook.h"
#include "timing/timeline.h"

namespace py = pybind11;

namespace stepscope::python {
namespace {

using stepscope::timing::Timeline;

struct State {
  std::shared_ptr<Timeline> tl;
  int64_t batch = -1;               // samples per forward; < 0: the first input's size along batch_dim
  int64_t batch_dim = 0;
  size_t n_opts = 0;                // optimizers given; 0 or 1: every outermost step ends the step
  std::vector<PyObject*> stepped;   // optimizers that stepped in this step (identities only)
  PyObject* opt_in = nullptr;       // the optimizer inside its step (strong reference) ...
  int opt_depth = 0;                // ... and its nesting (subclass steps calling super().step())
  PyObject* opt_frame = nullptr;    // the frame that called the outermost step's pre hook (strong)
  // Global hooks (n_opts == 0) see every optimizer in the process: one stepping before the model
  // ran in the step is another model's, unless its closure then runs the model (LBFGS).
  bool opt_foreign = false;
  // Global hooks: owns(optimizer) says whether it holds any monitored parameter (strong reference,
  // or null: every optimizer is this model's), remembered per optimizer object (a weak reference
  // tells a live entry from a reused address).
  PyObject* owns = nullptr;
  struct Seen {
    PyObject* ref;  // weak reference to the optimizer (strong reference to the weakref)
    bool ours;
  };
  std::unordered_map<PyObject*, Seen> seen;
  // Hooked forwards open on the training thread (nested ones included), and the frame that
  // called the outermost one's pre hook (strong).
  int fwd_depth = 0;
  PyObject* fwd_frame = nullptr;
  // The training thread (see the top of this file).
  unsigned long thread = 0;
  bool thread_claimed = false;
  // Python work at a step's end: on_step_end(sample_modules) is called only when per-module
  // sampling (one step in module_every, 0: none) switches on or off ...
  PyObject* on_step_end = nullptr;  // strong reference (a bound method's function), or null
  PyObject* on_step_self = nullptr;  // a bound method's object: a weak reference to it, or null
  int64_t module_every = 0;
  bool sampling = false;
  // ... and also on every print_every-th step (0: never); a countdown, so no step pays for more
  // than a decrement. It starts aligned with the Timeline's step count (steps % print_every == 0).
  int64_t print_every = 0;
  int64_t until_print = 0;
  std::unordered_map<PyObject*, int> modules;  // per-module timing: submodule -> Timeline id
  int64_t train_forwards = 0;     // training forwards seen ...
  int64_t autocast_forwards = 0;  // ... and how many ran under CUDA autocast (the precision rule)
};

struct Object {
  PyObject_HEAD State* s;
};

// One hook: a callable over its StepHooks (owner), or an inert copy (owner null).
enum Kind : int { kForwardPre, kForwardPost, kOptimizerPre, kOptimizerPost, kModulePre, kModulePost, kKinds };

struct Hook {
  PyObject_HEAD vectorcallfunc vectorcall;
  PyObject* owner;  // the StepHooks object (strong reference), or null: inert
  int kind;
};

PyTypeObject* g_type = nullptr;
PyTypeObject* g_hook_type = nullptr;
PyObject* g_training = nullptr;  // interned "training"
PyObject* g_noop = nullptr;          // contextlib.nullcontext().__exit__: what a pickled hook becomes

constexpr int kMaxOutputDepth = 16;

// The first tensor that requires grad in a forward's output: a tensor, or nested in tuples, lists
// and dicts (namedtuples and dict subclasses such as model-output classes included).
PyObject* first_grad_tensor(PyObject* o, int depth) {
  if (THPVariable_Check(o)) return THPVariable_Unpack(o).requires_grad() ? o : nullptr;
  if (depth >= kMaxOutputDepth) return nullptr;
  if (PyTuple_Check(o) || PyList_Check(o)) {
    const bool tuple = PyTuple_Check(o);
    const Py_ssize_t n = tuple ? PyTuple_GET_SIZE(o) : PyList_GET_SIZE(o);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* t = first_grad_tensor(tuple ? PyTuple_GET_ITEM(o, i) : PyList_GET_ITEM(o, i), depth + 1);
      if (t != nullptr) return t;
    }
  } else if (PyDict_Check(o)) {
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(o, &pos, &k, &v)) {
      PyObject* t = first_grad_tensor(v, depth + 1);
      if (t != nullptr) return t;
    }
  }
  return nullptr;
}

bool check_args(const char* name, Py_ssize_t nargs, Py_ssize_t want) {
  if (nargs == want) return true;
  PyErr_Format(PyExc_TypeError, "stepscope: %s takes %zd arguments (%zd given)", name, want, nargs);
  return false;
}

bool sample_now(const State* s) { return s->module_every > 0 && s->tl->steps() % s->module_every == 0; }

PyObject* step_ended(State* s) {
  s->stepped.clear();
  const bool want = sample_now(s);
  const bool print = s->print_every > 0 && --s->until_print == 0;
  if (print) s->until_print = s->print_every;
  if (s->on_step_end == nullptr || (!print && want == s->sampling)) Py_RETURN_NONE;
  s->sampling = want;
  PyObject* arg = want ? Py_True : Py_False;
  if (s->on_step_self == nullptr) return PyObject_CallOneArg(s->on_step_end, arg);
  PyObject* self = PyWeakref_GetObject(s->on_step_self);  // borrowed
  if (self == nullptr) return nullptr;
  if (self == Py_None) Py_RETURN_NONE;  // the Monitor is gone (its finaliser removes these hooks)
  Py_INCREF(self);
  PyObject* r = PyObject_CallFunctionObjArgs(s->on_step_end, self, arg, nullptr);
  Py_DECREF(self);
  return r;
}

// --------------------------------------------------------------------------- threads and frames
// Whether a boundary on the calling thread belongs to the training step; a training boundary
// claims the thread while none has.
bool on_training_thread(State* s, bool training) {
  const unsigned long me = PyThread_get_thread_ident();
  if (me == s->thread) {
    s->thread_claimed = s->thread_claimed || training;
    return true;
  }
  if (!training || s->thread_claimed) return false;
  s->thread = me;
  s->thread_claimed = true;
  return true;
}

// The frame that called the running hook: a strong reference (the calling Python code; hooks are
// C functions and have no frame of their own).
PyObject* calling_frame() {
  PyObject* f = reinterpret_cast<PyObject*>(PyEval_GetFrame());
  Py_XINCREF(f);
  return f;
}

// Whether `frame` is on the calling thread's stack: a call that is still running. Frames are
// compared by identity; the kept reference stops the object from being freed and its address
// reused by a later frame.
bool on_stack(PyObject* frame) {
  if (frame == nullptr) return false;
  PyFrameObject* f = PyEval_GetFrame();
  Py_XINCREF(f);
  while (f != nullptr) {
    if (reinterpret_cast<PyObject*>(f) == frame) {
      Py_DECREF(f);
      return true;
    }
    PyFrameObject* back = PyFrame_GetBack(f);
    Py_DECREF(f);
    f = back;
  }
  return false;
}

// An optimizer step whose post hook never came (it raised). The step's time up to here counts as
// the optimizer's, and the step goes on.
void end_raised_step(State* s) {
  Py_CLEAR(s->opt_in);
  Py_CLEAR(s->opt_frame);
  s->opt_depth = 0;
  if (!s->opt_foreign) s->tl->optimizer_end(false);
  s->opt_foreign = false;
}

// Ends the hooked forwards and the optimizer step whose calls are over without their post hook
// (a KeyboardInterrupt in forward, an exception in step()). A forward's time runs to here.
void settle(State* s) {
  if (s->fwd_depth > 0 && !on_stack(s->fwd_frame)) {
    for (; s->fwd_depth > 0; --s->fwd_depth) s->tl->forward_end();
    Py_CLEAR(s->fwd_frame);
  }
  if (s->opt_depth > 0 && !on_stack(s->opt_frame)) end_raised_step(s);
}

// Global hooks: whether `opt` holds any monitored parameter, decided once per optimizer object
// (owns(opt), Python, runs once per optimizer seen, never per step). Returns -1 with a Python
// error set.
int holds_ours(State* s, PyObject* opt) {
  auto it = s->seen.find(opt);
  if (it != s->seen.end()) {
    if (PyWeakref_GetObject(it->second.ref) == opt) return it->second.ours;
    Py_DECREF(it->second.ref);  // an optimizer that is gone, its address reused
    s->seen.erase(it);
  }
  if (s->owns == nullptr) return 1;
  PyObject* r = PyObject_CallOneArg(s->owns, opt);
  if (r == nullptr) return -1;
  const int ours = PyObject_IsTrue(r);
  Py_DECREF(r);
  if (ours < 0) return -1;
  if (s->seen.size() >= 64) {  // bounded: forget the optimizers that are gone
    for (auto e = s->seen.begin(); e != s->seen.end();) {
      if (PyWeakref_GetObject(e->second.ref) == Py_None) {
        Py_DECREF(e->second.ref);
        e = s->seen.erase(e);
      } else {
        ++e;
      }
    }
  }
  PyObject* ref = PyWeakref_NewRef(opt, nullptr);
  if (ref == nullptr) {
    PyErr_Clear();  // not weakly referenceable: decided again at its next step
  } else {
    s->seen.emplace(opt, State::Seen{ref, ours != 0});
  }
  return ours;
}

// --------------------------------------------------------------------------- the hooks
// forward pre-hook (module, args): eval when the module is in eval() or grad is off (inference
// mode turns grad off too).
PyObject* forward_pre(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (!check_args("forward_pre", nargs, 2)) return nullptr;
  PyObject* training = PyObject_GetAttr(args[0], g_training);
  if (training == nullptr) return nullptr;
  const int is_training = PyObject_IsTrue(training);
  Py_DECREF(training);
  if (is_training < 0) return nullptr;
  const bool eval = !is_training || !c10::GradMode::is_enabled();
  if (!on_training_thread(s, !eval)) Py_RETURN_NONE;
  if (s->fwd_depth > 0 || s->opt_depth > 0) settle(s);
  if (s->opt_depth != 0 && s->opt_foreign && !eval) {  // inside a global-hook optimizer's closure
    s->opt_foreign = false;
    s->tl->optimizer_begin();
  }
  int64_t batch = s->batch;
  if (batch < 0 && PyTuple_Check(args[1]) && PyTuple_GET_SIZE(args[1]) > 0) {
    PyObject* a0 = PyTuple_GET_ITEM(args[1], 0);
    if (THPVariable_Check(a0)) {
      const at::Tensor& t = THPVariable_Unpack(a0);
      if (t.dim() > s->batch_dim) batch = t.size(s->batch_dim);
    }
  }
  if (!eval) {
    ++s->train_forwards;
    if (at::autocast::is_autocast_enabled(at::kCUDA)) ++s->autocast_forwards;
  }
  if (s->fwd_depth++ == 0) s->fwd_frame = calling_frame();
  s->tl->forward_begin(eval, batch);
  Py_RETURN_NONE;
}

// forward hook (module, args, output), registered with always_call: a failing forward still ends.
PyObject* forward_post(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (!check_args("forward_post", nargs, 3)) return nullptr;
  if (PyThread_get_thread_ident() != s->thread || s->fwd_depth == 0) Py_RETURN_NONE;
  if (--s->fwd_depth == 0) Py_CLEAR(s->fwd_frame);
  s->tl->forward_end();
  if (args[2] != Py_None && c10::GradMode::is_enabled()) {
    PyObject* t = first_grad_tensor(args[2], 0);
    if (t != nullptr) stepscope::timing::hook_backward(THPVariable_Unpack(t), s->tl);
  }
  Py_RETURN_NONE;
}

// optimizer step pre/post hooks (optimizer, args, kwargs). torch wraps every class's step once an
// instance of it exists, so a subclass whose step() calls super().step() fires them twice, nested:
// only the outermost pair is a boundary.
PyObject* optimizer_pre(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (!check_args("optimizer_pre", nargs, 3)) return nullptr;
  if (!on_training_thread(s, true)) Py_RETURN_NONE;
  if (s->fwd_depth > 0 || s->opt_depth > 0) settle(s);
  if (s->opt_depth != 0) {
    // The open step is still running: a nested super().step(), or another optimizer stepping
    // inside it (its closure), which is part of this step.
    if (s->opt_in == args[0]) ++s->opt_depth;
    Py_RETURN_NONE;
  }
  if (s->n_opts == 0) {
    const int ours = holds_ours(s, args[0]);
    if (ours < 0) return nullptr;
    if (ours == 0) Py_RETURN_NONE;  // another model's optimizer: nothing to time
  }
  Py_INCREF(args[0]);
  Py_XSETREF(s->opt_in, args[0]);
  Py_XSETREF(s->opt_frame, calling_frame());
  s->opt_depth = 1;
  s->opt_foreign = s->n_opts == 0 && !s->tl->forward_seen();
  if (!s->opt_foreign) s->tl->optimizer_begin();
  Py_RETURN_NONE;
}

PyObject* optimizer_post(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (!check_args("optimizer_post", nargs, 3)) return nullptr;
  if (s->opt_in != args[0] || s->opt_depth == 0 || PyThread_get_thread_ident() != s->thread) Py_RETURN_NONE;
  if (--s->opt_depth > 0) Py_RETURN_NONE;
  Py_CLEAR(s->opt_frame);
  if (s->opt_foreign) {  // stepped without this model running in it
    s->opt_foreign = false;
    Py_CLEAR(s->opt_in);
    Py_RETURN_NONE;
  }
  bool end = true;
  if (s->n_opts > 1) {
    if (std::find(s->stepped.begin(), s->stepped.end(), s->opt_in) == s->stepped.end())
      s->stepped.push_back(s->opt_in);
    end = s->stepped.size() >= s->n_opts;
  }
  Py_CLEAR(s->opt_in);
  s->tl->optimizer_end(end);
  if (end) return step_ended(s);
  Py_RETURN_NONE;
}

// Per-module forward pre/post hooks (module, args[, output]) of the submodules given to
// add_module(); the training thread's only.
int module_id(State* s, PyObject* module) {
  if (PyThread_get_thread_ident() != s->thread) return -1;
  auto it = s->modules.find(module);
  return it == s->modules.end() ? -1 : it->second;
}

PyObject* module_pre(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (!check_args("module_pre", nargs, 2)) return nullptr;
  const int id = module_id(s, args[0]);
  if (id >= 0) s->tl->module_begin(id);
  Py_RETURN_NONE;
}

PyObject* module_post(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (!check_args("module_post", nargs, 3)) return nullptr;
  const int id = module_id(s, args[0]);
  if (id >= 0) s->tl->module_end(id);
  Py_RETURN_NONE;
}

constexpr const char* kKindNames[kKinds] = {"forward_pre", "forward_post", "optimizer_pre",
                                            "optimizer_post", "module_pre", "module_post"};
using HookFn = PyObject* (*)(State*, PyObject* const*, Py_ssize_t);
constexpr HookFn kKindFns[kKinds] = {forward_pre,    forward_post, optimizer_pre,
                                     optimizer_post, module_pre,   module_post};

// --------------------------------------------------------------------------- inert copies
// Removes every inert hook from a module's forward hook dicts (and their handles' side entries).
// Called from an inert pre hook: torch iterates a snapshot of the pre hooks and reads the forward
// hooks only after the forward, so both dicts may change here. The dicts are OrderedDicts: items
// are removed through the mapping protocol, which keeps their order links right.
bool drop_inert_hooks(PyObject* module) {
  static const char* const kDicts[] = {"_forward_pre_hooks", "_forward_hooks"};
  static const char* const kSide[] = {"_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                                      "_forward_hooks_always_called"};
  for (const char* name : kDicts) {
    PyObject* d = PyObject_GetAttrString(module, name);
    if (d == nullptr || !PyDict_Check(d)) {
      Py_XDECREF(d);
      PyErr_Clear();
      continue;
    }
    std::vector<PyObject*> keys;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
      if (Py_TYPE(v) == g_hook_type && reinterpret_cast<Hook*>(v)->owner == nullptr) {
        Py_INCREF(k);
        keys.push_back(k);
      }
    }
    bool ok = true;
    for (PyObject* key : keys) {
      ok = ok && PyObject_DelItem(d, key) == 0;
      for (const char* side : kSide) {
        PyObject* sd = ok ? PyObject_GetAttrString(module, side) : nullptr;
        if (sd == nullptr) {
          PyErr_Clear();
          continue;
        }
        const int has = PySequence_Contains(sd, key);
        if (has == 1) ok = PyObject_DelItem(sd, key) == 0;
        if (has < 0) PyErr_Clear();
        Py_DECREF(sd);
      }
      Py_DECREF(key);
    }
    Py_DECREF(d);
    if (!ok) return false;
  }
  return true;
}

PyObject* make_hook(PyObject* owner, int kind);

PyObject* hook_call(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  Hook* h = reinterpret_cast<Hook*>(self);
  if (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) > 0) {
    PyErr_Format(PyExc_TypeError, "stepscope: %s takes no keyword arguments", kKindNames[h->kind]);
    return nullptr;
  }
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if (h->owner == nullptr) {  // inert: a copy's hook
    if ((h->kind == kForwardPre || h->kind == kModulePre) && nargs >= 1 && !drop_inert_hooks(args[0]))
      return nullptr;
    Py_RETURN_NONE;
  }
  return kKindFns[h->kind](reinterpret_cast<Object*>(h->owner)->s, args, nargs);
  END_HANDLE_TH_ERRORS
}

PyObject* hook_copy(PyObject* self, PyObject* /*unused*/) {
  return make_hook(nullptr, reinterpret_cast<Hook*>(self)->kind);
}

PyObject* hook_reduce(PyObject* /*self*/, PyObject* /*unused*/) {
  return PyObject_CallMethod(g_noop, "__reduce__", nullptr);
}

int hook_traverse(PyObject* self, visitproc visit, void* arg) {
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(reinterpret_cast<Hook*>(self)->owner);
  return 0;
}

int hook_clear(PyObject* self) {
  Py_CLEAR(reinterpret_cast<Hook*>(self)->owner);
  return 0;
}

void hook_dealloc(PyObject* self) {
  PyObject_GC_UnTrack(self);
  hook_clear(self);
  PyTypeObject* type = Py_TYPE(self);
  type->tp_free(self);
  Py_DECREF(type);
}

PyObject* hook_repr(PyObject* self) {
  const Hook* h = reinterpret_cast<Hook*>(self);
  return PyUnicode_FromFormat("<stepscope hook %s%s>", kKindNames[h->kind],
                              h->owner == nullptr ? " (inert)" : "");
}

PyMethodDef g_hook_methods[] = {
    {"__copy__", hook_copy, METH_NOARGS, "an inert hook: a copy is never timed"},
    {"__deepcopy__", hook_copy, METH_O,
     "an inert hook, which removes itself from the copy at its first forward"},
    {"__reduce__", hook_reduce, METH_NOARGS, "pickles as a no-op of the standard library"},
    {nullptr, nullptr, 0, nullptr}};

PyMemberDef g_hook_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, static_cast<Py_ssize_t>(offsetof(Hook, vectorcall)), READONLY,
     nullptr},
    {nullptr, 0, 0, 0, nullptr}};

PyObject* get_inert(PyObject* self, void* /*closure*/) {
  return PyBool_FromLong(reinterpret_cast<Hook*>(self)->owner == nullptr);
}

PyGetSetDef g_hook_getset[] = {
    {"inert", get_inert, nullptr, "a copy's hook: times nothing", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyType_Slot g_hook_slots[] = {
    {Py_tp_doc, const_cast<char*>("One of the Monitor's hooks (StepHooks.forward_pre, ...): a C callable.")},
    {Py_tp_dealloc, reinterpret_cast<void*>(hook_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(hook_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(hook_clear)},
    {Py_tp_call, reinterpret_cast<void*>(PyVectorcall_Call)},
    {Py_tp_repr, reinterpret_cast<void*>(hook_repr)},
    {Py_tp_methods, g_hook_methods},
    {Py_tp_members, g_hook_members},
    {Py_tp_getset, g_hook_getset},
    {0, nullptr}};

PyType_Spec g_hook_spec = {"stepscope._C.StepHook", sizeof(Hook), 0,
                           Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
                           g_hook_slots};

PyObject* make_hook(PyObject* owner, int kind) {
  Hook* h = PyObject_GC_New(Hook, g_hook_type);
  if (h == nullptr) return nullptr;
  h->vectorcall = hook_call;
  Py_XINCREF(owner);
  h->owner = owner;
  h->kind = kind;
  PyObject_GC_Track(reinterpret_cast<PyObject*>(h));
  return reinterpret_cast<PyObject*>(h);
}

// --------------------------------------------------------------------------- StepHooks
// add_module(module, id): per-module timing for `module` under Timeline id `id` (the Monitor keeps
// the module alive while it is registered).
PyObject* add_module(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("add_module", nargs, 2)) return nullptr;
  const long id = PyLong_AsLong(args[1]);
  if (id == -1 && PyErr_Occurred()) return nullptr;
  TORCH_CHECK_VALUE(id >= 0 && id <= std::numeric_limits<int>::max(), "stepscope: module id out of range: ", id);
  reinterpret_cast<Object*>(self)->s->modules[args[0]] = static_cast<int>(id);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// claim(training): for a boundary marked by hand (Monitor.mark): ends the calls that are over
// without their post hook and returns whether the calling thread is the training thread (a
// training boundary claims it while none has).
PyObject* claim(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("claim", nargs, 1)) return nullptr;
  const int training = PyObject_IsTrue(args[0]);
  if (training < 0) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  if (!on_training_thread(s, training != 0)) Py_RETURN_FALSE;
  settle(s);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// optimizer_end(): the optimizer step marked by hand (Monitor.mark) ends the step; returns whether
// one ended.
PyObject* optimizer_end(PyObject* self, PyObject* const* /*args*/, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("optimizer_end", nargs, 0)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  if (!on_training_thread(s, true)) Py_RETURN_FALSE;
  settle(s);
  const int64_t before = s->tl->steps();
  s->tl->optimizer_end(true);
  if (s->tl->steps() == before) Py_RETURN_FALSE;
  PyObject* r = step_ended(s);
  if (r == nullptr) return nullptr;
  Py_DECREF(r);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// step(): ends the step where no optimizer hook does; returns whether one ended.
PyObject* step(PyObject* self, PyObject* const* /*args*/, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("step", nargs, 0)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  if (!on_training_thread(s, true)) Py_RETURN_FALSE;
  settle(s);
  if (!s->tl->step()) Py_RETURN_FALSE;
  PyObject* r = step_ended(s);
  if (r == nullptr) return nullptr;
  Py_DECREF(r);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

int traverse(PyObject* self, visitproc visit, void* arg) {
  Py_VISIT(Py_TYPE(self));
  State* s = reinterpret_cast<Object*>(self)->s;
  if (s != nullptr) {
    Py_VISIT(s->on_step_end);
    Py_VISIT(s->on_step_self);
    Py_VISIT(s->opt_in);
    Py_VISIT(s->opt_frame);
    Py_VISIT(s->fwd_frame);
    Py_VISIT(s->owns);
  }
  return 0;
}

int clear(PyObject* self) {
  State* s = reinterpret_cast<Object*>(self)->s;
  if (s != nullptr) {
    Py_CLEAR(s->on_step_end);
    Py_CLEAR(s->on_step_self);
    Py_CLEAR(s->opt_in);
    Py_CLEAR(s->opt_frame);
    Py_CLEAR(s->fwd_frame);
    Py_CLEAR(s->owns);
    for (auto& e : s->seen) Py_DECREF(e.second.ref);
    s->seen.clear();
  }
  return 0;
}

void dealloc(PyObject* self) {
  PyObject_GC_UnTrack(self);
  clear(self);
  delete reinterpret_cast<Object*>(self)->s;
  PyTypeObject* type = Py_TYPE(self);
  type->tp_free(self);
  Py_DECREF(type);
}

#define STEPSCOPE_FASTCALL(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f))
PyMethodDef g_methods[] = {
    {"add_module", STEPSCOPE_FASTCALL(add_module), METH_FASTCALL,
     "add_module(module, id): time this submodule's forward as Timeline module `id`"},
    {"step", STEPSCOPE_FASTCALL(step), METH_FASTCALL,
     "ends the step where no optimizer hook does; returns whether a step ended"},
    {"optimizer_end", STEPSCOPE_FASTCALL(optimizer_end), METH_FASTCALL,
     "an optimizer end marked by hand: ends the step; returns whether a step ended"},
    {"claim", STEPSCOPE_FASTCALL(claim), METH_FASTCALL,
     "claim(training): before a boundary marked by hand: ends the calls that are over without their post hook; "
     "returns whether the calling thread is the training thread (a training boundary claims it while none has)"},
    {nullptr, nullptr, 0, nullptr}};
#undef STEPSCOPE_FASTCALL

// The hooks to register: a new StepHook over this object per read (forward_pre, ...).
PyObject* get_hook(PyObject* self, void* closure) {
  return make_hook(self, static_cast<int>(reinterpret_cast<intptr_t>(closure)));
}

// sampling: whether per-module hooks belong on the step now running (the one rule, sample_now,
// decides it; the Monitor reads it once at attach and is told of every change after).
PyObject* get_sampling(PyObject* self, void* /*closure*/) {
  return PyBool_FromLong(reinterpret_cast<Object*>(self)->s->sampling);
}

PyObject* get_autocast(PyObject* self, void* /*closure*/) {
  const State* s = reinterpret_cast<Object*>(self)->s;
  return Py_BuildValue("(LL)", static_cast<long long>(s->train_forwards), static_cast<long long>(s->autocast_forwards));
}

#define STEPSCOPE_HOOK(kind, doc) \
  {kKindNames[kind], get_hook, nullptr, doc, reinterpret_cast<void*>(static_cast<intptr_t>(kind))}
PyGetSetDef g_getset[] = {
    STEPSCOPE_HOOK(kForwardPre, "forward pre-hook (module, args)"),
    STEPSCOPE_HOOK(kForwardPost, "forward hook (module, args, output); register with always_call=True"),
    STEPSCOPE_HOOK(kOptimizerPre, "optimizer step pre-hook (optimizer, args, kwargs)"),
    STEPSCOPE_HOOK(kOptimizerPost,
                   "optimizer step post-hook (optimizer, args, kwargs); the last one of a step ends it"),
    STEPSCOPE_HOOK(kModulePre,
                   "per-module forward pre-hook (module, args) for a submodule given to add_module()"),
    STEPSCOPE_HOOK(kModulePost,
                   "per-module forward hook (module, args, output); register with always_call=True"),
    {"sampling", get_sampling, nullptr, "per-module hooks belong on the step now running", nullptr},
    {"autocast_forwards", get_autocast, nullptr, "(training forwards, those under CUDA autocast)", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};
#undef STEPSCOPE_HOOK

PyType_Slot g_slots[] = {
    {Py_tp_doc, const_cast<char*>("The Monitor's hooks on one Timeline (stepscope._C.step_hooks() makes one).")},
    {Py_tp_dealloc, reinterpret_cast<void*>(dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(clear)},
    {Py_tp_methods, g_methods},
    {Py_tp_getset, g_getset},
    {0, nullptr}};

PyType_Spec g_spec = {"stepscope._C.StepHooks", sizeof(Object), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
                      g_slots};

py::object make(std::shared_ptr<Timeline> tl, int64_t batch, int64_t batch_dim, int64_t optimizers,
                py::object on_step_end, int64_t module_every, int64_t print_every, py::object owns) {
  TORCH_CHECK_VALUE(tl != nullptr, "stepscope: step_hooks needs a Timeline");
  TORCH_CHECK_VALUE(batch_dim >= 0, "stepscope: batch_dim must be >= 0; got ", batch_dim);
  TORCH_CHECK_VALUE(optimizers >= 0, "stepscope: optimizers must be >= 0; got ", optimizers);
  TORCH_CHECK_VALUE(module_every >= 0, "stepscope: module_every must be >= 0; got ", module_every);
  TORCH_CHECK_VALUE(print_every >= 0, "stepscope: print_every must be >= 0; got ", print_every);
  TORCH_CHECK_TYPE(on_step_end.is_none() || PyCallable_Check(on_step_end.ptr()),
                   "stepscope: on_step_end must be callable or None");
  TORCH_CHECK_TYPE(owns.is_none() || PyCallable_Check(owns.ptr()),
                   "stepscope: owns must be callable or None");
  auto s = std::make_unique<State>();
  s->tl = std::move(tl);
  s->batch = batch;
  s->batch_dim = batch_dim;
  s->n_opts = static_cast<size_t>(optimizers);
  s->module_every = module_every;
  s->print_every = print_every;
  s->thread = PyThread_get_thread_ident();
  if (print_every > 0) s->until_print = print_every - s->tl->steps() % print_every;
  s->sampling = sample_now(s.get());  // read by the Monitor at attach (the `sampling` attribute)
  if (PyMethod_Check(on_step_end.ptr())) {
    PyObject* ref = PyWeakref_NewRef(PyMethod_GET_SELF(on_step_end.ptr()), nullptr);
    if (ref == nullptr) throw py::error_already_set();
    s->on_step_self = ref;
    s->on_step_end = PyMethod_GET_FUNCTION(on_step_end.ptr());
    Py_INCREF(s->on_step_end);
  } else if (!on_step_end.is_none()) {
    s->on_step_end = on_step_end.release().ptr();
  }
  if (!owns.is_none()) s->owns = owns.release().ptr();
  Object* o = PyObject_GC_New(Object, g_type);
  if (o == nullptr) throw py::error_already_set();
  o->s = s.release();
  PyObject_GC_Track(reinterpret_cast<PyObject*>(o));
  return py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(o));
}

}  // namespace

void bind_step_hooks(py::module_& m) {
  g_training = PyUnicode_InternFromString("training");
  g_type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&g_spec));
  g_hook_type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&g_hook_spec));
  if (g_training == nullptr || g_type == nullptr || g_hook_type == nullptr)
    throw py::error_already_set();
  py::object noop = py::module_::import("contextlib").attr("nullcontext")().attr("__exit__");
  g_noop = noop.release().ptr();
  m.add_object("StepHooks", py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(g_type)));
  m.add_object("StepHook", py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(g_hook_type)));
  m.def("step_hooks", &make, py::arg("timeline"), py::arg("batch") = -1, py::arg("batch_dim") = 0,
        py::arg("optimizers") = 0, py::arg("on_step_end") = py::none(), py::arg("module_every") = 0,
        py::arg("print_every") = 0, py::arg("owns") = py::none(),
        "The Monitor's hooks on `timeline`: forward_pre/forward_post for the model, optimizer_pre/optimizer_post "
        "for the optimizers (with optimizers > 1 a step ends when that many distinct ones stepped; with 0, global "
        "hooks, an optimizer for which owns(optimizer) is false is ignored; owns is asked once per optimizer), "
        "module_pre/module_post for submodules given to add_module(), and step(). batch: samples per forward "
        "(< 0: the first input's size along batch_dim). After a step ends, on_step_end(sample_modules) is called "
        "only when per-module sampling (one step in module_every) switches on or off, and on every "
        "print_every-th step; a bound method is held through a weak reference to its object. Hooks that CPython "
        "calls directly, without pybind11's dispatcher; a copied hook is inert (see step_hooks.cpp).");
}

}  // namespace stepscope::python
