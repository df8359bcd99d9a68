// _C.StepHooks: the Monitor's hooks as plain CPython callables. nn.Module and the optimizers call
// a hook on every forward and step; through pybind11's dispatcher each call costs microseconds
// in a real training step (its caches are cold by then), so each hook is a small vectorcall
// object (_C.StepHook) over one State struct. They run with the GIL held; only the Timeline is
// shared with autograd's thread, and it has its own lock.
//
// The step rule they feed (several optimizers, nested and raised optimizer steps, interrupted
// forwards, other models' optimizers under global hooks, the training thread) is the Timeline's
// StepMachine (timing/step_machine.h). This file is its CPython side:
//  - Copies. copy.deepcopy(model) (EMA copies, AveragedModel) and torch.save(model) reach the
//    hooks in the module's hook dicts: a copy is inert and removes itself, a pickled one is a no-op
//    of the standard library (step_hook.cpp). Optimizers copy without hooks (Optimizer.__getstate__).
//  - Calls that never returned (a KeyboardInterrupt in forward: torch runs always_call forward
//    hooks only for an Exception; an optimizer step that raised). The machine's tokens for a call
//    are the Python frame that called its pre hook (torch's _call_impl, the optimizer's step
//    wrapper), held by a strong reference; the call still runs while that frame is on the current
//    thread's stack. Only that rare check walks the stack.
//  - Other models' optimizers under global optimizer hooks (optimizers=0): owns(optimizer), asked
//    once per optimizer object (hook::Owners, step_hook.h).
//  - Training health: a health::Watch at the model's outermost optimizer steps (hook::Health,
//    step_health.h), set by watch(); FLOPs counting at new input shapes (hook::Shapes).
//  - The Monitor's callback is held through a weak reference to its object: the hooks never keep
//    a Monitor alive (it removes them when it goes).
#include <ATen/autocast_mode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstddef>
#include <memory>
#include <vector>

#include "health/watch.h"
#include "python/bindings.h"
#include "python/step_state.h"
#include "timing/autograd_hook.h"

namespace py = pybind11;

namespace stepscope::python {

bool count_forward(State* s, PyObject* input) {
  const int c = s->machine.would_train() ? s->shapes.forward(input) : 0;
  if (c > 0) s->tl->keep_out_step();
  return c >= 0;
}

namespace {

PyTypeObject* g_type = nullptr;
PyObject* g_training = nullptr;  // interned "training"

PyObject* step_ended(State* s) {
  if (!s->shapes.step_end()) return nullptr;
  if (!s->modules.step_start(s->tl->steps())) return nullptr;
  const bool print = s->print_every > 0 && --s->until_print == 0;
  if (print) s->until_print = s->print_every;
  if (s->on_step_end == nullptr || !print) Py_RETURN_NONE;
  PyObject* arg = s->modules.sampling() ? Py_True : Py_False;
  if (s->on_step_self == nullptr) return PyObject_CallOneArg(s->on_step_end, arg);
  PyObject* self = PyWeakref_GetObject(s->on_step_self);  // borrowed
  if (self == nullptr) return nullptr;
  if (self == Py_None) Py_RETURN_NONE;  // the Monitor is gone (its finaliser removes these hooks)
  PyObject* r = PyObject_CallFunctionObjArgs(s->on_step_end, Py_NewRef(self), arg, nullptr);
  Py_DECREF(self);
  return r;
}


// A step ended by a call rather than a hook (step(), a marked optimizer end): True, or null on error.
PyObject* ended_by_hand(State* s) {
  PyObject* r = step_ended(s);
  Py_XDECREF(r);
  return r == nullptr ? nullptr : Py_NewRef(Py_True);
}

// --------------------------------------------------------------------------- the hooks
// forward pre-hook (module, args[, kwargs]: registered with_kwargs, so that a model called with
// keywords only counts its batch too): eval when the module is in eval() or grad is off (inference
// mode turns grad off too).
PyObject* forward_pre(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 && !hook::check_args("forward_pre", nargs, 2)) return nullptr;
  PyObject* training = PyObject_GetAttr(args[0], g_training);
  if (training == nullptr) return nullptr;
  const int is_training = PyObject_IsTrue(training);
  Py_DECREF(training);
  if (is_training < 0) return nullptr;
  const bool eval = !is_training || !c10::GradMode::is_enabled();
  PyObject* input = hook::first_input(args[1], nargs == 3 ? args[2] : nullptr);
  const bool counts = s->samples_of == 0 || reinterpret_cast<uintptr_t>(args[0]) == s->samples_of;
  int64_t batch = counts ? s->batch : 0;
  PyObject* sized = batch < 0 ? hook::first_tensor(input) : nullptr;
  if (sized != nullptr) {
    const at::Tensor& t = THPVariable_Unpack(sized);
    if (t.dim() > s->batch_dim) batch = t.size(s->batch_dim);
  }
  if (!eval && !count_forward(s, input)) return nullptr;
  if (!s->machine.forward_begin(eval, batch, hook::calling_frame())) Py_RETURN_NONE;
  if (!eval) {
    ++s->train_forwards;
    if (at::autocast::is_autocast_enabled(at::kCUDA)) ++s->autocast_forwards;
  }
  Py_RETURN_NONE;
}

// forward hook (module, args, output), registered with always_call: a failing forward still ends.
PyObject* forward_post(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (!hook::check_args("forward_post", nargs, 3)) return nullptr;
  if (!s->machine.forward_end()) Py_RETURN_NONE;
  if (!s->shapes.forward_end()) return nullptr;
  if (args[2] != Py_None && c10::GradMode::is_enabled()) {
    PyObject* t = hook::first_grad_tensor(args[2]);
    if (t != nullptr) stepscope::timing::hook_backward(THPVariable_Unpack(t), s->tl);
  }
  Py_RETURN_NONE;
}

// optimizer step pre/post hooks (optimizer, args, kwargs). torch wraps every class's step once an
// instance of it exists, so a subclass whose step() calls super().step() fires them twice, nested:
// the machine takes the outermost pair.

PyObject* optimizer_pre(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (!hook::check_args("optimizer_pre", nargs, 3)) return nullptr;
  const int opened = s->machine.optimizer_begin(args[0], hook::calling_frame());
  if (opened < 0) return nullptr;
  if (opened > 0 && !s->health.pre(*s->tl, args[1], args[2])) return nullptr;
  Py_RETURN_NONE;
}

PyObject* optimizer_post(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (!hook::check_args("optimizer_post", nargs, 3)) return nullptr;
  const int64_t step = s->health.on() && s->machine.closing(args[0]) ? s->tl->step_index() : -1;
  const bool ended = s->machine.optimizer_end(args[0]);
  if (step >= 0 && !s->health.post(step, ended)) return nullptr;  // raise mode, a closure step (the step went on)
  if (ended) return step_ended(s);
  Py_RETURN_NONE;
}

// Per-module forward pre/post hooks (module, args[, output]) of the submodules given to
// add_module(); the training thread's only.
int module_id(State* s, PyObject* module) {
  return s->machine.on_training_thread() ? s->modules.id(module) : -1;
}

PyObject* module_pre(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (!hook::check_args("module_pre", nargs, 2)) return nullptr;
  const int id = module_id(s, args[0]);
  if (id >= 0) s->tl->module_begin(id);
  Py_RETURN_NONE;
}

PyObject* module_post(State* s, PyObject* const* args, Py_ssize_t nargs) {
  if (!hook::check_args("module_post", nargs, 3)) return nullptr;
  const int id = module_id(s, args[0]);
  if (id >= 0) s->tl->module_end(id);
  Py_RETURN_NONE;
}

// The StepHook objects (step_hook.cpp) call these with their StepHooks object.
template <PyObject* (*F)(State*, PyObject* const*, Py_ssize_t)>
PyObject* on_owner(PyObject* owner, PyObject* const* args, Py_ssize_t nargs) {
  return F(reinterpret_cast<Object*>(owner)->s, args, nargs);
}
constexpr hook::Fn kHookFns[hook::kKinds] = {on_owner<forward_pre>,    on_owner<forward_post>,
                                             on_owner<optimizer_pre>,  on_owner<optimizer_post>,
                                             on_owner<module_pre>,     on_owner<module_post>};

// --------------------------------------------------------------------------- StepHooks
// add_module(module, id): per-module timing for `module` as Timeline id `id` (the Monitor keeps it alive).
PyObject* add_module(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!hook::check_args("add_module", nargs, 2)) return nullptr;
  if (!reinterpret_cast<Object*>(self)->s->modules.add(args[0], args[1])) return nullptr;
  Py_RETURN_NONE;
}

// gate(hooks, id, hook): a per-module hook registered in its module's hook dict `hooks` under torch's
// handle id, kept there on sampled steps only (hook::Modules); gate(None): forgets them all (detach).
PyObject* gate(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  hook::Modules& m = reinterpret_cast<Object*>(self)->s->modules;
  if (nargs == 1 && args[0] == Py_None) {
    m.clear_gates();
    Py_RETURN_NONE;
  }
  if (!hook::check_args("gate", nargs, 3) || !m.gate(args[0], args[1], args[2])) return nullptr;
  Py_RETURN_NONE;
}

// claim(training): before a boundary marked by hand (Monitor.mark): ends the calls over without their post
// hook; whether the calling thread is the training thread (a training boundary claims it while none has).
PyObject* claim(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!hook::check_args("claim", nargs, 1)) return nullptr;
  const int training = PyObject_IsTrue(args[0]);
  if (training < 0) return nullptr;
  if (!reinterpret_cast<Object*>(self)->s->machine.claim(training != 0)) Py_RETURN_FALSE;
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// optimizer_end(): the optimizer step marked by hand (Monitor.mark) ends the step; returns whether
// one ended.
PyObject* optimizer_end(PyObject* self, PyObject* const* /*args*/, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!hook::check_args("optimizer_end", nargs, 0)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  if (!s->machine.optimizer_end_marked()) Py_RETURN_FALSE;
  return ended_by_hand(s);
  END_HANDLE_TH_ERRORS
}

// watch(w): training health at each optimizer step (a _C.HealthWatch), or None: off.
PyObject* set_watch(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!hook::check_args("watch", nargs, 1)) return nullptr;
  reinterpret_cast<Object*>(self)->s->health.set(
      args[0] == Py_None ? nullptr : py::handle(args[0]).cast<std::shared_ptr<stepscope::health::Watch>>());
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// count_shapes(fn): FLOPs counting at each new input shape (hook::Shapes), or None: off.
PyObject* count_shapes(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!hook::check_args("count_shapes", nargs, 1)) return nullptr;
  TORCH_CHECK_TYPE(args[0] == Py_None || PyCallable_Check(args[0]), "stepscope: count_shapes needs a callable or None");
  reinterpret_cast<Object*>(self)->s->shapes.set(args[0]);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// count_input(x): the shape watch for a forward marked by hand (Monitor.mark, the Lightning
// callback): x its first input, before forward_begin; None once its forward is over.
PyObject* count_input(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!hook::check_args("count_input", nargs, 1)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  if (!(args[0] == Py_None ? s->shapes.forward_end() : count_forward(s, args[0]))) return nullptr;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// step(): ends the step where no optimizer hook does; returns whether one ended.
PyObject* step(PyObject* self, PyObject* const* /*args*/, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!hook::check_args("step", nargs, 0)) return nullptr;
  State* s = reinterpret_cast<Object*>(self)->s;
  if (!s->machine.step()) Py_RETURN_FALSE;
  return ended_by_hand(s);
  END_HANDLE_TH_ERRORS
}

int traverse(PyObject* self, visitproc visit, void* arg) {
  Py_VISIT(Py_TYPE(self));
  State* s = reinterpret_cast<Object*>(self)->s;
  if (s != nullptr) {
    Py_VISIT(s->on_step_end);
    Py_VISIT(s->on_step_self);
    for (const void* t : s->machine.held()) Py_VISIT(State::obj(t));
    Py_VISIT(s->owners.fn);
    Py_VISIT(s->shapes.fn);
    if (int r = s->modules.traverse(visit, arg)) return r;
  }
  return 0;
}

int clear(PyObject* self) {
  State* s = reinterpret_cast<Object*>(self)->s;
  if (s != nullptr) {
    Py_CLEAR(s->on_step_end);
    Py_CLEAR(s->on_step_self);
    s->machine.release_all();
    s->owners.clear();
    s->shapes.clear();
    s->modules.clear_gates();
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
    {"gate", STEPSCOPE_FASTCALL(gate), METH_FASTCALL,
     "gate(hooks, id, hook): a per-module hook kept in its module's hook dict on sampled steps only; None: none"},
    {"watch", STEPSCOPE_FASTCALL(set_watch), METH_FASTCALL,
     "watch(w): training health (a HealthWatch) at each of the model's optimizer steps; None: off"},
    {"count_shapes", STEPSCOPE_FASTCALL(count_shapes), METH_FASTCALL,
     "count_shapes(fn): FLOPs counting at each new input shape (fn's calls: hook::Shapes); None: off"},
    {"count_input", STEPSCOPE_FASTCALL(count_input), METH_FASTCALL,
     "count_input(x): a forward marked by hand begins with first input x (None: it ended), for FLOPs counting"},
    {"batch_start", STEPSCOPE_FASTCALL(mark_batch_start), METH_FASTCALL,
     "batch_start(batch): a framework's training batch begins (FLOPs counting, forward_begin with its samples)"},
    {"before_backward", STEPSCOPE_FASTCALL(mark_before_backward), METH_FASTCALL,
     "before_backward(loss): forward_end, the loss kept (health), backward_begin"},
    {"after_backward", STEPSCOPE_FASTCALL(mark_after_backward), METH_FASTCALL, "after_backward(): backward_end"},
    {"batch_end", STEPSCOPE_FASTCALL(mark_batch_end), METH_FASTCALL,
     "batch_end(): forward_end of a training step that skipped its backward"},
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
  return hook::make(self, static_cast<int>(reinterpret_cast<intptr_t>(closure)));
}

// sampling: whether per-module hooks are in place for the step now running (hook::Modules).
PyObject* get_sampling(PyObject* self, void* /*closure*/) {
  return PyBool_FromLong(reinterpret_cast<Object*>(self)->s->modules.sampling());
}

PyObject* get_marked_batch(PyObject* self, void* /*closure*/) {
  return PyBool_FromLong(reinterpret_cast<Object*>(self)->s->marked_batch);
}

PyObject* get_autocast(PyObject* self, void* /*closure*/) {
  const State* s = reinterpret_cast<Object*>(self)->s;
  return Py_BuildValue("(LL)", static_cast<long long>(s->train_forwards), static_cast<long long>(s->autocast_forwards));
}

PyObject* get_shapes(PyObject* self, void* /*closure*/) { return reinterpret_cast<Object*>(self)->s->shapes.read(); }

#define STEPSCOPE_HOOK(kind, doc) \
  {hook::kKindNames[kind], get_hook, nullptr, doc, reinterpret_cast<void*>(static_cast<intptr_t>(kind))}
PyGetSetDef g_getset[] = {
    STEPSCOPE_HOOK(hook::kForwardPre, "forward pre-hook (module, args)"),
    STEPSCOPE_HOOK(hook::kForwardPost, "forward hook (module, args, output); register with always_call=True"),
    STEPSCOPE_HOOK(hook::kOptimizerPre, "optimizer step pre-hook (optimizer, args, kwargs)"),
    STEPSCOPE_HOOK(hook::kOptimizerPost,
                   "optimizer step post-hook (optimizer, args, kwargs); the last one of a step ends it"),
    STEPSCOPE_HOOK(hook::kModulePre,
                   "per-module forward pre-hook (module, args) for a submodule given to add_module()"),
    STEPSCOPE_HOOK(hook::kModulePost,
                   "per-module forward hook (module, args, output); register with always_call=True"),
    {"sampling", get_sampling, nullptr, "per-module hooks belong on the step now running", nullptr},
    {"marked_batch", get_marked_batch, nullptr, "a framework mark counted a batch's samples", nullptr},
    {"autocast_forwards", get_autocast, nullptr, "(training forwards, those under CUDA autocast)", nullptr},
    {"shape_steps", get_shapes, nullptr, "[(shape key, steps begun with it)] and steps with shapes beyond those",
     nullptr},
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

// step_hooks(timeline, batch, batch_dim, optimizers, on_step_end, module_every, print_every, owns,
// samples_of): the fields of State say what each argument does (optimizers: the StepMachine's; owns:
// Owners').
py::object make(std::shared_ptr<Timeline> tl, int64_t batch, int64_t batch_dim, int64_t optimizers,
                py::object on_step_end, int64_t module_every, int64_t print_every, py::object owns,
                py::object samples_of) {
  TORCH_CHECK_VALUE(tl != nullptr, "stepscope: step_hooks needs a Timeline");
  TORCH_CHECK_VALUE(batch_dim >= 0 && optimizers >= 0 && module_every >= 0 && print_every >= 0,
                    "stepscope: batch_dim, optimizers, module_every and print_every must be >= 0; got ", batch_dim,
                    ", ", optimizers, ", ", module_every, ", ", print_every);
  for (const py::object* f : {&on_step_end, &owns})
    TORCH_CHECK_TYPE(f->is_none() || PyCallable_Check(f->ptr()), "stepscope: on_step_end and owns must be callable or None");
  auto s = std::make_unique<State>(std::move(tl), static_cast<size_t>(optimizers));
  s->batch = batch;
  s->batch_dim = batch_dim;
  s->modules = hook::Modules(module_every);
  s->modules.step_start(s->tl->steps());  // no gate yet: cannot fail
  s->print_every = print_every;
  if (print_every > 0) s->until_print = print_every - s->tl->steps() % print_every;
  if (PyMethod_Check(on_step_end.ptr())) {
    PyObject* ref = PyWeakref_NewRef(PyMethod_GET_SELF(on_step_end.ptr()), nullptr);
    if (ref == nullptr) throw py::error_already_set();
    s->on_step_self = ref;
    s->on_step_end = PyMethod_GET_FUNCTION(on_step_end.ptr());
    Py_INCREF(s->on_step_end);
  } else if (!on_step_end.is_none()) {
    s->on_step_end = on_step_end.release().ptr();
  }
  if (!owns.is_none()) s->owners.fn = owns.release().ptr();
  if (!samples_of.is_none()) s->samples_of = reinterpret_cast<uintptr_t>(samples_of.ptr());
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
  PyTypeObject* hook_type = hook::make_type(kHookFns);
  if (g_training == nullptr || g_type == nullptr || hook_type == nullptr) throw py::error_already_set();
  m.add_object("StepHooks", py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(g_type)));
  m.add_object("StepHook", py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(hook_type)));
  m.def("step_hooks", &make, py::arg("timeline"), py::arg("batch") = -1, py::arg("batch_dim") = 0,
        py::arg("optimizers") = 0, py::arg("on_step_end") = py::none(), py::arg("module_every") = 0,
        py::arg("print_every") = 0, py::arg("owns") = py::none(), py::arg("samples_of") = py::none(),
        "The Monitor's hooks on `timeline` (forward_pre/_post, optimizer_pre/_post, module_pre/_post, step(), "
        "watch()): C callables over the step rule of timing/step_machine.h; the arguments and what each hook "
        "does: csrc/python/step_hooks.cpp.");
}

}  // namespace stepscope::python
