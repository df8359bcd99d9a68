"""The training-health variants of bench/overhead_bench.py: hand-written gradient checks on the
bare loop, the patterns a user writes without stepscope, each timed like the bare loop.

  foreach_norm     torch._foreach_norm over the gradients, then stack().norm(), kept on the device
                   (the sync-free pattern)
  item per param   per parameter g.norm().item() and torch.isfinite(g).all().item() (the pattern of
                   W&B's watch and Composer's monitors: a host read per parameter)
  clip_grad_norm_  torch.nn.utils.clip_grad_norm_(params, inf): the global norm, as Lightning and
                   most loops compute it
"""

from __future__ import annotations

import statistics
import time

import torch


def _loop(check):
    # The bare loop of overhead_bench.py with `check(params)` between backward and the optimizer.
    def run(model, opt, xs, ys, steps):
        f = torch.nn.functional.cross_entropy
        params = [p for p in model.parameters() if p.requires_grad]
        cuda = xs[0].is_cuda
        pc = time.perf_counter
        if cuda:
            torch.cuda.synchronize()
        t0 = last = pc()
        ts = [0.0] * steps
        for i in range(steps):
            loss = f(model(xs[i & 7]), ys[i & 7])
            loss.backward()
            check(params)
            opt.step()
            opt.zero_grad(set_to_none=True)
            now = pc()
            ts[i] = now - last
            last = now
        if cuda:
            torch.cuda.synchronize()
            return (pc() - t0) / steps
        return statistics.median(ts)
    return run


_kept: list = [None]  # the last global norm, kept on the device as a real loop would keep it


def _foreach(params):
    _kept[0] = torch.stack(torch._foreach_norm([p.grad for p in params])).norm()


def _item(params):
    for p in params:
        g = p.grad
        g.norm().item()
        torch.isfinite(g).all().item()


def _clip(params):
    _kept[0] = torch.nn.utils.clip_grad_norm_(params, float("inf"))


CHECKS = {"foreach_norm": _foreach, "item per param": _item, "clip_grad_norm_": _clip}
BASELINES = {k: _loop(c) for k, c in CHECKS.items()}


def many(device: str, batch: int):
    """200 parameter tensors: 100 x Linear(64, 64) with ReLUs, SGD with momentum."""
    torch.manual_seed(0)
    layers = [m for _ in range(99) for m in (torch.nn.Linear(64, 64), torch.nn.ReLU())]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(64, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    xs = [torch.randn(batch, 64, device=device) for _ in range(8)]
    ys = [torch.randint(0, 10, (batch,), device=device) for _ in range(8)]
    return model, opt, xs, ys
