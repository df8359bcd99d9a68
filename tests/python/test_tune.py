"""The tuners: each tries configurations on the user's own data and loop, and never touches them."""

import importlib.util
import multiprocessing
import os
import signal
import threading
import time
from contextlib import nullcontext

import pytest
import torch

import stepscope
from stepscope import tune

F = torch.nn.functional


# Timing under sleeps: one torch thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Decoding(torch.utils.data.Dataset):
    """2 ms of 'decoding' per sample (a sleep), then a small tensor."""

    def __init__(self, n=4096, ms=2.0, fail_in_workers=False):
        self.n, self.s, self.fail = n, ms / 1e3, fail_in_workers

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.fail and torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("this dataset cannot run in a worker")
        time.sleep(self.s)
        return torch.full((4,), float(i))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_loader_picks_workers_for_a_decoding_bound_dataset_within_budget(caplog):
    budget = 20.0
    t0 = time.perf_counter()
    with caplog.at_level("INFO", logger="stepscope"):
        res = tune.loader(Decoding(), batch_size=16, batches=5, rounds=2, warmup=2, budget_s=budget,
                          configs=[{"num_workers": 0}, {"num_workers": 1}, {"num_workers": 2}, {"num_workers": 4}])
    took = time.perf_counter() - t0
    assert res["best"]["num_workers"] >= 2 and res["best"]["persistent_workers"] is True
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["num_workers=2"]["speedup"] > 1.5 and rows["num_workers=0"]["speedup"] == 1.0
    assert took < budget + 10  # the budget, plus the configuration under way at its end
    assert sum("tune.loader" in r.getMessage() for r in caplog.records) == 4
    assert "best: num_workers=" in res.summary()


def test_loader_rows_say_why_workers_failed_and_keep_the_dataloader_s_settings(tmp_path):
    dl = torch.utils.data.DataLoader(Decoding(64, ms=0.1, fail_in_workers=True), batch_size=8, drop_last=True)
    res = tune.loader(dl, batches=2, rounds=1, warmup=1, configs=[{"num_workers": 0}, {"num_workers": 1}])
    bad = next(r for r in res["rows"] if r["config"]["num_workers"] == 1)
    assert bad["ok"] is False and "cannot run in a worker" in bad["error"]
    assert res["best"] == {"num_workers": 0} and res["rows"][0]["samples_per_s"] > 0
    res.save(tmp_path / "t.json")
    assert '"kind": "loader"' in (tmp_path / "t.json").read_text()
    with pytest.raises(ValueError):
        tune.loader(dl, budget_s=0)


def test_loader_reads_a_short_dataset_for_several_epochs():
    # 4 batches an epoch against warmup + rounds x batches = 1 + 2 x 5: each configuration cycles.
    res = tune.loader(Decoding(64, ms=0.1), batch_size=16, batches=5, rounds=2, warmup=1,
                      configs=[{"num_workers": 0}, {"num_workers": 1}])
    assert all(r.get("ok", True) and r["samples_per_s"] > 0 for r in res["rows"]), res.summary()
    assert res["best"] is not None and res["rows"][0]["samples_per_s"] > 0
    empty = torch.utils.data.DataLoader(Decoding(0, ms=0.1), batch_size=4)
    bad = tune.loader(empty, batches=2, rounds=1, warmup=1, configs=[{"num_workers": 0}])
    assert bad["rows"][0]["ok"] is False and "gives no batch" in bad["rows"][0]["error"]


def test_loader_ctrl_c_leaves_no_worker_behind():
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        tune.loader(Decoding(ms=5.0), batch_size=16, batches=50, rounds=5, configs=[{"num_workers": 2}])
    deadline = time.time() + 10
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()


def many_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[m for _ in range(100) for m in (torch.nn.Linear(16, 16), torch.nn.Tanh())])


def train_step(model, opt, batch):
    x, y = batch
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def test_step_tries_the_optimizer_candidates_on_copies_and_rejects_a_wrong_loss(tmp_path):
    model = many_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = (torch.randn(32, 16), torch.randn(32, 16))
    train_step(model, opt, batch)  # the user's optimizer has state
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
    planted = {"lr x10 (planted)": ({"lr": 0.5}, None, nullcontext, 1e-5)}
    res = tune.step(train_step, model, opt, batch, steps=6, rounds=2, warmup=1, candidates=planted)
    rows = {r["name"]: r for r in res["rows"]}
    for name in ("foreach=True", "foreach=False"):
        assert rows[name]["numerics"].startswith("ok") and rows[name]["speedup"] > 0, rows[name]
    assert rows["lr x10 (planted)"]["ok"] is False and "FAILS" in rows["lr x10 (planted)"]["numerics"]
    assert res["best"]["candidate"] != "lr x10 (planted)"
    # The user's objects are untouched: parameters and optimizer state bit-identical.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = opt.state_dict()["state"]
    assert all(torch.equal(state[k], after[k]["momentum_buffer"]) for k in state)
    assert "step_ms" in res.summary() and not any(h for m in model.modules() for h in m._forward_hooks.values())
    pytest.importorskip("matplotlib")
    res.plot(tmp_path / "step.png")
    assert (tmp_path / "step.png").read_bytes()[:4] == b"\x89PNG"


def test_copy_training_keeps_groups_and_state_and_applies_overrides():
    model = many_mlp()
    opt = torch.optim.AdamW([{"params": list(model.parameters())[:10], "lr": 1e-2},
                             {"params": list(model.parameters())[10:]}], lr=1e-3, foreach=False)
    train_step(model, opt, (torch.randn(4, 16), torch.randn(4, 16)))
    twin, o2 = tune.copy_training(model, opt, foreach=True)
    assert [g["lr"] for g in o2.param_groups] == [1e-2, 1e-3] and all(g["foreach"] for g in o2.param_groups)
    p0, q0 = next(model.parameters()), next(twin.parameters())
    assert p0 is not q0 and torch.equal(p0, q0)
    assert torch.equal(opt.state[p0]["exp_avg"], o2.state[q0]["exp_avg"])
    assert opt.state[p0]["exp_avg"].data_ptr() != o2.state[q0]["exp_avg"].data_ptr()


def test_batch_size_stops_where_samples_per_s_flattens_and_reports_the_knee():
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    # 60 ms a step up to 32 samples, then 60 ms per 32: flat beyond 32. A step's fixed extra d (the
    # model, the Monitor, a loaded machine's late wake-ups) makes 64 look 2 (60 + d) / (120 + d) as
    # fast as 32, within the tuner's 5% while d < 6.3 ms (a 20 ms sleep allowed only 2.1 ms).
    def planted(model, opt, batch):
        time.sleep(0.060 * max(1.0, len(batch) / 32))
        loss = model(batch).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    res = tune.batch_size(planted, model, opt, lambda n: torch.randn(n, 4), start=4, steps=5)
    sizes = [r["batch"] for r in res["rows"]]
    assert sizes == [4, 8, 16, 32, 64] and res["best"] == {"batch_size": 32}, res.summary()
    assert all(r["memory_bytes"] > 0 for r in res["rows"])

    def oom_at_16(model, opt, batch):
        if len(batch) >= 16:
            raise RuntimeError("CUDA out of memory (planted)")
        return planted(model, opt, batch)

    res = tune.batch_size(oom_at_16, model, opt, lambda n: torch.randn(n, 4), start=4, steps=4)
    assert [r["batch"] for r in res["rows"]] == [4, 8, 16] and res["rows"][-1]["note"].startswith("out of memory")
    assert res["best"] == {"batch_size": 8}


def test_a_saved_result_is_read_back_by_tune_report_and_damage_is_one_line(tmp_path):
    import subprocess
    import sys

    res = tune.loader(Decoding(64, ms=0.1), batch_size=8, batches=2, rounds=2, warmup=1,
                      configs=[{"num_workers": 0}, {"num_workers": 1}])
    res.save(tmp_path / "loader.json")
    back = tune.load_result(tmp_path / "loader.json")
    assert back["best"] == res["best"] and back.summary() == res.summary()
    png = ["--png", str(tmp_path / "loader.png")] if importlib.util.find_spec("matplotlib") else []
    r = subprocess.run([sys.executable, "-m", "stepscope", "tune-report", str(tmp_path / "loader.json"), *png],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "best: num_workers=" in r.stdout, r.stderr
    assert not png or (tmp_path / "loader.png").exists()
    (tmp_path / "bad.json").write_text('{"format": "stepscope-tune", "rows": 3}')
    r = subprocess.run([sys.executable, "-m", "stepscope", "tune-report", str(tmp_path / "bad.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "damaged" in r.stderr and r.stderr.count("\n") == 1


def test_step_compile_candidate_runs_on_cpu_with_its_compile_time_apart():
    # torch.compile on CPU (off by default there, where compiling takes long): the candidate is a
    # row with passing numerics, and its compile time is in warmup_s, not in the timed steps.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = (torch.randn(8, 16), torch.randn(8, 16))
    res = tune.step(train_step, model, opt, batch, steps=3, rounds=1, warmup=1, check_steps=2, compile=True)
    rows = {r["name"]: r for r in res["rows"]}
    c = rows["torch.compile"]
    assert c.get("ok", True) is not False and c["numerics"].startswith("ok"), c
    assert c["warmup_s"] > rows["baseline"]["warmup_s"], (c["warmup_s"], rows["baseline"]["warmup_s"])
    assert c["step_ms"] < 1e3 * c["warmup_s"]  # the compile is not in the step's time
    assert "torch.compile reduce-overhead" not in rows  # CUDA graphs: CUDA only
    torch._dynamo.reset()


class _Interrupting:
    """A train_step that raises KeyboardInterrupt (a Ctrl-C) at its n-th call."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, model, opt, batch):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return train_step(model, opt, batch)


def _no_hooks_anywhere(model, opt):
    from torch.nn.modules import module as module_mod
    from torch.optim import optimizer as optim_mod

    hooks = [module_mod._global_forward_hooks, module_mod._global_forward_pre_hooks,
             optim_mod._global_optimizer_pre_hooks, optim_mod._global_optimizer_post_hooks,
             opt._optimizer_step_pre_hooks, opt._optimizer_step_post_hooks]
    hooks += [d for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]
    return not any(hooks)


# Interrupted in tune.step's numerics check (call 2) or a Monitor-timed round (39: past the 5
# candidates' 4 untimed calls each), and in batch_size's warm-up (2) or timed steps (7).
@pytest.mark.parametrize("step_at, size_at", [(2, 2), (39, 7)])
def test_step_and_batch_size_ctrl_c_leave_no_hook_behind(step_at, size_at):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = (torch.randn(8, 16), torch.randn(8, 16))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyboardInterrupt):
        tune.step(_Interrupting(step_at), model, opt, batch, steps=5, rounds=2, warmup=1)
    with pytest.raises(KeyboardInterrupt):
        tune.batch_size(_Interrupting(size_at), model, opt, lambda n: (torch.randn(n, 16), torch.randn(n, 16)),
                        steps=3, warmup=1)
    assert _no_hooks_anywhere(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:  # the model is free to attach
        train_step(model, opt, batch)
    assert mon.report()["steps"] == 1


def _readme_tuning_blocks():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    section = readme.split("## Tuning", 1)[1].split("\n## ", 1)[0]
    return [b.split("\n", 1)[1] for b in section.split("```python")[1:] for b in [b.split("```", 1)[0]]]


def test_readme_tuning_examples_run():
    # The README's three examples, verbatim, on a small model and a fast dataset.
    blocks = _readme_tuning_blocks()
    assert len(blocks) == 3 and "tune.loader" in blocks[0] and "tune.batch_size" in blocks[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
    ns = {"stepscope": stepscope, "torch": torch, "F": F, "dataset": Decoding(n=512, ms=0.2),
          "model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.01),
          "batch": (torch.randn(8, 16), torch.randn(8, 16)), "print": lambda *a: None}
    t0 = time.perf_counter()
    for code in blocks:
        exec(compile(code, "README.md", "exec"), ns)
    assert isinstance(ns["loader"], torch.utils.data.DataLoader)
    assert ns["res"]["best"]["batch_size"] >= 8
    assert time.perf_counter() - t0 < 300
