"""What to fix first: rules over a Monitor's report dict, each a pure function.

    findings = stepscope.diagnose.diagnose(mon.report())     # or mon.diagnose()
    for f in findings:
        print(f["severity"], f["title"], f["advice"])

A finding is a dict: ``rule`` (the rule's name), ``severity`` (``info``, ``warn`` or
``critical``), ``title`` (one line), ``evidence`` (the numbers it rests on), ``advice`` (what to
change, naming the torch API) and ``saving`` (the share of step time at stake, or None when the
rule cannot say). :func:`diagnose` returns them ordered by saving, then severity. A healthy loop
gets nothing above ``info``.

Every rule reads only the report (no torch, no clock), so each is tested on crafted reports,
including those that need a GPU to arise. A rule whose inputs are absent (no CUDA memory, no
queue lag, no per-module timing) stays silent. Thresholds cite where they come from.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Optional

from .diagnose_health import HEALTH_RULES
from .diagnose_throughput import THROUGHPUT_RULES
from .report import Table, format_seconds, partition_bounds

SEVERITIES = ("info", "warn", "critical")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def __getattr__(name: str) -> Any:
    # The boundaries that open and close each partition phase, by the names the queue-lag report
    # uses: the phase table's (csrc/phases.h), read on first use.
    if name == "PHASE_BOUNDS":
        return partition_bounds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def finding(rule: str, severity: str, title: str, evidence: dict, advice: str,
            saving: Optional[float] = None) -> dict:
    if severity not in _RANK:
        raise ValueError(f"stepscope: severity must be one of {SEVERITIES}; got {severity!r}")
    return {"rule": rule, "severity": severity, "title": title, "evidence": evidence, "advice": advice,
            "saving": saving}


def _phase(rep: dict, name: str) -> dict:
    return rep["phases"][name]


def _per_step_p50(rep: dict, name: str) -> float:
    """A phase's typical time per step: its p50 per occurrence times its occurrences per step
    (gradient accumulation runs forward/backward several times in one step)."""
    h = _phase(rep, name)["host"]
    steps = rep.get("steady_steps", rep["steps"])  # the counts cover the steady steps
    if not steps or not h["count"]:
        return 0.0
    return h.get("p50", h["mean"]) * h["count"] / steps


def _step_p50(rep: dict) -> float:
    h = _phase(rep, "step")["host"]
    return h.get("p50", h["mean"]) if h["count"] else 0.0


def _share_of_p50_step(rep: dict, name: str) -> Optional[float]:
    step = _step_p50(rep)
    return _per_step_p50(rep, name) / step if step > 0 else None


# --------------------------------------------------------------------------- rules
def rule_input_bound(rep: dict) -> list:
    # PyTorch's TensorBoard profiler plugin recommended more DataLoader workers above 5% of the
    # step; step-level monitors warn at 10% and call 20% critical. 10/20 here, so that a loader
    # that costs a few percent does not nag.
    share = _share_of_p50_step(rep, "data")
    if share is None or share < 0.10:
        return []
    sev = "critical" if share >= 0.20 else "warn"
    return [finding(
        "input_bound", sev, f"input-bound: waiting for data is {100 * share:.0f}% of the median step",
        {"data_share": share, "data_ms_per_step": 1e3 * _per_step_p50(rep, "data"),
         "step_p50_ms": 1e3 * _step_p50(rep)},
        "Everything between the optimizer step and the next forward counts here (the loader, "
        ".to(device), zero_grad()). Feed the loop faster: DataLoader(num_workers=N, pin_memory=True, "
        "persistent_workers=True, prefetch_factor=4) and .to(device, non_blocking=True); move augmentation "
        "to the GPU; cache decoded samples. Measure which: stepscope.tune.loader(dataset, batch_size=...).",
        share)]


def rule_optimizer_heavy(rep: dict) -> list:
    # An optimizer step above a fifth of the step is what torch's fused/foreach implementations
    # exist for (one kernel over all parameters instead of one per parameter and operation).
    share = _share_of_p50_step(rep, "optimizer")
    if share is None or share < 0.20:
        return []
    return [finding(
        "optimizer_heavy", "warn", f"optimizer step is {100 * share:.0f}% of the median step",
        {"optimizer_share": share, "optimizer_ms_per_step": 1e3 * _per_step_p50(rep, "optimizer")},
        "Use the multi-tensor optimizers: torch.optim.AdamW(params, fused=True) on CUDA, or "
        "foreach=True; zero_grad(set_to_none=True); fewer, larger parameter groups. Measure which: "
        "stepscope.tune.step(train_step, model, optimizer, batch).",
        share)]


def rule_jitter(rep: dict) -> list:
    # Nsight Systems' and HTA's outlier rules look for steps far off the typical one; a p99 at
    # twice the p50, or steps over 3x the running median (the spikes), is the point where the
    # mean no longer describes the run.
    h = _phase(rep, "step")["host"]
    if not h["count"]:
        return []
    p50, p99 = h.get("p50", 0.0), h.get("p99", 0.0)
    ratio = p99 / p50 if p50 > 0 else 0.0
    spikes = rep.get("spikes") or []
    if ratio < 2.0 and not spikes:
        return []
    phases: dict = {}
    for s in spikes:
        phases[s["phase"]] = phases.get(s["phase"], 0) + 1
    worst = max(phases, key=phases.get) if phases else None
    where = f", mostly in {worst}" if worst else ""
    saving = (h["mean"] - p50) / h["mean"] if h["mean"] > 0 and h["mean"] > p50 else None
    return [finding(
        "jitter", "warn",
        f"uneven steps: p99 is {ratio:.1f}x the p50, {rep.get('spikes_total', len(spikes))} spike(s){where}",
        {"step_p50_ms": 1e3 * p50, "step_p99_ms": 1e3 * p99, "p99_over_p50": ratio,
         "spikes": rep.get("spikes_total", len(spikes)), "spike_phases": phases},
        "Find what runs now and then: Python's GC (gc.freeze() after setup, or gc.disable() with a "
        "periodic gc.collect()), logging or checkpointing inside the step, recompilation "
        "(TORCH_LOGS=recompiles), a shared machine. The spikes list names the phase that grew.",
        saving)]


def rule_launch_bound(rep: dict) -> list:
    # Holistic Trace Analysis splits GPU idle time into host wait and kernel wait; a queue that
    # stays near empty at every boundary means the GPU waits for the host's launches. 50 us is
    # a few kernel launches of slack.
    lag = rep.get("lag")
    if not rep.get("device") or not lag:
        return []
    p50s = {k: v["p50"] for k, v in lag.items() if v.get("count")}
    if not p50s or max(p50s.values()) >= 50e-6:
        return []
    return [finding(
        "launch_bound", "warn", "launch-bound: the GPU keeps up with the host at every boundary",
        {"max_lag_p50_us": 1e6 * max(p50s.values()), "lag_p50_us": {k: 1e6 * v for k, v in p50s.items()}},
        "Cut host work per kernel: CUDA graphs via torch.compile(model, mode=\"reduce-overhead\"), a larger "
        "batch, fused/foreach optimizers, fewer tiny ops (torch.compile fuses them). Measure the optimizer "
        "candidates: stepscope.tune.step(train_step, model, optimizer, batch).",
        None)]


def rule_sync_in_phase(rep: dict, phases: Table = None) -> list:
    # A queue that is long when a phase begins and empty when it ends drained inside that phase:
    # the host waited for the GPU there (.item(), print(tensor), .cpu(), a blocking copy). The
    # boundaries of each phase come from the phase table (``phases``: a saved run's).
    lag = rep.get("lag")
    if not rep.get("device") or not lag:
        return []
    out = []
    for phase, (b0, b1) in partition_bounds(phases).items():
        a, b = lag.get(b0), lag.get(b1)
        if not a or not b or not a.get("count") or not b.get("count"):
            continue
        if a["p50"] >= 1e-3 and b["p50"] < min(100e-6, 0.1 * a["p50"]):
            share = _phase(rep, phase).get("share_host")
            out.append(finding(
                "sync_in_phase", "warn", f"the host waits for the GPU inside {phase}",
                {"lag_at_begin_ms": 1e3 * a["p50"], "lag_at_end_ms": 1e3 * b["p50"], "phase_share": share},
                f"Something in {phase} synchronises: loss.item(), print(tensor), tensor.cpu()/.tolist(), "
                "torch.cuda.synchronize(), a blocking .to(); find it with "
                "torch.cuda.set_sync_debug_mode(\"warn\"), then accumulate on the device and read it once "
                "per epoch (ClassificationMetrics does this for metrics).",
                share))
    return out


def rule_memory(rep: dict) -> list:
    # PyTorch's profiler plugin warned above 90% of device memory; 97% leaves no room for the
    # allocator's rounding and is where out-of-memory errors start. Fragmentation: reserved at twice
    # allocated while a large share of the device (30%) is held.
    mem = rep.get("memory") or {}
    total = mem.get("total")
    out = []
    peak_res = mem.get("peak_reserved")
    if total and peak_res is not None:
        frac = peak_res / total
        if frac >= 0.90:
            out.append(finding(
                "memory_high", "critical" if frac >= 0.97 else "warn",
                f"peak reserved memory is {100 * frac:.0f}% of the device",
                {"peak_reserved_gib": peak_res / 2**30, "total_gib": total / 2**30, "fraction": frac},
                "Make room: activation checkpointing (torch.utils.checkpoint), bf16 autocast "
                "(torch.autocast(\"cuda\", dtype=torch.bfloat16)), a smaller batch with gradient accumulation."))
    res, alloc = mem.get("reserved"), mem.get("allocated")
    if total and res and alloc is not None and res >= 2 * max(alloc, 1) and res >= 0.30 * total:
        out.append(finding(
            "memory_fragmentation", "warn",
            f"the allocator holds {res / max(alloc, 1):.1f}x the memory in use",
            {"reserved_gib": res / 2**30, "allocated_gib": alloc / 2**30, "total_gib": total / 2**30},
            "Fragmentation: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before the first CUDA "
            "allocation; avoid tensors whose size changes every step."))
    trend = mem.get("trend")
    if trend and trend.get("steps", 0) >= 2:
        rise = trend["last"] - trend["first"]
        steady = trend.get("rising_fraction", 0.0) >= 0.9 and trend["steps"] >= 50 and rise > 0
        if rise >= 2**30 or steady:
            out.append(finding(
                "memory_growth", "warn", f"allocated memory grew by {rise / 2**20:.0f} MiB over the last "
                f"{trend['steps']} steps",
                {"first_mib": trend["first"] / 2**20, "last_mib": trend["last"] / 2**20,
                 "rising_fraction": trend.get("rising_fraction")},
                "Tensors are kept across steps: accumulate loss.item() or loss.detach(), not loss; clear "
                "lists of outputs; look for caches keyed by step (torch.cuda.memory._record_memory_history)."))
    return out


def rule_precision(rep: dict) -> list:
    # Tensor cores (compute capability 7.0 and newer) run bf16/fp16 and TF32 matrix work many
    # times faster than fp32; a loop that never enters autocast leaves that unused.
    ctx = rep.get("context") or {}
    cap = ctx.get("cuda_capability")
    if not cap or tuple(cap) < (7, 0) or ctx.get("param_dtype") != "float32":
        return []
    if ctx.get("train_forwards", 0) == 0 or ctx.get("autocast_forwards", 0) > 0:
        return []
    return [finding(
        "precision", "info", "fp32 training without autocast on a GPU with tensor cores",
        {"param_dtype": ctx.get("param_dtype"), "cuda_capability": list(cap),
         "autocast_forwards": ctx.get("autocast_forwards", 0)},
        "Wrap forward and loss in torch.autocast(\"cuda\", dtype=torch.bfloat16), or at least "
        "torch.backends.cuda.matmul.allow_tf32 = True (torch.set_float32_matmul_precision(\"high\")). "
        "stepscope.tune.step(train_step, model, optimizer, batch) times bf16/fp16 autocast and checks the loss.")]


def rule_eval_share(rep: dict) -> list:
    # Evaluation above a fifth of the training time is worth scheduling rather than accepting. The
    # whole evaluation stretch when the run has it (its forwards and the time between them).
    ev = (rep["phases"].get("eval") or _phase(rep, "eval_forward"))["host"]
    if not ev["count"]:
        ev = _phase(rep, "eval_forward")["host"]
    train = _phase(rep, "step")["host"]["total"]
    if not ev["count"] or train <= 0:
        return []
    share = ev["total"] / (train + ev["total"])
    if share < 0.20:
        return []
    return [finding(
        "eval_heavy", "warn", f"evaluation is {100 * share:.0f}% of the time",
        {"eval_s": ev["total"], "train_s": train, "eval_share": share},
        "Evaluate less often or on a subset; run it under torch.inference_mode() with a larger batch.",
        share)]


def rule_module_dominates(rep: dict) -> list:
    # One submodule above half of the forward is where optimisation effort should go first.
    mods = rep.get("modules") or {}
    fwd = _phase(rep, "forward")
    key = "device" if rep.get("device") and fwd["device"] and fwd["device"].get("count") else "host"
    fmean = fwd[key]["mean"] if fwd[key] else 0.0
    if not mods or fmean <= 0:
        return []
    big = [(name, v[key]["mean"] / fmean) for name, v in mods.items()
           if v.get(key) and v[key].get("count") and v[key]["mean"] / fmean >= 0.5]
    if not big:
        return []
    # The deepest such module: its containers are trivially as large.
    name, share = max(big, key=lambda t: (t[0].count("."), t[1]))
    fshare = fwd.get("share_device" if key == "device" else "share_host") or 0.0
    return [finding(
        "module_dominates", "info", f"{name} takes {100 * share:.0f}% of the forward",
        {"module": name, "share_of_forward": share},
        f"Look at {name} first: torch.compile it, change its shapes or precision, or profile it alone.",
        share * fshare or None)]


def rule_warmup(rep: dict) -> list:
    warm = rep.get("warmup") or {}
    steps = warm.get("steps", 0)
    p50 = _step_p50(rep)
    if not steps or p50 <= 0:
        return []
    per = warm["host"]["step"] / steps
    if per < 5 * p50:
        return []
    return [finding(
        "warmup", "info", f"warm-up: {steps} step(s) took {format_seconds(warm['host']['step'])}, "
        f"{per / p50:.0f}x a steady step",
        {"warmup_steps": steps, "warmup_s": warm["host"]["step"], "steady_step_p50_ms": 1e3 * p50},
        "Expected with torch.compile (compilation, CUDA-graph recording) and cudnn.benchmark; it is kept "
        "out of the statistics. If it is too long, try torch.compile(dynamic=False) or a compile cache.")]


def rule_dropped(rep: dict) -> list:
    n = rep.get("dropped_device_samples", 0)
    if not n:
        return []
    return [finding(
        "dropped_device_samples", "info", f"{n} device time sample(s) dropped",
        {"dropped": n},
        "The GPU ran so far behind the host that every timing event was in flight; device times cover "
        "the steps that were sampled. Nothing to fix in the model.")]


# A loop whose update no hook sees (a manual update such as ``p -= lr * p.grad``, no optimizer
# object, no mon.step()) ends no step, and every number above stays empty: say so before anything
# else. Two forwards at least, so that one probe forward before the loop does not raise it.
NO_STEP_FORWARDS = 2


def no_step_message(forwards: int) -> str:
    return (f"{forwards} forward/backward passes ran but no step ended: pass the optimizer to "
            "Monitor(model, optimizer), or call mon.step() after each update")


def rule_no_step(rep: dict) -> list:
    ctx = rep.get("context") or {}
    forwards = ctx.get("train_forwards", 0)
    warm = (rep.get("warmup") or {}).get("steps", 0)
    if rep.get("steps", 0) or warm or forwards < NO_STEP_FORWARDS:
        return []
    return [finding(
        "no_step", "critical", f"{forwards} forward/backward passes ran but no step ended",
        {"train_forwards": forwards, "steps": 0},
        "Pass the optimizer to Monitor(model, optimizer), or call mon.step() after each update: a manual "
        "update (p -= lr * p.grad) has no hook that could end the step, so nothing was timed.")]


# --------------------------------------------------------------------------- distributed
# Phases a straggler is looked for in. DDP's gradient all-reduce ends backward on every rank at
# the same moment (the fast ranks wait inside it for the slow one), so a slow rank shows as a
# *short* backward elsewhere and backward cannot name the culprit; `other` is left out for the
# same reason (collective waits queued after backward land there).
STRAGGLER_PHASES = ("data", "forward", "loss", "optimizer")
STRAGGLER_WARN = 0.10
STRAGGLER_CRITICAL = 0.20


def _per_step(entry: dict, key: str, p50: dict) -> float:
    # A phase's typical time per step: under gradient accumulation data/forward/loss happen
    # several times per step.
    steps = entry["count"]["step"]
    return p50[key] * entry["count"][key] / steps if steps else 0.0


def rule_straggler(rep: dict) -> list:
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
        >>> rule_straggler(mon.report(gather=True))  # doctest: +SKIP
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
        # The share of the median step the others spend waiting for this rank: min(over, 1).
        out.append(finding(
            "straggler", "critical" if over >= STRAGGLER_CRITICAL else "warn",
            f"rank {r} is a straggler: {100 * over:.0f}% of a step over the median rank, "
            f"most of it in {phase}",
            {"rank": r, "world_size": ranks["world_size"], "p50_step": p["p50"]["step"],
             "median_p50_step": med_step, "time_outside_backward": own[r], "median_time_outside_backward": med_own,
             "phase_excess": diffs[phase], "over_median": over},
            f"Rank {r} spends {1e3 * diffs[phase]:.2f} ms more per step in {phase} than the median rank, "
            "and every rank waits for it at the gradient all-reduce. Backward is not compared: "
            "DistributedDataParallel's all-reduce makes every rank's backward end together, so the "
            "fast ranks' wait shows up there. For data, give that rank's "
            "torch.utils.data.DataLoader more num_workers (and pin_memory=True), or check that the "
            "DistributedSampler shards are even; for compute phases, check that rank's device and "
            "inputs.",
            min(over, 1.0)))
    return out


RULES: list = [rule_no_step, rule_input_bound, rule_optimizer_heavy, rule_jitter, rule_launch_bound,
               rule_sync_in_phase, rule_memory, rule_precision, rule_eval_share, rule_module_dominates, rule_warmup,
               rule_dropped, rule_straggler, *HEALTH_RULES, *THROUGHPUT_RULES]


# Rules that read the phase table: diagnose() hands them its ``phases``.
_READ_THE_TABLE = (rule_sync_in_phase,)


class Findings(list):
    """What :func:`diagnose` returns: a list of finding dicts, shown as HTML in Jupyter."""

    def _repr_html_(self) -> str:
        from .export.page import findings_html

        return findings_html(self)


def diagnose(rep: dict, rules: Optional[list] = None, *, phases: Table = None) -> list:
    """Every finding of ``rules`` (default :data:`RULES`) on a report, largest saving first,
    then by severity. ``phases``: the phase table of a saved run (default the extension's)."""
    out: list = []
    for r in rules if rules is not None else RULES:
        fn: Callable[..., list] = r
        out.extend(fn(rep, phases=phases) if fn in _READ_THE_TABLE else fn(rep))
    return Findings(sorted(out, key=lambda f: (-(f["saving"] or 0.0), -_RANK[f["severity"]])))
