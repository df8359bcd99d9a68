"""Training-step phase timing: hooks on a model and its optimizers feed a C++ Timeline.

    with stepscope.Monitor(model, optimizer) as mon:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step(); optimizer.zero_grad()
    print(mon.summary())

A step is partitioned with no unexplained time: ``data`` (gap before forward), ``forward``,
``loss`` (forward end to backward begin: the criterion, and autograd's start-up before the
gradient reaches the model's output), ``backward`` (the gradient reaches the model's outputs
to autograd's final callback), ``other`` (backward end to the optimizer) and ``optimizer``. The
step ends at the optimizer's post hook, or at :meth:`Monitor.step`. The hooks only read a clock
and record a CUDA event (on GPU); events are read back with ``cudaEventQuery`` when already
complete, so the Monitor never synchronises the device during the steps (on CUDA, one reference
event is synchronised once, at attach, to place device times on the host clock for the queue
lag). The hooks are C functions
(``_C.StepHooks``) that CPython calls directly: this module only registers them and reads the
results, and no Python runs per step unless per-module sampling or ``print_every`` need it (CUDA
memory counters are read in C++ at each step's end).

The hooks over their life (csrc/python/step_hooks.cpp): a copy of a monitored model
(``copy.deepcopy``, EMA and teacher copies, ``AveragedModel``) is never timed, and its copied hooks
remove themselves at its first forward; ``torch.save(model)`` while attached stores a no-op of the
standard library where each hook was (the checkpoint loads without stepscope); a forward
interrupted by a KeyboardInterrupt, or an optimizer step that raised, is recognised as over by the
next boundary; a Monitor that is garbage-collected while attached takes its hooks with it.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import warnings
import weakref
from collections.abc import Iterable
from typing import Any, Optional, Sequence, Union

import torch
import torch.optim.optimizer as _optim_mod

from . import _C
from . import diagnose as _diagnose
from . import report as _report

_ModuleSel = Union[bool, Sequence[Union[str, type]]]

# Models with an attached Monitor: two Monitors on one model would double-count every phase. Both
# sides are weak: a Monitor holds its models, so a strong value would keep the key alive forever.
_attached_models: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _attached_to(m: torch.nn.Module) -> Optional["Monitor"]:
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


# Monitor.mark()'s boundary names, in the order a step passes them.
MARKS = ("forward_begin", "forward_end", "backward_begin", "backward_end", "optimizer_begin", "optimizer_end",
         "step", "eval_begin", "eval_end")


def _what(x: Any) -> str:
    return type(x).__name__


def _is_scheduler(x: Any) -> bool:
    sched = getattr(torch.optim.lr_scheduler, "LRScheduler", None) or torch.optim.lr_scheduler._LRScheduler
    return isinstance(x, (sched, torch.optim.lr_scheduler.ReduceLROnPlateau))


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

    def __init__(self, owner: "Monitor", c: Any) -> None:
        self._owner = weakref.ref(owner)
        self._c = c  # _C.TimelineSnapshot, or None: the start

    def __repr__(self) -> str:
        return "<stepscope.Snapshot>" if self._c is not None else "<stepscope.Snapshot (start)>"


class Monitor:
    """Times forward, backward, optimizer step and the gaps between them, every step.

    Args:
        model: the module (or a list of modules) whose forward is timed; backward begins when
            the gradient reaches its output.
        optimizers: an optimizer or a list of them; the step ends when each has stepped once.
            ``None``: torch's global optimizer hooks; the ``step()`` of any optimizer that holds
            the model's parameters ends a step, and other optimizers count nothing.
        per_module: ``True`` times every submodule's forward, or a list of submodule names or
            module types; sampled on one step in ``per_module_every``. Training forwards only:
            a module's spans inside an eval forward of a sampled step are not counted. Refused (with a warning,
            phase timing still works) for ``torch.compile``'d models.
        nvtx: emit NVTX ranges (domain "stepscope") for Nsight Systems.
        profile_steps: ``range(a, b)``: open the profiler capture window (cudaProfilerStart and
            an NVTX "capture" range) for steps a .. b-1, for ``nsys --capture-range``.
        batch_size: samples per forward; default: the first input's size along ``batch_dim``.
        batch_dim: the dimension of the first input that counts samples (default 0; 1 for
            sequence-first ``[T, B, ...]`` inputs). Give ``batch_size`` or ``batch_dim``, not both.
            A closure step (LBFGS) counts its batch once however often it runs the closure;
            ``mark("forward_begin", batch=n)`` counts ``n``. ``report()["samples_counted_by"]``
            says which rule counted.
        ring: how many recent steps are kept raw (:meth:`recent_steps`): an int from 1 to
            ``_C.MAX_RING`` (65536; each slot takes ``_C.RING_SLOT_BYTES``, about 2 KB, allocated
            at attach, so the ceiling is about 143 MB).
        warmup_steps: the first steps kept out of every statistic (histograms, means, shares,
            samples/s, spikes) and reported apart in ``report()["warmup"]``. 3 by default:
            ``torch.compile`` compiles on the first step, ``mode="reduce-overhead"`` records its
            CUDA graphs on the next, and cuDNN autotuning and the caching allocator's growth happen
            in the first steps too; a step of compilation is often 100x a steady one.
        trace: a path: :meth:`export_trace` writes the trace there at detach (Perfetto / Chrome JSON,
            gzip'd when it ends in ``.gz``).
        print_every: every n steps, log one line (step, p50 step time, largest phase and its share,
            samples/s, memory) at INFO on the ``"stepscope"`` logger; 0 (default): off. Python runs
            only on those steps (the step hooks count in C).
        device_every: on CUDA, record device events (CUDA events at the phase boundaries) on one
            step in ``device_every``; host times are kept on every step. ``"auto"`` (default)
            chooses it from the host cost of the event records (measured in the loop) against the
            running host step time, so that recording costs about 1% of the step: every step on a
            GPU-bound step of several ms, about one in 7 on a ~1 ms host-bound step. ``1``: every
            step. Warm-up steps are always device-timed. ``report()["device_steps"]`` counts the
            device-timed steps (the device columns cover those only), ``report()["device_every"]``
            the current choice. No effect without CUDA.

    Eval forwards (under ``no_grad``, ``inference_mode`` or with ``model.training`` False) are
    reported apart as ``eval_forward``, each evaluation stretch (its first eval forward to the end
    of its last before training resumes, the time between its forwards included) as ``eval``, and
    eval time is left out of the training step (so a
    model trained in ``eval()`` mode, e.g. to freeze batch norm, has its forwards counted as
    eval). Gradient accumulation (several forward/backward per step) needs nothing special.
    Optimizers that run the model inside ``step(closure)`` (LBFGS, Lightning's automatic
    optimization) need nothing special either: the time before the closure's forward is
    ``data``, the closure's forward/loss/backward are timed as usual, ``optimizer`` is the time
    after the closure's backward (and between closure calls) up to the end of ``step``, and one
    ``step(closure)`` is one step however often it calls the closure. With global hooks
    (``optimizers=None``) an optimizer step ends a step only if this Monitor's model ran forward
    in it (or runs inside its closure). Backward begins at a C++ pre-hook on the output's
    ``grad_fn``, which compiled autograd does not support. Frameworks whose loop hides the
    model's forward or backward from module hooks drive the boundaries by hand: :meth:`mark`.

    With global hooks an optimizer that holds none of the model's parameters (another model's, as
    the discriminator's in a GAN loop with ``Monitor(G)``) counts nothing, wherever it steps.
    A loop that never ends a step (a manual update without an optimizer object, and no
    :meth:`step`) gets a critical finding and a warning at detach.

    Threads: the training thread is the first thread to run a training boundary (a forward with
    grad in ``train()`` mode, an optimizer step, :meth:`step` or a :meth:`mark`) after attach;
    until one has, the thread that attached. Forwards (eval ones too), optimizer steps,
    per-module spans, :meth:`step` and marks from any other thread are ignored, so a background
    evaluator calling the same model does not move the training step. Backward boundaries come
    from autograd on whichever thread it runs them (``backward_begin``/``backward_end`` marks
    too).

    Copies and checkpoints: a copy of the model made while attached (``copy.deepcopy``, an EMA or
    teacher copy, ``torch.optim.swa_utils.AveragedModel``) is never timed; its copied hooks remove
    themselves at its first forward. ``torch.save(model)`` (or pickling) while attached works: the
    saved model holds a no-op of the standard library where each hook was, so it loads without
    stepscope. A Monitor collected while attached (dropped without :meth:`detach`) removes its
    hooks, and a new Monitor may attach in its place.
    """

    def __init__(
        self,
        model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
        optimizers: Union[None, torch.optim.Optimizer, Sequence[torch.optim.Optimizer]] = None,
        *,
        per_module: _ModuleSel = False,
        per_module_every: int = 10,
        nvtx: bool = True,
        profile_steps: Optional[range] = None,
        batch_size: Optional[int] = None,
        batch_dim: Optional[int] = None,
        ring: int = 256,
        warmup_steps: int = 3,
        trace: Optional[Union[str, "os.PathLike[str]"]] = None,
        print_every: int = 0,
        device_every: Union[int, str] = "auto",
    ) -> None:
        models, opts = _check_arguments(model, optimizers)
        if len({id(o) for o in opts}) != len(opts):
            raise ValueError("stepscope: the same optimizer was given twice")
        if per_module_every < 1:
            raise ValueError(f"stepscope: per_module_every must be >= 1; got {per_module_every}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"stepscope: warmup_steps must be an int >= 0; got {warmup_steps!r}")
        if not isinstance(print_every, int) or isinstance(print_every, bool) or print_every < 0:
            raise ValueError(f"stepscope: print_every must be an int >= 0; got {print_every!r}")
        self._device_every = _check_device_every(device_every)
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
                          "numbers.", stacklevel=2)
            per_module = False
        self._models = models
        self._opts = opts
        self._per_module = per_module
        self._every = per_module_every
        self._nvtx = nvtx
        self._profile = profile_steps
        self._batch = batch_size if batch_size is not None else -1
        self._batch_dim = batch_dim if batch_dim is not None else 0
        self._marked_batch = False  # mark("forward_begin", batch=n) counted samples
        self._ring = _check_ring(ring)
        self._warmup = warmup_steps
        self._tl: Any = None
        self._hooks: Any = None  # _C.StepHooks while attached
        # Emptied in place, never replaced: the finaliser (attach) holds these lists.
        self._handles: list = []
        self._module_handles: list = []
        self._finalizer: Optional[weakref.finalize] = None
        self._modules: list = []  # (module, id)
        self._phases: dict = {}
        self._cuda = False
        self._autocast = (0, 0)  # (training forwards, under CUDA autocast) of past attachments
        self._attached = False
        self._trace = trace
        self._print_every = print_every

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> "Monitor":
        """Registers the hooks. Raises if this Monitor, or another one, is attached to the model."""
        if self._attached:
            raise RuntimeError("stepscope: this Monitor is already attached; detach() it before attaching "
                               "again")
        taken = _attached_elsewhere(self._models)
        if taken is not None:
            raise RuntimeError("stepscope: another Monitor is already attached to this "
                               f"{type(taken).__name__}; "
                               "detach it first (two Monitors would time every phase twice)")
        self._cuda = torch.cuda.is_available() and any(
            p.is_cuda for m in self._models for p in m.parameters())
        if self._tl is None:
            cap = (self._profile.start, self._profile.stop) if self._profile is not None else (-1, -1)
            # The Timeline's clock starts now; its wall-clock time lets traces of several ranks be
            # laid on one time axis (export.merge_traces).
            self._origin_unix_ns = time.time_ns()
            self._tl = _C.Timeline(device=self._cuda, nvtx=self._nvtx, ring=self._ring,
                                   capture_begin=cap[0], capture_end=cap[1], warmup_steps=self._warmup,
                                   device_every=self._device_every)
        else:
            self._tl.open()
        try:
            self._register()
        except BaseException:
            self._remove_all()
            self._tl.close()
            raise
        for m in self._models:
            _attached_models[m] = weakref.ref(self)
        self._finalizer = weakref.finalize(self, _release, self._handles, self._module_handles, self._tl)
        self._finalizer.atexit = False
        self._attached = True
        return self

    def detach(self) -> None:
        """Removes every hook; the statistics stay readable. Raises if not attached."""
        if not self._attached:
            raise RuntimeError("stepscope: this Monitor is not attached (detach() called twice, or never "
                               "attached)")
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._remove_all()
        self._autocast = self._autocast_counts()
        self._hooks = None
        self._tl.close()
        for m in self._models:
            if _attached_to(m) is self:
                del _attached_models[m]
        self._attached = False
        if self._trace is not None:
            self.export_trace(self._trace)
        forwards = self._autocast[0]
        if self._tl.steps == 0 and forwards >= _diagnose.NO_STEP_FORWARDS:
            warnings.warn(f"stepscope: {_diagnose.no_step_message(forwards)}", stacklevel=2)

    @property
    def attached(self) -> bool:
        return self._attached

    def __enter__(self) -> "Monitor":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        if self._attached:  # detach() inside the block is allowed
            self.detach()

    def _register(self) -> None:
        # The hooks themselves are C functions (_C.StepHooks): the boundary logic lives in C++,
        # and Python is called back once per step only when there is Python work to do.
        tl = self._tl
        every = self._every if self._per_module else 0
        # A bound method: the hooks hold the Monitor through a weak reference (step_hooks.cpp), so a
        # Monitor dropped while attached is collected and its finaliser removes the hooks.
        on_end = self._step_ended if (every > 1 or self._print_every) else None
        hk = self._hooks = _C.step_hooks(tl, batch=self._batch, batch_dim=self._batch_dim,
                                         optimizers=len(self._opts), on_step_end=on_end, module_every=every,
                                         print_every=self._print_every,
                                         owns=None if self._opts else _owner_of(self._models))
        for m in self._models:
            self._handles.append(m.register_forward_pre_hook(hk.forward_pre))
            self._handles.append(m.register_forward_hook(hk.forward_post, always_call=True))
        if self._opts:
            for o in self._opts:
                self._handles.append(o.register_step_pre_hook(hk.optimizer_pre))
                self._handles.append(o.register_step_post_hook(hk.optimizer_post))
        else:
            self._handles.append(_optim_mod.register_optimizer_step_pre_hook(hk.optimizer_pre))
            self._handles.append(_optim_mod.register_optimizer_step_post_hook(hk.optimizer_post))
        if self._per_module:
            sel = self._per_module
            names = {s for s in sel if isinstance(s, str)} if sel is not True else set()
            types = tuple(s for s in sel if isinstance(s, type)) if sel is not True else ()
            if sel is not True and not names and not types:
                raise TypeError("stepscope: per_module must be True or a list of submodule names or module "
                                "types")
            self._modules = []
            for k, m in enumerate(self._models):
                for name, sub in m.named_modules():
                    if name == "":
                        continue
                    if sel is True or name in names or (types and isinstance(sub, types)):
                        label = name if len(self._models) == 1 else f"{k}.{name}"
                        i = tl.register_module(label)
                        hk.add_module(sub, i)
                        self._modules.append((sub, i))
            if names:
                missing = names - {n for m in self._models for n, _ in m.named_modules()}
                if missing:
                    raise ValueError(f"stepscope: per_module names not found in the model: {sorted(missing)}")
            self._sample_modules(hk.sampling)

    def _remove_all(self) -> None:
        for h in self._handles + self._module_handles:
            h.remove()
        self._handles.clear()
        self._module_handles.clear()

    # ------------------------------------------------------------------ per step
    def _step_ended(self, sample_modules: bool) -> None:
        # Called by the hooks after a step ended, only when per-module sampling switches on or
        # off, and on every print_every-th step.
        if self._modules:
            self._sample_modules(sample_modules)
        if self._print_every and self._tl.steps % self._print_every == 0:
            from .export import live_line

            logging.getLogger("stepscope").info(live_line(self.report(), self._tl.steps))

    def _sample_modules(self, want: bool) -> None:
        if want and not self._module_handles:
            hk = self._hooks
            for sub, _ in self._modules:
                self._module_handles.append(sub.register_forward_pre_hook(hk.module_pre))
                self._module_handles.append(sub.register_forward_hook(hk.module_post, always_call=True))
        elif not want and self._module_handles:
            for h in self._module_handles:
                h.remove()
            self._module_handles.clear()

    # ------------------------------------------------------------------ user API
    def step(self) -> bool:
        """Ends the step where no optimizer hook does (GradScaler skipped the step).

        A no-op (returns False) when nothing happened since the last step ended, so calling it
        after every ``optimizer.step()`` is safe.
        """
        if not self._attached:
            raise RuntimeError("stepscope: Monitor.step() called while the Monitor is not attached")
        return self._hooks.step()

    def mark(self, boundary: str, batch: Optional[int] = None) -> None:
        """Reports a phase boundary by hand, for loops whose model or optimizer hooks cannot see it.

        ``boundary`` is one of :data:`MARKS`: ``"forward_begin"`` (``batch``: samples in it),
        ``"forward_end"``, ``"backward_begin"``, ``"backward_end"``, ``"optimizer_begin"``,
        ``"optimizer_end"`` (ends the step) and ``"step"`` (the same as :meth:`step`);
        ``"eval_begin"``/``"eval_end"`` bracket work left out of the training step and reported
        as ``eval_forward`` (a validation loop inside training). Marks and
        hooks may both fire for one boundary: a forward marked around the model's own hooked
        forward counts once (nested forwards count as the outermost), a second
        ``backward_begin`` or ``backward_end`` is ignored, and an ``optimizer_begin`` inside an
        open forward makes it a closure step (see the class notes). Example, a framework's
        callbacks (Lightning's on_train_batch_start, on_before_backward, on_after_backward)::

            mon = stepscope.Monitor(model, optimizer).attach()
            mon.mark("forward_begin", batch=len(x))   # the loop's "batch start"
            loss = framework_step(x)                  # forward + loss, however it is called
            mon.mark("forward_end"); mon.mark("backward_begin")
            loss.backward()
            mon.mark("backward_end")
            optimizer.step()                          # its hooks end the step

        Raises ValueError for an unknown name and RuntimeError when not attached.
        """
        if not self._attached:
            raise RuntimeError("stepscope: Monitor.mark() needs an attached Monitor")
        if boundary not in MARKS:
            raise ValueError(f"stepscope: unknown boundary {boundary!r}; mark() takes one of "
                             f"{', '.join(MARKS)}")
        if batch is not None and boundary != "forward_begin":
            raise ValueError(f"stepscope: mark({boundary!r}) takes no batch (only 'forward_begin' does)")
        tl = self._tl
        if boundary not in ("backward_begin", "backward_end") and not self._hooks.claim(
                boundary not in ("eval_begin", "eval_end")):
            return  # another thread than the training thread
        if boundary == "forward_begin":
            n = self._batch if batch is None else int(batch)
            self._marked_batch = self._marked_batch or batch is not None
            tl.forward_begin(False, n)
        elif boundary == "forward_end":
            tl.forward_end()
        elif boundary == "backward_begin":
            tl.backward_begin()
        elif boundary == "backward_end":
            tl.backward_end()
        elif boundary == "optimizer_begin":
            tl.optimizer_begin()
        elif boundary == "optimizer_end":
            self._hooks.optimizer_end()
        elif boundary == "step":
            self._hooks.step()
        elif boundary == "eval_begin":
            tl.forward_begin(True, -1)
        else:
            tl.forward_end()

    def phase(self, name: str) -> _Phase:
        """``with mon.phase("clip"):`` times a user phase (reported in ``user``, NVTX push/pop)."""
        if not self._attached:
            raise RuntimeError("stepscope: Monitor.phase() needs an attached Monitor")
        p = self._phases.get(name)
        if p is None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"stepscope: a phase name must be a non-empty string; got {name!r}")
            p = self._phases[name] = _Phase(self._tl, self._tl.user_series(name))
        return p

    @property
    def steps(self) -> int:
        """Steps completed so far (since the last :meth:`reset`)."""
        return self._tl.steps if self._tl is not None else 0

    def _autocast_counts(self) -> tuple:
        done = self._hooks.autocast_forwards if self._hooks is not None else (0, 0)
        return (self._autocast[0] + done[0], self._autocast[1] + done[1])

    def _memory(self, raw: dict) -> Optional[dict]:
        # The allocator's counters at the last step's end and their trend over the ring come from
        # the Timeline (read in C++ every step); the device's size is added here, at report time.
        if raw.get("memory") is None:
            return None
        mem = dict(raw["memory"])
        dev = next(p.device for m in self._models for p in m.parameters() if p.is_cuda)
        mem["total"] = torch.cuda.get_device_properties(dev).total_memory
        if raw.get("memory_trend"):  # over the ring, summed up in C++ (no per-step Python objects)
            mem["trend"] = raw["memory_trend"]
        return mem

    def _context(self) -> dict:
        params = [p for m in self._models for p in m.parameters()]
        ctx: dict = {"param_dtype": str(params[0].dtype).replace("torch.", "") if params else None}
        ctx["train_forwards"], ctx["autocast_forwards"] = self._autocast_counts()
        if self._cuda:
            dev = next(p.device for p in params if p.is_cuda)
            ctx["cuda_capability"] = list(torch.cuda.get_device_capability(dev))
        return ctx

    # ------------------------------------------------------------------ intervals
    def snapshot(self) -> Snapshot:
        """A mark for interval statistics: ``report(since=snap)`` (and ``summary``/``diagnose``)
        then give the figures of the steps that ended after it, as a fresh Monitor fed only those
        steps would (phases, step, shares, samples/s, spikes, user phases, modules; warm-up steps
        never count), while ``report()`` stays cumulative. Any number of snapshots may be kept::

            snap = mon.snapshot()
            for x, y in loader: ...                       # one epoch
            print(mon.summary(since=snap)); snap = mon.snapshot()

        Cheap: one copy of the raw statistics, no device synchronisation, nothing per step. Taken
        between steps (after ``optimizer.step()``, at an epoch's or a log's end) it splits the run
        exactly; taken inside a step it marks that step's end, so that no step is split between
        two intervals. The difference is exact for counts, totals and histogram buckets (hence the
        quantiles); means and standard deviations reverse the moments' merge (exact up to
        rounding). Approximate: an interval's min and max are exact where the interval renewed
        them, otherwise the value of its lowest / highest histogram bucket (within 0.5%); for
        ``modules`` (moments only, no histogram) they are then unknown (None). On CUDA, device
        samples resolve a step or two late: those of the steps before the snapshot that were still
        pending at it count in the interval. A snapshot taken before :meth:`reset` gives the
        figures since the reset; one taken before the first attach, those since the start.
        """
        return Snapshot(self, self._tl.snapshot() if self._tl is not None else None)

    def reset(self) -> None:
        """Forgets every statistic (phases, user phases, modules, step and sample counts, warm-up
        totals, spikes, the ring of recent steps); the hooks stay attached and timing goes on.

        ``steps`` counts from 0 again; the step index (NVTX payloads, ``profile_steps``) and the
        warm-up (counted from the first attach, not per reset) go on. A step already under way
        (one that closed a phase before the reset) is not counted. Snapshots taken before it then
        give the figures since the reset.
        """
        if self._tl is not None:
            self._tl.reset()

    def _since(self, since: Optional[Snapshot]) -> Any:
        # The C++ snapshot report(since=) subtracts, or None: everything so far.
        if since is None:
            return None
        if not isinstance(since, Snapshot):
            raise TypeError(f"stepscope: since must be a Monitor.snapshot() or None; got {_what(since)}")
        if since._owner() is not self:
            raise ValueError("stepscope: since is a snapshot of another Monitor; take it with this "
                             "Monitor's snapshot()")
        return since._c

    def report(self, top_modules: int = 10, *, since: Optional[Snapshot] = None, gather: bool = False,
               group: Any = None, timeout: Optional[float] = None) -> dict:
        """Statistics so far, in seconds (see :func:`stepscope.report.build_report`).

        ``since``: a :meth:`snapshot`: the same dict for the steps that ended after it (see
        :meth:`snapshot` for what is exact); ``None``: the whole run (since the last
        :meth:`reset`). ``gather=True``: merged over the ranks of ``group`` (default: the default
        process group) by one all_gather, plus a per-rank view in ``ranks`` (see
        :func:`stepscope.distributed.gather_report`); a collective, so every rank must call it.
        ``timeout`` (seconds, with ``gather=True``): raise ``distributed.CollectiveTimeoutError``
        naming the ranks that did not call it, instead of waiting for the process group's own
        timeout (30 minutes by default). A local report also says how samples were counted: ``samples_counted_by`` is
        ``"batch_size=N"``, ``"the first input's dimension D"`` or ``"mark(batch=)"``.
        """
        base = self._since(since)
        if gather:
            if since is not None:
                raise ValueError("stepscope: report(gather=True) covers the whole run; since= is for "
                                 "a local report")
            from . import distributed

            return distributed.gather_report(self, group, top_modules=top_modules, timeout=timeout)
        if self._tl is None:
            raise RuntimeError("stepscope: nothing recorded yet: attach the Monitor first")
        raw = self._tl.report(since=base)
        rep = _report.build_report(raw, memory=self._memory(raw), top_modules=top_modules,
                                   context=self._context())
        rep["samples_counted_by"] = self._samples_counted_by()
        return rep

    def _samples_counted_by(self) -> str:
        if self._marked_batch:
            return "mark(batch=)"
        if self._batch > 0:
            return f"batch_size={self._batch}"
        return f"the first input's dimension {self._batch_dim}"

    def diagnose(self, *, since: Optional[Snapshot] = None, gather: bool = False, group: Any = None) -> list:
        """What to fix first: findings (dicts with rule, severity, title, evidence, advice,
        saving) from the rules in :mod:`stepscope.diagnose`, largest saving first. ``since``: of
        the steps after a :meth:`snapshot`. ``gather=True`` diagnoses the report gathered over
        the ranks (a collective), which adds the straggler rule.
        """
        return _diagnose.diagnose(self.report(since=since, gather=gather, group=group))

    def summary(self, top_modules: int = 10, *, since: Optional[Snapshot] = None, gather: bool = False,
                group: Any = None) -> str:
        """A plain-text table (phase, count, mean, p50, p90, p99, max, total, share of step; host,
        then device), warm-up and spike lines, and the diagnosis ("What to fix first").

        ``since``: the table and diagnosis of the steps after a :meth:`snapshot`.
        ``gather=True``: the table merged over the ranks, the per-rank p50 table, and the
        diagnosis of the gathered report (the straggler rule included); a collective, as in
        :meth:`report`.
        """
        rep = self.report(top_modules=top_modules, since=since, gather=gather, group=group)
        if gather:
            findings = _diagnose.diagnose(rep)
        else:
            findings = self.diagnose() if since is None else self.diagnose(since=since)
        return _report.format_summary(rep, findings=findings)

    def recent_steps(self) -> list:
        """The last ``ring`` steps, oldest first: host seconds per phase and raw spans."""
        return self._tl.recent_steps() if self._tl is not None else []

    def export_trace(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes the ring of recent steps as a Chrome trace-event file for Perfetto or
        chrome://tracing (gzip'd when ``path`` ends in ``.gz``); see :func:`stepscope.export.trace_events`.

            mon.export_trace("run.trace.json.gz")
        """
        from . import export

        export.write_trace(self, path)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes the report, the ring of recent steps, the diagnosis (when this Monitor has one),
        build info and versions as JSON; :func:`stepscope.load` reads it back.

            mon.save("run.json"); print(stepscope.load("run.json").summary())
        """
        from . import export

        export.save(self, path)

    def to_csv(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """One CSV row per step in the ring; see :func:`stepscope.export.write_csv`."""
        from . import export

        export.write_csv(self, path)

    def __repr__(self) -> str:
        return f"Monitor(models={len(self._models)}, attached={self._attached}, steps={self.steps})"

