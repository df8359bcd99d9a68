"""Reading a Monitor's numbers: the report dict, the plain-text summary table and the live line:
text from a report dict, with neither torch nor the extension imported.

The phase table (csrc/phases.h: name, NVTX colour and category, partition, the boundaries that
open and close each partition phase) is read from the extension (``_C.PHASES``, imported on
first use) for a live Monitor, and from the run file for a saved run (``phases=``: the run's
saved table, :attr:`stepscope.run.SavedRun.phase_table`). ``PHASES`` and ``PARTITION`` are the
extension's table and its partition names.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

Table = Optional[Sequence[dict]]  # a phase table: rows of _C.PHASES, or None: the extension's


@functools.lru_cache(maxsize=None)
def _extension_table() -> tuple:
    try:
        from . import _C
    except ImportError as e:
        raise ImportError("stepscope: the phase table comes from the built extension (stepscope._C, which "
                          f"needs torch) or from a run file saved with it; neither is at hand ({e})") from e
    return tuple(_C.PHASES)


def phase_table(phases: Table = None) -> tuple:
    """One dict per phase (``name``, ``nvtx_name``, ``color`` ARGB, NVTX ``category``, ``partition``,
    ``series``, ``opens``/``closes``: its boundaries, None outside the partition): the Timeline's
    series in report order, then the NVTX-only phases. ``phases``: a run's saved table; None: the
    extension's (``_C.PHASES``)."""
    return tuple(phases) if phases is not None else _extension_table()


def partition(phases: Table = None) -> tuple:
    """The partition phases' names in step order (``data`` .. ``optimizer``)."""
    return tuple(p["name"] for p in phase_table(phases) if p["partition"])


def partition_bounds(phases: Table = None) -> dict:
    """Partition phase -> (the boundary that opens it, the one that closes it), by the names the
    queue-lag report (``lag``) and ``Monitor.mark`` use."""
    return {p["name"]: (p["opens"], p["closes"]) for p in phase_table(phases) if p["partition"]}


def boundaries(phases: Table = None) -> tuple:
    """The step's boundaries in order (``forward_begin`` .. ``optimizer_end``): where each
    partition phase closes (as ``_C.BOUNDARIES``)."""
    return tuple(p["closes"] for p in phase_table(phases) if p["partition"])


def __getattr__(name: str) -> Any:
    # PHASES and PARTITION read the extension on first use, so that importing this module needs
    # neither it nor torch.
    if name == "PHASES":
        return phase_table()
    if name == "PARTITION":
        return partition()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _with_share(raw: dict) -> Callable[[dict], dict]:
    """entry -> a copy with ``share_host``/``share_device``: its total over the step's."""
    dev = bool(raw["device"])
    step = raw["phases"]["step"]
    step_host = step["host"]["total"]
    step_dev = step["device"]["total"] if dev else 0.0

    def with_share(entry: dict) -> dict:
        e = dict(entry)
        e["share_host"] = e["host"]["total"] / step_host if step_host > 0 else None
        e["share_device"] = e["device"]["total"] / step_dev if dev and step_dev > 0 else None
        return e

    return with_share


def build_report(raw: dict, memory: Optional[dict] = None, top_modules: int = 10,
                 context: Optional[dict] = None, *, samples_counted_by: Optional[str] = None,
                 local: Optional[dict] = None) -> dict:
    """Shapes ``_C.Timeline.report()`` for people.

    Keys: ``steps`` (every completed step, warm-up included: ``Monitor.steps``, a trainer's global
    step), ``steady_steps`` (the steps after warm-up, which every statistic covers), ``samples``, ``samples_per_s`` (training samples over summed step time),
    ``device`` (whether device times were recorded), ``phases`` (``data`` .. ``optimizer``,
    ``step``, ``eval_forward``, ``eval`` (each evaluation stretch, its first eval forward to the
    end of its last, the time between its forwards included; host only); each
    ``{"host": stats, "device": stats or None, "share_host",
    "share_device"}``; stats are count/total/mean/std/min/max/p50/p90/p99 in seconds; share is
    the phase's total over the step total), ``user`` (``mon.phase`` names, same shape, plus
    ``parent``: the partition phase they ran in), ``modules`` (top ``top_modules`` by device
    time, host time without CUDA), ``memory`` (bytes: ``allocated``/``peak`` at the last step
    end, ``reserved``/``peak_reserved``/``total`` when read, or None), ``dropped_device_samples``
    and ``pending_device_samples`` (events the GPU had not reached yet), ``warmup`` (``steps``,
    ``samples``, ``host``/``device`` totals per phase in seconds: the first ``warmup_steps``
    steps, kept out of everything else), ``lag`` (CUDA only, else None: per boundary
    ``forward_begin`` .. ``optimizer_end``, stats of the time from the host reaching it to the
    GPU reaching it), ``spikes`` (the last 32 steps slower than 3x the
    running median step: ``step``, ``duration``, ``step_median``, ``phase`` (the one that grew
    most against its own running median), ``phase_time``, ``phase_median``), ``spikes_total``,
    ``device_steps`` (steady steps whose device times were recorded: device sampling, see
    ``Monitor(device_every=...)``; the device stats and shares cover these steps only),
    ``device_every`` (one step in k is device-timed; None without device timing or in a merged
    report), ``device_every_auto``, ``device_events`` (CUDA events recorded at boundaries),
    ``event_record_cost`` (seconds of host time per event record, measured in the loop; None
    before auto sampling first chose, or without it),
    and ``context`` (facts the diagnosis reads: parameter dtype, CUDA capability, autocast use).
    Step statistics, samples and ``device_steps`` count steady (post-warm-up) steps only.
    ``samples_counted_by`` (a local Monitor's report): how samples were counted.

    ``local``: for a report merged over ranks (``raw`` from the gathered statistics), this rank's
    own report, whose per-process keys (``user``, ``modules``, ``warmup``, ``spikes``,
    ``spikes_total``, ``lag``, ``context``) the merged one keeps: names differ between ranks, and
    warm-up, spikes, queue lag and the diagnosis context belong to one process.
    """
    share = _with_share(raw)

    def own(key: str, default: Any = None) -> Any:
        # A merged report keeps this rank's per-process figures (``local``).
        return local.get(key) if local is not None else raw.get(key, default)

    if local is not None:
        user, modules = local.get("user"), local.get("modules")
    else:
        key = "device" if raw["device"] else "host"
        user = {k: share(v) for k, v in raw["user"].items()}
        ranked = sorted(raw["modules"].items(), key=lambda kv: kv[1][key]["total"], reverse=True)
        modules = dict(ranked[:top_modules])
    warmup = own("warmup")
    rep = {
        # ``steps``: every completed step (Monitor.steps, a trainer's global step); ``steady_steps``
        # the ones behind the statistics (a merged report's too: every rank warms up alike).
        "steps": raw["steps"] + int((warmup or {}).get("steps", 0)),
        "steady_steps": raw["steps"],
        "samples": raw["samples"],
        "samples_per_s": raw["samples"] / raw["step_host_total"] if raw["step_host_total"] > 0 else None,
        "device": bool(raw["device"]),
        "phases": {k: share(v) for k, v in raw["phases"].items()},
        "user": user,
        "modules": modules,
        "memory": memory,
        "dropped_device_samples": raw["dropped_device_samples"],
        "pending_device_samples": raw["pending_device_samples"],
        "warmup": warmup,
        "lag": own("lag"),
        "spikes": list(own("spikes", []) or []),
        "spikes_total": own("spikes_total", 0),
        "device_steps": raw.get("device_steps", 0),
        "device_every": raw.get("device_every"),
        "device_every_auto": raw.get("device_every_auto", False),
        "device_events": raw.get("device_events", 0),
        "event_record_cost": raw.get("event_record_cost"),
        "context": dict(context or {}) if local is None else local.get("context"),
    }
    if samples_counted_by is not None:
        rep["samples_counted_by"] = samples_counted_by
    return rep


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1e3:.3f}"


def format_seconds(s: float) -> str:
    """A duration in the unit its size reads best in: "850 us", "12.3 ms", "4.56 s", "2.1 min"."""
    a = abs(s)
    if a < 1e-3:
        return f"{s * 1e6:.0f} us" if a >= 1e-5 else f"{s * 1e6:.2f} us"
    if a < 1.0:
        return f"{s * 1e3:.3g} ms" if a < 0.1 else f"{s * 1e3:.0f} ms"
    if a < 120.0:
        return f"{s:.3g} s"
    return f"{s / 60:.1f} min" if a < 7200.0 else f"{s / 3600:.1f} h"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(rep: dict, findings: Optional[list] = None, *, phases: Table = None) -> str:
    """The table: phase, count, mean, p50, p90, p99, max (ms), total (s), share of step; host
    columns, then the same for the device when CUDA events were recorded. User phases sit under
    the partition phase they ran in (their share is part of that phase's, not added to it).
    Warm-up and spikes follow in one line each, then ``findings`` (``diagnose()``'s list) as
    "What to fix first", when given. ``phases``: the phase table (a saved run's; default the
    extension's)."""
    head = ["phase", "count", "mean", "p50", "p90", "p99", "max", "total s", "share"]
    if rep["device"]:
        head += ["dev mean", "dev p50", "dev p90", "dev p99", "dev max", "dev total s", "dev share"]
    lines = ["times in ms unless marked s; share = phase total / step total; (share) = part of the phase above"]
    lines += _columns(head, _summary_rows(rep, partition(phases)))
    lines += _summary_tail(rep)
    if rep.get("ranks"):
        lines.append(format_ranks(rep, phases=phases))
    if findings is not None:
        lines.append(format_findings(findings))
    return "\n".join(lines)


def _columns(head: list, rows: list) -> list:
    """A header, a rule and the rows, each column as wide as its widest cell (names left-aligned)."""
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]

    def fmt(r: list) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def _summary_rows(rep: dict, names: Sequence[str]) -> list:
    """The summary's rows: the partition ``names`` with their user phases, the step, eval, the
    other user phases and the modules."""
    dev = rep["device"]
    rows: list = []

    def add(name: str, e: dict, share: bool = True, nested: bool = False) -> None:
        h = e["host"]

        def pct(x: Optional[float]) -> str:
            return f"({_pct(x)})" if nested and x is not None else _pct(x)

        r = [name, str(h["count"]), _ms(h["mean"]), _ms(h.get("p50")), _ms(h.get("p90")), _ms(h.get("p99")),
             _ms(h.get("max")), f"{h['total']:.4f}", pct(e.get("share_host")) if share else ""]
        if dev:
            d: Any = e["device"] or {}
            n = d.get("count", 0)
            r += [_ms(d.get(q)) if n else "-" for q in ("mean", "p50", "p90", "p99", "max")]
            r += [f"{d.get('total', 0.0):.4f}" if n else "-",
                  pct(e.get("share_device")) if share and n else ""]
        rows.append(r)

    users = dict(rep["user"])
    for k in names:
        if rep["phases"][k]["host"]["count"]:
            add(k, rep["phases"][k])
        for name in [u for u, v in users.items() if v.get("parent") == k]:
            add(f"  user:{name}", users.pop(name), nested=True)
    add("step", rep["phases"]["step"])
    if rep["phases"]["eval_forward"]["host"]["count"]:
        add("eval_forward", rep["phases"]["eval_forward"], share=False)
    ev = rep["phases"].get("eval")  # absent from runs saved before the series existed
    if ev and ev["host"]["count"]:
        add("eval", ev, share=False)
    for k, v in users.items():
        add(f"user:{k}", v, share=False)
    for k, v in rep["modules"].items():
        add(f"module:{k}", v, share=False)
    return rows


def _summary_tail(rep: dict) -> list:
    """The lines under the table: steps, samples/s, memory, device sampling, warm-up, spikes, throughput,
    health."""
    steady = rep.get("steady_steps", rep["steps"])
    tail = [f"steps {rep['steps']}" + (f" ({steady} after warm-up)" if steady != rep["steps"] else "")]
    if rep["samples_per_s"] is not None and rep["samples"]:
        tail.append(f"samples/s {rep['samples_per_s']:.1f}")
    mem = rep["memory"]
    if mem is not None:
        m = f"CUDA memory allocated {mem['allocated'] / 2**20:.1f} MiB, peak {mem['peak'] / 2**20:.1f} MiB"
        if mem.get("peak_reserved") is not None:
            m += f", peak reserved {mem['peak_reserved'] / 2**20:.1f} MiB"
        tail.append(m)
    if rep["device"]:
        tail.append(f"dropped device samples {rep['dropped_device_samples']}")
        sampling = format_device_sampling(rep)
        if sampling:
            tail.append(sampling)
    lines = [", ".join(tail)]
    if rep.get("samples_counted_by"):
        lines.append(f"samples counted by {rep['samples_counted_by']}")
    warm = rep.get("warmup")
    if warm and warm["steps"]:
        lines.append(f"warm-up: {warm['steps']} step(s), {format_seconds(warm['host']['step'])}, kept out of "
                     "every number above")
    spikes = rep.get("spikes") or []
    if spikes:
        last = spikes[-1]
        lines.append(f"spikes (steps > 3x the running median): {rep.get('spikes_total', len(spikes))}; last: "
                     f"step {last['step']} {_ms(last['duration'])} ms against {_ms(last['step_median'])}, "
                     f"{last['phase']} {_ms(last['phase_time'])} ms against {_ms(last['phase_median'])}")
    from .diagnose_health import format_health  # the health and throughput lines live beside their rules
    from .diagnose_throughput import format_throughput

    return lines + format_throughput(rep) + format_health(rep)


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def format_device_sampling(rep: dict) -> str:
    """"device: every 7th step (auto), 143 of 1000 steps" when device times are sampled; "" when
    every step is device-timed (or k is unknown, as in a merged report)."""
    k = rep.get("device_every")
    if not k or k <= 1:
        return ""
    how = " (auto)" if rep.get("device_every_auto") else ""
    return f"device: every {_ordinal(k)} step{how}, {rep.get('device_steps', 0)} of {rep.get('steady_steps', rep['steps'])} steps"


def format_findings(findings: list) -> str:
    """"What to fix first": one line per finding (severity, title, advice), largest saving first."""
    if not findings:
        return "What to fix first: nothing stands out."
    out = ["What to fix first:"]
    for i, f in enumerate(findings, 1):
        saving = f" (~{100 * f['saving']:.0f}% of the step)" if f.get("saving") else ""
        out.append(f"  {i}. [{f['severity']}] {f['title']}{saving}")
        out.append(f"     {f['advice']}")
    return "\n".join(out)


def format_ranks(rep: dict, *, phases: Table = None) -> str:
    """Per-rank p50 table (ms) of a gathered report: one row per rank, then the slowest rank and
    skew per phase. ``phases``: the phase table (default the extension's)."""
    ranks = rep["ranks"]
    names = list(partition(phases)) + ["step"]
    rows = [[str(p["rank"])] + [f"{1e3 * p['p50'][k]:.3f}" for k in names] for p in ranks["per_rank"]]
    rows.append(["slowest"] + [str(ranks["phases"][k]["slowest_rank"]) for k in names])
    rows.append(["skew"] + ["-" if ranks["phases"][k]["skew"] is None else f"{100 * ranks['phases'][k]['skew']:.1f}%"
                            for k in names])
    lines = [f"per rank p50 (ms), {ranks['world_size']} ranks; skew = (slowest - median) / median step"]
    return "\n".join(lines + _columns(["rank"] + names, rows))


def live_line(rep: dict, step_number: Optional[int] = None, *, phases: Table = None) -> str:
    """The ``Monitor(print_every=n)`` line: step (``step_number``, warm-up steps included; default
    the report's steps), p50 step time, the largest phase and its share, samples/s and CUDA
    memory. During warm-up there are no statistics yet, and the line says so. ``phases``: the
    phase table (default the extension's)."""
    step = rep["phases"]["step"]["host"]
    parts = [f"stepscope step {rep['steps'] if step_number is None else step_number}"]
    if not rep.get("steady_steps", rep["steps"]) and (rep.get("warmup") or {}).get("steps"):
        parts.append("warm-up")
    if step.get("count") and step.get("p50") is not None:
        parts.append(f"p50 step {step['p50'] * 1e3:.3f} ms")
    key = "share_device" if rep.get("device") else "share_host"
    shares = [(rep["phases"][p].get(key) or 0.0, p) for p in partition(phases)]
    share, name = max(shares)
    if share > 0:
        parts.append(f"largest {name} {100 * share:.1f}%")
    if rep.get("samples_per_s"):
        parts.append(f"{rep['samples_per_s']:.1f} samples/s")
    mem = rep.get("memory")
    if mem:
        parts.append(f"mem {mem['allocated'] / 2**20:.1f} MiB (peak {mem['peak'] / 2**20:.1f})")
    return " | ".join(parts)
