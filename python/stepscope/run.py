"""A run as a file: the run schema (``FORMAT``, ``SCHEMA_VERSION`` and the reading of older
schemas), :class:`SavedRun`, :func:`run_data`, :func:`save` and :func:`load`, and the file I/O
they rest on (atomic writes, bounded and checked reads, in ``_files.py``).

    mon.save("run.json")                     # report + ring of recent steps + diagnosis + versions
    run = stepscope.load("run.json")         # JSON only: safe to open a file from anyone
    print(run.summary())                     # the same table as mon.summary()

The *run data* is one plain dict (what :func:`save` writes): a live Monitor is turned into it, a
loaded file already is it, and every export (:mod:`stepscope.export`) reads it. It carries the
phase table (``_C.PHASES``) it was recorded with, so a saved run is read, summarised and
plotted with neither torch nor the built extension: this module imports neither at module level.

Every file is written atomically and read as one from anyone may be (``_files.py``).
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from typing import Any, Optional

from . import diagnose as _diagnose
from . import report as _report
# The file I/O (re-exported: MAX_READ_BYTES is documented here, the exports write through these).
from ._files import (MAX_READ_BYTES, PathLike, _atomic_write, _check_max_bytes, _check_tree,  # noqa: F401
                     _compress, _encode, _finite, _gc_paused, _is_num, _os_error, _read_bytes, _read_json)

FORMAT = "stepscope.run"
# 2: report.steps counts warm-up steps too, report.steady_steps the others (1 had steps = steady).
# 3: the run carries its phase table (``phase_table``: _C.PHASES), read without the extension.
SCHEMA_VERSION = 3

# ------------------------------------------------------------------------------------- run data
def _rank() -> int:
    torch = sys.modules.get("torch")  # never import torch here: a saved run is read without it
    if torch is None:
        return 0
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def nvtx_colors(phases: Any) -> dict:
    """NVTX phase name -> "#RRGGBB", from a phase table (``_C.PHASES`` or a run's saved one)."""
    return {p["nvtx_name"]: "#%06X" % (p["color"] & 0xFFFFFF) for p in phases}


_SPAN_KEYS = ("spans", "user_spans", "module_spans", "device_spans")


def _ring_join(rep: dict) -> tuple:
    """What the Timeline's ring writers (``_C.Timeline.ring_json``, ``trace_events_json``,
    ``ring_csv``) join to the ring's records, from a report: the (step, value) pairs of the gradient
    norm and the loss, then the FLOPs per step, the peak FLOP/s and tokens per sample (0: unknown)."""
    health, tp = rep.get("health") or {}, rep.get("throughput") or {}
    return (health.get("recent") or [], health.get("recent_loss") or [], float(tp.get("flops_per_step") or 0),
            float(tp.get("peak_flops") or 0), float(tp.get("tokens_per_sample") or 0))


def _ring_json(mon: Any, rep: dict) -> bytes:
    """The ring as a run file's ``recent_steps`` JSON array, written by the Timeline in C++
    (``csrc/timing/ring_json.h``: each step's grad_norm and loss joined from the report's health,
    non-finite numbers as null). A 4096-step ring takes about 16 ms here, where building it through
    Python objects took about 100 ms and json.dumps as much again."""
    return mon._tl.ring_json(*_ring_join(rep)[:2])


def _monitor_data(mon: Any) -> dict:
    from . import _C, __version__

    with _gc_paused():
        rep = mon.report()
        data = _monitor_fields(mon, rep, _C, __version__)
        data["recent_steps"] = json.loads(_ring_json(mon, rep))
    return data


def _monitor_json(mon: Any) -> bytes:
    """:func:`_monitor_data` as JSON text, the ring's array spliced in as the Timeline wrote it."""
    from . import _C, __version__

    with _gc_paused():
        rep = mon.report()
        data = _monitor_fields(mon, rep, _C, __version__)
        head = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    return head[:-1] + b',"recent_steps":' + _ring_json(mon, rep) + b"}"


def versions(version: str) -> dict:
    """The versions a run file records (stepscope, torch, Python, the platform)."""
    torch = sys.modules.get("torch")
    return {"stepscope": version, "torch": getattr(torch, "__version__", None),
            "python": platform.python_version(), "platform": platform.platform()}


def _monitor_fields(mon: Any, rep: dict, _C: Any, version: str) -> dict:
    # Everything but the ring ("recent_steps"), which the callers add from the Timeline's own JSON.
    phases = [dict(p) for p in _C.PHASES]
    return _finite({
        "format": FORMAT,
        "schema": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rank": _rank(),
        "origin_unix_ns": getattr(mon, "_origin_unix_ns", None),
        "report": rep,
        "diagnosis": _diagnosis(mon, rep),
        "phase_table": phases,
        "nvtx_colors": nvtx_colors(phases),
        "build_info": _C.build_info(),
        "versions": versions(version),
    })


def _diagnosis(mon: Any, rep: dict) -> Optional[list]:
    # The findings of the very report saved beside them (Monitor._findings: not a second report).
    findings = getattr(mon, "_findings", None)
    if findings is not None:
        return findings(rep)
    diagnose = getattr(mon, "diagnose", None)
    return diagnose() if callable(diagnose) else None


def phase_table_of(data: dict) -> tuple:
    """The phase table of run data: the one saved in it (schema 3 on), else the extension's."""
    saved = data.get("phase_table")
    if saved is not None:
        return tuple(saved)
    try:
        return _report.phase_table()
    except ImportError:
        raise ImportError(f"stepscope: this run (schema {data.get('schema')}) was saved before run files "
                          "carried the phase table; reading it needs the built extension (stepscope._C, "
                          "with torch); runs saved by this stepscope do not") from None


class SavedRun:
    """A run read back by :func:`load`: the same reading methods as a Monitor.

        run = stepscope.load("run.json")
        print(run.summary()); print(run.report()["samples_per_s"])
    """

    def __init__(self, data: dict, path: Optional[str] = None) -> None:
        self.data = data
        self.path = path

    def report(self) -> dict:
        return self.data["report"]

    @property
    def phase_table(self) -> tuple:
        """The phase table the run was recorded with (``_C.PHASES``; see :func:`phase_table_of`)."""
        return phase_table_of(self.data)

    def summary(self) -> str:
        return _report.format_summary(self.data["report"], findings=self.diagnose(), phases=self.phase_table)

    def recent_steps(self) -> list:
        return self.data["recent_steps"]

    def diagnose(self) -> list:
        """The findings saved with the run; for a run saved without them, the rules of
        :mod:`stepscope.diagnose` applied to its report (they are pure functions of it)."""
        saved = self.data.get("diagnosis")
        if saved is not None:
            return _diagnose.Findings(saved)
        return _diagnose.diagnose(self.data["report"], phases=self.phase_table)

    def to_html(self, path: PathLike, metrics: Optional[dict] = None) -> None:
        """The run as one self-contained HTML page (:func:`stepscope.export.write_html`)."""
        from .export.page import write_html

        write_html(self, path, metrics)

    def _repr_html_(self) -> str:
        from .export.page import html_report

        return html_report(self, fragment=True)

    @property
    def steps(self) -> int:
        """Every completed step, warm-up included (as ``Monitor.steps``)."""
        return int(self.data["report"]["steps"])

    def __repr__(self) -> str:
        return f"SavedRun(path={self.path!r}, steps={self.steps}, ring={len(self.data['recent_steps'])})"


Source = Any  # a Monitor, a SavedRun or run data (a dict)


def is_saved(source: Source) -> bool:
    """Whether ``source`` is a saved run (a :class:`SavedRun` or run data) rather than a Monitor."""
    return isinstance(source, (SavedRun, dict))


def live_monitor(source: Source) -> Any:
    """``source`` when it is a Monitor (RuntimeError if it has recorded nothing yet), else None."""
    if hasattr(source, "recent_steps") and hasattr(source, "report") and hasattr(source, "_tl"):
        if source._tl is None:
            raise RuntimeError("stepscope: nothing recorded yet: attach the Monitor first")
        return source
    return None


def run_data(source: Source) -> dict:
    """The run data of a Monitor (its report built once, and diagnosed), a :class:`SavedRun` or
    run data itself."""
    if isinstance(source, SavedRun):
        return source.data
    if isinstance(source, dict) and source.get("format") == FORMAT:
        return source
    mon = live_monitor(source)
    if mon is not None:
        return _monitor_data(mon)
    raise TypeError("stepscope: expected a Monitor, a run from stepscope.load() or its data dict; got "
                    f"{type(source).__name__}")


def save(source: Source, path: PathLike) -> None:
    """Writes the run (report, ring of recent steps, diagnosis, phase table, build info, versions)
    as JSON (gzip when ``path`` ends in ``.gz``), atomically.

        stepscope.run.save(mon, "run.json"); run = stepscope.load("run.json")
    """
    mon = live_monitor(source)
    if mon is not None:  # the ring written in C++, never made into Python objects
        _atomic_write(path, _compress(_monitor_json(mon), path))
        return
    _atomic_write(path, _encode(run_data(source), path))


def _check_run_fields(data: dict, p: str) -> None:
    """The fields every reader of a run uses, with the types they need: a damaged or edited file
    is refused here, in one line naming the field, rather than deep inside a plot or a trace."""

    def bad(where: str, want: str) -> ValueError:
        return ValueError(f"stepscope: {p} is a damaged stepscope run ({where} is not {want})")

    rep = data["report"]
    if not isinstance(rep, dict):
        raise bad("report", "an object")
    for k in ("steps", "samples"):
        if not _is_num(rep.get(k)):
            raise bad(f"report.{k}", "a number")
    phases = rep.get("phases")
    if not isinstance(phases, dict) or not isinstance(phases.get("step"), dict):
        raise bad("report.phases", "an object with a 'step' entry")
    for section in ("phases", "user", "modules"):
        entries = rep.get(section, {})
        if not isinstance(entries, dict):
            raise bad(f"report.{section}", "an object")
        for name, e in entries.items():
            if not isinstance(e, dict) or not isinstance(e.get("host"), dict):
                raise bad(f"report.{section}.{name}", "an object with host statistics")
            for side in ("host", "device"):
                stats = e.get(side)
                if stats is None and side == "device":
                    continue
                if not isinstance(stats, dict):
                    raise bad(f"report.{section}.{name}.{side}", "an object")
                for q, v in stats.items():
                    if v is not None and not _is_num(v):
                        raise bad(f"report.{section}.{name}.{side}.{q}", "a number")
            for q in ("share_host", "share_device"):
                if e.get(q) is not None and not _is_num(e[q]):
                    raise bad(f"report.{section}.{name}.{q}", "a number")
    ring = data["recent_steps"]
    if not isinstance(ring, list):
        raise bad("recent_steps", "a list")
    for i, r in enumerate(ring):
        where = f"recent_steps[{i}]"
        if not isinstance(r, dict):
            raise bad(where, "an object")
        for k in ("step", "t0", "t1"):
            if not _is_num(r.get(k)):
                raise bad(f"{where}.{k}", "a number")
        if not isinstance(r.get("host"), dict) or not all(_is_num(v) for v in r["host"].values()):
            raise bad(f"{where}.host", "an object of numbers")
        if r.get("samples") is not None and not _is_num(r["samples"]):
            raise bad(f"{where}.samples", "a number")
        for key in ("spans", "user_spans", "module_spans", "device_spans"):
            spans = r.get(key, [])
            if not isinstance(spans, list) or not all(
                    isinstance(sp, list) and len(sp) == 3 and isinstance(sp[0], str) and _is_num(sp[1])
                    and _is_num(sp[2]) for sp in spans):
                raise bad(f"{where}.{key}", "a list of [name, start, end]")
        mem = r.get("memory")
        if mem is not None and (not isinstance(mem, dict) or not all(v is None or _is_num(v) for v in mem.values())):
            raise bad(f"{where}.memory", "an object of numbers")


def _check_phase_table(table: Any, p: str) -> None:
    """A saved phase table (schema 3): the fields the readers use, with their types."""
    def ok(row: Any) -> bool:
        return (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("name", "nvtx_name"))
                and isinstance(row.get("partition"), bool) and _is_num(row.get("color"))
                and all(row.get(k) is None or isinstance(row[k], str) for k in ("opens", "closes")))

    if not isinstance(table, list) or not table or not all(ok(row) for row in table):
        raise ValueError(f"stepscope: {p} is a damaged stepscope run (phase_table is not a list of phases "
                         "with name, nvtx_name, color, partition, opens and closes)")


def _upgrade(data: dict, schema: int) -> None:
    """Reads an older schema's fields with today's meaning, in place."""
    rep = data["report"]
    if schema == 1 and "steady_steps" not in rep:  # schema 1's steps were the steady ones
        rep["steady_steps"] = rep["steps"]
        warm = rep.get("warmup")
        rep["steps"] = rep["steps"] + (warm.get("steps", 0) if isinstance(warm, dict) and _is_num(warm.get("steps"))
                                       else 0)
    # Schemas 1 and 2 carry no phase table: phase_table_of() reads the extension's for them.


def load(path: PathLike, *, max_bytes: Optional[int] = None) -> SavedRun:
    """Reads a run written by ``Monitor.save`` (JSON, or gzip'd JSON; never pickle).

    Safe on a file from anyone: only regular files are read (a FIFO or a device is refused), at
    most ``max_bytes`` bytes once decompressed (default :data:`MAX_READ_BYTES`, 512 MiB), with
    nesting and numbers bounded and the fields the readers use type-checked.

    Raises FileNotFoundError for a missing file and ValueError ("stepscope: ...", naming the
    file) for a file that is not a stepscope run, is damaged, is too large, or was written by a
    newer stepscope (a higher schema version). Runs of schema 1 and 2 carry no phase table:
    summarising or plotting them needs the built extension (an ImportError says so).

        run = stepscope.load("run.json"); print(run.summary())
    """
    p, data = _read_json(path, "stepscope run file", max_bytes)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        what = "a Chrome trace" if isinstance(data, dict) and "traceEvents" in data else "not a stepscope run"
        raise ValueError(f"stepscope: {p} is {what} (no \"format\": \"{FORMAT}\"); save runs with "
                         "Monitor.save()")
    schema = data.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise ValueError(f"stepscope: {p} has no valid schema version (got {schema!r})")
    if schema > SCHEMA_VERSION:
        raise ValueError(f"stepscope: {p} was written by a newer stepscope (schema {schema}; this one "
                         f"reads up to {SCHEMA_VERSION}): upgrade stepscope to read it")
    missing = [k for k in ("report", "recent_steps") if not isinstance(data.get(k), (dict, list))]
    if missing:
        raise ValueError(f"stepscope: {p} is a damaged stepscope run (missing {', '.join(missing)})")
    _check_run_fields(data, p)
    if schema >= 3 or "phase_table" in data:
        _check_phase_table(data.get("phase_table"), p)
    _upgrade(data, schema)
    return SavedRun(data, p)
