// Per-module timing in the Monitor's hooks (Monitor(per_module=..., per_module_every=k)): which
// submodules are timed, and on which steps their hooks are in place.
#pragma once

#include <Python.h>

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace stepscope::python::hook {

// The hooks are registered once, through torch's own register_forward_*_hook (whose handles keep
// the ids and remove them at detach), then put in or taken out of their module's hook dict when
// sampling switches on or off. A module outside a sampled step then has no hook and costs nothing
// (torch calls its forward directly), where hooks left in place but gated would cost torch's hook
// dispatch on every step; a switch costs a dict store per hook, where re-registering cost a new
// handle per hook (about 20 us each).
class Modules {
 public:
  explicit Modules(int64_t every = 0) : every_(every) {}
  // The Timeline id of a timed submodule, or -1.
  int id(PyObject* module) const {
    auto it = ids_.find(module);
    return it == ids_.end() ? -1 : it->second;
  }
  // Times `module` as Timeline module `id` (a Python int); false with a Python error set.
  bool add(PyObject* module, PyObject* id);
  // Keeps (hooks dict, id, hook), strong references, and takes the hook out now unless sampling is
  // on. False with a Python error set.
  bool gate(PyObject* dict, PyObject* key, PyObject* hook);
  // At a step's start (steps: the steps done): sampling on iff steps % every == 0, the hooks put in
  // or taken out on a switch. False with a Python error set.
  bool step_start(int64_t steps);
  bool sampling() const { return sampling_; }
  void clear_gates();  // forgets every hook (detach; the owner's tp_clear)
  int traverse(visitproc visit, void* arg) const;

 private:
  struct Gate {
    PyObject* dict;
    PyObject* key;
    PyObject* hook;
  };
  static bool put(const Gate& g, bool in);
  int64_t every_;  // 0: no per-module timing
  bool sampling_ = false;
  std::unordered_map<PyObject*, int> ids_;  // submodule -> Timeline id (the Monitor keeps it alive)
  std::vector<Gate> gates_;
};

}  // namespace stepscope::python::hook
