"""Lightning: a callback that times every training step and logs the numbers.

    from stepscope.integrations.lightning import StepscopeCallback
    cb = StepscopeCallback(metrics=stepscope.ClassificationMetrics("multiclass", num_classes=10))
    trainer = lightning.Trainer(callbacks=[cb], ...)
    trainer.fit(model, loader)           # training_step returns {"loss": ..., "preds": ..., "target": ...}
    print(cb.monitor.report()["phases"]["forward"])

Lightning's automatic optimization runs ``training_step`` and the backward inside
``optimizer.step(closure)``, and a ``training_step`` may call a submodule whose forward the
LightningModule's hooks never see: the callback marks the boundaries from Lightning's own hooks
(:meth:`stepscope.Monitor.mark`) and lets the optimizer hooks end the step, so the partition
holds in automatic and manual optimization alike. ``forward`` is then the time from
``on_train_batch_start`` to ``on_before_backward``: ``training_step`` with its loss (``loss`` is
~0 unless the module's own forward hooks separate them), ``backward`` runs to
``on_after_backward``, and ``optimizer`` from there to the end of ``optimizer.step``.
Validation loops inside ``fit`` are reported as ``eval_forward`` and left out of the steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError("stepscope.integrations.lightning needs Lightning: "
                          "pip install stepscope[lightning]") from e

from ..metrics import ClassificationMetrics
from ..regression import RegressionMetrics
from ..monitor import Monitor
from . import _common

LOG_KEYS = _common.LOG_KEYS


class StepscopeCallback(pl.Callback):
    """Times each training step (:class:`stepscope.Monitor`) and logs phase p50s and shares.

    Args:
        metrics: a :class:`stepscope.ClassificationMetrics` (or a
            :class:`stepscope.RegressionMetrics`) fed from ``training_step``'s outputs,
            a mapping with ``"preds"`` and ``"target"``; at each training epoch's end its scalar
            entries are computed, logged (``on_epoch``) and the metrics reset, as Lightning does
            with torchmetrics; ``callback.run_metrics`` adds up every epoch (the whole run).
        log_every_n_steps: every this many optimizer steps, log the timing of the steps since
            the previous log (:meth:`stepscope.Monitor.snapshot`) into ``trainer.callback_metrics``
            and ``trainer.logged_metrics`` and to each of ``trainer.loggers`` at that step
            (directly: ``pl_module.log_dict`` costs about 0.5 ms a name); 0: never. The whole
            run's figures stay in ``callback.monitor.report()``.
        log_keys: which names to log (without the prefix): ``"short"`` (default,
            :data:`LOG_KEYS`: ``step_p50_ms``, the shares of
            ``data``, ``forward``, ``backward`` and ``optimizer``, ``accuracy``, ``f1_macro`` or
            ``f1``, ``loss``), ``"all"`` (every phase's ``<phase>_p50_ms`` and ``<phase>_share``
            and every scalar metric, about 40 names) or a list of names.
        summary: print the summary table (with its diagnosis) at the end.
        trace: a path: the Monitor writes a Perfetto / Chrome trace of the recent steps there
            when it detaches (:meth:`stepscope.Monitor.export_trace`).
        prefix: of every logged name.
        **monitor_kwargs: passed to :class:`stepscope.Monitor` (``per_module``, ``nvtx``, ...).

    The Monitor attaches at ``on_train_start`` to the LightningModule and ``trainer.optimizers``
    and detaches at ``on_train_end`` or when training raises; ``callback.monitor`` keeps the
    numbers after ``fit``. Reading the metrics at an epoch's end costs one small host read (the
    timing never syncs). The callback's own logging (the report, the metric read, the loggers'
    writes and the epoch's ``log_dict``) runs between steps, where it would be the next
    step's ``data``: it is timed as the user phase ``stepscope_log`` and left out of the training
    step as an evaluation is (so ``eval_forward`` counts it too).
    """

    def __init__(self, metrics: Optional[Union[ClassificationMetrics, RegressionMetrics]] = None,
                 log_every_n_steps: int = 50,
                 summary: bool = True, trace: Optional[str] = None, prefix: str = "stepscope/",
                 log_keys: Union[str, Iterable[str]] = "short", **monitor_kwargs: Any) -> None:
        super().__init__()
        _common.check_metrics("metrics", metrics)
        n = log_every_n_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"stepscope: log_every_n_steps must be an int >= 0; got {log_every_n_steps!r}")
        self.metrics = metrics
        self.run_metrics = _common.run_total(metrics) if metrics is not None else None
        self.log_every_n_steps = log_every_n_steps
        self.summary = summary
        if trace is not None:
            monitor_kwargs = dict(monitor_kwargs, trace=trace)  # the Monitor writes it at detach
        self.prefix = prefix
        self.log_keys = _common.check_log_keys(log_keys)
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Optional[Monitor] = None
        self._next_log = log_every_n_steps
        self._since: Any = None

    # ------------------------------------------------------------------ attach / detach
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.monitor = Monitor(pl_module, list(trainer.optimizers), **self.monitor_kwargs).attach()
        self._next_log = self.log_every_n_steps
        self._since = self.monitor.snapshot()

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        mon = self.monitor
        if mon is None or not mon.attached:
            return
        mon.detach()
        if self.summary and trainer.is_global_zero:
            print(_common.closing_text(mon))

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                     exception: BaseException) -> None:
        if self.monitor is not None and self.monitor.attached:
            self.monitor.detach()

    # ------------------------------------------------------------------ boundaries
    # Each boundary is one C call on the Monitor's hooks (_C.StepHooks.batch_start ...: what
    # Monitor.mark, FLOPs counting and Monitor.observe do there; through them in Python the marks
    # cost about 22 us a step).
    def _marks(self) -> Any:
        mon = self.monitor
        return mon._hooks if mon is not None and mon.attached else None

    def _mark(self, name: str, batch: Optional[int] = None) -> None:
        if self.monitor is not None and self.monitor.attached:
            self.monitor.mark(name, batch=batch)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        # FLOPs counting (Monitor(flops="auto")) sees training_step whether or not it calls the module.
        hooks = self._marks()
        if hooks is not None:
            hooks.batch_start(batch)

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Any) -> None:
        # The loss Lightning backpropagates (divided by accumulate_grad_batches), kept on the device.
        hooks = self._marks()
        if hooks is not None:
            hooks.before_backward(loss)

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        hooks = self._marks()
        if hooks is not None:
            hooks.after_backward()

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._mark("eval_begin")

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._mark("eval_end")

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # A training_step that returned None skipped its backward: its forward ends here.
        hooks = self._marks()
        if hooks is not None:
            hooks.batch_end()
        if self.metrics is not None:
            if not isinstance(outputs, Mapping) or "preds" not in outputs or "target" not in outputs:
                keys = sorted(outputs) if isinstance(outputs, Mapping) else ""
                raise ValueError("stepscope: StepscopeCallback(metrics=...) needs training_step to return a "
                                 f"dict with 'preds' and 'target' (and 'loss'); got "
                                 f"{type(outputs).__name__}{keys}")
            self.metrics.update(outputs["preds"].detach(), outputs["target"])
        mon = self.monitor
        if mon is None or self.log_every_n_steps == 0 or mon.steps < self._next_log:
            return
        self._next_log = mon.steps + self.log_every_n_steps
        with _common.own_work(mon):
            logged = _common.phase_scalars(mon.report(since=self._since), self.prefix, self.log_keys)
            self._since = mon.snapshot()
            if logged:
                self._send(trainer, logged)

    def _send(self, trainer: "pl.Trainer", logged: dict) -> None:
        """The step log: into ``trainer.callback_metrics`` (and ``logged_metrics``) as float64 tensors,
        where ``self.log`` puts them, and to each logger at this step. ``pl_module.log_dict`` did the
        same at about 0.5 ms a name (a result object, checks and a reduction each, and each logged
        name then went through the trainer's per-step result collection for the rest of the epoch),
        which made the callback cost 1.23x a bare 300-step fit of a small module; this costs tens of us.
        """
        values = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in logged.items()}
        trainer.callback_metrics.update(values)
        trainer.logged_metrics.update(values)
        # The step Lightning's own on_step logging uses (batches that stepped an optimizer); the
        # public global_step counts every optimizer's steps.
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        step = getattr(loop, "_batches_that_stepped", trainer.global_step)
        for lg in trainer.loggers:
            lg.log_metrics(dict(logged, epoch=trainer.current_epoch), step=step)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        m = self.metrics
        if m is None or self.monitor is None:
            return
        with _common.own_work(self.monitor):
            values = m.log_dict()
            if float(values["samples"]) == 0:  # an epoch without a training batch
                return
            logged = _common.pick(values, self.log_keys, self.prefix)
            _common.fold(self.run_metrics, m)
            if logged:
                pl_module.log_dict(logged, on_step=False, on_epoch=True)
