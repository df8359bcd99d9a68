"""MFU as the Monitor reports it, on a matmul-bound Linear stack, beside the analytic count.

For each precision it trains `--steps` steps of 8 x Linear(width) (batch `--batch`) under a
default Monitor and prints: FLOPs per step as counted and analytically (6 x batch x the weights:
2 per multiply-add forward, twice that backward), the achieved FLOP/s of the p50 step, the peak
and where it came from, MFU, and what counting costs: a forward and backward with the forward
under the counting dispatch mode over one without (best of 5 each; the Monitor keeps the step it
counts out of the statistics).

  python bench/mfu_bench.py                       # CPU, fp32 (1 thread; peak measured)
  python bench/mfu_bench.py --device cuda         # fp32 (tf32 when allowed) and bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

import stepscope


def run(device: str, width: int, batch: int, steps: int, autocast: bool) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(8)]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(batch, width, device=device)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with stepscope.Monitor(model, opt) as mon:
        for _ in range(steps):
            with ctx:
                loss = model(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
    return {"rep": mon.report(), "analytic": 6 * batch * 8 * width * width,
            "count_cost": count_cost(model, x, ctx, device)}


def count_cost(model, x, ctx, device: str) -> float:
    from stepscope._monitor_throughput import FlopCount

    def once(counted: bool) -> float:
        t0 = time.perf_counter()
        with ctx:
            with FlopCount() if counted else contextlib.nullcontext():
                y = model(x)
            loss = y.float().pow(2).mean()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    plain = min(once(False) for _ in range(5))
    return min(once(True) for _ in range(5)) / plain


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("mfu_bench: --device cuda needs a CUDA device", file=sys.stderr)
        return 2
    cuda = args.device == "cuda"
    width = args.width or (4096 if cuda else 512)
    batch = args.batch or (4096 if cuda else 256)
    steps = args.steps or (40 if cuda else 12)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s)"
    print(f"torch {torch.__version__}, {where}, 8 x Linear({width}), batch {batch}, {steps} steps")
    print(f"{'variant':14} {'counted':>10} {'analytic':>10} {'achieved':>12} {'peak':>12} {'mfu':>6} "
          f"{'count cost':>10}  peak source")
    for name, ac in (("fp32", False), ("bf16 autocast", True)) if cuda else (("fp32", False),):
        r = run(args.device, width, batch, steps, ac)
        t = r["rep"]["throughput"]
        got = t["achieved_flops_device"] or t["achieved_flops"]
        mfu = t["mfu_device"] if t["mfu_device"] is not None else t["mfu"]
        print(f"{name:14} {t['flops_per_step'] / 1e9:9.2f}G {r['analytic'] / 1e9:9.2f}G "
              f"{(got or 0) / 1e9:8.1f} GF/s {(t['peak_flops'] or 0) / 1e9:8.1f} GF/s "
              f"{'-' if mfu is None else f'{100 * mfu:5.1f}%':>6} {r['count_cost']:9.2f}x  "
              f"{t['precision']}: {t['peak_note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
