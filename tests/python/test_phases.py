"""The one phase table (csrc/phases.h) as Python sees it: _C.PHASES, report.PARTITION and
the NVTX layer all read the same rows."""

from stepscope import _C, report

# What a saved Nsight report holds: names, categories and colours stay fixed across builds.
NVTX_STYLE = {
    "step": (1, 0xFF5B5B5B), "data": (2, 0xFFB0B0B0), "forward": (3, 0xFF1F77B4), "loss": (4, 0xFFFF7F0E),
    "backward": (5, 0xFFD62728), "other": (6, 0xFF9467BD), "optimizer": (7, 0xFF2CA02C),
    "eval": (8, 0xFF17BECF), "evaluation": (12, 0xFF9EDAE5), "user": (9, 0xFFBCBD22),
    "module": (10, 0xFF8C564B), "capture": (11, 0xFFE377C2),
}


def test_table_rows_in_series_order():
    names = [p["name"] for p in _C.PHASES]
    assert names == ["data", "forward", "loss", "backward", "other", "optimizer", "step", "eval_forward",
                     "eval", "user", "module", "capture"]
    assert report.PARTITION == ("data", "forward", "loss", "backward", "other", "optimizer")
    assert [p["name"] for p in _C.PHASES if p["series"]] == names[:9]


def test_report_phases_follow_the_table():
    tl = _C.Timeline(nvtx=False)
    rep = tl.report()
    assert list(rep["phases"]) == [p["name"] for p in _C.PHASES if p["series"]]
    assert list(rep["warmup"]["host"]) == list(rep["phases"])


def test_nvtx_reads_the_same_table():
    assert {p["nvtx_name"]: (p["category"], p["color"]) for p in _C.PHASES} == NVTX_STYLE
    for p in _C.nvtx.Phase.__members__.values():
        name = _C.nvtx.phase_name(p)
        assert (_C.nvtx.phase_category(p), _C.nvtx.phase_color(p)) == NVTX_STYLE[name]


def test_boundaries_open_and_close_the_partition():
    # The step's boundaries in order; each partition phase closes at its own and opens where the
    # one before it closed (data: at the previous step's optimizer_end).
    assert _C.BOUNDARIES == ("forward_begin", "forward_end", "backward_begin", "backward_end", "optimizer_begin",
                             "optimizer_end")
    part = [p for p in _C.PHASES if p["partition"]]
    assert [p["closes"] for p in part] == list(_C.BOUNDARIES)
    assert [p["opens"] for p in part] == [_C.BOUNDARIES[-1], *_C.BOUNDARIES[:-1]]
    assert all(p["opens"] is None and p["closes"] is None for p in _C.PHASES if not p["partition"])
