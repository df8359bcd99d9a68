"""Binned AUROC and average precision (ClassificationMetrics(thresholds=T)) against torchmetrics' binned
versions and scikit-learn's exact ones; one op per update, the memory bound, state round trips."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import stepscope
from seen_ops import SeenOps

tmf = pytest.importorskip("torchmetrics.functional.classification")

@pytest.fixture(params=["cpu loop", "aten"])
def path(request):
    """Both ways the histograms are filled: the CPU loop, and the ATen pass CUDA runs, here on the CPU."""
    from stepscope import _C

    _C._set_binned_aten_on_cpu(request.param == "aten")
    yield request.param
    _C._set_binned_aten_on_cpu(False)


AVERAGES = {"multiclass": ("macro", "weighted", "none"), "multilabel": ("micro", "macro", "weighted", "none")}


def batches(task, n, c, seed, parts=3, extra=()):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(parts):
        if task == "multiclass":
            p = torch.randn(n, c, *extra, generator=g) * 2
            y = torch.randint(0, c, (n, *extra), generator=g)
        elif task == "multilabel":
            p = torch.randn(n, c, *extra, generator=g) * 2
            y = (torch.rand(n, c, *extra, generator=g) < torch.sigmoid(p)).long()
        else:
            p = torch.randn(n, *extra, generator=g) * 2
            y = (torch.rand(n, *extra, generator=g) < torch.sigmoid(p)).long()
        out.append((p, y))
    return out


def reference(task, p, y, c, t, **kw):
    """torchmetrics' binned AUROC and AP, keyed as compute() keys them."""
    if task == "binary":
        return {"auroc": tmf.binary_auroc(p, y, thresholds=t, **kw),
                "average_precision": tmf.binary_average_precision(p, y, thresholds=t, **kw)}
    auroc = getattr(tmf, f"{task}_auroc")
    ap = getattr(tmf, f"{task}_average_precision")
    out = {}
    for avg in AVERAGES[task]:
        key = "per_class" if avg == "none" else avg
        out[f"auroc_{key}"] = auroc(p, y, c, average=avg, thresholds=t, **kw)
        out[f"average_precision_{key}"] = ap(p, y, c, average=avg, thresholds=t, **kw)
    return out


def assert_close(got, want):
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v.double(), rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("task,c", [("binary", 1), ("multiclass", 7), ("multilabel", 5)])
@pytest.mark.parametrize("t", [2, 11, 200])
def test_equal_to_torchmetrics_binned(task, c, t, base_seed, path):
    data = batches(task, 400, c, base_seed + t)
    size = {"multiclass": {"num_classes": c}, "multilabel": {"num_labels": c}}.get(task, {})
    m = stepscope.ClassificationMetrics(task, **size, thresholds=t)
    for p, y in data:
        m.update(p, y)
    p, y = (torch.cat(z) for z in zip(*data))
    assert_close(m.compute(), reference(task, p, y, c, t))


@pytest.mark.parametrize("task,c", [("multiclass", 4), ("multilabel", 3), ("binary", 1)])
def test_probabilities_extra_dims_ignore_index_and_forward(task, c, base_seed, path):
    # probabilities in, [N, C, H, W] shapes, an ignored target value, and each batch's own values
    data = batches(task, 40, c, base_seed, extra=(3, 5))
    size = {"multiclass": {"num_classes": c}, "multilabel": {"num_labels": c}}.get(task, {})
    m = stepscope.ClassificationMetrics(task, **size, thresholds=30, ignore_index=-1, input="probs")
    seen = []
    for p, y in data:
        p = p.softmax(1) if task == "multiclass" else p.sigmoid()
        y = y.clone()
        y.view(-1)[::7] = -1
        seen.append((p, y))
        assert_close(m(p, y), reference(task, p, y, c, 30, ignore_index=-1))
    p, y = (torch.cat(z) for z in zip(*seen))
    assert_close(m.compute(), reference(task, p, y, c, 30, ignore_index=-1))


def test_bf16_logits_and_class_dim_last(base_seed, path):
    g = torch.Generator().manual_seed(base_seed)
    p = torch.randn(6, 20, 9, generator=g).to(torch.bfloat16)  # [B, T, V] language-model logits
    y = torch.randint(0, 9, (6, 20), generator=g)
    m = stepscope.ClassificationMetrics("multiclass", num_classes=9, thresholds=50, class_dim=-1)
    m.update(p, y)
    want = reference("multiclass", p.float().reshape(-1, 9), y.reshape(-1), 9, 50)
    assert_close(m.compute(), want)


@pytest.mark.parametrize("t", [100, 1000])
def test_within_the_binning_error_of_scikit_learn_exact(t, base_seed, path):
    g = torch.Generator().manual_seed(base_seed)
    p = torch.randn(20000, generator=g) * 2
    y = (torch.rand(20000, generator=g) < torch.sigmoid(p)).long()
    m = stepscope.ClassificationMetrics("binary", thresholds=t)
    m.update(p, y)
    out = m.compute()
    s = torch.sigmoid(p).numpy()
    # AUROC: the trapezoid over the bins counts each positive-negative pair that shares a bin as half a
    # win; the exact one as 0 or 1, so they differ by at most half the share of such pairs.
    edges = torch.linspace(0, 1, t)
    slot = torch.searchsorted(edges, torch.sigmoid(p), right=True)
    pos = torch.bincount(slot[y == 1], minlength=t + 1).double()
    neg = torch.bincount(slot[y == 0], minlength=t + 1).double()
    bound = 0.5 * float((pos * neg).sum() / (pos.sum() * neg.sum()))
    assert abs(float(out["auroc"]) - roc_auc_score(y, s)) <= bound + 1e-6
    assert abs(float(out["average_precision"]) - average_precision_score(y, s)) <= 1.0 / t


def test_rows_left_out_elsewhere_are_left_out_here(base_seed, path):
    # a NaN and a -inf logit, an out-of-range target: the histograms count what the other metrics count
    data = batches("multiclass", 60, 4, base_seed, parts=1)[0]
    p, y = data[0].clone(), data[1].clone()
    p[3, 1], p[8, 0], y[11] = float("nan"), -float("inf"), 9
    m = stepscope.ClassificationMetrics("multiclass", num_classes=4, thresholds=20)
    m.update(p, y)
    keep = torch.ones(60, dtype=torch.bool)
    keep[[3, 8, 11]] = False
    out = m.compute(check=False)
    assert_close(out, reference("multiclass", p[keep], y[keep], 4, 20))
    q, z = batches("multilabel", 30, 3, base_seed, parts=1)[0]
    q[2, 1], z[5, 2] = float("inf"), 7
    m = stepscope.ClassificationMetrics("multilabel", num_labels=3, thresholds=20, input="logits")
    m.update(q, z)
    hist = m.state[m._cfg.layout["binned"]:].view(3, 2, 21)
    assert hist.sum().item() == 30 * 3 - 2 == int(m.compute(check=False)["samples"])  # elements, as counted


def test_still_one_op_per_update_and_no_host_read(base_seed):
    p, y = batches("multilabel", 64, 4, base_seed)[0]
    m = stepscope.ClassificationMetrics("multilabel", num_labels=4, thresholds=100)
    m.update(p, y)
    with SeenOps() as ops:
        for _ in range(3):
            m.update(p, y)
    assert ops.seen == ["stepscope.classification_update.default"] * 3


def test_opcheck_with_thresholds(base_seed):
    p, y = batches("multiclass", 16, 5, base_seed)[0]
    m = stepscope.ClassificationMetrics("multiclass", num_classes=5, thresholds=8)
    torch.library.opcheck(torch.ops.stepscope.classification_update.default,
                          (p, y, torch.zeros_like(m.state), *m._op_args))


def test_bad_thresholds_and_the_memory_bound():
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match="thresholds must be None or an int >= 2"):
            stepscope.ClassificationMetrics("binary", thresholds=bad)
    for bad in (2.5, True, "10"):
        with pytest.raises(TypeError, match="thresholds"):
            stepscope.ClassificationMetrics("binary", thresholds=bad)
    with pytest.raises(ValueError, match=r"128 MiB\); use fewer thresholds"):
        stepscope.ClassificationMetrics("multiclass", num_classes=100000, thresholds=100,
                                        confusion_matrix=False)
    m = stepscope.ClassificationMetrics("multiclass", num_classes=1000, thresholds=1000)  # 2 x 1000 x 1001
    assert m.thresholds == 1000 and m.state.numel() > 2 * 1000 * 1001


def test_state_dicts_and_pickles_written_before_thresholds_still_load(base_seed):
    p, y = batches("multiclass", 50, 3, base_seed)[0]
    old = stepscope.ClassificationMetrics("multiclass", num_classes=3)
    old.update(p, y)
    sd = old.state_dict()
    assert "thresholds" not in sd["_extra_state"]  # the form every earlier version wrote
    fresh = stepscope.ClassificationMetrics("multiclass", num_classes=3)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.state, old.state)
    with pytest.raises(ValueError, match="thresholds"):
        stepscope.ClassificationMetrics("multiclass", num_classes=3, thresholds=10).load_state_dict(sd)
    binned = stepscope.ClassificationMetrics("multiclass", num_classes=3, thresholds=10)
    binned.update(p, y)
    again = pickle.loads(pickle.dumps(binned))
    assert again.thresholds == 10 and torch.equal(again.state, binned.state)
    state = old.__getstate__()
    del state["thresholds"]  # a pickle from before the field
    revived = stepscope.ClassificationMetrics.__new__(stepscope.ClassificationMetrics)
    revived.__setstate__(state)
    assert revived.thresholds is None and np.isclose(float(revived.compute()["accuracy"]),
                                                     float(old.compute()["accuracy"]))


@pytest.mark.cuda
def test_cuda_equals_cpu_and_never_syncs(base_seed):
    for task, c in (("binary", 1), ("multiclass", 6), ("multilabel", 4)):
        size = {"multiclass": {"num_classes": c}, "multilabel": {"num_labels": c}}.get(task, {})
        cpu = stepscope.ClassificationMetrics(task, **size, thresholds=64)
        gpu = stepscope.ClassificationMetrics(task, **size, thresholds=64, device="cuda")
        data = batches(task, 3000, c, base_seed)
        on_gpu = [(p.cuda(), y.cuda()) for p, y in data]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for p, y in on_gpu:
                gpu.update(p, y)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for p, y in data:
            cpu.update(p, y)
        got, want = gpu.compute(), cpu.compute()
        for k, v in want.items():
            if k.startswith(("auroc", "average_precision")):
                torch.testing.assert_close(got[k].cpu(), v, rtol=1e-6, atol=1e-6, msg=k)
