"""Taking a run's numbers elsewhere: a Perfetto/Chrome trace, a JSON file, CSV, a PNG dashboard,
TensorBoard scalars and a one-line live summary.

    mon.export_trace("run.trace.json.gz")   # Perfetto (ui.perfetto.dev) or chrome://tracing
    mon.save("run.json")                     # report + ring of recent steps + diagnosis + versions
    run = stepscope.load("run.json")         # JSON only: safe to open a file from anyone
    print(run.summary())                     # the same table as mon.summary()
    stepscope.plot(run, "run.png")           # 1200x800 dashboard (needs matplotlib)
    mon.to_csv("steps.csv")                  # one row per step in the ring

Every export reads one plain dict, the *run data* (what :func:`save` writes): a live Monitor is
turned into it, a loaded file already is it. So a trace, a CSV or a plot made from a saved file
is the one the Monitor would have made. This module and ``report.py`` import neither torch nor
the extension at module level: a saved run is read, plotted and traced without torch.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so
a crash mid-write leaves the old file or none, never half of one.
"""

from __future__ import annotations

import csv
import datetime
import gzip
import io
import json
import logging
import math
import os
import platform
import stat
import sys
import tempfile
import textwrap
import zlib
from typing import Any, Iterable, Optional, Sequence, Union

from . import diagnose as _diagnose
from .report import PARTITION, PHASES, format_summary, live_line  # noqa: F401  (live_line: re-exported)

FORMAT = "stepscope.run"
# 2: report.steps counts warm-up steps too, report.steady_steps the others (1 had steps = steady).
SCHEMA_VERSION = 2

logger = logging.getLogger("stepscope")

PathLike = Union[str, "os.PathLike[str]"]

# Trace tracks (Chrome trace "tid"s) within the rank's process.
_TID_STEPS = 1
_TID_HOST = 2  # partition phases, user phases and modules nested under them
_MAX_OVERFLOW_TRACKS = 8
_TID_DEVICE = _TID_HOST + _MAX_OVERFLOW_TRACKS + 1  # CUDA: the partition as the GPU ran it
_MAX_DIAG_LINES = 8  # on the PNG dashboard
# Ring keys of the spans on the host track(s): (trace category, key, placement priority).
_SPAN_KINDS = (("phase", "spans", 0), ("user", "user_spans", 1), ("module", "module_spans", 2))


# ---------------------------------------------------------------------------------------- files
# Temporary files of a write in progress: ".<target name>.stepscope-<pid>-<random>.tmp" beside the
# target. A writer killed mid-write (kill -9, a power cut) leaves one behind; the next write of the
# same target removes those whose process is gone from this machine, or that are older than
# _STALE_TMP_S (a writer on another machine sharing the folder).
_TMP_TAG = ".stepscope-"
_STALE_TMP_S = 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or no way to tell: leave its file alone
    return True


def _remove_stale_temporaries(folder: str, base: str) -> None:
    prefix = "." + base + _TMP_TAG
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    now = datetime.datetime.now().timestamp()
    for name in names:
        pid_text = name[len(prefix):].split("-", 1)[0]
        full = os.path.join(folder, name)
        try:
            old = now - os.lstat(full).st_mtime > _STALE_TMP_S
            if old or (pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))):
                os.unlink(full)
        except OSError:
            pass  # gone already, or not ours to remove


def _atomic_write(path: PathLike, data: bytes) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    _remove_stale_temporaries(folder, base)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}{_TMP_TAG}{os.getpid()}-", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        # mkstemp makes the file private (0600); the result should have the mode open() would give.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def _write_error(path: str, e: OSError) -> OSError:
    """The OSError of a failed write, naming the target (not the temporary file beside it)."""
    why = "it is a folder" if os.path.isdir(path) else (e.strerror or str(e))
    return _os_error(e, f"stepscope: cannot write {path}: {why}")


def _os_error(e: OSError, message: str) -> OSError:
    """An OSError of e's type and errno whose str() is ``message`` alone (no "[Errno n]")."""
    err = type(e)(message)
    err.errno = e.errno
    return err


def _encode(obj: Any, path: PathLike) -> bytes:
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    # mtime=0: the same run gives the same bytes.
    return gzip.compress(text, mtime=0) if os.fspath(path).endswith(".gz") else text


def _finite(x: Any) -> Any:
    """JSON has no NaN/Infinity: such values become None (standard JSON any reader accepts)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    try:  # numpy / 0-d tensor scalars in a diagnosis' evidence
        return _finite(float(x))
    except (TypeError, ValueError):
        return str(x)


# ------------------------------------------------------------------------------------- run data
def _rank() -> int:
    torch = sys.modules.get("torch")  # never import torch here: a saved run is read without it
    if torch is None:
        return 0
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def _nvtx_colors() -> dict:
    """NVTX phase name -> "#RRGGBB", read from the extension's phase table (report.PHASES)."""
    return {p["nvtx_name"]: "#%06X" % (p["color"] & 0xFFFFFF) for p in PHASES}


def _monitor_data(mon: Any) -> dict:
    from . import _C, __version__

    torch = sys.modules.get("torch")
    ring = []
    for r in mon.recent_steps():
        e = dict(r)
        for k in ("spans", "user_spans", "module_spans", "device_spans"):
            e[k] = [list(s) for s in r.get(k, ())]
        ring.append(e)
    diagnose = getattr(mon, "diagnose", None)
    return _finite({
        "format": FORMAT,
        "schema": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rank": _rank(),
        "origin_unix_ns": getattr(mon, "_origin_unix_ns", None),
        "report": mon.report(),
        "recent_steps": ring,
        "diagnosis": diagnose() if callable(diagnose) else None,
        "nvtx_colors": _nvtx_colors(),
        "build_info": _C.build_info(),
        "versions": {"stepscope": __version__, "torch": getattr(torch, "__version__", None),
                     "python": platform.python_version(), "platform": platform.platform()},
    })


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

    def summary(self) -> str:
        return format_summary(self.data["report"], findings=self.diagnose())

    def recent_steps(self) -> list:
        return self.data["recent_steps"]

    def diagnose(self) -> list:
        """The findings saved with the run; for a run saved without them, the rules of
        :mod:`stepscope.diagnose` applied to its report (they are pure functions of it)."""
        saved = self.data.get("diagnosis")
        return list(saved) if saved is not None else _diagnose.diagnose(self.data["report"])

    @property
    def steps(self) -> int:
        """Every completed step, warm-up included (as ``Monitor.steps``)."""
        return int(self.data["report"]["steps"])

    def __repr__(self) -> str:
        return f"SavedRun(path={self.path!r}, steps={self.steps}, ring={len(self.data['recent_steps'])})"


Source = Any  # a Monitor, a SavedRun or run data (a dict)


def run_data(source: Source) -> dict:
    """The run data of a Monitor, a :class:`SavedRun` or run data itself."""
    if isinstance(source, SavedRun):
        return source.data
    if isinstance(source, dict) and source.get("format") == FORMAT:
        return source
    if hasattr(source, "recent_steps") and hasattr(source, "report") and hasattr(source, "_tl"):
        if source._tl is None:
            raise RuntimeError("stepscope: nothing recorded yet: attach the Monitor first")
        return _monitor_data(source)
    raise TypeError("stepscope: expected a Monitor, a run from stepscope.load() or its data dict; got "
                    f"{type(source).__name__}")


def save(source: Source, path: PathLike) -> None:
    """Writes the run (report, ring of recent steps, diagnosis, build info, versions) as JSON
    (gzip when ``path`` ends in ``.gz``), atomically.

        stepscope.export.save(mon, "run.json"); run = stepscope.load("run.json")
    """
    data = run_data(source)
    _atomic_write(path, _encode(data, path))


#: The most bytes :func:`load`, :func:`read_trace` and the command line read from one file (after
#: decompression); larger files are refused. Pass ``max_bytes=`` (``--max-bytes`` on the command
#: line) to read a larger one: a run file is a few MB, a ring of 10^5 steps about 100 MB.
MAX_READ_BYTES = 512 * 2**20
# The deepest nesting a run or trace file has is 6; anything much deeper is not one of ours, and
# Python's JSON parser would end in a RecursionError on it.
_MAX_JSON_DEPTH = 32
# Numbers in a run file are seconds, counts, bytes and a wall-clock time in ns: all far below 2^63.
# A larger one (or 1e999, NaN, Infinity) is damage, and would overflow the exports' arithmetic.
_MAX_NUMBER = float(2**63)


def _check_max_bytes(max_bytes: Optional[int]) -> int:
    if max_bytes is None:
        return MAX_READ_BYTES
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"stepscope: max_bytes must be an int >= 1; got {max_bytes!r}")
    return max_bytes


def _read_bytes(p: str, what: str, limit: int) -> bytes:
    """The file's bytes (gunzipped when it is gzip), at most ``limit`` of them; only regular files."""
    try:
        # O_NONBLOCK: opening a FIFO nobody writes must not hang; it is refused just below.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"stepscope: no such file: {p}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"stepscope: {p} is a folder, not a {what}") from None
    except OSError as e:
        raise _os_error(e, f"stepscope: cannot read {p}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"stepscope: {p} is a folder, not a {what}")
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise ValueError(f"stepscope: {p} is {kind}, not a {what} (only regular files are read)")
        head = f.read(2)
        f.seek(0)
        gz = head == b"\x1f\x8b"
        try:
            raw = (gzip.GzipFile(fileobj=f, mode="rb") if gz else f).read(limit + 1)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"stepscope: {p} is a damaged gzip file: {e}") from None
    if len(raw) > limit:
        raise ValueError(f"stepscope: {p} holds more than {limit} bytes{' once decompressed' if gz else ''}, the "
                         f"most read by default; pass max_bytes= (or --max-bytes) to read it")
    return raw


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _check_tree(obj: Any, p: str) -> None:
    """Refuses nesting deeper than _MAX_JSON_DEPTH and numbers outside +-2^63 (iteratively)."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (dict, list)):
            if depth > _MAX_JSON_DEPTH:
                raise ValueError(f"stepscope: {p} is nested deeper than {_MAX_JSON_DEPTH} levels: not a "
                                 "stepscope file")
            stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            if not abs(x) < _MAX_NUMBER:  # NaN fails this too
                raise ValueError(f"stepscope: {p} is damaged: it holds the number {x!r:.40}, outside the "
                                 "range a stepscope file holds")


def _read_json(path: PathLike, what: str, max_bytes: Optional[int] = None) -> tuple:
    """(path as str, the decoded JSON) of a JSON or gzip'd JSON file, with one-line errors: only
    regular files, at most ``max_bytes`` (default :data:`MAX_READ_BYTES`) once decompressed,
    nesting and numbers bounded."""
    p = os.fspath(path)
    raw = _read_bytes(p, what, _check_max_bytes(max_bytes))
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"stepscope: {p} is nested deeper than {_MAX_JSON_DEPTH} levels: not a stepscope "
                         "file") from None
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"stepscope: {p} is not a {what} (not JSON: {e})") from None
    _check_tree(obj, p)
    return p, obj


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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


def load(path: PathLike, *, max_bytes: Optional[int] = None) -> SavedRun:
    """Reads a run written by ``Monitor.save`` (JSON, or gzip'd JSON; never pickle).

    Safe on a file from anyone: only regular files are read (a FIFO or a device is refused), at
    most ``max_bytes`` bytes once decompressed (default :data:`MAX_READ_BYTES`, 512 MiB), with
    nesting and numbers bounded and the fields the readers use type-checked.

    Raises FileNotFoundError for a missing file and ValueError ("stepscope: ...", naming the
    file) for a file that is not a stepscope run, is damaged, is too large, or was written by a
    newer stepscope (a higher schema version).

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
    rep = data["report"]
    if schema == 1 and "steady_steps" not in rep:  # schema 1's steps were the steady ones
        rep["steady_steps"] = rep["steps"]
        warm = rep.get("warmup")
        rep["steps"] = rep["steps"] + (warm.get("steps", 0) if isinstance(warm, dict) and _is_num(warm.get("steps"))
                                       else 0)
    return SavedRun(data, p)


# ----------------------------------------------------------------------------------- diagnosis
def _finding_lines(findings: Optional[Iterable[dict]]) -> list:
    """One line per finding for the dashboard: ``[severity] title: advice``."""
    return [f"[{f.get('severity', 'info')}] {f.get('title', f.get('rule', '?'))}"
            + (f": {f['advice']}" if f.get("advice") else "") for f in findings or ()]


# --------------------------------------------------------------------------------------- trace
def _ns(t: float) -> int:
    # The ring holds integer nanoseconds scaled to seconds: rounding recovers them exactly, so
    # nesting is decided on integers, not on sums of floats.
    return int(round(t * 1e9))


def _place(items: list, tracks: int) -> list:
    """Splits (t0, t1, prio, event) into lists that each nest properly (a stack per track)."""
    out = []
    # Partition phases first at equal starts: a user span starting with a phase must not become
    # that phase's parent.
    rest = sorted(items, key=lambda it: (it[0], it[2], -(it[1] - it[0])))
    while rest and len(out) < tracks:
        kept, left, stack = [], [], []
        for it in rest:
            while stack and stack[-1] <= it[0]:
                stack.pop()
            if stack and it[1] > stack[-1]:
                left.append(it)  # overlaps its neighbour without nesting: next track
                continue
            stack.append(it[1])
            kept.append(it)
        out.append(kept)
        rest = left
    return out


def trace_events(source: Source) -> dict:
    """The Chrome trace-event object of a run (what :func:`write_trace` writes).

    One process per rank (pid = rank). Track 1 holds one ``step N`` span per step in the ring
    (``args.step``); track 2 the partition phases, with user phases and per-module forward spans
    nested under the phase they ran in (spans that straddle a phase boundary go to the next track).
    Each span's ``args.color`` is its NVTX colour. Counters: ``samples/s`` per step and, on CUDA,
    ``CUDA memory`` (allocated/reserved MiB). Times in µs since the Monitor started. On CUDA a
    ``device phases`` track holds the partition as the GPU ran it, its CUDA events placed on the
    host clock (the queue lag at each boundary, see ``csrc/timing/device_clock.h``); spans whose
    events were not resolved yet are left out.
    """
    data = run_data(source)
    pid = int(data.get("rank") or 0)
    colors = data.get("nvtx_colors") or {}
    ev: list = []
    spans: list = []  # (t0 ns, t1 ns, prio, event) for the host track(s)
    device: list = []  # (t0 ns, t1 ns, event) for the device track

    def x(name: str, cat: str, t0: int, t1: int, args: dict) -> dict:
        return {"name": name, "cat": cat, "ph": "X", "ts": t0 / 1e3, "dur": max(0, t1 - t0) / 1e3, "pid": pid,
                "args": args}

    for r in data["recent_steps"]:
        n = int(r["step"])
        t0, t1 = _ns(r["t0"]), _ns(r["t1"])
        e = x(f"step {n}", "step", t0, t1,
              {"step": n, "samples": r.get("samples", 0), "color": colors.get("step")})
        e["tid"] = _TID_STEPS
        ev.append(e)
        for kind, key, prio in _SPAN_KINDS:
            for name, a, b in r.get(key, ()):
                a_ns, b_ns = _ns(a), _ns(b)
                color = colors.get(name if kind == "phase" else kind)
                spans.append((a_ns, b_ns, prio, x(name, kind, a_ns, b_ns, {"step": n, "color": color})))
        for name, a, b in r.get("device_spans", ()):
            a_ns, b_ns = _ns(a), _ns(b)
            device.append((a_ns, b_ns, x(name, "device", a_ns, b_ns, {"step": n, "color": colors.get(name)})))
        host_s = sum(r["host"].values())
        if r.get("samples") and host_s > 0:
            ev.append({"name": "samples/s", "ph": "C", "ts": t1 / 1e3, "pid": pid,
                       "args": {"samples/s": r["samples"] / host_s}})
        mem = r.get("memory")
        if mem:
            args = {"allocated MiB": mem["allocated"] / 2**20}
            if mem.get("reserved") is not None:
                args["reserved MiB"] = mem["reserved"] / 2**20
            ev.append({"name": "CUDA memory", "ph": "C", "ts": t1 / 1e3, "pid": pid, "args": args})
    tracks = _place(spans, _MAX_OVERFLOW_TRACKS + 1)
    names = {_TID_STEPS: "steps", _TID_HOST: "host phases"}
    for k, kept in enumerate(tracks):
        tid = _TID_HOST + k
        if k:
            names[tid] = f"host phases (overlapping {k})"
        for it in kept:
            it[3]["tid"] = tid
            ev.append(it[3])
    if device:
        # One track, in order: a placement clamped at one boundary can overlap its neighbour by a
        # few us; the later span starts where the earlier one ended, so the track nests.
        names[_TID_DEVICE] = "device phases (CUDA, on the host clock)"
        end = None
        for a_ns, b_ns, e in sorted(device, key=lambda t: (t[0], t[1])):
            a_ns = a_ns if end is None else max(a_ns, end)
            b_ns = max(a_ns, b_ns)
            e["ts"], e["dur"], e["tid"] = a_ns / 1e3, (b_ns - a_ns) / 1e3, _TID_DEVICE
            ev.append(e)
            end = b_ns
    meta = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"stepscope rank {pid}"}},
            {"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}}]
    for tid, name in names.items():
        meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                     "args": {"sort_index": tid}})
    # "traceEvents" first: Perfetto tells the JSON trace format from the file's first bytes.
    return {"traceEvents": meta + ev, "displayTimeUnit": "ms",
            "otherData": {"producer": "stepscope", "versions": data.get("versions"), "rank": pid,
                          "origin_unix_ns": data.get("origin_unix_ns")}}


def write_trace(source: Source, path: PathLike) -> None:
    """Writes :func:`trace_events` as JSON (gzip when ``path`` ends in ``.gz``), atomically.

        stepscope.export.write_trace(mon, "run.trace.json.gz")   # open in ui.perfetto.dev
    """
    _atomic_write(path, _encode(trace_events(source), path))


def read_trace(path: PathLike, *, max_bytes: Optional[int] = None) -> dict:
    """A trace written by :func:`write_trace` (JSON or gzip'd JSON); ValueError for anything else.
    Reads as :func:`load` does (regular files only, at most ``max_bytes``)."""
    p, obj = _read_json(path, "trace", max_bytes)
    if not isinstance(obj, dict) or not isinstance(obj.get("traceEvents"), list):
        raise ValueError(f"stepscope: {p} is not a trace-event file (no \"traceEvents\" list)")
    if (obj.get("otherData") or {}).get("producer") != "stepscope":
        raise ValueError(f"stepscope: {p} was not written by stepscope (Monitor.export_trace)")
    origin = obj["otherData"].get("origin_unix_ns")
    if origin is not None and not _is_num(origin):
        raise ValueError(f"stepscope: {p} is a damaged trace (otherData.origin_unix_ns is not a number)")
    for i, e in enumerate(obj["traceEvents"]):
        if not isinstance(e, dict) or ("pid" in e and (not isinstance(e["pid"], int) or isinstance(e["pid"], bool))) \
                or ("ts" in e and not _is_num(e["ts"])):
            raise ValueError(f"stepscope: {p} is a damaged trace (traceEvents[{i}] has no valid pid/ts)")
    return obj


def merge_traces(paths: Sequence[PathLike], out: PathLike, *, max_bytes: Optional[int] = None) -> dict:
    """Merges the traces of several ranks (each written by its own ``export_trace``) into one
    file, atomically: one process per rank, on one time axis.

    Each trace counts µs from its own Monitor's start; the wall-clock time of that start
    (``otherData.origin_unix_ns``) shifts every file onto the earliest one's axis (exact on one
    machine, as good as the clocks' synchronisation across machines). Two files with the same
    ``pid`` (ranks written without torch.distributed) get distinct pids, in the order given.
    Returns the merged object.

        stepscope.export.merge_traces(["rank0.json.gz", "rank1.json.gz"], "all.json.gz")
    """
    if not paths:
        raise ValueError("stepscope: merge_traces needs at least one trace")
    traces = [read_trace(p, max_bytes=max_bytes) for p in paths]
    origins = [(t.get("otherData") or {}).get("origin_unix_ns") for t in traces]
    base = min((o for o in origins if o is not None), default=None)
    events: list = []
    used: set = set()
    ranks = []
    for t, origin in zip(traces, origins):
        pids = sorted({e["pid"] for e in t["traceEvents"] if "pid" in e})
        remap = {}
        for pid in pids:
            new = pid
            while new in used:
                new += 1
            remap[pid] = new
            used.add(new)
        shift = (origin - base) / 1e3 if origin is not None and base is not None else 0.0
        for e in t["traceEvents"]:
            e = dict(e)
            if "pid" in e:
                e["pid"] = remap[e["pid"]]
            if "ts" in e:
                e["ts"] = e["ts"] + shift
            if e.get("ph") == "M" and e.get("name") == "process_name":
                e["args"] = {"name": f"stepscope rank {e['pid']}"}
            if e.get("ph") == "M" and e.get("name") == "process_sort_index":
                e["args"] = {"sort_index": e["pid"]}
            events.append(e)
        ranks.append(sorted(remap.values()))
    merged = {"traceEvents": events, "displayTimeUnit": "ms",
              "otherData": {"producer": "stepscope", "merged_from": [os.fspath(p) for p in paths], "ranks": ranks,
                            "origin_unix_ns": base}}
    _atomic_write(out, _encode(merged, out))
    return merged


# ----------------------------------------------------------------------------------------- CSV
def csv_rows(source: Source) -> list:
    """Rows of :func:`write_csv`: a header, then one row per step in the ring."""
    data = run_data(source)
    head = ["step", "start_s", "end_s", "step_s", "samples"] + [f"{p}_s" for p in PARTITION]
    head += [f"{p}_device_s" for p in PARTITION]
    head += ["memory_allocated", "memory_reserved", "truncated_spans"]
    rows = [head]
    for r in data["recent_steps"]:
        host = [float(r["host"].get(p, 0.0)) for p in PARTITION]
        dev = _device_by_phase(r)  # None (empty cells) until every span of the step is resolved
        mem = r.get("memory") or {}
        rows.append([r["step"], r["t0"], r["t1"], sum(host), r.get("samples", 0), *host,
                     *["" if dev is None else dev.get(p, 0.0) for p in PARTITION],
                     mem.get("allocated", ""), "" if mem.get("reserved") is None else mem["reserved"],
                     r.get("truncated_spans", 0)])
    return rows


def _csv_float(v: float) -> str:
    # Times are whole nanoseconds scaled to seconds: 9 fixed decimals hold them exactly (0.088731573,
    # not the scaling's 0.08873157300000001, nor 9.8516e-05), trailing zeros dropped.
    if not math.isfinite(v):
        return ""
    text = f"{v:.9f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def write_csv(source: Source, path: PathLike) -> None:
    """One row per step in the ring: step, start/end (s since the Monitor started), step time
    (the sum of its phases: eval forwards inside a step are left out), samples, host seconds per
    phase, CUDA memory at the step's end (empty without CUDA). Seconds are written to the
    nanosecond (at most 9 decimals). Written atomically.

        stepscope.export.write_csv(mon, "steps.csv")
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for row in csv_rows(source):
        w.writerow([_csv_float(v) if isinstance(v, float) else v for v in row])
    _atomic_write(path, buf.getvalue().encode())


# --------------------------------------------------------------------------------------- plot
def _device_by_phase(r: dict) -> Optional[dict]:
    """Device seconds per phase of a ring step whose every partition span was resolved, else None."""
    spans = r.get("device_spans") or []
    if not spans or len(spans) != len(r.get("spans", ())):
        return None
    out: dict = {}
    for name, a, b in spans:
        out[name] = out.get(name, 0.0) + (b - a)
    return out


def plot(source: Source, path: PathLike) -> None:
    """A 1200x800 PNG dashboard: host (and, on CUDA, device) time per phase per step (stacked), the step-time histogram
    with the run's p50/p90/p99, each phase's share of the step (host and, on CUDA, device) and
    the diagnosis. Needs matplotlib (``pip install stepscope[plot]``); never imports torch.

        stepscope.plot(stepscope.load("run.json"), "run.png")
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("stepscope: plot() needs matplotlib: pip install 'stepscope[plot]'") from None
    data = run_data(source)
    rep, ring = data["report"], data["recent_steps"]
    colors = data.get("nvtx_colors") or {}
    fig = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 2, height_ratios=(1.15, 1), hspace=0.35, wspace=0.22)
    sps = f", {rep['samples_per_s']:.1f} samples/s" if rep.get("samples_per_s") else ""
    fig.suptitle(f"stepscope: {rep['steps']} steps{sps}", fontsize=14)

    _plot_phases_per_step(fig.add_subplot(gs[0, :]), ring, colors)
    _plot_step_histogram(fig.add_subplot(gs[1, 0]), rep, ring, colors)
    _plot_shares(fig.add_subplot(gs[1, 1]), rep, colors)
    _plot_diagnosis(fig, data.get("diagnosis"), _more_hint(source))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _atomic_write(path, buf.getvalue())


def _plot_phases_per_step(ax, ring: list, colors: dict) -> None:
    """Host (and, on CUDA, hatched device) time per phase per step of the ring, stacked."""
    # On CUDA, each step's device time per phase (from its resolved device spans) stands hatched
    # beside its host bar.
    dev = [_device_by_phase(r) for r in ring]
    both = any(dev)
    if ring:
        steps = [r["step"] for r in ring]
        w = 0.45 if both else 1.0
        bottom = [0.0] * len(ring)
        dbottom = [0.0] * len(ring)
        for p in PARTITION:
            h = [r["host"].get(p, 0.0) * 1e3 for r in ring]
            ax.bar([x - w / 2 if both else x for x in steps], h, bottom=bottom, width=w, color=colors.get(p),
                   label=p, linewidth=0)
            bottom = [b + v for b, v in zip(bottom, h)]
            if both:
                d = [1e3 * (dd or {}).get(p, 0.0) for dd in dev]
                ax.bar([x + w / 2 for x in steps], d, bottom=dbottom, width=w, color=colors.get(p), hatch="///",
                       edgecolor="white", linewidth=0)
                dbottom = [b + v for b, v in zip(dbottom, d)]
        ax.set_xlim(steps[0] - 0.5, steps[-1] + 0.5)
        # Above the axes, left of the title: inside, it would hide the first steps' bars.
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(PARTITION), fontsize=9, frameon=False,
                  borderaxespad=0.2)
    else:
        ax.text(0.5, 0.5, "no steps in the ring", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{'time' if both else 'host time'} per phase, last {len(ring)} steps", loc="right")
    ax.set_xlabel("step")
    ax.set_ylabel("ms (left: host, hatched: device)" if both else "ms")


def _plot_step_histogram(ax, rep: dict, ring: list, colors: dict) -> None:
    """The ring's step times, with the whole run's p50/p90/p99."""
    st = [sum(r["host"].values()) * 1e3 for r in ring]
    if st:
        ax.hist(st, bins=min(40, max(5, len(st) // 4)), color=colors.get("step", "#777777"))
    step = rep["phases"]["step"]["host"]
    for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
        v = step.get(q)
        if v is not None and step.get("count"):
            ax.axvline(v * 1e3, color="black", linestyle=style, label=f"{q} {v * 1e3:.3f} ms")
    if step.get("count"):
        ax.legend(fontsize=9, title="whole run", title_fontsize=9)
    ax.set_title("step time (ring), quantiles of the whole run")
    ax.set_xlabel("ms")
    ax.set_ylabel("steps")


def _plot_shares(ax, rep: dict, colors: dict) -> None:
    """Each phase's share of the step, host (and device on CUDA)."""
    names = [p for p in PARTITION if rep["phases"][p]["host"]["count"]]
    hs = [100 * (rep["phases"][p].get("share_host") or 0.0) for p in names]
    ypos = list(range(len(names)))
    if rep.get("device"):
        ds = [100 * (rep["phases"][p].get("share_device") or 0.0) for p in names]
        ax.barh([y - 0.2 for y in ypos], hs, height=0.4, color=[colors.get(p) for p in names], label="host")
        ax.barh([y + 0.2 for y in ypos], ds, height=0.4, color=[colors.get(p) for p in names], alpha=0.5,
                hatch="//", label="device")
        ax.legend(fontsize=9)
    else:
        ax.barh(ypos, hs, color=[colors.get(p) for p in names])
    for y, v in zip(ypos, hs):
        ax.text(v, y, f" {v:.1f}%", va="center", fontsize=9)
    ax.set_yticks(ypos, names)
    ax.invert_yaxis()
    ax.set_xlim(0, max([100.0 / 1.15] + hs) * 1.15)
    ax.set_title("share of step time")
    ax.set_xlabel("%")


def _more_hint(source: Source) -> str:
    """Where the findings the dashboard has no room for are read in full."""
    if isinstance(source, SavedRun) and source.path:
        return f"python -m stepscope report {source.path}"
    if isinstance(source, (SavedRun, dict)):
        return "stepscope.load(...).summary() of the saved run"
    return "Monitor.summary() or Monitor.diagnose()"


def _plot_diagnosis(fig, diagnosis, more: str) -> None:
    """The findings under the panels, wrapped; at most _MAX_DIAG_LINES lines, the rest counted
    with where to read them (``more``)."""
    findings = _finding_lines(diagnosis)
    if findings:
        # Wrapped to the figure's width; at most _MAX_DIAG_LINES lines, the rest counted.
        lines = ["diagnosis:"]
        for k, f in enumerate(findings):
            wrapped = textwrap.wrap(f, 140, subsequent_indent="    ")
            if len(lines) + len(wrapped) > _MAX_DIAG_LINES:
                lines.append(f"(+{len(findings) - k} more: {more})")
                break
            lines += wrapped
        fig.subplots_adjust(bottom=0.07 + 0.021 * len(lines))
        fig.text(0.02, 0.01, "\n".join(lines), fontsize=9, va="bottom", family="monospace")


# --------------------------------------------------------------------------------- TensorBoard
def _report_of(source: Source) -> dict:
    if isinstance(source, (SavedRun, dict)):
        return run_data(source)["report"]
    return source.report()


def log_tensorboard(writer: Any, source: Source, step: int, metrics: Optional[dict] = None, *,
                    since: Any = None) -> Any:
    """Adds scalars to a TensorBoard writer (``torch.utils.tensorboard.SummaryWriter`` or any
    object with ``add_scalar(tag, value, step)``):
    ``stepscope/<phase>/p50_ms`` and ``share`` (host; ``device_p50_ms``/``device_share`` on CUDA),
    ``stepscope/samples_per_s``, ``stepscope/memory/allocated_mib`` and ``peak_mib`` on CUDA, and
    each one-element value of ``metrics`` (a ``ClassificationMetrics.compute()`` dict) as
    ``metrics/<name>`` (reading them is the host sync compute() leaves to the caller).

    ``since``: a :meth:`stepscope.Monitor.snapshot`: the figures of the steps after it, not of
    the whole run (a live Monitor only). Returns a snapshot taken at this call for a Monitor
    (None for a saved run), so that each call logs the interval since the previous one::

        snap = None
        for epoch in range(epochs):
            train_one_epoch()
            snap = stepscope.log_tensorboard(writer, mon, epoch, metrics=val.compute(), since=snap)
    """
    if since is not None and isinstance(source, (SavedRun, dict)):
        raise TypeError("stepscope: log_tensorboard(since=...) needs a live Monitor; a saved run has "
                        "only the whole run's figures")
    live = not isinstance(source, (SavedRun, dict))
    rep = source.report(since=since) if live else _report_of(source)
    snap = source.snapshot() if live else None

    def add(tag: str, v: Any) -> None:
        if v is not None and math.isfinite(float(v)):
            writer.add_scalar(tag, float(v), step)

    for name in (*PARTITION, "step"):
        e = rep["phases"][name]
        if not e["host"]["count"]:
            continue
        p50 = e["host"].get("p50")
        add(f"stepscope/{name}/p50_ms", None if p50 is None else p50 * 1e3)
        if name != "step":
            add(f"stepscope/{name}/share", e.get("share_host"))
        d = e.get("device")
        if d and d.get("count"):
            add(f"stepscope/{name}/device_p50_ms", d["p50"] * 1e3 if d.get("p50") is not None else None)
            if name != "step":
                add(f"stepscope/{name}/device_share", e.get("share_device"))
    add("stepscope/samples_per_s", rep.get("samples_per_s"))
    mem = rep.get("memory")
    if mem:
        add("stepscope/memory/allocated_mib", mem["allocated"] / 2**20)
        add("stepscope/memory/peak_mib", mem["peak"] / 2**20)
    for k, v in (metrics or {}).items():
        numel = getattr(v, "numel", None)
        if numel is not None:
            if numel() != 1:
                continue  # per-class vectors and the confusion matrix are not scalars
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            add(f"metrics/{k}", v)
    return snap
