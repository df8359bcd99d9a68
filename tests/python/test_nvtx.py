"""NVTX ranges as a tool sees them.

Each case runs a Python snippet in a subprocess with NVTX_INJECTION64_PATH naming the test
injection library (tests/nvtx_inject, built by CMake), which writes one line per NVTX call to
STEPSCOPE_NVTX_LOG; the case then asserts the exact recorded sequence. A subprocess per case,
because NVTX reads NVTX_INJECTION64_PATH once, at a process's first NVTX call.
"""

from __future__ import annotations

import glob
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import stepscope

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG_PARENT = pathlib.Path(stepscope.__file__).resolve().parents[1]
_nv = stepscope._C.nvtx
Phase = _nv.Phase

RANGE_EVENTS = {"DomainRangePushEx", "DomainRangePop", "DomainRangeStartEx", "DomainRangeEnd", "DomainMarkEx"}


def _find_injection() -> str | None:
    env = os.environ.get("STEPSCOPE_NVTX_INJECT")
    if env:
        return env
    hits = sorted(
        glob.glob(str(ROOT / "build*" / "**" / "libstepscope_nvtx_inject.so"), recursive=True),
        key=os.path.getmtime,
        reverse=True,
    )
    return hits[0] if hits else None


INJECT = _find_injection()
needs_tool = pytest.mark.skipif(
    not _nv.compiled_in() or INJECT is None,
    reason="needs NVTX compiled in and the test injection library "
    "(cmake --build build; or set STEPSCOPE_NVTX_INJECT)",
)


class Event(dict):
    name: str

    def brief(self) -> str:
        short = {"DomainRangePushEx": "Push", "DomainRangePop": "Pop", "DomainRangeStartEx": "Start",
                 "DomainRangeEnd": "End", "DomainMarkEx": "Mark"}[self.name]
        if self.name in ("DomainRangePop", "DomainRangeEnd"):
            return short
        s = f"{short} {self['msg']}"
        if self.get("payload", "-") != "-":
            s += f" #{self['payload']}"
        return s


def parse(path: pathlib.Path) -> list[Event]:
    events = []
    if not path.exists():
        return events
    for line in path.read_text().splitlines():
        name, *fields = line.split("\t")
        e = Event(f.split("=", 1) for f in fields if "=" in f)
        e.name = name
        events.append(e)
    return events


def run_traced(code: str, tmp_path: pathlib.Path, tool: bool = True) -> tuple[list[Event], str]:
    """Runs ``code`` in a fresh interpreter under the injection library; returns every logged
    event and the process's stdout. The snippet failing fails the test with its stderr."""
    log = tmp_path / "nvtx.log"
    if log.exists():
        log.unlink()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PKG_PARENT), env.get("PYTHONPATH", "")])
    env.pop("NVTX_INJECTION64_PATH", None)
    if tool:
        env["NVTX_INJECTION64_PATH"] = INJECT
        env["STEPSCOPE_NVTX_LOG"] = str(log)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"snippet failed ({proc.returncode}):\n{proc.stderr}"
    return parse(log), proc.stdout


def ranges(events: list[Event]) -> list[Event]:
    return [e for e in events if e.name in RANGE_EVENTS and e.get("domain") == "stepscope"]


def style(phase) -> tuple[str, str]:
    return f"0x{_nv.phase_color(phase):08X}", str(_nv.phase_category(phase))


def assert_balanced(events: list[Event]) -> None:
    """Push/pop nest and balance per thread; every start/end range is ended exactly once."""
    stacks: dict[str, list[str]] = {}
    open_ids: dict[str, str] = {}
    for e in ranges(events):
        st = stacks.setdefault(e["tid"], [])
        if e.name == "DomainRangePushEx":
            st.append(e["msg"])
        elif e.name == "DomainRangePop":
            assert st, f"pop with nothing pushed on thread {e['tid']}"
            st.pop()
        elif e.name == "DomainRangeStartEx":
            assert e["id"] not in open_ids
            open_ids[e["id"]] = e["msg"]
        elif e.name == "DomainRangeEnd":
            assert e["id"] in open_ids, f"end of unknown range id {e['id']}"
            del open_ids[e["id"]]
    assert all(not st for st in stacks.values()), f"push/pop ranges left open: {stacks}"
    assert not open_ids, f"start/end ranges left open: {open_ids}"


# ---------------------------------------------------------------- stepscope.nvtx


@needs_tool
def test_domain_and_categories(tmp_path):
    events, _ = run_traced("import stepscope; stepscope.nvtx.mark('hello')", tmp_path)
    creates = [e for e in events if e.name == "DomainCreateA" and e["domain"] == "stepscope"]
    assert len(creates) == 1
    categories = {e["category"]: e["name"] for e in events
                  if e.name == "DomainNameCategoryA" and e["domain"] == "stepscope"}
    strings = {e["string"] for e in events
               if e.name == "DomainRegisterStringA" and e["domain"] == "stepscope"}
    for name, phase in Phase.__members__.items():
        assert categories[str(_nv.phase_category(phase))] == name
        assert name in strings
    assert [e.brief() for e in ranges(events)] == ["Mark hello"]


@needs_tool
def test_range_context_manager_and_mark(tmp_path):
    events, out = run_traced(
        """
        import stepscope
        nvtx = stepscope.nvtx
        print(nvtx.enabled(), nvtx.tool_attached())
        with nvtx.range("outer"):
            nvtx.mark("inside")
            with nvtx.range("inner", color="#00FF00"):
                pass
            with nvtx.range("argb", color=0x80123456):
                pass
        """,
        tmp_path,
    )
    assert out.split() == ["True", "True"]
    ev = ranges(events)
    assert [e.brief() for e in ev] == [
        "Push outer", "Mark inside", "Push inner", "Pop", "Push argb", "Pop", "Pop"]
    assert all(e["domain"] == "stepscope" for e in ev)
    user_color, user_cat = style(Phase.user)
    outer, mark, inner, _, argb = ev[:5]
    assert (outer["color"], outer["category"], outer["msgtype"]) == (user_color, user_cat, "registered")
    assert (mark["color"], mark["category"]) == (user_color, user_cat)
    assert (inner["color"], inner["category"]) == ("0xFF00FF00", user_cat)
    assert argb["color"] == "0x80123456"
    assert len({e["tid"] for e in ev}) == 1
    assert_balanced(events)


@needs_tool
def test_decorator(tmp_path):
    events, out = run_traced(
        """
        import stepscope

        @stepscope.nvtx.range("work")
        def work(x):
            '''doc kept'''
            with stepscope.nvtx.range("step inside"):
                return x + 1

        print(work(1), work(41), work.__name__, work.__doc__)
        """,
        tmp_path,
    )
    assert out.split() == ["2", "42", "work", "doc", "kept"]
    assert [e.brief() for e in ranges(events)] == ["Push work", "Push step inside", "Pop", "Pop"] * 2
    assert_balanced(events)


@needs_tool
def test_exception_inside_range_still_closes_it(tmp_path):
    events, out = run_traced(
        """
        import stepscope
        nvtx = stepscope.nvtx

        @nvtx.range("decorated")
        def fails():
            raise KeyError("x")

        try:
            with nvtx.range("block"):
                with nvtx.range("nested"):
                    raise ValueError("boom")
        except ValueError:
            print("caught")
        try:
            fails()
        except KeyError:
            print("caught")
        with nvtx.range("after"):
            pass
        """,
        tmp_path,
    )
    assert out.split() == ["caught", "caught"]
    assert [e.brief() for e in ranges(events)] == [
        "Push block", "Push nested", "Pop", "Pop", "Push decorated", "Pop", "Push after", "Pop"]
    assert_balanced(events)


@needs_tool
def test_set_enabled_off_emits_nothing(tmp_path):
    events, out = run_traced(
        """
        import stepscope
        nvtx = stepscope.nvtx
        with nvtx.range("open before"):
            nvtx.set_enabled(False)
            with nvtx.range("hidden"):
                nvtx.mark("hidden mark")
            print(nvtx.enabled())
        nvtx.set_enabled(True)
        with nvtx.range("visible"):
            pass
        """,
        tmp_path,
    )
    assert out.split() == ["False"]
    # "open before" still closes although the switch was off at its exit.
    assert [e.brief() for e in ranges(events)] == ["Push open before", "Pop", "Push visible", "Pop"]
    assert_balanced(events)


@needs_tool
def test_ranges_from_threads_nest_per_thread(tmp_path):
    events, _ = run_traced(
        """
        import threading, stepscope
        def work(name):
            for _ in range(20):
                with stepscope.nvtx.range(name):
                    with stepscope.nvtx.range("inner"):
                        pass
        ts = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(3)]
        [t.start() for t in ts]; [t.join() for t in ts]
        """,
        tmp_path,
    )
    ev = ranges(events)
    assert len({e["tid"] for e in ev}) == 3
    assert len(ev) == 3 * 20 * 4
    assert_balanced(events)


def test_without_tool_nothing_breaks(tmp_path):
    _, out = run_traced(
        """
        import stepscope
        nvtx = stepscope.nvtx
        with nvtx.range("a", color="#123456"):
            nvtx.mark("m")
        @nvtx.range("f")
        def f():
            return 3
        print(f(), nvtx.tool_attached(), nvtx.enabled() == nvtx.compiled_in())
        """,
        tmp_path,
        tool=False,
    )
    assert out.split() == ["3", "False", "True"]


def test_argument_checks():
    nvtx = stepscope.nvtx
    with pytest.raises(TypeError, match="name must be a str"):
        nvtx.range(3)
    with pytest.raises(ValueError, match="#RRGGBB"):
        nvtx.range("x", color="red")
    with pytest.raises(ValueError, match="0xRRGGBB"):
        nvtx.range("x", color=1 << 33)
    with pytest.raises(TypeError, match="color must be"):
        nvtx.range("x", color=1.5)
    with pytest.raises(TypeError, match="generator or coroutine"):
        @nvtx.range("gen")
        def gen():
            yield 1
    assert nvtx.range("x", color="#00ff00").argb == 0xFF00FF00
    assert nvtx.range("x").argb == 0


@needs_tool
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ranges_and_capture_window_on_cuda(tmp_path):
    """On a GPU: ranges around CUDA work, and the capture window's cudaProfilerStart/Stop path
    (taken only in a process that already has a CUDA context) leaves no CUDA error behind."""
    events, out = run_traced(
        """
        import torch, stepscope
        from stepscope._C import nvtx as nv
        x = torch.randn(256, 256, device="cuda")
        nv.capture_begin()
        with stepscope.nvtx.range("matmul"):
            y = x @ x
        nv.capture_end()
        torch.cuda.synchronize()
        z = (y + 1).sum()        # a launch after the window: would raise on a left-over error
        torch.cuda.synchronize()
        print(nv.capture_open(), bool(torch.isfinite(z)))
        """,
        tmp_path,
    )
    assert out.split() == ["False", "True"]
    assert [e.brief() for e in ranges(events)] == ["Start capture", "Push matmul", "Pop", "End"]
    assert_balanced(events)


# ---------------------------------------------------------------- the Monitor's ranges
# Written against issue 4's contract; skipped until stepscope.Monitor exists.

MONITOR_LOOP = """
import torch, stepscope
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with stepscope.Monitor(model, opt{kwargs}) as mon:
    for i in range(3):
        x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
print("done")
"""

PHASES = ["forward", "loss", "backward", "other", "optimizer"]
PUSH_POP = {"forward", "optimizer"}  # the others may end on autograd's thread: start/end


def _spans(ev: list[Event]) -> list[tuple[str, int, int, Event]]:
    """(name, open index, close index, opening event) for every range in log order."""
    spans, stacks, starts = [], {}, {}
    for i, e in enumerate(ev):
        if e.name == "DomainRangePushEx":
            stacks.setdefault(e["tid"], []).append((i, e))
        elif e.name == "DomainRangePop":
            j, o = stacks[e["tid"]].pop()
            spans.append((o["msg"], j, i, o))
        elif e.name == "DomainRangeStartEx":
            starts[e["id"]] = (i, e)
        elif e.name == "DomainRangeEnd":
            j, o = starts.pop(e["id"])
            spans.append((o["msg"], j, i, o))
    return sorted(spans, key=lambda s: s[1])


@needs_tool
@pytest.mark.skipif(not hasattr(stepscope, "Monitor"), reason="stepscope.Monitor (issue 4) not merged yet")
def test_monitor_sequence(tmp_path):
    events, out = run_traced(MONITOR_LOOP.format(kwargs=", profile_steps=range(1, 2)"), tmp_path)
    assert out.split() == ["done"]
    assert sum(e.name == "DomainCreateA" and e["domain"] == "stepscope" for e in events) == 1
    ev = ranges(events)
    assert_balanced(events)
    spans = _spans(ev)

    steps = [s for s in spans if s[3]["category"] == str(_nv.phase_category(Phase.step))]
    assert [s[3]["payload"] for s in steps] == ["0", "1", "2"]
    for k, (msg, a, b, o) in enumerate(steps):
        assert msg == f"step {k}"
        assert o.name == "DomainRangeStartEx"
        assert (o["color"], o["category"]) == style(Phase.step)
        inside = [s for s in spans if a < s[1] and s[2] < b and s[0] in PHASES]
        assert [s[0] for s in inside] == PHASES, f"step {k}: {[s[0] for s in inside]}"
        for name, _, _, opened in inside:
            assert opened.name == ("DomainRangePushEx" if name in PUSH_POP else "DomainRangeStartEx"), name
            assert (opened["color"], opened["category"]) == style(Phase.__members__[name]), name
            assert opened["msgtype"] == "registered", name
        # The phases follow one another: each closes before the next opens.
        for (_, _, close, _), (_, open_next, _, _) in zip(inside, inside[1:]):
            assert close < open_next

    # profile_steps=range(1, 2): one capture range around step 1 exactly, after step 0 and
    # before step 2.
    captures = [s for s in spans if s[0] == "capture"]
    assert len(captures) == 1
    _, ca, cb, co = captures[0]
    assert (co["color"], co["category"]) == style(Phase.capture)
    assert steps[0][2] < ca < steps[1][1] and steps[1][2] < cb < steps[2][1]


@needs_tool
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not hasattr(stepscope, "Monitor"), reason="stepscope.Monitor (issue 4) not merged yet")
def test_monitor_sequence_cuda(tmp_path):
    """The same loop on CUDA tensors: backward's range begins and ends on autograd's thread."""
    code = MONITOR_LOOP.format(kwargs="")
    code = code.replace("opt = torch.optim.SGD", "model = model.cuda()\nopt = torch.optim.SGD")
    code = code.replace("torch.randn(5, 8), torch.randint(0, 4, (5,))",
                        "torch.randn(5, 8, device='cuda'), torch.randint(0, 4, (5,), device='cuda')")
    events, out = run_traced(code, tmp_path)
    assert out.split() == ["done"]
    assert_balanced(events)
    spans = _spans(ranges(events))
    steps = [s for s in spans if s[3]["category"] == str(_nv.phase_category(Phase.step))]
    assert [s[3]["payload"] for s in steps] == ["0", "1", "2"]
    for _, a, b, _ in steps:
        assert [s[0] for s in spans if a < s[1] and s[2] < b and s[0] in PHASES] == PHASES


@needs_tool
def test_monitor_closure_step_sequence(tmp_path):
    """optimizer.step(closure): the optimizer's push ends at the closure's forward (its prelude is
    data), the closure's phases follow, and the time after its backward is an optimizer start/end
    range that ends with the step."""
    code = MONITOR_LOOP.format(kwargs="").replace(
        """        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
""",
        """        def closure():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
""")
    assert "opt.step(closure)" in code
    events, out = run_traced(code, tmp_path)
    assert out.split() == ["done"]
    assert_balanced(events)
    spans = _spans(ranges(events))
    steps = [s for s in spans if s[3]["category"] == str(_nv.phase_category(Phase.step))]
    assert [s[3]["payload"] for s in steps] == ["0", "1", "2"]
    for k, (_, a, b, _) in enumerate(steps):
        inside = [s for s in spans if a < s[1] and s[2] < b and s[0] in PHASES]
        assert [s[0] for s in inside] == ["optimizer", "forward", "loss", "backward", "optimizer"], k
        assert [s[3].name for s in inside] == ["DomainRangePushEx", "DomainRangePushEx", "DomainRangeStartEx",
                                               "DomainRangeStartEx", "DomainRangeStartEx"], k
        for (_, _, close, _), (_, open_next, _, _) in zip(inside, inside[1:]):
            assert close < open_next


@needs_tool
@pytest.mark.skipif(not hasattr(stepscope, "Monitor"), reason="stepscope.Monitor (issue 4) not merged yet")
def test_monitor_exception_in_forward_leaves_no_open_range(tmp_path):
    events, out = run_traced(
        """
        import torch, stepscope

        class Flaky(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(4, 2)
                self.fail = False
            def forward(self, x):
                if self.fail:
                    raise RuntimeError("forward failed")
                return self.lin(x)

        model = Flaky()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with stepscope.Monitor(model, opt) as mon:
            for i in range(3):
                model.fail = i == 1
                try:
                    loss = model(torch.randn(3, 4)).sum()
                except RuntimeError:
                    print("caught")
                    continue
                loss.backward()
                opt.step()
                opt.zero_grad()
        print("done")
        """,
        tmp_path,
    )
    assert out.split() == ["caught", "done"]
    assert_balanced(events)
    assert any(e.name == "DomainRangePushEx" and e["msg"] == "forward" for e in ranges(events))


@needs_tool
@pytest.mark.skipif(not hasattr(stepscope, "Monitor"), reason="stepscope.Monitor (issue 4) not merged yet")
def test_monitor_nvtx_false_emits_nothing(tmp_path):
    events, out = run_traced(MONITOR_LOOP.format(kwargs=", nvtx=False"), tmp_path)
    assert out.split() == ["done"]
    assert [e for e in ranges(events) if e["msg"] in PHASES or e["msg"].startswith("step")] == []
