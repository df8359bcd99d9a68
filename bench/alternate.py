"""The ``--alternate`` mode of bench/overhead_bench.py: every variant trains its own copy of the
model (same seed, same batches), all at once, and the variants take turns step by step, in a fresh
random order each turn (``--only`` names them; the default is :data:`DEFAULT`). Each step is timed
by itself; a block's figure is each variant's median step over ``--steps`` turns, and its ratio is
to the bare copy's median in the same block.

Taking turns a step at a time puts every variant within a few milliseconds of the others, so a
shared machine's drift (other tenants, the clock) moves them alike: the ratios stay steady where
rounds of whole runs (the default mode) scatter by more than the cost of a hook. What it cannot
include: torch.profiler (one per process, it would see every copy) and Monitors without
optimizers (their global hooks would time every copy).
"""

from __future__ import annotations

import random
import statistics
import time

import torch

import stepscope
from stepscope.report import PARTITION

from health_variants import CHECKS


def _plain(model, opt, xs, ys, observe=None, check=None):
    f = torch.nn.functional.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i):
        loss = f(model(xs[i & 7]), ys[i & 7])
        if observe is not None:
            observe(loss)
        loss.backward()
        if check is not None:
            check(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def perf_counter_step(model, opt, xs, ys):
    # What people write by hand: a clock read at each boundary, accumulated per phase.
    f = torch.nn.functional.cross_entropy
    pc = time.perf_counter
    acc = dict.fromkeys(PARTITION, 0.0)
    last = [pc()]

    def step(i):
        a = pc()
        acc["data"] += a - last[0]
        out = model(xs[i & 7])
        b = pc()
        acc["forward"] += b - a
        loss = f(out, ys[i & 7])
        c = pc()
        acc["loss"] += c - b
        loss.backward()
        d = pc()
        acc["backward"] += d - c
        e = pc()
        acc["other"] += e - d
        opt.step()
        opt.zero_grad(set_to_none=True)
        last[0] = pc()
        acc["optimizer"] += last[0] - e
    return step


def _noop_hooks(model, opt, xs, ys):
    def noop(*args, **kwargs):
        return None

    model.register_forward_pre_hook(noop, with_kwargs=True)
    model.register_forward_hook(noop, always_call=True)
    opt.register_step_pre_hook(noop)
    opt.register_step_post_hook(noop)
    return _plain(model, opt, xs, ys)


def _monitor(observe=False, **kw):
    def make(model, opt, xs, ys):
        mon = stepscope.Monitor(model, opt, **kw).attach()
        step = _plain(model, opt, xs, ys, observe=mon.observe if observe else None)
        step.monitor = mon  # type: ignore[attr-defined]
        return step
    return make


VARIANTS = {
    "bare": _plain,
    "monitor": _monitor(),
    "monitor+module": _monitor(per_module=True, per_module_every=10),
    "module every 1": _monitor(per_module=True, per_module_every=1),
    "perf_counter": perf_counter_step,
    "no-op hooks": _noop_hooks,
    "health off": _monitor(health=False),
    "+observe": _monitor(observe=True),
    "flops off": _monitor(flops=None),
    **{k: (lambda c: lambda model, opt, xs, ys: _plain(model, opt, xs, ys, check=c))(c)
       for k, c in CHECKS.items()},
}


#: The variants run when none are named: the Monitor against its floor, small enough (five copies of
#: the MLP's weights, gradients and momentum, about 12 MB) that the copies stay in the last-level cache.
DEFAULT = ("bare", "no-op hooks", "perf_counter", "monitor", "health off")


def run(make, blocks: int, steps: int, names=DEFAULT) -> dict:
    """``make(seed)`` -> (model, opt, xs, ys), a fresh copy. Returns variant -> per-block median
    step times (s), for the variants ``names`` ("bare" always)."""
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"overhead_bench: unknown variants {unknown}; known: {sorted(VARIANTS)}")
    fns = {}
    for k in ("bare", *(n for n in names if n != "bare")):
        v = VARIANTS[k]
        model, opt, xs, ys = make(0)
        fns[k] = v(model, opt, xs, ys)
    for fn in fns.values():  # warm every path (allocator, first counted step, hooks)
        for i in range(20):
            fn(i)
    order = list(fns)
    rng = random.Random()  # a fresh order every run
    pc = time.perf_counter
    out: dict = {k: [] for k in fns}
    for _ in range(blocks):
        ts: dict = {k: [] for k in fns}
        for i in range(steps):
            rng.shuffle(order)
            for k in order:
                t0 = pc()
                fns[k](i)
                ts[k].append(pc() - t0)
        for k, v in ts.items():
            out[k].append(statistics.median(v))
    for fn in fns.values():
        mon = getattr(fn, "monitor", None)
        if mon is not None:
            mon.detach()
    return out


def table(times: dict, boundaries: int) -> None:
    bare = times["bare"]
    print(f"{'variant':18s} {'median ms':>10s} {'ratio':>7s} {'min-max':>13s} {'us/step':>8s} "
          f"{'us/boundary':>12s}")
    for k, v in times.items():
        r = [t / b for t, b in zip(v, bare)]
        extra = statistics.median(t - b for t, b in zip(v, bare)) * 1e6
        per_b = f"{extra / boundaries:.2f}" if k not in ("bare", "no-op hooks", *CHECKS) else "-"
        print(f"{k:18s} {statistics.median(v) * 1e3:10.4f} {statistics.median(r):7.4f} "
              f"{min(r):6.4f}-{max(r):<6.4f} {extra:8.1f} {per_b:>12s}")
    if not {"monitor+module", "module every 1", "monitor"} <= set(times):
        return
    mods = [(a - m) / (e - m)
            for a, e, m in zip(times["monitor+module"], times["module every 1"], times["monitor"]) if e > m]
    if mods:
        print(f"per_module_every=10 costs {statistics.median(mods):.1%} of per_module_every=1 (median over "
              f"{len(mods)} blocks, {len(bare) - len(mods)} left out as noise; 10% is the ideal)")
