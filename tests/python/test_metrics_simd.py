"""The CPU update's SIMD path (AVX2/FMA/F16C) against its portable loops and the references of
test_metrics.py: both paths must count exactly alike and agree on loss and calibration."""

import numpy as np
import pytest
import torch

import stepscope
import test_metrics as tm_ref
from stepscope import _C

pytestmark = pytest.mark.skipif(not _C._cpu_simd() and not _C._set_cpu_simd(True),
                                reason="no AVX2/FMA/F16C on this CPU (or STEPSCOPE_CPU_SIMD=0)")


@pytest.fixture(params=["simd", "portable"])
def cpu_path(request):
    prev = _C._set_cpu_simd(request.param == "simd")
    assert _C._cpu_simd() == (request.param == "simd")
    yield request.param
    _C._set_cpu_simd(prev)


def _state(task, preds, target, simd, **kw):
    prev = _C._set_cpu_simd(simd)
    try:
        m = stepscope.ClassificationMetrics(task, **kw)
        m.update(preds, target)
        return m, m.state.clone()
    finally:
        _C._set_cpu_simd(prev)


def _both_paths_agree(task, preds, target, msg, **kw):
    m, fast = _state(task, preds, target, True, **kw)
    _, slow = _state(task, preds, target, False, **kw)
    lay = m._cfg.layout
    loss = lay["loss"]
    counts = torch.ones_like(fast, dtype=torch.bool)
    counts[loss] = False
    for name in ("ece_conf",):
        counts[lay[name]:lay[name] + 16] = False
    assert torch.equal(fast[counts], slow[counts]), f"counts differ: {msg}"
    torch.testing.assert_close(fast[~counts], slow[~counts], rtol=2e-6, atol=1e-6, msg=lambda m: f"{msg}\n{m}")
    return m, fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["logits", "probs", "auto"])
def test_rows_of_every_length_and_target_position(base_seed, dtype, kind):
    """C from 1 to 40 covers the 16-wide body, the 8-wide step and each tail length, with the
    target before, inside and after them; ties (half precision, repeated values) and strided rows."""
    g = torch.Generator().manual_seed(base_seed)
    for C in list(range(1, 41)) + [100, 1000, 1003]:
        N = 64
        x = torch.randn(N, C, generator=g) * 3
        if C > 3:
            x[::3, 1] = x[::3, 0]  # ties of the max and of the target
            x[::5, C - 1] = x[::5].amax(1)
        if kind != "logits":
            x = x.softmax(1)
        x = x.to(dtype)
        t = torch.randint(0, C, (N,), generator=g)
        t[:C] = torch.arange(min(N, C))
        for preds, layout in [(x, "contiguous"), (x.t().contiguous().t(), "strided")]:
            msg = f"seed={base_seed} C={C} dtype={dtype} kind={kind} {layout}"
            ks = tuple(sorted({1, min(3, C)}))
            m, s = _both_paths_agree("multiclass", preds, t, msg, num_classes=C, top_k=ks, input=kind)
            ref = tm_ref.reference_multiclass(preds, t, C, ks, None)
            lay = m._cfg.layout
            tm_ref.exact(s[lay["tp"]:lay["tp"] + C], ref["tp"], "tp " + msg)
            tm_ref.exact(s[lay["pred"]:lay["pred"] + C], ref["pred"], "pred " + msg)
            tm_ref.exact(s[lay["topk"]:lay["topk"] + len(ks)], ref["topk"], "topk " + msg)
            P = preds.double()
            logp = P.log() if kind == "probs" or (kind == "auto" and bool(((P >= 0) & (P <= 1)).all())) \
                else P.log_softmax(1)
            ce = float(torch.nn.functional.nll_loss(logp, t, reduction="sum"))
            tm_ref.close(s[lay["loss"]], ce, "loss " + msg, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_ignored_and_invalid_rows(base_seed, dtype):
    g = torch.Generator().manual_seed(base_seed + 1)
    rng = np.random.default_rng(base_seed)
    for C in (1, 2, 7, 10, 17, 100, 300):
        N = 200
        x = torch.randn(N, C, generator=g) * 4
        for bad in (float("nan"), float("inf"), -float("inf")):
            rows = rng.choice(N, 10, replace=False)
            cols = rng.integers(0, C, 10)
            x[rows, cols] = bad
        t = torch.randint(-1, C + 1, (N,), generator=g)  # -1: ignored; C: invalid
        msg = f"seed={base_seed} C={C} dtype={dtype}"
        m, s = _both_paths_agree("multiclass", x.to(dtype), t, msg, num_classes=C, ignore_index=-1, input="auto")
        out = m.compute(check=False)
        bad_row = ~torch.isfinite(x.to(dtype).float()).all(1)
        counted = (t >= 0) & (t < C)
        assert int(out["nonfinite"]) == int((bad_row & counted).sum()), msg
        assert int(out["ignored"]) == int((t == -1).sum()), msg
        assert int(out["invalid_target"]) == int((t == C).sum()), msg
        assert int(out["samples"]) == int((~bad_row & counted).sum()), msg


def test_the_random_multiclass_cases_on_each_path(base_seed, cpu_path):
    tm_ref.CASES, saved = 60, tm_ref.CASES
    try:
        tm_ref.test_multiclass_random(base_seed + 17, "cpu")
    finally:
        tm_ref.CASES = saved


def test_the_switch_reports_and_restores():
    prev = _C._set_cpu_simd(False)
    assert not _C._cpu_simd()
    assert _C._set_cpu_simd(prev) is False
    assert _C._cpu_simd() == prev


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("kind", ["logits", "probs", "auto"])
def test_elementwise_paths_agree(base_seed, dtype, tdtype, kind):
    g = torch.Generator().manual_seed(base_seed + 2)
    for L in (0, 1, 2, 7, 8, 9, 17, 100):
        shape = (203, L) if L else (203,)
        x = torch.randn(shape, generator=g) * 4
        if kind != "logits":
            x = x.sigmoid()
        x.view(-1)[::37] = float("nan")
        x.view(-1)[5::41] = float("inf")
        y = torch.randint(0, 2, shape, generator=g)
        y.view(-1)[::13] = 2  # invalid
        y.view(-1)[3::17] = 1 if tdtype == torch.uint8 else -1
        task = "multilabel" if L else "binary"
        kw = dict(num_labels=L) if L else {}
        ign = 1 if tdtype == torch.uint8 else -1
        for preds, layout in [(x, "contiguous"), (x.t().contiguous().t() if L else x[::1], "strided")]:
            msg = f"seed={base_seed} L={L} dtype={dtype} target={tdtype} kind={kind} {layout}"
            _both_paths_agree(task, preds.to(dtype), y.to(tdtype), msg, input=kind, ignore_index=ign, **kw)


def _read_as(task, preds, target, **kw):
    m = stepscope.ClassificationMetrics(task, **kw)
    m.update(preds, target)
    return m.state


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_elementwise_auto_rule_in_one_pass(base_seed, cpu_path, task):
    """All in [0, 1]: probabilities; one value outside anywhere (first, middle, last, on an
    ignored position) or one NaN: logits, as torchmetrics decides."""
    g = torch.Generator().manual_seed(base_seed + 3)
    kw = dict(num_labels=10) if task == "multilabel" else {}
    shape = (4000, 10) if task == "multilabel" else (40000,)
    p = torch.rand(shape, generator=g)
    y = torch.randint(0, 2, shape, generator=g)
    y.view(-1)[-1] = -1
    kw["ignore_index"] = -1
    as_probs = _read_as(task, p, y, input="probs", **kw)
    assert torch.equal(_read_as(task, p, y, input="auto", **kw), as_probs)
    for pos, value in [(0, 1.5), (p.numel() // 2, 1.5), (p.numel() - 1, -0.5), (p.numel() - 2, float("nan"))]:
        q = p.clone()
        q.view(-1)[pos] = value
        auto = _read_as(task, q, y, input="auto", **kw)
        assert torch.equal(auto, _read_as(task, q, y, input="logits", **kw)), (pos, value)
        assert not torch.equal(auto, _read_as(task, q, y, input="probs", **kw)), (pos, value)


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_the_random_elementwise_cases_on_each_path(base_seed, cpu_path, task):
    tm_ref.CASES, saved = 60, tm_ref.CASES
    try:
        tm_ref.test_elementwise_random(base_seed + 19, "cpu", task)
    finally:
        tm_ref.CASES = saved


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel"])
def test_two_threads_count_what_one_counts(base_seed, cpu_path, task):
    """Chunks over at::parallel_for (and the 'auto' stop shared between them) change no count."""
    g = torch.Generator().manual_seed(base_seed + 4)
    kw = {"multiclass": dict(num_classes=50), "binary": {}, "multilabel": dict(num_labels=16)}[task]
    shape = {"multiclass": (20000, 50), "binary": (1 << 20,), "multilabel": (1 << 16, 16)}[task]
    x = torch.rand(shape, generator=g)
    y = torch.randint(0, 50, (shape[0],), generator=g) if task == "multiclass" else torch.randint(0, 2, shape,
                                                                                                   generator=g)
    n = torch.get_num_threads()
    try:
        for outside_at in (None, 7, x.numel() - 3):
            q = x.clone()
            if outside_at is not None:
                q.view(-1)[outside_at] = 2.0
            torch.set_num_threads(1)
            one = _read_as(task, q, y, **kw)
            torch.set_num_threads(2)
            two = _read_as(task, q, y, **kw)
            torch.testing.assert_close(two, one, rtol=1e-9, atol=1e-6, msg=lambda m: f"{outside_at}\n{m}")
    finally:
        torch.set_num_threads(n)
