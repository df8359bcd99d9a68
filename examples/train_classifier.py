"""Train a small classifier on scikit-learn's bundled digits (no download) with stepscope watching.

    python examples/train_classifier.py [--epochs 15] [--device cpu|cuda]

Metrics come from stepscope.ClassificationMetrics: one fused update per batch, read once per
epoch. stepscope.Monitor times every step's phases; its summary is printed at the end, and the
run is written as a Perfetto trace (stepscope_demo.trace.json.gz), a run file
(stepscope_demo.json, for `python -m stepscope report stepscope_demo.json`) and a PNG dashboard
(stepscope_demo.png) in the current folder.
"""

import argparse
import os
import time

import torch
from sklearn.datasets import load_digits

import stepscope


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y))
    n_train = int(0.8 * len(y))
    train_idx, val_idx = perm[:n_train], perm[n_train:]
    x_val, y_val = x[val_idx].to(dev), y[val_idx].to(dev)

    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(128, 10)
    ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train_metrics = stepscope.ClassificationMetrics("multiclass", num_classes=10, top_k=(1, 3), device=dev)
    val_metrics = stepscope.ClassificationMetrics("multiclass", num_classes=10, top_k=(1, 3), device=dev)

    print(f"stepscope {stepscope.__version__} {stepscope.build_info()}")
    print(f"digits: {n_train} train / {len(val_idx)} val samples, device {dev}")
    print(f"{'epoch':>5} {'loss':>7} {'acc':>6} {'val_loss':>8} {'val_acc':>7} {'val_f1':>7} {'val_top3':>8} {'ece':>6}")
    t0 = time.perf_counter()
    with stepscope.Monitor(model, opt, trace="stepscope_demo.trace.json.gz") as monitor:
        for epoch in range(args.epochs):
            model.train()
            order = train_idx[torch.randperm(n_train)]
            for i in range(0, n_train, args.batch_size):
                idx = order[i : i + args.batch_size]
                xb, yb = x[idx].to(dev, non_blocking=True), y[idx].to(dev, non_blocking=True)
                logits = model(xb)
                loss = torch.nn.functional.cross_entropy(logits, yb)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                train_metrics.update(logits.detach(), yb)  # one kernel, no host sync
            model.eval()
            with torch.no_grad():
                val_metrics.update(model(x_val), y_val)
            tr, va = train_metrics.compute(), val_metrics.compute()  # the only host reads
            print(
                f"{epoch:5d} {float(tr['loss']):7.4f} {float(tr['accuracy']):6.3f} {float(va['loss']):8.4f} "
                f"{float(va['accuracy']):7.3f} {float(va['f1_macro']):7.3f} {float(va['top3_accuracy']):8.3f} "
                f"{float(va['ece']):6.3f}"
            )
            train_metrics.reset()
            val_metrics.reset()
    print(f"trained {args.epochs} epochs in {time.perf_counter() - t0:.2f} s")
    print(monitor.summary())
    print("trace (open in https://ui.perfetto.dev): stepscope_demo.trace.json.gz")
    monitor.save("stepscope_demo.json")
    print("run file: stepscope_demo.json (python -m stepscope report stepscope_demo.json)")
    monitor.to_html("stepscope_demo.html", metrics=va)  # one self-contained page, opens offline
    print(f"HTML report: {os.path.abspath('stepscope_demo.html')}")
    try:
        stepscope.plot(stepscope.load("stepscope_demo.json"), "stepscope_demo.png")
        print("dashboard: stepscope_demo.png")
    except ImportError as e:  # matplotlib is optional: pip install 'stepscope[plot]'
        print(e)
    final_acc = float(va["accuracy"])
    if final_acc < 0.9:
        raise SystemExit(f"validation accuracy {final_acc:.3f} is below 0.9: something is wrong")


if __name__ == "__main__":
    main()
