"""Semantic segmentation on synthetic masks: [N, C, H, W] logits, ignore_index=255, mean IoU per epoch.

    python examples/segmentation.py [--epochs 4] [--device cpu|cuda]

Each image holds a few filled rectangles of random classes on a background (class 0), with a
one-pixel "void" border (255) around every rectangle, as in Pascal VOC: those pixels count
nowhere. A small fully-convolutional net learns to paint them; stepscope reads the dense logits
as they are (classes in dim 1) and reports mean IoU, pixel accuracy and the per-class IoU.
"""

import argparse
import time

import torch

import stepscope

VOID = 255


def synthetic(n: int, classes: int, size: int, g: torch.Generator) -> tuple:
    x = torch.randn(n, 3, size, size, generator=g) * 0.3
    y = torch.zeros(n, size, size, dtype=torch.long)
    # a fixed colour per class: the net must learn colour -> class, edges -> void
    colours = torch.linspace(-1.5, 1.5, classes).view(classes, 1).repeat(1, 3)
    colours[:, 1] = colours[:, 1].flip(0)
    for i in range(n):
        for _ in range(3):
            c = int(torch.randint(1, classes, (1,), generator=g))
            h, w = (int(v) for v in torch.randint(4, size // 2, (2,), generator=g))
            r = int(torch.randint(1, size - h - 1, (1,), generator=g))
            s = int(torch.randint(1, size - w - 1, (1,), generator=g))
            y[i, r - 1:r + h + 1, s - 1:s + w + 1] = VOID
            y[i, r:r + h, s:s + w] = c
            x[i, :, r:r + h, s:s + w] += colours[c].view(3, 1, 1)
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    C = args.classes
    x_train, y_train = synthetic(192, C, args.size, g)
    x_val, y_val = synthetic(64, C, args.size, g)

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, C, 1),
    ).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_m = stepscope.ClassificationMetrics("multiclass", num_classes=C, ignore_index=VOID).to(dev)
    val_m = stepscope.ClassificationMetrics("multiclass", num_classes=C, ignore_index=VOID).to(dev)

    print(f"{'epoch':>5} {'loss':>7} {'pix_acc':>7} {'val_mIoU':>8} {'val_acc':>7} {'void px':>8}")
    t0 = time.perf_counter()
    with stepscope.Monitor(model, opt) as mon:
        for epoch in range(args.epochs):
            model.train()
            for i in range(0, len(x_train), args.batch_size):
                xb, yb = x_train[i:i + args.batch_size].to(dev), y_train[i:i + args.batch_size].to(dev)
                logits = model(xb)  # [N, C, H, W]
                loss = torch.nn.functional.cross_entropy(logits, yb, ignore_index=VOID)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                train_m.update(logits.detach(), yb)
            model.eval()
            with torch.no_grad():
                val_m.update(model(x_val.to(dev)), y_val.to(dev))
            tr, va = train_m.compute(), val_m.compute()
            print(f"{epoch:5d} {float(tr['loss']):7.4f} {float(tr['accuracy']):7.3f} "
                  f"{float(va['mean_iou']):8.3f} "
                  f"{float(va['accuracy']):7.3f} {int(va['ignored']):8d}")
            train_m.reset()
            if epoch < args.epochs - 1:
                val_m.reset()
    print("val IoU per class:", [round(float(v), 3) for v in va["iou_per_class"]])
    print(f"trained {args.epochs} epochs in {time.perf_counter() - t0:.2f} s")
    print(mon.summary())
    if float(va["mean_iou"]) < 0.5:
        raise SystemExit(f"validation mean IoU {float(va['mean_iou']):.3f} is below 0.5: something is wrong")


if __name__ == "__main__":
    main()
