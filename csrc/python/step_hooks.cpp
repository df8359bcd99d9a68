// _C.StepHooks: the Monitor's hooks as plain CPython callables. nn.Module and the optimizers call
// a hook on every forward and step; through pybind11's dispatcher each call costs microseconds
// in a real training step (its caches are cold by then), so these are METH_FASTCALL methods of a
// small type whose state sits in one struct. They run with the GIL held; only the Timeline is
// shared with autograd's thread, and it has its own lock.
#include <ATen/autocast_mode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <algorithm>
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
  int64_t batch = -1;               // samples per forward; < 0: the first input's leading dimension
  size_t n_opts = 0;                // optimizers given; 0 or 1: every outermost step ends the step
  std::vector<PyObject*> stepped;   // optimizers that stepped in this step (identities only)
  PyObject* opt_in = nullptr;       // the optimizer inside its step (strong reference) ...
  int opt_depth = 0;                // ... and its nesting (subclass steps calling super().step())
  PyObject* opt_args = nullptr;     // the outermost step call's args tuple (strong reference)
  // Global hooks (n_opts == 0) see every optimizer in the process: one stepping before the model
  // ran in the step is another model's, unless its closure then runs the model (LBFGS).
  bool opt_foreign = false;
  // Python work at a step's end: on_step_end(sample_modules) is called only when per-module
  // sampling (one step in module_every, 0: none) switches on or off ...
  PyObject* on_step_end = nullptr;  // strong reference, or null
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

PyTypeObject* g_type = nullptr;
PyObject* g_training = nullptr;  // interned "training"

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
  return PyObject_CallOneArg(s->on_step_end, want ? Py_True : Py_False);
}

// An optimizer step whose post hook never came (it raised): torch's step wrapper holds the call's
// args tuple while it runs (the pre hook sees it), so a tuple only this State still holds
// belongs to a call that is over. The step's time up to here counts as the optimizer's, and the
// step goes on. (A nested super().step() or a closure running the model is a call still running;
// a pre hook of someone else's that returns replacement args would make a running call look
// finished, and its closure would then be timed as a new step's forward.)
void drop_raised_step(State* s) {
  if (s->opt_depth == 0 || s->opt_args == nullptr || Py_REFCNT(s->opt_args) > 1) return;
  Py_CLEAR(s->opt_in);
  Py_CLEAR(s->opt_args);
  s->opt_depth = 0;
  if (!s->opt_foreign) s->tl->optimizer_end(false);
  s->opt_foreign = false;
}

// forward pre-hook (module, args): eval when the module is in eval() or grad is off (inference
// mode turns grad off too).
PyObject* forward_pre(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("forward_pre", nargs, 2)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  drop_raised_step(s);
  PyObject* training = PyObject_GetAttr(args[0], g_training);
  if (training == nullptr) return nullptr;
  const int is_training = PyObject_IsTrue(training);
  Py_DECREF(training);
  if (is_training < 0) return nullptr;
  const bool eval = !is_training || !c10::GradMode::is_enabled();
  if (s->opt_depth != 0 && s->opt_foreign && !eval) {  // inside a global-hook optimizer's closure
    s->opt_foreign = false;
    s->tl->optimizer_begin();
  }
  int64_t batch = s->batch;
  if (batch < 0 && PyTuple_Check(args[1]) && PyTuple_GET_SIZE(args[1]) > 0) {
    PyObject* a0 = PyTuple_GET_ITEM(args[1], 0);
    if (THPVariable_Check(a0)) {
      const at::Tensor& t = THPVariable_Unpack(a0);
      if (t.dim() > 0) batch = t.size(0);
    }
  }
  if (!eval) {
    ++s->train_forwards;
    if (at::autocast::is_autocast_enabled(at::kCUDA)) ++s->autocast_forwards;
  }
  s->tl->forward_begin(eval, batch);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// forward hook (module, args, output), registered with always_call: a failing forward still ends.
PyObject* forward_post(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("forward_post", nargs, 3)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  s->tl->forward_end();
  if (args[2] != Py_None && c10::GradMode::is_enabled()) {
    PyObject* t = first_grad_tensor(args[2], 0);
    if (t != nullptr) stepscope::timing::hook_backward(THPVariable_Unpack(t), s->tl);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// optimizer step pre/post hooks (optimizer, args, kwargs). torch wraps every class's step once an
// instance of it exists, so a subclass whose step() calls super().step() fires them twice, nested:
// only the outermost pair is a boundary.
PyObject* optimizer_pre(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("optimizer_pre", nargs, 3)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  drop_raised_step(s);
  if (s->opt_depth != 0 && s->opt_in == args[0]) {
    ++s->opt_depth;
    Py_RETURN_NONE;
  }
  if (s->opt_depth != 0) s->tl->optimizer_end(false);  // a different optimizer: the previous step raised
  Py_INCREF(args[0]);
  Py_XSETREF(s->opt_in, args[0]);
  Py_INCREF(args[1]);
  Py_XSETREF(s->opt_args, args[1]);
  s->opt_depth = 1;
  s->opt_foreign = s->n_opts == 0 && !s->tl->forward_seen();
  if (!s->opt_foreign) s->tl->optimizer_begin();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* optimizer_post(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("optimizer_post", nargs, 3)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  if (s->opt_in != args[0] || s->opt_depth == 0) Py_RETURN_NONE;
  if (--s->opt_depth > 0) Py_RETURN_NONE;
  Py_CLEAR(s->opt_args);
  if (s->opt_foreign) {  // another model's optimizer
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
  END_HANDLE_TH_ERRORS
}

// Per-module forward pre/post hooks (module, args[, output]) of the submodules given to
// add_module().
int module_id(State* s, PyObject* module) {
  auto it = s->modules.find(module);
  return it == s->modules.end() ? -1 : it->second;
}

PyObject* module_pre(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("module_pre", nargs, 2)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  const int id = module_id(s, args[0]);
  if (id >= 0) s->tl->module_begin(id);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* module_post(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("module_post", nargs, 3)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  const int id = module_id(s, args[0]);
  if (id >= 0) s->tl->module_end(id);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

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

// optimizer_end(): the optimizer step marked by hand (Monitor.mark) ends the step; returns whether
// one ended.
PyObject* optimizer_end(PyObject* self, PyObject* const* /*args*/, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("optimizer_end", nargs, 0)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
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
    Py_VISIT(s->opt_in);
    Py_VISIT(s->opt_args);
  }
  return 0;
}

int clear(PyObject* self) {
  State* s = reinterpret_cast<Object*>(self)->s;
  if (s != nullptr) {
    Py_CLEAR(s->on_step_end);
    Py_CLEAR(s->opt_in);
    Py_CLEAR(s->opt_args);
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
    {"forward_pre", STEPSCOPE_FASTCALL(forward_pre), METH_FASTCALL, "forward pre-hook (module, args)"},
    {"forward_post", STEPSCOPE_FASTCALL(forward_post), METH_FASTCALL,
     "forward hook (module, args, output); register with always_call=True"},
    {"optimizer_pre", STEPSCOPE_FASTCALL(optimizer_pre), METH_FASTCALL,
     "optimizer step pre-hook (optimizer, args, kwargs)"},
    {"optimizer_post", STEPSCOPE_FASTCALL(optimizer_post), METH_FASTCALL,
     "optimizer step post-hook (optimizer, args, kwargs); the last one of a step ends it"},
    {"module_pre", STEPSCOPE_FASTCALL(module_pre), METH_FASTCALL,
     "per-module forward pre-hook (module, args) for a submodule given to add_module()"},
    {"module_post", STEPSCOPE_FASTCALL(module_post), METH_FASTCALL,
     "per-module forward hook (module, args, output); register with always_call=True"},
    {"add_module", STEPSCOPE_FASTCALL(add_module), METH_FASTCALL,
     "add_module(module, id): time this submodule's forward as Timeline module `id`"},
    {"step", STEPSCOPE_FASTCALL(step), METH_FASTCALL,
     "ends the step where no optimizer hook does; returns whether a step ended"},
    {"optimizer_end", STEPSCOPE_FASTCALL(optimizer_end), METH_FASTCALL,
     "an optimizer end marked by hand: ends the step; returns whether a step ended"},
    {nullptr, nullptr, 0, nullptr}};
#undef STEPSCOPE_FASTCALL

// sampling: whether per-module hooks belong on the step now running (the one rule, sample_now,
// decides it; the Monitor reads it once at attach and is told of every change after).
PyObject* get_sampling(PyObject* self, void* /*closure*/) {
  return PyBool_FromLong(reinterpret_cast<Object*>(self)->s->sampling);
}

PyObject* get_autocast(PyObject* self, void* /*closure*/) {
  const State* s = reinterpret_cast<Object*>(self)->s;
  return Py_BuildValue("(LL)", static_cast<long long>(s->train_forwards), static_cast<long long>(s->autocast_forwards));
}

PyGetSetDef g_getset[] = {
    {"sampling", get_sampling, nullptr, "per-module hooks belong on the step now running", nullptr},
    {"autocast_forwards", get_autocast, nullptr, "(training forwards, those under CUDA autocast)", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

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

py::object make(std::shared_ptr<Timeline> tl, int64_t batch, int64_t optimizers, py::object on_step_end,
                int64_t module_every, int64_t print_every) {
  TORCH_CHECK_VALUE(tl != nullptr, "stepscope: step_hooks needs a Timeline");
  TORCH_CHECK_VALUE(optimizers >= 0, "stepscope: optimizers must be >= 0; got ", optimizers);
  TORCH_CHECK_VALUE(module_every >= 0, "stepscope: module_every must be >= 0; got ", module_every);
  TORCH_CHECK_VALUE(print_every >= 0, "stepscope: print_every must be >= 0; got ", print_every);
  TORCH_CHECK_TYPE(on_step_end.is_none() || PyCallable_Check(on_step_end.ptr()),
                   "stepscope: on_step_end must be callable or None");
  auto s = std::make_unique<State>();
  s->tl = std::move(tl);
  s->batch = batch;
  s->n_opts = static_cast<size_t>(optimizers);
  s->module_every = module_every;
  s->print_every = print_every;
  if (print_every > 0) s->until_print = print_every - s->tl->steps() % print_every;
  s->sampling = sample_now(s.get());  // read by the Monitor at attach (the `sampling` attribute)
  if (!on_step_end.is_none()) s->on_step_end = on_step_end.release().ptr();
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
  if (g_training == nullptr || g_type == nullptr) throw py::error_already_set();
  m.add_object("StepHooks", py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(g_type)));
  m.def("step_hooks", &make, py::arg("timeline"), py::arg("batch") = -1, py::arg("optimizers") = 0,
        py::arg("on_step_end") = py::none(), py::arg("module_every") = 0,
        py::arg("print_every") = 0,
        "The Monitor's hooks on `timeline`: forward_pre/forward_post for the model, optimizer_pre/optimizer_post "
        "for the optimizers (with optimizers > 1 a step ends when that many distinct ones stepped), "
        "module_pre/module_post for submodules given to add_module(), and step(). After a step ends, "
        "on_step_end(sample_modules) is called only when per-module sampling "
        "(one step in module_every) switches on or off, and on every print_every-th step. Hooks that CPython calls directly, without pybind11's "
        "dispatcher.");
}

}  // namespace stepscope::python
