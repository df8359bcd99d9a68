"""Training-step phase timing: hooks on a model and its optimizers feed a C++ Timeline.

    with stepscope.Monitor(model, optimizer) as mon:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step(); optimizer.zero_grad()
    print(mon.summary())

A step is partitioned with no unexplained time: ``data`` (gap before forward), ``forward``,
``loss`` (forward end to backward begin), ``backward`` (the gradient reaches the model's outputs
to autograd's final callback), ``other`` (backward end to the optimizer) and ``optimizer``. The
step ends at the optimizer's post hook, or at :meth:`Monitor.step`. The hooks only read a clock
and record a CUDA event (on GPU); events are read back with ``cudaEventQuery`` when already
complete, so the Monitor never synchronises the device.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Optional, Sequence, Union

import torch
import torch.optim.optimizer as _optim_mod

from . import _C
from . import report as _report

_ModuleSel = Union[bool, Sequence[Union[str, type]]]

# Models with an attached Monitor: two Monitors on one model would double-count every phase.
_attached_models: "weakref.WeakKeyDictionary[torch.nn.Module, Monitor]" = weakref.WeakKeyDictionary()


def _first_grad_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out if out.requires_grad else None
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            t = _first_grad_tensor(o)
            if t is not None:
                return t
    return None


def _is_compiled(m: torch.nn.Module) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # torch without dynamo
        return False
    return isinstance(m, OptimizedModule)


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


class Monitor:
    """Times forward, backward, optimizer step and the gaps between them, every step.

    Args:
        model: the module (or a list of modules) whose forward is timed; backward begins when
            the gradient reaches its output.
        optimizers: an optimizer or a list of them; the step ends when each has stepped once.
            ``None``: torch's global optimizer hooks, and every ``optimizer.step()`` ends a step.
        per_module: ``True`` times every submodule's forward, or a list of submodule names or
            module types; sampled on one step in ``per_module_every``. Refused (with a warning,
            phase timing still works) for ``torch.compile``'d models.
        nvtx: emit NVTX ranges (domain "stepscope") for Nsight Systems.
        profile_steps: ``range(a, b)``: open the profiler capture window (cudaProfilerStart and
            an NVTX "capture" range) for steps a .. b-1, for ``nsys --capture-range``.
        batch_size: samples per forward; default: the first input's leading dimension.
        ring: how many recent steps are kept raw (:meth:`recent_steps`).

    Eval forwards (under ``no_grad``, ``inference_mode`` or with ``model.training`` False) are
    reported apart as ``eval_forward``, and eval time is left out of the training step (so a
    model trained in ``eval()`` mode, e.g. to freeze batch norm, has its forwards counted as
    eval). Gradient accumulation (several forward/backward per step) needs nothing special.
    Optimizers that run the model inside ``step(closure)`` (LBFGS) break the partition: call
    :meth:`step` after them. Backward begins at a C++ pre-hook on the output's ``grad_fn``, which
    compiled autograd does not support.
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
        ring: int = 256,
    ) -> None:
        models = [model] if isinstance(model, torch.nn.Module) else list(model)
        if not models or not all(isinstance(m, torch.nn.Module) for m in models):
            raise TypeError("stepscope: Monitor needs a torch.nn.Module or a list of them; "
                            f"got {type(model).__name__}")
        if optimizers is None:
            opts: list = []
        elif isinstance(optimizers, torch.optim.Optimizer):
            opts = [optimizers]
        else:
            opts = list(optimizers)
        if not all(isinstance(o, torch.optim.Optimizer) for o in opts):
            raise TypeError("stepscope: optimizers must be a torch.optim.Optimizer, a list of them, or None")
        if len({id(o) for o in opts}) != len(opts):
            raise ValueError("stepscope: the same optimizer was given twice")
        if per_module_every < 1:
            raise ValueError(f"stepscope: per_module_every must be >= 1; got {per_module_every}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"stepscope: batch_size must be >= 1; got {batch_size}")
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
        self._ring = ring
        self._tl: Any = None
        self._handles: list = []
        self._module_handles: list = []
        self._modules: list = []  # (module, id)
        self._stepped: set = set()
        self._opt_in: Optional[torch.optim.Optimizer] = None
        self._opt_depth = 0
        self._phases: dict = {}
        self._cuda = False
        self._mem_alloc: Optional[int] = None
        self._mem_peak: Optional[int] = None
        self._attached = False

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> "Monitor":
        """Registers the hooks. Raises if this Monitor, or another one, is attached to the model."""
        if self._attached:
            raise RuntimeError("stepscope: this Monitor is already attached; detach() it before attaching "
                               "again")
        for m in self._models:
            other = _attached_models.get(m)
            if other is not None:
                raise RuntimeError("stepscope: another Monitor is already attached to this "
                                   f"{type(m).__name__}; "
                                   "detach it first (two Monitors would time every phase twice)")
        self._cuda = torch.cuda.is_available() and any(
            p.is_cuda for m in self._models for p in m.parameters())
        self._stepped.clear()
        self._opt_in, self._opt_depth = None, 0
        if self._tl is None:
            cap = (self._profile.start, self._profile.stop) if self._profile is not None else (-1, -1)
            self._tl = _C.Timeline(device=self._cuda, nvtx=self._nvtx, ring=self._ring,
                                   capture_begin=cap[0], capture_end=cap[1])
        else:
            self._tl.open()
        try:
            self._register()
        except BaseException:
            self._remove_all()
            self._tl.close()
            raise
        for m in self._models:
            _attached_models[m] = self
        self._attached = True
        return self

    def detach(self) -> None:
        """Removes every hook; the statistics stay readable. Raises if not attached."""
        if not self._attached:
            raise RuntimeError("stepscope: this Monitor is not attached (detach() called twice, or never "
                               "attached)")
        self._remove_all()
        self._tl.close()
        for m in self._models:
            if _attached_models.get(m) is self:
                del _attached_models[m]
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    def __enter__(self) -> "Monitor":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        if self._attached:  # detach() inside the block is allowed
            self.detach()

    def _register(self) -> None:
        tl = self._tl
        for m in self._models:
            self._handles.append(m.register_forward_pre_hook(self._forward_pre))
            self._handles.append(m.register_forward_hook(self._forward_post, always_call=True))
        if self._opts:
            for o in self._opts:
                self._handles.append(o.register_step_pre_hook(self._optimizer_pre))
                self._handles.append(o.register_step_post_hook(self._optimizer_post))
        else:
            self._handles.append(_optim_mod.register_optimizer_step_pre_hook(self._optimizer_pre))
            self._handles.append(_optim_mod.register_optimizer_step_post_hook(self._optimizer_post))
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
                        self._modules.append((sub, tl.register_module(label)))
            if names:
                missing = names - {n for m in self._models for n, _ in m.named_modules()}
                if missing:
                    raise ValueError(f"stepscope: per_module names not found in the model: {sorted(missing)}")
            self._sample_modules()

    def _remove_all(self) -> None:
        for h in self._handles + self._module_handles:
            h.remove()
        self._handles = []
        self._module_handles = []

    # ------------------------------------------------------------------ hooks (keep them small)
    def _forward_pre(self, module: torch.nn.Module, args: tuple) -> None:
        if self._opt_depth:  # the optimizer step raised (no post hook came)
            self._opt_in, self._opt_depth = None, 0
        ev = not module.training or not torch.is_grad_enabled()  # inference_mode disables grad too
        b = self._batch
        if b < 0 and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            b = args[0].shape[0]
        self._tl.forward_begin(ev, b)

    def _forward_post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._tl.forward_end()
        if output is not None and torch.is_grad_enabled():
            t = _first_grad_tensor(output)
            if t is not None:
                # A C++ pre-hook on the output's grad_fn: no Python (and no GIL) in the backward.
                if not self._tl.hook_backward(t):
                    t.register_hook(self._grad_reaches_output)

    def _grad_reaches_output(self, grad: Any) -> None:
        # Runs on autograd's thread. The final callback marks the end of this backward pass.
        if self._tl.backward_begin():
            torch.autograd.Variable._execution_engine.queue_callback(self._tl.backward_end)

    # A subclass whose step() calls super().step() fires the hooks twice, nested (torch wraps every
    # class's step once an instance of it exists): only the outermost pair is a boundary.
    def _optimizer_pre(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._opt_depth and self._opt_in is opt:
            self._opt_depth += 1
            return
        self._opt_in, self._opt_depth = opt, 1  # a different optimizer: the previous step raised
        self._tl.optimizer_begin()

    def _optimizer_post(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._opt_in is not opt:
            return
        self._opt_depth -= 1
        if self._opt_depth > 0:
            return
        self._opt_in = None
        end = True
        if len(self._opts) > 1:
            self._stepped.add(id(opt))
            end = len(self._stepped) >= len(self._opts)
        self._tl.optimizer_end(end)
        if end:
            self._step_ended()

    def _step_ended(self) -> None:
        self._stepped.clear()
        if self._cuda:
            # The caching allocator's counters: host-side numbers, no device sync.
            self._mem_alloc = torch.cuda.memory_allocated()
            self._mem_peak = torch.cuda.max_memory_allocated()
        if self._modules:
            self._sample_modules()

    def _sample_modules(self) -> None:
        want = self._tl.steps % self._every == 0
        if want and not self._module_handles:
            tl = self._tl
            for sub, i in self._modules:
                self._module_handles.append(
                    sub.register_forward_pre_hook(lambda m, a, i=i: tl.module_begin(i)))
                self._module_handles.append(
                    sub.register_forward_hook(lambda m, a, o, i=i: tl.module_end(i), always_call=True))
        elif not want and self._module_handles:
            for h in self._module_handles:
                h.remove()
            self._module_handles = []

    # ------------------------------------------------------------------ user API
    def step(self) -> bool:
        """Ends the step where no optimizer hook does (GradScaler skipped the step, closures).

        A no-op (returns False) when nothing happened since the last step ended, so calling it
        after every ``optimizer.step()`` is safe.
        """
        if not self._attached:
            raise RuntimeError("stepscope: Monitor.step() called while the Monitor is not attached")
        ended = self._tl.step()
        if ended:
            self._step_ended()
        return ended

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
        """Steps completed so far."""
        return self._tl.steps if self._tl is not None else 0

    def report(self, top_modules: int = 10) -> dict:
        """Statistics so far, in seconds (see :func:`stepscope.report.build_report`)."""
        if self._tl is None:
            raise RuntimeError("stepscope: nothing recorded yet: attach the Monitor first")
        mem = None
        if self._mem_alloc is not None:
            mem = {"allocated": self._mem_alloc, "peak": self._mem_peak}
        return _report.build_report(self._tl.report(), memory=mem, top_modules=top_modules)

    def summary(self, top_modules: int = 10) -> str:
        """A plain-text table: phase, count, mean, p50, p90, p99, total, share of step (host, device)."""
        return _report.format_summary(self.report(top_modules=top_modules))

    def recent_steps(self) -> list:
        """The last ``ring`` steps, oldest first: host seconds per phase and raw spans."""
        return self._tl.recent_steps() if self._tl is not None else []

    def __repr__(self) -> str:
        return f"Monitor(models={len(self._models)}, attached={self._attached}, steps={self.steps})"

