"""Device sampling: Monitor(device_every="auto" | k) records CUDA events on one step in k.

The CPU tests check the argument and that it changes nothing without CUDA; the CUDA tests check the
schedule, the event count per boundary, the device times against hand-placed events on the same
steps, the absence of syncs, and that a GPU-bound step keeps every step device-timed.
"""

from __future__ import annotations

import pytest
import torch

import stepscope
from stepscope import _C
from stepscope import report as _report

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("bad", [0, -3, "every", "Auto", ""])
def test_device_every_bad_values_raise_value_error(bad):
    with pytest.raises(ValueError, match="stepscope: device_every"):
        stepscope.Monitor(torch.nn.Linear(2, 2), device_every=bad)


@pytest.mark.parametrize("bad", [1.5, None, True, [2]])
def test_device_every_bad_types_raise_type_error(bad):
    with pytest.raises(TypeError, match="stepscope: device_every"):
        stepscope.Monitor(torch.nn.Linear(2, 2), device_every=bad)


def test_timeline_refuses_a_negative_device_every():
    with pytest.raises(ValueError, match="stepscope: device_every"):
        _C.Timeline(device_every=-1)


@pytest.mark.parametrize("every", ["auto", 1, 5])
def test_device_every_has_no_effect_on_cpu(every):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, device_every=every) as mon:
        _train(model, opt, torch.randn(16, 8), 20)
    rep = mon.report()
    assert rep["steps"] == 20
    assert not rep["device"]
    assert rep["device_steps"] == 0 and rep["device_events"] == 0
    assert rep["device_every"] is None and rep["event_record_cost"] is None
    assert all(not r["device_timed"] and r["device_spans"] == [] for r in mon.recent_steps())
    assert "device:" not in mon.summary()


def test_summary_line_names_the_sampling_when_k_above_one():
    rep = {"device_every": 7, "device_every_auto": True, "device_steps": 143, "steps": 1000}
    assert _report.format_device_sampling(rep) == "device: every 7th step (auto), 143 of 1000 steps"
    rep.update(device_every=2, device_every_auto=False)
    assert _report.format_device_sampling(rep) == "device: every 2nd step, 143 of 1000 steps"
    for k, word in ((3, "3rd"), (11, "11th"), (12, "12th"), (13, "13th"), (21, "21st"), (112, "112th")):
        rep["device_every"] = k
        assert _report.format_device_sampling(rep).startswith(f"device: every {word} step"), k
    for k in (1, None):  # every step, or unknown (a merged report): nothing to say
        rep["device_every"] = k
        assert _report.format_device_sampling(rep) == ""


def test_packed_reports_add_device_steps_and_leave_k_unknown():
    tl = _C.Timeline(nvtx=False)
    for _ in range(3):
        tl.forward_begin()
        tl.forward_end()
        tl.step()
    packed = tl.pack()
    packed[9] = 5.0  # the device-timed steps' word of the header
    merged = _C.report_from_packed(torch.stack([packed, packed]))
    assert merged["device_steps"] == 10 and merged["steps"] == 3
    assert merged["device_every"] is None


# ---------------------------------------------------------------------------------------- CUDA
def _mlp(dev: torch.device) -> tuple:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64, device=dev)
    _train(model, opt, x, 3)  # kernels, cuBLAS handle and allocator warm before the Monitor
    torch.cuda.synchronize()
    return model, opt, x


def _expected_events(timed: list) -> int:
    # One event per boundary of a device-timed step: its 6 boundaries, plus the one that opens it
    # when the step before did not record it (first step: the attach event).
    return sum(6 + (i == 0 or not timed[i - 1]) for i, t in enumerate(timed) if t)


@cuda
@needs_gpu
def test_cuda_auto_samples_a_small_host_bound_step():
    dev = torch.device("cuda")
    model, opt, x = _mlp(dev)
    steps = 200
    with stepscope.Monitor(model, opt, warmup_steps=2, device_every="auto") as mon:
        torch.cuda.set_sync_debug_mode("error")
        try:
            _train(model, opt, x, steps)
            live = mon.report()  # no sync either
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    rep = mon.report()
    ring = mon.recent_steps()
    timed = [r["device_timed"] for r in ring]
    print(mon.summary())
    print(f"device_every {rep['device_every']}, device steps {rep['device_steps']} of {rep['steps']}, "
          f"events {rep['device_events']}, record cost {rep['event_record_cost'] * 1e6:.2f} us")
    assert live["steps"] == steps and live["steady_steps"] == steps - 2
    assert len(ring) == steps
    assert rep["device"] and rep["device_every_auto"]
    assert rep["event_record_cost"] is not None and rep["event_record_cost"] > 0
    assert rep["device_every"] > 1
    assert 0 < rep["device_steps"] < rep["steps"]
    assert rep["device_steps"] == sum(timed[2:])  # steady steps; the 2 warm-up steps are all timed
    assert all(timed[:2])
    # The step that was open at detach may have had its opening boundary recorded (the next step
    # was due), a step that never ran: at most one event more than the completed steps account for.
    want = _expected_events(timed)
    assert want <= rep["device_events"] <= want + 1
    assert rep["dropped_device_samples"] == 0 and rep["pending_device_samples"] == 0
    # Device columns cover the timed steps only: one device sample per timed steady step.
    for k in ("data", "forward", "loss", "backward", "other", "optimizer", "step"):
        assert rep["phases"][k]["device"]["count"] == rep["device_steps"], k
    # Untimed steps have no device spans; timed ones have all six, once resolved.
    for r in ring:
        assert len(r["device_spans"]) == (6 if r["device_timed"] else 0), r["step"]
    assert "device: every" in mon.summary()


@cuda
@needs_gpu
def test_cuda_device_every_one_times_every_step_with_one_event_per_boundary():
    dev = torch.device("cuda")
    model, opt, x = _mlp(dev)
    steps = 60
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, device_every=1) as mon:
        _train(model, opt, x, steps)
    torch.cuda.synchronize()
    rep = mon.report()
    assert rep["device_every"] == 1 and not rep["device_every_auto"]
    assert rep["device_steps"] == steps
    assert all(r["device_timed"] for r in mon.recent_steps())
    # The attach event, then each boundary's one event (a step's end opens the next step).
    assert rep["device_events"] == 1 + 6 * steps
    assert rep["phases"]["step"]["device"]["count"] == steps
    assert "device: every" not in mon.summary()


@cuda
@needs_gpu
def test_cuda_fixed_device_every_schedule_and_event_count():
    dev = torch.device("cuda")
    model, opt, x = _mlp(dev)
    steps, k = 50, 4  # timed: 0, 4, .., 48; step 49's successor (50) is not due, so no extra event
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, device_every=k) as mon:
        _train(model, opt, x, steps)
    torch.cuda.synchronize()
    rep = mon.report()
    timed = [r["device_timed"] for r in mon.recent_steps()]
    assert timed == [i % k == 0 for i in range(steps)]
    assert rep["device_steps"] == 13 and rep["device_every"] == k
    assert rep["device_events"] == 7 * 13
    assert rep["dropped_device_samples"] == 0


@cuda
@needs_gpu
def test_cuda_sampled_device_times_match_hand_placed_events_on_the_same_steps():
    torch.cuda.init()
    dev = torch.device("cuda")
    width, steps, k = 4096, 24, 3  # the GPU runs behind the host: hooks' host time cannot show
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    x = torch.randn(1024, width, device=dev)
    _train(model, opt, x, 2)
    torch.cuda.synchronize()
    ev: list = []  # per step: {phase: (start event, end event)}

    def mark() -> torch.cuda.Event:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None, device_every=k) as mon:
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                f0 = mark()
                out = model(x)
                f1 = mark()
                loss = out.square().mean()
                b0 = mark()
                loss.backward()
                b1 = mark()
                o0 = mark()
                opt.step()
                o1 = mark()
                opt.zero_grad()
                ev.append({"forward": (f0, f1), "backward": (b0, b1), "optimizer": (o0, o1)})
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    rep = mon.report()
    ring = mon.recent_steps()
    timed = [i for i, r in enumerate(ring) if r["device_timed"]]
    assert timed == list(range(0, steps, k))
    assert rep["device_steps"] == len(timed) and rep["dropped_device_samples"] == 0
    for phase in ("forward", "backward", "optimizer"):
        hand = sum(ev[i][phase][0].elapsed_time(ev[i][phase][1]) for i in timed) / 1e3
        got = rep["phases"][phase]["device"]["total"]
        print(f"{phase:10s} monitor {got * 1e3:9.3f} ms   hand events (same {len(timed)} steps) "
              f"{hand * 1e3:9.3f} ms   ratio {got / hand:.4f}")
        assert got == pytest.approx(hand, rel=0.05), phase
        assert rep["phases"][phase]["device"]["count"] == len(timed)


@cuda
@needs_gpu
def test_cuda_gpu_bound_step_keeps_every_step_device_timed():
    # A planted 20 ms kernel per step; the loop waits for the step before the last (as a bounded
    # prefetch or a logged loss would), so the host's step time is the GPU's: GPU-bound.
    dev = torch.device("cuda")
    model, opt, x = _mlp(dev)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)  # spin first: an idle GPU's clock ramps up during the first ms
    a.record()
    torch.cuda._sleep(10_000_000)
    b.record()
    b.synchronize()
    cycles = int(10_000_000 * 20.0 / a.elapsed_time(b))  # 20 ms of spinning
    steps = 80
    done: list = []
    with stepscope.Monitor(model, opt, warmup_steps=2, device_every="auto") as mon:
        for _ in range(steps):
            torch.cuda._sleep(cycles)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            e = torch.cuda.Event()
            e.record()
            done.append(e)
            if len(done) >= 2:
                done[-2].synchronize()
    torch.cuda.synchronize()
    rep = mon.report()
    step_p50 = rep["phases"]["step"]["host"]["p50"]
    print(f"host step p50 {step_p50 * 1e3:.2f} ms, device_every {rep['device_every']}, "
          f"record cost {rep['event_record_cost'] * 1e6:.2f} us, device steps {rep['device_steps']}")
    assert step_p50 > 5e-3  # the premise: the step is GPU-bound at several ms
    assert rep["device_every"] == 1
    assert rep["device_steps"] == steps - 2
