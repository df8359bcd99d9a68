"""The PNG dashboard of a run (needs matplotlib; never imports torch).

    stepscope.plot(stepscope.load("run.json"), "run.png")   # 1200x800
"""

from __future__ import annotations

import io
import textwrap
from typing import Iterable, Optional, Sequence

from ..report import partition
from ..run import PathLike, SavedRun, Source, _atomic_write, is_saved, phase_table_of, run_data
from .csv import _device_by_phase

_MAX_DIAG_LINES = 8  # on the PNG dashboard


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

    names = partition(phase_table_of(data))
    _plot_phases_per_step(fig.add_subplot(gs[0, :]), ring, colors, names)
    _plot_step_histogram(fig.add_subplot(gs[1, 0]), rep, ring, colors)
    _plot_shares(fig.add_subplot(gs[1, 1]), rep, colors, names)
    _plot_diagnosis(fig, data.get("diagnosis"), _more_hint(source))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _atomic_write(path, buf.getvalue())


def _plot_phases_per_step(ax, ring: list, colors: dict, names: Sequence[str]) -> None:
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
        for p in names:
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
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(names), fontsize=9, frameon=False,
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


def _plot_shares(ax, rep: dict, colors: dict, partition_names: Sequence[str]) -> None:
    """Each phase's share of the step, host (and device on CUDA)."""
    names = [p for p in partition_names if rep["phases"][p]["host"]["count"]]
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
    if is_saved(source):
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


def _finding_lines(findings: Optional[Iterable[dict]]) -> list:
    """One line per finding for the dashboard: ``[severity] title: advice``."""
    return [f"[{f.get('severity', 'info')}] {f.get('title', f.get('rule', '?'))}"
            + (f": {f['advice']}" if f.get("advice") else "") for f in findings or ()]

