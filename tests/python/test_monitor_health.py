"""Training health in the Monitor (Monitor(health=...), report()["health"], observe, the modes)
against plain PyTorch: clip_grad_norm_, p.grad.norm(), planted NaNs, an unused submodule, SGD's
update written by hand."""

import math

import numpy as np
import pytest
import torch

import stepscope

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


class Net(torch.nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        self.body = torch.nn.Linear(16, 32)
        self.out = torch.nn.Linear(32, 4)
        if unused:
            self.head = torch.nn.Linear(32, 2)  # registered, never called

    def forward(self, x):
        return self.out(torch.relu(self.body(x)))


def net(seed: int, device: str, unused: bool = False) -> Net:
    torch.manual_seed(seed)
    return Net(unused).to(device)


def train(model, opt, steps: int, seed: int, device: str, mon=None, each=None, batch: int = 8):
    torch.manual_seed(seed + 1)
    for step in range(steps):
        x = torch.randn(batch, 16, device=device)
        loss = model(x).pow(2).mean()
        if mon is not None:
            mon.observe(loss)
        loss.backward()
        if each is not None:
            each(step)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("device", DEVICES)
def test_grad_norms_equal_clip_grad_norm_and_param_norms(device, base_seed):
    steps = 9
    m = net(base_seed, device)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    last = {}
    with stepscope.Monitor(m, opt, warmup_steps=0, flops=None) as mon:
        train(m, opt, steps, base_seed, device, mon,
              each=lambda s: last.update({n: float(p.grad.norm()) for n, p in m.named_parameters()}))
    ref = []
    m2 = net(base_seed, device)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.05)
    train(m2, opt2, steps, base_seed, device,
          each=lambda s: ref.append(float(torch.nn.utils.clip_grad_norm_(m2.parameters(), max_norm=1e30))))
    got = [e["grad_norm"] for e in mon.recent_steps()]
    np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"seed {base_seed}")
    h = mon.report()["health"]
    assert h["steps"] == steps and h["grad_norm"]["count"] == steps
    assert h["grad_norm"]["max"] == pytest.approx(max(ref), rel=1e-5)
    assert h["grad_norm"]["last"] == pytest.approx(ref[-1], rel=1e-5)
    maxima = [p["norm_max"] for p in h["top_params"]]
    assert sorted(p["name"] for p in h["top_params"]) == sorted(last) and maxima == sorted(maxima, reverse=True)
    for p in h["top_params"]:
        assert p["norm_last"] == pytest.approx(last[p["name"]], rel=1e-5)
    assert h["nonfinite"]["steps"] == 0 and h["nonfinite"]["first_step"] is None
    assert h["no_grad"]["names"] == []
    assert all(e["loss"] is not None for e in mon.recent_steps())


@pytest.mark.parametrize("device", DEVICES)
def test_planted_nan_is_named_at_its_step(device, base_seed):
    k = 4
    m = net(base_seed, device)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    step = {"n": 0}

    def plant(g):
        return g.clone().fill_(float("nan")) if step["n"] == k else g

    m.out.weight.register_hook(plant)
    with stepscope.Monitor(m, opt) as mon:
        train(m, opt, 7, base_seed, device, mon, each=lambda s: step.update(n=s + 1))
    nf = mon.report()["health"]["nonfinite"]
    assert nf["first_step"] == k and nf["first_param"] == "out.weight"
    assert nf["mode"] == "warn" and nf["skipped"] == 0
    assert nf["loss_nonfinite"] is True or nf["loss_nonfinite"] is False
    # warn mode changes nothing: the NaN reached the weights and every later step
    assert nf["steps"] >= 1 and not torch.isfinite(m.out.weight).all()


def test_loss_already_nonfinite_is_told_apart(base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with stepscope.Monitor(m, opt) as mon:
        for s in range(4):
            loss = m(torch.randn(8, 16)).pow(2).mean() * (float("inf") if s == 2 else 1.0)
            mon.observe(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    h = mon.report()["health"]
    assert h["nonfinite"]["first_step"] == 2 and h["nonfinite"]["loss_nonfinite"] is True
    assert h["loss"]["first_nonfinite_step"] == 2 and h["loss"]["count"] == 4


def test_unused_submodule_is_listed_in_no_grad(base_seed):
    m = net(base_seed, "cpu", unused=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with stepscope.Monitor(m, opt) as mon:
        train(m, opt, 5, base_seed, "cpu")
    ng = mon.report()["health"]["no_grad"]
    assert ng == {"names": ["head.weight", "head.bias"], "steps": 5}


def test_frozen_parameters_are_not_watched(base_seed):
    m = net(base_seed, "cpu")
    m.body.requires_grad_(False)
    opt = torch.optim.SGD(m.out.parameters(), lr=0.05)
    with stepscope.Monitor(m, opt) as mon:
        train(m, opt, 3, base_seed, "cpu")
    h = mon.report()["health"]
    assert sorted(p["name"] for p in h["top_params"]) == ["out.bias", "out.weight"]
    assert h["no_grad"]["names"] == []


@pytest.mark.parametrize("device", DEVICES)
def test_update_ratio_equals_sgd_by_hand(device, base_seed):
    lr, steps, every = 0.05, 7, 3
    m = net(base_seed, device)
    opt = torch.optim.SGD([{"params": m.body.parameters()}, {"params": m.out.parameters(), "lr": lr / 5}], lr=lr)
    hand = {0: [], 1: [], "all": []}

    def by_hand(step):
        if step % every:
            return
        # plain SGD: dw = lr * g, per group
        parts = {0: (list(m.body.parameters()), lr), 1: (list(m.out.parameters()), lr / 5)}
        dw2 = {g: sum(float((r * p.grad).pow(2).sum()) for p in ps) for g, (ps, r) in parts.items()}
        w2 = {g: sum(float(p.detach().pow(2).sum()) for p in ps) for g, (ps, _) in parts.items()}
        for g in (0, 1):
            hand[g].append(math.sqrt(dw2[g] / w2[g]))
        hand["all"].append(math.sqrt((dw2[0] + dw2[1]) / (w2[0] + w2[1])))

    with stepscope.Monitor(m, opt, update_ratio_every=every) as mon:
        train(m, opt, steps, base_seed, device, each=by_hand)
    ur = mon.report()["health"]["update_ratio"]
    assert ur["every"] == every and ur["samples"] == len(hand["all"]) == 3
    assert ur["overall"]["last"] == pytest.approx(hand["all"][-1], rel=1e-5)
    assert ur["overall"]["mean"] == pytest.approx(sum(hand["all"]) / 3, rel=1e-5)
    groups = {g["group"]: g for g in ur["groups"]}
    for g in (0, 1):
        assert groups[g]["params"] == 2
        assert groups[g]["max"] == pytest.approx(max(hand[g]), rel=1e-5)
        assert groups[g]["min"] == pytest.approx(min(hand[g]), rel=1e-5)


def test_a_model_without_parameters_says_health_is_off():
    # The parameters live outside the module the Monitor is given: health used to report a gradient
    # norm of 0 on every step, as if the training had no gradient.
    w = torch.nn.Parameter(torch.randn(8, 2))

    class Apply(torch.nn.Module):
        def forward(self, x):
            return x @ w

    model, opt = Apply(), torch.optim.SGD([w], lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        for _ in range(3):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    h = mon.report()["health"]
    assert h["disabled"].startswith("no parameter of the models requires a gradient")
    assert h["steps"] == 0 and h["grad_norm"]["count"] == 0
    f = {x["rule"]: x for x in mon.diagnose()}["health_disabled"]
    assert f["severity"] == "info" and "no parameter" in f["title"]
    assert "switched off: no parameter" in mon.summary()


def test_update_ratio_off(base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with stepscope.Monitor(m, opt, update_ratio_every=0) as mon:
        train(m, opt, 3, base_seed, "cpu")
    assert mon.report()["health"]["update_ratio"] is None


def test_raise_mode_raises_before_the_update(base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with stepscope.Monitor(m, opt, nonfinite="raise") as mon:
        train(m, opt, 2, base_seed, "cpu")
        m(torch.randn(8, 16)).pow(2).mean().backward()
        m.body.bias.grad[1] = float("inf")
        before = [p.detach().clone() for p in m.parameters()]
        with pytest.raises(FloatingPointError, match=r"step 2 in 'body.bias'.*did not run"):
            opt.step()
        assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
        opt.zero_grad()
        train(m, opt, 2, base_seed, "cpu")  # the Monitor goes on after the raised step
    rep = mon.report()
    assert rep["health"]["nonfinite"]["first_step"] == 2 and rep["health"]["nonfinite"]["mode"] == "raise"
    assert rep["health"]["steps"] == 5


def test_skip_mode_leaves_the_weights_and_goes_on(base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    with stepscope.Monitor(m, opt, nonfinite="skip") as mon:
        train(m, opt, 2, base_seed, "cpu")
        m(torch.randn(8, 16)).pow(2).mean().backward()
        m.out.weight.grad[0, 0] = float("nan")
        before = [p.detach().clone() for p in m.parameters()]
        state_steps = [float(opt.state[p]["step"]) for p in m.parameters()]
        opt.step()
        assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
        assert [float(opt.state[p]["step"]) for p in m.parameters()] == state_steps
        opt.zero_grad()
        train(m, opt, 2, base_seed, "cpu")
    assert all(torch.isfinite(p).all() for p in m.parameters())
    nf = mon.report()["health"]["nonfinite"]
    assert nf["skipped"] == 1 and nf["first_step"] == 2 and nf["steps"] == 1


def test_closure_steps_are_measured_after_the_closure(base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.LBFGS(m.parameters(), max_iter=3)
    x = torch.randn(8, 16)

    def closure():
        opt.zero_grad()
        loss = m(x).pow(2).mean()
        loss.backward()
        return loss

    with stepscope.Monitor(m, opt) as mon:
        for _ in range(3):
            opt.step(closure)
    h = mon.report()["health"]
    assert h["steps"] == 3 and h["no_grad"]["names"] == []
    ref = float(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=1e30))  # the last closure's
    assert h["grad_norm"]["last"] == pytest.approx(ref, rel=1e-5)


def test_two_optimizers_measure_once_per_step(base_seed):
    m = net(base_seed, "cpu")
    a = torch.optim.SGD(m.body.parameters(), lr=0.05)
    b = torch.optim.SGD(m.out.parameters(), lr=0.05)
    with stepscope.Monitor(m, [a, b], update_ratio_every=1) as mon:
        for _ in range(4):
            m(torch.randn(8, 16)).pow(2).mean().backward()
            a.step()
            b.step()
            a.zero_grad()
            b.zero_grad()
    h = mon.report()["health"]
    assert h["steps"] == 4 and mon.steps == 4
    # the sample spans the whole step: both optimizers' updates (b's comes after a's post hook)
    assert sorted(g["group"] for g in h["update_ratio"]["groups"]) == [0, 1]
    assert all(g["min"] > 0 for g in h["update_ratio"]["groups"])


def test_global_hooks_and_another_models_optimizer(base_seed):
    m, other = net(base_seed, "cpu"), net(base_seed + 1, "cpu")
    opt, opt_other = torch.optim.SGD(m.parameters(), lr=0.05), torch.optim.SGD(other.parameters(), lr=0.05)
    with stepscope.Monitor(m) as mon:
        for _ in range(3):
            m(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()
            other(torch.randn(8, 16)).pow(2).mean().backward()
            opt_other.step()
    assert mon.report()["health"]["steps"] == 3


def test_sparse_gradient_switches_health_off_and_training_goes_on(base_seed):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    with stepscope.Monitor(emb, opt) as mon:
        for _ in range(3):
            emb(torch.tensor([1, 2])).sum().backward()
            opt.step()
            opt.zero_grad()
    h = mon.report()["health"]
    assert mon.steps == 3
    assert h["disabled"] is not None and "sparse" in h["disabled"].lower(), h["disabled"]


def test_health_off_and_bad_arguments(base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with stepscope.Monitor(m, opt, health=False) as mon:
        train(m, opt, 2, base_seed, "cpu")
        with pytest.raises(RuntimeError, match="health on"):
            mon.observe(torch.tensor(1.0))
    assert mon.report()["health"] is None and mon.recent_steps()[-1]["grad_norm"] is None
    with pytest.raises(ValueError, match="nonfinite"):
        stepscope.Monitor(m, opt, nonfinite="ignore")
    with pytest.raises(ValueError, match="update_ratio_every"):
        stepscope.Monitor(m, opt, update_ratio_every=-1)
    with pytest.raises(TypeError, match="health"):
        stepscope.Monitor(m, opt, health="yes")
    mon = stepscope.Monitor(m, opt)
    with pytest.raises(RuntimeError, match="attached"):
        mon.observe(torch.tensor(1.0))
    with mon:
        with pytest.raises(ValueError, match="one value"):
            mon.observe(torch.ones(3))
        with pytest.raises(TypeError, match="floating"):
            mon.observe(torch.tensor(3))
        with pytest.raises(TypeError, match="loss tensor"):
            mon.observe(1.5)


def test_reset_forgets_health(base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with stepscope.Monitor(m, opt) as mon:
        train(m, opt, 3, base_seed, "cpu", mon)
        mon.reset()
        train(m, opt, 2, base_seed, "cpu", mon)
    h = mon.report()["health"]
    assert h["steps"] == 2 and h["loss"]["count"] == 2 and len(h["recent"]) == 2


def test_no_host_read_per_step_on_cpu(base_seed, monkeypatch):
    m = net(base_seed, "cpu")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    calls = {"n": 0}
    for name in ("item", "tolist", "cpu", "numpy"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            calls["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with stepscope.Monitor(m, opt, update_ratio_every=2) as mon:
        calls["n"] = 0
        train(m, opt, 6, base_seed, "cpu", mon)
        per_step = calls["n"]
    monkeypatch.undo()
    assert per_step == 0
    assert mon.report()["health"]["steps"] == 6


def test_saved_run_keeps_health(tmp_path, base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m.out.bias.register_hook(lambda g: g * float("nan"))
    with stepscope.Monitor(m, opt) as mon:
        train(m, opt, 3, base_seed, "cpu", mon)
    mon.save(tmp_path / "run.json")
    run = stepscope.load(tmp_path / "run.json")
    h = run.report()["health"]
    assert h["nonfinite"]["first_param"] == "out.bias" and h["nonfinite"]["first_step"] == 0


@pytest.mark.cuda
def test_cuda_default_path_does_not_sync(base_seed):
    m = net(base_seed, "cuda", unused=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with stepscope.Monitor(m, opt, update_ratio_every=2) as mon:
        train(m, opt, 3, base_seed, "cuda", mon)  # warm-up: first allocations, event creation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            train(m, opt, 4, base_seed, "cuda", mon)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    h = mon.report()["health"]
    assert h["steps"] == 7 and h["no_grad"]["names"] == ["head.weight", "head.bias"]
    assert h["nonfinite"]["counts"] == "parameters"


HEALTH_RULE_NAMES = {"nonfinite_grads", "grad_norm_spikes", "no_grad", "update_ratio", "loss_spikes",
                     "health_disabled"}


def _health_findings(mon) -> dict:
    return {f["rule"]: f for f in mon.diagnose() if f["rule"] in HEALTH_RULE_NAMES}


def test_healthy_loop_gets_no_health_finding_above_info(base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    with stepscope.Monitor(m, opt, update_ratio_every=4) as mon:
        # batch 64: the loss of a batch of 8 squared outputs is heavy-tailed enough to jump 3x its
        # median about once in 150 runs of 60 steps, which the spike rule rightly calls a spike
        train(m, opt, 60, base_seed, "cpu", mon, batch=64)
    assert all(f["severity"] == "info" for f in _health_findings(mon).values()), _health_findings(mon)


def _planted_run(seed: int, hooks) -> object:
    m = net(seed, "cpu", unused=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    step = {"n": 0}
    for name, at, f in hooks:
        m.get_parameter(name).register_hook(lambda g, at=at, f=f: f(g) if step["n"] == at else g)
    with stepscope.Monitor(m, opt) as mon:
        train(m, opt, 45, seed, "cpu", mon, each=lambda s: step.update(n=s + 1))
    return mon


def test_rules_fire_on_a_real_monitors_planted_cases(base_seed):
    spiked = _health_findings(_planted_run(base_seed, [("body.weight", 40, lambda g: g * 1e3)]))
    assert 40 in spiked["grad_norm_spikes"]["evidence"]["steps"], spiked
    assert "nonfinite_grads" not in spiked
    assert "head.weight" in str(spiked["no_grad"]["evidence"])
    bad = _health_findings(_planted_run(base_seed, [("out.bias", 30, lambda g: g * float("nan"))]))
    assert bad["nonfinite_grads"]["severity"] == "critical"
    assert "out.bias" in bad["nonfinite_grads"]["title"] and "30" in bad["nonfinite_grads"]["title"]


class _RefusingGrad(torch.Tensor):
    """A tensor subclass whose own dispatch refuses the statistics op (as a DTensor might)."""

    @staticmethod
    def __new__(cls, t):
        return torch.Tensor._make_wrapper_subclass(cls, t.shape, dtype=t.dtype, device=t.device)

    def __init__(self, t):
        self.t = t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if "grad_stats" in str(func):
            raise NotImplementedError("no grad_stats here")

        def unwrap(x):
            return x.t if isinstance(x, _RefusingGrad) else x

        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


def test_python_error_in_the_op_switches_health_off(base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with stepscope.Monitor(m, opt) as mon:
        for _ in range(3):
            m(torch.randn(8, 16)).pow(2).mean().backward()
            m.out.bias.grad = _RefusingGrad(m.out.bias.grad.clone())
            opt.step()
            opt.zero_grad()
    assert mon.steps == 3
    assert "no grad_stats here" in mon.report()["health"]["disabled"]


def test_model_moved_after_attach_moves_the_state(base_seed):
    m = net(base_seed, "cpu").to(torch.float64)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    mon = stepscope.Monitor(m, opt).attach()
    m.to(torch.float32)  # keeps the parameter objects, as model.to(device) does
    m(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()
    mon.detach()
    h = mon.report()["health"]
    assert h["disabled"] is None and h["steps"] == 1


@pytest.mark.cuda
def test_cuda_model_moved_after_attach(base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with stepscope.Monitor(m, opt) as mon:
        m.cuda()
        train(m, opt, 3, base_seed, "cuda", mon)
    h = mon.report()["health"]
    assert h["disabled"] is None and h["steps"] == 3 and h["nonfinite"]["counts"] == "parameters"


def test_grad_scaler_skipped_steps_are_not_measured(base_seed):
    m = net(base_seed, "cpu")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    with stepscope.Monitor(m, opt) as mon:
        for i in range(4):
            scaler.scale(m(torch.randn(8, 16)).pow(2).mean()).backward()
            if i == 1:
                m.out.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            mon.step()  # the skipped step has no optimizer hook to end it
    h = mon.report()["health"]
    assert mon.steps == 4 and h["steps"] == 3 and h["nonfinite"]["steps"] == 0
    assert h["grad_norm"]["max"] < 20  # unscaled norms are below 1 here; scaled by 256 they would be over 50


def test_exports_carry_the_gradient_norm_and_the_loss(tmp_path, base_seed):
    from stepscope import export

    m = net(base_seed, "cpu")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    norms = []
    with stepscope.Monitor(m, opt) as mon:
        train(m, opt, 4, base_seed, "cpu", mon,
              each=lambda s: norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), 1e30))))
    rows = export.csv_rows(mon)
    head = rows[0]
    g = head.index("grad_norm")
    assert head[g:g + 2] == ["grad_norm", "loss"]  # then throughput's columns
    assert [float(r[head.index("grad_norm")]) for r in rows[1:]] == pytest.approx(norms, rel=1e-6)
    counters = [e for e in export.trace_events(mon)["traceEvents"] if e.get("ph") == "C"]
    assert len([e for e in counters if e["name"] == "grad_norm"]) == 4
    assert len([e for e in counters if e["name"] == "loss"]) == 4

    tags = {}

    class Writer:
        def add_scalar(self, tag, v, step):
            tags[tag] = v

    stepscope.log_tensorboard(Writer(), mon, 0)
    assert tags["stepscope/grad_norm"] == pytest.approx(norms[-1], rel=1e-6)
    assert tags["stepscope/nonfinite_steps"] == 0 and "stepscope/loss" in tags

    mon2 = stepscope.Monitor(m, opt, health=False)
    with mon2:
        train(m, opt, 2, base_seed, "cpu")
    rows = export.csv_rows(mon2)
    assert "loss" not in rows[0] and all(r[rows[0].index("grad_norm")] == "" for r in rows[1:])
    mon2.save(tmp_path / "run.json")
    run = stepscope.load(tmp_path / "run.json")
    assert export.csv_rows(run)[0] == rows[0]
    assert not [e for e in export.trace_events(run)["traceEvents"] if e.get("name") == "grad_norm"]


def test_a_gan_with_one_monitor_per_model_reads_each_models_own_gradients():
    # The README's advice for several optimizers each after its own backward: one Monitor per model.
    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    og, od = torch.optim.SGD(gen.parameters(), lr=0.01), torch.optim.SGD(disc.parameters(), lr=0.01)
    ref = {"g": [], "d": []}
    with stepscope.Monitor(disc, od, warmup_steps=0, flops=None) as md, \
            stepscope.Monitor(gen, og, warmup_steps=0, flops=None) as mg:
        for _ in range(4):
            real, fake = torch.randn(6, 8), gen(torch.randn(6, 4))
            (disc(fake.detach()).mean() - disc(real).mean()).backward()
            ref["d"].append(float(torch.nn.utils.clip_grad_norm_(disc.parameters(), 1e30)))
            od.step()
            od.zero_grad()
            (-disc(fake).mean()).backward()
            ref["g"].append(float(torch.nn.utils.clip_grad_norm_(gen.parameters(), 1e30)))
            og.step()
            og.zero_grad()
            disc.zero_grad()  # the generator's loss also reached the discriminator
    for mon, k in ((md, "d"), (mg, "g")):
        got = [v for _, v in mon.report()["health"]["recent"]]
        assert got == pytest.approx(ref[k], rel=1e-5), k
