"""The Monitor's training health: which parameters it watches, and its report's ``"health"`` key.

The work per step is C++ (``_C.HealthWatch``, csrc/health/watch.h, run from the optimizer hooks
by csrc/python/step_health.cpp); this module only builds the watch at attach and turns its one
host read into the report's plain numbers.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import _C

NONFINITE_MODES = ("warn", "skip", "raise")
TOP_PARAMS = 10        # parameters listed in report()["health"]["top_params"]
RATIO_SAMPLES = 64     # sampled update-ratio steps kept
RATIO_MAX_BYTES = 1 << 30  # the update ratio copies the parameters on a sampled step: off above this


def check_options(health: Any, nonfinite: Any, update_ratio_every: Any) -> None:
    if not isinstance(health, bool):
        raise TypeError(f"stepscope: health must be True or False; got {health!r}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"stepscope: nonfinite must be one of {', '.join(map(repr, NONFINITE_MODES))}; "
                         f"got {nonfinite!r}")
    every = update_ratio_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"stepscope: update_ratio_every must be an int >= 0 (0: off); got {every!r}")


def watched(models: Sequence[torch.nn.Module]) -> Tuple[List[torch.Tensor], List[str]]:
    """The parameters that require a gradient, once each (shared ones under their first name),
    named as ``named_parameters()`` names them (``"<i>."`` in front with several models)."""
    seen: set = set()
    params: List[torch.Tensor] = []
    names: List[str] = []
    for i, m in enumerate(models):
        for n, p in m.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            params.append(p)
            names.append(f"{i}.{n}" if len(models) > 1 else n)
    return params, names


def make_watch(models: Sequence[torch.nn.Module], opts: Sequence[torch.optim.Optimizer], ring: int,
               nonfinite: str, update_ratio_every: int) -> Tuple[Any, List[int]]:
    """The watch over the models' parameters, and each parameter's group (:func:`groups`)."""
    params, names = watched(models)
    watch = _C.HealthWatch(params, names, ring=ring, nonfinite=nonfinite, ratio_every=update_ratio_every,
                           ratio_samples=RATIO_SAMPLES, ratio_max_bytes=RATIO_MAX_BYTES)
    return watch, groups(opts, params)


def check_observe(mon: Any, loss: Any) -> None:
    if not mon.attached:
        raise RuntimeError("stepscope: Monitor.observe() needs an attached Monitor")
    if mon._watch is None:
        raise RuntimeError("stepscope: Monitor.observe() needs health on (Monitor(health=True))")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"stepscope: observe() takes the loss tensor; got {type(loss).__name__}")


def groups(opts: Sequence[torch.optim.Optimizer], params: Sequence[torch.Tensor]) -> List[int]:
    """The parameter group of each watched parameter: the optimizers' param_groups numbered in
    order (optimizer by optimizer); 0 for every parameter without optimizers given."""
    where: Dict[int, int] = {}
    g = 0
    for o in opts:
        for group in o.param_groups:
            for p in group["params"]:
                where.setdefault(id(p), g)
            g += 1
    return [where.get(id(p), g if opts else 0) for p in params]


def _ratio(samples: list, index: Sequence[int]) -> Optional[dict]:
    vals = []
    for _, dw, w in samples:
        num = math.sqrt(sum(dw[i] ** 2 for i in index))
        den = math.sqrt(sum(w[i] ** 2 for i in index))
        if den > 0 and math.isfinite(num):
            vals.append(num / den)
    if not vals:
        return None
    return {"last": vals[-1], "mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}


def _update_ratio(raw: dict, group_of: List[int]) -> Optional[dict]:
    if raw["ratio_every"] == 0 or raw["ratio_off"]:
        return None
    samples = raw["ratio"]
    out: Dict[str, Any] = {"every": raw["ratio_every"], "samples": len(samples),
                           "overall": _ratio(samples, range(len(group_of))), "groups": []}
    for g in sorted(set(group_of)):
        index = [i for i, x in enumerate(group_of) if x == g]
        r = _ratio(samples, index)
        if r is not None:
            out["groups"].append({"group": g, "params": len(index), **r})
    return out


def _loss(raw: dict) -> Optional[dict]:
    loss = raw["loss"]
    if loss["count"] == 0:
        return None
    vals = [v for _, v in loss["recent"] if math.isfinite(v)]
    first = loss["first_nonfinite_step"]
    return {"count": loss["count"], "window": len(loss["recent"]),
            "mean": sum(vals) / len(vals) if vals else None, "min": min(vals) if vals else None,
            "max": max(vals) if vals else None, "last": loss["recent"][-1][1],
            "nonfinite_steps": sum(1 for _, v in loss["recent"] if not math.isfinite(v)),
            "first_nonfinite_step": first if first >= 0 else None}


def health_report(watch: Any, group_of: List[int]) -> dict:
    """``report()["health"]`` from one read of the watch (its keys: the README's "In the Monitor's
    report")."""
    raw = watch.read()
    g = raw["grads"]
    names = list(watch.names)
    params = [dict(name=n, **{k: p[k] for k in ("norm_last", "norm_max", "norm_mean")})
              for n, p in zip(names, g["params"])]
    top = sorted(params, key=lambda p: -p["norm_max"])[:TOP_PARAMS]
    first = g["first_nonfinite_param"]
    first_step = g["first_nonfinite_step"] if g["first_nonfinite_step"] >= 0 else None
    loss = _loss(raw)
    loss_nonfinite = None
    if loss is not None and first_step is not None:
        loss_first = loss["first_nonfinite_step"]
        loss_nonfinite = loss_first is not None and loss_first <= first_step
    steps = g["steps"]
    return {
        "steps": steps,
        "grad_norm": g["grad_norm"],
        "top_params": top,
        "nonfinite": {"steps": g["nonfinite_steps"], "first_step": first_step,
                      "first_param": names[first] if first >= 0 else None, "loss_nonfinite": loss_nonfinite,
                      "counts": raw["counts"], "mode": raw["mode"], "skipped": raw["skipped"]},
        "no_grad": {"names": [n for n, p in zip(names, g["params"]) if 0 < steps == p["no_grad_steps"]],
                    "steps": steps},
        "update_ratio": _update_ratio(raw, group_of),
        "update_ratio_off": raw["ratio_off"] or None,
        "loss": loss,
        "recent": [[e["step"], e["grad_norm"]] for e in g["recent"]],
        "recent_loss": [[s, v] for s, v in raw["loss"]["recent"]],
        "disabled": raw["disabled"] or None,
        "bytes": raw["state_bytes"],
    }


def report_of(mon: Any) -> Optional[dict]:
    """A Monitor's ``report()["health"]``: None while health is off or before the first attach."""
    return health_report(mon._watch, mon._groups) if mon._watch is not None else None


def join_recent(steps: list, health: Optional[dict]) -> list:
    """recent_steps() entries with the step's ``grad_norm`` and ``loss`` (None where unknown)."""
    norms = {s: v for s, v in health["recent"]} if health else {}
    losses = {s: v for s, v in health["recent_loss"]} if health else {}
    for e in steps:
        e["grad_norm"] = norms.get(e["step"])
        e["loss"] = losses.get(e["step"])
    return steps
