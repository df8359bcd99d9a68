"""One view of every rank: a Monitor's statistics gathered at report time, and the straggler rule.

    mon.report(gather=True)        # every rank calls it (a collective); every rank gets the view
    print(mon.summary(gather=True))

Each rank packs its raw phase statistics (moments and log-histogram counts per phase, host and
device, a fixed :data:`stepscope._C.PACKED_WORDS` float64 words plus two for CUDA memory) into
one tensor, and a single ``all_gather`` of that tensor over the group (NCCL or Gloo, whatever
torch.distributed runs) brings every rank's to every rank. Nothing is exchanged during the steps.
The merged and per-rank summaries come from the same C++ code as a local report, so the numbers
shown for rank r are exactly rank r's own ``mon.report()``.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from . import _C
from . import report as _report

# Phases a straggler is looked for in. DDP's gradient all-reduce ends backward on every rank at
# the same moment (the fast ranks wait inside it for the slow one), so a slow rank shows as a
# *short* backward elsewhere and backward cannot name the culprit; `other` is left out for the
# same reason (collective waits queued after backward land there).
STRAGGLER_PHASES = ("data", "forward", "loss", "optimizer")
STRAGGLER_WARN = 0.10
STRAGGLER_CRITICAL = 0.20
_TAIL = 2  # CUDA memory allocated and peak, after the packed Timeline


def _dist() -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("stepscope: gather=True needs torch.distributed initialised "
                           "(torch.distributed.init_process_group) on every rank")
    return dist


def _comm_device(dist: Any, group: Any) -> torch.device:
    # NCCL moves CUDA tensors only; Gloo (and the rest) take CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_packed(mon: Any, group: Any = None) -> torch.Tensor:
    """Every rank's packed statistics, ``[world_size, PACKED_WORDS + 2]`` float64 on the CPU.

    One ``all_gather_single`` (``all_gather_into_tensor`` before torch 2.14) over ``group`` (default: the default group); every rank of the
    group must call it.
    """
    dist = _dist()
    if mon._tl is None:
        raise RuntimeError("stepscope: nothing recorded yet: attach the Monitor first")
    mem = (float(mon._mem_alloc), float(mon._mem_peak)) if mon._mem_alloc is not None else (-1.0, -1.0)
    local = torch.cat([mon._tl.pack(), torch.tensor(mem, dtype=torch.float64)])
    dev = _comm_device(dist, group)
    local = local.to(dev)
    world = dist.get_world_size(group)
    out = torch.empty(world * local.numel(), dtype=torch.float64, device=dev)
    # torch >= 2.14 names it all_gather_single (all_gather_into_tensor is deprecated there).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)
    return out.view(world, -1).cpu()


def _memory(row: torch.Tensor) -> dict | None:
    alloc, peak = float(row[-2]), float(row[-1])
    return None if alloc < 0 else {"allocated": int(alloc), "peak": int(peak)}


def report_from_gathered(packed: torch.Tensor, local: dict, top_modules: int = 10) -> dict:
    """The gathered report from ``gather_packed``'s tensor (a pure function, for tests and tools).

    ``phases``, ``steps``, ``samples``, ``samples_per_s`` are merged over the ranks (a phase's
    statistics are those of every rank's samples together; ``steps`` the most any rank made,
    samples summed, samples/s = all samples over the slowest rank's summed step time); ``user`` and
    ``modules`` are this rank's own (``local``); ``memory`` the rank with the highest peak.
    ``ranks`` holds ``world_size``; ``per_rank`` (per rank: ``steps``, ``samples``, ``p50`` of each
    phase and of the step in seconds, ``count`` of each, ``device_p50`` likewise or None,
    ``memory``); ``phases`` (per phase and the step: ``slowest_rank``, ``slowest_p50``,
    ``median_p50`` over the ranks, and ``skew`` = (slowest - median) / median p50 step). The
    median is the lower middle rank's value for an even number of ranks (a real rank's number).
    """
    if packed.dim() != 2 or packed.shape[1] != _C.PACKED_WORDS + _TAIL:
        raise ValueError(f"stepscope: gathered statistics must be [world_size, {_C.PACKED_WORDS + _TAIL}]; "
                         f"got {list(packed.shape)}")
    body = packed[:, : _C.PACKED_WORDS].contiguous()
    mems = [_memory(packed[r]) for r in range(packed.shape[0])]
    known = [m for m in mems if m is not None]
    merged_mem = max(known, key=lambda m: m["peak"]) if known else None
    rep = _report.build_report(_C.report_from_packed(body), memory=merged_mem, top_modules=top_modules)
    rep["user"] = local["user"]
    rep["modules"] = local["modules"]

    names = list(_report.PARTITION) + ["step"]
    per_rank = []
    for r in range(body.shape[0]):
        raw = _C.report_from_packed(body[r])
        ph = raw["phases"]
        per_rank.append({
            "rank": r,
            "steps": raw["steps"],
            "samples": raw["samples"],
            "count": {k: ph[k]["host"]["count"] for k in names},
            "p50": {k: ph[k]["host"]["p50"] for k in names},
            "device_p50": {k: ph[k]["device"]["p50"] for k in names} if raw["device"] else None,
            "memory": mems[r],
        })
    # The median rank is a real rank (the lower middle one for an even count): with two ranks the
    # slow one is compared with the fast one, not with their average.
    med_step = statistics.median_low(p["p50"]["step"] for p in per_rank)
    phases = {}
    for k in names:
        vals = [p["p50"][k] for p in per_rank]
        slow = max(range(len(vals)), key=lambda r: vals[r])
        med = statistics.median_low(vals)
        phases[k] = {"slowest_rank": slow, "slowest_p50": vals[slow], "median_p50": med,
                     "skew": (vals[slow] - med) / med_step if med_step > 0 else None}
    rep["ranks"] = {"world_size": len(per_rank), "per_rank": per_rank, "phases": phases}
    return rep


def gather_report(mon: Any, group: Any = None, top_modules: int = 10) -> dict:
    """``mon.report()`` merged over the ranks of ``group``, with a per-rank view (``ranks``).

    A collective: every rank of the group calls it, and each gets the same ``phases`` and
    ``ranks`` (see :func:`report_from_gathered`). Exactly one ``all_gather`` of one fixed-size
    tensor; nothing is exchanged during the steps.

    Example (under torchrun)::

        rep = mon.report(gather=True)
        if dist.get_rank() == 0:
            print(rep["ranks"]["phases"]["data"])   # slowest rank, its p50, the skew
    """
    packed = gather_packed(mon, group)
    return report_from_gathered(packed, mon.report(top_modules=top_modules), top_modules=top_modules)


def _per_step(entry: dict, key: str, p50: dict) -> float:
    # A phase's typical time per step: under gradient accumulation data/forward/loss happen
    # several times per step.
    steps = entry["count"]["step"]
    return p50[key] * entry["count"][key] / steps if steps else 0.0


def straggler_findings(rep: dict) -> list:
    """The straggler rule: a rank that holds the others back, and the phase where it loses time.

    Compared per rank, relative to the median rank's p50 step: the p50 step itself, and the time
    outside backward and ``other`` (the p50s of data, forward, loss and optimizer per step). Under
    DDP the gradient all-reduce makes every rank's step equally long (the fast ranks wait in it),
    so the second measure is the one that finds the slow rank there; without synchronisation the
    first does. A rank over by >= 10% gives a ``warn`` finding, >= 20% a ``critical`` one, naming
    the phase among data, forward, loss, optimizer (and, with CUDA events, their device times)
    that exceeds the median rank most. Returns [] without ``rep["ranks"]`` (a local report) or
    with a single rank.

    Example:
        >>> straggler_findings(mon.report(gather=True))  # doctest: +SKIP
        [{'rule': 'straggler', 'severity': 'critical', 'title': 'rank 3 is a straggler: ...', ...}]
    """
    ranks = rep.get("ranks")
    if not ranks or ranks["world_size"] < 2:
        return []
    per = [p for p in ranks["per_rank"] if p["count"]["step"] > 0]
    if len(per) < 2:
        return []
    med_step = statistics.median_low(p["p50"]["step"] for p in per)
    if med_step <= 0:
        return []
    own = {p["rank"]: sum(_per_step(p, k, p["p50"]) for k in STRAGGLER_PHASES) for p in per}
    med_own = statistics.median_low(own.values())
    candidates = [(k, "p50", k) for k in STRAGGLER_PHASES]
    if all(p["device_p50"] is not None for p in per):
        candidates += [(k, "device_p50", f"{k} (device)") for k in STRAGGLER_PHASES]
    med_phase = {label: statistics.median_low(_per_step(p, k, p[src]) for p in per) for k, src, label in candidates}
    out = []
    for p in per:
        r = p["rank"]
        over_step = (p["p50"]["step"] - med_step) / med_step
        over_own = (own[r] - med_own) / med_step
        over = max(over_step, over_own)
        if over < STRAGGLER_WARN:
            continue
        diffs = {label: _per_step(p, k, p[src]) - med_phase[label] for k, src, label in candidates}
        phase = max(diffs, key=lambda label: diffs[label])
        severity = "critical" if over >= STRAGGLER_CRITICAL else "warn"
        out.append({
            "rule": "straggler",
            "severity": severity,
            "title": f"rank {r} is a straggler: {100 * over:.0f}% of a step over the median rank, "
                     f"most of it in {phase}",
            "evidence": {
                "rank": r,
                "world_size": ranks["world_size"],
                "p50_step": p["p50"]["step"],
                "median_p50_step": med_step,
                "time_outside_backward": own[r],
                "median_time_outside_backward": med_own,
                "phase_excess": diffs[phase],
                "over_median": over,
            },
            "advice": (f"Rank {r} spends {1e3 * diffs[phase]:.2f} ms more per step in {phase} than the median rank, "
                       "and every rank waits for it at the gradient all-reduce. Backward is not compared: "
                       "DistributedDataParallel's all-reduce makes every rank's backward end together, so the "
                       "fast ranks' wait shows up there. For data, give that rank's "
                       "torch.utils.data.DataLoader more num_workers (and pin_memory=True), or check that the "
                       "DistributedSampler shards are even; for compute phases, check that rank's device and "
                       "inputs."),
            # The share of the median step the others spend waiting for this rank.
            "saving": min(over, 1.0),
        })
    return out


def format_ranks(rep: dict) -> str:
    """Per-rank p50 table (ms) of a gathered report: one row per rank, then the slowest rank and
    skew per phase."""
    ranks = rep["ranks"]
    names = list(_report.PARTITION) + ["step"]
    head = ["rank"] + names
    rows = [[str(p["rank"])] + [f"{1e3 * p['p50'][k]:.3f}" for k in names] for p in ranks["per_rank"]]
    rows.append(["slowest"] + [str(ranks["phases"][k]["slowest_rank"]) for k in names])
    rows.append(["skew"] + ["-" if ranks["phases"][k]["skew"] is None else f"{100 * ranks['phases'][k]['skew']:.1f}%"
                            for k in names])
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]

    def fmt(r: list) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [f"per rank p50 (ms), {ranks['world_size']} ranks; skew = (slowest - median) / median step",
             fmt(head), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt(r) for r in rows])
