"""Training-health rules and the summary's health section, over ``report()["health"]``.

The rules are those of :mod:`stepscope.diagnose` (pure functions of the report dict, in its
``RULES``): non-finite gradients, gradient-norm spikes, parameters that never get a gradient, an
update-to-weight ratio far from the usual range, loss spikes, and statistics switched off.
A report without health (``"health"`` None or absent: health off, or a run saved before it) makes
every one of them silent and the summary leaves the section out.
"""

from __future__ import annotations

import bisect
import collections
import math
import statistics
from typing import Any, Callable, Optional, Sequence


def _finding(*args: Any, **kw: Any) -> dict:
    # diagnose imports this module for its RULES: its finding() is read at call time.
    from .diagnose import finding

    return finding(*args, **kw)


def _health(rep: dict) -> Optional[dict]:
    return rep.get("health") or None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _names(names: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


# A spike is judged against the steps before it: the median of the previous SPIKE_WINDOW finite
# values, once at least SPIKE_MIN_BEFORE of them exist (a shorter history has no typical value
# yet: with 8, the MAD of a healthy loss of batches of 8 was small enough by chance to call a 1.3-1.7x
# loss a spike in 3 runs of 40; with 16, in none of 150). Non-finite values are left out of the
# window and never called spikes: the non-finite rule speaks of them.
SPIKE_WINDOW = 32
SPIKE_MIN_BEFORE = 16
SPIKES_SHOWN = 5


def _spikes(series: Sequence[Sequence[float]], is_spike: Callable[[float, list], Optional[dict]]) -> list:
    """[(step, value, judgement)] for each [step, value] that ``is_spike(value, window)`` judges a
    spike (it returns the numbers behind the judgement, or None). ``window`` is the previous
    finite values in ascending order (kept sorted as it slides: a saved 4096-step ring was 50 ms of
    statistics.median calls)."""
    out, fifo, window = [], collections.deque(), []
    for step, value in series:
        if not _finite(value):
            continue
        if len(window) >= SPIKE_MIN_BEFORE:
            got = is_spike(value, window)
            if got is not None:
                out.append({"step": int(step), **got})
        fifo.append(value)
        bisect.insort(window, value)
        if len(fifo) > SPIKE_WINDOW:
            del window[bisect.bisect_left(window, fifo.popleft())]
    return out


def _median(ordered: list) -> float:
    """statistics.median of values already in ascending order."""
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


# --------------------------------------------------------------------------- rules
def rule_nonfinite_grads(rep: dict) -> list:
    # Any NaN/inf gradient is critical: one update with it makes the weights (and Adam's moment
    # estimates, which keep it for good) non-finite. torch.amp.GradScaler skips every step whose
    # gradients hold one for the same reason (PyTorch docs, "Automatic Mixed Precision").
    h = _health(rep)
    nf = (h or {}).get("nonfinite") or {}
    if not nf.get("steps"):
        return []
    step, param, loss_bad = nf.get("first_step"), nf.get("first_param"), nf.get("loss_nonfinite")
    mode, skipped = nf.get("mode"), nf.get("skipped", 0)
    if loss_bad:
        cause = ("The loss was already non-finite at that step, so the forward or the loss made it: check "
                 "that step's inputs (NaN/inf in the data), log/sqrt/division of 0 (add an eps, use "
                 "log_softmax/logsumexp or F.cross_entropy on logits), and fp16 overflow (autocast with "
                 "dtype=torch.bfloat16, or torch.amp.GradScaler with fp16).")
    elif loss_bad is False:
        cause = (f"The loss was finite at that step, so the backward made it, in or behind {param}: a "
                 "gradient of sqrt/pow/norm at 0, a division by a tiny number, or fp16 overflow in the "
                 "backward (torch.amp.GradScaler, or bf16). Run that step once under "
                 "torch.autograd.detect_anomaly() to name the op.")
    else:
        cause = ("The loss was not seen, so stepscope cannot tell whether the forward or the backward made "
                 "it: hand the loss over with mon.observe(loss), or check the loss at that step.")
    if mode == "skip":
        what = f"The Monitor skipped {skipped} update(s) with non-finite gradients."
    elif mode == "raise":
        what = "The Monitor raised at the first one."
    else:
        what = ("The optimizer stepped with them (mode \"warn\"): the weights are likely non-finite now; "
                "Monitor(nonfinite=\"skip\") skips such updates, \"raise\" stops at the first.")
    return [_finding(
        "nonfinite_grads", "critical",
        f"non-finite gradients in {nf['steps']} step(s), first at step {step} in {param}",
        {"steps": nf["steps"], "first_step": step, "first_param": param, "loss_nonfinite": loss_bad,
         "counts": nf.get("counts"), "mode": mode, "skipped": skipped},
        f"{cause} {what}")]


# Gradient-norm spikes: at least 10x the median of the previous 32 finite norms. stepscope's own
# choice, because the global norm wanders by a factor of a few over ordinary training (it rises
# after warm-up, falls as the loss does) and the step-time rule's 3x would flag that; an order of
# magnitude within 32 steps is the jump that precedes a diverging or spiking loss.
GRAD_SPIKE_FACTOR = 10.0


def _grad_spike(value: float, window: list) -> Optional[dict]:
    med = _median(window)
    if med <= 0 or value < GRAD_SPIKE_FACTOR * med:
        return None
    return {"grad_norm": value, "median": med, "factor": value / med}


def rule_grad_norm_spikes(rep: dict) -> list:
    h = _health(rep)
    spikes = _spikes((h or {}).get("recent") or [], _grad_spike)
    if not spikes:
        return []
    worst = max(spikes, key=lambda s: s["factor"])
    return [_finding(
        "grad_norm_spikes", "warn",
        f"gradient norm spiked in {len(spikes)} step(s), at most {worst['factor']:.0f}x the running median "
        f"(step {worst['step']})",
        {"spikes": len(spikes), "steps": [s["step"] for s in spikes[:SPIKES_SHOWN]],
         "factors": [s["factor"] for s in spikes[:SPIKES_SHOWN]], "max_factor": worst["factor"],
         "threshold": GRAD_SPIKE_FACTOR, "window": SPIKE_WINDOW, "first": spikes[:SPIKES_SHOWN]},
        "Clip the global norm before the optimizer step: torch.nn.utils.clip_grad_norm_(model.parameters(), "
        "max_norm) with max_norm near the usual norm (the summary's p90); lower the learning rate or "
        "lengthen the warm-up (torch.optim.lr_scheduler.LinearLR); look at the batches of those steps "
        "(outliers, corrupt or very long samples).")]


# A parameter with no gradient over at least 5 steps is not chance (a step skipped by a router or a
# conditional branch): stepscope's own choice, because fewer steps would flag parameters that are
# simply late to be used, and waiting longer delays the warning in a short run.
NO_GRAD_MIN_STEPS = 5


def rule_no_grad(rep: dict) -> list:
    ng = (_health(rep) or {}).get("no_grad") or {}
    names = list(ng.get("names") or [])
    if not names or ng.get("steps", 0) < NO_GRAD_MIN_STEPS:
        return []
    return [_finding(
        "no_grad", "warn",
        f"{len(names)} parameter(s) never got a gradient in {ng['steps']} steps: {_names(names)}",
        {"count": len(names), "names": names[:10], "steps": ng["steps"]},
        "These require a gradient but none reached them: an unused branch or head (called in no forward, "
        "or its output not in the loss), a tensor detached on the way (.detach(), .item(), .data, "
        "torch.no_grad() around part of the forward), or a module meant to train but frozen by mistake "
        "(or meant to be frozen: set requires_grad_(False) and leave it out of the optimizer). Under "
        "DistributedDataParallel such parameters need find_unused_parameters=True, which costs an "
        "extra pass over the autograd graph every step; removing them is better.")]


# Update-to-weight ratio: CS231n's notes ("Neural Networks Part 3: Learning and Evaluation", the
# ratio of the updates to the values) put a healthy ||dw|| / ||w|| at about 1e-3. A mean ten times
# above (1e-2) or a hundred times below (1e-5) is where the learning rate is off; 3 samples at
# least (stepscope's own choice), so that one sampled warm-up step does not decide.
UPDATE_RATIO_HIGH = 1e-2
UPDATE_RATIO_LOW = 1e-5
UPDATE_RATIO_MIN_SAMPLES = 3


def rule_update_ratio(rep: dict) -> list:
    ur = (_health(rep) or {}).get("update_ratio")
    if not ur or ur.get("samples", 0) < UPDATE_RATIO_MIN_SAMPLES:
        return []
    mean = (ur.get("overall") or {}).get("mean")
    if not _finite(mean) or UPDATE_RATIO_LOW <= mean <= UPDATE_RATIO_HIGH:
        return []
    high = mean > UPDATE_RATIO_HIGH
    groups = [{k: g.get(k) for k in ("group", "params", "mean", "min", "max", "last")}
              for g in ur.get("groups") or []]
    if high:
        title = f"updates are large for the weights: mean ||dw||/||w|| is {mean:.1e} (about 1e-3 is usual)"
        advice = (f"The learning rate is probably too high: about {mean / 1e-3:.0f}x, if the ratio scales "
                  "with it. "
                  "Lower it (or the groups with the largest ratio), lengthen the warm-up, clip gradients "
                  "(clip_grad_norm_); check weights initialised near 0, which make any update large.")
    else:
        title = f"updates are tiny for the weights: mean ||dw||/||w|| is {mean:.1e} (about 1e-3 is usual)"
        advice = ("The learning rate is probably too low, or the weights barely move: check the scheduler "
                  "(optimizer.param_groups[i][\"lr\"] decayed to ~0), that the parameters are in the "
                  "optimizer and not frozen, and weight decay or gradient scaling that cancels the update.")
    return [_finding(
        "update_ratio", "warn", title,
        {"mean": mean, "overall": ur.get("overall"), "samples": ur["samples"], "every": ur.get("every"),
         "groups": groups, "usual": 1e-3, "low": UPDATE_RATIO_LOW, "high": UPDATE_RATIO_HIGH},
        advice)]


# Loss spikes: a loss above the median of the previous 32 finite losses by more than 6 MADs (the
# median absolute deviation; Hampel's outlier test uses 3 scaled MADs, about 2 here: 6 keeps
# ordinary noise quiet while the loss falls) and by at least 25% of that median (stepscope's own
# choice, so that a loss with almost no noise is not flagged for a tiny wobble).
LOSS_SPIKE_MADS = 6.0
LOSS_SPIKE_REL = 0.25


def _loss_spike(value: float, window: list) -> Optional[dict]:
    med = _median(window)
    jump = value - med
    if jump <= 0 or jump < LOSS_SPIKE_REL * abs(med):
        return None
    mad = statistics.median(abs(x - med) for x in window)
    if jump <= LOSS_SPIKE_MADS * mad:
        return None
    return {"loss": value, "median": med, "mad": mad}


def rule_loss_spikes(rep: dict) -> list:
    spikes = _spikes((_health(rep) or {}).get("recent_loss") or [], _loss_spike)
    if not spikes:
        return []
    shown = spikes[:SPIKES_SHOWN]
    return [_finding(
        "loss_spikes", "warn",
        f"the loss spiked in {len(spikes)} step(s), first at step {spikes[0]['step']} "
        f"({spikes[0]['loss']:.4g} against a median of {spikes[0]['median']:.4g})",
        {"spikes": len(spikes), "steps": [s["step"] for s in shown], "losses": [s["loss"] for s in shown],
         "medians": [s["median"] for s in shown], "mads": LOSS_SPIKE_MADS, "rel": LOSS_SPIKE_REL,
         "window": SPIKE_WINDOW},
        "Look at the batches of those steps first (corrupt, mislabeled or duplicated samples, an unusually "
        "long sequence). A spike the loss recovers from slowly points at the optimisation: lower the "
        "learning rate or lengthen the warm-up, clip gradients (clip_grad_norm_); large runs restart from a "
        "checkpoint before the spike and skip those batches (PaLM, Chowdhery et al. 2022, section 5.1).")]


def rule_health_disabled(rep: dict) -> list:
    why = (_health(rep) or {}).get("disabled")
    if not why:
        return []
    return [_finding(
        "health_disabled", "info", f"gradient statistics switched off: {why}",
        {"reason": why, "steps": _health(rep).get("steps")},
        "The health numbers cover only the steps before it (none when it was off from attach: a model "
        "without parameters, or parameters on several devices); the training itself is not affected.")]


HEALTH_RULES: list = [rule_nonfinite_grads, rule_grad_norm_spikes, rule_no_grad, rule_update_ratio,
                      rule_loss_spikes, rule_health_disabled]


# --------------------------------------------------------------------------- summary
def _g(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else "-"


def format_health(rep: dict) -> list:
    """The summary's health lines: gradient norm, non-finite gradients, parameters without a
    gradient, update ratio and loss when known. [] when the report has no health."""
    h = _health(rep)
    if h is None:
        return []
    lines = [f"health (gradient statistics over {h.get('steps', 0)} steps):"]
    gn = h.get("grad_norm") or {}
    if gn.get("count"):
        # The header gives the steps; the count only where non-finite norms left some out.
        finite = f" over {gn['count']} finite steps" if gn["count"] != h.get("steps") else ""
        lines.append(f"  grad norm p50 {_g(gn.get('p50'))}, p90 {_g(gn.get('p90'))}, max {_g(gn.get('max'))}"
                     f", last {_g(gn.get('last'))}{finite}")
    else:
        lines.append("  grad norm: no finite norm yet")
    nf = h.get("nonfinite") or {}
    lines.append(f"  non-finite gradients: {nf['steps']} step(s), first at step {nf.get('first_step')} in "
                 f"{nf.get('first_param')}" if nf.get("steps") else "  non-finite gradients: none")
    names = list((h.get("no_grad") or {}).get("names") or [])
    lines.append(f"  never a gradient: {len(names)} parameter(s): {_names(names, 3)}" if names
                 else "  never a gradient: none")
    ur = h.get("update_ratio")
    if ur and ur.get("samples"):
        mean = (ur.get("overall") or {}).get("mean")
        lines.append(f"  update ratio ||dw||/||w||: mean {f'{mean:.2e}' if _finite(mean) else '-'} "
                     f"over {ur['samples']} sampled steps (one in {ur.get('every')})")
    loss = h.get("loss")
    if loss and loss.get("count"):
        lines.append(f"  loss last {_g(loss.get('last'))}, min {_g(loss.get('min'))}"
                     f" over {loss['count']} observed losses"
                     + (f", {loss['nonfinite_steps']} non-finite" if loss.get("nonfinite_steps") else ""))
    if h.get("disabled"):
        lines.append(f"  switched off: {h['disabled']}")
    return lines
