"""Where people look at a Monitor: the files it writes (trace, JSON, CSV, HTML), its inline view in
Jupyter, and a progress bar over the loop with the step's live figures. A mixin of
:class:`stepscope.Monitor`."""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Iterator, Optional, Union

from . import export as _export
from . import report as _report
from . import run as _run

_Path = Union[str, "os.PathLike[str]"]

#: The metrics a progress bar shows when a ``ClassificationMetrics`` is given, the first ones present.
PROGRESS_METRICS = ("accuracy", "f1_macro", "f1", "loss", "mse", "mae", "r2")


def progress_postfix(rep: dict, values: Optional[dict] = None) -> dict:
    """The progress bar's figures from a report: ``step_ms`` (p50), ``samples/s``, ``tokens/s`` and
    ``MFU`` when known, ``top`` (the largest phase and its share of the p50 step) and the metrics'
    one-element ``values`` (PROGRESS_METRICS, at most three). Plain numbers and strings."""
    out: dict = {}
    step = rep["phases"]["step"]["host"]
    if not step["count"]:
        return {"step": "warm-up"}
    out["step_ms"] = f"{step['p50'] * 1e3:.3g}"
    if rep.get("samples_per_s"):
        out["samples/s"] = f"{rep['samples_per_s']:.4g}"
    tp = rep.get("throughput") or {}
    if tp.get("tokens_per_s"):
        out["tokens/s"] = f"{tp['tokens_per_s']:.4g}"
    mfu = tp.get("mfu_device") if tp.get("mfu_device") is not None else tp.get("mfu")
    if mfu is not None:
        out["MFU"] = f"{100 * mfu:.0f}%"
    shares = {p: rep["phases"][p].get("share_host") for p in _report.partition()}
    shares = {p: s for p, s in shares.items() if s is not None}
    if shares:
        top = max(shares, key=shares.__getitem__)
        out["top"] = f"{top} {100 * shares[top]:.0f}%"
    shown = 0
    for k in PROGRESS_METRICS:
        v = (values or {}).get(k)
        if v is not None and shown < 3:
            out[k] = f"{_scalar(v):.4g}"
            shown += 1
    return out


def _scalar(v: Any) -> float:
    item = getattr(v, "item", None)
    return float(item()) if item is not None else float(v)


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class Views:
    """The Monitor's exports, inline view and progress bar."""

    def export_trace(self, path: _Path) -> None:
        """Writes the ring of recent steps as a Chrome trace-event file for Perfetto or
        chrome://tracing (gzip'd when ``path`` ends in ``.gz``); see :func:`stepscope.export.trace_events`.

            mon.export_trace("run.trace.json.gz")
        """
        _export.write_trace(self, path)

    def save(self, path: _Path) -> None:
        """Writes the report, the ring of recent steps, its diagnosis, the phase table, build info
        and versions as JSON (:func:`stepscope.run.save`); :func:`stepscope.load` reads it back.

            mon.save("run.json"); print(stepscope.load("run.json").summary())
        """
        _run.save(self, path)

    def to_csv(self, path: _Path) -> None:
        """One CSV row per step in the ring; see :func:`stepscope.export.write_csv`."""
        _export.write_csv(self, path)

    def to_html(self, path: _Path, metrics: Optional[dict] = None) -> None:
        """One self-contained HTML page of the run (summary, findings, charts, health, throughput,
        ``metrics`` when given), readable offline; see :func:`stepscope.export.write_html`."""
        _export.write_html(self, path, metrics)

    def _repr_html_(self) -> str:
        # Jupyter: the HTML report's content inline (nothing before the first attach).
        if getattr(self, "_tl", None) is None:
            return "<p>stepscope Monitor: nothing recorded yet (attach it first)</p>"
        return _export.html_report(self, fragment=True)

    def progress(self, iterable: Iterable, total: Optional[int] = None, *, every: int = 20,
                 metrics: Any = None, **tqdm_kwargs: Any) -> Iterator:
        """Wraps the loop's iterable (a DataLoader) in a tqdm bar whose postfix shows the p50 step
        time, samples/s, tokens/s and MFU when known, the largest phase's share and, with
        ``metrics`` (a ``ClassificationMetrics``), its accuracy / F1 / loss::

            for x, y in mon.progress(loader, metrics=metrics):
                ...

        The figures are read every ``every`` items (a report built on the host from the C
        statistics: no device read, except ``metrics.compute()``, the metrics' one host read, on
        those items only); the other items cost the bar's own update. Without tqdm installed, the
        same figures go every ``every`` items to the ``"stepscope"`` logger at INFO.
        """
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"stepscope: progress(every=...) must be an int >= 1; got {every!r}")
        if metrics is not None and not callable(getattr(metrics, "compute", None)):
            raise TypeError("stepscope: progress(metrics=...) needs an object with compute(); got "
                            f"{type(metrics).__name__}")
        return _progress(self, iterable, total, every, metrics, tqdm_kwargs)


def _figures(mon: Any, metrics: Any) -> dict:
    rep = mon._local_report(health=False)
    values = metrics.compute() if metrics is not None else None
    return progress_postfix(rep, values)


def _progress(mon: Any, iterable: Iterable, total: Optional[int], every: int, metrics: Any,
              kw: dict) -> Iterator:
    tqdm = _tqdm()
    if tqdm is None:
        log = logging.getLogger("stepscope")
        for i, item in enumerate(iterable, 1):
            yield item
            if i % every == 0 and mon._tl is not None:
                log.info("step %d: %s", mon.steps, ", ".join(f"{k} {v}" for k, v in _figures(mon, metrics).items()))
        return
    bar = tqdm(iterable, total=total, **kw)
    try:
        for i, item in enumerate(bar, 1):
            yield item
            if i % every == 0 and mon._tl is not None:
                bar.set_postfix(_figures(mon, metrics), refresh=False)
    finally:
        bar.close()
