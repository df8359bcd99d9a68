"""Reading a Monitor's numbers: the report dict and the plain-text summary table."""

from __future__ import annotations

from typing import Any, Optional

PARTITION = ("data", "forward", "loss", "backward", "other", "optimizer")


def build_report(raw: dict, memory: Optional[dict] = None, top_modules: int = 10) -> dict:
    """Shapes ``_C.Timeline.report()`` for people.

    Keys: ``steps``, ``samples``, ``samples_per_s`` (training samples over summed step time),
    ``device`` (whether device times were recorded), ``phases`` (``data`` .. ``optimizer``,
    ``step``, ``eval_forward``; each ``{"host": stats, "device": stats or None, "share_host",
    "share_device"}``; stats are count/total/mean/std/min/max/p50/p90/p99 in seconds; share is
    the phase's total over the step total), ``user`` (``mon.phase`` names, same shape),
    ``modules`` (top ``top_modules`` by device time, host time without CUDA), ``memory``
    (``allocated``/``peak`` bytes at the last step end, or None), ``dropped_device_samples`` and
    ``pending_device_samples`` (events the GPU had not reached yet).
    """
    dev = bool(raw["device"])
    step = raw["phases"]["step"]
    step_host = step["host"]["total"]
    step_dev = step["device"]["total"] if dev else 0.0

    def with_share(entry: dict) -> dict:
        e = dict(entry)
        e["share_host"] = e["host"]["total"] / step_host if step_host > 0 else None
        e["share_device"] = e["device"]["total"] / step_dev if dev and step_dev > 0 else None
        return e

    phases = {k: with_share(v) for k, v in raw["phases"].items()}
    user = {k: with_share(v) for k, v in raw["user"].items()}
    key = (lambda kv: kv[1]["device"]["total"]) if dev else (lambda kv: kv[1]["host"]["total"])
    modules = dict(sorted(raw["modules"].items(), key=key, reverse=True)[:top_modules])
    return {
        "steps": raw["steps"],
        "samples": raw["samples"],
        "samples_per_s": raw["samples"] / raw["step_host_total"] if raw["step_host_total"] > 0 else None,
        "device": dev,
        "phases": phases,
        "user": user,
        "modules": modules,
        "memory": memory,
        "dropped_device_samples": raw["dropped_device_samples"],
        "pending_device_samples": raw["pending_device_samples"],
    }


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1e3:.3f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(rep: dict) -> str:
    """The table: phase, count, mean, p50, p90, p99 (ms), total (s), share of step; host columns,
    then the same for the device when CUDA events were recorded."""
    dev = rep["device"]
    head = ["phase", "count", "mean", "p50", "p90", "p99", "total s", "share"]
    if dev:
        head += ["dev mean", "dev p50", "dev p90", "dev p99", "dev total s", "dev share"]
    rows: list = []

    def add(name: str, e: dict, share: bool = True) -> None:
        h = e["host"]
        r = [name, str(h["count"]), _ms(h["mean"]), _ms(h.get("p50")), _ms(h.get("p90")), _ms(h.get("p99")),
             f"{h['total']:.4f}", _pct(e.get("share_host")) if share else ""]
        if dev:
            d: Any = e["device"] or {}
            n = d.get("count", 0)
            r += [_ms(d.get(q)) if n else "-" for q in ("mean", "p50", "p90", "p99")]
            r += [f"{d.get('total', 0.0):.4f}" if n else "-",
                  _pct(e.get("share_device")) if share and n else ""]
        rows.append(r)

    for k in PARTITION:
        if rep["phases"][k]["host"]["count"]:
            add(k, rep["phases"][k])
    add("step", rep["phases"]["step"])
    if rep["phases"]["eval_forward"]["host"]["count"]:
        add("eval_forward", rep["phases"]["eval_forward"], share=False)
    for k, v in rep["user"].items():
        add(f"user:{k}", v)
    for k, v in rep["modules"].items():
        add(f"module:{k}", v, share=False)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]

    def fmt(r: list) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = ["times in ms unless marked s; share = phase total / step total", fmt(head),
             "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    tail = [f"steps {rep['steps']}"]
    if rep["samples_per_s"] is not None and rep["samples"]:
        tail.append(f"samples/s {rep['samples_per_s']:.1f}")
    if rep["memory"] is not None:
        tail.append(f"CUDA memory allocated {rep['memory']['allocated'] / 2**20:.1f} MiB, "
                    f"peak {rep['memory']['peak'] / 2**20:.1f} MiB")
    if dev:
        tail.append(f"dropped device samples {rep['dropped_device_samples']}")
    lines.append(", ".join(tail))
    return "\n".join(lines)
