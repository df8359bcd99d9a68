"""Reading a run: without torch and without the extension (the run carries its phase table), the
report built once per call, and the phase table as the one source of boundary and phase names.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import stepscope
import torch
from stepscope import _C, diagnose, distributed, monitor, report, run
from test_files import _train  # a small model trained a few steps under a Monitor

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(stepscope.__file__)))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------- without torch or _C
def _without_torch(code: str) -> subprocess.CompletedProcess:
    # torch and the extension blocked: any "import torch" or "import stepscope._C" raises ImportError.
    head = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        sys.modules["stepscope._C"] = None
        sys.path.insert(0, {PKG_PARENT!r})
    """)
    return subprocess.run([sys.executable, "-c", head + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=180)


def test_a_saved_run_is_read_summarised_diagnosed_and_exported_without_torch_or_the_extension(tmp_path):
    mon = _train(per_module=True)
    saved = tmp_path / "run.json.gz"
    mon.save(saved)
    want_summary = stepscope.load(saved).summary()
    plots = _has_matplotlib()
    r = _without_torch(f"""
        import stepscope.run, stepscope.report, stepscope.export, stepscope.diagnose
        import stepscope
        run = stepscope.load({str(saved)!r})
        text = run.summary()
        assert text == {want_summary!r}, text
        findings = run.diagnose()
        # The rules themselves, on the saved report with the saved table (no saved diagnosis).
        del run.data["diagnosis"]
        assert stepscope.diagnose.diagnose(run.report(), phases=run.phase_table) == run.diagnose()
        stepscope.export.write_csv(run, {str(tmp_path / "steps.csv")!r})
        stepscope.export.write_trace(run, {str(tmp_path / "run.trace.json")!r})
        stepscope.export.html(run, {str(tmp_path / "run.html")!r})  # the HTML report and compare too
        same = stepscope.compare(run, run)
        assert same["verdict"] and not any(v["beyond_noise"] for v in same["phases"].values())
        if {plots!r}:
            stepscope.plot(run, {str(tmp_path / "run.png")!r})
        print(stepscope.report.live_line(run.report(), phases=run.phase_table))
        loaded = [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
        assert "torch" not in loaded, "torch was imported"
        assert "stepscope._C" not in sys.modules or sys.modules["stepscope._C"] is None
        for name in ("Monitor", "_C"):
            try:
                getattr(stepscope, name)
            except ImportError as e:
                assert "needs torch" in str(e), e
            else:
                raise AssertionError(name + " without torch")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("stepscope step 8 | p50 step"), r.stdout
    assert "What to fix first" in (tmp_path / "run.html").read_text()
    rows = (tmp_path / "steps.csv").read_text().splitlines()
    assert rows[0].startswith("step,start_s,end_s,step_s,samples,data_s,forward_s") and len(rows) == 9
    assert export_trace_equal(tmp_path / "run.trace.json", stepscope.export.trace_events(stepscope.load(saved)))
    if plots:
        assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def export_trace_equal(path, want: dict) -> bool:
    return json.loads(open(path).read()) == json.loads(json.dumps(want))


def test_the_command_line_reads_a_run_without_torch(tmp_path):
    saved = tmp_path / "run.json"
    _train().save(saved)
    r = _without_torch(f"""
        from stepscope.__main__ import main
        sys.exit(main(["report", {str(saved)!r}, "--trace", {str(tmp_path / "t.json.gz")!r}]))
    """)
    assert r.returncode == 0, r.stderr
    assert "What to fix first" in r.stdout and (tmp_path / "t.json.gz").exists()


def test_an_older_run_without_a_table_says_what_it_needs(tmp_path):
    data = json.loads(json.dumps(run.run_data(_train())))
    del data["phase_table"]
    data["schema"] = 2
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    # With the extension, the extension's table reads it.
    assert "What to fix first" in stepscope.load(old).summary()
    r = _without_torch(f"""
        import stepscope
        saved = stepscope.load({str(old)!r})
        saved.report()                  # the numbers need no table
        try:
            saved.summary()
        except ImportError as e:
            print(e)
        else:
            raise AssertionError("summarised without a phase table")
    """)
    assert r.returncode == 0, r.stderr
    assert "schema 2" in r.stdout and "phase table" in r.stdout and "stepscope._C" in r.stdout


# ------------------------------------------------------------------------- the saved phase table
def test_every_run_file_saves_the_phase_table(tmp_path):
    saved = tmp_path / "run.json"
    _train().save(saved)
    data = json.loads(saved.read_text())
    assert data["schema"] == run.SCHEMA_VERSION == 3
    assert data["phase_table"] == [dict(p) for p in _C.PHASES]
    assert stepscope.load(saved).phase_table == tuple(dict(p) for p in _C.PHASES)


@pytest.mark.parametrize("table", [[], "x", [{"name": "data"}], [dict(_C.PHASES[0], opens=3)]])
def test_a_damaged_phase_table_is_refused(tmp_path, table):
    data = json.loads(json.dumps(run.run_data(_train(steps=2))))
    data["phase_table"] = table
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="phase_table"):
        stepscope.load(bad)


def test_a_saved_table_is_the_one_read():
    # A run's own table decides its rows, not the extension's: a table whose partition differs
    # (as a future stepscope's might) gives that partition's rows.
    data = json.loads(json.dumps(run.run_data(_train(steps=4))))
    table = [dict(p, partition=p["partition"] and p["name"] != "other") for p in data["phase_table"]]
    text = report.format_summary(data["report"], phases=table)
    assert "\nother " not in text and "\nloss " in text
    assert "other_s" not in stepscope.export.csv_rows(dict(data, phase_table=table))[0]


# ------------------------------------------------------------------------- the report built once
class _CountingTimeline:
    """The Monitor's Timeline, counting its report() calls."""

    def __init__(self, tl):
        self._tl = tl
        self.reports = 0

    def report(self, *args, **kwargs):
        self.reports += 1
        return self._tl.report(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tl, name)


def _spied(mon: stepscope.Monitor) -> _CountingTimeline:
    spy = mon._tl = _CountingTimeline(mon._tl)
    return spy


@pytest.mark.parametrize("call", ["summary", "save", "diagnose", "report", "summary_since"])
def test_the_report_is_built_once_per_call(tmp_path, call):
    mon = _train()
    spy = _spied(mon)
    if call == "save":
        mon.save(tmp_path / "run.json")
    elif call == "summary_since":
        mon.summary(since=mon.snapshot())
    else:
        getattr(mon, call)()
    assert spy.reports == 1, call


def test_summary_diagnoses_the_report_it_prints():
    mon = _train(per_module=True, per_module_every=1)
    for top in (1, 10):
        rep = mon.report(top_modules=top)
        assert mon.summary(top_modules=top) == report.format_summary(rep, findings=diagnose.diagnose(rep))


def test_a_saved_diagnosis_is_that_of_the_saved_report(tmp_path):
    mon = _train()
    mon.save(tmp_path / "run.json")
    saved = stepscope.load(tmp_path / "run.json")
    assert saved.diagnose() == json.loads(json.dumps(diagnose.diagnose(saved.report())))


# ------------------------------------------------------------------------- one source of names
def test_boundary_names_come_from_the_phase_table():
    part = [p for p in _C.PHASES if p["partition"]]
    assert diagnose.PHASE_BOUNDS == {p["name"]: (p["opens"], p["closes"]) for p in part}
    assert report.boundaries() == _C.BOUNDARIES
    assert monitor.MARKS[:len(_C.BOUNDARIES)] == _C.BOUNDARIES
    assert monitor.MARKS[len(_C.BOUNDARIES):] == ("step", "eval_begin", "eval_end")
    assert report.PARTITION == tuple(p["name"] for p in part)
    assert report.PHASES == tuple(_C.PHASES)


def test_every_mark_reaches_its_boundary():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
        for _ in range(3):
            for name in monitor.MARKS[:len(_C.BOUNDARIES)]:
                mon.mark(name, batch=4 if name == "forward_begin" else None)
    rep = mon.report()
    assert rep["steps"] == 3 and rep["samples"] == 12
    assert all(rep["phases"][k]["host"]["count"] == 3 for k in report.PARTITION if k != "data")


def test_the_straggler_rule_has_one_definition():
    assert distributed.straggler_findings is diagnose.rule_straggler
    per = [{"rank": r, "count": {k: 10 for k in (*report.PARTITION, "step")},
            "p50": {k: (0.05 if r == 1 and k == "data" else 0.01) for k in (*report.PARTITION, "step")},
            "device_p50": None} for r in range(3)]
    for p in per:
        p["p50"]["step"] = sum(p["p50"][k] for k in report.PARTITION)
    (f,) = diagnose.rule_straggler({"ranks": {"world_size": 3, "per_rank": per}})
    assert f == diagnose.finding(f["rule"], f["severity"], f["title"], f["evidence"], f["advice"], f["saving"])
    assert f["rule"] == "straggler" and f["evidence"]["rank"] == 1 and "data" in f["title"]
