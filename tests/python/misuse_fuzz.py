"""Seeded misuse fuzz for ClassificationMetrics, run in a child process so that a crash (a
segfault inside the op) is reported as a failed case instead of ending the test run.

    python tests/python/misuse_fuzz.py --device cpu --seed 123 --cases 300

Prints one JSON line per case: its description and its outcome ("ok", or the exception type
and message). Every case draws random dtypes, shapes, class counts and strides, and calls
update() then compute().
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np
import torch

import stepscope

PRED_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
               torch.complex64, torch.float8_e4m3fn]
TARGET_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float32, torch.complex64, torch.uint32,
                 torch.uint64]


def rand_shape(rng: np.random.Generator) -> list:
    return [int(rng.integers(0, 6)) for _ in range(int(rng.integers(0, 5)))]


def make_tensor(rng: np.random.Generator, shape: list, dtype: torch.dtype, hi: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    # Strided layouts of the same shape: transposed storage, or every other element.
    layout = rng.random()
    alloc = list(shape)
    if layout < 0.15 and len(shape) >= 2:
        alloc[0], alloc[1] = alloc[1], alloc[0]
    elif layout < 0.3 and len(shape) >= 1:
        alloc[-1] *= 2
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(alloc, generator=g).to(dtype)
        if t.numel() and rng.random() < 0.2:
            t.view(-1)[int(rng.integers(t.numel()))] = float(rng.choice([np.nan, np.inf, -np.inf]))
    elif dtype == torch.bool:
        t = torch.randint(0, 2, alloc, generator=g).bool()
    else:
        lo, top = (-1, hi + 1) if rng.random() < 0.1 else (0, max(hi, 1))  # out of range now and then
        t = torch.randint(lo, top, alloc, generator=g).to(dtype)
    t = t.to(device)
    if layout < 0.15 and len(shape) >= 2:
        t = t.transpose(0, 1)
    elif layout < 0.3 and len(shape) >= 1:
        t = t[..., ::2]
    return t


def case(seed: int, device: str) -> tuple:
    rng = np.random.default_rng(seed)
    task = str(rng.choice(["multiclass", "binary", "multilabel"]))
    n = int(rng.integers(1, 7))
    kw: dict = {"multiclass": {"num_classes": n}, "multilabel": {"num_labels": n}, "binary": {}}[task]
    if rng.random() < 0.3:
        kw["ignore_index"] = int(rng.integers(-1, n + 1))
    if task != "multiclass" and rng.random() < 0.3:
        kw["input"] = str(rng.choice(["logits", "probs"]))
    # Shapes: often the well-formed ones, otherwise anything.
    N = int(rng.integers(0, 9))
    if rng.random() < 0.5:
        extra = [int(rng.integers(1, 4)) for _ in range(int(rng.integers(0, 3)))]
        if task == "multiclass":
            c = n if rng.random() < 0.7 else int(rng.integers(0, 8))
            pshape, tshape = [N, c] + extra, [N] + extra
            if rng.random() < 0.3:
                tshape = [max(N + int(rng.integers(-1, 2)), 0)] + extra
        else:
            pshape = [N] + ([n] if task == "multilabel" else []) + extra
            tshape = list(pshape) if rng.random() < 0.7 else rand_shape(rng)
    else:
        pshape, tshape = rand_shape(rng), rand_shape(rng)
    pd = PRED_DTYPES[int(rng.integers(len(PRED_DTYPES)))] if rng.random() < 0.4 else torch.float32
    td = TARGET_DTYPES[int(rng.integers(len(TARGET_DTYPES)))] if rng.random() < 0.4 else torch.int64
    preds = make_tensor(rng, pshape, pd, n, device)
    target = make_tensor(rng, tshape, td, n if task == "multiclass" else 2, device)
    desc = {"seed": seed, "task": task, "kw": kw, "preds": [str(pd), list(preds.shape), list(preds.stride())],
            "target": [str(td), list(target.shape), list(target.stride())]}
    m = stepscope.ClassificationMetrics(task, device=device, **kw)
    m.update(preds, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = m.compute()
    assert all(torch.is_tensor(v) for v in out.values())
    return desc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--cases", type=int, default=300)
    a = ap.parse_args()
    for i in range(a.cases):
        seed = a.seed + i
        try:
            case(seed, a.device)
            outcome = "ok"
        except (TypeError, ValueError) as e:
            outcome = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        except Exception as e:  # anything else is a bug: reported, not swallowed
            outcome = f"UNEXPECTED {type(e).__name__}: {str(e).splitlines()[0]}"
        print(json.dumps({"seed": seed, "outcome": outcome}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
