"""The Perfetto / Chrome trace of a run, and the merging of several ranks' traces into one.

    mon.export_trace("run.trace.json.gz")   # Perfetto (ui.perfetto.dev) or chrome://tracing
    stepscope.export.merge_traces(["rank0.json.gz", "rank1.json.gz"], "all.json.gz")
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

from ..diagnose_throughput import step_rates
from .. import run as _run
from ..run import (PathLike, Source, _atomic_write, _compress, _encode, _finite, _gc_paused, _is_num,
                   _read_json, live_monitor, nvtx_colors, run_data, versions)

# Trace tracks (Chrome trace "tid"s) within the rank's process.
_TID_STEPS = 1
_TID_HOST = 2  # partition phases, user phases and modules nested under them
_MAX_OVERFLOW_TRACKS = 8
_TID_DEVICE = _TID_HOST + _MAX_OVERFLOW_TRACKS + 1  # CUDA: the partition as the GPU ran it
# Ring keys of the spans on the host track(s): (trace category, key, placement priority).
_SPAN_KINDS = (("phase", "spans", 0), ("user", "user_spans", 1), ("module", "module_spans", 2))


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
    Each span's ``args.color`` is its NVTX colour. Counters: ``samples/s`` per step, ``grad_norm``
    and ``loss`` (training health), ``mfu`` and ``tokens/s`` (throughput, where the report knows
    them) and, on CUDA, ``CUDA memory`` (allocated/reserved MiB). Times in µs since the Monitor started. On CUDA a
    ``device phases`` track holds the partition as the GPU ran it, its CUDA events placed on the
    host clock (the queue lag at each boundary, see ``csrc/timing/device_clock.h``); spans whose
    events were not resolved yet are left out.
    """
    mon = live_monitor(source)
    with _gc_paused():  # tens of thousands of event dicts, no cycle (_files._gc_paused)
        return json.loads(_monitor_trace(mon)) if mon is not None else _trace_events(run_data(source))


def _monitor_trace(mon: Any) -> bytes:
    """A Monitor's trace as JSON text, its events written by the Timeline in C++
    (``csrc/timing/ring_json.h``): the same events :func:`_trace_events` builds from the run data,
    which stays the writer for saved runs and the reference the tests compare this with."""
    from .. import _C, __version__

    with _gc_paused():
        rep = mon.report()
    pid = _run._rank()
    events = mon._tl.trace_events_json(pid, nvtx_colors(_C.PHASES), *_run._ring_join(rep))
    other = _finite({"producer": "stepscope", "versions": versions(__version__), "rank": pid,
                     "origin_unix_ns": getattr(mon, "_origin_unix_ns", None)})
    tail = json.dumps({"displayTimeUnit": "ms", "otherData": other}, separators=(",", ":"), allow_nan=False)
    # "traceEvents" first: Perfetto tells the JSON trace format from the file's first bytes.
    return b'{"traceEvents":' + events + b"," + tail[1:].encode()


def _trace_events(data: dict) -> dict:
    pid = int(data.get("rank") or 0)
    colors = data.get("nvtx_colors") or {}
    rep = data.get("report") or {}
    ev: list = []
    spans: list = []  # (t0 ns, t1 ns, prio, event) for the host track(s)
    device: list = []  # (t0 ns, t1 ns, event) for the device track

    def x(name: str, cat: str, t0: int, t1: int, args: dict) -> dict:
        return {"name": name, "cat": cat, "ph": "X", "ts": t0 / 1e3, "dur": (t1 - t0 if t1 > t0 else 0) / 1e3,
                "pid": pid, "args": args}

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
        mfu, tokens = step_rates(rep, r)  # throughput: the report's FLOPs per step and peak
        for key, v in (("grad_norm", r.get("grad_norm")), ("loss", r.get("loss")), ("mfu", mfu),
                       ("tokens/s", tokens)):  # a non-finite value has no counter point
            if isinstance(v, (int, float)) and math.isfinite(v):
                ev.append({"name": key, "ph": "C", "ts": t1 / 1e3, "pid": pid, "args": {key: v}})
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
    mon = live_monitor(source)
    if mon is not None:  # written in C++, never made into Python objects
        _atomic_write(path, _compress(_monitor_trace(mon), path))
        return
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

