"""A run's figures as TensorBoard scalars.

    stepscope.log_tensorboard(writer, mon, epoch, metrics=val.compute())
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ..report import partition, phase_table
from ..run import Source, is_saved, phase_table_of, run_data


def log_tensorboard(writer: Any, source: Source, step: int, metrics: Optional[dict] = None, *,
                    since: Any = None) -> Any:
    """Adds scalars to a TensorBoard writer (``torch.utils.tensorboard.SummaryWriter`` or any
    object with ``add_scalar(tag, value, step)``):
    ``stepscope/<phase>/p50_ms`` and ``share`` (host; ``device_p50_ms``/``device_share`` on CUDA),
    ``stepscope/samples_per_s``, ``stepscope/memory/allocated_mib`` and ``peak_mib`` on CUDA,
    with training health ``stepscope/grad_norm`` (the last step's; ``/p50``, ``/max``),
    ``stepscope/nonfinite_steps``, ``stepscope/loss`` (when observed) and ``stepscope/update_ratio``
    (the last sample's), with throughput ``stepscope/mfu``, ``stepscope/tokens_per_s`` and
    ``stepscope/achieved_tflops`` where known, and each one-element value of ``metrics`` (a ``ClassificationMetrics.compute()`` dict) as
    ``metrics/<name>`` (reading them is the host sync compute() leaves to the caller).

    ``since``: a :meth:`stepscope.Monitor.snapshot`: the figures of the steps after it, not of
    the whole run (a live Monitor only). Returns a snapshot taken at this call for a Monitor
    (None for a saved run), so that each call logs the interval since the previous one::

        snap = None
        for epoch in range(epochs):
            train_one_epoch()
            snap = stepscope.log_tensorboard(writer, mon, epoch, metrics=val.compute(), since=snap)
    """
    live = not is_saved(source)
    if since is not None and not live:
        raise TypeError("stepscope: log_tensorboard(since=...) needs a live Monitor; a saved run has "
                        "only the whole run's figures")
    if live:
        rep, table, snap = source.report(since=since), phase_table(), source.snapshot()
    else:
        data = run_data(source)
        rep, table, snap = data["report"], phase_table_of(data), None

    def add(tag: str, v: Any) -> None:
        if v is not None and math.isfinite(float(v)):
            writer.add_scalar(tag, float(v), step)

    for name in (*partition(table), "step"):
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
    health = rep.get("health")
    if health:  # the whole run's (since= does not apply to health)
        g = health["grad_norm"]
        if g["count"]:
            add("stepscope/grad_norm", g["last"])
            add("stepscope/grad_norm/p50", g["p50"])
            add("stepscope/grad_norm/max", g["max"])
        add("stepscope/nonfinite_steps", health["nonfinite"]["steps"])
        if health.get("loss"):
            add("stepscope/loss", health["loss"]["last"])
        ratio = (health.get("update_ratio") or {}).get("overall")
        if ratio:
            add("stepscope/update_ratio", ratio["last"])
    tp = rep.get("throughput")
    if tp:
        add("stepscope/mfu", tp["mfu_device"] if tp.get("mfu_device") is not None else tp.get("mfu"))
        add("stepscope/tokens_per_s", tp.get("tokens_per_s"))
        add("stepscope/achieved_tflops", tp["achieved_flops"] / 1e12 if tp.get("achieved_flops") else None)
    for k, v in (metrics or {}).items():
        numel = getattr(v, "numel", None)
        if numel is not None:
            if numel() != 1:
                continue  # per-class vectors and the confusion matrix are not scalars
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            add(f"metrics/{k}", v)
    return snap
