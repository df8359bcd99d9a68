"""stepscope.Monitor: planted sleeps in every phase must be reported where they were planted.

Each planted sleep logs how long it really lasted (on a loaded machine a 10 ms sleep can last
11 ms: that is the scheduler, not the Monitor). A reported per-phase median must hold its sleeps
(a lower bound however loaded the machine) and at most SLACK more (planted.p50_bounds): the
bounds hold on a loaded 2-core machine and still fail when a sleep is reported in another phase.
Sleeps are 6-25 ms, a few steps each.
"""

import collections
import gc
import os
import random
import time

import pytest
import torch
import torch.optim.optimizer as optim_mod

import stepscope
from planted import SLEPT, SleepInBackward, assert_planted, sleep
from stepscope import _C

# Phases also hold real work the sleeps do not cover (loss computation and autograd's start,
# SGD's update, returning from backward: 0.2-0.8 ms each on a quiet 2-core machine, a few ms when
# the scheduler makes it wait). SLACK bounds that unplanted work at a phase's p50: generous against
# the scheduler, below half the smallest plant (15 ms) that could land in the wrong phase.
PLANT = {"data": 0.020, "forward": 0.020, "loss": 0.025, "backward": 0.025, "other": 0.015,
         "optimizer": 0.020}
PARTITION = ("data", "forward", "loss", "backward", "other", "optimizer")
SLACK = 0.007






class Boom(RuntimeError):
    pass


class RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise Boom("backward")


class Planted(torch.nn.Module):
    def __init__(self, fwd=PLANT["forward"], bwd=PLANT["backward"]):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.fwd, self.bwd = fwd, bwd
        self.fail_forward = False
        self.fail_backward = False

    def forward(self, x):
        sleep(self.fwd, "eval_forward" if not (self.training and torch.is_grad_enabled()) else "forward")
        if self.fail_forward:
            raise Boom("forward")
        y = SleepInBackward.apply(self.lin(x), self.bwd, "backward")
        return RaiseInBackward.apply(y) if self.fail_backward else y


class SlowSGD(torch.optim.SGD):
    def __init__(self, params, secs=PLANT["optimizer"]):
        super().__init__(params, lr=1e-3)
        self.secs = secs
        self.fail = False

    def step(self, closure=None):
        sleep(self.secs, "optimizer")
        if self.fail:
            raise Boom("optimizer")
        return super().step(closure)


def loader(n, batch=16, secs=PLANT["data"]):
    for _ in range(n):
        sleep(secs, "data")
        yield torch.randn(batch, 8)


def train_step(model, opt, x, plant=PLANT):
    out = model(x)
    sleep(plant["loss"], "loss")
    loss = out.square().mean()
    loss.backward()
    sleep(plant["other"], "other")
    opt.step()
    opt.zero_grad()


def p50(rep, phase):
    return rep["phases"][phase]["host"]["p50"]


def no_hooks(model, *opts):
    mods = list(model.modules())
    return (all(not m._forward_hooks and not m._forward_pre_hooks for m in mods)
            and all(not o._optimizer_step_pre_hooks and not o._optimizer_step_post_hooks for o in opts)
            and not optim_mod._global_optimizer_pre_hooks
            and not optim_mod._global_optimizer_post_hooks)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    SLEPT.clear()
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    print(f"seed {seed}")
    yield


def test_planted_phases_each_within_5_percent_and_sum_to_step():
    model = Planted()
    torch.optim.SGD(model.parameters())  # wraps SGD.step too: SlowSGD's super().step() nests the hooks
    opt = SlowSGD(model.parameters())
    steps = 6
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        for x in loader(steps):
            train_step(model, opt, x)
    rep = mon.report()
    print(mon.summary())
    assert rep["steps"] == steps
    assert rep["samples"] == 16 * steps
    for ph in PARTITION:
        assert rep["phases"][ph]["host"]["count"] == steps
        assert_planted(p50(rep, ph), ph, SLACK)
    total = sum(rep["phases"][ph]["host"]["total"] for ph in PARTITION)
    assert total == pytest.approx(rep["phases"]["step"]["host"]["total"], rel=1e-9)
    assert sum(rep["phases"][ph]["share_host"] for ph in PARTITION) == pytest.approx(1.0, rel=1e-9)
    # each step holds one sleep of every phase, and SLACK of unplanted work per phase at most
    per_step = [sum(s) for s in zip(*(SLEPT[ph] for ph in PARTITION))]
    assert_planted(p50(rep, "step"), "step", len(PARTITION) * SLACK, slept=per_step)
    assert rep["samples_per_s"] == pytest.approx(rep["samples"] / rep["phases"]["step"]["host"]["total"])
    ring = mon.recent_steps()
    assert [r["step"] for r in ring] == list(range(steps))
    assert [s[0] for s in ring[-1]["spans"]] == list(PARTITION)
    assert no_hooks(model, opt)


def test_global_optimizer_hooks_when_no_optimizer_given():
    model = Planted(fwd=0.002, bwd=0.002)
    opt = SlowSGD(model.parameters(), secs=0.020)
    with stepscope.Monitor(model, warmup_steps=0, flops=None) as mon:
        for x in loader(4, secs=0.002):
            train_step(model, opt, x, plant=dict(PLANT, loss=0.001, other=0.001))
        assert optim_mod._global_optimizer_pre_hooks
    rep = mon.report()
    assert rep["steps"] == 4
    assert_planted(p50(rep, "optimizer"), "optimizer", SLACK)
    assert no_hooks(model, opt)


def test_gradient_accumulation():
    model, micro, steps = Planted(fwd=0.015, bwd=0.015), 3, 3
    opt = SlowSGD(model.parameters(), secs=0.020)
    plant = dict(PLANT, loss=0.020, other=0.015)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        batches = loader(micro * steps, secs=0.009)
        for _ in range(steps):
            for _ in range(micro):
                x = next(batches)
                out = model(x)
                sleep(plant["loss"], "loss")
                (out.square().mean() / micro).backward()
            sleep(plant["other"], "other")
            opt.step()
            opt.zero_grad()
    rep = mon.report()
    assert rep["steps"] == steps
    assert rep["samples"] == 16 * micro * steps
    for ph in ("forward", "backward", "data", "loss"):
        assert rep["phases"][ph]["host"]["count"] == micro * steps, ph
        assert_planted(p50(rep, ph), ph, SLACK)
    # the gap after a micro-batch's backward closes at the next forward: it is that batch's data
    assert rep["phases"]["other"]["host"]["count"] == steps
    assert_planted(p50(rep, "other"), "other", SLACK)
    assert_planted(p50(rep, "optimizer"), "optimizer", SLACK)
    per_step = sum(rep["phases"][ph]["host"]["total"] for ph in PARTITION) / steps
    assert per_step == pytest.approx(rep["phases"]["step"]["host"]["mean"], rel=1e-9)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "eval"])
def test_eval_is_reported_apart(mode):
    model = Planted(fwd=0.012, bwd=0.004)
    opt = SlowSGD(model.parameters(), secs=0.004)
    plant = dict(PLANT, loss=0.002, other=0.002)
    n_eval = 3
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        for i, x in enumerate(loader(4, secs=0.010)):
            train_step(model, opt, x, plant=plant)
            if i % 2 == 0:
                for _ in range(n_eval):
                    sleep(0.005, "eval_data")  # eval data: neither training data nor eval forward
                    if mode == "no_grad":
                        with torch.no_grad():
                            model(x)
                    elif mode == "inference_mode":
                        with torch.inference_mode():
                            model(x)
                    else:
                        model.eval()
                        model(x)
                        model.train()
    rep = mon.report()
    assert rep["steps"] == 4
    assert rep["phases"]["eval_forward"]["host"]["count"] == 2 * n_eval
    assert_planted(p50(rep, "eval_forward"), "eval_forward", SLACK)
    assert rep["phases"]["forward"]["host"]["count"] == 4
    assert rep["samples"] == 4 * 16
    # The eval loop (3 x 17 ms) ran in the data gap of steps 1 and 3 and is left out of training
    # data: that gap holds at most the loader's sleep and the eval data before the first eval
    # forward. In totals, SLACK per step of unplanted work is far below the 6 eval forwards
    # (72 ms) that would land there if eval were not left out.
    firsts = SLEPT["eval_data"][::n_eval]  # the eval data sleep before each loop's first forward
    data_bound = sum(SLEPT["data"]) + sum(firsts) + 4 * SLACK
    assert rep["phases"]["data"]["host"]["total"] <= data_bound, (rep["phases"]["data"], data_bound)


def test_phase_and_manual_step_and_user_phases():
    model = Planted(fwd=0.003, bwd=0.003)
    with stepscope.Monitor(model, warmup_steps=0, flops=None) as mon:
        for x in loader(3, secs=0.002):
            out = model(x)
            out.sum().backward()
            with mon.phase("clip"):
                sleep(0.012, "clip")
            assert mon.step()  # no optimizer at all (e.g. GradScaler skipped the step)
            assert not mon.step()  # nothing since: no empty step
    rep = mon.report()
    assert rep["steps"] == 3
    assert rep["phases"]["optimizer"]["host"]["count"] == 0
    assert rep["user"]["clip"]["host"]["count"] == 3
    assert_planted(rep["user"]["clip"]["host"]["p50"], "clip", SLACK)
    # the user phase lies inside "other" (backward end -> step end)
    assert rep["phases"]["other"]["host"]["min"] >= 0.012
    assert "user:clip" in mon.summary()


def test_per_module_sampled_and_ranked():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.slow = Planted(fwd=0.006, bwd=0.0)
            self.fast = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fast(self.slow(x))

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    with stepscope.Monitor(net, opt, per_module=True, per_module_every=3, warmup_steps=0, flops=None) as mon:
        for x in loader(7, secs=0.0):
            net(x).sum().backward()
            opt.step()
    rep = mon.report()
    mods = rep["modules"]
    assert list(mods)[0] == "slow"  # ranked by time
    assert mods["slow"]["host"]["count"] == 3  # steps 0, 3, 6
    assert mods["fast"]["host"]["count"] == 3
    assert mods["slow"]["host"]["mean"] >= 0.006
    assert no_hooks(net, opt)

    with stepscope.Monitor(net, opt, per_module=[torch.nn.Linear], warmup_steps=0, flops=None) as mon:
        net(next(loader(1, secs=0))).sum().backward()
        opt.step()
    assert set(mon.report()["modules"]) == {"slow.lin", "fast"}
    with pytest.raises(ValueError, match="not found"):
        stepscope.Monitor(net, opt, per_module=["nope"], warmup_steps=0, flops=None).attach()
    assert no_hooks(net, opt)


def test_per_module_hooks_are_in_place_on_sampled_steps_only():
    # Registered once; on steps outside the sample the submodules have no hook at all, so torch
    # calls their forward directly (the cost of per_module_every=k is about 1/k of every step's).
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    mine = []
    net[0].register_forward_pre_hook(lambda m, a: mine.append(1))  # the user's own hook stays

    def hooked():
        return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net]

    seen = []
    with stepscope.Monitor(net, opt, per_module=True, per_module_every=4, warmup_steps=0, flops=None) as mon:
        for _ in range(9):
            seen.append(hooked())
            net(torch.randn(3, 4)).sum().backward()
            opt.step()
        seen.append(hooked())
    assert seen[0] == [3, 2, 2] and seen[4] == [3, 2, 2] and seen[8] == [3, 2, 2]
    assert all(seen[i] == [1, 0, 0] for i in (1, 2, 3, 5, 6, 7, 9))
    assert len(mine) == 9
    assert mon.report()["modules"]["0"]["host"]["count"] == 3  # steps 0, 4, 8
    assert hooked() == [1, 0, 0] and no_hooks(net[1], opt)


def test_per_module_hook_removed_by_hand_is_not_put_back():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    with stepscope.Monitor(net, opt, per_module=True, per_module_every=2, warmup_steps=0, flops=None) as mon:
        for h in mon._module_handles:
            h.remove()  # what torch.nn.utils and user code may do with a module's hooks
        for _ in range(4):
            net(torch.randn(3, 4)).sum().backward()
            opt.step()
            # put back on the sampled steps (the gate holds the id), but never twice
            assert all(len(m._forward_pre_hooks) <= 1 for m in net)
    assert all(len(m._forward_pre_hooks) + len(m._forward_hooks) == 0 for m in net)


def test_compiled_model_refuses_per_module_but_times_phases():
    model = Planted(fwd=0.004, bwd=0.002)
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="torch.compile"):
        mon = stepscope.Monitor(compiled, opt, per_module=True, warmup_steps=0, flops=None)
    with mon:
        for x in loader(3, secs=0.001):
            compiled(x).sum().backward()
            opt.step()
    rep = mon.report()
    assert rep["steps"] == 3
    assert rep["modules"] == {}
    assert rep["phases"]["forward"]["host"]["min"] >= 0.004


def test_bad_use_is_refused_clearly():
    model = Planted(fwd=0.0, bwd=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = stepscope.Monitor(model, opt, warmup_steps=0, flops=None)
    with pytest.raises(RuntimeError, match="not attached"):
        mon.detach()
    with pytest.raises(RuntimeError, match="not attached"):
        mon.step()
    mon.attach()
    with pytest.raises(RuntimeError, match="already attached"):
        mon.attach()
    with pytest.raises(RuntimeError, match="another Monitor"):
        stepscope.Monitor(model, warmup_steps=0, flops=None).attach()
    assert len(model._forward_pre_hooks) == 1  # the refused Monitor left nothing
    mon.detach()
    with pytest.raises(RuntimeError, match="not attached"):
        mon.detach()
    assert no_hooks(model, opt)
    with pytest.raises(TypeError):
        stepscope.Monitor("model", warmup_steps=0, flops=None)
    with pytest.raises(TypeError):
        stepscope.Monitor(model, [opt, "sgd"], warmup_steps=0, flops=None)
    with pytest.raises(ValueError, match="profile_steps"):
        stepscope.Monitor(model, profile_steps=range(5, 2), warmup_steps=0, flops=None)
    # detach inside the with block is allowed; attach again later keeps accumulating
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon2:
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        mon2.detach()
        model(torch.randn(2, 8))  # after detach: not recorded
    mon2.attach()
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    mon2.detach()
    assert mon2.report()["steps"] == 2
    assert mon2.report()["phases"]["forward"]["host"]["count"] == 2


def test_step_inside_forward_is_an_error():
    class CallsStep(torch.nn.Module):
        def forward(self, x):
            self.mon.step()
            return x

    m = CallsStep()
    with stepscope.Monitor(m, warmup_steps=0, flops=None) as mon:
        m.mon = mon
        with pytest.raises(RuntimeError, match="inside the model's forward"):
            m(torch.randn(2, 2))
    assert no_hooks(m)


@pytest.mark.parametrize("where", ["forward", "backward", "optimizer"])
def test_exceptions_leave_no_hook_and_training_goes_on(where):
    model = Planted(fwd=0.002, bwd=0.002)
    opt = SlowSGD(model.parameters(), secs=0.002)
    plant = dict(PLANT, loss=0.001, other=0.001)

    def arm(on):
        model.fail_forward = on and where == "forward"
        model.fail_backward = on and where == "backward"
        opt.fail = on and where == "optimizer"

    # Caught inside the loop: the Monitor keeps timing the next steps.
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        for i, x in enumerate(loader(4, secs=0.002)):
            arm(i == 1)
            try:
                train_step(model, opt, x, plant=plant)
            except Boom:
                opt.zero_grad()
    arm(False)
    rep = mon.report()
    assert rep["steps"] == 3
    assert rep["phases"]["forward"]["host"]["count"] == 4
    assert no_hooks(model, opt)
    # Escaping the with block: every hook is gone, and the statistics stay readable.
    with pytest.raises(Boom):
        with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
            arm(True)
            train_step(model, opt, torch.randn(4, 8), plant=plant)
    arm(False)
    assert no_hooks(model, opt)
    assert mon.report()["steps"] == 0
    train_step(model, opt, torch.randn(4, 8), plant=dict(PLANT, loss=0, other=0))


def test_model_called_outside_a_step_and_several_models_and_optimizers():
    gen, disc = Planted(fwd=0.004, bwd=0.001), Planted(fwd=0.003, bwd=0.001)
    og, od = SlowSGD(gen.parameters(), secs=0.002), SlowSGD(disc.parameters(), secs=0.003)
    with stepscope.Monitor([gen, disc], [og, od], per_module=True, warmup_steps=0, flops=None) as mon:
        gen(torch.randn(2, 8))  # a stray forward before any step: timed, no crash
        for x in loader(3, secs=0.001):
            disc(x).sum().backward()
            od.step()  # first optimizer: the step goes on
            gen(x).sum().backward()
            og.step()  # both stepped: the step ends
            og.zero_grad()
            od.zero_grad()
    rep = mon.report()
    assert rep["steps"] == 3
    assert rep["phases"]["optimizer"]["host"]["count"] == 6
    assert rep["phases"]["forward"]["host"]["count"] == 7
    assert {"0.lin", "1.lin"} <= set(rep["modules"])
    assert no_hooks(gen, og) and no_hooks(disc, od)


def test_nvtx_off_and_profile_steps_run():
    model = Planted(fwd=0.0, bwd=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for kw in ({"nvtx": False}, {"profile_steps": range(1, 3)}):
        with stepscope.Monitor(model, opt, **kw, warmup_steps=0, flops=None) as mon:
            for x in loader(4, secs=0):
                model(x).sum().backward()
                opt.step()
        assert mon.report()["steps"] == 4


def test_million_steps_keep_memory_bounded():
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    tl = _C.Timeline(device=False, nvtx=True, ring=256)
    u = tl.user_series("u")
    fb, fe, bb, be, ob, oe = (tl.forward_begin, tl.forward_end, tl.backward_begin, tl.backward_end,
                              tl.optimizer_begin, tl.optimizer_end)
    for _ in range(1000):  # warm: every series and the ring allocated
        fb(False, 8), fe(), bb(), be(), ob(), oe(True)
    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    for _ in range(10**6):
        fb(False, 8)
        fe()
        bb()
        be()
        tl.user_begin(u)
        tl.user_end(u)
        ob()
        oe(True)
    dt = time.perf_counter() - t0
    grown = rss_mb() - before
    rep = tl.report()
    print(f"10^6 steps: RSS grew {grown:.2f} MB ({dt:.1f} s, {dt / 8e6 * 1e9:.0f} ns per boundary call)")
    assert rep["steps"] == 10**6 + 1000
    assert len(tl.recent_steps()) == 256
    assert grown < 50


cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@needs_gpu
def test_cuda_device_times_match_hand_placed_events_without_syncs():
    torch.cuda.init()
    dev = torch.device("cuda")
    width, steps = 4096, 12
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    x = torch.randn(1024, width, device=dev)
    ev = {k: [] for k in ("forward", "backward", "optimizer")}

    def mark(k):
        a = torch.cuda.Event(enable_timing=True)
        a.record()
        ev[k].append(a)

    for _ in range(2):  # warm up kernels and the allocator before timing
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    # Every step device-timed, so that the totals compare with the hand events of every step.
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, device_every=1) as mon:
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                mark("forward")
                out = model(x)
                mark("forward")
                loss = out.square().mean()
                mark("backward")
                loss.backward()
                mark("backward")
                mark("optimizer")
                opt.step()
                mark("optimizer")
                opt.zero_grad()
            rep_live = mon.report()  # must not sync either
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    rep = mon.report()
    print(mon.summary())
    assert rep["device"] and rep["dropped_device_samples"] == 0 and rep["pending_device_samples"] == 0
    assert rep_live["steps"] == steps
    rows = []
    for k, evs in ev.items():
        hand = sum(a.elapsed_time(b) for a, b in zip(evs[::2], evs[1::2])) / 1e3
        got = rep["phases"][k]["device"]["total"]
        rows.append((k, got, hand))
        print(f"{k:10s} monitor {got * 1e3:9.3f} ms   hand events {hand * 1e3:9.3f} ms   "
              f"ratio {got / hand:.4f}")
    for k, got, hand in rows:
        assert got == pytest.approx(hand, rel=0.05), k
    assert rep["memory"] is not None and rep["memory"]["peak"] >= rep["memory"]["allocated"] > 0


@cuda
@needs_gpu
def test_cuda_pool_exhaustion_drops_instead_of_stalling():
    dev = torch.device("cuda")
    model = torch.nn.Linear(256, 256).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    x = torch.randn(64, 256, device=dev)
    # Warm up first (cuBLAS handle, allocator, autograd's device thread): a first cuBLAS call inside
    # the timed loop can outlast the planted sleep, and then the pool never runs dry.
    for _ in range(3):
        model(x).sum().backward()
        opt.step()
    torch.cuda.synchronize()
    mon = stepscope.Monitor(model, opt, warmup_steps=0, flops=None)
    mon._tl = _C.Timeline(device=True, nvtx=False, event_pool=4)  # a tiny pool, to run out
    mon.attach()
    torch.cuda._sleep(200_000_000)  # keep the GPU busy so events stay in flight
    for _ in range(10):
        model(x).sum().backward()
        opt.step()
    mon.detach()
    torch.cuda.synchronize()
    rep = mon.report()
    assert rep["steps"] == 10
    assert rep["dropped_device_samples"] > 0


def test_backward_timed_for_a_leaf_output_too():
    # A model returning a parameter itself: no grad_fn for the C++ pre-hook, a tensor hook instead.
    class Leaf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4))

        def forward(self, x):
            return self.w

    class Slow(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w * 2

        @staticmethod
        def backward(ctx, g):
            sleep(0.020, "backward")
            return g * 2

    m = Leaf()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    with stepscope.Monitor(m, opt, warmup_steps=0, flops=None) as mon:
        for _ in range(3):
            out = m(torch.randn(2, 4))
            assert out.grad_fn is None
            # backward begins when the gradient reaches the output, i.e. after Slow's backward
            Slow.apply(out).sum().backward()
            opt.step()
    rep = mon.report()
    assert rep["phases"]["backward"]["host"]["count"] == 3
    assert rep["phases"]["loss"]["host"]["min"] >= 0.020
    assert rep["phases"]["backward"]["host"]["max"] < 0.010


def test_step_hooks_refuse_bad_arguments():
    # The hooks are C functions: bad calls must raise Python exceptions, never crash.
    tl = _C.Timeline()
    hk = _C.step_hooks(tl)
    m = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        hk.forward_pre(m)
    with pytest.raises(TypeError, match="takes 3 arguments"):
        hk.forward_post(m, ())
    with pytest.raises(TypeError, match="takes 3 arguments"):
        hk.optimizer_post(None)
    with pytest.raises(TypeError, match="takes 0 arguments"):
        hk.step(1)
    with pytest.raises(AttributeError):
        hk.forward_pre(object(), ())  # no .training attribute
    with pytest.raises(ValueError, match="module id"):
        hk.add_module(m, -1)
    with pytest.raises(TypeError):
        hk.add_module(m, "lin")
    with pytest.raises(ValueError, match="module_every"):
        _C.step_hooks(tl, module_every=-1)
    with pytest.raises(TypeError, match="callable"):
        _C.step_hooks(tl, on_step_end=3)
    assert hk.sampling is False  # no per-module timing
    assert _C.step_hooks(tl, module_every=1).sampling is True
    # A forward whose output has no tensor, or a tensor without grad, or a deep nest: no hook, no error.
    hk.forward_pre(m, ())
    hk.forward_post(m, (), {"a": [1, (2, None)], "b": "x"})
    hk.forward_pre(m, (torch.randn(3, 2),))
    hk.forward_post(m, (), torch.randn(3))
    deep = torch.randn(2, requires_grad=True) * 2
    for _ in range(40):
        deep = [deep]
    hk.forward_pre(m, ())
    hk.forward_post(m, (), deep)
    assert hk.step() is True  # the forwards made the step active
    assert hk.step() is False  # nothing since: a no-op


def test_step_hooks_find_the_output_tensor_in_nested_outputs():
    # tuples, lists, dicts (subclasses too) and namedtuples: the first tensor that requires grad.
    Out = collections.namedtuple("Out", "aux logits")

    class Nested(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.lin = torch.nn.Linear(8, 4)
            self.kind = kind

        def forward(self, x):
            y = SleepInBackward.apply(self.lin(x), 0.015, "backward")
            if self.kind == "dict":
                return collections.OrderedDict(n=3, aux=x, logits=y)
            if self.kind == "list":
                return [None, (x, [y])]
            return Out(aux=x, logits=y)

    for kind in ("dict", "list", "namedtuple"):
        m = Nested(kind)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        with stepscope.Monitor(m, opt, warmup_steps=0, flops=None) as mon:
            for x in loader(2, secs=0):
                out = m(x)
                y = out["logits"] if kind == "dict" else (out[1][1][0] if kind == "list" else out.logits)
                y.sum().backward()
                opt.step()
        back = mon.report()["phases"]["backward"]["host"]
        assert back["count"] == 2, kind
        assert back["min"] >= 0.015, kind  # the planted backward is inside the backward phase


def test_monitor_dropped_while_attached_is_collected():
    # model -> hooks -> the C hooks object -> the Monitor's step-end callback -> the Monitor -> model:
    # a cycle the collector must be able to see through and free when the loop drops it all.
    import weakref

    model = Planted(fwd=0.0, bwd=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = stepscope.Monitor(model, opt, per_module=True, per_module_every=2, warmup_steps=0, flops=None).attach()
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    refs = [weakref.ref(o) for o in (mon, model, opt)]
    del mon, model, opt
    gc.collect()
    assert all(r() is None for r in refs)


def test_monitor_dropped_during_backward_is_safe():
    # backward's end is a final callback queued when the gradient reached the output; the Monitor
    # is detached and freed before it runs: the callback must still find its Timeline alive.
    import weakref

    box = {}

    class DropsMonitor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            if "mon" not in box:
                return g
            mon = box.pop("mon")
            mon.detach()
            ref = weakref.ref(mon)
            del mon
            gc.collect()
            box["gone"] = ref() is None
            return g

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return DropsMonitor.apply(self.lin(x))

    m = M()
    box["mon"] = stepscope.Monitor(m, warmup_steps=0, flops=None).attach()
    m(torch.randn(3, 4)).sum().backward()
    assert box["gone"]
    # and the model trains on without hooks
    m(torch.randn(3, 4)).sum().backward()
    assert no_hooks(m)


def test_cpu_has_no_memory_counters():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
    assert mon.report()["memory"] is None
    assert all(r["memory"] is None for r in mon.recent_steps())


@pytest.mark.cuda
def test_cuda_memory_counters_read_in_cpp_at_step_end():
    dev = torch.device("cuda")
    model = torch.nn.Linear(512, 512).to(dev)
    opt = torch.optim.Adam(model.parameters())
    seen = []
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        # Registered after the Monitor's: runs right after the step ended, before anything frees.
        h = opt.register_step_post_hook(lambda *a: seen.append(
            (torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev), torch.cuda.max_memory_allocated(dev))))
        for _ in range(5):
            model(torch.randn(64, 512, device=dev)).sum().backward()
            opt.step()
        h.remove()
    rep = mon.report()
    ring = mon.recent_steps()
    assert [r["memory"]["allocated"] for r in ring] == [s[0] for s in seen]
    assert [r["memory"]["reserved"] for r in ring] == [s[1] for s in seen]
    assert rep["memory"]["allocated"] == seen[-1][0] and rep["memory"]["peak"] == seen[-1][2]
    assert rep["memory"]["total"] == torch.cuda.get_device_properties(dev).total_memory
    rises = sum(b[0] > a[0] for a, b in zip(seen, seen[1:])) / (len(seen) - 1)
    assert rep["memory"]["trend"] == {"steps": 5, "first": seen[0][0], "last": seen[-1][0],
                                      "rising_fraction": pytest.approx(rises)}


# ----------------------------------------------------------------------------- closures and marks
class SlowLBFGS(torch.optim.LBFGS):
    """LBFGS that sleeps after its closure calls: planted optimizer time inside step(closure)."""

    def __init__(self, params, secs):
        super().__init__(params, lr=0.1, max_iter=3, history_size=3)
        self.secs = secs

    def step(self, closure):
        loss = super().step(closure)
        sleep(self.secs, "optimizer")
        return loss


@pytest.mark.parametrize("global_hooks", [False, True])
def test_lbfgs_closure_is_one_step_and_phases_sum_to_it(global_hooks):
    model = Planted(fwd=0.004, bwd=0.004)
    opt = SlowLBFGS(model.parameters(), secs=0.015)
    calls, steps = [], 4
    with stepscope.Monitor(model, None if global_hooks else opt, warmup_steps=0, flops=None) as mon:
        for x in loader(steps, secs=0.030):
            n = 0

            def closure():
                nonlocal n
                n += 1
                opt.zero_grad()
                out = model(x)
                loss = out.square().mean()
                loss.backward()
                return loss

            opt.step(closure)
            calls.append(n)
            assert mon.step() is False  # the closure step already ended at the post hook
    rep = mon.report()
    print(mon.summary(), calls)
    assert rep["steps"] == steps
    assert rep["phases"]["forward"]["host"]["count"] == sum(calls)
    assert rep["phases"]["backward"]["host"]["count"] == sum(calls)
    assert rep["phases"]["data"]["host"]["count"] == steps
    # optimizer: once after each closure call but the last (LBFGS between calls) + once at the end
    assert rep["phases"]["optimizer"]["host"]["count"] == sum(calls)
    assert rep["phases"]["other"]["host"]["count"] == 0
    total = sum(rep["phases"][ph]["host"]["total"] for ph in PARTITION)
    assert total == pytest.approx(rep["phases"]["step"]["host"]["total"], rel=1e-9)
    # data: the loader's sleep and LBFGS's prelude to the closure, nothing of the planted optimizer time
    assert_planted(p50(rep, "data"), "data", SLACK)
    for r in mon.recent_steps():
        assert r["spans"][0][0] == "data" and r["spans"][-1][0] == "optimizer"
        assert sum(r["host"].values()) == pytest.approx(r["t1"] - r["t0"], abs=1e-6)


def test_closure_in_a_plain_optimizer_times_the_optimizer_after_the_closure():
    model = Planted()

    class AfterClosure(torch.optim.SGD):
        def step(self, closure=None):
            loss = closure()
            sleep(PLANT["optimizer"], "optimizer")
            super().step()  # nested hooks inside the outer step: one boundary pair
            return loss

    opt = AfterClosure(model.parameters(), lr=1e-3)
    steps = 5
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        for x in loader(steps):
            def closure():
                out = model(x)
                sleep(PLANT["loss"], "loss")
                loss = out.square().mean()
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad()
    rep = mon.report()
    print(mon.summary())
    assert rep["steps"] == steps
    for ph in ("data", "forward", "loss", "backward", "optimizer"):
        assert rep["phases"][ph]["host"]["count"] == steps
        assert_planted(p50(rep, ph), ph, SLACK)
    assert rep["phases"]["other"]["host"]["count"] == 0


def test_optimizer_of_another_model_counts_no_step_on_global_hooks():
    mine, other = Planted(fwd=0.0, bwd=0.0), torch.nn.Linear(8, 4)
    opt_other = torch.optim.SGD(other.parameters(), lr=1e-3)
    opt_mine = torch.optim.SGD(mine.parameters(), lr=1e-3)
    with stepscope.Monitor(mine, warmup_steps=0, flops=None) as mon:  # global optimizer hooks
        for _ in range(3):
            other(torch.randn(2, 8)).sum().backward()
            opt_other.step()  # this Monitor's model did not run: no step
        assert mon.steps == 0
        mine(torch.randn(2, 8)).sum().backward()
        opt_mine.step()
        assert mon.steps == 1
        opt_other.step()
        assert mon.steps == 1


class _PlantedWrapper(torch.nn.Module):  # a framework's model: its forward is a submodule's
    def __init__(self):
        super().__init__()
        self.inner = Planted(fwd=PLANT["forward"], bwd=PLANT["backward"])


class _AfterClosure(torch.optim.SGD):  # runs the closure inside step(), then its planted update
    def step(self, closure=None):
        loss = closure()
        sleep(PLANT["optimizer"], "optimizer")
        super().step()
        return loss


def _assert_planted_partition(rep: dict, steps: int) -> None:
    assert rep["steps"] == steps and rep["samples"] == 16 * steps
    for ph in ("data", "forward", "backward", "optimizer"):
        assert rep["phases"][ph]["host"]["count"] == steps
        assert_planted(p50(rep, ph), ph, SLACK)
    assert rep["phases"]["other"]["host"]["count"] == 0
    total = sum(rep["phases"][ph]["host"]["total"] for ph in PARTITION)
    assert total == pytest.approx(rep["phases"]["step"]["host"]["total"], rel=1e-9)


def test_marks_drive_a_step_whose_forward_hooks_cannot_see():
    # A framework's loop: the model's forward is a submodule's (no hook on it), the optimizer runs
    # the closure inside a forward marked at "batch start" (Lightning's automatic optimization).
    w = _PlantedWrapper()
    opt = _AfterClosure(w.parameters(), lr=1e-3)
    steps = 5
    with stepscope.Monitor(w, opt, warmup_steps=0, flops=None) as mon:
        for x in loader(steps):
            mon.mark("forward_begin", batch=len(x))

            def closure():
                out = w.inner(x)
                loss = out.square().mean()
                mon.mark("forward_end")
                mon.mark("backward_begin")
                loss.backward()
                mon.mark("backward_end")
                mon.mark("backward_end")  # a second one is ignored
                return loss

            opt.step(closure)
            opt.zero_grad()
            mon.mark("forward_end")  # after the step: ignored
    rep = mon.report()
    print(mon.summary())
    _assert_planted_partition(rep, steps)


def test_framework_marks_in_c_drive_the_step_as_monitor_mark_does():
    # The C marks the Lightning callback calls (_C.StepHooks.batch_start ...): the same loop as the
    # test above, its planted phases found and partitioned as with Monitor.mark.
    w = _PlantedWrapper()
    opt = _AfterClosure(w.parameters(), lr=1e-3)
    steps = 5
    with stepscope.Monitor(w, opt, warmup_steps=0, flops=None) as mon:
        hooks = mon._hooks
        for x in loader(steps):
            hooks.batch_start((x, {"y": torch.zeros(len(x))}))

            def closure():
                loss = w.inner(x).square().mean()
                hooks.before_backward(loss)
                loss.backward()
                hooks.after_backward()
                hooks.after_backward()  # a second one is ignored
                return loss

            opt.step(closure)
            opt.zero_grad()
            hooks.batch_end()  # after the step: ignored
    rep = mon.report()
    _assert_planted_partition(rep, steps)
    assert rep["samples_counted_by"] == "mark(batch=)"
    assert rep["health"]["loss"]["count"] == steps  # before_backward kept each loss


def test_framework_marks_read_samples_and_losses_from_any_batch():
    import collections
    import threading

    class Batch(collections.UserDict):  # a Mapping that is not a dict (HF's BatchEncoding is one)
        pass

    x = torch.randn(6, 4)
    forms = [(x, 6), [torch.tensor(3.0), (x[:5], "label")], ({"a": "text", "b": [x[:4]]}, 4),
             (Batch(ids=x[:3]), 3), (("no", "tensor"), None), ([[[[x[:2]]]]], 2)]
    forms[1] = (forms[1], 5)  # a 0-d tensor first: the first tensor of dim > 0 gives the samples
    for batch, n in forms:
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, batch_size=7) as mon:
            hk = mon._hooks
            for loss in (torch.tensor(1.5), torch.ones(2), torch.tensor(3), "not a tensor"):
                hk.batch_start(batch)
                hk.before_backward(loss)  # kept only when one floating value
                hk.after_backward()
                opt.step()
        rep = mon.report()
        assert rep["steps"] == 4 and rep["samples"] == 4 * (n if n is not None else 7), batch
        assert rep["samples_counted_by"] == ("mark(batch=)" if n is not None else "batch_size=7")
        assert rep["health"]["loss"]["count"] == 1
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        model(x).sum().backward()
        opt.step()  # the training thread is this one
        hk = mon._hooks
        th = threading.Thread(target=lambda: (hk.batch_start(x), hk.batch_end()))
        th.start()
        th.join()
        with pytest.raises(TypeError):
            hk.batch_start()
        with pytest.raises(TypeError):
            hk.after_backward(1)
    assert mon.report()["phases"]["forward"]["host"]["count"] == 1  # the other thread's marks dropped


def test_marks_by_hand_and_their_errors():
    model = Planted(fwd=0.0, bwd=0.0)
    mon = stepscope.Monitor(model, warmup_steps=0, flops=None)
    with pytest.raises(RuntimeError, match="needs an attached Monitor"):
        mon.mark("forward_begin")
    with mon:
        with pytest.raises(ValueError, match="unknown boundary 'fwd_begin'.*forward_begin"):
            mon.mark("fwd_begin")
        with pytest.raises(ValueError, match="takes no batch"):
            mon.mark("backward_end", batch=3)
        for _ in range(3):
            for name in stepscope.monitor.MARKS[:5]:
                mon.mark(name, batch=4 if name == "forward_begin" else None)
            mon.mark("eval_begin")
            model.eval()
            model(torch.randn(2, 8))  # nested inside the marked eval: one eval span
            model.train()
            mon.mark("eval_end")
            mon.mark("optimizer_end")
        assert mon.steps == 3
        mon.mark("forward_begin")
        mon.mark("forward_end")
        mon.mark("step")
        assert mon.steps == 4
    rep = mon.report()
    assert rep["phases"]["eval_forward"]["host"]["count"] == 3
    assert rep["phases"]["optimizer"]["host"]["count"] == 3
    assert rep["samples"] == 12  # batch given to the marks only; eval forwards count none


def test_argument_mistakes_are_named():
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    with pytest.raises(TypeError, match="scheduler \\(StepLR\\).*scheduler.optimizer"):
        stepscope.Monitor(model, sched)
    with pytest.raises(TypeError, match="scheduler \\(ReduceLROnPlateau\\)"):
        stepscope.Monitor(model, [opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt)])
    with pytest.raises(TypeError, match="got a model \\(Linear\\) where an optimizer belongs"):
        stepscope.Monitor(model, model)
    with pytest.raises(TypeError, match="swapped"):
        stepscope.Monitor(opt, model)
    with pytest.raises(TypeError, match="got an optimizer \\(SGD\\)"):
        stepscope.Monitor(opt)
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer.*got str"):
        stepscope.Monitor(model, "sgd")
    stepscope.Monitor((m for m in [model]), (o for o in [opt]))  # iterables still work


@pytest.mark.parametrize("wrap", ["dict", "list", "nested"])
def test_samples_are_counted_from_the_first_tensor_of_a_dict_or_list_batch(wrap):
    # A model called with model({"x": x}) or model([x, mask]) counted 0 samples, silently.
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(8, 2)

        def forward(self, batch):
            x = batch["x"] if isinstance(batch, dict) else batch[0]
            return self.l(x[0] if isinstance(x, tuple) else x)

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    pack = {"dict": lambda x: {"x": x, "n": 3}, "list": lambda x: [x, torch.ones(99)],
            "nested": lambda x: {"x": (x,)}}[wrap]
    with stepscope.Monitor(net, opt, warmup_steps=0, flops=None) as mon:
        for _ in range(5):
            net(pack(torch.randn(6, 8))).sum().backward()
            opt.step()
            opt.zero_grad()
    rep = mon.report()
    assert rep["steps"] == 5 and rep["samples"] == 6 * 5 and rep["samples_per_s"] > 0
