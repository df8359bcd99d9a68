"""Interval statistics (Monitor.snapshot / report(since=) / reset), per-module eval timing, the
whole evaluation stretch, and the `ring` argument.

Timings are planted sleeps (planted.py): a sleep is a lower bound on what is measured; the upper
bounds are the other interval's plant, 100 times larger (a loaded machine stretched 2 ms sleeps
to 15 ms, not to 100), or a window measured around the timed code.
"""

import time

import pytest
import torch

import stepscope
from planted import sleep


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Sleepy(torch.nn.Module):
    """A forward that sleeps `fwd` seconds (changed between intervals)."""

    def __init__(self, fwd: float) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.fwd = fwd

    def forward(self, x):
        sleep(self.fwd)
        return self.lin(x)


def train_steps(model, opt, n, batch=8):
    for _ in range(n):
        x = torch.randn(batch, 4)
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()


SHORT, LONG = 0.001, 0.100  # two plants far apart: a loaded machine stretches the short one, not 100x


def test_each_interval_reports_its_own_plant_and_cumulative_stays():
    model = Sleepy(SHORT)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with stepscope.Monitor(model, opt, warmup_steps=2) as mon:
        start = mon.snapshot()
        train_steps(model, opt, 10)  # 2 warm-up + 8 steady steps of short forwards
        first = mon.report(since=start)
        snap = mon.snapshot()
        model.fwd = LONG
        train_steps(model, opt, 6)
        second = mon.report(since=snap)
        whole = mon.report()
        assert mon.report(since=start)["phases"] == whole["phases"]  # since the start: the whole run
    assert (first["steps"], second["steps"], whole["steps"]) == (10, 6, 16)  # warm-up included
    assert (first["steady_steps"], second["steady_steps"], whole["steady_steps"]) == (8, 6, 14)
    assert second["phases"]["forward"]["host"]["count"] == 6
    assert second["phases"]["step"]["host"]["count"] == 6
    assert second["samples"] == 6 * 8
    assert second["warmup"]["steps"] == 0  # warm-up steps never count in a later interval
    p50_1 = first["phases"]["forward"]["host"]["p50"]
    p50_2 = second["phases"]["forward"]["host"]["p50"]
    p50_all = whole["phases"]["forward"]["host"]["p50"]
    assert SHORT <= p50_1 < LONG, p50_1
    assert p50_2 >= LONG, p50_2
    # Cumulative figures stay available: 8 short and 6 long forwards.
    assert whole["phases"]["forward"]["host"]["count"] == 14
    assert SHORT <= p50_all < LONG and whole["phases"]["forward"]["host"]["p99"] >= LONG
    assert 0 < second["phases"]["forward"]["share_host"] <= 1
    assert second["samples_per_s"] < first["samples_per_s"]


def test_interval_of_two_snapshots_both_alive():
    model = Sleepy(SHORT)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        train_steps(model, opt, 4)
        a = mon.snapshot()
        model.fwd = LONG
        train_steps(model, opt, 3)
        b = mon.snapshot()
        model.fwd = SHORT
        train_steps(model, opt, 5)
        since_a, since_b = mon.report(since=a), mon.report(since=b)
    assert since_a["steps"] == 8 and since_b["steps"] == 5
    # The 3 long steps are exactly what a holds and b does not.
    fa, fb = since_a["phases"]["forward"]["host"], since_b["phases"]["forward"]["host"]
    assert fa["count"] - fb["count"] == 3
    assert fa["total"] - fb["total"] >= 3 * LONG
    assert SHORT <= fb["p50"] < LONG
    assert fa["max"] >= LONG  # renewed in the interval: exact


def test_summary_and_diagnose_since():
    model = Sleepy(0.001)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        train_steps(model, opt, 3)
        snap = mon.snapshot()
        train_steps(model, opt, 2)
        text = mon.summary(since=snap)
        findings = mon.diagnose(since=snap)
    assert "steps 2" in text and "steps 5" not in text
    assert isinstance(findings, list)
    assert "steps 5" in mon.summary()


def test_since_is_checked():
    model = Sleepy(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    other = stepscope.Monitor(Sleepy(0.0))
    with stepscope.Monitor(model, opt) as mon:
        train_steps(model, opt, 1)
        with pytest.raises(TypeError, match="since must be a Monitor.snapshot"):
            mon.report(since=3)
        with pytest.raises(ValueError, match="another Monitor"):
            mon.report(since=other.snapshot())
        with pytest.raises(ValueError, match="gather"):
            mon.report(since=mon.snapshot(), gather=True)


def test_snapshot_before_attach_is_the_start():
    model = Sleepy(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = stepscope.Monitor(model, opt, warmup_steps=0, flops=None)
    snap = mon.snapshot()
    with mon:
        train_steps(model, opt, 3)
    assert mon.report(since=snap)["steps"] == 3
    assert repr(snap) == "<stepscope.Snapshot (start)>"


def test_reset_forgets_statistics_and_keeps_the_hooks():
    model = Sleepy(LONG)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with stepscope.Monitor(model, opt, warmup_steps=1) as mon:
        before = mon.snapshot()
        train_steps(model, opt, 4)
        with mon.phase("clip"):
            pass
        mon.reset()
        rep = mon.report()
        assert rep["steps"] == 0 and mon.steps == 0
        assert all(v["host"]["count"] == 0 for v in rep["phases"].values())
        assert rep["user"]["clip"]["host"]["count"] == 0
        assert rep["warmup"]["steps"] == 0
        assert mon.recent_steps() == []
        model.fwd = SHORT
        train_steps(model, opt, 3)  # still timed: the hooks stayed
        rep = mon.report()
        assert mon.attached
    assert rep["steps"] == 3 and mon.steps == 3
    fwd = rep["phases"]["forward"]["host"]
    assert fwd["count"] == 3 and SHORT <= fwd["p50"] < LONG
    assert len(mon.recent_steps()) == 3
    # A snapshot from before the reset: the figures since the reset.
    assert mon.report(since=before)["phases"]["forward"] == rep["phases"]["forward"]


# ---- per-module timing counts training forwards only (eval forwards are kept apart)

class TwoSpeed(torch.nn.Module):
    """A submodule that sleeps 1 ms in training and 10 ms in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x):
        sleep(0.001 if self.training and torch.is_grad_enabled() else 0.010)
        return self.lin(x)


def test_per_module_timing_leaves_eval_forwards_out():
    model = torch.nn.Sequential(TwoSpeed())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with stepscope.Monitor(model, opt, per_module=True, per_module_every=1, warmup_steps=0, flops=None) as mon:
        for _ in range(5):
            train_steps(model, opt, 1)
            model.eval()
            with torch.no_grad():
                model(torch.randn(8, 4))  # an eval forward inside a sampled step
            model.train()
    mod = mon.report()["modules"]["0"]["host"]
    assert mod["count"] == 5, mod  # the training forwards only (10 with the eval ones mixed in)
    assert mod["mean"] >= 0.001
    assert mon.report()["phases"]["eval_forward"]["host"]["count"] == 5


# ---- the whole evaluation stretch is accounted for

def test_eval_stretch_covers_the_time_between_eval_forwards():
    model = Sleepy(0.001)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        train_steps(model, opt, 2)
        for _ in range(2):  # two validation passes, each between training steps
            model.eval()
            with torch.no_grad():
                for _ in range(4):
                    sleep(0.005)  # validation data loading and metrics: in no eval forward
                    model(torch.randn(8, 4))
            model.train()
            train_steps(model, opt, 2)
    rep = mon.report()
    ev, fwd = rep["phases"]["eval"]["host"], rep["phases"]["eval_forward"]["host"]
    assert fwd["count"] == 8 and ev["count"] == 2
    # From the first eval forward to the next training boundary: the eval forwards and the three
    # gaps between them in each pass (the gap before the first forward is the step's data).
    assert ev["total"] >= fwd["total"] + 2 * 3 * 0.005, (ev, fwd)
    assert ev["min"] >= 3 * 0.005 + 4 * 0.001
    text = mon.summary()
    assert "\neval " in text and "eval_forward" in text


def test_eval_stretch_at_detach_ends_at_the_last_eval_forward():
    model = Sleepy(0.001)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        train_steps(model, opt, 2)
        with torch.no_grad():
            t0 = time.perf_counter()
            model(torch.randn(8, 4))
            sleep(0.004)
            model(torch.randn(8, 4))
            window = time.perf_counter() - t0  # the stretch lies inside this window
        sleep(0.050)  # after the evaluation, before detach: no evaluation time
    ev = mon.report()["phases"]["eval"]["host"]
    assert ev["count"] == 1
    assert 0.004 + 2 * 0.001 <= ev["total"] <= window


# ---- ring: checked where it enters, with a ceiling

@pytest.mark.parametrize("bad, exc", [(2.5, TypeError), ("256", TypeError), (True, TypeError), (None, TypeError),
                                      (0, ValueError), (-3, ValueError), (2**63, ValueError), (10**7, ValueError)])
def test_ring_is_checked_at_construction(bad, exc):
    with pytest.raises(exc, match=r"ring must be an int from 1 to"):
        stepscope.Monitor(Sleepy(0.0), ring=bad)


def test_ring_ceiling_is_accepted_and_the_timeline_checks_too():
    from stepscope import _C

    assert _C.MAX_RING * _C.RING_SLOT_BYTES <= 256 * 2**20  # the documented ceiling stays affordable
    model = Sleepy(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with stepscope.Monitor(model, opt, ring=_C.MAX_RING, warmup_steps=0, flops=None) as mon:
        train_steps(model, opt, 2)
    assert len(mon.recent_steps()) == 2
    with pytest.raises(ValueError, match="ring must be an int from 1 to"):
        _C.Timeline(ring=_C.MAX_RING + 1)
    with pytest.raises(ValueError, match="ring must be an int from 1 to"):
        _C.Timeline(ring=0)
