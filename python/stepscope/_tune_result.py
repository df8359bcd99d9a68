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
