"""Exports: the Perfetto trace, save/load, CSV, the PNG dashboard, TensorBoard, the live line, the CLI.

Small CPU models and a few steps each. The trace is checked against the trace-event format's
rules independently of how it was written (a stack check of every track); CSV rows against the
ring's own start/end times.
"""

import csv
import gzip
import json
import time
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import stepscope
import torch
from stepscope import _C, export

PARTITION = ("data", "forward", "loss", "backward", "other", "optimizer")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(stepscope.__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(hidden: int = 16) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))


def _train(mon_kwargs: dict | None = None, steps: int = 12, user_phase: bool = True, model=None):
    torch.manual_seed(0)
    model = model if model is not None else _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    mon = stepscope.Monitor(model, opt, **(mon_kwargs or {}))
    with mon:
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if user_phase:
                with mon.phase("clip"):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    return mon


def _nvtx_color(name: str) -> str:
    p = _C.nvtx.Phase.__members__[name]
    return "#%06X" % (_C.nvtx.phase_color(p) & 0xFFFFFF)


# ------------------------------------------------------------------------------------ the trace
def _read_trace(path) -> dict:
    raw = open(path, "rb").read()
    if str(path).endswith(".gz"):
        assert raw[:2] == b"\x1f\x8b"
        raw = gzip.decompress(raw)
    assert raw.startswith(b'{"traceEvents"'), raw[:40]  # Perfetto sniffs the first bytes
    obj = json.loads(raw)
    assert list(obj)[0] == "traceEvents"
    return obj


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_trace(obj: dict) -> list:
    """Strict checks of the Chrome trace-event rules the exporter promises; returns the X events."""
    evs = obj["traceEvents"]
    assert isinstance(evs, list) and evs
    xs, named_pids, named_tids, used_pids, used_tids = [], set(), set(), set(), set()
    for e in evs:
        assert e["ph"] in ("X", "C", "M"), e
        assert isinstance(e["pid"], int)
        used_pids.add(e["pid"])
        if e["ph"] == "X":
            for k in ("name", "ph", "ts", "dur", "pid", "tid"):
                assert k in e, (k, e)
            assert isinstance(e["name"], str) and e["name"]
            assert _is_num(e["ts"]) and _is_num(e["dur"]) and e["dur"] >= 0, e
            assert isinstance(e["tid"], int)
            used_tids.add((e["pid"], e["tid"]))
            xs.append(e)
        elif e["ph"] == "C":
            assert _is_num(e["ts"]) and e["args"], e
            assert all(_is_num(v) for v in e["args"].values()), e
        else:
            if e["name"] == "process_name":
                named_pids.add(e["pid"])
            elif e["name"] == "thread_name":
                named_tids.add((e["pid"], e["tid"]))
            assert isinstance(e["args"]["name" if e["name"].endswith("_name") else "sort_index"], (str, int))
    assert used_pids <= named_pids, used_pids - named_pids
    assert used_tids <= named_tids, used_tids - named_tids
    # Nesting per (pid, tid): sorted by start (longer first), each event either starts at or after
    # the enclosing one's end, or ends inside it. 1 ns of slack for the µs float representation.
    eps = 1e-3
    tracks: dict = {}
    for e in xs:
        tracks.setdefault((e["pid"], e["tid"]), []).append(e)
    for key, es in tracks.items():
        stack: list = []
        for e in sorted(es, key=lambda e: (e["ts"], -e["dur"])):
            end = e["ts"] + e["dur"]
            while stack and stack[-1] <= e["ts"] + eps:
                stack.pop()
            assert not stack or end <= stack[-1] + eps, f"{e} overlaps its parent on {key} without nesting"
            stack.append(end)
    return xs


def _inside(e: dict, outer: dict) -> bool:
    return outer["ts"] - 1e-3 <= e["ts"] and e["ts"] + e["dur"] <= outer["ts"] + outer["dur"] + 1e-3


@pytest.mark.parametrize("suffix", [".trace.json", ".trace.json.gz"])
def test_trace_is_valid_and_complete(tmp_path, suffix):
    path = tmp_path / ("run" + suffix)
    ring = 8
    mon = _train({"ring": ring, "per_module": True, "per_module_every": 2, "trace": path}, steps=13)
    assert path.exists()  # written at detach by Monitor(trace=...)
    obj = _read_trace(path)
    xs = validate_trace(obj)
    recent = mon.recent_steps()
    assert len(recent) == ring
    steps = [e for e in xs if e.get("cat") == "step"]
    assert [e["args"]["step"] for e in steps] == [r["step"] for r in recent] == list(range(13 - ring, 13))
    assert [e["name"] for e in steps] == [f"step {r['step']}" for r in recent]
    assert {e["tid"] for e in steps} != {e["tid"] for e in xs if e.get("cat") == "phase"}
    assert all(e["args"]["color"] == _nvtx_color("step") for e in steps)
    phases = [e for e in xs if e.get("cat") == "phase"]
    for s in steps:
        mine = [e for e in phases if e["args"]["step"] == s["args"]["step"]]
        assert [e["name"] for e in sorted(mine, key=lambda e: e["ts"])] == list(PARTITION)
        assert all(_inside(e, s) for e in mine)
    for e in phases:
        assert e["args"]["color"] == _nvtx_color(e["name"]), e
    # User phases nest under "other" (clip runs between backward and the optimizer); module spans
    # under "forward", on the sampled steps only (per_module_every=2), three submodules each.
    users = [e for e in xs if e.get("cat") == "user"]
    assert len(users) == ring and all(e["name"] == "clip" and e["args"]["color"] == _nvtx_color("user")
                                      for e in users)
    for u in users:
        parent = [p for p in phases if p["tid"] == u["tid"] and _inside(u, p)]
        assert [p["name"] for p in parent] == ["other"]
    mods = [e for e in xs if e.get("cat") == "module"]
    sampled = [r["step"] for r in recent if r["module_spans"]]
    assert sampled == [s for s in range(13 - ring, 13) if s % 2 == 0]
    assert len(mods) == 3 * len(sampled)
    assert {e["name"] for e in mods} == {"0", "1", "2"}
    for m in mods:
        assert m["args"]["color"] == _nvtx_color("module")
        parent = [p for p in phases if p["tid"] == m["tid"] and _inside(m, p)]
        assert [p["name"] for p in parent] == ["forward"]
    counters = [e for e in obj["traceEvents"] if e["ph"] == "C"]
    sps = [e for e in counters if e["name"] == "samples/s"]
    assert len(sps) == ring
    for e, r in zip(sps, recent):
        assert e["args"]["samples/s"] == pytest.approx(16 / sum(r["host"].values()))


def test_trace_moves_straddling_spans_to_another_track():
    # A user phase across a phase boundary cannot nest under one phase: it goes to its own track.
    mon = _train(user_phase=False, steps=2)
    data = export.run_data(mon)
    r = data["recent_steps"][-1]
    fwd = next(s for s in r["spans"] if s[0] == "forward")
    loss = next(s for s in r["spans"] if s[0] == "loss")
    r["user_spans"] = [["straddle", fwd[1], loss[2]]]
    xs = validate_trace(export.trace_events(data))
    (u,) = [e for e in xs if e["name"] == "straddle"]
    assert u["tid"] not in {e["tid"] for e in xs if e.get("cat") == "phase"}


def _python_run_data(mon) -> dict:
    """``mon``'s run data with its ring from the Python walk of ``mon.recent_steps()`` (not the C++ text)."""
    from stepscope import _files

    data = export.run_data(mon)
    keys = stepscope.run._SPAN_KEYS
    data["recent_steps"] = [_files._finite({**r, **{k: [list(s) for s in r.get(k, ())] for k in keys}})
                            for r in mon.recent_steps()]
    return data


def _python_trace(mon) -> dict:
    """The trace the Python writer builds from the Python walk of ``mon.recent_steps()``."""
    from stepscope.export import trace

    return trace._trace_events(_python_run_data(mon))


def test_monitor_trace_written_in_cpp_equals_the_python_writer(tmp_path, monkeypatch):
    # A Monitor's trace is written by the Timeline in C++ (csrc/timing/ring_json.h); the Python writer
    # (stepscope.export.trace._trace_events, which writes every saved run's trace) is its reference,
    # fed here by the Python walk of recent_steps(). The loop has what the events depend on: user
    # phases with awkward names, one that straddles a boundary (an overflow track), per-module spans,
    # the loss, health and MFU counters, and the rank as pid.
    from stepscope.export import trace

    monkeypatch.setattr(stepscope.run, "_rank", lambda: 2)
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = stepscope.Monitor(model, opt, ring=16, per_module=True, per_module_every=2, peak_flops=1e12)
    with mon:
        for i in range(24):
            x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
            with mon.phase('say "hi"\\ \u00e9\u4e2d\n\t'):
                x = x * 1.0
            with mon.phase("straddle"):  # opens before the forward, closes inside the loss
                out = model(x)
                loss = torch.nn.functional.cross_entropy(out, y)
            mon.observe(loss if i != 5 else loss * float("nan"))
            loss.backward()
            opt.step()
            opt.zero_grad()
    want = _python_trace(mon)
    got = export.trace_events(mon)
    assert got["traceEvents"] == want["traceEvents"]
    assert got["otherData"] == want["otherData"] and got["displayTimeUnit"] == "ms"
    names = {e["name"] for e in got["traceEvents"]}
    assert {"mfu", "loss", "grad_norm", "samples/s", 'say "hi"\\ \u00e9\u4e2d\n\t'} <= names
    assert {e["tid"] for e in validate_trace(got)} > {trace._TID_STEPS, trace._TID_HOST}  # an overflow track
    mon.export_trace(tmp_path / "t.json.gz")
    assert _read_trace(tmp_path / "t.json.gz")["traceEvents"] == want["traceEvents"]


def _csv_loop(mon, model, opt, steps, observe, device="cpu"):
    with mon:
        for i in range(steps):
            x = torch.randint(0, 50, (16, 8), device=device)  # [B, T] integers: tokens per sample
            y = torch.randint(0, 4, (16,), device=device)
            with mon.phase("user"):
                out = model(x)
                loss = torch.nn.functional.cross_entropy(out.mean(1), y)
            if observe(i):
                mon.observe(loss if i % 7 else loss * float("nan"))
            loss.backward()
            opt.step()
            opt.zero_grad()


def _csv_model(device="cpu"):
    return torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 4)).to(device)


@pytest.mark.parametrize("case", ["all", "no_loss", "no_health", "no_throughput"])
def test_monitor_csv_written_in_cpp_equals_the_python_writer(tmp_path, case):
    # A Monitor's CSV is written by the Timeline in C++ (csrc/timing/ring_csv.cpp); the Python writer
    # (csv_rows, which writes every saved run's CSV) is its reference, fed by the Python walk of
    # recent_steps(). Cases: the optional columns (loss, some NaN, some steps without one; mfu;
    # tokens_per_s) present or absent, health off (grad_norm empty), a ring that wrapped.
    torch.manual_seed(0)
    model = _csv_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kw = {"no_health": {"health": False}, "no_throughput": {"flops": None}}.get(case, {"peak_flops": 1e12})
    mon = stepscope.Monitor(model, opt, ring=16, **kw)
    quiet = case in ("no_loss", "no_health")
    _csv_loop(mon, model, opt, 40, (lambda i: False) if quiet else (lambda i: i % 3 != 1))
    want = tmp_path / "py.csv"
    export.write_csv(_python_run_data(mon), want)
    mon.to_csv(tmp_path / "cpp.csv")
    got = (tmp_path / "cpp.csv").read_text()
    assert got == want.read_text()
    head = got.splitlines()[0].split(",")
    rows = list(csv.DictReader(got.splitlines()))
    assert len(rows) == 16 and rows[-1]["step"] == "39"
    assert ("loss" in head) == (case not in ("no_loss", "no_health"))
    assert ("mfu" in head) == ("tokens_per_s" in head) == (case != "no_throughput")
    if case == "all":
        assert [r["loss"] for r in rows if int(r["step"]) % 3 == 1] == [""] * 5  # not observed
        assert [r["loss"] for r in rows if int(r["step"]) % 7 == 0] == [""] * 2  # NaN
        assert all(float(r["mfu"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)
    if case == "no_health":
        assert {r["grad_norm"] for r in rows} == {""}


@pytest.mark.cuda
def test_cuda_csv_written_in_cpp_equals_the_python_writer(tmp_path):
    # The device columns (every partition span resolved) and the memory columns on CUDA.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    model = _csv_model("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = stepscope.Monitor(model, opt, ring=16, device_every=1)
    _csv_loop(mon, model, opt, 24, lambda i: True, device="cuda")
    torch.cuda.synchronize()
    mon.report()  # resolves the device spans
    want = tmp_path / "py.csv"
    export.write_csv(_python_run_data(mon), want)
    mon.to_csv(tmp_path / "cpp.csv")
    assert (tmp_path / "cpp.csv").read_text() == want.read_text()
    rows = list(csv.DictReader(open(tmp_path / "cpp.csv")))
    assert rows[-1]["forward_device_s"] != "" and int(rows[-1]["memory_allocated"]) > 0


def test_trace_pid_is_the_rank(tmp_path, monkeypatch):
    monkeypatch.setattr(stepscope.run, "_rank", lambda: 3)  # the run data (stepscope.run) holds the rank
    mon = _train(steps=2)
    xs = validate_trace(export.trace_events(mon))
    assert {e["pid"] for e in xs} == {3}


def test_ring_keeps_the_partition_with_many_modules():
    # 70 submodules: their spans must not push the step's own phases out of the record.
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), *[torch.nn.Identity() for _ in range(68)],
                                torch.nn.Linear(8, 4))
    mon = _train({"per_module": True, "per_module_every": 1}, steps=2, user_phase=False, model=model)
    r = mon.recent_steps()[-1]
    assert [s[0] for s in r["spans"]] == list(PARTITION)
    assert len(r["module_spans"]) + len(r["spans"]) <= 64
    assert r["truncated_spans"] == 70 - len(r["module_spans"])


# ---------------------------------------------------------------------------------- save / load
def _finding() -> dict:
    return {"rule": "input_bound", "severity": "warn", "title": "input-bound: data wait is 41% of the step",
            "evidence": {"share": 0.41}, "advice": "use more DataLoader workers", "saving": 0.3}


@pytest.mark.parametrize("name", ["run.json", "run.json.gz"])
def test_save_load_gives_the_same_summary(tmp_path, name):
    mon = _train({"per_module": True}, steps=6)
    mon.diagnose = lambda: [_finding()]  # the shape Monitor.diagnose() returns
    path = tmp_path / name
    mon.save(path)
    run = stepscope.load(path)
    assert run.summary() == mon.summary()
    assert run.report() == json.loads(json.dumps(mon.report()))
    assert run.diagnose() == [_finding()]
    assert [r["step"] for r in run.recent_steps()] == [r["step"] for r in mon.recent_steps()]
    assert run.data["versions"]["torch"] == torch.__version__
    assert run.data["build_info"] == stepscope.build_info()
    # A trace from the saved run is the Monitor's trace.
    assert export.trace_events(run) == export.trace_events(mon)


def test_save_without_diagnose(tmp_path):
    mon = _train(steps=2)
    if hasattr(mon, "diagnose"):
        pytest.skip("this Monitor has diagnose()")
    mon.save(tmp_path / "r.json")
    assert stepscope.load(tmp_path / "r.json").diagnose() == []


def _write(p, obj) -> str:
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def _bad_files(tmp_path) -> dict:
    good = json.loads(json.dumps(export.run_data(_train(steps=2))))
    newer = dict(good, schema=export.SCHEMA_VERSION + 1)
    return {
        "missing": str(tmp_path / "nope.json"),
        "not json": _write(tmp_path / "a.json", "hello, not json"),
        "foreign": _write(tmp_path / "b.json", {"some": "thing"}),
        "a trace": _write(tmp_path / "c.json", {"traceEvents": []}),
        "newer": _write(tmp_path / "d.json", newer),
        "no schema": _write(tmp_path / "e.json", {"format": export.FORMAT}),
        "damaged": _write(tmp_path / "f.json", {"format": export.FORMAT, "schema": 1}),
    }


def test_load_refuses_bad_files(tmp_path):
    bad = _bad_files(tmp_path)
    with pytest.raises(FileNotFoundError):
        stepscope.load(bad.pop("missing"))
    expect = {"not json": "not JSON", "foreign": "not a stepscope run", "a trace": "Chrome trace",
              "newer": "newer stepscope", "no schema": "no valid schema", "damaged": "missing report"}
    for what, path in bad.items():
        with pytest.raises(ValueError, match=expect[what]) as e:
            stepscope.load(path)
        assert str(e.value).startswith("stepscope: ")


def test_a_cut_short_run_file_is_called_damaged(tmp_path):
    # A plain JSON run cut short (a full disk, an interrupted copy) used to read "not JSON".
    mon = _train(steps=4)
    whole = tmp_path / "run.json"
    mon.save(whole)
    text = whole.read_bytes()
    for cut in (*range(1, len(text), 97), len(text) - 1):  # ends inside strings, numbers, literals
        part = tmp_path / f"cut{cut}.json"
        part.write_bytes(text[:cut])
        with pytest.raises(ValueError, match=f"is damaged: its JSON stops after {cut} bytes"):
            stepscope.load(part)
    (tmp_path / "junk.json").write_bytes(b"{\"format\": 1} trailing")
    with pytest.raises(ValueError, match="not JSON"):  # not cut short: wrong
        stepscope.load(tmp_path / "junk.json")


def test_load_never_unpickles(tmp_path):
    import pickle

    p = tmp_path / "run.json"
    p.write_bytes(pickle.dumps({"format": export.FORMAT}))
    with pytest.raises(ValueError, match="not JSON"):
        stepscope.load(p)


def test_writes_are_atomic(tmp_path, monkeypatch):
    mon = _train(steps=2)
    path = tmp_path / "run.json"
    path.write_text("old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    for write in (mon.save, mon.export_trace, mon.to_csv):
        with pytest.raises(OSError, match="disk full"):
            write(path)
        assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["run.json"]  # no temporary file left behind


def test_export_needs_a_recorded_monitor(tmp_path):
    mon = stepscope.Monitor(_model())
    with pytest.raises(RuntimeError, match="attach the Monitor first"):
        mon.save(tmp_path / "r.json")
    with pytest.raises(TypeError, match="expected a Monitor"):
        export.save(42, tmp_path / "r.json")


def test_monitor_argument_checks():
    with pytest.raises(ValueError, match="print_every"):
        stepscope.Monitor(_model(), print_every=-1)
    with pytest.raises(TypeError, match="trace must be a path"):
        stepscope.Monitor(_model(), trace=3)


# ------------------------------------------------------------------------------------------ CSV
def test_csv_one_row_per_ring_step(tmp_path):
    mon = _train({"ring": 5}, steps=9)
    path = tmp_path / "steps.csv"
    mon.to_csv(path)
    rows = list(csv.DictReader(open(path)))
    recent = mon.recent_steps()
    assert [int(r["step"]) for r in rows] == [r["step"] for r in recent] == [4, 5, 6, 7, 8]
    for row, r in zip(rows, recent):
        phases = sum(float(row[f"{p}_s"]) for p in PARTITION)
        assert abs(phases - float(row["step_s"])) < 1e-6
        # No eval forward in these steps: the phases fill the step from its start to its end.
        assert abs(phases - (float(row["end_s"]) - float(row["start_s"]))) < 1e-6
        assert float(row["start_s"]) == round(r["t0"], 9) and int(row["samples"]) == 16  # to the ns
        assert row["memory_allocated"] == ""  # CPU: no CUDA memory counters


# ------------------------------------------------------------------------------------------ PNG
def test_png_from_a_saved_run_without_torch(tmp_path):
    pytest.importorskip("matplotlib")
    mon = _train({"per_module": True}, steps=20)
    mon.diagnose = lambda: [_finding(), dict(_finding(), severity="info", title="a second finding")]
    saved, png = tmp_path / "run.json.gz", tmp_path / "run.png"
    mon.save(saved)
    # The package's __init__ imports torch; a bare package object reaches stepscope.export without it.
    code = textwrap.dedent(f"""
        import sys, types
        sys.modules["torch"] = None          # any "import torch" now raises ImportError
        pkg = types.ModuleType("stepscope")
        pkg.__path__ = [{os.path.join(PKG_PARENT, "stepscope")!r}]
        sys.modules["stepscope"] = pkg
        from stepscope import export
        export.plot(export.load({str(saved)!r}), {str(png)!r})
        assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.shape[:2] == (800, 1200)
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_plot_without_matplotlib_says_how(tmp_path, monkeypatch):
    mon = _train(steps=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"stepscope\[plot\]"):
        stepscope.plot(mon, tmp_path / "x.png")


# ---------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator
    from torch.utils.tensorboard import SummaryWriter

    mon = _train(steps=6)
    metrics = stepscope.ClassificationMetrics("multiclass", num_classes=4, top_k=(1, 2))
    metrics.update(torch.randn(32, 4), torch.randint(0, 4, (32,)))
    computed = metrics.compute()
    w = SummaryWriter(log_dir=str(tmp_path))
    stepscope.log_tensorboard(w, mon, 7, metrics=computed)
    w.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rep = mon.report()
    for p in PARTITION:
        (ev,) = acc.Scalars(f"stepscope/{p}/p50_ms")
        assert ev.step == 7 and ev.value == pytest.approx(rep["phases"][p]["host"]["p50"] * 1e3, rel=1e-6)
        (ev,) = acc.Scalars(f"stepscope/{p}/share")
        assert ev.value == pytest.approx(rep["phases"][p]["share_host"], rel=1e-6)
    (ev,) = acc.Scalars("stepscope/samples_per_s")
    assert ev.value == pytest.approx(rep["samples_per_s"], rel=1e-6)
    (ev,) = acc.Scalars("metrics/accuracy")
    assert ev.value == pytest.approx(float(computed["accuracy"]), rel=1e-6)
    scalars = {k for k, v in computed.items() if v.numel() == 1}
    assert {f"metrics/{k}" for k in scalars} <= tags
    assert not any(t.startswith("metrics/") and t[8:] not in scalars for t in tags)
    assert "stepscope/memory/allocated_mib" not in tags  # CPU


# ------------------------------------------------------------------------------------ live line
def test_print_every_logs_every_n_steps(caplog):
    with caplog.at_level(logging.INFO, logger="stepscope"):
        _train({"print_every": 3, "warmup_steps": 0}, steps=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "stepscope"]
    assert [ln.split(" | ")[0] for ln in lines] == [f"stepscope step {n}" for n in (3, 6, 9)]
    assert all("p50 step" in ln and "largest" in ln and "samples/s" in ln for ln in lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stepscope"):
        _train({"print_every": 2}, steps=5)  # the default 3 warm-up steps
    lines = [r.getMessage() for r in caplog.records if r.name == "stepscope"]
    assert lines[0] == "stepscope step 2 | warm-up"
    assert lines[1].startswith("stepscope step 4 | p50 step")


def test_step_hooks_call_python_only_every_nth_step():
    calls = []
    tl = _C.Timeline(nvtx=False)
    hk = _C.step_hooks(tl, optimizers=1, on_step_end=calls.append, print_every=4)
    opt = object()
    for _ in range(10):
        tl.forward_begin()
        tl.forward_end()
        hk.optimizer_pre(opt, (), {})
        hk.optimizer_post(opt, (), {})
    assert tl.steps == 10 and len(calls) == 2  # steps 4 and 8
    # A second set of hooks on the same Timeline keeps the rhythm of the step count.
    hk2 = _C.step_hooks(tl, optimizers=1, on_step_end=calls.append, print_every=4)
    for _ in range(2):
        tl.forward_begin()
        tl.forward_end()
        hk2.optimizer_pre(opt, (), {})
        hk2.optimizer_post(opt, (), {})
    assert len(calls) == 3  # step 12
    with pytest.raises(ValueError, match="print_every"):
        _C.step_hooks(tl, print_every=-1)


# ------------------------------------------------------------------------------------------ CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "stepscope", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_report(tmp_path):
    mon = _train(steps=6)
    mon.diagnose = lambda: [_finding()]
    saved = tmp_path / "run.json"
    mon.save(saved)
    png, trace = tmp_path / "out.png", tmp_path / "out.json.gz"
    args = ["report", str(saved), "--trace", str(trace)]
    if export_has_matplotlib():
        args += ["--png", str(png)]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert mon.summary() in r.stdout
    assert "What to fix first:" in r.stdout
    assert "[warn] input-bound: data wait is 41% of the step" in r.stdout
    assert "use more DataLoader workers" in r.stdout
    validate_trace(_read_trace(trace))
    assert png.exists() == export_has_matplotlib()


def test_cli_help(capsys):
    from stepscope.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--png" in out and "--trace" in out and "Monitor.save()" in out


def export_has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_bad_files_one_line_no_traceback(tmp_path, capsys):
    from stepscope.__main__ import main

    bad = _bad_files(tmp_path)
    for what, path in bad.items():  # in-process: an escaping exception would fail the test
        assert main(["report", path]) == 2, what
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1 and lines[0].startswith("stepscope: "), (what, err)
    good = json.loads(open(_write(tmp_path / "g.json", export.run_data(_train(steps=2)))).read())
    good["report"] = {"steps": 2}
    assert main(["report", _write(tmp_path / "h.json", good)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("stepscope: ") and "damaged" in err and len(err.strip().splitlines()) == 1
    # One real process (each costs a torch import): exit status and stderr as a shell sees them.
    for path in (bad["missing"], bad["newer"]):
        r = _cli("report", path)
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("stepscope: "), r.stderr


# ----------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_exports_make_no_host_sync_while_training(tmp_path):
    model = _model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8, device="cuda"), torch.randint(0, 4, (16,), device="cuda")
    mon = stepscope.Monitor(model, opt, print_every=2, trace=tmp_path / "t.json.gz", per_module=True)
    with mon:
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(6):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                if i == 3:
                    mon.to_csv(tmp_path / "s.csv")
                    mon.save(tmp_path / "r.json")
                    mon.export_trace(tmp_path / "mid.json")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    obj = _read_trace(tmp_path / "t.json.gz")
    validate_trace(obj)
    assert any(e["ph"] == "C" and e["name"] == "CUDA memory" for e in obj["traceEvents"])
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert rows and all(int(r["memory_allocated"]) > 0 for r in rows)
    # Once the GPU is done, every partition span of the ring has its device interval, and the
    # device track follows the host one by the queue lag (never before it).
    torch.cuda.synchronize()
    mon.report()  # resolves what completed
    ring = mon.recent_steps()
    assert all(len(r["device_spans"]) == len(r["spans"]) for r in ring)
    for r in ring:
        for (n, a, b), (m, c, d) in zip(r["spans"], r["device_spans"]):
            assert n == m and c >= a - 1e-6 and d >= b - 1e-6 and d >= c
    dev = [e for e in validate_trace(export.trace_events(mon)) if e["tid"] == export._TID_DEVICE]
    assert len(dev) == sum(len(r["spans"]) for r in ring)


# ---------------------------------------------------------------------------------------- merge
def test_merge_traces_one_process_per_rank_on_one_time_axis(tmp_path):
    paths = []
    mons = []
    for k in range(2):
        mon = _train(steps=4)
        mons.append(mon)
        p = tmp_path / f"rank{k}.json.gz"
        mon.export_trace(p)
        paths.append(p)
        time.sleep(0.01)
    out = tmp_path / "all.json.gz"
    r = _cli("merge", *map(str, paths), "-o", str(out))
    assert r.returncode == 0, r.stderr
    merged = _read_trace(out)
    xs = validate_trace(merged)  # still nests per (pid, tid), metadata names every pid/tid
    singles = [_read_trace(p) for p in paths]
    assert {e["pid"] for e in xs} == {0, 1}  # both were written as pid 0 (no torch.distributed)
    assert len(merged["traceEvents"]) == sum(len(t["traceEvents"]) for t in singles)
    # Rank 1's Monitor started later: its events move right by the difference of the starts.
    shift = (mons[1]._origin_unix_ns - mons[0]._origin_unix_ns) / 1e3
    assert shift > 10_000
    first = {pid: min(e["ts"] for e in xs if e["pid"] == pid and e["name"].startswith("step ")) for pid in (0, 1)}
    own = [min(e["ts"] for e in t["traceEvents"] if e.get("ph") == "X" and e["name"].startswith("step "))
           for t in singles]
    assert first[0] == pytest.approx(own[0]) and first[1] == pytest.approx(own[1] + shift)


def test_merge_refuses_what_is_not_a_stepscope_trace(tmp_path):
    foreign = tmp_path / "x.json"
    foreign.write_text(json.dumps({"traceEvents": []}))
    for bad in (foreign, tmp_path / "missing.json"):
        r = _cli("merge", str(bad), "-o", str(tmp_path / "o.json"))
        assert r.returncode == 2 and r.stderr.startswith("stepscope: ") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


def test_device_track_from_resolved_spans(tmp_path):
    # CUDA runs carry device_spans in the ring (the partition as the GPU ran it, on the host clock).
    # Crafted here from a CPU run: each span shifted by a queue lag, one placement 3 us early so
    # that it overlaps its neighbour (a clamped boundary), one step not resolved yet.
    mon = _train(steps=6)
    data = export.run_data(mon)
    for k, r in enumerate(data["recent_steps"][:-1]):
        lag = 0.0005 + 0.0001 * k
        r["device_spans"] = [[name, a + lag - (3e-6 if i == 2 else 0.0), b + lag]
                             for i, (name, a, b) in enumerate(r["spans"])]
    run = export.SavedRun(data)
    obj = export.trace_events(run)
    xs = validate_trace(obj)  # nests per track, every tid named
    dev = [e for e in xs if e["tid"] == export._TID_DEVICE]
    resolved = data["recent_steps"][:-1]
    assert len(dev) == sum(len(r["spans"]) for r in resolved)
    assert {e["cat"] for e in dev} == {"device"}
    assert all(e["args"]["color"] == _nvtx_color(e["name"]) for e in dev)
    first = min(dev, key=lambda e: e["ts"])
    assert first["ts"] == pytest.approx(resolved[0]["spans"][0][1] * 1e6 + 500, abs=0.01)
    names = {e["args"]["name"] for e in obj["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name" and e.get("tid") == export._TID_DEVICE}
    assert names == {"device phases (CUDA, on the host clock)"}
    rows = export.csv_rows(run)
    head = rows[0]
    for r, row in zip(data["recent_steps"], rows[1:]):
        cells = [row[head.index(f"{p}_device_s")] for p in PARTITION]
        if not r.get("device_spans"):
            assert cells == [""] * len(PARTITION)
            continue
        want = {p: sum(b - a for n, a, b in r["device_spans"] if n == p) for p in PARTITION}
        assert cells == pytest.approx([want[p] for p in PARTITION], abs=1e-12)
    if export_has_matplotlib():  # the dashboard draws the device bars beside the host ones
        from PIL import Image

        export.plot(run, tmp_path / "dev.png")
        assert Image.open(tmp_path / "dev.png").size == (1200, 800)
    # A CPU run has no device track and empty device columns.
    plain = export.trace_events(mon)
    assert not [e for e in plain["traceEvents"] if e.get("tid") == export._TID_DEVICE]


@pytest.mark.cuda
def test_cuda_trace_written_in_cpp_equals_the_python_writer():
    # The device track and the CUDA memory counters of the C++ writer against the Python one.
    model = _model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8, device="cuda"), torch.randint(0, 4, (16,), device="cuda")
    mon = stepscope.Monitor(model, opt, per_module=True, device_every=1)
    with mon:
        for _ in range(8):
            with mon.phase("clip"):
                x = x * 1.0
            loss = torch.nn.functional.cross_entropy(model(x), y)
            mon.observe(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    torch.cuda.synchronize()
    mon.report()  # resolves every span
    got, want = export.trace_events(mon), _python_trace(mon)
    assert got["traceEvents"] == want["traceEvents"]
    assert any(e.get("tid") == export._TID_DEVICE for e in got["traceEvents"])
    assert any(e["name"] == "CUDA memory" for e in got["traceEvents"])
    assert stepscope.run.run_data(mon)["recent_steps"] == [
        stepscope._files._finite({**r, **{k: [list(s) for s in r[k]] for k in stepscope.run._SPAN_KEYS}})
        for r in mon.recent_steps()]
