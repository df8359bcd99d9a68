"""What does timing a training step cost? A ~1 ms CPU training step of a small MLP, timed

  bare            no timing at all (the anchor)
  monitor         stepscope.Monitor(model, opt)
  monitor+module  stepscope.Monitor(model, opt, per_module=True, per_module_every=10)
  module every 1  the same, every step sampled (the worst case)
  perf_counter    hand-placed time.perf_counter() around the same six boundaries
  torch.profiler  torch.profiler.profile(activities=[CPU]) around the loop

Variants run interleaved in rounds, in a fresh random order each round, so that drift on a shared
machine hits all of them alike; a run's time is its median step. The table gives each variant's
best run over rounds and two ratios to bare: of the best runs, and the median over rounds of the
ratio within a round (paired: both ran within a second of each other, so this one is the
steadier on a noisy machine). Then the extra cost per step and per phase boundary (six boundaries per step: forward
begin/end, backward begin/end, optimizer begin/end), both from the paired median. A last line
gives the raw cost of one _C.Timeline boundary call from Python.

  python bench/overhead_bench.py [--rounds 41] [--steps 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

import stepscope
from stepscope import _C

BOUNDARIES = 6


def make(width: int, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, 10))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    xs = [torch.randn(batch, width) for _ in range(8)]
    ys = [torch.randint(0, 10, (batch,)) for _ in range(8)]
    return model, opt, xs, ys


# Each run returns its median step time: one clock read per step (in every variant alike), and a
# step that the machine's other tenants preempted does not move a median the way it moves a mean.
def run_bare(model, opt, xs, ys, steps):
    f = torch.nn.functional.cross_entropy
    pc = time.perf_counter
    ts = [0.0] * steps
    last = pc()
    for i in range(steps):
        x, y = xs[i & 7], ys[i & 7]
        loss = f(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = pc()
        ts[i] = now - last
        last = now
    return statistics.median(ts)


def run_perf_counter(model, opt, xs, ys, steps):
    # What people write by hand: a clock read at each boundary, accumulated per phase (host
    # times only; backward's end is where loss.backward() returns).
    f = torch.nn.functional.cross_entropy
    pc = time.perf_counter
    acc = dict.fromkeys(("data", "forward", "loss", "backward", "other", "optimizer"), 0.0)
    ts = [0.0] * steps
    last = pc()
    for i in range(steps):
        start = last
        x, y = xs[i & 7], ys[i & 7]
        a = pc()
        acc["data"] += a - last
        out = model(x)
        b = pc()
        acc["forward"] += b - a
        loss = f(out, y)
        c = pc()
        acc["loss"] += c - b
        loss.backward()
        d = pc()
        acc["backward"] += d - c
        e = pc()
        acc["other"] += e - d
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = pc()
        acc["optimizer"] += last - e
        ts[i] = last - start
    return statistics.median(ts)


def run_monitor(kw):
    # One Monitor per variant, attached for each run: a training loop attaches once, so its
    # Timeline's allocation is not charged to every round.
    mon = []

    def run(model, opt, xs, ys, steps):
        if not mon:
            mon.append(stepscope.Monitor(model, opt, **kw))
        with mon[0]:
            return run_bare(model, opt, xs, ys, steps)
    return run


def run_profiler(model, opt, xs, ys, steps):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    variants = {
        "bare": run_bare,
        "monitor": run_monitor({}),
        "monitor+module": run_monitor({"per_module": True, "per_module_every": 10}),
        "module every 1": run_monitor({"per_module": True, "per_module_every": 1}),
        "perf_counter": run_perf_counter,
        "torch.profiler": run_profiler,
    }
    model, opt, xs, ys = make(args.width, args.batch)
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

    print(f"torch {torch.__version__}, {args.threads} thread(s), MLP {args.width}x3 batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':16s} {'min step ms':>11s} {'ratio(min)':>10s} {'ratio(paired)':>13s} {'us/step':>8s} "
          f"{'us/boundary':>12s}")
    for k in variants:
        per_b = "-" if k in ("bare", "torch.profiler") else f"{extra[k] / BOUNDARIES:.2f}"
        print(f"{k:16s} {best[k] * 1e3:11.4f} {best[k] / best['bare']:10.4f} {ratio[k]:13.4f} {extra[k]:8.1f} "
              f"{per_b:>12s}")
    print(f"_C.Timeline boundary call from Python (no hook): {boundary_call_ns():.0f} ns")
    print("reproduce: python bench/overhead_bench.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
