"""What the framework callbacks share: batch sizes, logged numbers, the end-of-training text."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Optional, Union

import torch

from ..report import PARTITION

#: What the callbacks log by default (names without the prefix): the step's p50 and the shares of
#: the phases a fix would target, and the headline metrics (``f1`` for binary, ``f1_macro`` for
#: multiclass and multilabel; ``mse``, ``mae`` and ``r2`` for a RegressionMetrics).
#: ``log_keys="all"`` logs every phase's p50 and share and every scalar metric (about 40 names).
LOG_KEYS = ("step_p50_ms", "data_share", "forward_share", "backward_share", "optimizer_share",
            "accuracy", "f1_macro", "f1", "loss", "mse", "mae", "r2", "grad_norm", "mfu", "tokens_per_s")

#: The user phase that times the callbacks' own work (reports, metric reads, the framework's log).
OWN_PHASE = "stepscope_log"


def phase_scalars(rep: dict, prefix: str = "", keys: Optional[frozenset] = None) -> dict:
    """p50 (ms) and share of the step of each partition phase in ``rep``, and with health the
    gradient norm (``grad_norm``: the last step's, ``grad_norm_p50``, ``nonfinite_steps``), with
    throughput ``mfu`` and ``tokens_per_s`` where known, as plain floats; only the names in ``keys``
    (all when None)."""
    out = {}
    for ph in PARTITION + ("step",):
        e = rep["phases"][ph]
        if e["host"]["count"] == 0:
            continue
        out[f"{ph}_p50_ms"] = e["host"]["p50"] * 1e3
        if ph != "step" and e["share_host"] is not None:
            out[f"{ph}_share"] = e["share_host"]
    health = rep.get("health")
    if health and health["grad_norm"]["count"]:  # training health: the last step's, and the p50
        out["grad_norm"] = health["grad_norm"]["last"]
        out["grad_norm_p50"] = health["grad_norm"]["p50"]
        out["nonfinite_steps"] = float(health["nonfinite"]["steps"])
    tp = rep.get("throughput") or {}
    mfu = tp["mfu_device"] if tp.get("mfu_device") is not None else tp.get("mfu")
    if mfu is not None:
        out["mfu"] = mfu
    if tp.get("tokens_per_s") is not None:
        out["tokens_per_s"] = tp["tokens_per_s"]
    return pick(out, keys, prefix)


def closing_text(mon: Any, note: str = "") -> str:
    """The summary (with its diagnosis) and a note on what the numbers mean."""
    return mon.summary() + ("\n" + note if note else "")


def check_log_keys(keys: Union[str, Iterable[str], None]) -> Optional[frozenset]:
    """``log_keys`` as the set of names to log; None: all of them."""
    if keys == "all":
        return None
    if keys is None or keys == "short":
        return frozenset(LOG_KEYS)
    if isinstance(keys, str) or not isinstance(keys, Iterable):
        raise TypeError(f"stepscope: log_keys must be \"short\", \"all\" or a list of names; got {keys!r}")
    keys = tuple(keys)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"stepscope: log_keys must name at least one scalar; got {keys!r}")
    return frozenset(keys)


def pick(scalars: dict, keys: Optional[frozenset], prefix: str) -> dict:
    """The entries of ``scalars`` named in ``keys`` (all when None), with ``prefix``."""
    return {prefix + k: v for k, v in scalars.items() if keys is None or k in keys}


@contextlib.contextmanager
def own_work(mon: Any) -> Iterator[None]:
    """Times a callback's own work as the user phase :data:`OWN_PHASE` and keeps it out of the
    training step: it runs between steps, where it would otherwise be the next step's ``data``
    (and feed the input-bound and jitter rules). The pause is the Monitor's eval bracket, so
    ``eval_forward`` counts it too."""
    if mon is None or not mon.attached:
        yield
        return
    mon.mark("eval_begin")
    try:
        with mon.phase(OWN_PHASE):
            yield
    finally:
        mon.mark("eval_end")


def check_metrics(name: str, m: Any) -> None:
    """The callbacks' ``metrics=``: a ClassificationMetrics, a RegressionMetrics or None."""
    from ..metrics import ClassificationMetrics
    from ..regression import RegressionMetrics

    if m is not None and not isinstance(m, (ClassificationMetrics, RegressionMetrics)):
        raise TypeError(f"stepscope: {name} must be a stepscope.ClassificationMetrics, a "
                        f"stepscope.RegressionMetrics or None; got {type(m).__name__}")


def run_total(m: Any) -> Any:
    """An empty metrics object configured as ``m``: the whole run's metrics, into which :func:`fold`
    puts each interval's state before ``m`` is reset."""
    from ..metrics import ClassificationMetrics
    from ..regression import RegressionMetrics

    if isinstance(m, RegressionMetrics):
        return RegressionMetrics(m.num_outputs, persistent=False, sync_on_compute=m.sync_on_compute,
                                 process_group=m.process_group)

    size = {"num_classes": m.num_classes} if m.task == "multiclass" else (
        {"num_labels": m.num_classes} if m.task == "multilabel" else {})
    return ClassificationMetrics(m.task, **size, top_k=m.top_k or (1,), ignore_index=m.ignore_index,
                                 threshold=m.threshold, input=m.input,
                                 confusion_matrix=m.keeps_confusion_matrix, beta=m.beta,
                                 class_dim=m.class_dim, persistent=False, sync_on_compute=m.sync_on_compute,
                                 process_group=m.process_group, thresholds=m.thresholds)


def fold(total: Any, m: Any) -> None:
    """Puts ``m``'s state into ``total`` (counts add; regression moments merge by their pairwise
    rule; on the state's device, no host sync) and resets ``m``."""
    from .. import _C
    from ..regression import RegressionMetrics

    if total.state.device != m.state.device:
        total.to(m.state.device)
    if isinstance(m, RegressionMetrics):
        _C.regression_merge(total.state, m.state)
    else:
        total.state.add_(m.state)
    m.reset()


def floats(scalars: dict) -> dict:
    """One-element tensors as floats, read from the device in one copy."""
    if not scalars:
        return {}
    values = torch.stack([v.reshape(()).to(torch.float64) for v in scalars.values()]).tolist()
    return dict(zip(scalars, values))
