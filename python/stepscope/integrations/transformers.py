"""Hugging Face Trainer: a callback that times every optimizer step.

    from stepscope.integrations.transformers import StepscopeCallback
    cb = StepscopeCallback()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()                      # prints the summary at the end
    cb.monitor.report()

The Monitor attaches at ``on_train_begin`` to the model and to the torch optimizer inside the
Trainer's wrapper (Accelerate's ``AcceleratedOptimizer``), and a step ends at that optimizer's
step, so gradient accumulation and skipped logging steps need nothing special. Hugging Face models
compute the loss inside ``forward`` when given labels: ``forward`` then holds the loss, and the
``loss`` row is only the Trainer's time between the model's return and the backward; the summary
says so. Evaluation inside ``train()`` runs without grad and is reported as ``eval_forward``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import torch

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError("stepscope.integrations.transformers needs transformers: "
                      "pip install stepscope[transformers]") from e

from ..metrics import ClassificationMetrics
from ..regression import RegressionMetrics
from ..monitor import Monitor
from . import _common

LOG_KEYS = _common.LOG_KEYS

LOSS_NOTE = ("note: the model computes its loss inside forward (labels given), so 'forward' includes the "
             "loss; 'loss' is the Trainer's time between the model's return and the backward.")


def unwrap_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as Accelerate's ``AcceleratedOptimizer``."""
    seen = 0
    while not _hookable(opt) and seen < 8:
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            break
        opt, seen = inner, seen + 1
    if not _hookable(opt):
        raise TypeError(f"stepscope: cannot find a torch optimizer inside the Trainer's {type(opt).__name__}")
    return opt


def _is_causal_lm(model: Any) -> bool:
    # The models whose own loss shifts labels by one token (ForCausalLMLoss): the causal-LM heads,
    # named by class as the Auto classes list them (GPT2LMHeadModel's loss_type is None).
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(model, "loss_type", None) == "ForCausalLM" or \
        type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _hookable(opt: Any) -> bool:
    # A wrapper may subclass Optimizer without its __init__ (no hook tables): look inside it.
    return isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "_optimizer_step_pre_hooks") \
        and not isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer)


class StepscopeCallback(TrainerCallback):
    """Times each optimizer step of a ``transformers.Trainer`` (:class:`stepscope.Monitor`).

    Args:
        metrics: a :class:`stepscope.ClassificationMetrics` fed from every training forward of the
            model: its output's ``logits`` and the ``labels`` the Trainer passed it, shifted by one
            token for a causal-LM head (a model ``AutoModelForCausalLM`` lists, or ``loss_type``
            ``"ForCausalLM"``), as the model's own loss reads them. Configure it for the head:
            ``class_dim=-1, ignore_index=-100`` for token logits ``[B, T, V]``;
            ``num_classes=model.config.num_labels`` for sequence classification; a
            :class:`stepscope.RegressionMetrics` for a regression head (``problem_type="regression"``:
            logits ``[N, 1]`` are read against labels ``[N]``). Logged with each
            training log (``on_log``) as the metrics of the steps since the previous log, then
            reset, as the Trainer's own ``loss`` is; ``callback.run_metrics`` holds the whole run's.
        eval_metrics: the same, fed from the evaluation forwards of ``trainer.evaluate()`` (and
            of evaluation inside ``train()``) and added to that evaluation's logs and returned
            dict as ``eval_<prefix><name>``, then reset.
        preds_target: ``(output, inputs) -> (preds, target)``, for heads the rule above does not
            fit (``inputs``: the keyword arguments the model was called with).
        summary: print the summary table (with its diagnosis) at the end.
        log: add phase p50s (ms) and shares to the Trainer's training logs (``on_log``), for the
            loggers after this callback in the list: the figures of the steps since the previous
            log (:meth:`stepscope.Monitor.snapshot`), as the Trainer's own ``loss`` is; the whole
            run's stay in ``callback.monitor.report()``.
        log_keys: which names to log: ``"short"`` (default, :data:`LOG_KEYS`), ``"all"`` or a
            list of names (without the prefix), as in the Lightning callback.
        prefix: of every logged name.
        **monitor_kwargs: passed to :class:`stepscope.Monitor` (``batch_size`` defaults to
            ``args.per_device_train_batch_size``: the model is called with keywords only).

    ``callback.monitor`` keeps the numbers after ``train()``; ``callback.loss_in_forward`` says
    whether the model returned its own loss (then ``forward`` includes it). A metric update is
    one kernel launch after the model's forward returns, so it is inside the ``loss`` row.
    """

    def __init__(self, summary: bool = True, log: bool = True, prefix: str = "stepscope/",
                 metrics: Optional[Union[ClassificationMetrics, RegressionMetrics]] = None,
                 eval_metrics: Optional[Union[ClassificationMetrics, RegressionMetrics]] = None,
                 preds_target: Optional[Callable[[Any, dict], tuple]] = None,
                 log_keys: Union[str, Iterable[str]] = "short", **monitor_kwargs: Any) -> None:
        for name, m in (("metrics", metrics), ("eval_metrics", eval_metrics)):
            _common.check_metrics(name, m)
        if metrics is not None and metrics is eval_metrics:
            raise ValueError("stepscope: metrics and eval_metrics must be two objects (each is reset when "
                             "logged)")
        if preds_target is not None and not callable(preds_target):
            raise TypeError(f"stepscope: preds_target must be callable; got {type(preds_target).__name__}")
        self.summary = summary
        self.log = log
        self.prefix = prefix
        self.metrics = metrics
        self.eval_metrics = eval_metrics
        self.run_metrics = _common.run_total(metrics) if metrics is not None else None
        self.preds_target = preds_target
        self.log_keys = _common.check_log_keys(log_keys)
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Optional[Monitor] = None
        self.loss_in_forward = False
        self._loss_hook: Any = None
        self._metrics_hook: Any = None
        self._causal = False
        self._since: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("stepscope: the Trainer gave no model or optimizer to on_train_begin")
        # The Trainer has no exception hook: a train() that raised left this callback's Monitor on.
        self._detach()
        kw = dict(self.monitor_kwargs)
        # The Trainer calls the model with keyword arguments only, where the forward hook finds no
        # input to count: samples per forward are the configured batch (a short last batch counts full).
        kw.setdefault("batch_size", args.per_device_train_batch_size)
        self.monitor = Monitor(model, unwrap_optimizer(optimizer), **kw).attach()
        self._since = self.monitor.snapshot()
        # Whether the model's output carries a loss: read from the output, no tensor touched.
        self._loss_hook = model.register_forward_hook(self._see_loss)
        self._hook_metrics(model)

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            self._hook_metrics(model)  # so that trainer.evaluate() before train() feeds eval_metrics

    def _hook_metrics(self, model: Any) -> None:
        if (self.metrics is None and self.eval_metrics is None) or self._metrics_hook is not None:
            return
        self._causal = _is_causal_lm(model)
        self._metrics_hook = model.register_forward_hook(self._feed, with_kwargs=True)

    def remove_hooks(self) -> None:
        """Removes the metrics' forward hook from the model. It stays on after ``train()`` so that
        ``trainer.evaluate()`` still feeds ``eval_metrics``; the timing hooks go at the end of
        ``train()``."""
        if self._metrics_hook is not None:
            self._metrics_hook.remove()
            self._metrics_hook = None

    def _feed(self, module: Any, args: Any, kwargs: dict, output: Any) -> None:
        m = self.metrics if module.training and torch.is_grad_enabled() else self.eval_metrics
        if m is None:
            return
        if self.preds_target is not None:
            preds, target = self.preds_target(output, kwargs)
        else:
            logits = output.get("logits") if hasattr(output, "get") else None
            target = kwargs.get("labels")
            if logits is None or target is None:
                what = "no logits" if logits is None else "no labels"
                raise ValueError("stepscope: StepscopeCallback(metrics=...) reads the model output's "
                                 f"'logits' and the 'labels' it was called with; got {what} "
                                 f"({type(output).__name__}); "
                                 "the Trainer keeps the labels from the model when compute_loss_func or "
                                 "label_smoothing_factor is set. Pass preds_target=lambda output, inputs: "
                                 "(preds, target)")
            preds = logits
            if self._causal:  # token t predicts label t + 1
                preds, target = logits[..., :-1, :], target[..., 1:]
            elif isinstance(m, RegressionMetrics) and m.num_outputs == 1 and preds.numel() == target.numel():
                preds = preds.reshape(target.shape)  # a regression head's [N, 1] against labels [N]
        m.update(preds.detach(), target)

    def _see_loss(self, module: Any, inputs: Any, output: Any) -> None:
        if module.training and getattr(output, "get", None) is not None and output.get("loss") is not None:
            self.loss_in_forward = True
            self._loss_hook.remove()

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        if logs is None:
            return
        if any(k.startswith("eval_") for k in logs):  # an evaluation's log
            if self.eval_metrics is not None:
                logs.update(self._read(self.eval_metrics, "eval_" + self.prefix))
                self.eval_metrics.reset()
            return
        mon = self.monitor
        if self.log and mon is not None and mon.attached:
            logs.update(_common.phase_scalars(mon.report(since=self._since), self.prefix, self.log_keys))
            self._since = mon.snapshot()
        if self.metrics is not None:
            logs.update(self._read(self.metrics, self.prefix))
            _common.fold(self.run_metrics, self.metrics)

    def _read(self, m: Union[ClassificationMetrics, RegressionMetrics], prefix: str) -> dict:
        # One host read; nothing when no batch came since the last log (the end-of-training log).
        values = _common.floats(m.log_dict())
        return _common.pick(values, self.log_keys, prefix) if values["samples"] > 0 else {}

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach()
        if self.summary and self.monitor is not None and state.is_world_process_zero:
            print(_common.closing_text(self.monitor, LOSS_NOTE if self.loss_in_forward else ""))

    def _detach(self) -> None:
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self.monitor is not None and self.monitor.attached:
            self.monitor.detach()
