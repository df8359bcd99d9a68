"""Lightning with stepscope: the step timed by a callback, metrics as submodules, logged as scalars.

    python examples/lightning_train.py [--epochs 3] [--manual] [--device cpu|cuda]

scikit-learn's bundled digits (no download). ``StepscopeCallback`` times every training step
(data, forward, backward, optimizer: right in automatic optimization, where Lightning runs
``training_step`` and the backward inside ``optimizer.step(closure)``), logs the timing of the
steps since its previous log, and feeds the training metrics from ``training_step``'s outputs
(logged and reset at each epoch's end; ``cb.run_metrics`` keeps the whole run's); the validation
metrics are a submodule of the
LightningModule, so they move with it and are saved in its checkpoints, and
``log_dict(metrics.log_dict("val/"))`` logs their scalar entries.
"""

import argparse

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits

import stepscope
from stepscope.integrations.lightning import StepscopeCallback


class Digits(pl.LightningModule):
    def __init__(self, manual: bool = False):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        self.val_metrics = stepscope.ClassificationMetrics("multiclass", num_classes=10, top_k=(1, 3))
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return {"loss": loss, "preds": logits.detach(), "target": y}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_metrics.update(self.net(x), y)

    def on_validation_epoch_end(self):
        self.log_dict(self.val_metrics.log_dict("val/"))
        self.val_metrics.reset()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def loaders(batch_size: int) -> tuple:
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = perm[: int(0.8 * len(y))], perm[int(0.8 * len(y)):]
    ds = torch.utils.data.TensorDataset
    return (torch.utils.data.DataLoader(ds(x[tr], y[tr]), batch_size=batch_size, shuffle=True),
            torch.utils.data.DataLoader(ds(x[va], y[va]), batch_size=256))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--manual", action="store_true", help="manual optimization")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.manual_seed(0)
    train, val = loaders(args.batch_size)
    model = Digits(manual=args.manual)
    cb = StepscopeCallback(metrics=stepscope.ClassificationMetrics("multiclass", num_classes=10),
                           log_every_n_steps=10)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb])
    trainer.fit(model, train, val)  # the callback prints the step summary at the end
    logged = {k: round(float(v), 4) for k, v in sorted(trainer.callback_metrics.items())}
    print("logged:", logged)
    rep = cb.monitor.report()
    print(f"training accuracy over the run {float(cb.run_metrics.compute()['accuracy']):.4f}")
    print(f"steps {cb.monitor.steps} (optimizer steps {trainer.global_step}), "
          f"forward p50 {rep['phases']['forward']['host']['p50'] * 1e3:.3f} ms")
    if cb.monitor.steps != trainer.global_step:  # warm-up steps included: every completed step
        raise SystemExit("stepscope's step count differs from Lightning's: something is wrong")
    if logged["val/accuracy"] < 0.85:
        raise SystemExit(f"validation accuracy {logged['val/accuracy']:.3f} is below 0.85: "
                         "something is wrong")


if __name__ == "__main__":
    main()
