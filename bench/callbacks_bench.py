"""What the Lightning callback costs at its defaults: Trainer.fit of a small module for --steps
steps, bare and beside Lightning's own tools, in rounds of random order.

  bare              Trainer(logger=CSVLogger, enable_progress_bar=False, enable_checkpointing=False)
  stepscope         + StepscopeCallback() at its defaults (log every 50 steps, the end-of-fit summary)
  stepscope quiet   + StepscopeCallback(log_every_n_steps=0, summary=False)
  profiler=simple   Trainer(profiler="simple")
  ThroughputMonitor + lightning's ThroughputMonitor(batch_size_fn=len of the batch)

A fit's time is its wall time; the table gives each variant's median ratio to the bare fit of the
same round (with min-max) and the extra µs per step.

    python bench/callbacks_bench.py [--rounds 21] [--steps 300]

With ``--hf`` the same for the Hugging Face ``Trainer.train`` of a small regression head (a Linear
on 32 features, batch 16, ``logging_steps=50``, no tqdm, no saving, no reporting):

  bare              Trainer(...) alone
  stepscope         + StepscopeCallback() at its defaults (the phases logged with each log, the summary)
  stepscope quiet   + StepscopeCallback(log=False, summary=False)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import random
import statistics
import sys
import tempfile
import time
import warnings

import torch

import stepscope


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hf", action="store_true", help="the Hugging Face Trainer instead of Lightning")
    args = ap.parse_args()
    if args.hf:
        return hf(args)
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger

    from stepscope.integrations.lightning import StepscopeCallback

    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(args.steps * 16, 32), torch.randint(0, 4, (args.steps * 16,)))
    out = tempfile.mkdtemp(prefix="stepscope-callbacks-bench-")

    def fit(callbacks=(), **kw):
        torch.manual_seed(0)
        trainer = pl.Trainer(max_steps=args.steps, max_epochs=1, accelerator="cpu", logger=CSVLogger(out),
                             enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                             callbacks=list(callbacks), **kw)
        loader = torch.utils.data.DataLoader(data, batch_size=16)
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            trainer.fit(Module(), loader)
            return time.perf_counter() - t0

    variants = {
        "bare": lambda: fit(),
        "stepscope": lambda: fit([StepscopeCallback()]),
        "stepscope quiet": lambda: fit([StepscopeCallback(log_every_n_steps=0, summary=False)]),
        "profiler=simple": lambda: fit(profiler="simple"),
        "ThroughputMonitor": lambda: fit([ThroughputMonitor(batch_size_fn=lambda b: len(b[0]))]),
    }
    times = interleaved(variants, args.rounds)
    print(f"torch {torch.__version__}, lightning {pl.__version__}, stepscope {stepscope.__version__}, 1 thread, "
          f"{args.rounds} rounds x {args.steps} steps")
    report(times, args)
    return 0


def interleaved(variants: dict, rounds: int) -> dict:
    """Each variant once to warm up (imports, first-call dispatch), then ``rounds`` rounds, each running
    every variant once in a fresh random order: name -> its times."""
    for fn in variants.values():
        fn()
    times: dict = {k: [] for k in variants}
    order = list(variants)
    for _ in range(rounds):
        random.shuffle(order)
        for k in order:
            times[k].append(variants[k]())
    return times


def report(times: dict, args) -> None:
    print(f"{'variant':18s} {'median s':>9s} {'ratio':>7s} {'min-max':>13s} {'us/step':>8s}")
    for k, ts in times.items():
        r = [t / b for t, b in zip(ts, times["bare"])]
        extra = statistics.median(t - b for t, b in zip(ts, times["bare"])) / args.steps * 1e6
        print(f"{k:18s} {statistics.median(ts):9.3f} {statistics.median(r):7.3f} {min(r):6.3f}-{max(r):<6.3f} "
              f"{extra:8.1f}")
    print("reproduce: python bench/callbacks_bench.py " + " ".join(sys.argv[1:]))


def hf(args) -> int:
    import transformers

    from stepscope.integrations.transformers import StepscopeCallback

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(logits.squeeze(-1), labels), "logits": logits}

    class Rows(torch.utils.data.Dataset):
        def __init__(self, n):
            self.x, self.y = torch.randn(n, 32), torch.randn(n)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    data = Rows(args.steps * 16)
    out = tempfile.mkdtemp(prefix="stepscope-callbacks-bench-hf-")

    def fit(callbacks=()):
        torch.manual_seed(0)
        targs = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=16, use_cpu=True, report_to=[],
            save_strategy="no", logging_steps=50, disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=Head(), args=targs, train_dataset=data,
                                       callbacks=list(callbacks))
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            trainer.train()
            return time.perf_counter() - t0

    variants = {
        "bare": lambda: fit(),
        "stepscope": lambda: fit([StepscopeCallback()]),
        "stepscope quiet": lambda: fit([StepscopeCallback(log=False, summary=False)]),
    }
    times = interleaved(variants, args.rounds)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"stepscope {stepscope.__version__}, 1 thread, {args.rounds} rounds x {args.steps} steps")
    report(times, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
