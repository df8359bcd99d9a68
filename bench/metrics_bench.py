"""Metric update cost: stepscope vs torchmetrics (MetricCollection) vs scikit-learn, same metric set.

    python bench/metrics_bench.py                       # CPU, full grid
    python bench/metrics_bench.py --device cuda         # GPU: + copy-bandwidth share, launches, syncs
    python bench/metrics_bench.py --max-log2 22 --classes 10 1000

Metric set per update: accuracy (micro), macro F1, confusion matrix (dropped at C > 1024, where
torchmetrics' and our C x C matrix would not fit: 32000^2 counters), top-5 accuracy (top-C when
C < 5) and mean cross-entropy loss. torchmetrics: a MetricCollection at its defaults
(validate_args=True) plus a MeanMetric fed F.cross_entropy. scikit-learn: the matching functions
on numpy copies, timed only up to N*C = 2^--sklearn-max-log2. Inputs are fresh random logits
every run (seeded from the clock; the seed is printed). Times are medians.
"""

import argparse
import os
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
    args = ap.parse_args()
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
