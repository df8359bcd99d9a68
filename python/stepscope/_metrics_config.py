"""ClassificationMetrics' configuration: its one form (a frozen MetricsArgs), the checks that build it,
and the fingerprint ranks compare before summing their states. Private: stepscope.metrics uses it."""

from __future__ import annotations

import dataclasses
import operator
import struct
import warnings
from typing import Any, Optional

import torch

from . import _C

TASKS = dict(_C.TASKS)  # name -> the op's encoding, as C++ defines it
INPUTS = dict(_C.INPUT_KINDS)


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


def check_tensors(preds: Any, target: Any) -> None:
    """What the dispatcher would refuse before the op's own checks, said in stepscope's words."""
    for name, t in (("preds", preds), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"stepscope: {name} must be a torch.Tensor; got {type(t).__name__} (convert it with "
                            f"torch.as_tensor first)")
        if t.layout != torch.strided:
            raise TypeError(f"stepscope: {name} must be a dense (torch.strided) tensor; got layout {t.layout} "
                            f"(call .to_dense() first)")


@dataclasses.dataclass(frozen=True)
class MetricsArgs:
    """What decides the state's layout and meaning: the update op's configuration arguments by name
    (the op and _C.MetricsConfig take ``op_args()``; the state_dict's extra state is ``as_dict()``)."""

    task: str
    num_classes: int  # multilabel: the number of labels; binary: 1
    top_k: tuple
    ignore_index: Optional[int]
    threshold: float
    input: str
    confusion_matrix: bool
    thresholds: Optional[int] = None  # binned AUROC / AP; None: off

    def op_args(self) -> tuple:
        return (TASKS[self.task], self.num_classes, list(self.top_k), self.ignore_index, self.threshold,
                INPUTS[self.input], self.confusion_matrix, self.thresholds or 0)

    def as_dict(self) -> dict:
        d = {**dataclasses.asdict(self), "top_k": list(self.top_k)}
        if self.thresholds is None:  # the form saved before thresholds existed, which loads unchanged
            del d["thresholds"]
        return d


def check_config(task: Any, num_classes: Any, num_labels: Any, top_k: Any, ignore_index: Any, threshold: Any,
                 input: Any, confusion_matrix: Any, beta: Any,
                 thresholds: Any = None) -> tuple[MetricsArgs, float]:
    """ClassificationMetrics' configuration arguments, checked where they enter: (MetricsArgs, beta)."""
    if task not in TASKS:
        raise ValueError(f"stepscope: task must be one of {sorted(TASKS)}; got {task!r}")
    if input not in INPUTS:
        raise ValueError(f"stepscope: input must be one of {sorted(INPUTS)}; got {input!r}")
    if task == "multiclass":
        if num_classes is None:
            raise ValueError("stepscope: task='multiclass' needs num_classes")
        n = _whole("num_classes", num_classes, "a positive int (the number of classes)")
        if n == 1:  # kept working (one class is well defined), but it is nearly always binary logits
            warnings.warn("stepscope: task='multiclass' with num_classes=1: every prediction is class 0, "
                          "accuracy is 1 whatever the logits; one logit per sample is task='binary'",
                          UserWarning, stacklevel=3)
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
    keeps = bool(confusion_matrix) and task == "multiclass"
    if thresholds is not None:
        thresholds = _whole("thresholds", thresholds, "None or an int >= 2 (the count of linspace(0, 1, .) "
                            "thresholds)")
        if thresholds < 2:
            raise ValueError(f"stepscope: thresholds must be None or an int >= 2; got {thresholds}")
    return MetricsArgs(task, n, top_k, ignore_index, threshold, input, keeps, thresholds), beta


# The configuration that decides what the state's sums mean, as a fixed-size int64 vector, so that
# ranks can compare theirs with one all_gather before summing states (a mismatch would be summed
# silently, or abort inside the backend when the sizes differ).
FP_MAGIC = 0x73746570  # "step": a rank running another collective here shows as a mismatch
FP_WORDS = 12 + _C.MAX_TOP_K
FP_FIELDS = ("task", "num_classes", "top_k", "ignore_index", "threshold", "input", "confusion_matrix", "beta",
             "thresholds")


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _unbits(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


def fingerprint(c: MetricsArgs, beta: float, numel: int) -> tuple:
    ks = list(c.top_k) + [0] * (_C.MAX_TOP_K - len(c.top_k))
    ig = c.ignore_index
    return (FP_MAGIC, TASKS[c.task], c.num_classes, len(c.top_k), *ks, ig is not None, 0 if ig is None else ig,
            _bits(c.threshold), INPUTS[c.input], c.confusion_matrix, _bits(beta), c.thresholds or 0, numel)


def _decode(fp: list) -> dict:
    if fp[0] != FP_MAGIC:
        return {f: "?" for f in FP_FIELDS}
    k = _C.MAX_TOP_K
    tasks = {v: n for n, v in TASKS.items()}
    inputs = {v: n for n, v in INPUTS.items()}
    return {"task": tasks.get(fp[1], fp[1]), "num_classes": fp[2], "top_k": tuple(fp[4:4 + fp[3]]),
            "ignore_index": fp[5 + k] if fp[4 + k] else None, "threshold": _unbits(fp[6 + k]),
            "input": inputs.get(fp[7 + k], fp[7 + k]), "confusion_matrix": bool(fp[8 + k]),
            "beta": _unbits(fp[9 + k]), "thresholds": fp[10 + k] or None}


def config_mismatch(rows: list, what: str) -> Optional[str]:
    configs = [_decode(r) for r in rows]
    diffs = []
    for f in FP_FIELDS:
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
