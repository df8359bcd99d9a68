"""Interval statistics (Monitor.snapshot / report(since=) / reset), per-module eval timing, the
whole evaluation stretch, and the `ring` argument.

Timings are planted sleeps (planted.py): a sleep is a lower bound on what is measured, and the
upper bounds used here are the other interval's plant, several times larger, which a loaded
machine does not reach at the median.
"""

import pytest
import torch

import stepscope
from planted import sleep


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    assert (first["steps"], second["steps"], whole["steps"]) == (8, 6, 14)
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
    with stepscope.Monitor(model, opt, warmup_steps=0) as mon:
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
    with stepscope.Monitor(model, opt, warmup_steps=0) as mon:
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
    mon = stepscope.Monitor(model, opt, warmup_steps=0)
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
