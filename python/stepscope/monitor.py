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
step ends at the optimizer's post hook, or at :meth:`Monitor.step`. The hooks are C functions
(``_C.StepHooks``, csrc/python/step_hooks.cpp, over csrc/timing/step_machine.h's step rule) that
read a clock and record a CUDA event (read back with ``cudaEventQuery``: no device sync); no Python
runs per step unless per-module sampling or ``print_every`` need it. Copies, checkpoints and
interrupted forwards: the README's "Where the time goes: Monitor". Argument checks, the registry of
attached models, user phases and snapshots: ``_monitor_parts.py``; health and throughput: theirs.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
import weakref
from typing import Any, Optional, Sequence, Union

import torch
import torch.optim.optimizer as _optim_mod

from . import _C
from . import _monitor_health as _health
from . import _monitor_throughput as _tp
from . import diagnose as _diagnose
from . import report as _report
from ._monitor_views import Views
from ._monitor_parts import (MARKS, Snapshot, _check_arguments, _check_device_every,  # noqa: F401
                             _check_options, _check_ring, _claim, _context, _is_compiled, _mark, _memory,
                             _ModuleSel, _owner_of, _Phase, _release, _samples_counted_by,
                             _selected_modules, _snapshot_base, _unclaim)


class Monitor(Views):
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
        batch_size: samples per forward; default: the first input's size along ``batch_dim`` (the
            first positional argument, or the first tensor keyword of ``model(**batch)``).
        batch_dim: the dimension of the first input that counts samples (default 0; 1 for
            sequence-first ``[T, B, ...]`` inputs). Give ``batch_size`` or ``batch_dim``, not both.
            A closure step (LBFGS) counts its batch once however often it runs the closure;
            ``mark("forward_begin", batch=n)`` counts ``n``. With several models, only the first
            one's forwards count (a GAN's generator and discriminator would each count the batch).
            ``report()["samples_counted_by"]`` says which rule counted.
        ring: recent steps kept raw (:meth:`recent_steps`), 1 .. ``_C.MAX_RING`` (each slot
            ``_C.RING_SLOT_BYTES``, about 2 KB, allocated at attach).
        warmup_steps: the first steps kept out of every statistic and reported apart in
            ``report()["warmup"]``; 3 by default (compilation, CUDA-graph recording, autotuning).
        trace: a path: :meth:`export_trace` writes the trace there at detach (gzip'd for ``.gz``).
        print_every: every n steps, log one line (step, p50 step time, largest phase and its share,
            samples/s, memory) at INFO on the ``"stepscope"`` logger; 0 (default): off. Python runs
            only on those steps (the step hooks count in C).
        device_every: on CUDA, record device events on one step in ``device_every`` (host times
            on every step; warm-up steps always device-timed). ``"auto"`` (default) chooses it so
            that the event records cost about 1% of the step; ``1``: every step. See
            ``report()["device_steps"]`` and ``["device_every"]``. No effect without CUDA.
        health, nonfinite, update_ratio_every: gradient statistics at each optimizer step, on the
            device, no host read (on by default; ``report()["health"]``); on a non-finite gradient
            ``"warn"`` (default), ``"skip"`` the update or ``"raise"`` (both read the device once per
            step); ||dw|| / ||w|| on one step in ``update_ratio_every`` (0: off). What each costs:
            the README's "Training health".
        flops, peak_flops, tokens_per_sample: throughput (``report()["throughput"]``: FLOP/s, MFU,
            tokens/s). ``flops``: ``"auto"`` (default) counts one step's FLOPs (forward and backward,
            every micro-batch of the optimizer step) with a dispatch mode at each new input shape, that
            step kept out of the statistics; an int (FLOPs per optimizer step), ``f(batch_size)``, or
            None. ``peak_flops`` (FLOP/s) overrides the peak: by default the datasheet table of
            :mod:`stepscope.hardware` on CUDA (None for a part it lacks), a measured matmul on CPU.
            ``tokens_per_sample``: default, T of an integer first input ``[B, T]``. The README's
            "Throughput and MFU".

    Eval forwards (``no_grad``, ``inference_mode``, ``model.training`` False) are reported apart
    (``eval_forward``, ``eval``) and left out of the training step. Gradient accumulation and
    ``step(closure)`` optimizers (LBFGS, Lightning) need nothing special; a loop whose hooks cannot
    see a boundary drives it with :meth:`mark`. Backward begins at a C++ pre-hook on the output's
    ``grad_fn``, which compiled autograd does not support. Closures, global hooks, a loop that
    never ends a step, threads, copies and checkpoints: the README, "Where the time goes: Monitor".
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
        health: bool = True,
        nonfinite: str = "warn",
        update_ratio_every: int = 100,
        flops: Any = "auto",
        peak_flops: Optional[float] = None,
        tokens_per_sample: Optional[int] = None,
    ) -> None:
        models, opts = _check_arguments(model, optimizers)
        per_module = _check_options(models, opts, per_module=per_module, per_module_every=per_module_every,
                                    profile_steps=profile_steps, batch_size=batch_size, batch_dim=batch_dim,
                                    warmup_steps=warmup_steps, trace=trace, print_every=print_every)
        self._device_every = _check_device_every(device_every)
        _health.check_options(health, nonfinite, update_ratio_every)
        self._health = (nonfinite, update_ratio_every) if health else None
        _tp.check_options(flops, peak_flops, tokens_per_sample)
        self._flops = _tp.Flops(flops, peak_flops, tokens_per_sample, batch_dim or 0)
        self._watch: Any = None  # _C.HealthWatch, made at the first attach
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
        _claim(self._models, None)  # raises if another Monitor is attached to one of them
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
        _claim(self._models, self)
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
        _unclaim(self._models, self)
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
        on_end = self._step_ended if self._print_every else None
        hk = self._hooks = _C.step_hooks(tl, batch=self._batch, batch_dim=self._batch_dim,
                                         optimizers=len(self._opts), on_step_end=on_end, module_every=every,
                                         print_every=self._print_every,
                                         owns=None if self._opts else _owner_of(self._models),
                                         samples_of=self._models[0] if len(self._models) > 1 else None)
        for m in self._models:
            self._handles.append(m.register_forward_pre_hook(hk.forward_pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(hk.forward_post, always_call=True))
        if self._health is not None:
            if self._watch is None:
                made = _health.make_watch(self._models, self._opts, self._ring, *self._health)
                self._watch, self._groups = made
            hk.watch(self._watch)
        self._flops.attach(hk, any(_is_compiled(m) for m in self._models))
        if self._opts:
            for o in self._opts:
                self._handles.append(o.register_step_pre_hook(hk.optimizer_pre))
                self._handles.append(o.register_step_post_hook(hk.optimizer_post))
        else:
            self._handles.append(_optim_mod.register_optimizer_step_pre_hook(hk.optimizer_pre))
            self._handles.append(_optim_mod.register_optimizer_step_post_hook(hk.optimizer_post))
        if self._per_module:
            for label, sub in _selected_modules(self._models, self._per_module):
                hk.add_module(sub, tl.register_module(label))
                # Registered once; the hooks put them in their module's dict on sampled steps only.
                pre, post = hk.module_pre, hk.module_post
                h = sub.register_forward_pre_hook(pre)
                self._module_handles.append(h)
                hk.gate(sub._forward_pre_hooks, h.id, pre)
                h = sub.register_forward_hook(post, always_call=True)
                self._module_handles.append(h)
                hk.gate(sub._forward_hooks, h.id, post)

    def _remove_all(self) -> None:
        self._flops.detach(self._hooks)
        if self._hooks is not None:
            self._marked_batch = self._marked_batch or self._hooks.marked_batch
            self._hooks.gate(None)  # a step ended by hand after detach must put no hook back
        for h in self._handles + self._module_handles:
            h.remove()
        self._handles.clear()
        self._module_handles.clear()

    # ------------------------------------------------------------------ per step
    def _step_ended(self, sampling: bool) -> None:
        # Called by the hooks at every print_every-th step's end.
        if self._tl.steps % self._print_every == 0:
            logging.getLogger("stepscope").info(_report.live_line(self._local_report(health=False), self._tl.steps))

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

        ``boundary`` is one of :data:`MARKS`: the step's boundaries ``"forward_begin"``
        (``batch``: samples in it) .. ``"optimizer_end"`` (ends the step), ``"step"`` (as
        :meth:`step`), and ``"eval_begin"``/``"eval_end"`` around work left out of the training
        step (reported as ``eval_forward``). Marks and hooks may both fire for one boundary (the
        README's "Marks by hand" says how they combine). Example, a framework's callbacks::

            mon = stepscope.Monitor(model, optimizer).attach()
            mon.mark("forward_begin", batch=len(x))   # the loop's "batch start"
            loss = framework_step(x)                  # forward + loss, however it is called
            mon.mark("forward_end"); mon.mark("backward_begin")
            loss.backward()
            mon.mark("backward_end")
            optimizer.step()                          # its hooks end the step

        Raises ValueError for an unknown name and RuntimeError when not attached.
        """
        _mark(self, boundary, batch)

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

    # ------------------------------------------------------------------ intervals
    def snapshot(self) -> Snapshot:
        """A mark for interval statistics: ``report(since=snap)`` (and ``summary``/``diagnose``)
        then give the figures of the steps that ended after it, as a fresh Monitor fed only those
        steps would, while ``report()`` stays cumulative::

            snap = mon.snapshot()
            for x, y in loader: ...                       # one epoch
            print(mon.summary(since=snap)); snap = mon.snapshot()

        Cheap: one copy of the raw statistics, no device sync, nothing per step. What is exact and
        what approximate: the README's "Intervals".
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
        if self._watch is not None:
            self._watch.reset()

    def report(self, top_modules: int = 10, *, since: Optional[Snapshot] = None, gather: bool = False,
               group: Any = None, timeout: Optional[float] = None) -> dict:
        """Statistics so far, in seconds (see :func:`stepscope.report.build_report`).

        ``since``: a :meth:`snapshot`: the same dict for the steps that ended after it; ``None``:
        the whole run (since the last :meth:`reset`). ``gather=True``: merged over the ranks of
        ``group`` by one all_gather, plus a per-rank view in ``ranks`` (a collective: every rank
        calls it; see :func:`stepscope.distributed.gather_report`); ``timeout`` (seconds): raise
        ``distributed.CollectiveTimeoutError`` naming the ranks that did not call it instead of
        waiting for the process group's own timeout.
        """
        base = _snapshot_base(self, since)
        if gather:
            if since is not None:
                raise ValueError("stepscope: report(gather=True) covers the whole run; since= is for "
                                 "a local report")
            from . import distributed

            return distributed.gather_report(self, group, top_modules=top_modules, timeout=timeout)
        if self._tl is None:
            raise RuntimeError("stepscope: nothing recorded yet: attach the Monitor first")
        return self._local_report(top_modules, base)

    def _local_report(self, top_modules: int = 10, base: Any = None, health: bool = True) -> dict:
        # health=False: nothing read from the device (the print_every line, written mid-training).
        raw = self._tl.report(since=base)
        rep = _report.build_report(raw, memory=_memory(self._models, raw), top_modules=top_modules,
                                   context=_context(self._models, self._cuda, self._autocast_counts()),
                                   samples_counted_by=_samples_counted_by(self))
        rep["health"] = _health.report_of(self) if health else None
        rep["throughput"] = _tp.report_of(self, rep, measure=health)
        return rep

    def observe(self, loss: torch.Tensor) -> None:
        """Hands over the step's loss (a one-element tensor, any device), kept there with the step
        number, no host read (``report()["health"]["loss"]``): ``mon.observe(loss)`` once a step."""
        _health.check_observe(self, loss)
        self._watch.observe_loss(loss, self._tl.step_index)

    def diagnose(self, *, since: Optional[Snapshot] = None, gather: bool = False, group: Any = None) -> list:
        """What to fix first: findings (dicts with rule, severity, title, evidence, advice,
        saving) from the rules in :mod:`stepscope.diagnose`, largest saving first. ``since``: of
        the steps after a :meth:`snapshot`. ``gather=True`` diagnoses the report gathered over
        the ranks (a collective), which adds the straggler rule.
        """
        return _diagnose.diagnose(self.report(since=since, gather=gather, group=group))

    def _findings(self, rep: dict) -> list:
        # The diagnosis of the report being printed or saved; a diagnose() set on the instance is asked instead.
        own = vars(self).get("diagnose")
        return own() if own is not None else _diagnose.diagnose(rep)

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
        return _report.format_summary(rep, findings=self._findings(rep))

    def recent_steps(self) -> list:
        """The last ``ring`` steps, oldest first: host seconds per phase and raw spans, and the
        step's global gradient norm and loss (``grad_norm``, ``loss``: None where unknown)."""
        if self._tl is None:
            return []
        return _health.join_recent(self._tl.recent_steps(), _health.report_of(self))

    def __repr__(self) -> str:
        return f"Monitor(models={len(self._models)}, attached={self._attached}, steps={self.steps})"

