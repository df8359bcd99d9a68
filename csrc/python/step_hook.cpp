// _C.StepHook: one of the Monitor's hooks (StepHooks.forward_pre, ...) as a CPython vectorcall
// object, called by nn.Module and the optimizers without pybind11's dispatcher. A live hook runs
// its kind's function over its StepHooks object (step_hooks.cpp); a copied one is inert
// (copy.copy, copy.deepcopy) and removes itself from the copy's hook dicts at its first forward;
// a pickled one is contextlib.nullcontext().__exit__, a no-op of the standard library. Also the
// CPython reading of a hook's call that the hooks share: the argument count, the output's grad
// tensor and the frame probe behind StepMachine's tokens.
#include "python/step_hook.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
// After Python.h: the member flags of StepHook.__vectorcalloffset__.
#include <structmember.h>

#include <cstddef>
#include <vector>

namespace stepscope::python::hook {

const char* const kKindNames[kKinds] = {"forward_pre",    "forward_post", "optimizer_pre",
                                        "optimizer_post", "module_pre",   "module_post"};

namespace {

// One hook: a callable over its StepHooks (owner), or an inert copy (owner null).
struct Hook {
  PyObject_HEAD vectorcallfunc vectorcall;
  PyObject* owner;  // the StepHooks object (strong reference), or null: inert
  int kind;
};

constexpr int kMaxOutputDepth = 16;
PyTypeObject* g_hook_type = nullptr;
PyObject* g_noop = nullptr;  // contextlib.nullcontext().__exit__: what a pickled hook becomes
Fn g_fns[kKinds] = {};

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
  return g_fns[h->kind](h->owner, args, nargs);
  END_HANDLE_TH_ERRORS
}

PyObject* hook_copy(PyObject* self, PyObject* /*unused*/) {
  return make(nullptr, reinterpret_cast<Hook*>(self)->kind);
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

}  // namespace

// --------------------------------------------------------------------------- reading a call
namespace {

// The first tensor (that requires grad, when grad_only) in o: o itself, or nested in tuples, lists
// and dicts (namedtuples and dict subclasses such as model-output classes included).
PyObject* find_tensor(PyObject* o, int depth, bool grad_only) {
  if (THPVariable_Check(o)) return !grad_only || THPVariable_Unpack(o).requires_grad() ? o : nullptr;
  if (depth >= kMaxOutputDepth) return nullptr;
  if (PyTuple_Check(o) || PyList_Check(o)) {
    const bool tuple = PyTuple_Check(o);
    const Py_ssize_t n = tuple ? PyTuple_GET_SIZE(o) : PyList_GET_SIZE(o);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* t = find_tensor(tuple ? PyTuple_GET_ITEM(o, i) : PyList_GET_ITEM(o, i), depth + 1, grad_only);
      if (t != nullptr) return t;
    }
  } else if (PyDict_Check(o)) {
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(o, &pos, &k, &v)) {
      PyObject* t = find_tensor(v, depth + 1, grad_only);
      if (t != nullptr) return t;
    }
  }
  return nullptr;
}

}  // namespace

PyObject* first_grad_tensor(PyObject* o, int depth) { return find_tensor(o, depth, true); }

PyObject* first_tensor(PyObject* o) { return o == nullptr ? nullptr : find_tensor(o, 0, false); }

PyObject* first_input(PyObject* args, PyObject* kwargs) {
  if (PyTuple_Check(args) && PyTuple_GET_SIZE(args) > 0) return PyTuple_GET_ITEM(args, 0);
  if (kwargs == nullptr || !PyDict_Check(kwargs)) return nullptr;
  Py_ssize_t pos = 0;
  PyObject *k, *v;
  while (PyDict_Next(kwargs, &pos, &k, &v)) {
    if (THPVariable_Check(v)) return v;
  }
  return nullptr;
}

bool check_args(const char* name, Py_ssize_t nargs, Py_ssize_t want) {
  if (nargs == want) return true;
  PyErr_Format(PyExc_TypeError, "stepscope: %s takes %zd arguments (%zd given)", name, want, nargs);
  return false;
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

// The frame that called the running hook (borrowed: the calling Python code; hooks are C
// functions and have no frame of their own). The machine holds it while the call is open.
const void* calling_frame() { return PyEval_GetFrame(); }

// --------------------------------------------------------------------------- the type
PyObject* make(PyObject* owner, int kind) {
  Hook* h = PyObject_GC_New(Hook, g_hook_type);
  if (h == nullptr) return nullptr;
  h->vectorcall = hook_call;
  Py_XINCREF(owner);
  h->owner = owner;
  h->kind = kind;
  PyObject_GC_Track(reinterpret_cast<PyObject*>(h));
  return reinterpret_cast<PyObject*>(h);
}

PyTypeObject* make_type(const Fn (&fns)[kKinds]) {
  for (int k = 0; k < kKinds; ++k) g_fns[k] = fns[k];
  PyObject* nullcontext = PyImport_ImportModule("contextlib");
  if (nullcontext == nullptr) return nullptr;
  g_noop = PyObject_CallMethod(nullcontext, "nullcontext", nullptr);
  Py_DECREF(nullcontext);
  if (g_noop == nullptr) return nullptr;
  PyObject* exit = PyObject_GetAttrString(g_noop, "__exit__");
  Py_SETREF(g_noop, exit);
  if (g_noop == nullptr) return nullptr;
  g_hook_type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&g_hook_spec));
  return g_hook_type;
}

int Owners::holds_ours(PyObject* opt) {
  auto it = seen_.find(opt);
  if (it != seen_.end()) {
    if (PyWeakref_GetObject(it->second.ref) == opt) return it->second.ours;
    Py_DECREF(it->second.ref);  // an optimizer that is gone, its address reused
    seen_.erase(it);
  }
  if (fn == nullptr) return 1;
  PyObject* r = PyObject_CallOneArg(fn, opt);
  if (r == nullptr) return -1;
  const int ours = PyObject_IsTrue(r);
  Py_DECREF(r);
  if (ours < 0) return -1;
  if (seen_.size() >= 64) {  // bounded: forget the optimizers that are gone
    for (auto e = seen_.begin(); e != seen_.end();) {
      if (PyWeakref_GetObject(e->second.ref) == Py_None) {
        Py_DECREF(e->second.ref);
        e = seen_.erase(e);
      } else {
        ++e;
      }
    }
  }
  PyObject* ref = PyWeakref_NewRef(opt, nullptr);
  if (ref == nullptr) {
    PyErr_Clear();  // not weakly referenceable: decided again at its next step
  } else {
    seen_.emplace(opt, Seen{ref, ours != 0});
  }
  return ours;
}

void Owners::clear() {
  Py_CLEAR(fn);
  for (auto& e : seen_) Py_DECREF(e.second.ref);
  seen_.clear();
}

// ------------------------------------------------------------------------------------ Shapes
namespace {
int64_t shape_key(PyObject* input) {
  if (input == nullptr || !THPVariable_Check(input)) return 0;
  const at::Tensor& t = THPVariable_Unpack(input);
  uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(t.scalar_type());  // FNV-1a over the sizes
  for (int64_t d : t.sizes()) h = (h ^ static_cast<uint64_t>(d)) * 1099511628211ull;
  h = (h ^ static_cast<uint64_t>(t.dim())) * 1099511628211ull;
  return static_cast<int64_t>(h >> 1) + 1;  // positive: 0 is "no tensor input"
}
}  // namespace

bool Shapes::call(PyObject* key, PyObject* arg, bool* result) {
  PyObject* r = PyObject_CallFunctionObjArgs(fn, key, arg, nullptr);
  if (r == nullptr) return false;
  const int yes = PyObject_IsTrue(r);
  Py_DECREF(r);
  if (yes < 0) return false;
  if (result != nullptr) *result = yes > 0;
  return true;
}

int Shapes::forward(PyObject* input) {
  if (fn == nullptr || active_) return 0;  // active_: a forward inside a counted one
  const bool first = !in_step_;
  if (first) {
    in_step_ = true;
    key_ = shape_key(input);
    for (auto& e : seen) {
      if (e.first == key_) {
        ++e.second;
        return 0;
      }
    }
    if (seen.size() >= kMaxShapes) {
      ++unseen_steps;
      return 0;
    }
    seen.emplace_back(key_, 1);
  } else if (!counting_) {
    return 0;
  }
  PyObject* k = PyLong_FromLongLong(key_);
  if (k == nullptr) return -1;
  bool began = false;
  const bool ok = call(k, input != nullptr ? input : Py_None, &began);
  Py_DECREF(k);
  if (!ok) return -1;
  active_ = began;
  if (first) counting_ = began;
  return first && began ? 1 : 0;
}

bool Shapes::forward_end() {
  if (!active_ || fn == nullptr) return true;
  active_ = false;
  return call(Py_None, Py_False, nullptr);
}

bool Shapes::step_end() {
  in_step_ = false;
  if (!counting_ || fn == nullptr) return true;
  counting_ = false;
  active_ = false;
  return call(Py_None, Py_True, nullptr);
}

void Shapes::set(PyObject* f) {
  Py_CLEAR(fn);
  if (f != Py_None) {
    Py_INCREF(f);
    fn = f;
  }
  seen.clear();
  unseen_steps = 0;
  counting_ = active_ = in_step_ = false;
}

PyObject* Shapes::read() const {
  PyObject* list = PyList_New(0);
  for (size_t i = 0; list != nullptr && i < seen.size(); ++i) {
    PyObject* e = Py_BuildValue("(LL)", static_cast<long long>(seen[i].first), static_cast<long long>(seen[i].second));
    if (e == nullptr || PyList_Append(list, e) < 0) Py_CLEAR(list);
    Py_XDECREF(e);
  }
  return list == nullptr ? nullptr : Py_BuildValue("(NL)", list, static_cast<long long>(unseen_steps));
}

}  // namespace stepscope::python::hook
