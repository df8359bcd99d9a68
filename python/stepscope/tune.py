"""Measured answers to the diagnosis: try the fixes it names on the user's own loop, and say what
each one buys, with its spread and whether the numbers stayed the same.

    best = stepscope.tune.loader(dataset, batch_size=64).best      # DataLoader keyword arguments
    print(stepscope.tune.step(train_step, model, optimizer, batch).summary())

Neither tuner touches the user's objects: :func:`loader` builds its own DataLoaders over the same
dataset, :func:`step` runs each candidate on a deep copy of the model and a new optimizer loaded
with a copy of the optimizer's state. Each configuration is warmed up, then timed in rounds
(candidates interleaved round by round, so that a machine's drift hits all alike); a figure is
the median over rounds, with the min-max spread. The cheapest configuration within ``tolerance``
(3%) of the fastest is recommended: more workers cost memory, and a step candidate must also pass
its numerics check. One line per configuration goes to the ``"stepscope"`` logger as it is tried.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch

from ._tune_result import TuneResult, load_result, plot_result  # noqa: F401  (torch-free: the CLI reads results)

log = logging.getLogger("stepscope")


def _spread(xs: list) -> tuple:
    return statistics.median(xs), min(xs), max(xs)


def _pick(rows: list, key: str, tolerance: float) -> Optional[dict]:
    # The first row (rows are ordered cheapest first) within tolerance of the fastest.
    ok = [r for r in rows if r.get(key) and r.get("ok", True)]
    if not ok:
        return None
    top = max(r[key] for r in ok)
    return next(r for r in ok if r[key] >= top * (1 - tolerance))


# --------------------------------------------------------------------------- loader
def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _loader_configs(cpus: int, cuda: bool) -> list:
    workers = [0] + [w for w in (1, 2, 4, 8, 16, 32) if w <= max(cpus, 1)]
    out = [{"num_workers": w} for w in workers]
    out += [{"num_workers": w, "prefetch_factor": 4} for w in workers if w >= 2]
    if cuda:
        out += [{**c, "pin_memory": True} for c in list(out)]
    return out


def _time_loader(dl: torch.utils.data.DataLoader, warmup: int, batches: int, rounds: int) -> list:
    # A dataset shorter than warmup + rounds x batches is read for several epochs, as training
    # reads it; the start of each new epoch (workers started again) falls inside a round.
    cur = [iter(dl)]  # the epoch being read; an ended one is shut down at once

    def next_batch():
        try:
            return next(cur[0])
        except StopIteration:
            _shut(cur[0])
            cur[0] = iter(dl)
            try:
                return next(cur[0])
            except StopIteration:
                raise ValueError("stepscope: tune.loader: the DataLoader gives no batch") from None
    try:
        for _ in range(warmup):  # worker start-up and the first prefetch: not the steady rate
            next_batch()
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(batches):
                next_batch()
            rates.append(batches / (time.perf_counter() - t0))
        return rates
    finally:
        _shut(cur[0])  # on an error or Ctrl-C too: no worker process is left behind
        cur.clear()


def _shut(it) -> None:
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def loader(data: Any, *, batch_size: Optional[int] = None, budget_s: float = 30.0, batches: int = 20,
           rounds: int = 3, warmup: int = 3, tolerance: float = 0.03, configs: Optional[list] = None,
           **loader_kwargs: Any) -> TuneResult:
    """Tries DataLoader configurations over ``data`` (a Dataset, or a DataLoader whose dataset,
    batch size, sampler settings and collate function are kept): ``num_workers`` 0, 1, 2, 4, ... up
    to the usable CPUs, ``prefetch_factor=4`` beside the default 2, ``pin_memory`` when CUDA is
    there (``configs`` replaces the list). Each is warmed up (``warmup`` batches: worker start-up)
    and timed over ``rounds`` x ``batches`` batches. New configurations start while the elapsed time
    is under ``budget_s``. ``best``: the keyword arguments of the cheapest configuration within
    ``tolerance`` of the fastest, with ``persistent_workers=True`` when it has workers (not timed:
    it saves the workers' start-up at each epoch, not steady time). A configuration whose workers
    fail (an unpicklable dataset) is a row with its error."""
    if isinstance(data, torch.utils.data.DataLoader):
        base = {"batch_size": data.batch_size, "collate_fn": data.collate_fn, "drop_last": data.drop_last}
        dataset = data.dataset
    else:
        base, dataset = {}, data
    if batch_size is not None:
        base["batch_size"] = batch_size
    base.update(loader_kwargs)
    if budget_s <= 0 or batches < 1 or rounds < 1 or warmup < 0:
        raise ValueError("stepscope: tune.loader needs budget_s > 0, batches >= 1, rounds >= 1 and warmup >= 0")
    per = base.get("batch_size") or 1
    rows, t0 = [], time.perf_counter()
    for cfg in configs if configs is not None else _loader_configs(_usable_cpus(), torch.cuda.is_available()):
        if time.perf_counter() - t0 > budget_s:
            rows.append({"config": cfg, "skipped": f"over budget_s={budget_s}"})
            continue
        row: dict = {"config": dict(cfg)}
        try:
            rates = _time_loader(torch.utils.data.DataLoader(dataset, **{**base, **cfg}), warmup, batches, rounds)
            med, lo, hi = _spread(rates)
            row.update(batches_per_s=med, spread=(lo, hi), samples_per_s=med * per)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - a configuration that cannot run is a row that says why
            row.update(ok=False, error=_why(e))
        log.info("stepscope tune.loader: %s", _loader_line(row))
        rows.append(row)
    timed = [r for r in rows if r.get("batches_per_s")]
    base_rate = next((r["batches_per_s"] for r in timed if r["config"].get("num_workers", 0) == 0), None)
    for r in timed:
        r["speedup"] = r["batches_per_s"] / base_rate if base_rate else None
    best = _pick(timed, "batches_per_s", tolerance)
    kw = dict(best["config"]) if best else {}
    if kw.get("num_workers"):
        kw["persistent_workers"] = True
    for r in rows:
        r["name"] = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        r["note"] = r.get("error") or r.get("skipped")
    return TuneResult(kind="loader", rows=rows, best=kw, best_name=best["name"] if best else None,
                      baseline="num_workers=0", elapsed_s=time.perf_counter() - t0,
                      columns=["name", "batches_per_s", "samples_per_s", "speedup", "spread", "note"],
                      method=f"median of {rounds} rounds x {batches} batches after {warmup} warm-up batches; the "
                             f"cheapest within {100 * tolerance:.0f}% of the fastest")


def _why(e: BaseException) -> str:
    # One line: the error's first line and, for a worker's re-raised traceback, its last (the cause).
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += " ... " + lines[-1]
    return f"{type(e).__name__}: {text[:300]}"


def _loader_line(row: dict) -> str:
    if "batches_per_s" in row:
        return f"{row['config']}: {row['batches_per_s']:.1f} batches/s"
    return f"{row['config']}: {row.get('error')}"


# --------------------------------------------------------------------------- step
def copy_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **opt_overrides: Any) -> tuple:
    """A deep copy of ``model`` and a new optimizer of the same class over the copy's parameters,
    with the same parameter groups and hyperparameters (``opt_overrides`` changed: ``foreach``,
    ``fused``) and a copy of the optimizer's state. The originals are only read."""
    twin = copy.deepcopy(model)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    params = list(twin.parameters())
    groups = []
    for g in optimizer.param_groups:
        hyper = {k: v for k, v in g.items() if k != "params"}
        hyper.update(opt_overrides)
        groups.append({"params": [params[index[id(p)]] for p in g["params"]], **hyper})
    opt = type(optimizer)(groups)
    opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for g, want in zip(opt.param_groups, groups):  # load_state_dict restores the groups' saved settings
        g.update({k: v for k, v in want.items() if k in opt_overrides})
    return twin, opt


class _TF32:
    """fp32 matmuls and convolutions on TF32 tensor cores for the candidate's steps only."""

    def __enter__(self) -> None:
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def __exit__(self, *exc: Any) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _candidates(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                compile: bool) -> dict:
    # name -> (optimizer overrides, model transform or None, context factory, numerics tolerance)
    out: dict = {"baseline": ({}, None, nullcontext, 0.0)}
    defaults = optimizer.defaults
    if "foreach" in defaults:
        out["foreach=True"] = ({"foreach": True}, None, nullcontext, 1e-5)
        out["foreach=False"] = ({"foreach": False}, None, nullcontext, 1e-5)
    if "fused" in defaults:
        out["fused=True"] = ({"fused": True, "foreach": None} if "foreach" in defaults else {"fused": True},
                             None, nullcontext, 1e-5)
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        out["channels_last"] = ({}, lambda m: m.to(memory_format=torch.channels_last), nullcontext, 1e-4)
    if device.type == "cuda":
        out["tf32"] = ({}, None, _TF32, 1e-2)
        out["autocast bf16"] = ({}, None, lambda: torch.autocast("cuda", dtype=torch.bfloat16), 5e-2)
        out["autocast fp16"] = ({}, None, lambda: torch.autocast("cuda", dtype=torch.float16), 2e-2)
    else:
        out["autocast bf16"] = ({}, None, lambda: torch.autocast("cpu", dtype=torch.bfloat16), 5e-2)
    if compile:  # compilation is the warm-up (warmup_s), reported apart from the timed steps
        out["torch.compile"] = ({}, torch.compile, nullcontext, 1e-4)
        if device.type == "cuda":  # CUDA graphs
            out["torch.compile reduce-overhead"] = ({}, lambda m: torch.compile(m, mode="reduce-overhead"),
                                                    nullcontext, 1e-4)
    return out


def _device(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _losses(train_step: Callable, model: Any, opt: Any, batch: Any, ctx: Callable, n: int) -> list:
    out = []
    for _ in range(n):
        with ctx():
            loss = train_step(model, opt, batch)
        out.append(float(loss))
    return out


def step(train_step: Callable, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any, *,
         steps: int = 20, rounds: int = 3, warmup: int = 3, check_steps: int = 3, tolerance: float = 0.03,
         candidates: Optional[dict] = None, budget_s: float = 120.0, compile: Optional[bool] = None) -> TuneResult:
    """Tries step-level candidates on copies of ``model`` and ``optimizer`` (:func:`copy_training`):
    ``train_step(model, optimizer, batch)`` runs one training step and returns the loss. Candidates
    that apply here: ``foreach`` / ``fused`` optimizers, ``channels_last`` for convolutional models,
    bf16 autocast (and fp16 and TF32 on CUDA), ``torch.compile`` (and its CUDA-graph mode
    ``"reduce-overhead"`` on CUDA) when ``compile`` (default: on CUDA only, since compiling on a CPU
    takes minutes; its compile time is ``warmup_s``); ``candidates`` adds or replaces entries ``name -> (optimizer
    overrides, model transform or None, context factory, loss tolerance)``. Each is warmed up, then
    timed by a Monitor over ``steps`` steps per round. Numerics: ``check_steps`` losses from the
    original weights on ``batch``, relative to the baseline's, within the candidate's tolerance. A
    candidate that fails to build (``fused`` on a device without it) is a row saying why."""
    from .monitor import Monitor

    if steps < 3 or rounds < 1 or warmup < 0 or check_steps < 1:
        raise ValueError("stepscope: tune.step needs steps >= 3, rounds >= 1, warmup >= 0, check_steps >= 1")
    device = _device(model)
    cands = dict(_candidates(model, optimizer, device, device.type == "cuda" if compile is None else compile))
    cands.update(candidates or {})
    t_start = time.perf_counter()
    rows: dict = {}
    runners: dict = {}
    for name, (over, transform, ctx, tol) in cands.items():
        row = rows[name] = {"name": name, "p50s": [], "tolerance": tol}
        try:
            m, o = copy_training(model, optimizer, **over)
            if transform is not None:
                m = transform(m)
            t0 = time.perf_counter()  # warmup_s: the check's steps (a compile happens there) and the warm-up
            row["losses"] = _losses(train_step, m, o, batch, ctx, check_steps)
            m, o = copy_training(model, optimizer, **over)  # timing starts from the original weights too
            if transform is not None:
                m = transform(m)
            _losses(train_step, m, o, batch, ctx, warmup)
            row["warmup_s"] = time.perf_counter() - t0
            runners[name] = (m, o, ctx)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, note=_why(e))
    phases: dict = {}
    for _ in range(rounds):
        if time.perf_counter() - t_start > budget_s:
            break
        for name, (m, o, ctx) in runners.items():
            with Monitor(m, o, warmup_steps=0, flops=None, health=False, nvtx=False) as mon:
                _losses(train_step, m, o, batch, ctx, steps)
            rep = mon.report()
            rows[name]["p50s"].append(rep["phases"]["step"]["host"]["p50"])
            phases[name] = {p: v["host"]["p50"] for p, v in rep["phases"].items() if v["host"]["count"]}
    return _step_result(rows, phases, tolerance, rounds, steps)


def _step_result(rows: dict, phases: dict, tolerance: float, rounds: int, steps: int) -> TuneResult:
    base = rows["baseline"]
    ref = base.get("losses")
    base_p50 = statistics.median(base["p50s"]) if base["p50s"] else None
    out = []
    for name, r in rows.items():
        if r["p50s"]:
            med, lo, hi = _spread(r["p50s"])
            r.update(step_ms=med * 1e3, spread_ms=(lo * 1e3, hi * 1e3),
                     speedup=base_p50 / med if base_p50 else None, steps_per_s=1.0 / med)
            if name != "baseline" and name in phases and "baseline" in phases:
                diff = {p: phases[name].get(p, 0.0) - v for p, v in phases["baseline"].items() if p != "step"}
                r["phase"] = max(diff, key=lambda p: abs(diff[p])) if diff else None  # the one that moved most
        if ref is not None and r.get("losses") is not None and r.get("ok", True):
            err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"], ref))
            r["numerics"] = f"{'ok' if err <= r['tolerance'] else 'FAILS'} (rel {err:.1e}, tol {r['tolerance']:g})"
            r["ok"] = err <= r["tolerance"]
        out.append(r)
    # Recommended: the fastest that passes numerics, if it beats the baseline by more than tolerance.
    good = [r for r in out if r.get("ok", True) and r.get("steps_per_s")]
    fastest = max(good, key=lambda r: r["steps_per_s"]) if good else None
    best = fastest if fastest and (fastest.get("speedup") or 0) > 1 + tolerance else base
    return TuneResult(kind="step", rows=out, best={"candidate": best["name"]}, best_name=best["name"],
                      baseline="baseline",
                      columns=["name", "step_ms", "speedup", "spread_ms", "phase", "numerics", "warmup_s", "note"],
                      method=f"step p50 of a Monitor over {steps} steps, median of {rounds} interleaved rounds; "
                             f"recommended: the fastest passing numerics if > {100 * tolerance:.0f}% faster")


# --------------------------------------------------------------------------- batch size
def _memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident set now
    except (OSError, ValueError, IndexError):
        return None


def _out_of_memory(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (bool(oom) and isinstance(e, oom)) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def batch_size(train_step: Callable, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               make_batch: Callable[[int], Any], *, start: int = 8, max_size: int = 1 << 16, steps: int = 10,
               warmup: int = 2, flat: float = 0.05, budget_s: float = 120.0) -> TuneResult:
    """Samples/s as the batch doubles from ``start`` (``make_batch(n)`` builds a batch of n), each size
    on a fresh copy of the model and optimizer (:func:`copy_training`), timed by a Monitor over
    ``steps`` steps. Stops at an out-of-memory error (caught, the memory released), at ``max_size``,
    past ``budget_s``, or once doubling the batch gains less than ``flat`` (5%) in samples/s. ``best``:
    the knee, the smallest size within ``flat`` of the best samples/s, not the largest that fits.
    Memory per size: the CUDA allocator's peak, or the process's resident set on CPU."""
    from .monitor import Monitor

    if start < 1 or max_size < start or steps < 3 or not 0 < flat < 1:
        raise ValueError("stepscope: tune.batch_size needs 1 <= start <= max_size, steps >= 3, 0 < flat < 1")
    device, rows, t0, n = _device(model), [], time.perf_counter(), start
    while n <= max_size and time.perf_counter() - t0 <= budget_s:
        row: dict = {"name": f"batch {n}", "batch": n}
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            m, o = copy_training(model, optimizer)
            b = make_batch(n)
            _losses(train_step, m, o, b, nullcontext, warmup)
            with Monitor(m, o, warmup_steps=0, flops=None, health=False, nvtx=False) as mon:
                _losses(train_step, m, o, b, nullcontext, steps)
            p50 = mon.report()["phases"]["step"]["host"]["p50"]
            row.update(step_ms=p50 * 1e3, samples_per_s=n / p50, memory_bytes=_memory(device))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, note=("out of memory: " if _out_of_memory(e) else "") + _why(e))
            rows.append(row)
            m = o = b = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        log.info("stepscope tune.batch_size: batch %d: %.1f samples/s", n, row["samples_per_s"])
        prev = rows[-1]["samples_per_s"] if rows and rows[-1].get("samples_per_s") else None
        rows.append(row)
        if prev is not None and row["samples_per_s"] < prev * (1 + flat):
            break  # doubling no longer pays
        n *= 2
    timed = [r for r in rows if r.get("samples_per_s")]
    top = max((r["samples_per_s"] for r in timed), default=None)
    knee = next((r for r in timed if r["samples_per_s"] >= top * (1 - flat)), None) if top else None
    for r in timed:
        r["of_best"] = r["samples_per_s"] / top
    return TuneResult(kind="batch_size", rows=rows, best={"batch_size": knee["batch"]} if knee else {},
                      best_name=knee["name"] if knee else None, baseline=f"batch {start}",
                      columns=["name", "step_ms", "samples_per_s", "of_best", "memory_bytes", "note"],
                      method=f"step p50 of a Monitor over {steps} steps per size; the knee: the smallest size "
                             f"within {100 * flat:.0f}% of the best samples/s")
