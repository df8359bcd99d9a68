"""Classification metrics accumulated on the device by one fused kernel per update."""

from __future__ import annotations

import copy
import datetime
import math
import operator
import struct
import warnings
from typing import Any, Optional, Sequence, Union

import torch

from . import _C

_TASKS = dict(_C.TASKS)  # name -> the op's encoding, as C++ defines it
_INPUTS = dict(_C.INPUT_KINDS)


def _whole(name: str, value: Any, accepts: str) -> int:
    # operator.index takes ints and integer-like objects (numpy ints), never 2.5 or "3"; bool is an
    # int to Python but never a count or a label here.
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"stepscope: {name} must be {accepts}; got {type(value).__name__} {value!r}") from None


def _real(name: str, value: Any, accepts: str) -> float:
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"stepscope: {name} must be {accepts}; got {type(value).__name__} {value!r}")
    return float(value)


def _top_k(top_k: Any) -> tuple:
    accepts = f"an int or a sequence of at most {_C.MAX_TOP_K} distinct ints"
    if isinstance(top_k, (str, bytes)) or not hasattr(top_k, "__iter__"):
        top_k = (_whole("top_k", top_k, accepts),)
    ks = tuple(_whole("top_k", k, accepts) for k in top_k)
    if len(set(ks)) != len(ks):
        raise ValueError(f"stepscope: top_k must be {accepts}; got {list(ks)} (a value repeats)")
    return ks


def _check_tensors(preds: Any, target: Any) -> None:
    """What the dispatcher would refuse before the op's own checks, said in stepscope's words."""
    for name, t in (("preds", preds), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"stepscope: {name} must be a torch.Tensor; got {type(t).__name__} (convert it with "
                            f"torch.as_tensor first)")
        if t.layout != torch.strided:
            raise TypeError(f"stepscope: {name} must be a dense (torch.strided) tensor; got layout {t.layout} "
                            f"(call .to_dense() first)")


def _timeout_seconds(name: str, timeout: Any) -> float:
    from .distributed import timeout_seconds

    return timeout_seconds(name, timeout)


# The configuration that decides what the state's sums mean, as a fixed-size int64 vector, so that
# ranks can compare theirs with one all_gather before summing states (a mismatch would be summed
# silently, or abort inside the backend when the sizes differ).
_FP_MAGIC = 0x73746570  # "step": a rank running another collective here shows as a mismatch
_FP_WORDS = 11 + _C.MAX_TOP_K
_FP_FIELDS = ("task", "num_classes", "top_k", "ignore_index", "threshold", "input", "confusion_matrix", "beta")


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _unbits(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


def _fingerprint(m: "ClassificationMetrics") -> tuple:
    ks = list(m.top_k) + [0] * (_C.MAX_TOP_K - len(m.top_k))
    ig = m.ignore_index
    return (_FP_MAGIC, _TASKS[m.task], m.num_classes, len(m.top_k), *ks, ig is not None, 0 if ig is None else ig,
            _bits(m.threshold), _INPUTS[m.input], m.keeps_confusion_matrix, _bits(m.beta), m._cfg.numel)


def _decode(fp: list) -> dict:
    if fp[0] != _FP_MAGIC:
        return {f: "?" for f in _FP_FIELDS}
    k = _C.MAX_TOP_K
    tasks = {v: n for n, v in _TASKS.items()}
    inputs = {v: n for n, v in _INPUTS.items()}
    return {"task": tasks.get(fp[1], fp[1]), "num_classes": fp[2], "top_k": tuple(fp[4:4 + fp[3]]),
            "ignore_index": fp[5 + k] if fp[4 + k] else None, "threshold": _unbits(fp[6 + k]),
            "input": inputs.get(fp[7 + k], fp[7 + k]), "confusion_matrix": bool(fp[8 + k]),
            "beta": _unbits(fp[9 + k])}


def _config_mismatch(rows: list, what: str) -> Optional[str]:
    configs = [_decode(r) for r in rows]
    diffs = []
    for f in _FP_FIELDS:
        by_value: dict = {}  # repr -> ranks, in rank order: compact for a large world
        for r, c in enumerate(configs):
            by_value.setdefault(repr(c[f]), []).append(r)
        if len(by_value) > 1:
            diffs.append(f + ": " + ", ".join(f"{v} on rank(s) {ranks}" for v, ranks in by_value.items()))
    if not diffs and len({tuple(r) for r in rows}) > 1:
        diffs.append("state size: " + ", ".join(f"{row[-1]} on rank {r}" for r, row in enumerate(rows)))
    if not diffs:
        return None
    return (f"stepscope: {what}: the ClassificationMetrics of the ranks are configured differently, so their "
            f"states cannot be summed; " + "; ".join(diffs) + " (ranks are numbered within the process group)")


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

    ``update`` launches one kernel (two for binary/multilabel ``"auto"`` on CUDA) and never
    synchronises with the host; it runs under ``torch.compile(fullgraph=True)`` and CUDA graph
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
    ) -> None:
        super().__init__()
        if task not in _TASKS:
            raise ValueError(f"stepscope: task must be one of {sorted(_TASKS)}; got {task!r}")
        if input not in _INPUTS:
            raise ValueError(f"stepscope: input must be one of {sorted(_INPUTS)}; got {input!r}")
        if task == "multiclass":
            if num_classes is None:
                raise ValueError("stepscope: task='multiclass' needs num_classes")
            n = _whole("num_classes", num_classes, "a positive int (the number of classes)")
        elif task == "multilabel":
            if num_labels is None:
                raise ValueError("stepscope: task='multilabel' needs num_labels")
            n = _whole("num_labels", num_labels, "a positive int (the number of labels)")
        else:
            n = 1
        top_k = _top_k(top_k)
        if task != "multiclass" and top_k == (1,):
            top_k = ()
        if confusion_matrix is None:
            confusion_matrix = task == "multiclass" and n <= _C.DEFAULT_CONFMAT_LIMIT
        beta = _real("beta", beta, "a finite number > 0")
        _C.check_beta(beta)
        threshold = _real("threshold", threshold, "a number in [0, 1]")
        if ignore_index is not None:
            ignore_index = _whole("ignore_index", ignore_index, "an int (a target value to skip) or None")
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
        self.task = task
        self.num_classes = n
        self.top_k = top_k
        self.ignore_index = ignore_index
        self.threshold = threshold
        self.input = input
        self.keeps_confusion_matrix = bool(confusion_matrix) and task == "multiclass"
        self.beta = beta
        self.class_dim = class_dim
        self._moves_class_dim = class_dim != 1 and task != "binary"
        self._build()
        self.state: torch.Tensor
        self.register_buffer("state", torch.zeros(self._cfg.numel, dtype=torch.float64, device=device),
                             persistent=persistent)
        # The state follows the first update's device until it is placed (device=, .to(), a load).
        self._placed = device is not None

    def _build(self) -> None:
        """The parts that are rebuilt from the configuration rather than saved (a pybind object and
        the op handle pickle to nothing)."""
        self._cfg = _C.MetricsConfig(
            _TASKS[self.task], self.num_classes, list(self.top_k), self.ignore_index, self.threshold,
            _INPUTS[self.input], self.keeps_confusion_matrix,
        )
        # The op's scalar arguments, built once: update() runs every step.
        self._op_args = (_TASKS[self.task], self.num_classes, list(self.top_k), self.ignore_index, self.threshold,
                         _INPUTS[self.input], self.keeps_confusion_matrix)
        self._op = torch.ops.stepscope.classification_update.default

    # Pickling (torch.save of a model holding one) and deepcopy (EMA / SWA copies) keep the
    # configuration and the state and rebuild the rest. A process group cannot be pickled: a
    # loaded copy reduces over the default group; a deep copy shares the original's group.
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for k in ("_cfg", "_op", "_op_args", "_checked_config"):
            state.pop(k, None)
        state["process_group"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._checked_config = None
        self._build()

    def __deepcopy__(self, memo: dict) -> "ClassificationMetrics":
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        new.process_group = self.process_group
        return new

    def _apply(self, fn: Any, recurse: bool = True) -> "ClassificationMetrics":
        def keep_float64(t: torch.Tensor) -> torch.Tensor:
            # A parent's .half() or .to(dtype) reaches buffers too; counts must stay float64.
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)

        out = super()._apply(keep_float64, recurse)
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
        _check_tensors(preds, target)
        state = self.state.to(preds.device)
        self._run(preds, target, state)
        self.state = state
        self._placed = True

    def _run(self, preds: Any, target: Any, state: torch.Tensor) -> None:
        if self._moves_class_dim:
            _check_tensors(preds, target)
            preds, target = self._inputs(preds, target)
        try:
            self._op(preds, target, state, *self._op_args)
        except (RuntimeError, NotImplementedError):
            # Off the common path: say what was wrong with the call in stepscope's words when the
            # dispatcher refused it before the op's own checks could (not a tensor, a sparse one).
            _check_tensors(preds, target)
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
            _check_tensors(preds, target)
            raise

    def forward(self, preds: torch.Tensor, target: torch.Tensor) -> dict:
        """Accumulates the batch (as ``update``) and returns its own metrics: ``compute()``'s keys for
        this batch alone. No host sync (the health counters are in the dict, not checked)."""
        state = self.state
        if not self._placed:
            _check_tensors(preds, target)
            state = state.to(preds.device)
        batch = torch.zeros_like(state)
        self._run(preds, target, batch)
        if not self._placed:
            self.state = state
            self._placed = True
        state.add_(batch)
        return self._cfg.compute(batch, self.beta)

    def compute(self, check: bool = True, scalars: bool = False, timeout: Any = None) -> dict:
        """All metrics as a dict of tensors on the state's device.

        Keys (multiclass/multilabel): ``accuracy`` (micro) and ``<metric>_<average>`` for metric
        in accuracy, precision, recall, f1, specificity, iou (and fbeta when beta != 1), average
        in micro, macro, weighted, per_class; ``mean_iou``; ``top<k>_accuracy`` (multiclass);
        ``confusion_matrix`` (when kept). Binary: ``accuracy``, ``precision``, ``recall``, ``f1``,
        ``specificity``, ``iou`` (and ``fbeta``), ``confusion_matrix`` [2, 2]. Always: ``loss``,
        ``ece``, ``samples``, ``nonfinite``, ``invalid_target``, ``ignored``.

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

        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

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
        fp = _fingerprint(self)
        key = group if group is not None else dist.group.WORLD
        if self._checked_config is None or self._checked_config[0] is not key or self._checked_config[1] != fp:
            mine = torch.tensor(fp, dtype=torch.int64, device=state.device)
            world = dist.get_world_size(group)
            rows = torch.empty(world * _FP_WORDS, dtype=torch.int64, device=state.device)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            run_collective(lambda async_op: gather(rows, mine, group=group, async_op=async_op), group, timeout, what)
            problem = _config_mismatch(rows.view(world, _FP_WORDS).tolist(), what)
            if problem:
                raise ValueError(problem)
            self._checked_config = (key, fp)
        run_collective(lambda async_op: dist.all_reduce(state, op=dist.ReduceOp.SUM, group=group, async_op=async_op),
                       group, timeout, what)

    def _config_dict(self) -> dict:
        return {
            "task": self.task, "num_classes": self.num_classes, "top_k": list(self.top_k),
            "ignore_index": self.ignore_index, "threshold": self.threshold, "input": self.input,
            "confusion_matrix": self.keeps_confusion_matrix,
        }

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
        state = state_dict.get(prefix + "state")
        if state is not None and (state.dtype != torch.float64 or state.shape != (self._cfg.numel,)):
            raise ValueError(f"stepscope: state must be float64 [{self._cfg.numel}]; got {state.dtype} "
                             f"{tuple(state.shape)}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._placed = True
        self._synced_in_place = False

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config_dict().items())
