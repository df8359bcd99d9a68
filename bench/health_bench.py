"""What does one gradient-statistics update cost? stepscope.health.GradStats.update against the
hand-written ways of getting the same numbers, on gradients computed once (only the update is timed):

  (a) foreach     torch._foreach_norm(grads) + torch.stack(...).norm(): the norms, kept on the device
  (b) item        p.grad.norm().item() per parameter (what the Lightning/Composer utilities do)
  (c) clip        torch.nn.utils.clip_grad_norm_(params, float("inf")): the norm, no clipping
  stepscope       GradStats.update(params, step): norms, non-finite counts, no-grad flags, streaming
                  statistics, histogram and ring, accumulated in place

Two models: the MLP of bench/overhead_bench.py (3 x Linear, width 256: 6 parameter tensors) and a
stack of 100 x Linear(64, 64) (200 parameter tensors). Variants run interleaved in rounds, in a fresh
random order each round; a variant's time is the median over rounds of its mean per update within a
round; ratios are to (a) measured in the same run.

  OMP_NUM_THREADS=1 PYTHONPATH=python python bench/health_bench.py [--rounds 31] [--updates 200]
  python bench/health_bench.py --device cuda     (each timed loop ends with torch.cuda.synchronize(), so
                                                   a variant's time holds its launches and its GPU work)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from stepscope.health import GradStats


def mlp() -> torch.nn.Module:
    w = 256
    return torch.nn.Sequential(torch.nn.Linear(w, w), torch.nn.ReLU(), torch.nn.Linear(w, w), torch.nn.ReLU(),
                               torch.nn.Linear(w, 10))


def deep() -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(100)])


def with_grads(model: torch.nn.Module, width: int, device: torch.device) -> list:
    # Fresh random gradients every run (no fixed seed): nothing is tuned to one input.
    model(torch.randn(64, width, device=device)).square().mean().backward()
    return list(model.parameters())


def variants(model: torch.nn.Module, params: list, device: torch.device) -> dict:
    stats = GradStats([n for n, _ in model.named_parameters()], ring=256, device=device)
    step = [0]

    def foreach():
        torch.stack(torch._foreach_norm([p.grad for p in params])).norm()

    def item():
        sum(p.grad.norm().item() ** 2 for p in params) ** 0.5

    def clip():
        torch.nn.utils.clip_grad_norm_(params, float("inf"))

    def ours():
        stats.update(params, step[0])
        step[0] += 1

    return {"(a) foreach": foreach, "(b) item": item, "(c) clip": clip, "stepscope": ours}


def measure(fns: dict, rounds: int, updates: int, device: torch.device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    per = {k: [] for k in fns}
    for f in fns.values():  # warm-up: the state, the allocator, the dispatcher's caches
        for _ in range(20):
            f()
    for _ in range(rounds):
        order = list(fns)
        random.shuffle(order)
        for k in order:
            f = fns[k]
            sync()
            t0 = time.perf_counter()
            for _ in range(updates):
                f()
            sync()
            per[k].append((time.perf_counter() - t0) / updates)
    return {k: statistics.median(v) * 1e6 for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} thread(s), rounds {args.rounds}, "
          f"updates/round {args.updates}")
    print(f"{'model':<22}{'variant':<14}{'us/update':>10}{'x (a)':>8}")
    for name, make, width in (("mlp (6 tensors)", mlp, 256), ("deep (200 tensors)", deep, 64)):
        model = make().to(device)
        params = with_grads(model, width, device)
        us = measure(variants(model, params, device), args.rounds, args.updates, device)
        anchor = us["(a) foreach"]
        for k, v in us.items():
            print(f"{name:<22}{k:<14}{v:>10.1f}{v / anchor:>8.2f}")


if __name__ == "__main__":
    main()
