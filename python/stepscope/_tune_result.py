"""A tuner's result (:mod:`stepscope.tune`), its text and its file: no torch, so that
``python -m stepscope tune-report FILE`` reads it anywhere."""

from __future__ import annotations

import json
from typing import Any, Optional

from ._files import _read_json
from .run import PathLike, _atomic_write

FORMAT = "stepscope-tune"


class TuneResult(dict):
    """A tuner's answer: ``rows`` (one per configuration tried), ``best`` (what to use), ``baseline``
    and ``kind``. ``summary()`` is the table; ``save(path)`` writes it as JSON."""

    def summary(self) -> str:
        keys = self["columns"]
        rows = [keys] + [[_cell(r.get(k)) for k in keys] for r in self["rows"]]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(keys))]
        lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        return "\n".join(lines + [f"best: {self['best_name']} {json.dumps(self['best'], default=str)}",
                                  f"method: {self['method']}"])

    def __str__(self) -> str:
        return self.summary()

    def plot(self, path: Any) -> None:
        """The speedups as a PNG bar chart (:func:`plot_result`; needs matplotlib)."""
        plot_result(self, path)

    def save(self, path: Any) -> None:
        _atomic_write(path, json.dumps({"format": FORMAT, **self}, default=str, indent=1).encode())


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (tuple, list)):
        return "-".join(_cell(x) for x in v)
    return str(v)


def load_result(path: PathLike, *, max_bytes: Optional[int] = None) -> TuneResult:
    """Reads a result written by ``TuneResult.save`` (bounded and checked as ``stepscope.load``
    reads runs); ValueError naming the file for one that is not a tuner's result or is damaged."""
    p, data = _read_json(path, "stepscope tune result", max_bytes)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"stepscope: {p} is not a tuner's result (no \"format\": \"{FORMAT}\"); write one with "
                         "TuneResult.save()")
    need = {"rows": list, "columns": list, "best": dict, "method": str}
    bad = [k for k, t in need.items() if not isinstance(data.get(k), t)]
    if bad or not all(isinstance(r, dict) for r in data["rows"]):
        raise ValueError(f"stepscope: {p} is a damaged tuner's result (bad {', '.join(bad) or 'rows'})")
    data.pop("format")
    data.setdefault("best_name", None)
    return TuneResult(data)


def plot_result(res: dict, path: PathLike) -> None:
    """A bar chart of a result's speedups over its baseline (the spread as error bars; samples/s
    against the best for ``batch_size``), as a PNG. Needs matplotlib (``pip install 'stepscope[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("stepscope: plotting a tuner's result needs matplotlib: pip install 'stepscope[plot]'") from e
    key = "of_best" if res.get("kind") == "batch_size" else "speedup"
    rows = [r for r in res["rows"] if isinstance(r.get(key), (int, float))]
    names, vals = [str(r["name"]) for r in rows], [float(r[key]) for r in rows]
    err = None
    if res.get("kind") == "step":  # the spread of the step time, as a spread of the speedup
        base = next((r for r in rows if r["name"] == "baseline"), None)
        if base is not None:
            b = base["step_ms"]
            err = [[max(0.0, v - b / r["spread_ms"][1]) for v, r in zip(vals, rows)],  # rounding: never < 0
                   [max(0.0, b / r["spread_ms"][0] - v) for v, r in zip(vals, rows)]]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    colors = ["#c62828" if r.get("ok") is False else "#4E79A7" for r in rows]
    ax.barh(names, vals, xerr=err, color=colors)
    ax.axvline(1.0, color="#555", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("samples/s over the best" if key == "of_best" else f"speedup over {res.get('baseline')}")
    ax.set_title(f"stepscope tune.{res.get('kind')}: best {res.get('best_name')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
