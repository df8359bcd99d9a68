"""stepscope.Monitor's hooks over their life: copies and checkpoints of a monitored model, loops
the hooks cannot end a step in, interrupted forwards and failed optimizer steps, other models'
optimizers, Monitors dropped without detach() and models called from other threads.

Timing assertions only use planted sleeps as lower bounds (a loaded machine makes phases longer,
never shorter).
"""

import copy
import gc
import io
import pickle
import random
import threading
import warnings
import weakref

import pytest
import torch
import torch.optim.optimizer as optim_mod

import stepscope
from planted import SLEPT, SleepInBackward, sleep

PARTITION = ("data", "forward", "loss", "backward", "other", "optimizer")


@pytest.fixture(autouse=True)
def fresh_seed():
    SLEPT.clear()
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    print(f"seed {seed}")
    torch.set_num_threads(1)
    yield


class Net(torch.nn.Module):
    def __init__(self, fwd=0.0):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.act = torch.nn.ReLU()
        self.fwd = fwd
        self.interrupt = False

    def forward(self, x):
        if self.fwd:
            sleep(self.fwd)
        if self.interrupt:
            raise KeyboardInterrupt
        return self.act(self.lin(x))


def hooks_on(model):
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def global_hooks_on():
    return bool(optim_mod._global_optimizer_pre_hooks or optim_mod._global_optimizer_post_hooks)


def partition_sums(mon):
    rep = mon.report()
    total = sum(rep["phases"][ph]["host"]["total"] for ph in PARTITION)
    assert total == pytest.approx(rep["phases"]["step"]["host"]["total"], rel=1e-9)
    for r in mon.recent_steps():
        assert sum(r["host"].values()) == pytest.approx(r["t1"] - r["t0"], abs=1e-6)


def train(model, opt, x):
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


# ----------------------------------------------------------------------------- A1: copies
@pytest.mark.parametrize("per_module", [False, True])
def test_torch_save_and_pickle_of_a_monitored_model_work_and_load_untimed(per_module):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, per_module=per_module, per_module_every=1) as mon:
        train(model, opt, torch.randn(4, 8))
        buf = io.BytesIO()
        torch.save(model, buf)  # used to raise: cannot pickle 'stepscope._C.StepHooks' object
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(opt, io.BytesIO())
        torch.save({"model": model, "opt": opt}, io.BytesIO())
        again = pickle.loads(pickle.dumps(model))
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for m in (again, loaded):
            for _ in range(3):
                m(torch.randn(4, 8)).sum().backward()
        assert mon.report()["phases"]["forward"]["host"]["count"] == 1
        train(model, opt, torch.randn(4, 8))
    assert mon.steps == 2
    assert not hooks_on(model)
    loaded_state = loaded.state_dict()
    for k, v in saved.items():
        assert torch.equal(loaded_state[k], v), k


@pytest.mark.parametrize("per_module", [False, True])
def test_a_deep_copy_is_never_timed_and_drops_its_hooks(per_module):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, per_module=per_module, per_module_every=1) as mon:
        ema = copy.deepcopy(model)  # an EMA / teacher copy taken while attached
        opt2 = copy.deepcopy(opt)
        for _ in range(5):
            x = torch.randn(4, 8)
            train(model, opt, x)
            with torch.no_grad():
                ema(x)  # an eval forward of the copy: not ours either
            ema(x).sum().backward()  # a training forward of the copy: not ours
        assert not hooks_on(ema)  # the copy's hooks removed themselves at its first forward
        assert not opt2._optimizer_step_pre_hooks
        late = copy.deepcopy(model)
    rep = mon.report()
    assert rep["steps"] == 5
    assert rep["phases"]["forward"]["host"]["count"] == 5  # used to be 15
    assert rep["phases"]["eval_forward"]["host"]["count"] == 0
    assert rep["context"]["train_forwards"] == 5
    assert not hooks_on(model)
    assert hooks_on(late)  # copied while attached; inert until its first forward ...
    late(torch.randn(2, 8))
    assert not hooks_on(late)  # ... which removes them
    partition_sums(mon)


def test_averaged_model_and_ema_copies_leave_the_step_count_right():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        swa = torch.optim.swa_utils.AveragedModel(model)
        for _ in range(5):
            x = torch.randn(4, 8)
            train(model, opt, x)
            swa.update_parameters(model)
            swa(x)
    rep = mon.report()
    assert rep["steps"] == 5
    assert rep["phases"]["forward"]["host"]["count"] == 5
    assert not hooks_on(swa) and not hooks_on(model)


# ----------------------------------------------------------------------------- A2: no step ends
def test_manual_sgd_without_optimizer_or_step_says_so_loudly():
    model = Net()
    with pytest.warns(UserWarning, match=r"30 forward/backward passes ran but no step ended"):
        with stepscope.Monitor(model) as mon:
            for _ in range(30):
                model.zero_grad()
                model(torch.randn(4, 8)).square().mean().backward()
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
    assert mon.steps == 0
    found = [f for f in mon.diagnose() if f["rule"] == "no_step"]
    assert len(found) == 1 and found[0]["severity"] == "critical"
    assert "30 forward/backward passes ran but no step ended" in found[0]["title"]
    assert "mon.step()" in found[0]["advice"] and "optimizer" in found[0]["advice"]
    assert "no step ended" in mon.summary()
    # mon.step() after each update: no finding, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with stepscope.Monitor(model, warmup_steps=0, flops=None) as mon:
            for _ in range(5):
                model(torch.randn(4, 8)).sum().backward()
                mon.step()
    assert mon.steps == 5
    assert not [f for f in mon.diagnose() if f["rule"] == "no_step"]


# ----------------------------------------------------------------------------- A5: samples
class LBFGSNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("global_hooks", [False, True])
def test_a_closure_step_counts_its_batch_once(global_hooks):
    model = LBFGSNet()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    x, y = torch.randn(12, 8), torch.randn(12, 1)
    calls = []
    with stepscope.Monitor(model, None if global_hooks else opt, warmup_steps=0, flops=None) as mon:
        for _ in range(3):
            def closure():
                calls.append(1)
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
    rep = mon.report()
    assert len(calls) > 3  # LBFGS called the closure more than once per step
    assert rep["steps"] == 3
    assert rep["samples"] == 3 * 12  # used to be 12 per closure call
    assert rep["samples_counted_by"] == "the first input's dimension 0"


def test_several_models_count_the_first_models_samples():
    # A GAN's iteration: the discriminator sees the real and the fake batch, the generator makes the
    # fake one. Every model's forward counted the batch (3x here) before.
    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    og, od = torch.optim.SGD(gen.parameters(), lr=0.01), torch.optim.SGD(disc.parameters(), lr=0.01)
    with stepscope.Monitor([gen, disc], [og, od], warmup_steps=0, flops=None) as mon:
        for _ in range(3):
            real, fake = torch.randn(6, 8), gen(torch.randn(6, 4))
            (disc(real).mean() - disc(fake.detach()).mean()).backward()
            od.step()
            od.zero_grad()
            disc(fake).mean().backward()
            og.step()
            og.zero_grad()
    rep = mon.report()
    assert rep["steps"] == 3
    assert rep["samples"] == 3 * 6
    assert rep["samples_counted_by"] == "the first input's dimension 0 of the first model's forwards"


def test_batch_dim_counts_sequence_first_inputs():
    model = torch.nn.LSTM(8, 16)  # [T, B, features]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, batch_dim=1) as mon:
        for _ in range(4):
            out, _ = model(torch.randn(35, 20, 8))
            out.sum().backward()
            opt.step()
    rep = mon.report()
    assert rep["samples"] == 4 * 20  # not 35 per step
    assert rep["samples_counted_by"] == "the first input's dimension 1"
    assert "samples counted by the first input's dimension 1" in mon.summary()
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, batch_size=64) as mon:
        out, _ = model(torch.randn(35, 20, 8))
        out.sum().backward()
        opt.step()
    assert mon.report()["samples"] == 64
    assert mon.report()["samples_counted_by"] == "batch_size=64"
    mon = stepscope.Monitor(model, opt, warmup_steps=0, flops=None).attach()
    mon.mark("forward_begin", batch=7)
    out, _ = model(torch.randn(3, 2, 8))
    mon.mark("forward_end")
    out.sum().backward()
    opt.step()
    mon.detach()
    assert mon.report()["samples"] == 7
    assert mon.report()["samples_counted_by"] == "mark(batch=)"
    # a first input with fewer dimensions than batch_dim counts nothing (and does not fail)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, batch_dim=2) as mon:
        pass
    lin = torch.nn.Linear(8, 2)
    with stepscope.Monitor(lin, warmup_steps=0, flops=None, batch_dim=3) as mon:
        lin(torch.randn(4, 8)).sum().backward()
        mon.step()
    assert mon.report()["samples"] == 0
    for bad, err in ((-1, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError)):
        with pytest.raises(err, match="batch_dim"):
            stepscope.Monitor(model, batch_dim=bad)
    with pytest.raises(ValueError, match="batch_size or batch_dim"):
        stepscope.Monitor(model, batch_size=4, batch_dim=1)


# ----------------------------------------------------------------------------- B1: interrupted calls
def test_keyboard_interrupt_inside_forward_does_not_stop_step_counting():
    model = Net(fwd=0.002)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        for i in range(9):
            model.interrupt = i == 3
            try:
                train(model, opt, torch.randn(4, 8))
            except KeyboardInterrupt:
                pass
    model.interrupt = False
    rep = mon.report()
    assert rep["steps"] == 8  # used to be 3
    assert rep["phases"]["forward"]["host"]["count"] == 9
    assert rep["phases"]["backward"]["host"]["count"] == 8
    assert rep["phases"]["forward"]["host"]["min"] >= 0.002
    partition_sums(mon)
    # and under marks: a marked step after an interrupted hooked forward
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        model.interrupt = True
        with pytest.raises(KeyboardInterrupt):
            model(torch.randn(2, 8))
        model.interrupt = False
        mon.mark("forward_begin", batch=2)
        out = model(torch.randn(2, 8))
        mon.mark("forward_end")
        out.sum().backward()
        mon.mark("step")
    # one step; the interrupted forward's samples count, as a forward that raised an Exception's do
    assert mon.steps == 1 and mon.report()["samples"] == 4


def test_interrupt_in_a_nested_forward_and_mon_step_after_it():
    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Net()

        def forward(self, x):
            return self.inner(x)

    outer = Outer()
    with stepscope.Monitor([outer, outer.inner], warmup_steps=0, flops=None) as mon:
        outer.inner.interrupt = True
        with pytest.raises(KeyboardInterrupt):
            outer(torch.randn(2, 8))
        outer.inner.interrupt = False
        outer(torch.randn(2, 8)).sum().backward()
        assert mon.step() is True  # used to raise "step() called inside the model's forward"
        outer(torch.randn(2, 8)).sum().backward()
        assert mon.step() is True
    assert mon.steps == 2


@pytest.mark.parametrize("global_hooks", [False, True])
def test_failed_optimizer_step_with_its_traceback_kept_does_not_stop_step_counting(global_hooks):
    class Flaky(torch.optim.SGD):
        fail = False

        def step(self, closure=None):
            if self.fail:
                raise RuntimeError("boom")
            return super().step(closure)

    model = Net()
    opt = Flaky(model.parameters(), lr=0.1)
    kept = []
    with stepscope.Monitor(model, None if global_hooks else opt, warmup_steps=0, flops=None) as mon:
        for i in range(9):
            opt.fail = i == 2
            try:
                train(model, opt, torch.randn(4, 8))
            except RuntimeError as e:
                kept.append(e)  # the traceback, and with it the step's frames, stay alive
                opt.zero_grad()
    assert len(kept) == 1 and kept[0].__traceback__ is not None
    rep = mon.report()
    # the failed step's time goes on into the next one (as with a traceback dropped)
    assert rep["steps"] == 8  # used to be 3
    assert rep["phases"]["forward"]["host"]["count"] == 9
    partition_sums(mon)


# ----------------------------------------------------------------------------- B4: other optimizers
@pytest.mark.parametrize("closure", [False, True])
def test_another_models_optimizer_between_forward_and_backward_counts_nothing(closure):
    class Generator(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, z):
            return SleepInBackward.apply(self.lin(z), 0.020)  # G's backward: 20 ms planted

    G = Generator()
    D = torch.nn.Linear(8, 1)
    og = torch.optim.SGD(G.parameters(), lr=0.01)
    od = torch.optim.Adam(D.parameters(), lr=0.01)
    steps = 4
    with stepscope.Monitor(G, warmup_steps=0, flops=None) as mon:  # optimizers=None: global hooks
        for _ in range(steps):
            fake = G(torch.randn(6, 8))
            # D's step between G's forward and G's backward
            if closure:
                def d_closure():
                    od.zero_grad()
                    d_loss = D(fake.detach()).mean()
                    d_loss.backward()
                    return d_loss
                od.step(d_closure)
            else:
                od.zero_grad()
                D(fake.detach()).mean().backward()
                od.step()
            g_loss = D(fake).mean()
            og.zero_grad()
            g_loss.backward()
            og.step()
    rep = mon.report()
    assert rep["steps"] == steps
    back = rep["phases"]["backward"]["host"]
    assert back["count"] == steps
    assert back["min"] >= 0.020  # used to land in `loss`
    assert rep["phases"]["loss"]["host"]["max"] < 0.020
    partition_sums(mon)


def test_lbfgs_on_the_model_still_ends_steps_on_global_hooks():
    model = LBFGSNet()
    other = torch.nn.Linear(8, 1)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=4)
    opt_other = torch.optim.SGD(other.parameters(), lr=0.1)
    x, y = torch.randn(10, 8), torch.randn(10, 1)
    with stepscope.Monitor(model, warmup_steps=0, flops=None) as mon:
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                other(x).sum().backward()
                opt_other.step()  # another model's step inside our closure: nothing
                return loss

            opt.step(closure)
    assert mon.steps == 3
    partition_sums(mon)


# ----------------------------------------------------------------------------- B6: dropped Monitors
@pytest.mark.parametrize("kw", [{}, {"per_module": True, "per_module_every": 2}, {"print_every": 3},
                                {"per_module": True, "print_every": 2}])
def test_a_monitor_dropped_without_detach_takes_its_hooks_with_it(kw):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stepscope.Monitor(model, **kw).attach()  # global optimizer hooks too
    for _ in range(4):
        train(model, opt, torch.randn(2, 8))
    ref = weakref.ref(mon)
    del mon
    assert ref() is None  # the hooks no longer keep it alive
    assert not hooks_on(model) and not global_hooks_on()
    train(model, opt, torch.randn(2, 8))
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon2:
        train(model, opt, torch.randn(2, 8))
    assert mon2.steps == 1


def test_a_new_monitor_takes_over_from_an_unreachable_one():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gc.disable()
    try:
        mon = stepscope.Monitor(model, opt, per_module=True).attach()
        mon.me = mon  # a cycle: only the collector can free it
        train(model, opt, torch.randn(2, 8))
        del mon
        with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon2:  # collects, then attaches
            train(model, opt, torch.randn(2, 8))
        assert mon2.steps == 1
        live = stepscope.Monitor(model, opt).attach()
        with pytest.raises(RuntimeError, match="another Monitor is already attached"):
            stepscope.Monitor(model, opt).attach()
        live.detach()
    finally:
        gc.enable()
    assert not hooks_on(model)


# ----------------------------------------------------------------------------- B7: other threads
class Handshake(torch.nn.Module):
    """A model whose training forward (on the training thread) waits for another thread to run the
    same model's forward, so that the other thread's boundaries fall inside the training step."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.go = threading.Event()
        self.done = threading.Event()
        self.training_thread = threading.get_ident()

    def forward(self, x):
        if threading.get_ident() == self.training_thread and torch.is_grad_enabled():
            sleep(0.003)
            self.done.clear()
            self.go.set()
            assert self.done.wait(10)
        return self.lin(x)


@pytest.mark.parametrize("grad", [False, True])
def test_a_second_thread_calling_the_model_does_not_move_the_training_step(grad):
    model = Handshake()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stop = False

    def evaluator():
        while True:
            assert model.go.wait(10)
            model.go.clear()
            if stop:
                return
            with torch.set_grad_enabled(grad):
                out = model(torch.randn(3, 8))  # inside the training thread's forward
                if grad:
                    out.sum().backward()
            model.done.set()

    th = threading.Thread(target=evaluator)
    th.start()
    steps = 6
    try:
        with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, per_module=True, per_module_every=1) as mon:
            for _ in range(steps):
                train(model, opt, torch.randn(5, 8))
                opt.zero_grad()
    finally:
        stop = True
        model.go.set()
        th.join(10)
    rep = mon.report()
    assert rep["steps"] == steps
    assert rep["phases"]["forward"]["host"]["count"] == steps
    assert rep["phases"]["forward"]["host"]["min"] >= 0.003
    assert rep["phases"]["eval_forward"]["host"]["count"] == 0
    assert rep["samples"] == 5 * steps
    assert rep["modules"]["lin"]["host"]["count"] == steps
    partition_sums(mon)


def test_the_training_thread_is_the_first_to_train():
    # A Monitor attached on one thread and trained on another: the thread that runs the first
    # training forward is the training thread.
    model = Net(fwd=0.001)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stepscope.Monitor(model, opt, warmup_steps=0, flops=None).attach()

    def loop():
        for _ in range(3):
            train(model, opt, torch.randn(2, 8))

    th = threading.Thread(target=loop)
    th.start()
    th.join()
    with torch.no_grad():
        model(torch.randn(2, 8))  # the attaching thread is no longer the training thread
    mon.detach()
    rep = mon.report()
    assert rep["steps"] == 3
    assert rep["phases"]["eval_forward"]["host"]["count"] == 0


def test_marks_from_another_thread_are_ignored():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        train(model, opt, torch.randn(2, 8))  # the training thread is this one

        def stray():
            for name in ("forward_begin", "forward_end", "optimizer_begin", "optimizer_end", "step",
                         "eval_begin", "eval_end"):
                mon.mark(name)

        model(torch.randn(2, 8)).sum().backward()
        th = threading.Thread(target=stray)
        th.start()
        th.join()
        opt.step()
    rep = mon.report()
    assert rep["steps"] == 2
    assert rep["phases"]["forward"]["host"]["count"] == 2
    assert rep["phases"]["eval_forward"]["host"]["count"] == 0
    partition_sums(mon)


def test_the_hooks_themselves_copy_inert_and_pickle_to_a_no_op():
    from stepscope import _C

    hk = _C.step_hooks(_C.Timeline())
    live = hk.forward_pre
    assert isinstance(live, _C.StepHook) and not live.inert
    for c in (copy.copy(live), copy.deepcopy(live)):
        assert isinstance(c, _C.StepHook) and c.inert
    back = pickle.loads(pickle.dumps(hk.forward_post))
    assert not isinstance(back, _C.StepHook)
    assert back(None, (), None) is None  # a no-op of the standard library
    with pytest.raises(TypeError, match="keyword"):
        live(torch.nn.Linear(2, 2), (), x=1)
    # an inert pre hook removes the inert hooks of the module it runs on, and only those
    m = torch.nn.Linear(2, 2)
    mine = m.register_forward_hook(lambda *a: None)
    m.register_forward_pre_hook(copy.deepcopy(live))
    m.register_forward_hook(copy.deepcopy(hk.forward_post), always_call=True)
    m(torch.randn(1, 2))
    assert len(m._forward_hooks) == 1 and not m._forward_pre_hooks and not m._forward_hooks_always_called
    mine.remove()
    assert not m._forward_hooks


def test_the_no_step_rule_on_crafted_reports():
    from stepscope import diagnose

    def rep(steps=0, warm=0, forwards=30):
        return {"steps": steps, "warmup": {"steps": warm}, "context": {"train_forwards": forwards}}

    (f,) = diagnose.rule_no_step(rep())
    assert f["severity"] == "critical" and f["evidence"] == {"train_forwards": 30, "steps": 0}
    assert f["title"] == "30 forward/backward passes ran but no step ended"
    assert diagnose.rule_no_step(rep(steps=1)) == []
    assert diagnose.rule_no_step(rep(warm=2)) == []  # steps ended, all of them warm-up so far
    assert diagnose.rule_no_step(rep(forwards=1)) == []  # one probe forward
    assert diagnose.rule_no_step({"steps": 0}) == []  # a report without context (an old file)
