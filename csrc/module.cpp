// stepscope._C: the pybind11 module. The only file that includes Python headers. Tensor ops are
// not bound here (they are TORCH_LIBRARY ops, reached as torch.ops.stepscope.*); this module
// holds build information, the metrics configuration/compute functions and the stateful C++
// classes.
#include <ATen/autocast_mode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>

#include "build_info.h"
#include "metrics/accumulator.h"
#include "metrics/layout.h"
#include "nvtx/nvtx.h"
#include "timing/autograd_hook.h"
#include "timing/timeline.h"

namespace py = pybind11;
using stepscope::metrics::Config;

namespace {

Config config_from(int64_t task, int64_t num_classes, std::vector<int64_t> top_k, std::optional<int64_t> ignore_index,
                   double threshold, int64_t input_kind, bool confusion_matrix) {
  Config c = stepscope::metrics::make_config(task, num_classes, top_k, ignore_index, threshold, input_kind,
                                             confusion_matrix);
  (void)stepscope::metrics::make_layout(c);  // validates
  return c;
}

py::dict layout_dict(const stepscope::metrics::Layout& l) {
  py::dict d;
  d["classes"] = l.classes;
  d["tp"] = l.tp;
  d["pred"] = l.pred;
  d["target"] = l.target;
  d["valid"] = l.valid;
  d["valid_len"] = l.valid_len;
  d["topk"] = l.topk;
  d["loss"] = l.loss;
  d["ece_count"] = l.ece_count;
  d["ece_conf"] = l.ece_conf;
  d["ece_acc"] = l.ece_acc;
  d["nonfinite"] = l.nonfinite;
  d["invalid"] = l.invalid;
  d["ignored"] = l.ignored;
  d["pending"] = l.pending;
  d["confmat"] = l.confmat;
  d["numel"] = l.numel;
  return d;
}

py::dict series_dict(const stepscope::timing::SeriesSummary& s) {
  py::dict d;
  d["count"] = s.count;
  d["total"] = s.total;
  d["mean"] = s.mean;
  d["std"] = s.std;
  d["min"] = s.min;
  d["max"] = s.max;
  if (s.has_quantiles) {
    d["p50"] = s.p50;
    d["p90"] = s.p90;
    d["p99"] = s.p99;
  }
  return d;
}

py::dict named_dict(const std::vector<stepscope::timing::NamedSummary>& v, bool device) {
  py::dict d;
  for (const auto& n : v) {
    py::dict e;
    e["host"] = series_dict(n.host);
    e["device"] = device ? py::object(series_dict(n.device)) : py::object(py::none());
    if (n.parent != nullptr) e["parent"] = n.parent;
    d[py::str(n.name)] = e;
  }
  return d;
}

// CUDA allocator counters, or None when none were read (CPU, or no step ended yet).
py::object memory_dict(const stepscope::timing::DeviceMemory& m, bool peaks) {
  if (m.allocated < 0) return py::none();
  py::dict d;
  d["allocated"] = m.allocated;
  d["reserved"] = m.reserved;
  if (peaks) {
    d["peak"] = m.peak_allocated;
    d["peak_reserved"] = m.peak_reserved;
  }
  return d;
}

py::dict warmup_dict(const stepscope::timing::WarmupSummary& w, bool device) {
  using stepscope::timing::Phase;
  py::dict host, dev;
  for (int i = 0; i < static_cast<int>(Phase::kCount); ++i) {
    const char* name = stepscope::timing::phase_name(static_cast<Phase>(i));
    host[name] = w.host[i];
    if (device && w.device_count[i] > 0) dev[name] = w.device[i];
  }
  py::dict d;
  d["steps"] = w.steps;
  d["samples"] = w.samples;
  d["host"] = host;
  d["device"] = device ? py::object(dev) : py::object(py::none());
  return d;
}

py::dict report_dict(const stepscope::timing::Report& r) {
  py::dict d;
  d["phases"] = named_dict(r.phases, r.device);
  d["user"] = named_dict(r.user, r.device);
  d["modules"] = named_dict(r.modules, r.device);
  d["steps"] = r.steps;
  d["samples"] = r.samples;
  d["step_host_total"] = r.step_host_total;
  d["dropped_device_samples"] = r.dropped_device_samples;
  d["pending_device_samples"] = r.pending_device_samples;
  d["device"] = r.device;
  d["warmup"] = warmup_dict(r.warmup, r.device);
  d["memory"] = memory_dict(r.memory, true);
  if (r.memory_trend.steps >= 2) {
    py::dict t;
    t["steps"] = r.memory_trend.steps;
    t["first"] = r.memory_trend.first;
    t["last"] = r.memory_trend.last;
    t["rising_fraction"] = r.memory_trend.rising_fraction;
    d["memory_trend"] = t;
  } else {
    d["memory_trend"] = py::none();
  }
  py::dict lag;
  for (const auto& n : r.lag) lag[py::str(n.name)] = series_dict(n.host);
  d["lag"] = r.device ? py::object(lag) : py::object(py::none());
  py::list spikes;
  for (const auto& sp : r.spikes) {
    py::dict e;
    e["step"] = sp.index;
    e["duration"] = sp.duration;
    e["step_median"] = sp.step_median;
    e["phase"] = stepscope::timing::phase_name(static_cast<stepscope::timing::Phase>(sp.phase));
    e["phase_time"] = sp.phase_time;
    e["phase_median"] = sp.phase_median;
    spikes.append(e);
  }
  d["spikes"] = spikes;
  d["spikes_total"] = r.spikes_total;
  // Device sampling: None where unknown (no device timing; device_every in a merged report).
  d["device_steps"] = r.device_steps;
  d["device_every"] = r.device_every > 0 ? py::object(py::int_(r.device_every)) : py::object(py::none());
  d["device_every_auto"] = r.device_every_auto;
  d["device_events"] = r.device_events;
  d["event_record_cost"] = r.event_record_cost > 0 ? py::object(py::float_(r.event_record_cost)) : py::object(py::none());
  return d;
}


// ---- timing: the Monitor's hooks as plain CPython callables. nn.Module and the optimizers call
// a hook on every forward and step; through pybind11's dispatcher each call costs microseconds
// in a real training step (its caches are cold by then), so these are METH_FASTCALL methods of a
// small type whose state sits in one struct. They run with the GIL held; only the Timeline is
// shared with autograd's thread, and it has its own lock.
namespace hooks {

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

void init(py::module_& m) {
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

}  // namespace hooks

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "stepscope native core";

  m.def(
      "build_info",
      [] {
        const auto b = stepscope::build_info();
        py::dict d;
        d["torch_version"] = b.torch_version;
        d["cuda"] = b.cuda ? py::object(py::str(b.cuda_version)) : py::object(py::none());
        py::list archs;
        if (b.cuda) {
          std::string a = b.cuda_archs;
          for (char& ch : a) ch = (ch == ',' || ch == ' ') ? ';' : ch;
          size_t start = 0;
          while (start <= a.size()) {
            const size_t end = a.find(';', start);
            const std::string tok = a.substr(start, end == std::string::npos ? std::string::npos : end - start);
            if (!tok.empty()) archs.append(tok);
            if (end == std::string::npos) break;
            start = end + 1;
          }
        }
        d["cuda_archs"] = archs;
        d["nvtx"] = b.nvtx;
        return d;
      },
      "What this build was compiled with: torch_version, cuda (toolkit version or None), cuda_archs, nvtx.");

  py::class_<Config>(m, "MetricsConfig",
                     "A validated metrics configuration: the state layout and the compute formulas.")
      .def(py::init(&config_from), py::arg("task"), py::arg("num_classes"), py::arg("top_k"), py::arg("ignore_index"),
           py::arg("threshold"), py::arg("input_kind"), py::arg("confusion_matrix"))
      .def_property_readonly("numel", [](const Config& c) { return stepscope::metrics::make_layout(c).numel; })
      .def_property_readonly("layout", [](const Config& c) { return layout_dict(stepscope::metrics::make_layout(c)); })
      .def(
          "compute",
          [](const Config& c, const at::Tensor& state, double beta) {
            py::dict d;
            for (auto& [k, v] : stepscope::metrics::compute_metrics(c, state, beta)) d[py::str(k)] = v;
            return d;
          },
          py::arg("state"), py::arg("beta") = 1.0)
      .def(
          "confusion_matrix",
          [](const Config& c, const at::Tensor& state, const std::string& normalize) {
            return stepscope::metrics::confusion_matrix(c, state, normalize);
          },
          py::arg("state"), py::arg("normalize") = "none")
      .def(
          "check",
          // Python raises the non-finite warning itself (a TORCH_WARN from here would only reach stderr).
          [](const Config& c, const at::Tensor& state) { return stepscope::metrics::check_state(c, state, false); },
          py::arg("state"));

  // ---- timing: the Timeline behind stepscope.Monitor. The boundary methods run inside hooks
  // (backward ones on autograd's thread), so each is one clock read, at most one event record and
  // the Timeline's own lock, which is never held while calling back into Python.
  using stepscope::timing::Timeline;
  py::class_<Timeline, std::shared_ptr<Timeline>>(m, "Timeline",
                       "Phase boundaries -> host/device phase statistics, NVTX ranges and a ring of recent steps.")
      .def(py::init([](bool device, bool nvtx, int ring, int event_pool, int64_t capture_begin, int64_t capture_end,
                       int64_t warmup_steps, int64_t device_every) {
             TORCH_CHECK_VALUE(ring > 0, "stepscope: ring must be > 0; got ", ring);
             TORCH_CHECK_VALUE(event_pool > 1, "stepscope: event_pool must be > 1; got ", event_pool);
             TORCH_CHECK_VALUE(warmup_steps >= 0, "stepscope: warmup_steps must be >= 0; got ", warmup_steps);
             TORCH_CHECK_VALUE(device_every >= 0, "stepscope: device_every must be >= 1, or 0 for auto; got ",
                               device_every);
             stepscope::timing::TimelineOptions o;
             o.device = device;
             o.nvtx = nvtx;
             o.ring = ring;
             o.event_pool = event_pool;
             o.capture_begin = capture_begin;
             o.capture_end = capture_end;
             o.warmup_steps = warmup_steps;
             o.device_every = device_every;
             return std::make_shared<Timeline>(o);
           }),
           py::arg("device") = false, py::arg("nvtx") = true, py::arg("ring") = 256, py::arg("event_pool") = 2048,
           py::arg("capture_begin") = -1, py::arg("capture_end") = -1, py::arg("warmup_steps") = 0,
           py::arg("device_every") = 0)
      .def("forward_begin", &Timeline::forward_begin, py::arg("eval") = false, py::arg("batch") = -1)
      .def("forward_end", &Timeline::forward_end)
      .def("backward_begin", &Timeline::backward_begin)
      .def("backward_end", &Timeline::backward_end)
      .def("optimizer_begin", &Timeline::optimizer_begin)
      .def("optimizer_end", &Timeline::optimizer_end, py::arg("end_step") = true)
      .def("step", &Timeline::step)
      .def("user_series", &Timeline::user_series, py::arg("name"))
      .def("user_begin", &Timeline::user_begin, py::arg("id"))
      .def("user_end", &Timeline::user_end, py::arg("id"))
      .def("register_module", &Timeline::register_module, py::arg("name"))
      .def("module_begin", &Timeline::module_begin, py::arg("id"))
      .def("module_end", &Timeline::module_end, py::arg("id"))
      .def("poll", &Timeline::poll)
      .def("open", &Timeline::open)
      .def("close", &Timeline::close)
      .def_property_readonly("steps", &Timeline::steps)
      .def_property_readonly("device", &Timeline::device)
      .def("report", [](Timeline& tl) { return report_dict(tl.report()); },
           "Statistics so far (seconds); completed CUDA events are resolved first, none is waited for.")
      .def("pack",
           [](Timeline& tl) {
             auto v = tl.pack();
             return torch::tensor(v, torch::dtype(torch::kFloat64));
           },
           "The raw phase statistics as one float64 tensor of PACKED_WORDS (report_from_packed reads it).")
      .def("recent_steps",
           [](const Timeline& tl) {
             py::list out;
             for (const auto& s : tl.recent_steps()) {
               py::dict d;
               d["step"] = s.index;
               d["t0"] = s.t0 * 1e-9;
               d["t1"] = s.t1 * 1e-9;
               d["samples"] = s.samples;
               py::dict host;
               for (int i = 0; i < stepscope::timing::kNumPartition; ++i)
                 host[stepscope::timing::phase_name(static_cast<stepscope::timing::Phase>(i))] = s.host[i];
               d["host"] = host;
               using stepscope::timing::SpanRecord;
               py::list spans, user, modules, device;
               for (int i = 0; i < s.n_spans; ++i) {
                 const SpanRecord& r = s.spans[i];
                 if (r.kind == SpanRecord::kPartition) {
                   const char* name = stepscope::timing::phase_name(static_cast<stepscope::timing::Phase>(r.phase));
                   spans.append(py::make_tuple(name, r.t0 * 1e-9, r.t1 * 1e-9));
                   if (!std::isnan(r.lag0_us) && !std::isnan(r.lag1_us))
                     device.append(py::make_tuple(name, (r.t0 + 1e3 * r.lag0_us) * 1e-9, (r.t1 + 1e3 * r.lag1_us) * 1e-9));
                 } else {
                   (r.kind == SpanRecord::kUser ? user : modules)
                       .append(py::make_tuple(tl.span_name(r.kind, r.id), r.t0 * 1e-9, r.t1 * 1e-9));
                 }
               }
               d["spans"] = spans;
               d["user_spans"] = user;
               d["module_spans"] = modules;
               d["device_spans"] = device;
               d["truncated_spans"] = s.truncated;
               d["memory"] = memory_dict(s.memory, false);
               d["warmup"] = s.warmup;
               d["device_timed"] = s.device_timed;
               out.append(d);
             }
             return out;
           },
           "The ring of the last steps, oldest first: host seconds per phase, the partition's spans, the user "
           "phases' and modules' spans that ended in the step (name, t0, t1; seconds since start) and, on CUDA, "
           "the partition's spans as the GPU ran them, on the host clock (device_spans; once resolved; none on a step "
           "that device sampling left untimed: device_timed False).");

  m.attr("PACKED_WORDS") = stepscope::timing::kPackedWords;
  m.def(
      "report_from_packed",
      [](const at::Tensor& packed) {
        TORCH_CHECK_TYPE(packed.scalar_type() == at::kDouble, "stepscope: packed statistics must be float64; got ",
                         packed.scalar_type());
        TORCH_CHECK_VALUE(packed.numel() > 0 && packed.numel() % stepscope::timing::kPackedWords == 0,
                          "stepscope: packed statistics must hold a whole number of buffers of PACKED_WORDS (",
                          stepscope::timing::kPackedWords, ") doubles; got ", packed.numel());
        const auto c = packed.to(at::kCPU).contiguous();
        stepscope::timing::Report r;
        {
          py::gil_scoped_release nogil;
          r = stepscope::timing::report_from_packed(c.data_ptr<double>(), c.numel() / stepscope::timing::kPackedWords);
        }
        return report_dict(r);
      },
      py::arg("packed"),
      "Merges packed Timeline statistics ([n, PACKED_WORDS] or n*PACKED_WORDS float64) into a report dict "
      "shaped like Timeline.report() (user and modules empty). One buffer gives its Timeline's phases exactly.");
  // The one phase table (csrc/timing/phases.h), for report.py and export.py: the Timeline's series
  // (partition first) in order, then the NVTX-only phases.
  {
    py::list phases;
    for (int i = 0; i < static_cast<int>(stepscope::nvtx::Phase::kCount); ++i) {
      const stepscope::PhaseInfo& p = stepscope::kPhaseTable[i];
      phases.append(py::dict(py::arg("name") = p.name, py::arg("nvtx_name") = p.nvtx_name, py::arg("color") = p.argb,
                             py::arg("category") = p.category, py::arg("partition") = i < stepscope::timing::kNumPartition,
                             py::arg("series") = i < static_cast<int>(stepscope::timing::Phase::kCount)));
    }
    m.attr("PHASES") = py::tuple(phases);
  }

  hooks::init(m);

  m.attr("ECE_BINS") = stepscope::metrics::kNumEceBins;
  m.attr("DEFAULT_CONFMAT_LIMIT") = stepscope::metrics::kDefaultConfmatLimit;
  // The op's encodings and limits, from the C++ that defines them (Python re-encodes nothing).
  {
    namespace sm = stepscope::metrics;
    py::dict tasks, inputs;
    for (sm::Task t : {sm::Task::kBinary, sm::Task::kMulticlass, sm::Task::kMultilabel})
      tasks[sm::task_name(t)] = static_cast<int64_t>(t);
    inputs["auto"] = static_cast<int64_t>(sm::InputKind::kAuto);
    inputs["logits"] = static_cast<int64_t>(sm::InputKind::kLogits);
    inputs["probs"] = static_cast<int64_t>(sm::InputKind::kProbs);
    m.attr("TASKS") = tasks;
    m.attr("INPUT_KINDS") = inputs;
    m.attr("MAX_TOP_K") = sm::kMaxTopK;
  }

  // ---- nvtx: _C.nvtx, the NVTX ranges in the "stepscope" domain (csrc/nvtx). Thin: the
  // Python layer (stepscope/nvtx.py) adds the context manager/decorator. Names are taken as
  // const char* (no std::string copy); a tool copies or registers them during the call.
  {
    namespace nv = stepscope::nvtx;
    py::module_ n = m.def_submodule("nvtx", "NVTX ranges in the stepscope domain");
    py::enum_<nv::Phase> phase(n, "Phase");
    for (int i = 0; i < static_cast<int>(nv::Phase::kCount); ++i) {
      const auto p = static_cast<nv::Phase>(i);
      phase.value(nv::phase_name(p), p);
    }
    n.attr("DOMAIN") = nv::kDomainName;
    n.def("compiled_in", &nv::compiled_in, "Built with the NVTX v3 headers.");
    n.def("enabled", &nv::enabled, "Compiled in and not switched off by set_enabled(False).");
    n.def("set_enabled", &nv::set_enabled, py::arg("on"),
          "Process-wide switch for all stepscope NVTX ranges; ranges already open still close.");
    n.def("tool_attached", &nv::tool_attached,
          "Whether a tool (nsys, ncu, an NVTX_INJECTION64_PATH library) receives the ranges.");
    n.def("phase_name", &nv::phase_name, py::arg("phase"));
    n.def("phase_color", &nv::phase_color, py::arg("phase"), "ARGB colour of a phase's ranges.");
    n.def("phase_category", &nv::phase_category, py::arg("phase"), "NVTX category id of a phase.");
    // User ranges (Phase.user): the calls behind stepscope.nvtx.range/mark, kept positional
    // and enum-free because they run on every range.
    n.def("range_push", [](const char* name, uint32_t argb) { nv::push(nv::Phase::kUser, name, -1, argb); });
    n.def("range_pop", &nv::pop);
    n.def("mark", [](const char* name, int64_t payload, uint32_t argb) {
      nv::mark(nv::Phase::kUser, name, payload, argb);
    });
    // The general forms, for the Monitor's Python side and tests.
    n.def(
        "push",
        [](nv::Phase p, const char* name, int64_t payload, uint32_t argb) {
          nv::push(p, name, payload, argb);
        },
        py::arg("phase"), py::arg("name") = nullptr, py::arg("payload") = -1, py::arg("argb") = 0);
    n.def("pop", &nv::pop);
    n.def(
        "start",
        [](nv::Phase p, const char* name, int64_t payload, uint32_t argb) {
          return nv::start(p, name, payload, argb);
        },
        py::arg("phase"), py::arg("name") = nullptr, py::arg("payload") = -1, py::arg("argb") = 0,
        "Start a range that may end on another thread; returns its id (0 when nothing listens).");
    n.def("end", &nv::end, py::arg("id"));
    n.def("capture_begin", &nv::capture_begin,
          "Open the capture window: cudaProfilerStart (CUDA builds, CUDA in use) and the 'capture' range.");
    n.def("capture_end", &nv::capture_end);
    n.def("capture_open", &nv::capture_open);
    n.def("time_push_pop_ns", &nv::time_push_pop_ns, py::arg("n"),
          "Benchmark: n push/pop pairs in a C++ loop; returns nanoseconds per pair.");
  }
}
