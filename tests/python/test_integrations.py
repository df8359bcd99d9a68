"""Framework callbacks (Lightning, Hugging Face Trainer) and the examples, on CPU.

Planted sleeps in the loader, the training step, the backward (a custom autograd Function) and
the optimizer: each reported phase must hold what was really slept and at most SLACK more
(planted.p50_bounds). Lightning's own work between its hooks is 1-2 ms a phase on a quiet 2-core
machine and more when it is loaded: SLACK is generous against that and half the smallest plant
(30 ms), so a plant reported in the wrong phase still fails. Each framework's tests skip cleanly
when it is not installed (``make test`` installs both).
"""

import collections
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import stepscope
from planted import SLEPT, assert_planted, sleep

ROOT = Path(__file__).resolve().parents[2]
PLANT = {"data": 0.060, "forward": 0.050, "backward": 0.030, "optimizer": 0.030}
SLACK = 0.015


def assert_close(got, phase):
    assert_planted(got, phase, SLACK)


def assert_lightning_data(rep):
    # Lightning fetches the first batch before on_train_start and then one batch ahead: step i's
    # data holds the sleep of batch i + 1, and the last step's none.
    assert_planted(rep["phases"]["data"]["host"]["p50"], "data", SLACK, slept=SLEPT["data"][1:] + [0.0])


class SleepBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        sleep(PLANT["backward"], "backward")
        return g


class SlowSGD(torch.optim.SGD):
    """Runs the closure (Lightning's training_step + backward) first, then sleeps, then steps."""

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sleep(PLANT["optimizer"], "optimizer")
        super().step()
        return loss


class SleepyBatches(torch.utils.data.IterableDataset):
    def __init__(self, n, batch=8, classes=4):
        self.n, self.batch, self.classes = n, batch, classes

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.n):
            sleep(PLANT["data"], "data")
            x = torch.randn(self.batch, 6, generator=g)
            yield x, torch.randint(0, self.classes, (self.batch,), generator=g)


@pytest.fixture(autouse=True)
def one_thread():
    SLEPT.clear()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- Lightning
def lightning_module(manual: bool):
    pl = pytest.importorskip("lightning.pytorch")

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            x, y = batch
            sleep(PLANT["forward"], "forward")
            logits = SleepBackward.apply(self.net(x))  # a submodule: the module's own hooks see nothing
            loss = torch.nn.functional.cross_entropy(logits, y)
            if manual:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            return {"loss": loss, "preds": logits.detach(), "target": y}

        def configure_optimizers(self):
            return SlowSGD(self.parameters(), lr=0.01)

    return pl, Lit()


def fit(manual=False, accumulate=1, batches=7, **cb_kwargs):
    pl, lit = lightning_module(manual)
    from stepscope.integrations.lightning import StepscopeCallback

    cb = StepscopeCallback(**{"warmup_steps": 0, "flops": None, **cb_kwargs})
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         accumulate_grad_batches=accumulate, callbacks=[cb])
    loader = torch.utils.data.DataLoader(SleepyBatches(batches), batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(lit, loader)
    ours = [str(w.message) for w in caught if "stepscope" in str(w.message)]
    assert not ours, ours
    return trainer, cb


@pytest.mark.parametrize("manual,accumulate", [(False, 1), (True, 1), (False, 2)],
                         ids=["automatic", "manual", "accumulate2"])
def test_lightning_phases_match_their_plants(manual, accumulate, capsys):
    batches = 14 if accumulate > 1 else 7
    trainer, cb = fit(manual=manual, accumulate=accumulate, batches=batches, log_every_n_steps=0)
    rep = cb.monitor.report()
    out = capsys.readouterr().out
    print(out)
    assert "forward" in out and "optimizer" in out and "steps" in out  # the summary was printed
    assert not cb.monitor.attached
    assert rep["steps"] == batches // accumulate == trainer.global_step
    assert rep["samples"] == 8 * batches
    assert rep["phases"]["forward"]["host"]["count"] == batches
    assert rep["phases"]["backward"]["host"]["count"] == batches
    assert rep["phases"]["optimizer"]["host"]["count"] == batches // accumulate
    assert_close(rep["phases"]["forward"]["host"]["p50"], "forward")
    assert_close(rep["phases"]["backward"]["host"]["p50"], "backward")
    assert_close(rep["phases"]["optimizer"]["host"]["p50"], "optimizer")
    if accumulate == 1:
        assert_lightning_data(rep)
    partition = ("data", "forward", "loss", "backward", "other", "optimizer")
    total = sum(rep["phases"][ph]["host"]["total"] for ph in partition)
    assert total == pytest.approx(rep["phases"]["step"]["host"]["total"], rel=1e-9)


def test_lightning_logs_phases_and_metrics_to_callback_metrics(tmp_path):
    metrics = stepscope.ClassificationMetrics("multiclass", num_classes=4)
    trace = tmp_path / "run.trace.json"
    trainer, cb = fit(batches=4, metrics=metrics, log_every_n_steps=2, summary=False, trace=str(trace))
    assert trace.stat().st_size > 0  # written by the Monitor when the callback detached it
    logged = trainer.callback_metrics
    for key in ("stepscope/step_p50_ms", "stepscope/optimizer_share", "stepscope/accuracy",
                "stepscope/f1_macro", "stepscope/loss"):
        assert key in logged, sorted(logged)
    assert float(logged["stepscope/step_p50_ms"]) > 0
    assert int(cb.run_metrics.compute()["samples"]) == 4 * 8
    assert int(metrics.compute()["samples"]) == 0  # logged and reset at the epoch's end
    assert "stepscope/accuracy_per_class" not in logged


def test_lightning_step_logs_reach_the_logger_at_their_step(tmp_path):
    pl, lit = lightning_module(False)
    from lightning.pytorch.loggers import CSVLogger

    from stepscope.integrations.lightning import StepscopeCallback

    cb = StepscopeCallback(log_every_n_steps=2, summary=False, warmup_steps=0, flops=None)
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb])
    trainer.fit(lit, torch.utils.data.DataLoader(SleepyBatches(6), batch_size=None))
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    steps = [int(r["step"]) for r in rows if r.get("stepscope/step_p50_ms")]
    assert steps == [1, 3, 5], rows  # after optimizer steps 2, 4 and 6 (Lightning counts from 0)
    assert all(float(r["stepscope/step_p50_ms"]) > 0 for r in rows if r.get("stepscope/step_p50_ms"))
    for name in (trainer.callback_metrics, trainer.logged_metrics):
        assert name["stepscope/step_p50_ms"].dtype == torch.float64
    last = [r for r in rows if r.get("stepscope/step_p50_ms")][-1]
    latest = float(trainer.callback_metrics["stepscope/step_p50_ms"])
    assert float(last["stepscope/step_p50_ms"]) == pytest.approx(latest)


def test_lightning_own_logging_is_its_own_span_outside_the_step():
    # log_dict with many names took 35-55 ms and landed in the next step's data: plant that cost in
    # log_dict itself and log after every step, so every data span would hold it.
    pl, lit = lightning_module(False)
    from stepscope.integrations.lightning import LOG_KEYS, StepscopeCallback

    log_dict, calls = lit.log_dict, []

    def slow_log_dict(d, **kw):
        calls.append(sorted(d))
        sleep(0.040, "stepscope_log")
        return log_dict(d, **kw)

    lit.log_dict = slow_log_dict  # the epoch's metrics
    metrics = stepscope.ClassificationMetrics("multiclass", num_classes=4)
    cb = StepscopeCallback(metrics=metrics, log_every_n_steps=1, summary=False, warmup_steps=0, flops=None)
    send = cb._send  # the step logs, straight to callback_metrics and the loggers

    def slow_send(trainer, d):
        calls.append(sorted(d))
        sleep(0.040, "stepscope_log")
        return send(trainer, d)

    cb._send = slow_send
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(lit, torch.utils.data.DataLoader(SleepyBatches(7), batch_size=None))
    rep = cb.monitor.report()
    print(cb.monitor.summary())
    assert rep["steps"] == 7 and len(calls) == 7 + 1  # after each step, and the metrics at the epoch's end
    assert_lightning_data(rep)  # the loader's sleep, not the log's
    own = rep["user"]["stepscope_log"]
    assert own["host"]["count"] == 8 and own["parent"] == "eval_forward"
    assert_planted(own["host"]["p50"], "stepscope_log", SLACK)
    assert "stepscope_log" in cb.monitor.summary()
    # the short list by default: 9 names at most, each one of LOG_KEYS
    prefix = "stepscope/"
    assert all(1 <= len(c) <= len(LOG_KEYS) for c in calls)
    assert {k[len(prefix):] for c in calls for k in c} <= set(LOG_KEYS)
    assert {"stepscope/step_p50_ms", "stepscope/data_share"} <= set(calls[0])
    assert {"stepscope/accuracy", "stepscope/f1_macro", "stepscope/loss"} == set(calls[-1])


def test_lightning_metrics_per_epoch_and_timing_per_interval():
    # The forward sleeps 5 ms in epoch 0 and 60 ms in epoch 1; 4 steps an epoch, a log every 2.
    pl = pytest.importorskip("lightning.pytorch")
    from stepscope.integrations.lightning import StepscopeCallback

    seen = collections.defaultdict(lambda: ([], []))  # epoch -> (preds, targets) fed to the metrics

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(6, 4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            sleep((0.005, 0.060)[self.current_epoch], f"forward{self.current_epoch}")
            logits = self.net(x)
            seen[self.current_epoch][0].append(logits.detach().clone())
            seen[self.current_epoch][1].append(y)
            loss = torch.nn.functional.cross_entropy(logits, y)
            return {"loss": loss, "preds": logits.detach(), "target": y}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    metrics = stepscope.ClassificationMetrics("multiclass", num_classes=4)
    cb = StepscopeCallback(metrics=metrics, log_every_n_steps=2, log_keys="all", summary=False,
                           warmup_steps=0, flops=None)
    lit, logged = Lit(), []  # what the callback logged, call by call: step logs and the epochs' metrics
    log_dict, send = lit.log_dict, cb._send
    lit.log_dict = lambda d, **kw: (logged.append({k: float(v) for k, v in d.items()}), log_dict(d, **kw))
    cb._send = lambda trainer, d: (logged.append({k: float(v) for k, v in d.items()}), send(trainer, d))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(lit, torch.utils.data.DataLoader(batches, batch_size=None))

    def accuracy(epochs):
        p = torch.cat([t for e in epochs for t in seen[e][0]])
        y = torch.cat([t for e in epochs for t in seen[e][1]])
        return float((p.argmax(1) == y).double().mean())

    per_epoch = [h["stepscope/accuracy"] for h in logged if "stepscope/accuracy" in h]
    assert per_epoch == pytest.approx([accuracy([0]), accuracy([1])], abs=1e-6)  # reset each epoch
    assert float(cb.run_metrics.compute()["accuracy"]) == pytest.approx(accuracy([0, 1]), abs=1e-12)
    assert int(cb.run_metrics.compute()["samples"]) == 2 * 4 * 8 and int(metrics.compute()["samples"]) == 0
    # each timing log holds the 2 steps since the previous one: the third log holds 60 ms forwards only
    fwd = [h["stepscope/forward_p50_ms"] / 1e3 for h in logged if "stepscope/forward_p50_ms" in h]
    assert len(fwd) == 4
    assert_planted(fwd[1], "forward", SLACK, slept=SLEPT["forward0"][2:4])
    assert_planted(fwd[2], "forward", SLACK, slept=SLEPT["forward1"][0:2])
    whole = cb.monitor.report()["phases"]["forward"]["host"]  # the whole run's stays in report()
    assert whole["count"] == 8 and whole["total"] >= sum(SLEPT["forward0"] + SLEPT["forward1"])


def test_lightning_log_keys_all_and_a_list():
    trainer, cb = fit(batches=2, log_every_n_steps=1, summary=False, log_keys="all",
                      metrics=stepscope.ClassificationMetrics("multiclass", num_classes=4))
    logged = set(trainer.callback_metrics)
    assert {"stepscope/forward_p50_ms", "stepscope/loss_share", "stepscope/precision_macro",
            "stepscope/ece"} <= logged and len(logged) > 30
    trainer, cb = fit(batches=2, log_every_n_steps=1, summary=False, log_keys=["optimizer_p50_ms"])
    assert set(trainer.callback_metrics) == {"stepscope/optimizer_p50_ms"}
    from stepscope.integrations.lightning import StepscopeCallback

    with pytest.raises(TypeError, match="log_keys"):
        StepscopeCallback(log_keys="some")
    with pytest.raises(ValueError, match="log_keys"):
        StepscopeCallback(log_keys=[])


def test_plant_bounds_fail_when_a_sleep_is_reported_in_another_phase():
    # The bounds the timing tests use must catch a wrong attribution: sleeps labelled "forward" that
    # really run after the forward (in "loss") fail both that phase's lower and loss's upper bound.
    model = torch.nn.Linear(6, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        for _ in range(5):
            out = model(torch.randn(8, 6))
            sleep(0.030, "forward")  # mislabelled: this is the loss phase
            out.sum().backward()
            opt.step()
    rep = mon.report()
    with pytest.raises(AssertionError, match="forward: reported p50"):
        assert_planted(rep["phases"]["forward"]["host"]["p50"], "forward", SLACK)
    with pytest.raises(AssertionError, match="loss: reported p50"):
        assert_planted(rep["phases"]["loss"]["host"]["p50"], "loss", SLACK, slept=[0.0] * 5)
    assert_planted(rep["phases"]["loss"]["host"]["p50"], "loss", SLACK, slept=SLEPT["forward"])


def test_lightning_callback_refuses_bad_arguments_and_detaches_on_errors():
    pl, lit = lightning_module(False)
    from stepscope.integrations.lightning import StepscopeCallback

    with pytest.raises(TypeError, match="ClassificationMetrics"):
        StepscopeCallback(metrics=object())
    with pytest.raises(ValueError, match="log_every_n_steps"):
        StepscopeCallback(log_every_n_steps=-1)
    # metrics asked for, training_step returning only a loss: a clear error, no hook left behind
    lit.training_step = lambda batch, i=0: torch.nn.functional.cross_entropy(lit.net(batch[0]), batch[1])
    cb = StepscopeCallback(metrics=stepscope.ClassificationMetrics("multiclass", num_classes=4))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    with pytest.raises(ValueError, match="'preds' and 'target'"):
        trainer.fit(lit, torch.utils.data.DataLoader(SleepyBatches(2), batch_size=None))
    assert not cb.monitor.attached
    assert not lit._forward_hooks and not lit._forward_pre_hooks


# ----------------------------------------------------------------------------- Hugging Face
def tiny_lm():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers, transformers.GPT2LMHeadModel(cfg)


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n, T=12, V=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, V, (n, T), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_hf_trainer_steps_are_optimizer_steps(tmp_path, capsys, accumulate):
    transformers, model = tiny_lm()
    from stepscope.integrations.transformers import StepscopeCallback

    cb = StepscopeCallback(warmup_steps=0, flops=None)
    seen = []

    class Logger(transformers.TrainerCallback):  # a logger placed after ours
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=2, disable_tqdm=True, learning_rate=1e-3, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(64),
                                 callbacks=[cb, Logger()])
    trainer.train()
    out = capsys.readouterr().out
    rep = cb.monitor.report()
    print(out)
    assert not cb.monitor.attached
    assert rep["steps"] == trainer.state.global_step == 4
    assert rep["phases"]["forward"]["host"]["count"] == 4 * accumulate
    assert rep["phases"]["backward"]["host"]["count"] == 4 * accumulate
    assert rep["phases"]["optimizer"]["host"]["count"] == 4
    assert rep["samples"] == 4 * 4 * accumulate
    for row in ("forward", "backward", "optimizer", "steps 4"):
        assert f"\n{row}" in out, row
    assert cb.loss_in_forward and "'forward' includes the loss" in out
    # the phases reached the loggers after the callback
    assert any(h.get("stepscope/step_p50_ms", 0) > 0 and h.get("stepscope/optimizer_share", 0) > 0
               for h in seen), seen
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_hf_metrics_from_the_models_logits_and_labels_per_log_and_on_eval(tmp_path):
    transformers, model = tiny_lm()
    from stepscope.integrations.transformers import StepscopeCallback

    def lm_metrics():
        return stepscope.ClassificationMetrics("multiclass", num_classes=64, class_dim=-1, ignore_index=-100)

    cb = StepscopeCallback(metrics=lm_metrics(), eval_metrics=lm_metrics(), summary=False, warmup_steps=0, flops=None)
    # The oracle, by hand from each training forward: token t predicts label t + 1. (The Trainer's
    # logged loss divides by every label of the batch, 12 a row, through num_items_in_batch.)
    losses, hits, seen = [], [], []

    def own_loss(module, args, kwargs, output):
        if module.training:
            logits, labels = output.logits[:, :-1].flatten(0, 1).double(), kwargs["labels"][:, 1:].flatten()
            losses.append(float(torch.nn.functional.cross_entropy(logits, labels)))
            hits.append(float((logits.argmax(-1) == labels).double().mean()))

    class Logger(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    own_loss_handle = model.register_forward_hook(own_loss, with_kwargs=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=2, disable_tqdm=True,
        learning_rate=1e-2, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(64),
                                   eval_dataset=TokenData(16), callbacks=[cb, Logger()])
    trainer.train()
    train_logs = [h for h in seen if "stepscope/loss" in h]
    assert len(train_logs) == 2, seen  # one per logging_steps: each the metrics of its own 2 steps
    for log, i in zip(train_logs, (0, 2)):
        assert log["stepscope/loss"] == pytest.approx(sum(losses[i:i + 2]) / 2, rel=1e-5)
        assert log["stepscope/accuracy"] == pytest.approx(sum(hits[i:i + 2]) / 2, rel=1e-5)
    assert train_logs[0]["stepscope/loss"] != train_logs[1]["stepscope/loss"]
    run = cb.run_metrics.compute()
    assert int(run["samples"]) == 4 * 4 * 11  # 4 steps of 4 sequences, 11 predicted tokens each
    assert float(run["loss"]) == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert int(cb.metrics.compute()["samples"]) == 0  # reset at each log
    out = trainer.evaluate()
    # HF's own eval loss, which divides the 11 predicted tokens' losses of a row by its 12 labels
    assert out["eval_stepscope/loss"] * 11 / 12 == pytest.approx(out["eval_loss"], rel=1e-5)
    assert 0 <= out["eval_stepscope/accuracy"] <= 1
    assert int(cb.eval_metrics.compute()["samples"]) == 0 and int(cb.run_metrics.compute()["samples"]) == 176
    cb.remove_hooks()
    assert not model._forward_hooks.keys() - {own_loss_handle.id}


def test_hf_logs_the_timing_of_the_steps_since_the_previous_log(tmp_path):
    # The model's forward sleeps 5 ms on steps 1-2 and 100 ms on steps 3-4; a log every 2 steps. The
    # tiny GPT-2's own forward takes 2-5 ms on a quiet machine and was seen at 25 ms on a loaded one:
    # 60 ms of slack, still below the 100 ms plant that would land in the wrong interval.
    transformers, model = tiny_lm()
    from stepscope.integrations.transformers import StepscopeCallback

    forwards = []

    def slow(module, args, kwargs, output):  # runs before the Monitor's post hook: inside forward
        if module.training:
            forwards.append(1)
            sleep(0.005 if len(forwards) <= 2 else 0.100, "forward")

    model.register_forward_hook(slow, with_kwargs=True)
    seen = []

    class Logger(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    cb = StepscopeCallback(summary=False, warmup_steps=0, flops=None, log_keys="all")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=2, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(64),
                                   callbacks=[cb, Logger()])
    trainer.train()
    fwd = [h["stepscope/forward_p50_ms"] / 1e3 for h in seen if "stepscope/forward_p50_ms" in h]
    assert len(fwd) == 2, seen
    assert_planted(fwd[0], "forward", 0.060, slept=SLEPT["forward"][0:2])
    assert_planted(fwd[1], "forward", 0.060, slept=SLEPT["forward"][2:4])  # cumulative: a 5 ms one
    assert cb.monitor.report()["phases"]["forward"]["host"]["count"] == 4


def test_log_tensorboard_since_a_snapshot_logs_that_interval():
    class Writer:
        def __init__(self):
            self.scalars = collections.defaultdict(dict)

        def add_scalar(self, tag, value, step):
            self.scalars[step][tag] = value

    model = torch.nn.Linear(6, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # a forward hook registered before the Monitor's runs before its post hook: inside forward
    model.register_forward_hook(lambda m, a, out: sleep(0.005 if len(SLEPT["f0"]) < 3 else 0.030,
                                                        "f0" if len(SLEPT["f0"]) < 3 else "f1"))
    w = Writer()
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        snap = None
        for epoch in range(2):
            for _ in range(3):
                model(torch.randn(8, 6)).sum().backward()
                opt.step()
            snap = stepscope.log_tensorboard(w, mon, epoch, since=snap)
        assert isinstance(snap, stepscope.monitor.Snapshot)
        assert stepscope.log_tensorboard(w, mon, 9) is not None  # the old call: the whole run
    assert_planted(w.scalars[0]["stepscope/forward/p50_ms"] / 1e3, "forward", SLACK, slept=SLEPT["f0"])
    assert_planted(w.scalars[1]["stepscope/forward/p50_ms"] / 1e3, "forward", SLACK, slept=SLEPT["f1"])
    assert w.scalars[9]["stepscope/forward/p50_ms"] == pytest.approx(
        mon.report()["phases"]["forward"]["host"]["p50"] * 1e3)
    with pytest.raises(TypeError, match="since=.*live Monitor"):
        stepscope.log_tensorboard(w, mon.report(), 0, since=snap)


def test_hf_metrics_refuse_what_they_cannot_read(tmp_path):
    transformers, model = tiny_lm()
    from stepscope.integrations.transformers import StepscopeCallback

    with pytest.raises(TypeError, match="metrics must be a stepscope.ClassificationMetrics"):
        StepscopeCallback(metrics=object())
    m = stepscope.ClassificationMetrics("multiclass", num_classes=64, class_dim=-1)
    with pytest.raises(ValueError, match="two objects"):
        StepscopeCallback(metrics=m, eval_metrics=m)

    class NoLabels(TokenData):
        def __getitem__(self, i):
            return {"input_ids": self.ids[i]}

    def no_label_loss(outputs, labels, num_items_in_batch=None):
        return outputs.logits.float().mean()

    cb = StepscopeCallback(metrics=m, summary=False)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1,
                                          per_device_train_batch_size=4, use_cpu=True, report_to=[],
                                          save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=NoLabels(8), callbacks=[cb],
                                   compute_loss_func=no_label_loss)
    with pytest.raises(ValueError, match="'labels'.*preds_target"):
        trainer.train()


def test_hf_optimizer_wrapper_is_unwrapped():
    pytest.importorskip("transformers")
    from stepscope.integrations.transformers import unwrap_optimizer

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)

    class Wrapper(torch.optim.Optimizer):  # an Optimizer subclass without Optimizer.__init__
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
    assert unwrap_optimizer(opt) is opt
    with pytest.raises(TypeError, match="cannot find a torch optimizer inside the Trainer's object"):
        unwrap_optimizer(object())


# ----------------------------------------------------------------------------- examples
def run_example(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT / "python")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--device", "cpu", *args], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    print(f"{name}: {time.perf_counter() - t0:.1f} s")
    return r.stdout


def test_example_segmentation():
    out = run_example("segmentation.py")
    assert "val IoU per class" in out and "\nforward" in out
    assert "steps 48 (45 after warm-up)" in out and "warm-up: 3 step(s)" in out  # 48 steps, the Monitor's default warm-up


def test_example_lm_tokens():
    out = run_example("lm_tokens.py")
    assert "metric state: 96155 float64 values for V = 32000" in out  # O(V), no V x V matrix (3V + 155)
    assert "padding ignored" in out and "steps 30 (27 after warm-up)" in out and "warm-up: 3 step(s)" in out


def test_example_lightning():
    pytest.importorskip("lightning.pytorch")
    out = run_example("lightning_train.py")  # manual optimization: the callback tests above
    assert "steps 69 (optimizer steps 69)" in out
    assert "'val/accuracy'" in out and "'stepscope/f1_macro'" in out


def test_lightning_observes_the_loss_and_logs_the_gradient_norm():
    trainer, cb = fit(batches=4, log_every_n_steps=2, summary=False)
    assert "stepscope/grad_norm" in trainer.callback_metrics, sorted(trainer.callback_metrics)
    h = cb.monitor.report()["health"]
    assert h["steps"] == 4 and h["loss"]["count"] == 4 and h["no_grad"]["names"] == []
    assert float(trainer.callback_metrics["stepscope/grad_norm"]) > 0


def test_hf_logs_the_gradient_norm_and_observes_no_loss(tmp_path):
    transformers, model = tiny_lm()
    from stepscope.integrations.transformers import StepscopeCallback

    seen = []

    class Logger(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    cb = StepscopeCallback(summary=False, warmup_steps=0, flops=None)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=2, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(64), callbacks=[cb, Logger()])
    trainer.train()
    logged = [h for h in seen if "loss" in h]  # the two logging steps (the last log is train_end's)
    assert len(logged) == 2 and all("stepscope/grad_norm" in h for h in logged), seen
    h = cb.monitor.report()["health"]
    assert h["steps"] == 4 and h["loss"] is None
    # The Trainer clips (max_grad_norm=1.0) before optimizer.step() and logs the norm before clipping;
    # the Monitor reads the gradients the optimizer gets: the clipped ones.
    for x in logged:
        ours, theirs = float(x["stepscope/grad_norm"]), float(x["grad_norm"])
        assert ours <= args.max_grad_norm * (1 + 1e-5) and (theirs <= args.max_grad_norm or ours < theirs)


# ----------------------------------------------------------------------------- throughput
def test_lightning_counts_the_flops_of_training_step_and_logs_mfu():
    # training_step calls self.net, never the LightningModule itself: the callback's marks count it.
    trainer, cb = fit(batches=6, log_every_n_steps=2, summary=False, flops="auto", warmup_steps=1,
                      peak_flops=1e9)
    t = cb.monitor.report()["throughput"]
    assert t["flops_per_step"] == 3 * 2 * 8 * (6 * 16 + 16 * 4) and t["flops_source"] == "counted"
    assert float(trainer.callback_metrics["stepscope/mfu"]) > 0
    assert cb.monitor.report()["warmup"]["steps"] == 1  # the counted step was step 0, the warm-up one


def test_hf_counts_per_sequence_length_reads_tokens_and_logs_mfu(tmp_path):
    transformers, model = tiny_lm()
    from stepscope._monitor_throughput import FlopCount
    from stepscope.integrations.transformers import StepscopeCallback

    seen = []

    class Logger(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    cb = StepscopeCallback(summary=False, peak_flops=1e10)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=2, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(64), callbacks=[cb, Logger()])
    trainer.train()
    logged = [h for h in seen if "stepscope/step_p50_ms" in h]  # logs with steps after the warm-up
    assert logged and all("stepscope/mfu" in h and "stepscope/tokens_per_s" in h for h in logged), seen
    t = cb.monitor.report()["throughput"]
    assert t["tokens_per_sample"] == 12 and t["tokens_source"] == "input [B, T]" and t["shapes_counted"] == 1
    ids = TokenData(4).ids
    with FlopCount() as c:  # the model's forward, as the Trainer calls it (keywords only)
        model(input_ids=ids, labels=ids)
    assert t["flops_per_step"] == 3 * c.total > 0



# ------------------------------------------------------------------------- RegressionMetrics in callbacks
def test_lightning_regression_metrics_per_epoch_and_over_the_run():
    pl = pytest.importorskip("lightning.pytorch")
    from sklearn.metrics import mean_squared_error, r2_score

    from stepscope.integrations.lightning import StepscopeCallback

    seen = collections.defaultdict(lambda: ([], []))

    class Reg(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            pred = self.net(x).squeeze(1) + 1000.0  # a large offset: the moments keep their digits
            seen[self.current_epoch][0].append(pred.detach().clone())
            seen[self.current_epoch][1].append(y)
            return {"loss": torch.nn.functional.mse_loss(pred, y), "preds": pred.detach(), "target": y}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, generator=g), torch.randn(8, generator=g) + 1000.0) for _ in range(4)]
    metrics = stepscope.RegressionMetrics()
    cb = StepscopeCallback(metrics=metrics, log_every_n_steps=0, summary=False, warmup_steps=0, flops=None)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(Reg(), torch.utils.data.DataLoader(batches, batch_size=None))

    def union(epochs):
        p = torch.cat([t for e in epochs for t in seen[e][0]]).double().numpy()
        y = torch.cat([t for e in epochs for t in seen[e][1]]).double().numpy()
        return p, y

    p1, y1 = union([1])
    logged = trainer.callback_metrics  # the last epoch's values
    assert float(logged["stepscope/mse"]) == pytest.approx(mean_squared_error(y1, p1), rel=1e-9)
    assert float(logged["stepscope/r2"]) == pytest.approx(r2_score(y1, p1), rel=1e-9)
    assert "stepscope/mae" in logged and "stepscope/pearson" not in logged  # the short list
    p, y = union([0, 1])
    run = cb.run_metrics.compute()  # the two epochs merged, not added
    assert float(run["mse"]) == pytest.approx(mean_squared_error(y, p), rel=1e-9)
    assert float(run["r2"]) == pytest.approx(r2_score(y, p), rel=1e-9)
    assert int(run["samples"]) == 2 * 4 * 8 and int(metrics.compute()["samples"]) == 0


def test_hf_regression_head_logits_against_labels(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from sklearn.metrics import mean_squared_error

    from stepscope.integrations.transformers import StepscopeCallback

    class Head(torch.nn.Module):  # a regression head: logits [N, 1], labels [N]
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, labels=None):
            logits = self.lin(x)
            loss = torch.nn.functional.mse_loss(logits.squeeze(-1), labels)
            return {"loss": loss, "logits": logits}

    class Rows(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(1)
            self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, generator=g)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    model, fed = Head(), []
    model.register_forward_hook(lambda m, a, k, out: fed.append((out["logits"].detach().squeeze(-1).clone(),
                                                                 k["labels"])), with_kwargs=True)
    cb = StepscopeCallback(metrics=stepscope.RegressionMetrics(), summary=False, warmup_steps=0, flops=None)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=4, disable_tqdm=True, dataloader_num_workers=0)
    transformers.Trainer(model=model, args=args, train_dataset=Rows(16), callbacks=[cb]).train()
    p = torch.cat([a for a, _ in fed]).double().numpy()
    y = torch.cat([b for _, b in fed]).double().numpy()
    run = cb.run_metrics.compute()
    assert int(run["samples"]) == 16
    assert float(run["mse"]) == pytest.approx(mean_squared_error(y, p), rel=1e-9)


def test_callbacks_refuse_other_metrics_objects():
    pytest.importorskip("lightning.pytorch")
    from stepscope.integrations.lightning import StepscopeCallback

    with pytest.raises(TypeError, match="ClassificationMetrics, a stepscope.RegressionMetrics or None"):
        StepscopeCallback(metrics=object())
