"""What writing a run costs against its ring size: Monitor.save, export_trace (gzip and plain) and
to_csv, on a ring filled by a real training loop (a small MLP with a user phase, the observed loss,
health and FLOPs counting on, and per-module timing of its three submodules on one step in two).

    python bench/export_bench.py [--rings 256 1024 4096 16384] [--rounds 5]

Each ring size gets its own Monitor, filled once; the writes then run in rounds, in a fresh random
order each round, and the table gives each write's median over rounds with its min-max and the
file's size. One torch thread (the writes are single-threaded Python and zlib).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import torch

import stepscope


def filled(ring: int) -> stepscope.Monitor:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = stepscope.Monitor(model, opt, ring=ring, per_module=True, per_module_every=2)
    with mon:
        for _ in range(ring + 8):
            x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
            with mon.phase("augment"):
                x = x + 0.01
            loss = torch.nn.functional.cross_entropy(model(x), y)
            mon.observe(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    mon.report()  # the CPU peak is measured once per process, at the first report: not a write's cost
    return mon


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rings", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="stepscope-export-bench-")
    writes = {
        "save .json": lambda m: m.save(os.path.join(out, "run.json")),
        "save .json.gz": lambda m: m.save(os.path.join(out, "run.json.gz")),
        "export_trace .gz": lambda m: m.export_trace(os.path.join(out, "run.trace.json.gz")),
        "export_trace": lambda m: m.export_trace(os.path.join(out, "run.trace.json")),
        "to_csv": lambda m: m.to_csv(os.path.join(out, "run.csv")),
    }
    files = dict(zip(writes, ("run.json", "run.json.gz", "run.trace.json.gz", "run.trace.json", "run.csv")))
    print(f"torch {torch.__version__}, stepscope {stepscope.__version__}, 1 thread, {args.rounds} rounds")
    print(f"{'ring':>6s} {'write':18s} {'median ms':>10s} {'min-max ms':>15s} {'KiB':>8s}")
    for ring in args.rings:
        mon = filled(ring)
        times: dict = {k: [] for k in writes}
        order = list(writes)
        for _ in range(args.rounds):
            random.shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                writes[k](mon)
                times[k].append(time.perf_counter() - t0)
        for k, ts in times.items():
            size = os.path.getsize(os.path.join(out, files[k])) / 1024
            print(f"{ring:6d} {k:18s} {statistics.median(ts) * 1e3:10.1f} "
                  f"{min(ts) * 1e3:7.1f}-{max(ts) * 1e3:<7.1f} {size:8.0f}")
    print("reproduce: python bench/export_bench.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
