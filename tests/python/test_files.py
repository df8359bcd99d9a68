"""Files from anyone: load() and the command line on hostile input (bombs, FIFOs, devices, deep
nesting, huge numbers, wrong types), writes that fail or are killed, and what the files and
lines a person reads look like (CSV cells, units, hints)."""

import csv
import gzip
import importlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
import stepscope
import torch
from stepscope import export
from stepscope.__main__ import main
from stepscope.report import format_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(stepscope.__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(steps: int = 8, **kw) -> stepscope.Monitor:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    with stepscope.Monitor(model, opt, **kw) as mon:
        for _ in range(steps):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return mon


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stepscope: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------- hostile reads
def test_gzip_bomb_stops_at_the_cap_without_inflating(tmp_path, capsys):
    bomb = tmp_path / "bomb.json.gz"
    chunk = b"\0" * 2**20
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        for _ in range(256):  # 256 MiB of zeros in about 250 KB, written without holding them
            f.write(chunk)
    assert bomb.stat().st_size < 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ValueError, match="more than 1048576 bytes once decompressed") as e:
        stepscope.load(bomb, max_bytes=2**20)
    assert str(bomb) in str(e.value)
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"peak RSS grew by {grew_mib:.1f} MiB reading a 256 MiB bomb with a 1 MiB cap")
    assert grew_mib < 64
    line = _one_line_error(capsys, ["report", str(bomb), "--max-bytes", "1048576"])
    assert "more than" in line and str(bomb) in line
    # A plain (not gzip'd) file over the cap is refused the same way.
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 4096)
    with pytest.raises(ValueError, match="more than 100 bytes, the most"):
        stepscope.load(big, max_bytes=100)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "1", True])
def test_max_bytes_is_checked(tmp_path, bad):
    with pytest.raises(ValueError, match="max_bytes must be an int >= 1"):
        stepscope.load(tmp_path / "x.json", max_bytes=bad)


def test_cli_max_bytes_is_checked(capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "run.json", "--max-bytes", "lots"])
    assert e.value.code == 2 and "expected a whole number of bytes" in capsys.readouterr().err


def test_devices_and_fifos_are_refused_at_once(tmp_path, capsys):
    fifo = tmp_path / "run.fifo"
    os.mkfifo(fifo)
    done: list = []

    def read_fifo():  # a FIFO nobody writes: opening it for reading would block forever
        try:
            stepscope.load(fifo)
        except ValueError as e:
            done.append(str(e))

    t = threading.Thread(target=read_fifo, daemon=True)
    t.start()
    t.join(20)
    assert done and "is a FIFO" in done[0] and str(fifo) in done[0], "load() of a FIFO did not return"
    for dev in ("/dev/zero", "/dev/null"):
        with pytest.raises(ValueError, match="is a device"):
            stepscope.load(dev)
        assert "is a device" in _one_line_error(capsys, ["report", dev])
    with pytest.raises(ValueError, match="is a FIFO"):
        export.read_trace(fifo)


def test_a_folder_is_named_as_a_folder(tmp_path, capsys):
    # Linux opens a folder read-only; fdopen then failed with EISDIR named by the descriptor.
    folder = tmp_path / "runs"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as e:
        stepscope.load(folder)
    assert str(e.value) == f"stepscope: {folder} is a folder, not a stepscope run file"
    assert _one_line_error(capsys, ["report", str(folder)]) == str(e.value)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        export.read_trace(folder)


def test_cli_report_into_a_closed_pipe_still_writes_its_files(tmp_path):
    # `python -m stepscope report run.json --html r.html | head -1`: the reader leaves after one line.
    run = tmp_path / "run.json"
    _train(steps=6).save(run)
    html, trace = tmp_path / "r.html", tmp_path / "t.json.gz"
    cmd = f"{sys.executable} -m stepscope report {run} --html {html} --trace {trace} | head -1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Broken pipe" not in r.stderr and html.stat().st_size > 0 and trace.stat().st_size > 0


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path, capsys):
    for depth in (200000, 40):
        p = tmp_path / f"deep{depth}.json"
        p.write_text("[" * depth + "]" * depth)
        with pytest.raises(ValueError, match="nested deeper than 32 levels"):
            stepscope.load(p)
        assert "nested deeper" in _one_line_error(capsys, ["report", str(p)])
    ok = tmp_path / "shallow.json"
    ok.write_text("[" * 20 + "]" * 20)
    with pytest.raises(ValueError, match="not a stepscope run"):  # parsed, then refused as foreign
        stepscope.load(ok)


@pytest.mark.parametrize("number", ["1e999", "-1e999", "NaN", "Infinity", "1e300", "1" + "0" * 400])
def test_numbers_out_of_range_are_refused_on_load(tmp_path, capsys, number):
    mon = _train(steps=6)
    good = tmp_path / "good.json"
    mon.save(good)
    text = good.read_text()
    key = '"t0":'
    i = text.index(key) + len(key)
    j = i
    while text[j] not in ",}":
        j += 1
    bad = tmp_path / "bad.json"
    bad.write_text(text[:i] + number + text[j:])
    with pytest.raises(ValueError) as e:
        stepscope.load(bad)
    assert str(e.value).startswith(f"stepscope: {bad}")
    _one_line_error(capsys, ["report", str(bad), "--trace", str(tmp_path / "t.json")])
    assert not (tmp_path / "t.json").exists()


def _mutations(rng: random.Random):
    return [1e300, -1e300, 2**70, -(2**70), "12", "x", None, [], {}, True, -1, 0, 1e-300, 3.5, [1, 2, 3],
            {"a": 1}, 2**62, -0.0][rng.randrange(18)]


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def test_cli_survives_field_mutations(tmp_path, capsys, base_seed):
    """Every mutated run file gives exit 0 or 2 with one line, never a traceback."""
    rng = random.Random(base_seed)
    mon = _train(steps=10, per_module=True)
    data = json.loads(json.dumps(export.run_data(mon)))
    paths = [p for p in _paths(data) if p[0] in ("report", "recent_steps", "nvtx_colors", "diagnosis")]
    matplotlib = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = False
    counts = {0: 0, 2: 0}
    for case in range(160):
        d = json.loads(json.dumps(data))
        path = paths[rng.randrange(len(paths))]
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = _mutations(rng)
        f = tmp_path / "m.json"
        f.write_text(json.dumps(d))
        argv = ["report", str(f), "--trace", str(tmp_path / "m.trace.json")]
        if matplotlib and case % 8 == 0:
            argv += ["--png", str(tmp_path / "m.png")]
        try:
            rc = main(argv)
        except BaseException as e:  # an escaping exception is the defect
            pytest.fail(f"seed {base_seed} case {case}: {path} -> {node[path[-1]]!r}: {type(e).__name__}: {e}")
        out, err = capsys.readouterr()
        assert rc in (0, 2), (base_seed, case, path)
        if rc == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("stepscope: "), (base_seed, case, path, err)
        else:
            assert err == "", (base_seed, case, path, err)  # no matplotlib warnings either
        counts[rc] += 1
    print(f"160 mutations: {counts[0]} read fine, {counts[2]} refused in one line")
    assert counts[2] > 0


def test_damaged_value_inside_the_summary_names_the_file(tmp_path, capsys):
    mon = _train(steps=6)
    data = json.loads(json.dumps(export.run_data(mon)))
    data["report"]["phases"]["step"]["host"]["p50"] = "fast"
    f = tmp_path / "typed.json"
    f.write_text(json.dumps(data))
    line = _one_line_error(capsys, ["report", str(f)])
    assert str(f) in line and "damaged" in line and "p50" in line


# -------------------------------------------------------------------------------------- writes
def test_write_errors_name_the_target(tmp_path, capsys):
    mon = _train(steps=4)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    for write in (mon.save, mon.export_trace, mon.to_csv):
        with pytest.raises(OSError) as e:
            write(folder)
        assert str(e.value) == f"stepscope: cannot write {folder}: it is a folder"
        with pytest.raises(OSError) as e:
            write(tmp_path / "no" / "such" / "run.json")
        msg = str(e.value)
        assert msg.startswith(f"stepscope: cannot write {tmp_path / 'no' / 'such' / 'run.json'}") and ".tmp" not in msg
    assert sorted(os.listdir(folder)) == []
    saved = tmp_path / "run.json"
    mon.save(saved)
    line = _one_line_error(capsys, ["report", str(saved), "--trace", str(folder)])
    assert line == f"stepscope: cannot write {folder}: it is a folder"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_the_target_are_removed(tmp_path):
    target = tmp_path / "run.json"
    dead = tmp_path / f".run.json.stepscope-{_dead_pid()}-abc123.tmp"
    old = tmp_path / f".run.json.stepscope-{os.getppid()}-old000.tmp"
    live = tmp_path / f".run.json.stepscope-{os.getppid()}-live00.tmp"  # a writer still running
    other = tmp_path / f".other.json.stepscope-{_dead_pid()}-xyz999.tmp"  # another target's
    for p in (dead, old, live, other):
        p.write_bytes(b"partial")
    hour_ago = time.time() - 2 * 3600
    os.utime(old, (hour_ago, hour_ago))
    _train(steps=3).save(target)
    left = sorted(os.listdir(tmp_path))
    assert left == sorted(["run.json", live.name, other.name]), left


def test_kill_9_mid_write_leaves_nothing_after_the_next_write(tmp_path):
    target = tmp_path / "run.json"
    child = textwrap_dedent(f"""
        import os, sys, time
        sys.path.insert(0, {PKG_PARENT!r})
        from stepscope import export
        os.fsync = lambda fd: time.sleep(120)  # stuck in the middle of the write
        export._atomic_write({str(target)!r}, b"x" * 2**20)
    """)
    p = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.time() + 60
        while not any(n.endswith(".tmp") for n in os.listdir(tmp_path)):
            assert time.time() < deadline and p.poll() is None, "the writer never started"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    tmp = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(tmp) == 1 and tmp[0].startswith(".run.json.stepscope-")  # what kill -9 leaves
    _train(steps=3).save(target)
    assert os.listdir(tmp_path) == ["run.json"]
    assert stepscope.load(target).steps >= 0


def textwrap_dedent(s: str) -> str:
    import textwrap

    return textwrap.dedent(s)


# ------------------------------------------------------------------------- what a person reads
def test_csv_seconds_are_written_to_the_nanosecond(tmp_path):
    mon = _train(steps=20)
    path = tmp_path / "steps.csv"
    mon.to_csv(path)
    rows = list(csv.reader(open(path)))
    head, body = rows[0], rows[1:]
    recent = mon.recent_steps()
    cells = 0
    for row, r in zip(body, recent):
        for name, cell in zip(head, row):
            if name.endswith("_s") and cell:
                cells += 1
                decimals = cell.split(".")[1] if "." in cell else ""
                assert "e" not in cell and len(decimals) <= 9, (name, cell)
        assert float(row[head.index("start_s")]) == round(r["t0"], 9)
        assert float(row[head.index("forward_s")]) == round(r["host"]["forward"], 9)
    assert cells > 20 * 6


def test_format_seconds_picks_the_unit_by_size():
    assert format_seconds(3.2e-6) == "3.20 us"
    assert format_seconds(850e-6) == "850 us"
    assert format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(0.4567) == "457 ms"
    assert format_seconds(4.561) == "4.56 s"
    assert format_seconds(600) == "10.0 min"
    assert format_seconds(9000) == "2.5 h"


def test_warmup_lines_use_a_readable_unit():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 8)
    with stepscope.Monitor(model, opt, warmup_steps=2) as mon:
        for i in range(12):
            model(x).sum().backward()
            if i < 2:
                time.sleep(0.02)  # a warm-up step 20 ms long: far above the steady ones
            opt.step()
            opt.zero_grad()
    text = mon.summary()
    line = next(l for l in text.splitlines() if l.startswith("warm-up:"))
    assert " ms, kept out" in line and "0.0" not in line.split(",")[1], line
    warm = [f for f in mon.diagnose() if f["rule"] == "warmup"]
    assert warm and " ms, " in warm[0]["title"] and "0.04 s" not in warm[0]["title"], warm


def test_dashboard_names_the_file_to_read_the_rest_in(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    mon = _train(steps=6)
    many = [dict(rule=f"r{i}", severity="info", title=f"finding number {i} " + "word " * 30, evidence={},
                 advice="advice " * 20, saving=None) for i in range(6)]
    mon.diagnose = lambda: many
    saved = tmp_path / "myrun.json"
    mon.save(saved)
    seen: list = []
    dashboard = importlib.import_module("stepscope.export.png")  # the PNG dashboard's module
    real = dashboard._plot_diagnosis

    def spy(fig, diagnosis, more):
        seen.append(more)
        real(fig, diagnosis, more)
        seen.append("\n".join(t.get_text() for t in fig.texts))

    monkeypatch.setattr(dashboard, "_plot_diagnosis", spy)
    export.plot(stepscope.load(saved), tmp_path / "a.png")
    assert seen[0] == f"python -m stepscope report {saved}"
    assert f"more: python -m stepscope report {saved})" in seen[1] and "RUN.json" not in seen[1]
    export.plot(mon, tmp_path / "b.png")
    assert "RUN.json" not in seen[3] and "more: Monitor.summary()" in seen[3]


def test_every_optional_extra_is_one_the_docs_tell_users_to_install():
    import tomllib

    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    text = open(os.path.join(ROOT, "README.md")).read()
    for folder, _, files in os.walk(os.path.join(ROOT, "python", "stepscope")):
        text += "".join(open(os.path.join(folder, n)).read() for n in files if n.endswith(".py"))
    unused = [e for e in extras if e != "test" and f"stepscope[{e}]" not in text]
    assert not unused, f"extras that nothing asks a user to install: {unused}"


def test_demo_writes_the_run_file_it_names(tmp_path):
    env = dict(os.environ, PYTHONPATH=PKG_PARENT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_classifier.py"), "--device", "cpu"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "python -m stepscope report stepscope_demo.json" in r.stdout
    assert (tmp_path / "stepscope_demo.json").exists()
    html = (tmp_path / "stepscope_demo.html").read_text()  # the demo's HTML report, where it says
    assert str(tmp_path / "stepscope_demo.html") in r.stdout and "What to fix first" in html and "accuracy" in html
    rep = subprocess.run([sys.executable, "-m", "stepscope", "report", "stepscope_demo.json"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and "What to fix first" in rep.stdout, rep.stderr


def test_steps_means_every_step_and_steady_steps_the_counted_ones(tmp_path):
    mon = _train(steps=10, warmup_steps=3)
    rep = mon.report()
    assert mon.steps == rep["steps"] == 10 and rep["steady_steps"] == 7
    assert rep["phases"]["step"]["host"]["count"] == 7 and rep["warmup"]["steps"] == 3
    assert "steps 10 (7 after warm-up)" in mon.summary()
    saved = tmp_path / "run.json"
    mon.save(saved)
    assert stepscope.load(saved).steps == 10
    # A schema-1 file (steps were the steady ones) reads with today's meaning.
    data = json.loads(saved.read_text())
    data["schema"] = 1
    data["report"]["steps"] = 7
    del data["report"]["steady_steps"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    run = stepscope.load(old)
    assert run.steps == 10 and run.report()["steady_steps"] == 7


def test_ring_written_in_cpp_equals_the_python_walk_of_recent_steps(tmp_path):
    # The ring of the run data (and of a saved file) is the Timeline's own JSON (csrc/timing/ring_json.h):
    # it must be what the Python walk of recent_steps() gives, value for value, with every number
    # read back as the same float, and a non-finite value written as null.
    import math

    from stepscope import _files, run

    mon = _train(steps=12, per_module=True, per_module_every=2)
    data = run.run_data(mon)
    slow = [_files._finite({**r, **{k: [list(s) for s in r.get(k, ())] for k in run._SPAN_KEYS}})
            for r in mon.recent_steps()]
    assert data["recent_steps"] == slow
    assert any(r["module_spans"] for r in slow)
    for a, b in zip(data["recent_steps"], slow):  # floats stay floats (1.0, not 1)
        assert [type(v) for v in a["host"].values()] == [type(v) for v in b["host"].values()]
        assert type(a["t0"]) is float and type(a["step"]) is int
    mon.save(tmp_path / "r.json")
    assert stepscope.load(tmp_path / "r.json").recent_steps() == slow
    step = slow[3]["step"]
    ring = json.loads(mon._tl.ring_json([(step, math.nan), (step + 1, 2.5), (step + 1, 4.0)],
                                        [(step, math.inf)]))
    by_step = {r["step"]: r for r in ring}
    assert by_step[step]["grad_norm"] is None and by_step[step]["loss"] is None
    assert by_step[step + 1]["grad_norm"] == 4.0  # a step listed twice takes its later value
    assert by_step[step + 2]["grad_norm"] is None


def test_gc_is_paused_while_files_are_built_and_restored_after(tmp_path):
    import gc

    from stepscope import _files

    mon = _train(steps=4)
    seen = []
    real = _files.json.dumps

    def spy(*a, **k):
        seen.append(gc.isenabled())
        return real(*a, **k)

    _files.json.dumps = spy
    try:
        mon.save(tmp_path / "r.json.gz")
        with pytest.raises(ValueError):
            _files._encode({"x": float("nan")}, tmp_path / "bad.json")  # raises inside the pause
    finally:
        _files.json.dumps = real
    assert seen == [False, False] and gc.isenabled()
    gc.disable()
    try:
        with _files._gc_paused():
            pass
        assert not gc.isenabled()  # a caller's own setting is kept
    finally:
        gc.enable()
    assert stepscope.load(tmp_path / "r.json.gz").steps == 4
    # gzip's header says the level: XFL 0 for the default 6 (2 would be level 9, 4 level 1).
    assert (tmp_path / "r.json.gz").read_bytes()[8] == 0
