"""Classification metrics accumulated on the device by one fused kernel per update."""

from __future__ import annotations

import copy
import datetime
import warnings
from typing import Any, Optional, Sequence, Union

import torch

from . import _C
from ._metrics_config import FP_WORDS, MetricsArgs, check_config, check_tensors, config_mismatch, fingerprint

# The fields pickles have carried as plain attributes (the configuration's form before MetricsArgs).
_PICKLED = {"task": "task", "num_classes": "num_classes", "top_k": "top_k", "ignore_index": "ignore_index",
            "threshold": "threshold", "input": "input", "confusion_matrix": "keeps_confusion_matrix",
            "thresholds": "thresholds"}
_PICKLED_LATER = {"thresholds": None}  # fields added since: a pickle written before them has their default


def _timeout_seconds(name: str, timeout: Any) -> float:
    from .distributed import timeout_seconds

    return timeout_seconds(name, timeout)


def keep_float64(fn: Any) -> Any:
    """``fn`` (what ``nn.Module._apply`` maps over tensors) moving a float64 state without casting
    it: a parent's ``.half()`` or ``.to(dtype)`` reaches buffers too, and counts and moments must
    stay float64."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        return out if out.dtype == t.dtype else t.to(device=out.device)

    return apply


def check_loaded_state(state: Any, numel: int) -> None:
    """A state about to be loaded (None: not in the dict) must be float64 [numel]: refused before
    any tensor is copied."""
    if state is not None and (state.dtype != torch.float64 or state.shape != (numel,)):
        raise ValueError(f"stepscope: state must be float64 [{numel}]; got {state.dtype} {tuple(state.shape)}")


def _config_property(field: str, doc: str) -> property:
    def refuse(self: Any, value: Any) -> None:
        # The op's arguments, the state's layout and the ranks' fingerprint are all built from the
        # configuration at construction: an assignment could only make them disagree.
        raise AttributeError("stepscope: a ClassificationMetrics' configuration is fixed when it is made (the "
                             "state's layout is built from it); make a new one with the configuration you want")

    return property(lambda self: getattr(self._config, field), refuse, doc=doc + " Read-only.")


class ClassificationMetrics(torch.nn.Module):
    """Accuracy, precision, recall, F1/F-beta, specificity, IoU, confusion matrix, top-k accuracy,
    mean loss and calibration error (ECE), all from one pass over the predictions.

    Args:
        task: ``"multiclass"`` (preds ``[N, C]`` or ``[N, C, d1, ...]``, target ``[N]`` /
            ``[N, d1, ...]`` of class indices), ``"binary"`` (preds and target ``[N, ...]``,
            target 0/1) or ``"multilabel"`` (preds and target ``[N, L]`` or ``[N, L, d1, ...]``).
        num_classes: C, for multiclass.
        num_labels: L, for multilabel.
        top_k: multiclass top-k accuracies to track (at most 8 values, each in [1, C]).
        ignore_index: target value whose samples (multiclass) or elements (binary/multilabel)
            count nowhere.
        threshold: binary/multilabel: positive iff probability > threshold.
        input: ``"auto"``, ``"logits"`` or ``"probs"``. Binary/multilabel ``"auto"`` is
            torchmetrics' rule: a batch with any value outside [0, 1] is logits (sigmoid). The
            whole batch counts, ignored positions included, as in torchmetrics' stat-score
            metrics (its confusion-matrix and calibration metrics look at the kept ones only).
            Multiclass ``"auto"`` is torchmetrics' calibration rule, per update: when every
            value of the rows that count (ignored and out-of-range targets aside) lies in [0, 1]
            the batch is read as probabilities (softmax outputs), else as logits (log_softmax
            outputs included). It changes the loss and the ECE confidence, never the argmax; both
            readings are kept until the batch's range is known (no host sync, one launch).
        confusion_matrix: keep the C x C matrix (multiclass). Default: on for C <= 1024, so
            that 100k-class vocabularies stay O(C) in memory.
        beta: F-beta's beta; an ``fbeta_*`` entry is reported when beta != 1.
        device: where the state lives. Default: the CPU until ``.to()`` places it, or else the
            device of the first ``update``.
        class_dim: multiclass/multilabel: the dimension of preds that holds the classes (labels);
            default 1 (``[N, C, d1, ...]``). ``-1`` takes language-model logits ``[B, T, V]``
            with target ``[B, T]`` as they are (multilabel: target ``[N, ..., L]`` like preds):
            inputs are read through a ``movedim`` view, never copied (the kernels take strided
            rows).
        persistent: keep the state in the ``state_dict`` of the module that holds this one.
        sync_on_compute: under torch.distributed, whether ``compute()`` returns the metrics of
            every rank's data together. ``None`` (default): yes when torch.distributed is
            initialised and the world size is > 1; ``True``: yes, and an error when it is not
            initialised; ``False``: this rank's data only.
        process_group: the group ``compute()`` and ``sync()`` reduce over (default: the default
            group).
        sync_timeout: seconds (or a ``timedelta``) that ``compute()`` and ``sync()`` wait for the
            other ranks before raising :class:`stepscope.distributed.CollectiveTimeoutError`
            naming the ranks that had not called them; default: the process group's own timeout.
        thresholds: binned AUROC and average precision over ``torch.linspace(0, 1, thresholds)``
            (torchmetrics' ``thresholds=int``): per class (one-vs-rest for multiclass, per label for
            multilabel) a histogram of the positive and the negative samples' probabilities over
            the thresholds' gaps, ``C x 2 x (thresholds + 1)`` float64 counters (refused above
            2^24, 128 MiB). ``None`` (default): off. The histograms are filled by ATen ops after the
            kernel (one more read of the predictions, no host sync).

    Example:
        >>> m = ClassificationMetrics("multiclass", num_classes=3, top_k=(1, 2))
        >>> m.update(torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]), torch.tensor([0, 2]))
        >>> float(m.compute()["accuracy"])
        0.5

    A ``torch.nn.Module``: the state is one float64 buffer named ``state`` (``.to()`` moves it;
    with ``persistent=True`` a parent module's ``state_dict`` saves it as ``<attribute>.state``,
    beside ``<attribute>._extra_state``, the configuration, which ``load_state_dict`` checks).
    Calling the module, ``m(preds, target)``, accumulates like ``update`` and returns that
    batch's metrics (torchmetrics' convention; one more state-sized buffer, no host sync).
    ``compute(scalars=True)`` and ``log_dict()`` give only the single-number entries, for loggers.

    ``update`` launches one kernel (two for binary/multilabel ``"auto"`` on CUDA; with
    ``thresholds``, the histograms' pass after it) and never synchronises with the host; it runs
    under ``torch.compile(fullgraph=True)`` and CUDA graph
    capture. ``compute`` does one small host read to check the health counters (it raises if
    targets were out of range, warns on non-finite predictions); ``compute(check=False)`` does
    none.

    Distributed: like torchmetrics (whose ``sync_on_compute=True`` default syncs whenever
    torch.distributed is initialised), ``compute()`` is global by default, and the local state is
    left as it was, so accumulation goes on per rank and ``reset()`` stays local. torchmetrics
    gathers every state tensor of every rank (one all_gather per state) and reduces them; here the
    whole state is one float64 vector of sums, so the sync is one ``all_reduce`` of a copy of it
    (counts stay exact up to 2^53). ``compute()`` is then a collective: every rank calls it.
    ``sync()`` sums the state itself in place instead (a copy is not kept); after it, compute()
    does not reduce again until ``reset()``.

    Semantics are torchmetrics 1.9's defaults (and scikit-learn's where it has the metric):
    zero_division 0; multiclass macro averages skip classes with tp + fp + fn == 0; weighted
    averages weigh by support (tp + fn); multilabel accuracy is Hamming; confusion matrix rows
    are targets. Deviations: samples with a NaN/Inf prediction are left out of every metric and
    counted in ``nonfinite`` (torchmetrics would let NaN win the argmax); out-of-range targets
    are counted in ``invalid_target`` instead of raising inside ``update``; ties rank the lower
    class index first in top-k (torch.topk leaves ties unspecified); multilabel IoU ignores
    ``ignore_index`` as a label index (torchmetrics drops label ``ignore_index`` from the macro
    average when 0 <= ignore_index < L); binary/multilabel ECE bins each element's positive
    probability against its target, as torchmetrics' BinaryCalibrationError does, and the loss is
    binary cross-entropy (multiclass: cross-entropy); an IoU average with no weight at all
    (nothing counted, or no positive target for 'weighted') is 0 (zero_division) where
    torchmetrics' JaccardIndex returns NaN.
    """

    def __init__(
        self,
        task: str = "multiclass",
        num_classes: Optional[int] = None,
        num_labels: Optional[int] = None,
        top_k: Union[int, Sequence[int]] = (1,),
        ignore_index: Optional[int] = None,
        threshold: float = 0.5,
        input: str = "auto",
        confusion_matrix: Optional[bool] = None,
        beta: float = 1.0,
        device: Union[str, torch.device, None] = None,
        class_dim: int = 1,
        persistent: bool = True,
        sync_on_compute: Optional[bool] = None,
        process_group: object = None,
        sync_timeout: Union[float, datetime.timedelta, None] = None,
        thresholds: Optional[int] = None,
    ) -> None:
        super().__init__()
        config, beta = check_config(task, num_classes, num_labels, top_k, ignore_index, threshold, input,
                                    confusion_matrix, beta, thresholds)
        if isinstance(class_dim, bool) or not isinstance(class_dim, int):
            raise TypeError(f"stepscope: class_dim must be an int; got {type(class_dim).__name__}")
        if task == "binary" and class_dim != 1:
            raise ValueError("stepscope: class_dim applies to multiclass and multilabel preds; binary has no "
                             "class dimension")
        if sync_on_compute not in (None, True, False):
            raise TypeError(f"stepscope: sync_on_compute must be None, True or False; got {sync_on_compute!r}")
        self.sync_on_compute = sync_on_compute
        self.process_group = process_group
        self.sync_timeout = None if sync_timeout is None else _timeout_seconds("sync_timeout", sync_timeout)
        self._checked_config: Optional[tuple] = None  # (group, fingerprint) last checked across ranks
        self._synced_in_place = False  # sync() made the state global: compute() must not sum it again
        self._config = config  # the configuration's one form; _op_args and _cfg are derived from it
        self.beta = beta
        self.class_dim = class_dim
        self._moves_class_dim = class_dim != 1 and task != "binary"
        self._build()
        self.state: torch.Tensor
        self.register_buffer("state", torch.zeros(self._cfg.numel, dtype=torch.float64, device=device),
                             persistent=persistent)
        # The state follows the first update's device until it is placed (device=, .to(), a load).
        self._placed = device is not None

    task = _config_property("task", "``'multiclass'``, ``'binary'`` or ``'multilabel'``.")
    num_classes = _config_property("num_classes", "C (multiclass), L (multilabel) or 1 (binary).")
    top_k = _config_property("top_k", "The multiclass top-k accuracies tracked (a tuple).")
    ignore_index = _config_property("ignore_index", "The target value counted nowhere, or None.")
    threshold = _config_property("threshold", "Binary / multilabel: positive iff probability > threshold.")
    input = _config_property("input", "How predictions are read: ``'auto'``, ``'logits'`` or ``'probs'``.")
    keeps_confusion_matrix = _config_property("confusion_matrix", "Whether the C x C matrix is kept.")
    thresholds = _config_property("thresholds", "The binned AUROC / AP thresholds' count, or None.")

    def _build(self) -> None:
        """The parts derived from the configuration rather than saved (a pybind object and the op
        handle pickle to nothing)."""
        # The op's configuration arguments, built once: update() runs every step.
        self._op_args = self._config.op_args()
        self._cfg = _C.MetricsConfig(*self._op_args)
        self._op = torch.ops.stepscope.classification_update.default

    # Pickling (torch.save of a model holding one) and deepcopy (EMA / SWA copies) keep the
    # configuration and the state and rebuild the rest. A process group cannot be pickled: a
    # loaded copy reduces over the default group; a deep copy shares the original's group.
    # The configuration is pickled as plain fields, the form earlier versions wrote and read.
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for k in ("_cfg", "_op", "_op_args", "_checked_config", "_config"):
            state.pop(k, None)
        state.update({name: getattr(self._config, field) for field, name in _PICKLED.items()})
        state["process_group"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        fields = {field: state.pop(name) if name in state or field not in _PICKLED_LATER
                  else _PICKLED_LATER[field] for field, name in _PICKLED.items()}
        super().__setstate__(state)
        self._config = MetricsArgs(**fields)
        self._checked_config = None
        self._build()

    def __deepcopy__(self, memo: dict) -> "ClassificationMetrics":
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        new.process_group = self.process_group
        return new

    def _apply(self, fn: Any, recurse: bool = True) -> "ClassificationMetrics":
        out = super()._apply(keep_float64(fn), recurse)
        self._placed = True
        return out

    def _inputs(self, preds: torch.Tensor, target: torch.Tensor) -> tuple:
        if self.class_dim == 1 or self.task == "binary":
            return preds, target
        if not -preds.dim() <= self.class_dim < preds.dim():
            raise ValueError(f"stepscope: class_dim={self.class_dim} is out of range for preds of shape "
                             f"{tuple(preds.shape)}")
        # Views: the kernels read strided rows. Multilabel targets have the labels where preds do.
        if self.task == "multilabel" and target.dim() == preds.dim():
            target = target.movedim(self.class_dim, 1)
        return preds.movedim(self.class_dim, 1), target

    def _first_update(self, preds: Any, target: Any) -> None:
        """The first update of an unplaced state: the state moves to the preds' device only once the
        call has passed every check, so that a bad first call changes nothing."""
        check_tensors(preds, target)
        state = self.state.to(preds.device)
        self._run(preds, target, state)
        self.state = state
        self._placed = True

    def _run(self, preds: Any, target: Any, state: torch.Tensor) -> None:
        if self._moves_class_dim:
            check_tensors(preds, target)
            preds, target = self._inputs(preds, target)
        try:
            self._op(preds, target, state, *self._op_args)
        except (RuntimeError, NotImplementedError):
            # Off the common path: say what was wrong with the call in stepscope's words when the
            # dispatcher refused it before the op's own checks could (not a tensor, a sparse one).
            check_tensors(preds, target)
            raise

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate one batch. No host sync; raises before touching the state on bad input."""
        # Runs every step: the common case reads plain attributes only (nn.Module's __getattr__ for
        # the buffer and a torch.device per call cost microseconds here).
        if not self._placed:
            return self._first_update(preds, target)
        if self._moves_class_dim:
            return self._run(preds, target, self._buffers["state"])
        try:
            self._op(preds, target, self._buffers["state"], *self._op_args)
        except (RuntimeError, NotImplementedError):
            check_tensors(preds, target)
            raise

    def forward(self, preds: torch.Tensor, target: torch.Tensor) -> dict:
        """Accumulates the batch (as ``update``) and returns its own metrics: ``compute()``'s keys for
        this batch alone. No host sync (the health counters are in the dict, not checked)."""
        state, batch = self._batch_state(preds, target)
        state.add_(batch)
        return self._cfg.compute(batch, self.beta)

    def _batch_state(self, preds: Any, target: Any) -> tuple:
        """forward's first part: the running state (placed on the preds' device by a first call, once
        the call passed every check) and a zeroed state of the batch's own, filled by ``_run``."""
        state = self.state
        if not self._placed:
            check_tensors(preds, target)
            state = state.to(preds.device)
        batch = torch.zeros_like(state)
        self._run(preds, target, batch)
        if not self._placed:
            self.state = state
            self._placed = True
        return state, batch

    def compute(self, check: bool = True, scalars: bool = False, timeout: Any = None) -> dict:
        """All metrics as a dict of tensors on the state's device.

        Keys (multiclass/multilabel): ``accuracy`` (micro) and ``<metric>_<average>`` for metric
        in accuracy, precision, recall, f1, specificity, iou (and fbeta when beta != 1), average
        in micro, macro, weighted, per_class; ``mean_iou``; ``top<k>_accuracy`` (multiclass);
        ``confusion_matrix`` (when kept). Binary: ``accuracy``, ``precision``, ``recall``, ``f1``,
        ``specificity``, ``iou`` (and ``fbeta``), ``confusion_matrix`` [2, 2]. Always: ``loss``,
        ``ece``, ``samples``, ``nonfinite``, ``invalid_target``, ``ignored``. With ``thresholds``:
        binary ``auroc`` and ``average_precision``; multiclass/multilabel ``auroc_<average>`` and
        ``average_precision_<average>`` for average in macro, weighted, per_class (and micro for
        multilabel), torchmetrics' binned values.

        With ``check=True`` one small host read checks the counters first: ValueError if any
        target was out of range (saying how many), a warning for non-finite predictions.
        ``scalars=True`` keeps only single-number entries (no ``*_per_class``, no confusion matrix),
        as loggers such as Lightning's ``self.log_dict`` need.

        Under torch.distributed (see ``sync_on_compute``) the metrics are those of all ranks'
        data: one all_reduce of a copy of the state, the local state untouched. The first such call
        (and any after the configuration or the group changed) first compares the ranks'
        configurations with one all_gather of a small fixed-size fingerprint, and raises ValueError on
        every rank naming each field that differs and every rank's value. ``timeout`` (seconds or a
        ``timedelta``; default ``sync_timeout``): wait at most that long for the other ranks, then
        raise :class:`stepscope.distributed.CollectiveTimeoutError` naming the ranks that had not
        called ``compute()`` (without it a missing rank is waited for until the process group's own
        timeout, 30 minutes by default).
        """
        if timeout is not None:
            timeout = _timeout_seconds("timeout", timeout)
        state = self.state
        if self._should_sync():
            # A rank that saw no data still takes part, with zeros on the collective's device.
            state = state.clone() if self._placed else state.to(self._comm_device())
            self._all_reduce(state, self.process_group, timeout, "ClassificationMetrics.compute()")
        if check:
            nonfinite = self._cfg.check(state)[0]
            if nonfinite:
                warnings.warn(self._cfg.nonfinite_message(int(nonfinite)), stacklevel=2)
        out = self._cfg.compute(state, self.beta)
        if scalars:
            out = {k: v for k, v in out.items() if v.numel() == 1}
        return out

    def _should_sync(self) -> bool:
        if self.sync_on_compute is False or self._synced_in_place:
            return False
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        if self.sync_on_compute is True and not ready:
            raise RuntimeError("stepscope: sync_on_compute=True but torch.distributed is not initialised; "
                               "call torch.distributed.init_process_group first or pass sync_on_compute=None")
        return ready and dist.get_world_size(self.process_group) > 1

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        from .distributed import _comm_device

        return _comm_device(dist, self.process_group)

    def log_dict(self, prefix: str = "", check: bool = True) -> dict:
        """``compute(scalars=True)`` with each key prefixed and counts as float64 (loggers reduce
        floating values), e.g. ``self.log_dict(m.log_dict("train/"))`` in a LightningModule."""
        return {prefix + k: v if v.is_floating_point() else v.double()
                for k, v in self.compute(check=check, scalars=True).items()}

    def confusion_matrix(self, normalize: str = "none") -> torch.Tensor:
        """Confusion matrix (rows = targets): multiclass [C, C], binary [2, 2], multilabel [L, 2, 2].

        normalize: ``"none"`` (int64 counts), ``"true"`` (rows sum to 1), ``"pred"`` (columns)
        or ``"all"``.
        """
        return self._cfg.confusion_matrix(self.state, normalize)

    def reset(self) -> None:
        """Zero the state in place (stays valid inside captured CUDA graphs)."""
        self.state.zero_()
        self._synced_in_place = False

    def sync(self, process_group: Any = None, timeout: Any = None) -> None:
        """Sum the state over all ranks in place: one all_reduce of one float64 tensor (Gloo or
        NCCL); ``compute()`` then does not reduce again until ``reset()``. ``process_group``
        defaults to the one given at construction. The configuration check and ``timeout`` are
        ``compute()``'s."""
        group = process_group if process_group is not None else self.process_group
        self._all_reduce(self.state, group, timeout, "ClassificationMetrics.sync()")
        self._synced_in_place = True

    def _all_reduce(self, state: torch.Tensor, group: Any, timeout: Any, what: str) -> None:
        import torch.distributed as dist

        from .distributed import run_collective

        timeout = self.sync_timeout if timeout is None else _timeout_seconds("timeout", timeout)
        fp = fingerprint(self._config, self.beta, self._cfg.numel)
        key = group if group is not None else dist.group.WORLD
        if self._checked_config is None or self._checked_config[0] is not key or self._checked_config[1] != fp:
            mine = torch.tensor(fp, dtype=torch.int64, device=state.device)
            world = dist.get_world_size(group)
            rows = torch.empty(world * FP_WORDS, dtype=torch.int64, device=state.device)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            run_collective(lambda async_op: gather(rows, mine, group=group, async_op=async_op), group, timeout, what)
            problem = config_mismatch(rows.view(world, FP_WORDS).tolist(), what)
            if problem:
                raise ValueError(problem)
            self._checked_config = (key, fp)
        run_collective(lambda async_op: dist.all_reduce(state, op=dist.ReduceOp.SUM, group=group, async_op=async_op),
                       group, timeout, what)

    def _config_dict(self) -> dict:
        return self._config.as_dict()

    # state_dict: nn.Module's, with the configuration as extra state (``_extra_state``); a load
    # checks it before any tensor is copied.
    def get_extra_state(self) -> dict:
        return self._config_dict()

    def set_extra_state(self, state: Any) -> None:
        self._check_config(state)

    def _check_config(self, config: Any) -> None:
        if config != self._config_dict():
            raise ValueError(f"stepscope: state_dict was saved with config {config}, this object has "
                             f"{self._config_dict()}")

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """nn.Module's, also taking the ``{"config", "state"}`` dicts saved by earlier versions."""
        if "config" in state_dict and "state" in state_dict and "_extra_state" not in state_dict:
            state_dict = {"state": state_dict["state"], "_extra_state": state_dict["config"]}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        if prefix + "_extra_state" in state_dict:
            self._check_config(state_dict[prefix + "_extra_state"])
        check_loaded_state(state_dict.get(prefix + "state"), self._cfg.numel)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._placed = True
        self._synced_in_place = False

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config_dict().items())
