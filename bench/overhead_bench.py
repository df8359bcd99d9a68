"""What does timing a training step cost? A ~1 ms CPU training step of a small MLP, timed

  bare            no timing at all (the anchor)
  monitor         stepscope.Monitor(model, opt)
  monitor+module  stepscope.Monitor(model, opt, per_module=True, per_module_every=10)
  module every 1  the same, every step sampled (the worst case)
  perf_counter    hand-placed time.perf_counter() around the same six boundaries
  no-op hooks     four Python hooks that do nothing (the model's forward pre/post, the optimizer's
                  step pre/post, registered as the Monitor registers its own): the floor, what
                  torch's own dispatch of the hooks costs
  torch.profiler  torch.profiler.profile(activities=[CPU]) around the loop

and training health (Monitor(health=True) is the default, so `monitor` above includes it):

  flops off       stepscope.Monitor(model, opt, flops=None): no FLOPs counting (the default,
                  flops="auto", counts one warm-up step and then hashes the input's shape per step)
  +progress       the default Monitor and mon.progress(...) around the loop (a tqdm bar into a
                  buffer, its figures refreshed every 20 steps)
  health off      stepscope.Monitor(model, opt, health=False)
  +observe        the default Monitor and mon.observe(loss) every step
  foreach_norm, item per param, clip_grad_norm_: the hand-written gradient checks of
                  bench/health_variants.py on the bare loop

Variants run interleaved in rounds, in a fresh random order each round, so that drift on a shared
machine hits all of them alike; a run's time is its median step. The table gives each variant's
best run over rounds and two ratios to bare: of the best runs, and the median over rounds of the
ratio within a round (paired: both ran within a second of each other, so this one is the
steadier on a noisy machine). Then the extra cost per step and per phase boundary (six boundaries per step: forward
begin/end, backward begin/end, optimizer begin/end), both from the paired median. A last line
gives the raw cost of one _C.Timeline boundary call from Python.

  python bench/overhead_bench.py [--rounds 41] [--steps 100] [--threads 1]
  python bench/overhead_bench.py --model many     (200 parameter tensors: 100 x Linear(64, 64))
  python bench/overhead_bench.py --alternate [--rounds 21] [--steps 200] [--only bare monitor ...]

With ``--alternate`` (CPU) every variant trains its own copy of the model and the variants take
turns step by step (bench/alternate.py): the steadier figure on a noisy machine, where whole runs
in rounds scatter by more than a hook costs; torch.profiler and +progress are left out there.
  python bench/overhead_bench.py --device cuda [--model mlp|gpu-bound|many]

On CUDA the variants are bare, monitor (device_every="auto", the default: CUDA events on one step
in k, k chosen so that the records cost ~1% of the host's step), monitor every=1 (events on every
step), monitor with host clocks only (its Timeline records no CUDA events), and torch.profiler
(CPU + CUDA activities); the device_every each Monitor settled on is printed under the table
(with its measured cost of one event record). A run's time is its wall time up to a
final torch.cuda.synchronize(), over its steps, so a GPU-bound loop is timed by its GPU work and a
host-bound one by its launches. `--model gpu-bound` is 8 x Linear(2048), batch 2048, AdamW.
"""

from __future__ import annotations

import argparse
import io
import random
import shlex
import statistics
import sys
import time

import torch

import stepscope
from stepscope import _C

import alternate
from health_variants import BASELINES, many

BOUNDARIES = 6


def make(width: int, batch: int, seed: int = 0, device: str = "cpu", kind: str = "mlp"):
    if kind == "many":
        return many(device, batch)
    torch.manual_seed(seed)
    if kind == "gpu-bound":
        width, batch = 2048, 2048
        layers = [m for _ in range(8) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                    torch.nn.ReLU(), torch.nn.Linear(width, 10)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    xs = [torch.randn(batch, width, device=device) for _ in range(8)]
    ys = [torch.randint(0, 10, (batch,), device=device) for _ in range(8)]
    return model, opt, xs, ys


# Each run returns its median step time: one clock read per step (in every variant alike), and a
# step that the machine's other tenants preempted does not move a median the way it moves a mean.
def run_bare(model, opt, xs, ys, steps, observe=None, wrap=None):
    if xs[0].is_cuda:
        return run_bare_cuda(model, opt, xs, ys, steps, observe)
    f = torch.nn.functional.cross_entropy
    pc = time.perf_counter
    ts = [0.0] * steps
    last = pc()
    for i in (wrap(range(steps)) if wrap is not None else range(steps)):
        x, y = xs[i & 7], ys[i & 7]
        loss = f(model(x), y)
        if observe is not None:
            observe(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = pc()
        ts[i] = now - last
        last = now
    return statistics.median(ts)


def run_bare_cuda(model, opt, xs, ys, steps, observe=None):
    # The GPU runs behind the host: a run is timed from a drained queue to a drained queue.
    f = torch.nn.functional.cross_entropy
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = f(model(xs[i & 7]), ys[i & 7])
        if observe is not None:
            observe(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def run_perf_counter(model, opt, xs, ys, steps):
    # What people write by hand: a clock read at each boundary, accumulated per phase (host
    # times only; backward's end is where loss.backward() returns): bench/alternate.py's step.
    step = alternate.perf_counter_step(model, opt, xs, ys)
    pc = time.perf_counter
    ts = [0.0] * steps
    last = pc()
    for i in range(steps):
        step(i)
        now = pc()
        ts[i] = now - last
        last = now
    return statistics.median(ts)


def run_monitor(kw, host_only: bool = False, observe: bool = False, progress: bool = False):
    # One Monitor per variant, attached for each run: a training loop attaches once, so its
    # Timeline's allocation is not charged to every round.
    mon: list = []

    def run(model, opt, xs, ys, steps):
        if not mon:
            mon.append(stepscope.Monitor(model, opt, **kw))
            if host_only:  # the same hooks over a Timeline that records no CUDA event
                mon[0]._tl = _C.Timeline(device=False, nvtx=kw.get("nvtx", True))
        wrap = None
        if progress:  # the tqdm bar, written to a buffer, its figures read every 20 steps
            def wrap(it):
                return mon[0].progress(it, every=20, file=io.StringIO())
        with mon[0]:
            return run_bare(model, opt, xs, ys, steps, mon[0].observe if observe else None, wrap)
    run.monitor = mon  # type: ignore[attr-defined]
    return run


def run_noop_hooks(model, opt, xs, ys, steps):
    def noop(*args, **kwargs):
        return None

    handles = [model.register_forward_pre_hook(noop, with_kwargs=True),
               model.register_forward_hook(noop, always_call=True),
               opt.register_step_pre_hook(noop), opt.register_step_post_hook(noop)]
    try:
        return run_bare(model, opt, xs, ys, steps)
    finally:
        for h in handles:
            h.remove()


def run_profiler(model, opt, xs, ys, steps):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if xs[0].is_cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts):
        return run_bare(model, opt, xs, ys, steps)


def boundary_call_ns(n: int = 200_000) -> float:
    tl = _C.Timeline(device=False, nvtx=True)
    fb, fe = tl.forward_begin, tl.forward_end
    t0 = time.perf_counter()
    for _ in range(n):
        fb(False, 64)
        fe()
    return (time.perf_counter() - t0) / (2 * n) * 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--steps", type=int, default=100, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="mlp", choices=["mlp", "gpu-bound", "many"])
    ap.add_argument("--alternate", action="store_true", help="variants take turns step by step (CPU)")
    ap.add_argument("--only", nargs="+", default=None, help="with --alternate: the variants to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.alternate:
        return alternate_main(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("overhead_bench: --device cuda needs a CUDA device", file=sys.stderr)
        return 2

    if args.device == "cuda":
        variants = {
            "bare": run_bare,
            "monitor": run_monitor({}),
            "monitor every=1": run_monitor({"device_every": 1}),
            "monitor host-only": run_monitor({}, host_only=True),
            "torch.profiler": run_profiler,
        }
        variants.update({"health off": run_monitor({"health": False}),
                         "+observe": run_monitor({}, observe=True), **BASELINES})
    else:
        variants = {
            "bare": run_bare,
            "monitor": run_monitor({}),
            "monitor+module": run_monitor({"per_module": True, "per_module_every": 10}),
            "module every 1": run_monitor({"per_module": True, "per_module_every": 1}),
            "perf_counter": run_perf_counter,
            "no-op hooks": run_noop_hooks,
            "torch.profiler": run_profiler,
            "health off": run_monitor({"health": False}),
            "+observe": run_monitor({}, observe=True),
            "flops off": run_monitor({"flops": None}),
            "+progress": run_monitor({}, progress=True),
            **BASELINES,
        }
    model, opt, xs, ys = make(args.width, args.batch, device=args.device, kind=args.model)
    for fn in variants.values():  # warm every path (allocator, profiler init, hooks)
        fn(model, opt, xs, ys, 20)
    times: dict = {k: [] for k in variants}
    order = list(variants)
    rng = random.Random()  # a fresh order every run
    for _ in range(args.rounds):
        rng.shuffle(order)
        for k in order:
            times[k].append(variants[k](model, opt, xs, ys, args.steps))
    # Other processes share this machine: the minimum over rounds is the least disturbed run
    # (timeit's rule); the paired median is the typical cost.
    best = {k: min(v) for k, v in times.items()}
    ratio = {k: statistics.median(t / b for t, b in zip(v, times["bare"])) for k, v in times.items()}
    extra = {k: statistics.median(t - b for t, b in zip(v, times["bare"])) * 1e6 for k, v in times.items()}

    what = {"gpu-bound": "8 x Linear(2048) batch 2048 AdamW",
            "many": f"100 x Linear(64, 64) (200 parameter tensors) batch {args.batch}"}.get(
        args.model, f"MLP {args.width}x3 batch {args.batch}")
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {dev}, {args.threads} thread(s), {what}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':18s} {'min step ms':>11s} {'ratio(min)':>10s} {'ratio(paired)':>13s} {'us/step':>8s} "
          f"{'us/boundary':>12s}")
    for k in variants:
        per_b = "-" if k in ("bare", "torch.profiler", "no-op hooks", *BASELINES) else f"{extra[k] / BOUNDARIES:.2f}"
        print(f"{k:18s} {best[k] * 1e3:11.4f} {best[k] / best['bare']:10.4f} {ratio[k]:13.4f} {extra[k]:8.1f} "
              f"{per_b:>12s}")
    if "module every 1" in extra:
        # What sampling one step in 10 costs, as a share of timing every module on every step.
        # A round where timing every module did not cost more than the Monitor alone (noise larger
        # than the effect) has no share: it is left out and counted, not turned into a NaN median.
        share = [(a - m) / (e - m) for a, e, m in
                 zip(times["monitor+module"], times["module every 1"], times["monitor"]) if e > m]
        left = len(times["monitor"]) - len(share)
        if share:
            print(f"per_module_every=10 costs {statistics.median(share):.1%} of per_module_every=1 "
                  f"(paired median over {len(share)} rounds, {left} left out as noise; 10% is the ideal)")
        else:
            print("per_module_every=10 against per_module_every=1: no round where timing every module cost "
                  "more than the Monitor alone (noise larger than the effect; run more --steps)")
    for k, fn in variants.items():
        mons = getattr(fn, "monitor", None)
        if args.device == "cuda" and mons:
            r = mons[0].report()
            if r["device"]:
                cost = r["event_record_cost"]
                print(f"{k}: device_every {r['device_every']}{' (auto)' if r['device_every_auto'] else ''}, "
                      f"{r['device_steps']} of {r['steps']} steps device-timed, {r['device_events']} events, "
                      f"record cost {'-' if cost is None else f'{cost * 1e6:.2f} us'}")
    print(f"_C.Timeline boundary call from Python (no hook): {boundary_call_ns():.0f} ns")
    print("reproduce: python bench/overhead_bench.py " + " ".join(sys.argv[1:]))
    return 0


def alternate_main(args) -> int:
    if args.device != "cpu":
        print("overhead_bench: --alternate runs on the CPU", file=sys.stderr)
        return 2
    times = alternate.run(lambda seed: make(args.width, args.batch, seed, kind=args.model), args.rounds,
                          args.steps, args.only or alternate.DEFAULT)
    what = ("100 x Linear(64, 64) (200 parameter tensors)" if args.model == "many"
            else f"MLP {args.width}x3 batch {args.batch}")
    print(f"torch {torch.__version__}, cpu, {args.threads} thread(s), {what}, variants taking turns step by "
          f"step: {args.rounds} blocks x {args.steps} steps each")
    alternate.table(times, BOUNDARIES)
    print("reproduce: python bench/overhead_bench.py " + shlex.join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
