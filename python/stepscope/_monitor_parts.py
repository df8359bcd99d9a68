"""The Monitor's parts that are not the Monitor itself: its argument checks, the registry of the
models it is attached to (and the finaliser that takes its hooks with it), the selection of the
submodules timed per module, user phases, marks by hand and snapshots. Used by monitor.py alone.
"""

from __future__ import annotations

import gc
import os
import warnings
import weakref
from collections.abc import Iterable
from typing import Any, Optional, Sequence, Union

import torch

from . import _C

_ModuleSel = Union[bool, Sequence[Union[str, type]]]

# Monitor.mark()'s boundary names, in the order a step passes them: the step's six boundaries
# (the phase table's, _C.BOUNDARIES), then the step's end and an evaluation stretch's.
MARKS = (*_C.BOUNDARIES, "step", "eval_begin", "eval_end")

# Models with an attached Monitor: two Monitors on one model would double-count every phase. Both
# sides are weak: a Monitor holds its models, so a strong value would keep the key alive forever.
_attached_models: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _attached_to(m: torch.nn.Module) -> Any:
    r = _attached_models.get(m)
    return r() if r is not None else None


def _attached_elsewhere(models: list) -> Optional[torch.nn.Module]:
    """The first of `models` another Monitor is attached to. A Monitor nobody can reach any more
    (dropped in a reference cycle) still counts until it is collected: collect once, then look
    again, before refusing."""
    def first() -> Optional[torch.nn.Module]:
        return next((m for m in models if _attached_to(m) is not None), None)

    if first() is None:
        return None
    gc.collect()
    return first()


def _release(handles: list, module_handles: list, tl: Any) -> None:
    """A Monitor's finaliser: it was collected while attached, and its hooks go with it. Holds
    no reference to the Monitor (its lists are emptied in place)."""
    for h in handles + module_handles:
        h.remove()
    handles.clear()
    module_handles.clear()
    tl.close()


def _owner_of(models: list) -> Any:
    """owns(optimizer) for global optimizer hooks: whether it holds any parameter of `models`
    (asked once per optimizer object, never per step). Holds the models weakly."""
    refs = [weakref.ref(m) for m in models]

    def owns(opt: Any) -> bool:
        models = [m for m in (r() for r in refs) if m is not None]
        mine = {id(p) for m in models for p in m.parameters()}
        return any(id(p) in mine for g in getattr(opt, "param_groups", ()) for p in g["params"])

    return owns


def _is_compiled(m: torch.nn.Module) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # torch without dynamo
        return False
    return isinstance(m, OptimizedModule)

def _what(x: Any) -> str:
    return type(x).__name__


def _is_scheduler(x: Any) -> bool:
    sched = getattr(torch.optim.lr_scheduler, "LRScheduler", None) or torch.optim.lr_scheduler._LRScheduler
    return isinstance(x, (sched, torch.optim.lr_scheduler.ReduceLROnPlateau))


def _claim(models: list, mon: Any) -> None:
    """Registers ``mon`` as attached to ``models``; ``mon=None`` only checks that no other
    Monitor is (RuntimeError otherwise)."""
    if mon is None:
        taken = _attached_elsewhere(models)
        if taken is not None:
            raise RuntimeError("stepscope: another Monitor is already attached to this "
                               f"{type(taken).__name__}; "
                               "detach it first (two Monitors would time every phase twice)")
        return
    for m in models:
        _attached_models[m] = weakref.ref(mon)


def _unclaim(models: list, mon: Any) -> None:
    for m in models:
        if _attached_to(m) is mon:
            del _attached_models[m]


def _memory(models: list, raw: dict) -> Optional[dict]:
    """The report's ``memory``. The allocator's counters at the last step's end and their trend
    over the ring come from the Timeline (read in C++ every step); the device's size is added
    here, at report time."""
    if raw.get("memory") is None:
        return None
    mem = dict(raw["memory"])
    dev = next(p.device for m in models for p in m.parameters() if p.is_cuda)
    mem["total"] = torch.cuda.get_device_properties(dev).total_memory
    if raw.get("memory_trend"):  # over the ring, summed up in C++ (no per-step Python objects)
        mem["trend"] = raw["memory_trend"]
    return mem


def _context(models: list, cuda: bool, autocast_counts: tuple) -> dict:
    """The report's ``context``: the facts the diagnosis reads."""
    params = [p for m in models for p in m.parameters()]
    ctx: dict = {"param_dtype": str(params[0].dtype).replace("torch.", "") if params else None}
    ctx["train_forwards"], ctx["autocast_forwards"] = autocast_counts
    if cuda:
        dev = next(p.device for p in params if p.is_cuda)
        ctx["cuda_capability"] = list(torch.cuda.get_device_capability(dev))
    return ctx


def _check_arguments(model: Any, optimizers: Any) -> tuple:
    """Monitor's (model, optimizers), with errors that name the mistake."""
    if isinstance(model, torch.optim.Optimizer):
        if isinstance(optimizers, torch.nn.Module):
            raise TypeError(f"stepscope: Monitor(model, optimizers) got an optimizer ({_what(model)}) first "
                            f"and a model ({_what(optimizers)}) second: the arguments are swapped")
        raise TypeError(f"stepscope: Monitor's first argument must be the model (a torch.nn.Module); got an "
                        f"optimizer ({_what(model)}): Monitor(model, optimizer)")
    if isinstance(model, torch.nn.Module):
        models = [model]
    elif isinstance(model, Iterable) and not isinstance(model, (str, bytes)):
        models = list(model)
    else:
        models = []
    if not models or not all(isinstance(m, torch.nn.Module) for m in models):
        raise TypeError("stepscope: Monitor needs a torch.nn.Module or a list of them; "
                        f"got {_what(model)}")

    def check_one(o: Any) -> None:
        if isinstance(o, torch.optim.Optimizer):
            return
        if _is_scheduler(o):
            raise TypeError(f"stepscope: optimizers got a learning-rate scheduler ({_what(o)}); pass the "
                            "optimizer it drives (scheduler.optimizer)")
        if isinstance(o, torch.nn.Module):
            raise TypeError(f"stepscope: optimizers got a model ({_what(o)}) where an optimizer belongs; "
                            "models go in the first argument: Monitor([model_a, model_b], optimizers)")
        raise TypeError("stepscope: optimizers must be a torch.optim.Optimizer, a list of them, or None; "
                        f"got {_what(o)}")

    if optimizers is None:
        opts: list = []
    elif isinstance(optimizers, Iterable) and not isinstance(optimizers, (str, bytes)):
        opts = list(optimizers)
    else:
        check_one(optimizers)
        opts = [optimizers]
    for o in opts:
        check_one(o)
    return models, opts


def _check_ring(x: Any) -> int:
    """Monitor's ring: an int from 1 to _C.MAX_RING (every slot is allocated at attach)."""
    what = (f"stepscope: ring must be an int from 1 to {_C.MAX_RING} (recent steps kept raw, "
            f"{_C.RING_SLOT_BYTES} bytes each, allocated at attach)")
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{what}; got {_what(x)} {x!r}")
    if not 1 <= x <= _C.MAX_RING:
        raise ValueError(f"{what}; got {x}")
    return x


def _check_device_every(x: Any) -> int:
    """Monitor's device_every as the Timeline takes it: k >= 1, or 0 for "auto"."""
    if isinstance(x, str):
        if x != "auto":
            raise ValueError(f"stepscope: device_every must be an int >= 1 or \"auto\"; got {x!r}")
        return 0
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"stepscope: device_every must be an int >= 1 or \"auto\"; got {_what(x)}")
    if x < 1:
        raise ValueError(f"stepscope: device_every must be an int >= 1 or \"auto\"; got {x}")
    return x


def _check_options(models: list, opts: list, *, per_module: _ModuleSel, per_module_every: int,
                   profile_steps: Optional[range], batch_size: Optional[int], batch_dim: Optional[int],
                   warmup_steps: int, trace: Any, print_every: int) -> _ModuleSel:
    """Monitor's keyword arguments checked where they enter; returns ``per_module`` (False, with a
    warning, for a torch.compile'd model)."""
    if len({id(o) for o in opts}) != len(opts):
        raise ValueError("stepscope: the same optimizer was given twice")
    if per_module_every < 1:
        raise ValueError(f"stepscope: per_module_every must be >= 1; got {per_module_every}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"stepscope: warmup_steps must be an int >= 0; got {warmup_steps!r}")
    if not isinstance(print_every, int) or isinstance(print_every, bool) or print_every < 0:
        raise ValueError(f"stepscope: print_every must be an int >= 0; got {print_every!r}")
    if trace is not None and not isinstance(trace, (str, os.PathLike)):
        raise TypeError(f"stepscope: trace must be a path or None; got {type(trace).__name__}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"stepscope: batch_size must be >= 1; got {batch_size}")
    if batch_dim is not None:
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
            raise TypeError(f"stepscope: batch_dim must be an int >= 0 (the first input's dimension that "
                            f"counts samples); got {_what(batch_dim)}")
        if batch_dim < 0:
            raise ValueError(f"stepscope: batch_dim must be an int >= 0; got {batch_dim}")
        if batch_size is not None:
            raise ValueError("stepscope: give batch_size or batch_dim, not both (batch_size fixes the samples "
                             "per forward, batch_dim reads them from the first input)")
    if profile_steps is not None and (not isinstance(profile_steps, range) or profile_steps.step != 1
                                      or len(profile_steps) == 0 or profile_steps.start < 0):
        raise ValueError("stepscope: profile_steps must be a non-empty range(a, b) of steps; "
                         f"got {profile_steps!r}")
    if per_module and any(_is_compiled(m) for m in models):
        warnings.warn("stepscope: per-module timing is not available for a torch.compile'd model (its "
                      "submodules run inside compiled graphs, where hooks would either break the graph or "
                      "never fire); phase timing still works. Time the uncompiled model to see per-module "
                      "numbers.", stacklevel=3)
        per_module = False
    return per_module


def _selected_modules(models: list, sel: _ModuleSel) -> list:
    """(label, submodule) of each submodule ``per_module`` selects: True (all), or names and
    module types; a name that is not in the models is a ValueError."""
    names = {s for s in sel if isinstance(s, str)} if sel is not True else set()
    types = tuple(s for s in sel if isinstance(s, type)) if sel is not True else ()
    if sel is not True and not names and not types:
        raise TypeError("stepscope: per_module must be True or a list of submodule names or module "
                        "types")
    out = []
    for k, m in enumerate(models):
        for name, sub in m.named_modules():
            if name == "":
                continue
            if sel is True or name in names or (types and isinstance(sub, types)):
                out.append((name if len(models) == 1 else f"{k}.{name}", sub))
    if names:
        missing = names - {n for m in models for n, _ in m.named_modules()}
        if missing:
            raise ValueError(f"stepscope: per_module names not found in the model: {sorted(missing)}")
    return out


class _Phase:
    """``with mon.phase(name):`` -- a user phase (NVTX push/pop), timed apart from the partition."""

    __slots__ = ("_tl", "_id")

    def __init__(self, tl: Any, sid: int) -> None:
        self._tl = tl
        self._id = sid

    def __enter__(self) -> "_Phase":
        self._tl.user_begin(self._id)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tl.user_end(self._id)


class Snapshot:
    """A mark between steps, from :meth:`Monitor.snapshot`, for ``report/summary/diagnose(since=...)``.

    Opaque: it holds a copy of the Monitor's raw statistics (a few hundred KB), taken without a
    device synchronisation. A snapshot taken before the Monitor was first attached marks the start.
    """

    __slots__ = ("_owner", "_c")

    def __init__(self, owner: Any, c: Any) -> None:
        self._owner = weakref.ref(owner)
        self._c = c  # _C.TimelineSnapshot, or None: the start

    def __repr__(self) -> str:
        return "<stepscope.Snapshot>" if self._c is not None else "<stepscope.Snapshot (start)>"


def _snapshot_base(mon: Any, since: Optional[Snapshot]) -> Any:
    """What the C++ report(since=) subtracts: ``since``'s statistics, or None: everything so far."""
    if since is None:
        return None
    if not isinstance(since, Snapshot):
        raise TypeError(f"stepscope: since must be a Monitor.snapshot() or None; got {_what(since)}")
    if since._owner() is not mon:
        raise ValueError("stepscope: since is a snapshot of another Monitor; take it with this "
                         "Monitor's snapshot()")
    return since._c


def _mark(mon: Any, boundary: str, batch: Optional[int]) -> None:
    """Monitor.mark's body (its docstring says what each boundary does)."""
    if not mon._attached:
        raise RuntimeError("stepscope: Monitor.mark() needs an attached Monitor")
    if boundary not in MARKS:
        raise ValueError(f"stepscope: unknown boundary {boundary!r}; mark() takes one of "
                         f"{', '.join(MARKS)}")
    if batch is not None and boundary != "forward_begin":
        raise ValueError(f"stepscope: mark({boundary!r}) takes no batch (only 'forward_begin' does)")
    tl = mon._tl
    if boundary not in ("backward_begin", "backward_end") and not mon._hooks.claim(
            boundary not in ("eval_begin", "eval_end")):
        return  # another thread than the training thread
    if boundary == "forward_begin":
        n = mon._batch if batch is None else int(batch)
        mon._marked_batch = mon._marked_batch or batch is not None
        tl.forward_begin(False, n)
    elif boundary in ("optimizer_end", "step"):
        getattr(mon._hooks, boundary)()  # the hooks count optimizers and end the step
    elif boundary == "eval_begin":
        tl.forward_begin(True, -1)
    elif boundary == "eval_end":
        tl.forward_end()
    else:
        getattr(tl, boundary)()  # forward_end .. optimizer_begin: the Timeline's own, by name


def _samples_counted_by(mon: Any) -> str:
    """report()["samples_counted_by"]: the rule that counted the samples."""
    if mon._marked_batch or (mon._hooks is not None and mon._hooks.marked_batch):  # a framework's marks
        return "mark(batch=)"
    rule = f"batch_size={mon._batch}" if mon._batch > 0 else f"the first input's dimension {mon._batch_dim}"
    return rule + (" of the first model's forwards" if len(mon._models) > 1 else "")
