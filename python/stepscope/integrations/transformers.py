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

from typing import Any, Optional

import torch

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError("stepscope.integrations.transformers needs transformers: "
                      "pip install stepscope[transformers]") from e

from ..monitor import Monitor
from . import _common

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


def _hookable(opt: Any) -> bool:
    # A wrapper may subclass Optimizer without its __init__ (no hook tables): look inside it.
    return isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "_optimizer_step_pre_hooks") \
        and not isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer)


class StepscopeCallback(TrainerCallback):
    """Times each optimizer step of a ``transformers.Trainer`` (:class:`stepscope.Monitor`).

    Args:
        summary: print the summary table (with its diagnosis) at the end.
        log: add phase p50s (ms) and shares to the Trainer's logs (``on_log``), for the
            loggers after this callback in the list.
        prefix: of every logged name.
        **monitor_kwargs: passed to :class:`stepscope.Monitor` (``batch_size`` defaults to
            ``args.per_device_train_batch_size``: the model is called with keywords only).

    ``callback.monitor`` keeps the numbers after ``train()``; ``callback.loss_in_forward`` says
    whether the model returned its own loss (then ``forward`` includes it).
    """

    def __init__(self, summary: bool = True, log: bool = True, prefix: str = "stepscope/",
                 **monitor_kwargs: Any) -> None:
        self.summary = summary
        self.log = log
        self.prefix = prefix
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Optional[Monitor] = None
        self.loss_in_forward = False
        self._loss_hook: Any = None

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
        # Whether the model's output carries a loss: read from the output, no tensor touched.
        self._loss_hook = model.register_forward_hook(self._see_loss)

    def _see_loss(self, module: Any, inputs: Any, output: Any) -> None:
        if module.training and getattr(output, "get", None) is not None and output.get("loss") is not None:
            self.loss_in_forward = True
            self._loss_hook.remove()

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        if self.log and logs is not None and self.monitor is not None and self.monitor.attached:
            logs.update(_common.phase_scalars(self.monitor.report(), self.prefix))

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
