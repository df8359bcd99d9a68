"""One view of every rank: a Monitor's statistics gathered at report time, and the straggler rule.

    mon.report(gather=True)        # every rank calls it (a collective); every rank gets the view
    print(mon.summary(gather=True))

Each rank packs its raw phase statistics (moments and log-histogram counts per phase, host and
device, a fixed :data:`stepscope._C.PACKED_WORDS` float64 words plus two for CUDA memory) into
one tensor, and a single ``all_gather`` of that tensor over the group (NCCL or Gloo, whatever
torch.distributed runs) brings every rank's to every rank. Nothing is exchanged during the steps.
The merged and per-rank summaries come from the same C++ code as a local report, so the numbers
shown for rank r are exactly rank r's own ``mon.report()``. The straggler rule
(``straggler_findings``, also in :data:`stepscope.diagnose.RULES`) reads the gathered report.

A collective waits for every rank of the group. A rank that never calls it (one that crashed,
took another branch, or is still training) leaves the others waiting for the process group's own
timeout (``init_process_group(timeout=)``: 30 minutes by default on Gloo, 10 on NCCL), after which
only the backend's message is shown. ``timeout=`` (seconds or a ``timedelta``) on
:func:`gather_report`, ``ClassificationMetrics.compute()``/``sync()`` (or its ``sync_timeout``)
bounds that wait: each rank raises :class:`CollectiveTimeoutError` naming stepscope's call and the
ranks that had not arrived. The collective is then issued asynchronously and waited for with
``Work.wait(timeout)``, and each rank marks its arrival in the process group's store, which is how
every rank can name the missing ones (while the store answers: under a TCP or env:// init it lives
in rank 0's process, and a rank whose store has gone says so). Tested on Gloo; the same calls exist
on NCCL.
"""

from __future__ import annotations

import datetime
import itertools
import math
import statistics
from typing import Any, Callable, Optional, Union

import torch

from . import _C
from . import report as _report
from .diagnose import STRAGGLER_CRITICAL, STRAGGLER_PHASES, STRAGGLER_WARN  # noqa: F401  (re-exported)
from .diagnose import rule_straggler as straggler_findings  # noqa: F401  (the public name)

# After the packed Timeline: CUDA memory allocated and peak, then throughput's FLOPs per step,
# achieved FLOP/s, peak FLOP/s and tokens/s (-1: unknown).
_TAIL = 6


def _dist() -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("stepscope: gather=True needs torch.distributed initialised "
                           "(torch.distributed.init_process_group) on every rank")
    return dist


class CollectiveTimeoutError(TimeoutError, RuntimeError):
    """A stepscope collective that not every rank reached within its ``timeout``."""


Timeout = Union[float, int, datetime.timedelta, None]


def timeout_seconds(name: str, timeout: Any) -> float:
    """``timeout`` (seconds or a ``timedelta``) as a positive finite float; TypeError/ValueError
    naming ``name`` otherwise."""
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"stepscope: {name} must be a number of seconds or a datetime.timedelta; got "
                        f"{type(timeout).__name__} {timeout!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"stepscope: {name} must be a finite number of seconds > 0; got {timeout!r}")
    return float(timeout)


_ARRIVALS: dict = {}  # group name -> count: numbers this process's bounded collectives per group


def _store(dist: Any) -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001  (a private accessor: without it the message names no rank)
        return None


def run_collective(issue: Callable[[bool], Any], group: Any, timeout: Timeout, what: str) -> None:
    """Runs one collective, ``issue(async_op)``; with a ``timeout``, waits at most that long and
    raises :class:`CollectiveTimeoutError` naming ``what`` and the ranks of ``group`` that had not
    arrived. Every rank of the group calls its bounded collectives on that group in the same order
    (they are collectives), so the n-th one of each rank is the same call."""
    if timeout is None:
        issue(False)
        return
    import torch.distributed as dist

    seconds = timeout_seconds("timeout", timeout)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    name = getattr(group if group is not None else dist.group.WORLD, "group_name", "default")
    seq = next(_ARRIVALS.setdefault(name, itertools.count()))
    store = _store(dist)
    prefix = f"stepscope/arrived/{name}/{seq}/"
    if store is not None:
        store.set(prefix + str(rank), "1")
        if seq:
            try:  # the previous call completed on every rank: its marks are no longer read
                store.delete_key(f"stepscope/arrived/{name}/{seq - 1}/{rank}")
            except Exception:  # noqa: BLE001  (a store without delete_key keeps a few bytes)
                pass
    work = issue(True)
    try:
        work.wait(timeout=datetime.timedelta(seconds=seconds))
    except RuntimeError as e:
        missing = None
        if store is not None:
            try:
                missing = [r for r in range(world) if not store.check([prefix + str(r)])]
            except Exception:  # noqa: BLE001
                missing = None
        if group is not None and missing:
            missing = [dist.get_global_rank(group, r) for r in missing]
        who = (f"rank(s) {missing} had not called it" if missing else
               "not every rank had called it (which ones could not be read from the process group's store; "
               "under a TCP or env:// init the store lives in rank 0's process, whose own error names them)")
        raise CollectiveTimeoutError(
            f"stepscope: {what} is a collective and timed out after {seconds:g} s on rank {dist.get_rank()} "
            f"(world size {world}): {who}. Every rank of the group must call it; the group can no longer be "
            f"used for collectives. Backend: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _comm_device(dist: Any, group: Any) -> torch.device:
    # NCCL moves CUDA tensors only; Gloo (and the rest) take CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_packed(mon: Any, group: Any = None, memory: Optional[dict] = None, timeout: Timeout = None,
                  throughput: Optional[dict] = None) -> torch.Tensor:
    """Every rank's packed statistics, ``[world_size, PACKED_WORDS + 2]`` float64 on the CPU.

    One ``all_gather_single`` (``all_gather_into_tensor`` before torch 2.14) over ``group``
    (default: the default group); every rank of the group must call it. ``timeout`` (seconds):
    see the module's docstring.
    """
    dist = _dist()
    if mon._tl is None:
        raise RuntimeError("stepscope: nothing recorded yet: attach the Monitor first")
    mem = (float(memory["allocated"]), float(memory["peak"])) if memory else (-1.0, -1.0)
    tp = throughput or {}
    got = tp.get("achieved_flops_device") if tp.get("achieved_flops_device") is not None else tp.get("achieved_flops")
    tput = tuple(float(v) if v is not None else -1.0
                 for v in (tp.get("flops_per_step"), got, tp.get("peak_flops"), tp.get("tokens_per_s")))
    local = torch.cat([mon._tl.pack(), torch.tensor(mem + tput, dtype=torch.float64)])
    dev = _comm_device(dist, group)
    local = local.to(dev)
    world = dist.get_world_size(group)
    out = torch.empty(world * local.numel(), dtype=torch.float64, device=dev)
    # torch >= 2.14 names it all_gather_single (all_gather_into_tensor is deprecated there).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    run_collective(lambda async_op: gather(out, local, group=group, async_op=async_op), group, timeout,
                   "mon.report(gather=True)")
    return out.view(world, -1).cpu()


def _memory(row: torch.Tensor) -> dict | None:
    alloc, peak = float(row[-6]), float(row[-5])
    return None if alloc < 0 else {"allocated": int(alloc), "peak": int(peak)}


def report_from_gathered(packed: torch.Tensor, local: dict, top_modules: int = 10) -> dict:
    """The gathered report from ``gather_packed``'s tensor (a pure function, for tests and tools).

    ``phases``, ``steps``, ``samples``, ``samples_per_s`` are merged over the ranks (a phase's
    statistics are those of every rank's samples together; ``steps`` the most any rank made,
    samples summed, samples/s = all samples over the slowest rank's summed step time); ``user``,
    ``modules`` and ``health`` are this rank's own (``local``); ``memory`` the rank with the highest peak;
    ``throughput``: FLOPs per step, achieved and peak FLOP/s and tokens/s summed over the ranks (None
    where a rank does not know one), ``mfu`` their ratio, the rest this rank's.
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
    # What is not merged is this rank's own (``local``): see build_report.
    rep = _report.build_report(_C.report_from_packed(body), memory=merged_mem, top_modules=top_modules,
                               local=local)
    names = list(_report.partition()) + ["step"]
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
    rep["health"] = local.get("health") if local else None  # gradients are per rank: not merged
    rep["throughput"] = _throughput_totals(packed[:, -4:], local)
    return rep


def _throughput_totals(rows: torch.Tensor, local: Optional[dict]) -> Optional[dict]:
    # Sums over the ranks that know each figure; MFU = every rank's achieved FLOP/s over every rank's
    # peak, only when all ranks know both.
    own = (local or {}).get("throughput")
    if own is None:
        return None
    vals = rows.tolist()

    def total(i: int) -> Optional[float]:
        known = [r[i] for r in vals if r[i] >= 0]
        return sum(known) if len(known) == len(vals) else None

    flops, got, peak, tokens = total(0), total(1), total(2), total(3)
    out = dict(own, ranks=len(vals), flops_per_step=flops, achieved_flops=got, peak_flops=peak, tokens_per_s=tokens,
               achieved_flops_device=None, mfu_device=None)
    out["mfu"] = got / peak if got is not None and peak else None
    return out


def gather_report(mon: Any, group: Any = None, top_modules: int = 10, timeout: Timeout = None) -> dict:
    """``mon.report()`` merged over the ranks of ``group``, with a per-rank view (``ranks``).

    A collective: every rank of the group calls it, and each gets the same ``phases`` and
    ``ranks`` (see :func:`report_from_gathered`). Exactly one ``all_gather`` of one fixed-size
    tensor; nothing is exchanged during the steps. ``timeout`` (seconds or a ``timedelta``): wait at
    most that long for the other ranks, then raise :class:`CollectiveTimeoutError` naming the ranks
    that had not called it (default: the process group's own timeout).

    Example (under torchrun)::

        rep = mon.report(gather=True)
        if dist.get_rank() == 0:
            print(rep["ranks"]["phases"]["data"])   # slowest rank, its p50, the skew
    """
    local = mon.report(top_modules=top_modules)
    if timeout is not None:
        timeout_seconds("timeout", timeout)
    packed = gather_packed(mon, group, local["memory"], timeout=timeout, throughput=local.get("throughput"))
    return report_from_gathered(packed, local, top_modules=top_modules)
