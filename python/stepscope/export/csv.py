"""One CSV row per step in the ring of a run.

    mon.to_csv("steps.csv")                  # or stepscope.export.write_csv(run, "steps.csv")
"""

from __future__ import annotations

import csv
import io
import math
from typing import Optional

from ..diagnose_throughput import step_rates
from ..report import partition
from ..run import (PathLike, Source, _atomic_write, _gc_paused, _ring_join, live_monitor, phase_table_of,
                   run_data)


def csv_rows(source: Source) -> list:
    """Rows of :func:`write_csv`: a header, then one row per step in the ring."""
    data = run_data(source)
    names = partition(phase_table_of(data))
    head = ["step", "start_s", "end_s", "step_s", "samples"] + [f"{p}_s" for p in names]
    head += [f"{p}_device_s" for p in names]
    head += ["memory_allocated", "memory_reserved", "truncated_spans", "grad_norm"]
    loss = any(r.get("loss") is not None for r in data["recent_steps"])
    if loss:
        head.append("loss")
    rep = data.get("report") or {}
    rates = [step_rates(rep, r) for r in data["recent_steps"]]
    mfu, tokens = any(m is not None for m, _ in rates), any(t is not None for _, t in rates)
    head += (["mfu"] if mfu else []) + (["tokens_per_s"] if tokens else [])
    rows = [head]
    for r, (m, t) in zip(data["recent_steps"], rates):
        health = [_health_cell(r.get("grad_norm"))] + ([_health_cell(r.get("loss"))] if loss else [])
        health += ([_health_cell(m)] if mfu else []) + ([_health_cell(t)] if tokens else [])
        host = [float(r["host"].get(p, 0.0)) for p in names]
        dev = _device_by_phase(r)  # None (empty cells) until every span of the step is resolved
        mem = r.get("memory") or {}
        rows.append([r["step"], r["t0"], r["t1"], sum(host), r.get("samples", 0), *host,
                     *["" if dev is None else dev.get(p, 0.0) for p in names],
                     mem.get("allocated", ""), "" if mem.get("reserved") is None else mem["reserved"],
                     r.get("truncated_spans", 0), *health])
    return rows


def _health_cell(v: Optional[float]) -> str:
    # The gradient norm and the loss: 9 significant digits, whatever their scale; empty when
    # unknown or non-finite (run data is JSON-safe: report()["health"]["nonfinite"] names that step).
    return "" if v is None else f"{v:.9g}"


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
    phase, CUDA memory at the step's end (empty without CUDA), the step's global gradient norm
    (``grad_norm``; empty without health) and, when the loop handed it over (``Monitor.observe``),
    ``loss``; ``mfu`` and ``tokens_per_s`` of the step's host time when the report knows FLOPs and a
    peak, or tokens per sample (``report()["throughput"]``). Seconds are written to the
    nanosecond (at most 9 decimals). Written atomically. A live Monitor's rows are written by its
    Timeline in C++ (``csrc/timing/ring_csv.cpp``), the same text as from its run data.

        stepscope.export.write_csv(mon, "steps.csv")
    """
    mon = live_monitor(source)
    if mon is not None:
        _atomic_write(path, _monitor_csv(mon))
        return
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for row in csv_rows(source):
        w.writerow([_csv_float(v) if isinstance(v, float) else v for v in row])
    _atomic_write(path, buf.getvalue().encode())


def _monitor_csv(mon) -> bytes:
    """The CSV text of a live Monitor, its rows written by the Timeline from the ring's records:
    54 ms for a 4096-step ring on the CPU VM, where building the run data and its rows in Python took
    about 3x a save's time (:func:`csv_rows` stays the writer of saved runs, and the tests' reference)."""
    with _gc_paused():
        rep = mon.report()
    return mon._tl.ring_csv(*_ring_join(rep))


def _device_by_phase(r: dict) -> Optional[dict]:
    """Device seconds per phase of a ring step whose every partition span was resolved, else None."""
    spans = r.get("device_spans") or []
    if not spans or len(spans) != len(r.get("spans", ())):
        return None
    out: dict = {}
    for name, a, b in spans:
        out[name] = out.get(name, 0.0) + (b - a)
    return out

