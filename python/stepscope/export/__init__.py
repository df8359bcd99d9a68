"""Taking a run's numbers elsewhere: a Perfetto/Chrome trace, a JSON file, CSV, a PNG dashboard
and TensorBoard scalars, one module each, each a function of the run data.

    mon.export_trace("run.trace.json.gz")   # Perfetto (ui.perfetto.dev) or chrome://tracing: trace.py
    mon.save("run.json")                     # report + ring of recent steps + diagnosis: stepscope.run
    run = stepscope.load("run.json")         # JSON only: safe to open a file from anyone
    print(run.summary())                     # the same table as mon.summary()
    stepscope.plot(run, "run.png")           # 1200x800 dashboard (needs matplotlib): png.py
    mon.to_csv("steps.csv")                  # one row per step in the ring: csv.py
    mon.to_html("run.html")                  # one self-contained page, offline: page.py

Every export reads one plain dict, the *run data* (:func:`stepscope.run.run_data`): a live
Monitor is turned into it, a loaded file already is it. So a trace, a CSV or a plot made from a
saved file is the one the Monitor would have made. Neither this package nor ``stepscope.run`` and
``stepscope.report`` import torch or the extension at module level: a saved run is read, plotted
and traced without them (the run carries its phase table).

The names of the run file (``save``, ``load``, ``SavedRun``, ``run_data``, ``FORMAT``,
``SCHEMA_VERSION``, ``MAX_READ_BYTES``) live in :mod:`stepscope.run` and the live line in
:mod:`stepscope.report`; they are re-exported here, where they were first. ``stepscope.export.plot``
is the function (as before); it lives in ``stepscope.export.png`` (the PNG dashboard).
"""

from __future__ import annotations

# Re-exported, private ones included (_atomic_write, _TID_DEVICE: tests and tools read them here).
from ..report import live_line
from ..run import (FORMAT, MAX_READ_BYTES, SCHEMA_VERSION, PathLike, SavedRun, Source, _atomic_write,  # noqa: F401
                   load, run_data, save)
from .csv import csv_rows, write_csv
from .page import html_report, write_html
from .png import plot
from .tensorboard import log_tensorboard
from .trace import _TID_DEVICE, merge_traces, read_trace, trace_events, write_trace  # noqa: F401

#: ``stepscope.export.html(run, path)``: :func:`write_html`.
html = write_html

__all__ = ["FORMAT", "MAX_READ_BYTES", "SCHEMA_VERSION", "PathLike", "SavedRun", "Source", "csv_rows", "html",
           "html_report", "live_line", "load", "log_tensorboard", "merge_traces", "plot", "read_trace", "run_data", "save", "trace_events",
           "write_csv", "write_html", "write_trace"]
