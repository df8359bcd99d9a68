"""stepscope.health.GradStats and the grad_stats_update op against plain PyTorch references."""

import contextlib
import math

import numpy as np
import pytest
import torch

from stepscope import _C
from stepscope.health import GradStats

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# Half the width of a histogram bin, as a ratio: a quantile is its bin's geometric middle.
HALF_BIN = 10 ** (1 / (2 * _C.HEALTH_BINS_PER_DECADE))


class WithUnusedHead(torch.nn.Sequential):
    def __init__(self, *layers):
        super().__init__(*layers)
        self.head = torch.nn.Linear(4, 4)  # registered, never called

    def forward(self, x):
        return self[2](self[1](self[0](x)))


def mlp(seed: int, device: str, unused: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = (torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return (WithUnusedHead(*layers) if unused else torch.nn.Sequential(*layers)).to(device)


def train(model, steps: int, seed: int, device: str, each=None):
    torch.manual_seed(seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        x = torch.randn(8, 16, device=device)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        each(step)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_finite_gradient_is_not_called_nonfinite(dtype):
    # 1e20 squared is past float32's range: the float32 blocks give inf, and the tensor is summed
    # again in float64, which holds it; the step is finite.
    grads = [torch.full((100,), 1e20, dtype=dtype), torch.ones(3, dtype=dtype)]
    stats = GradStats(["big", "small"])
    stats.update(grads, 0)
    r = stats.read()
    want = grads[0].double().norm().item()
    assert r["params"]["big"]["norm_last"] == pytest.approx(want, rel=1e-12)
    assert r["nonfinite"]["steps"] == 0 and r["params"]["big"]["nonfinite_elements"] == 0
    assert r["grad_norm"]["last"] == pytest.approx(math.sqrt(want ** 2 + 3), rel=1e-12)


@pytest.mark.parametrize("under_mode", [False, True])
def test_watch_direct_path_equals_the_op(under_mode, base_seed):
    # HealthWatch reads plain CPU gradients past the dispatcher (GradStats::update_cpu_direct); under
    # a TorchDispatchMode, or for a gradient with other dispatch keys, it takes the op. Either way
    # the reading is the op's, bit for bit.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(base_seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((300, 7), (5,), (2, 3), (4,))]
    params[1] = torch.nn.Parameter(params[1].detach().to(torch.bfloat16))
    params[0].grad = torch.randn(300, 7, generator=g)
    params[1].grad = torch.randn(5, generator=g).to(torch.bfloat16)
    params[3].grad = torch.randn(8, generator=g)[::2]  # strided; params[2] gets no gradient
    names = ["a", "b", "c", "d"]
    watch = _C.HealthWatch(params, names, ring=4, ratio_every=0)
    ref = GradStats(names, ring=4)
    for step in range(3):
        for p in (params[0], params[1], params[3]):
            p.grad.mul_(1.5)
        params[1].grad[0] = float("nan") if step == 1 else 1.0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with Passthrough() if under_mode else contextlib.nullcontext():
                watch.before_update(step)
        calls = sum(e.name == "stepscope::grad_stats_update" for e in prof.events())
        assert (calls > 0) == under_mode, (step, calls)  # the dispatcher is passed by, or taken
        ref.update(params, step)
    got, want = watch.read()["grads"], ref.read()
    # repr: exact for floats (the shortest round trip) and equal for the NaN of the bad step
    assert repr(got["grad_norm"]) == repr(want["grad_norm"]) and repr(got["recent"]) == repr(want["recent"])
    for i, n in enumerate(names):
        assert {k: v for k, v in got["params"][i].items() if k != "no_grad_last"} == want["params"][n], (n, base_seed)
    assert got["first_nonfinite_step"] == 1 and got["first_nonfinite_param"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_global_norm_equals_clip_grad_norm(device, base_seed):
    steps = 12
    m = mlp(base_seed, device)
    stats = GradStats([n for n, _ in m.named_parameters()], ring=steps)
    train(m, steps, base_seed, device, lambda s: stats.update(list(m.parameters()), s))
    ref = []
    m2 = mlp(base_seed, device)
    train(m2, steps, base_seed, device,
          lambda s: ref.append(float(torch.nn.utils.clip_grad_norm_(m2.parameters(), max_norm=1e30))))
    got = [e["grad_norm"] for e in stats.read()["recent"]]
    np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"seed {base_seed}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_param_norms_equal_float64_norm(device, dtype, base_seed):
    g = torch.Generator().manual_seed(base_seed)
    sizes = ((5, 7), (130,), (3, 4, 5), (1000, 37))  # the last one spans many of the CPU's float32 blocks
    grads = [torch.randn(s, generator=g).to(device, dtype) for s in sizes]
    grads.append(torch.randn(6, 9, generator=g).to(device, dtype).t())  # non-contiguous
    grads.append(torch.randn(1, 9, generator=g).to(device, dtype).expand(4, 9))  # stride 0
    names = [f"p{i}" for i in range(len(grads))]
    stats = GradStats(names)
    stats.update(grads, 0)
    r = stats.read()
    want = [x.double().norm().item() for x in grads]
    # CPU: float64 gradients in float64; narrower ones in float32 blocks of 16 squares per lane, summed
    # in float64 (grad_stats_cpu.cpp). CUDA: _foreach_norm, float32.
    rtol = (1e-12 if dtype == torch.float64 else 1e-6) if device == "cpu" else 1e-5
    for n, w in zip(names, want):
        assert r["params"][n]["norm_last"] == pytest.approx(w, rel=rtol), (n, base_seed)
    assert r["grad_norm"]["last"] == pytest.approx(math.sqrt(sum(w * w for w in want)), rel=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_planted_nonfinite_is_named_at_its_step(device, bad, base_seed):
    k = 5
    m = mlp(base_seed, device)
    names = [n for n, _ in m.named_parameters()]
    stats = GradStats(names)
    backwards = []

    def plant(grad):  # runs once per backward: the k-th one is step k's
        backwards.append(1)
        if len(backwards) == k + 1:
            grad = grad.clone()
            grad.view(-1)[3] = bad
        return grad

    m[2].weight.register_hook(plant)
    train(m, 8, base_seed, device, lambda s: stats.update(list(m.parameters()), s))
    r = stats.read()
    assert r["nonfinite"]["first_step"] == k
    assert r["nonfinite"]["first_param"] == "2.weight"
    assert r["nonfinite"]["steps"] >= 1
    assert r["params"]["2.weight"]["nonfinite_elements"] >= 1
    assert r["params"]["2.weight"]["nonfinite_steps"] >= 1
    assert r["params"]["0.weight"]["nonfinite_steps"] <= r["nonfinite"]["steps"]
    if device == "cpu":
        assert r["nonfinite"]["counts"] == "elements"
        assert r["recent"][k]["nonfinite"] >= 1
    assert not math.isfinite(r["recent"][k]["grad_norm"])


@pytest.mark.parametrize("device", DEVICES)
def test_never_called_submodule_is_no_grad(device, base_seed):
    m = mlp(base_seed, device, unused=True)
    stats = GradStats([n for n, _ in m.named_parameters()])
    train(m, 4, base_seed, device, lambda s: stats.update(list(m.parameters()), s))
    r = stats.read()
    assert r["no_grad"] == {"names": ["head.weight", "head.bias"], "steps": 4}
    assert r["params"]["head.weight"]["no_grad_steps"] == 4
    assert r["params"]["0.weight"]["no_grad_steps"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_quantiles_match_numpy(device, base_seed):
    rng = np.random.default_rng(base_seed)
    norms = (10.0 ** rng.uniform(-6, 6, size=1000)).astype(np.float32)
    stats = GradStats(["w"], ring=8)
    for i, v in enumerate(norms):
        stats.update([torch.tensor([float(v)], device=device)], i)
    g = stats.read()["grad_norm"]
    x = norms.astype(np.float64)
    assert g["count"] == 1000
    assert g["mean"] == pytest.approx(x.mean(), rel=1e-9)
    assert g["std"] == pytest.approx(x.std(ddof=1), rel=1e-6)
    assert (g["min"], g["max"]) == (pytest.approx(x.min()), pytest.approx(x.max()))
    # The estimate is the middle of the bin holding the rank-floor(q * (n - 1)) sample; numpy's value
    # lies between that sample and the next one. Both samples lie in or next to that bin, so one bin
    # width (HALF_BIN**2 - 1, 3.7 %) bounds the error, plus the gap between neighbouring samples.
    srt = np.sort(x)
    for q in (0.5, 0.9, 0.99):
        j = int(math.floor(q * (len(x) - 1)))
        gap = srt[j + 1] / srt[j]
        est, want = g[f"p{round(q * 100)}"], np.quantile(x, q)
        assert abs(math.log(est / want)) <= math.log(HALF_BIN**2 * gap), (q, est, want, base_seed)


@pytest.mark.parametrize("device", DEVICES)
def test_ring_wraps_oldest_first(device):
    stats = GradStats(["a", "b"], ring=3)
    for s in range(7):
        stats.update([torch.full((4,), float(s), device=device), None], 10 * s)
    r = stats.read()
    assert [e["step"] for e in r["recent"]] == [40, 50, 60]
    assert [e["grad_norm"] for e in r["recent"]] == pytest.approx([8.0, 10.0, 12.0])
    assert r["steps"] == 7 and r["grad_norm"]["count"] == 7
    assert r["no_grad"]["names"] == ["b"]
    stats.reset()
    assert stats.read()["steps"] == 0 and stats.read()["recent"] == []


def test_state_is_fixed_size():
    fixed = _C.health_layout(0, 1)["numel"] - 3  # the header and the histogram
    lay = _C.health_layout(200, 256)
    assert lay["numel"] == fixed + 8 * 200 + 3 * 256
    assert lay["bytes"] == 8 * lay["numel"]
    stats = GradStats([f"p{i}" for i in range(200)])
    assert stats.nbytes == lay["bytes"]


def test_bad_inputs_raise():
    stats = GradStats(["a", "b"], ring=2)
    with pytest.raises(ValueError, match="one entry per name"):
        stats.update([torch.ones(2)], 0)
    with pytest.raises(TypeError, match=r"grads\[1\] must be float32"):
        stats.update([torch.ones(2), torch.ones(2, dtype=torch.int64)], 0)
    with pytest.raises(ValueError, match="sparse gradients are not supported"):
        stats.update([torch.ones(2), torch.ones(2).to_sparse()], 0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        stats.update([torch.ones(2), None], -3)
    with pytest.raises(ValueError, match="names must be unique"):
        GradStats(["a", "a"])
    op = torch.ops.stepscope.grad_stats_update.default
    state = torch.zeros(_C.health_layout(1, 2)["numel"], dtype=torch.float64)
    with pytest.raises(TypeError, match="state must be float64"):
        op([torch.ones(2)], state.float(), 0, 0)
    with pytest.raises(ValueError, match=r"slot must be in \[0, ring\) = \[0, 2\)"):
        op([torch.ones(2)], state, 0, 2)
    with pytest.raises(ValueError, match="with P = 3"):
        op([torch.ones(2)] * 3, state, 0, 0)
    assert stats.read()["steps"] == 0  # a refused update changes nothing


def test_update_never_reads_the_device(monkeypatch, base_seed):
    m = mlp(base_seed, "cpu", unused=True)
    stats = GradStats([n for n, _ in m.named_parameters()])
    m(torch.randn(3, 16)).sum().backward()
    stats.update(list(m.parameters()), 0)  # the first update makes the state

    def refuse(*a, **k):
        raise AssertionError("a host read on the update path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for s in range(1, 4):
        stats.update(list(m.parameters()), s)
    monkeypatch.undo()
    assert stats.read()["steps"] == 4


def test_opcheck():
    state = torch.empty(_C.health_layout(3, 4)["numel"], dtype=torch.float64)
    _C.health_reset(state, 3)
    args = ([torch.randn(5), None, torch.randn(2, 3)], state, 7, 1)
    torch.library.opcheck(torch.ops.stepscope.grad_stats_update.default, args)


@pytest.mark.cuda
def test_cuda_update_does_not_sync(base_seed):
    m = mlp(base_seed, "cuda", unused=True)
    stats = GradStats([n for n, _ in m.named_parameters()], device="cuda")
    m(torch.randn(3, 16, device="cuda")).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(3):
            stats.update(list(m.parameters()), s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.read()["steps"] == 3


def test_torch_compile_fullgraph(base_seed):
    torch.manual_seed(base_seed)
    names = ["a", "none", "b"]
    compiled, eager = GradStats(names, ring=4, device="cpu"), GradStats(names, ring=4, device="cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, b, stats, s):
        stats.update([a * 2, None, b], s)

    for s in range(3):
        a, b = torch.randn(5), torch.randn(2, 3)
        step(a, b, compiled, s)
        eager.update([a * 2, None, b], s)
    assert torch.equal(compiled.state, eager.state)
