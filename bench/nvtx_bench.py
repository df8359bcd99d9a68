"""Cost of one stepscope NVTX range (a push/pop pair), with no tool attached and under a tool.

    PYTHONPATH=python python bench/nvtx_bench.py \
        [--inject build/tests/nvtx_inject/libstepscope_nvtx_inject.so]

Every configuration runs in its own interpreter, because NVTX decides once, at a process's
first NVTX call, whether a tool is attached (NVTX_INJECTION64_PATH):
  no tool        plain run: what every training step pays when nobody profiles
  tool, off      the test injection library attached, stepscope.nvtx.set_enabled(False)
  tool, count    the test injection library attached, recording nothing (the dispatch cost)
  tool, log      the test injection library writing one line per call to a file (a write(2)
                 per call: an upper bound, far slower than nsys's in-memory buffers)
Rows: the C++ path (stepscope::nvtx::push/pop called through function pointers in a C++ loop,
_C.nvtx.time_push_pop_ns), the Python context manager (a new range object per use, and one
reused), and torch.cuda.nvtx.range as the anchor (default domain, unregistered strings; it
uses NVTX's non-domain calls, which the test tool does not take, so its tool columns are n/a).
Python figures include the loop's own cost (a few tens of ns).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, contextlib
import torch, stepscope
nvtx = stepscope.nvtx
n, off = int(sys.argv[1]), sys.argv[2] == "off"
if off:
    nvtx.set_enabled(False)
nvtx.mark("warm-up")  # NVTX initialises (and loads the tool) at the first call

def best(fn, reps=5):
    return min(fn() for _ in range(reps))

def cpp():
    return nvtx._nv.time_push_pop_ns(n)

def py_new():
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with nvtx.range("bench"):
            pass
    return (time.perf_counter_ns() - t0) / n

def py_reused():
    r = nvtx.range("bench")
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with r:
            pass
    return (time.perf_counter_ns() - t0) / n

def torch_range():
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with torch.cuda.nvtx.range("bench"):
            pass
    return (time.perf_counter_ns() - t0) / n

def empty():
    c = contextlib.nullcontext()
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with c:
            pass
    return (time.perf_counter_ns() - t0) / n

out = {"tool": nvtx.tool_attached(), "cpp": best(cpp), "py_new": best(py_new),
       "py_reused": best(py_reused), "empty_with": best(empty)}
try:
    out["torch"] = best(torch_range)
except (RuntimeError, AttributeError):  # a CPU torch has no _nvtx
    out["torch"] = None
print(json.dumps(out))
"""


def find_inject() -> str | None:
    pattern = str(ROOT / "build*" / "**" / "libstepscope_nvtx_inject.so")
    hits = sorted(glob.glob(pattern, recursive=True), key=os.path.getmtime, reverse=True)
    return hits[0] if hits else None


def run(n: int, off: bool = False, inject: str | None = None, log: str | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env.pop("NVTX_INJECTION64_PATH", None)
    env.pop("STEPSCOPE_NVTX_LOG", None)
    if inject:
        env["NVTX_INJECTION64_PATH"] = inject
    if log:
        env["STEPSCOPE_NVTX_LOG"] = log
    p = subprocess.run([sys.executable, "-c", CHILD, str(n), "off" if off else "on"], env=env,
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:8.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="ranges per timing (no-tool columns)")
    ap.add_argument("--n-log", type=int, default=50_000, help="ranges per timing with the logging tool")
    ap.add_argument("--inject", default=None,
                    help="path of libstepscope_nvtx_inject.so (default: the newest under build*/)")
    args = ap.parse_args()
    inject = args.inject or find_inject()

    cols = {"no tool": run(args.n)}
    if inject:
        cols["tool, off"] = run(args.n, off=True, inject=inject)
        cols["tool, count"] = run(args.n // 4, inject=inject)
        with tempfile.TemporaryDirectory() as d:
            cols["tool, log"] = run(args.n_log, inject=inject, log=os.path.join(d, "nvtx.log"))
    for name, c in cols.items():
        want = name.startswith("tool")
        if c["tool"] != want:
            raise SystemExit(f"column {name!r}: tool_attached() is {c['tool']}, expected {want}")

    rows = [
        ("C++ push+pop (stepscope::nvtx)", "cpp"),
        ("Python `with nvtx.range(name)`", "py_new"),
        ("Python `with r` (reused range)", "py_reused"),
        ("anchor: torch.cuda.nvtx.range", "torch"),
        ("loop + empty `with` (floor)", "empty_with"),
    ]
    names = list(cols)
    sizes = {"no tool": args.n, "tool, off": args.n, "tool, count": args.n // 4, "tool, log": args.n_log}
    print("ns per range (push + pop), best of 5; " + ", ".join(f"{k}: n={sizes[k]}" for k in names))
    print(f"{'path':34s}" + "".join(f"{k:>14s}" for k in names))
    for label, key in rows:
        vals = [cols[k].get(key) if not (key == "torch" and k.startswith("tool")) else None for k in names]
        print(f"{label:34s}" + "".join(f"{fmt(v):>14s}" for v in vals))
    t = cols["no tool"]
    if t.get("torch"):
        print(f"{'ratio stepscope/torch (Python)':34s}{t['py_new'] / t['torch']:14.2f}x"
              "  (no tool, new range object)")
    verdict = "meets" if t["cpp"] < 100.0 else "MISSES"
    print(f"C++ path, no tool: {t['cpp']:.1f} ns per range: {verdict} the < 100 ns (0.1 us) budget")
    cmd = "PYTHONPATH=python python bench/nvtx_bench.py" + (f" --inject {inject}" if inject else "")
    print(f"reproduce: {cmd}")


if __name__ == "__main__":
    main()
