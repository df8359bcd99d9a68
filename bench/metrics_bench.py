"""Metric update cost: stepscope vs torchmetrics (MetricCollection) vs scikit-learn, same metric set.

    python bench/metrics_bench.py                       # CPU, full grid
    python bench/metrics_bench.py --device cuda         # GPU: + copy-bandwidth share, launches, syncs
    python bench/metrics_bench.py --max-log2 22 --classes 10 1000
    python bench/metrics_bench.py --device cuda --targets   # the bandwidth targets, pass/fail
    OMP_NUM_THREADS=1 python bench/metrics_bench.py --plain  # CPU: vs plain torch and DRAM, in rounds

Metric set per update: accuracy (micro), macro F1, confusion matrix (dropped at C > 1024, where
torchmetrics' and our C x C matrix would not fit: 32000^2 counters), top-5 accuracy (top-C when
C < 5) and mean cross-entropy loss. torchmetrics: a MetricCollection at its defaults
(validate_args=True) plus a MeanMetric fed F.cross_entropy. scikit-learn: the matching functions
on numpy copies, timed only up to N*C = 2^--sklearn-max-log2. Inputs are fresh random logits
every run (seeded from the clock; the seed is printed). Times are medians.

--plain (CPU): multiclass (each --classes value, each --plain-dtypes dtype), binary and multilabel
(L = 100) at N*C = 2^--plain-log2, timed in --rounds interleaved rounds in random order against the
same metric set written in plain torch ops (argmax, topk, bincount confusion matrix and per-class
counts, cross_entropy / binary_cross_entropy_with_logits) and torchmetrics. Reported: stepscope's
median ms, its share of the DRAM read limit measured in the same run (best of torch sum, amax and
numpy's integer sum over ~1 GiB), and the medians (min-max) of the per-round ratios plain / stepscope
and torchmetrics / stepscope.
"""

import argparse
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import stepscope


def median_time(fn, device, min_reps=3, min_seconds=0.3, max_reps=50):
    fn()  # warm-up (allocations, first-call dispatch)
    times = []
    start_all = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start_all < min_seconds and len(times) < max_reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_torchmetrics(C, k, confmat, device):
    import torchmetrics
    from torchmetrics import classification as tmc

    metrics = {
        "acc": tmc.MulticlassAccuracy(num_classes=C, average="micro"),
        "f1": tmc.MulticlassF1Score(num_classes=C, average="macro"),
        "topk": tmc.MulticlassAccuracy(num_classes=C, top_k=k, average="micro"),
    }
    if confmat:
        metrics["cm"] = tmc.MulticlassConfusionMatrix(num_classes=C)
    coll = torchmetrics.MetricCollection(metrics, compute_groups=False).to(device)
    loss = torchmetrics.MeanMetric().to(device)

    def update(x, y):
        coll.update(x, y)
        loss.update(F.cross_entropy(x, y))

    return update


def make_sklearn(C, k, confmat):
    import numpy as np
    from sklearn import metrics as skm

    labels = np.arange(C)

    def update(x, y):
        xs = x.float().cpu().numpy()
        ys = y.cpu().numpy()
        pred = xs.argmax(1)
        skm.accuracy_score(ys, pred)
        skm.f1_score(ys, pred, average="macro", zero_division=0)
        if confmat:
            skm.confusion_matrix(ys, pred, labels=labels)
        if C > 2:
            skm.top_k_accuracy_score(ys, xs, k=k, labels=labels)
        p = torch.from_numpy(xs).softmax(1).numpy()
        skm.log_loss(ys, p, labels=labels)

    return update


def copy_bandwidth(device):
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), device, min_reps=10)
    return 2 * x.numel() / t  # bytes read + written


def count_launches_and_syncs(m, x, y):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m.update(x, y)  # raises on any synchronising call
        syncs = 0
    except RuntimeError:
        syncs = 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        m.update(x, y)
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return launches, syncs


# (name, C, dtype, shape maker, target share of copy bandwidth). N*C*... = 2^lg elements.
TARGET_ROWS = [
    ("C=10 fp32", 10, torch.float32, "rows", 0.50),
    ("C=100 fp32", 100, torch.float32, "rows", 0.80),
    ("C=100 bf16", 100, torch.bfloat16, "rows", 0.80),
    ("C=1000 fp32", 1000, torch.float32, "rows", 0.80),
    ("C=1000 bf16", 1000, torch.bfloat16, "rows", 0.80),
    ("C=1000 fp16", 1000, torch.float16, "rows", 0.80),
    ("C=32000 bf16", 32000, torch.bfloat16, "rows", 0.70),
    ("C=128000 bf16", 128000, torch.bfloat16, "rows", 0.70),
    ("seg C=21 fp32 NCHW", 21, torch.float32, "seg", 0.70),
    ("seg C=150 fp32 NCHW", 150, torch.float32, "seg", 0.70),
    ("seg C=21 fp32 chlast", 21, torch.float32, "seg-cl", 0.70),
    ("seg C=150 bf16 NCHW", 150, torch.bfloat16, "seg", 0.70),
]


def targets(device, gen, lgs, inputs):
    """Each target row: our update against a device copy of the same predictions, same run."""
    print(f"{'case':<22} {'N*C':>5} {'input':>6} {'ms':>8} {'copy ms':>8} {'%copyBW':>8} {'target':>7}  ok")
    fails = 0
    for name, C, dtype, kind, goal in TARGET_ROWS:
        for lg in lgs:
            total = 1 << lg
            if kind == "rows":
                shape, tshape = (max(1, total // C), C), (max(1, total // C),)
            else:
                hw = (128, 256)
                n = max(1, total // (C * hw[0] * hw[1]))
                shape, tshape = (n, C) + hw, (n,) + hw
            x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(3).to(dtype)
            if kind == "seg-cl":
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, C, tshape, generator=gen, device=device)
            buf = torch.empty_like(x)
            t_copy = median_time(lambda: buf.copy_(x), device, min_reps=10)
            copy_bw = 2 * x.numel() * x.element_size() / t_copy
            for inp in inputs:
                m = stepscope.ClassificationMetrics("multiclass", num_classes=C, top_k=(1, min(5, C)), input=inp,
                                                    confusion_matrix=C <= 1024, device=device)
                t = median_time(lambda: m.update(x, y), device, min_reps=10)
                share = (x.numel() * x.element_size() + y.numel() * y.element_size()) / t / copy_bw
                ok = share >= goal
                fails += not ok
                print(f"{name:<22} {'2^' + str(lg):>5} {inp:>6} {t * 1e3:>8.3f} {t_copy * 1e3:>8.3f} "
                      f"{100 * share:>7.1f}% {100 * goal:>6.0f}%  {'yes' if ok else 'NO'}", flush=True)
            del x, y, buf
    print(f"# %copyBW: (preds + target bytes) / update time, over the copy's (read + write) bandwidth of the "
          f"same preds; {fails} row(s) under target")


def dram_read_bandwidth(reps=5):
    """Best read rate of three plain reductions over ~1 GiB (less when memory is short): bytes/s."""
    import numpy as np

    n = 1 << 28
    try:
        x = torch.ones(n, dtype=torch.float32)
    except (RuntimeError, MemoryError):
        n = 1 << 26
        x = torch.ones(n, dtype=torch.float32)
    a = x.numpy().view(np.uint64)
    best = 0.0
    for fn in (lambda: x.sum(), lambda: x.amax(), lambda: a.sum()):
        fn()
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = max(best, 4 * n / (time.perf_counter() - t))
    return best


def plain_multiclass(C, k, confmat):
    """The bench's metric set in plain torch ops: what one would write without a metrics library."""
    def update(x, y):
        pred = x.argmax(1)
        hit = pred == y
        out = [hit.sum(), (x.topk(k, 1).indices == y[:, None]).any(1).sum(),
               torch.bincount(y[hit], minlength=C), torch.bincount(pred, minlength=C),
               torch.bincount(y, minlength=C), F.cross_entropy(x, y, reduction="sum")]
        if confmat:
            out.append(torch.bincount(y * C + pred, minlength=C * C))
        return out
    return update


def plain_elementwise(multilabel):
    def update(x, y):
        yf = y.to(x.dtype)
        pred = x > 0  # sigmoid(x) > 0.5
        dim = 0 if multilabel else None
        tp = (pred & (y == 1)).sum(dim) if dim is not None else (pred & (y == 1)).sum()
        pc = pred.sum(dim) if dim is not None else pred.sum()
        tc = y.sum(dim) if dim is not None else y.sum()
        return [tp, pc, tc, F.binary_cross_entropy_with_logits(x, yf, reduction="sum")]
    return update


def torchmetrics_elementwise(L, device):
    import torchmetrics
    from torchmetrics import classification as tmc

    if L:
        ms = {"acc": tmc.MultilabelAccuracy(num_labels=L), "f1": tmc.MultilabelF1Score(num_labels=L)}
    else:
        ms = {"acc": tmc.BinaryAccuracy(), "f1": tmc.BinaryF1Score()}
    coll = torchmetrics.MetricCollection(ms, compute_groups=False).to(device)
    loss = torchmetrics.MeanMetric().to(device)

    def update(x, y):
        coll.update(x, y)
        loss.update(F.binary_cross_entropy_with_logits(x, y.to(x.dtype)))
    return update


def rounds_table(fns, rounds):
    """fns: name -> callable; each round times every one once, in a fresh random order."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        order = list(fns)
        random.shuffle(order)
        for name in order:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


def ratio_cell(times, other):
    if other not in times:
        return f"{'-':>18}"
    r = [a / b for a, b in zip(times[other], times["ours"])]
    return f"{statistics.median(r):>6.2f} ({min(r):.2f}-{max(r):.2f})"


def plain_cases(args, gen):
    lg = args.plain_log2
    for dtype_name in args.plain_dtypes:
        dtype = getattr(torch, dtype_name)
        for C in args.classes:
            N = max(1, (1 << lg) // C)
            x = torch.randn(N, C, generator=gen).mul_(3).to(dtype)
            y = torch.randint(0, C, (N,), generator=gen)
            yield f"mc C={C} {dtype_name}", x, y, ("multiclass", C)
    for L in (0, 100):
        n = (1 << lg) // max(1, L)
        x = torch.randn((n, L) if L else (n,), generator=gen).mul_(3)
        y = torch.randint(0, 2, x.shape, generator=gen)
        yield (f"multilabel L={L} fp32" if L else "binary fp32"), x, y, ("multilabel" if L else "binary", L)


def plain_table(args, gen):
    bw = dram_read_bandwidth()
    print(f"# DRAM read limit (best of torch sum / amax / numpy integer sum over 1 GiB): {bw / 1e9:.1f} GB/s")
    print(f"{'case':<24} {'N*C':>5} {'ms':>8} {'%DRAM':>6} {'plain/ours (min-max)':>20} "
          f"{'torchmetrics/ours (min-max)':>28}")
    for name, x, y, (task, C) in plain_cases(args, gen):
        if task == "multiclass":
            k, confmat = min(5, C), C <= 1024
            ours = stepscope.ClassificationMetrics(task, num_classes=C, top_k=(1, k), confusion_matrix=confmat)
            fns = {"ours": lambda: ours.update(x, y), "plain": lambda: plain_multiclass(C, k, confmat)(x, y)}
            tm = None if args.no_torchmetrics else make_torchmetrics(C, k, confmat, x.device)
        else:
            ours = stepscope.ClassificationMetrics(task, **({"num_labels": C} if C else {}))
            fns = {"ours": lambda: ours.update(x, y), "plain": lambda: plain_elementwise(C > 0)(x, y)}
            tm = None if args.no_torchmetrics else torchmetrics_elementwise(C, x.device)
        if tm is not None:
            try:
                tm(x[: max(1, x.shape[0] // 64)], y[: max(1, y.shape[0] // 64)])
                fns["torchmetrics"] = lambda: tm(x, y)
            except (RuntimeError, MemoryError):
                pass
        try:
            times = rounds_table(fns, args.rounds)
        except (RuntimeError, MemoryError):  # torchmetrics out of memory at large C
            fns.pop("torchmetrics", None)
            times = rounds_table(fns, args.rounds)
        t = statistics.median(times["ours"])
        nbytes = x.numel() * x.element_size() + y.numel() * y.element_size()
        print(f"{name:<24} {'2^' + str(args.plain_log2):>5} {t * 1e3:>8.2f} {100 * nbytes / t / bw:>5.1f}% "
              f"{ratio_cell(times, 'plain'):>20} {ratio_cell(times, 'torchmetrics'):>28}", flush=True)
        del x, y
    print(f"# %DRAM: (preds + target bytes) / stepscope's median time, over the read limit; ratios: "
          f"medians of per-round time ratios over {args.rounds} interleaved rounds (higher: stepscope faster)")


def regression_table(args, gen):
    """RegressionMetrics against torchmetrics' six regression metrics (update each, the same set) and
    against the plain-torch sums one would write (float64 sums of squares: fast, but they lose about
    twelve digits at a target offset of 1e6, which the moments here do not), interleaved rounds."""
    import torchmetrics as tm

    bw = dram_read_bandwidth() if args.device == "cpu" else None
    if bw:
        print(f"# DRAM read limit measured now: {bw / 1e9:.1f} GB/s")
    print(f"{'K':>4} {'N*K':>6} {'dtype':>8} {'ms':>8} {'%DRAM':>6} {'plain/ours (min-max)':>20} "
          f"{'torchmetrics/ours (min-max)':>28}")
    for k in (1, 8):
        for dtype in args.plain_dtypes:
            n = (1 << args.plain_log2) // k
            t = (torch.randn(n, k, generator=gen, device=args.device) * 3 + 1e3).to(getattr(torch, dtype))
            p = (t.float() + torch.randn(n, k, generator=gen, device=args.device)).to(t.dtype)
            if k == 1:
                p, t = p[:, 0], t[:, 0]
            ours = stepscope.RegressionMetrics(num_outputs=k, device=args.device)
            coll = tm.MetricCollection([tm.MeanSquaredError(num_outputs=k), tm.MeanAbsoluteError(num_outputs=k),
                                        tm.R2Score(multioutput="raw_values"),
                                        tm.ExplainedVariance(multioutput="raw_values"),
                                        tm.PearsonCorrCoef(num_outputs=k), tm.MeanAbsolutePercentageError()],
                                       compute_groups=False).to(args.device)
            acc = torch.zeros(8, k, dtype=torch.float64, device=args.device)

            def plain():
                a, b = p.double().reshape(n, k), t.double().reshape(n, k)
                e = a - b
                acc.add_(torch.stack([e.square().sum(0), e.abs().sum(0), b.sum(0), b.square().sum(0), a.sum(0),
                                      a.square().sum(0), (a * b).sum(0), e.sum(0)]))

            fns = {"ours": lambda: ours.update(p, t), "plain": plain, "torchmetrics": lambda: coll.update(p, t)}
            times = rounds_table(fns, args.rounds)
            med = statistics.median(times["ours"])
            share = f"{100 * 2 * p.numel() * p.element_size() / med / bw:>5.1f}%" if bw else f"{'-':>6}"
            print(f"{k:>4} {'2^' + str(args.plain_log2):>6} {dtype:>8} {med * 1e3:>8.2f} {share} "
                  f"{ratio_cell(times, 'plain'):>20} {ratio_cell(times, 'torchmetrics'):>28}", flush=True)
    print("# ratio = other / stepscope time per update (higher is better for stepscope)")


def binned_table(args, gen):
    """ClassificationMetrics(thresholds=T) against torchmetrics' binned AUROC + AveragePrecision
    (thresholds=T, each updated), interleaved rounds: what the histograms cost beside the rest of the
    update (the same ClassificationMetrics without thresholds)."""
    from torchmetrics import MetricCollection
    from torchmetrics import classification as tmc

    t = args.thresholds
    print(f"{'task':>12} {'C':>5} {'N*C':>6} {'T':>5} {'ms':>8} {'no-T/ours (min-max)':>20} "
          f"{'torchmetrics/ours (min-max)':>28}")
    for task, c in (("binary", 1), ("multiclass", 10), ("multilabel", 10), ("multiclass", 100)):
        n = (1 << args.plain_log2) // c
        x = torch.randn(n, c, generator=gen, device=args.device).squeeze(1) * 2
        if task == "multiclass":
            y = torch.randint(0, c, (n,), generator=gen, device=args.device)
        else:
            y = torch.randint(0, 2, x.shape, generator=gen, device=args.device)
        size = {"multiclass": {"num_classes": c}, "multilabel": {"num_labels": c}}.get(task, {})
        ours = stepscope.ClassificationMetrics(task, **size, thresholds=t, device=args.device)
        plain = stepscope.ClassificationMetrics(task, **size, device=args.device)
        kind = {"binary": "Binary", "multiclass": "Multiclass", "multilabel": "Multilabel"}[task]
        tm_size = {"multiclass": {"num_classes": c}, "multilabel": {"num_labels": c}}.get(task, {})
        coll = MetricCollection([getattr(tmc, kind + "AUROC")(thresholds=t, **tm_size),
                                 getattr(tmc, kind + "AveragePrecision")(thresholds=t, **tm_size)],
                                compute_groups=False).to(args.device)
        fns = {"ours": lambda: ours.update(x, y), "no-T": lambda: plain.update(x, y),
               "torchmetrics": lambda: coll.update(x, y)}
        times = rounds_table(fns, args.rounds)
        med = statistics.median(times["ours"]) * 1e3
        print(f"{task:>12} {c:>5} {'2^' + str(args.plain_log2):>6} {t:>5} {med:>8.2f} "
              f"{ratio_cell(times, 'no-T'):>20} {ratio_cell(times, 'torchmetrics'):>28}", flush=True)
    print("# ratio = other / stepscope time per update (no-T below 1: what the histograms add)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000, 32000])
    ap.add_argument("--min-log2", type=int, default=16)
    ap.add_argument("--max-log2", type=int, default=26)
    ap.add_argument("--step-log2", type=int, default=2)
    ap.add_argument("--sklearn-max-log2", type=int, default=22)
    ap.add_argument("--no-torchmetrics", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--targets", action="store_true", help="the CUDA bandwidth targets table only")
    ap.add_argument("--target-log2", type=int, nargs="+", default=[26, 27])
    ap.add_argument("--inputs", nargs="+", default=["auto"], choices=["auto", "logits", "probs"])
    ap.add_argument("--plain", action="store_true", help="CPU: rounds against plain torch, with the DRAM limit")
    ap.add_argument("--plain-log2", type=int, default=24)
    ap.add_argument("--plain-dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--regression", action="store_true",
                    help="RegressionMetrics against torchmetrics and plain torch")
    ap.add_argument("--binned", action="store_true",
                    help="thresholds=T (binned AUROC / AP) against torchmetrics")
    ap.add_argument("--thresholds", type=int, default=100)
    args = ap.parse_args()
    if args.plain and "--classes" not in sys.argv:
        args.classes = [2, 10, 100, 1000, 32000]
    # One BLAS thread for numpy/scikit-learn: these calls gain nothing from more, and idle OpenBLAS
    # workers spinning after them would steal the cores of the next measurement.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    seed = time.time_ns() % (2**31)
    gen = torch.Generator(device=device).manual_seed(seed)
    print(f"# {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"# seed {seed}; torch {torch.__version__}; stepscope {stepscope.build_info()}; "
          f"threads {torch.get_num_threads()}; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    if args.targets:
        targets(device, gen, args.target_log2, args.inputs)
        return
    if args.plain:
        plain_table(args, gen)
        return
    if args.regression:
        regression_table(args, gen)
        return
    if args.binned:
        binned_table(args, gen)
        return
    peak = None
    if device.type == "cuda":
        peak = copy_bandwidth(device)
        print(f"# device-to-device copy bandwidth (read + write): {peak / 1e9:.0f} GB/s")

    hdr = (f"{'C':>6} {'N':>9} {'N*C':>6} {'stepscope':>10} {'GB/s':>6} {'Gelem/s':>7} {'torchmetrics':>12} "
           f"{'ratio':>7} {'sklearn':>9} {'ratio':>7}")
    if device.type == "cuda":
        hdr += f" {'%copyBW':>7} {'launch':>6} {'sync':>4}"
    print(hdr)
    for C in args.classes:
        for lg in range(args.min_log2, args.max_log2 + 1, args.step_log2):
            N = max(1, (1 << lg) // C)
            k = min(5, C)
            confmat = C <= 1024
            x = torch.randn(N, C, generator=gen, device=device, dtype=torch.float32).mul_(3).to(dtype)
            y = torch.randint(0, C, (N,), generator=gen, device=device)
            ours = stepscope.ClassificationMetrics("multiclass", num_classes=C, top_k=(1, k),
                                                   confusion_matrix=confmat, device=device)
            t_ours = median_time(lambda: ours.update(x, y), device)
            nbytes = x.numel() * x.element_size() + y.numel() * y.element_size()
            row = (f"{C:>6} {N:>9} {'2^' + str(lg):>6} {t_ours * 1e3:>8.3f}ms {nbytes / t_ours / 1e9:>6.2f} "
                   f"{x.numel() / t_ours / 1e9:>7.3f}")
            if args.no_torchmetrics:
                row += f" {'-':>12} {'-':>7}"
            else:
                tm = make_torchmetrics(C, k, confmat, device)
                try:
                    t_tm = median_time(lambda: tm(x, y), device, min_reps=2)
                    row += f" {t_tm * 1e3:>10.3f}ms {t_tm / t_ours:>6.1f}x"
                except (RuntimeError, MemoryError) as e:  # out of memory at large C
                    row += f" {'OOM' if 'memory' in str(e).lower() else 'error':>12} {'-':>7}"
            if lg <= args.sklearn_max_log2:
                sk = make_sklearn(C, k, confmat)
                t_sk = median_time(lambda: sk(x, y), device, min_reps=1, min_seconds=0.2)
                row += f" {t_sk * 1e3:>7.1f}ms {t_sk / t_ours:>6.1f}x"
            else:
                row += f" {'-':>9} {'-':>7}"
            if device.type == "cuda":
                launches, syncs = count_launches_and_syncs(ours, x, y)
                row += f" {100 * nbytes / t_ours / peak:>6.1f}% {launches:>6} {syncs:>4}"
            print(row, flush=True)
            del x, y
    print("# ratio = other / stepscope time per update (higher is better for stepscope)")


if __name__ == "__main__":
    main()
