"""ClassificationMetrics against a slow reference (exact counts), torchmetrics 1.9 and scikit-learn.

Every case draws fresh random inputs from a seed derived from the run's base seed (printed in
the pytest header and in every failure message): STEPSCOPE_TEST_SEED=<seed> replays a run.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
import torchmetrics.classification as tmc
from sklearn import metrics as skm

import stepscope

CASES = 200
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = dict(atol=1e-6, rtol=1e-6)

assert torchmetrics.__version__.startswith("1.9"), torchmetrics.__version__


def close(actual, expected, msg, **tol):
    actual = torch.as_tensor(actual).double().cpu()
    expected = torch.as_tensor(expected).double().cpu()
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{msg}\n{m}", **(tol or TOL))


def exact(actual, expected, msg):
    a = torch.as_tensor(actual).cpu().long()
    e = torch.as_tensor(expected).cpu().long()
    assert torch.equal(a, e), f"{msg}\nactual   {a.tolist()}\nexpected {e.tolist()}"


def zero_division(name, expected):
    """torchmetrics' JaccardIndex divides 0 by 0 when an average has no weight at all (nothing
    counted, or no positive target for 'weighted'); with zero_division=0 that is 0."""
    return torch.nan_to_num(expected, nan=0.0) if name == "iou" else expected


def split_batches(rng, n):
    """1-3 uneven pieces: several updates must equal one."""
    k = int(rng.integers(1, 4))
    cuts = sorted(int(c) for c in rng.integers(0, n + 1, size=k - 1))
    edges = [0] + cuts + [n]
    return [(edges[i], edges[i + 1]) for i in range(k)]


# ----------------------------------------------------------------------------- multiclass
def multiclass_case(seed):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    C = int(rng.choice([2, 3, 5, 10, 37, 100]))
    N = int(rng.integers(0, 200))
    extra = [(), (), (3,), (2, 4)][int(rng.integers(0, 4))]
    dtype = [torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16][int(rng.integers(0, 5))]
    ks = sorted({int(k) for k in rng.integers(1, C + 1, size=int(rng.integers(1, 3)))} | {1})
    ignore = [None, None, -1, -100, int(rng.integers(0, C))][int(rng.integers(0, 5))]
    kind = ["logits", "logits", "probs", "auto", "auto"][int(rng.integers(0, 5))]
    # Logits built channel-last then moved: non-contiguous class dim (as from a conv net / .t()).
    x = torch.randn(N, *extra, C, generator=g) * float(rng.choice([0.5, 2.0, 6.0]))
    if kind == "probs" or (kind == "auto" and rng.random() < 0.5):
        x = x.softmax(-1)
    preds = x.to(dtype).movedim(-1, 1)
    if rng.random() < 0.5:
        preds = preds.contiguous()
    target = torch.randint(0, C, (N, *extra), generator=g)
    if ignore is not None and N > 0:
        target[torch.rand(target.shape, generator=g) < 0.15] = ignore
    return dict(C=C, N=N, extra=extra, dtype=dtype, ks=tuple(ks), ignore=ignore, kind=kind, preds=preds,
                target=target, rng=rng)


def reference_multiclass(preds, target, C, ks, ignore, confmat=True):
    """Slow, obvious: per-sample rows in float64 (exact for every input dtype)."""
    P = preds.movedim(1, -1).reshape(-1, C).double()
    T = target.reshape(-1).long()
    keep = T != ignore if ignore is not None else torch.ones_like(T, dtype=torch.bool)
    P, T = P[keep], T[keep]
    pred = P.argmax(1)  # first index of the max: torch's documented tie rule
    xt = P.gather(1, T[:, None])
    j = torch.arange(C)[None, :]
    rank = ((P > xt) | ((P == xt) & (j < T[:, None]))).sum(1)
    return dict(
        tp=torch.bincount(T[pred == T], minlength=C),
        pred=torch.bincount(pred, minlength=C),
        target=torch.bincount(T, minlength=C),
        confmat=torch.bincount(T * C + pred, minlength=C * C).view(C, C) if confmat else None,
        topk=[int((rank < k).sum()) for k in ks],
        n=int(T.numel()),
        ignored=int((~keep).sum()),
    )


def run_ours(case, task, device, **kw):
    m = stepscope.ClassificationMetrics(task, device=device, **kw)
    case["batches"] = split_batches(case["rng"], case["preds"].shape[0])
    for a, b in case["batches"]:
        m.update(case["preds"][a:b].to(device), case["target"][a:b].to(device))
    return m


@pytest.mark.parametrize("device", DEVICES)
def test_multiclass_random(base_seed, device):
    for i in range(CASES):
        seed = base_seed + 1000 * i + 1
        c = multiclass_case(seed)
        C, ks, ignore = c["C"], c["ks"], c["ignore"]
        msg = (f"seed={seed} C={C} N={c['N']} extra={c['extra']} dtype={c['dtype']} ks={ks} ignore={ignore} "
               f"kind={c['kind']} contiguous={c['preds'].is_contiguous()}")
        m = run_ours(c, "multiclass", device, num_classes=C, top_k=ks, ignore_index=ignore, input=c["kind"],
                     beta=2.0)
        out = m.compute()
        ref = reference_multiclass(c["preds"], c["target"], C, ks, ignore)
        lay = m._cfg.layout
        s = m.state.cpu()
        exact(s[lay["tp"]:lay["tp"] + C], ref["tp"], "tp " + msg)
        exact(s[lay["pred"]:lay["pred"] + C], ref["pred"], "pred " + msg)
        exact(s[lay["target"]:lay["target"] + C], ref["target"], "target " + msg)
        exact(out["confusion_matrix"], ref["confmat"], "confmat " + msg)
        exact(out["samples"], ref["n"], "samples " + msg)
        exact(out["ignored"], ref["ignored"], "ignored " + msg)
        exact(s[lay["topk"]:lay["topk"] + len(ks)], ref["topk"], "topk " + msg)

        # Loss: cross-entropy of the float64-upcast predictions. 'auto' decides per update, as
        # torchmetrics does: probabilities iff every value of the update's counted rows is in [0, 1].
        P = c["preds"].double()
        decisions = set()
        if c["N"] and ref["n"]:
            ce = 0.0
            for a, b in c["batches"]:
                if b == a:
                    continue
                Pb, Tb = P[a:b], c["target"][a:b]
                rows = Pb.movedim(1, -1).reshape(-1, C)[Tb.reshape(-1) != ignore] if ignore is not None else Pb
                as_probs = c["kind"] == "probs" or (c["kind"] == "auto" and bool(((rows >= 0) & (rows <= 1)).all()))
                decisions.add(as_probs)
                logp = Pb.log() if as_probs else Pb.log_softmax(1)
                ce += float(F.nll_loss(logp, Tb, ignore_index=ignore if ignore is not None else -12345,
                                       reduction="sum"))
            close(out["loss"], ce / ref["n"], "loss " + msg, atol=1e-5, rtol=1e-5)

        # torchmetrics, on the float32 upcast (our kernels read half/bf16 into float32 too).
        tp32 = c["preds"].float()
        tgt = c["target"]
        if c["N"] == 0 or ref["n"] == 0:  # nothing counted: torchmetrics divides 0 by 0
            continue
        common = dict(num_classes=C, ignore_index=ignore)
        for avg, key in [("micro", "micro"), ("macro", "macro"), ("weighted", "weighted"), ("none", "per_class")]:
            for name, cls in [("accuracy", tmc.MulticlassAccuracy), ("precision", tmc.MulticlassPrecision),
                              ("recall", tmc.MulticlassRecall), ("f1", tmc.MulticlassF1Score),
                              ("specificity", tmc.MulticlassSpecificity), ("iou", tmc.MulticlassJaccardIndex)]:
                tm = cls(average=avg, **common)
                tm.update(tp32, tgt)
                close(out[f"{name}_{key}"], zero_division(name, tm.compute()), f"{name}_{key} " + msg)
            tm = tmc.MulticlassFBetaScore(beta=2.0, average=avg, **common)
            tm.update(tp32, tgt)
            close(out[f"fbeta_{key}"], tm.compute(), f"fbeta_{key} " + msg)
        for norm in ["true", "pred", "all"]:
            tm = tmc.MulticlassConfusionMatrix(normalize=norm, **common)
            tm.update(tp32, tgt)
            close(m.confusion_matrix(norm), tm.compute(), f"confmat[{norm}] " + msg)
        kept = tp32.movedim(1, -1)[tgt != ignore] if ignore is not None else tp32
        # Fed all at once, torchmetrics decides 'auto' once: compare where the updates agreed.
        one_rule = len(decisions) <= 1
        if one_rule and (c["kind"] in ("probs", "auto") or not bool(((kept >= 0) & (kept <= 1)).all())):
            # torchmetrics' calibration guesses logits-vs-probabilities from the values; when a
            # tiny batch of logits lies in [0, 1] it would skip the softmax we were told to apply.
            tm = tmc.MulticlassCalibrationError(n_bins=15, norm="l1", **common)
            tm.update(tp32, tgt)
            close(out["ece"], tm.compute(), "ece " + msg, atol=2e-6, rtol=1e-5)
        if c["dtype"] in (torch.float32, torch.float64):
            # torch.topk orders ties arbitrarily; exact ties only arise in half precision.
            for k in ks:
                tm = tmc.MulticlassAccuracy(top_k=k, average="micro", **common)
                tm.update(tp32, tgt)
                close(out[f"top{k}_accuracy"], tm.compute(), f"top{k} " + msg)


def test_multiclass_matches_sklearn(base_seed):
    for i in range(60):
        seed = base_seed + 7 * i + 3
        rng = np.random.default_rng(seed)
        g = torch.Generator().manual_seed(seed)
        C = int(rng.integers(3, 30))
        N = int(rng.integers(1, 300))
        logits = torch.randn(N, C, generator=g)
        y = torch.randint(0, C, (N,), generator=g)
        m = stepscope.ClassificationMetrics("multiclass", num_classes=C, top_k=(1, 2))
        m.update(logits, y)
        out = m.compute()
        yt, yp = y.numpy(), logits.argmax(1).numpy()
        msg = f"seed={seed} C={C} N={N}"
        close(out["accuracy"], skm.accuracy_score(yt, yp), msg)
        for avg in ["micro", "macro", "weighted"]:
            # With labels=None sklearn averages over classes present in y_true or y_pred: the
            # same classes torchmetrics' (and our) macro average keeps.
            p, r, f, _ = skm.precision_recall_fscore_support(yt, yp, average=avg, zero_division=0)
            close(out[f"precision_{avg}"], p, f"precision_{avg} " + msg)
            close(out[f"recall_{avg}"], r, f"recall_{avg} " + msg)
            close(out[f"f1_{avg}"], f, f"f1_{avg} " + msg)
        exact(out["confusion_matrix"], skm.confusion_matrix(yt, yp, labels=list(range(C))), "confmat " + msg)
        close(out["iou_per_class"], skm.jaccard_score(yt, yp, labels=list(range(C)), average=None,
                                                      zero_division=0), "iou " + msg)
        close(out["top2_accuracy"], skm.top_k_accuracy_score(yt, logits.numpy(), k=2, labels=list(range(C))),
              "top2 " + msg)
        close(out["loss"], skm.log_loss(yt, logits.double().softmax(1).numpy(), labels=list(range(C))),
              "loss " + msg, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- binary / multilabel
def elementwise_case(seed, multilabel):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    N = int(rng.integers(0, 200))
    L = int(rng.integers(2, 12)) if multilabel else None  # torchmetrics needs L >= 2
    extra = [(), (), (3,), (2, 3)][int(rng.integers(0, 4))]
    shape = (N, L, *extra) if multilabel else (N, *extra)
    dtype = [torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16][int(rng.integers(0, 5))]
    ignore = [None, None, -1][int(rng.integers(0, 3))]
    kind = ["auto", "auto", "logits", "probs"][int(rng.integers(0, 4))]
    threshold = float(rng.choice([0.5, 0.3, 0.7]))
    x = torch.randn(*shape, generator=g) * 2
    # auto: either logits (most values outside [0, 1]) or probabilities.
    if kind == "probs" or (kind == "auto" and rng.random() < 0.5):
        x = x.sigmoid()
    preds = x.to(dtype)
    if multilabel and rng.random() < 0.5 and preds.dim() >= 2:
        preds = preds.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous
    target = torch.randint(0, 2, shape, generator=g)
    if ignore is not None and N > 0:
        target[torch.rand(shape, generator=g) < 0.15] = ignore
    return dict(N=N, L=L, extra=extra, dtype=dtype, ignore=ignore, kind=kind, threshold=threshold, preds=preds,
                target=target, rng=rng)


def feed(tm, c, preds, target):
    """The same updates for torchmetrics (which cannot take an empty batch with extra dims)."""
    for a, b in c["batches"]:
        if b > a:
            tm.update(preds[a:b], target[a:b])


def _elementwise_check(c, m, out, msg, multilabel):
    preds, target, ignore = c["preds"].float(), c["target"], c["ignore"]
    # torchmetrics decides logits-vs-probabilities per update; so does our kernel (c["batches"]).
    keep = target != ignore if ignore is not None else torch.ones_like(target, dtype=torch.bool)
    n_valid = int(keep.sum())
    exact(out["samples"], n_valid, "samples " + msg)
    exact(out["ignored"], int((~keep).sum()), "ignored " + msg)
    if c["N"] == 0 or n_valid == 0:  # nothing counted: torchmetrics divides 0 by 0
        return
    # Loss: BCE of the float64 upcast, per update's logits/probs decision.
    loss_sum = 0.0
    for a, b in c["batches"]:
        p, t = c["preds"][a:b].double(), target[a:b]
        k = t != ignore if ignore is not None else torch.ones_like(t, dtype=torch.bool)
        logits = c["kind"] == "logits" or (c["kind"] == "auto" and not bool(((p >= 0) & (p <= 1)).all()))
        if k.any():
            pv, tv = p[k], t[k].double()
            loss_sum += float(F.binary_cross_entropy_with_logits(pv, tv, reduction="sum") if logits
                              else F.binary_cross_entropy(pv, tv, reduction="sum"))
    if n_valid:
        close(out["loss"], loss_sum / n_valid, "loss " + msg, atol=1e-5, rtol=1e-5)
    def in_unit(t):
        return bool(((t >= 0) & (t <= 1)).all())

    # torchmetrics' auto rule cannot be told "logits" for a batch that happens to lie in [0, 1].
    if c["kind"] == "logits" and any(in_unit(c["preds"][a:b]) for a, b in c["batches"] if b > a):
        return
    # Its confusion-matrix metrics (the confusion matrix, the Jaccard index) and calibration apply
    # the rule to the non-ignored values only, its stat-score metrics (and stepscope, everywhere)
    # to the whole batch: compare those only where both rules agree (seed 684378435: a logit of
    # 2.4 on an ignored target made the batch logits for stepscope, probabilities for them).
    rules_agree = ignore is None or all(
        in_unit(c["preds"][a:b]) == in_unit(c["preds"][a:b][target[a:b] != ignore]) for a, b in c["batches"]
    )
    if multilabel:
        common = dict(num_labels=c["L"], ignore_index=ignore, threshold=c["threshold"])
        for avg, key in [("micro", "micro"), ("macro", "macro"), ("weighted", "weighted"), ("none", "per_class")]:
            for name, cls in [("accuracy", tmc.MultilabelAccuracy), ("precision", tmc.MultilabelPrecision),
                              ("recall", tmc.MultilabelRecall), ("f1", tmc.MultilabelF1Score),
                              ("specificity", tmc.MultilabelSpecificity), ("iou", tmc.MultilabelJaccardIndex)]:
                if name == "iou" and not rules_agree:  # a confusion-matrix metric in torchmetrics
                    continue
                tm = cls(average=avg, **common)
                feed(tm, c, preds, target)
                close(out[f"{name}_{key}"], zero_division(name, tm.compute()), f"{name}_{key} " + msg)
        if rules_agree:
            tm = tmc.MultilabelConfusionMatrix(**common)
            feed(tm, c, preds, target)
            exact(out["confusion_matrix"], tm.compute(), "confmat " + msg)
    else:
        common = dict(ignore_index=ignore, threshold=c["threshold"])
        for name, cls in [("accuracy", tmc.BinaryAccuracy), ("precision", tmc.BinaryPrecision),
                          ("recall", tmc.BinaryRecall), ("f1", tmc.BinaryF1Score),
                          ("specificity", tmc.BinarySpecificity), ("iou", tmc.BinaryJaccardIndex)]:
            if name == "iou" and not rules_agree:  # a confusion-matrix metric in torchmetrics
                continue
            tm = cls(**common)
            feed(tm, c, preds, target)
            close(out[name], zero_division(name, tm.compute()), f"{name} " + msg)
        if rules_agree:
            tm = tmc.BinaryConfusionMatrix(**common)
            feed(tm, c, preds, target)
            exact(out["confusion_matrix"], tm.compute(), "confmat " + msg)
            tm = tmc.BinaryCalibrationError(n_bins=15, norm="l1", ignore_index=ignore)
            feed(tm, c, preds, target)
            close(out["ece"], tm.compute(), "ece " + msg, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_elementwise_random(base_seed, device, task):
    multilabel = task == "multilabel"
    for i in range(CASES):
        seed = base_seed + 1000 * i + (2 if multilabel else 5)
        c = elementwise_case(seed, multilabel)
        c["batches"] = split_batches(c["rng"], c["N"])
        msg = (f"seed={seed} N={c['N']} L={c['L']} extra={c['extra']} dtype={c['dtype']} ignore={c['ignore']} "
               f"kind={c['kind']} thr={c['threshold']}")
        kw = dict(num_labels=c["L"]) if multilabel else {}
        m = stepscope.ClassificationMetrics(task, ignore_index=c["ignore"], threshold=c["threshold"],
                                            input=c["kind"], device=device, **kw)
        for a, b in c["batches"]:
            m.update(c["preds"][a:b].to(device), c["target"][a:b].to(device))
        _elementwise_check(c, m, m.compute(), msg, multilabel)


def test_binary_matches_sklearn(base_seed):
    for i in range(40):
        seed = base_seed + 11 * i
        g = torch.Generator().manual_seed(seed)
        N = int(np.random.default_rng(seed).integers(1, 500))
        p = torch.rand(N, generator=g)
        y = torch.randint(0, 2, (N,), generator=g)
        m = stepscope.ClassificationMetrics("binary")
        m.update(p, y)
        out = m.compute()
        yp = (p > 0.5).long().numpy()
        msg = f"seed={seed} N={N}"
        close(out["accuracy"], skm.accuracy_score(y, yp), msg)
        close(out["precision"], skm.precision_score(y, yp, zero_division=0), msg)
        close(out["recall"], skm.recall_score(y, yp, zero_division=0), msg)
        close(out["f1"], skm.f1_score(y, yp, zero_division=0), msg)
        close(out["iou"], skm.jaccard_score(y, yp, zero_division=0), msg)
        exact(out["confusion_matrix"], skm.confusion_matrix(y, yp, labels=[0, 1]), msg)
        close(out["loss"], skm.log_loss(y, p.double().numpy(), labels=[0, 1]), msg, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- edge cases and misuse
def test_empty_batch_is_a_noop():
    m = stepscope.ClassificationMetrics("multiclass", num_classes=4, device="cpu")
    m.update(torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    assert m.state.abs().sum() == 0
    out = m.compute()
    assert int(out["samples"]) == 0 and float(out["accuracy"]) == 0.0


def test_single_class():
    with pytest.warns(UserWarning, match="one logit per sample is task='binary'"):
        m = stepscope.ClassificationMetrics("multiclass", num_classes=1)
    m.update(torch.randn(50, 1), torch.zeros(50, dtype=torch.long))
    out = m.compute()
    assert float(out["accuracy"]) == 1.0 and int(out["samples"]) == 50
    close(out["loss"], 0.0, "C=1 loss")


def test_large_vocabulary_bounded_state(base_seed):
    C = 128000
    m = stepscope.ClassificationMetrics("multiclass", num_classes=C, top_k=(1, 5))
    assert not m.keeps_confusion_matrix
    g = torch.Generator().manual_seed(base_seed)
    logits = torch.randn(16, C, generator=g)
    y = torch.randint(0, C, (16,), generator=g)
    m.update(logits, y)
    assert m.state.numel() < 4 * C + 100  # O(C): no C x C anywhere
    out = m.compute()
    ref = reference_multiclass(logits, y, C, (1, 5), None, confmat=False)
    close(out["top5_accuracy"], ref["topk"][1] / 16, f"seed={base_seed}")
    with pytest.raises(ValueError, match="keeps no confusion matrix"):
        m.confusion_matrix()
    with pytest.raises(ValueError, match="too large"):
        stepscope.ClassificationMetrics("multiclass", num_classes=C, confusion_matrix=True)


def test_out_of_range_targets_are_counted_and_reported():
    m = stepscope.ClassificationMetrics("multiclass", num_classes=3)
    m.update(torch.randn(6, 3), torch.tensor([0, 1, 2, 3, -5, 1]))
    with pytest.raises(ValueError, match=r"2 target value\(s\) were outside \[0, 3\)"):
        m.compute()
    out = m.compute(check=False)
    assert int(out["invalid_target"]) == 2 and int(out["samples"]) == 4
    b = stepscope.ClassificationMetrics("binary")
    b.update(torch.rand(4), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="not 0 or 1"):
        b.compute()


def test_nonfinite_predictions_are_counted_and_excluded():
    m = stepscope.ClassificationMetrics("multiclass", num_classes=3)
    x = torch.tensor([[1.0, 2.0, 0.0], [float("nan"), 0.0, 0.0], [0.0, float("inf"), 1.0], [3.0, 0.0, 0.0]])
    m.update(x, torch.tensor([1, 0, 1, 0]))
    with pytest.warns(UserWarning, match="2 sample"):
        out = m.compute()
    assert int(out["nonfinite"]) == 2 and int(out["samples"]) == 2
    assert float(out["accuracy"]) == 1.0 and torch.isfinite(out["loss"])


def test_ignore_index_counts_nowhere():
    m = stepscope.ClassificationMetrics("multiclass", num_classes=3, ignore_index=-100)
    m.update(torch.randn(5, 3), torch.tensor([-100, -100, -100, -100, -100]))
    out = m.compute()
    assert int(out["ignored"]) == 5 and int(out["samples"]) == 0
    assert int(out["confusion_matrix"].sum()) == 0


MISUSE_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", MISUSE_DEVICES)
@pytest.mark.parametrize(
    "preds,target,kw,match",
    [
        (torch.randn(64, 10), torch.zeros(32, dtype=torch.long), {}, r"got preds \[64, 10\] and target \[32\]"),
        (torch.randn(8, 4), torch.zeros(7, dtype=torch.long), {"num_classes": 4}, r"got preds \[8, 4\] and target \[7\]"),
        (torch.randn(8, 5), torch.zeros(8, dtype=torch.long), {}, r"preds has 5 classes in dim 1 but num_classes = 10"),
        (torch.randn(8), torch.zeros(8, dtype=torch.long), {}, r"preds must have shape \[N, C\]"),
        (torch.randn(8, 10), torch.zeros(8, 2, dtype=torch.long), {}, "target must have shape"),
        (torch.randn(0, 0), torch.zeros(1, 2, 3, 4, dtype=torch.long), {}, "preds has 0 classes"),
    ],
)
def test_bad_shapes_raise_before_anything_changes(preds, target, kw, match, device):
    kw = {"num_classes": 10, **kw}
    m = stepscope.ClassificationMetrics("multiclass", device=device, **kw)
    with pytest.raises(ValueError, match=match):
        m.update(preds.to(device), target.to(device))
    assert m.state.abs().sum() == 0


@pytest.mark.parametrize("device", MISUSE_DEVICES)
def test_bad_dtypes_and_devices(device):
    m = stepscope.ClassificationMetrics("multiclass", num_classes=4, device=device)
    with pytest.raises(TypeError, match="preds must be a floating tensor"):
        m.update(torch.zeros(3, 4, dtype=torch.long, device=device), torch.zeros(3, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        m.update(torch.randn(3, 4, device=device), torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="same device"):
        m.update(torch.randn(3, 4, device="meta"), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="same device"):
        m.update(torch.randn(3, 4, device=device), torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="num_classes"):
        stepscope.ClassificationMetrics("multiclass", num_classes=0)
    with pytest.raises(ValueError, match="top_k"):
        stepscope.ClassificationMetrics("multiclass", num_classes=3, top_k=(4,))
    with pytest.raises(ValueError, match="task must be"):
        stepscope.ClassificationMetrics("regression", num_classes=3)
    with pytest.raises(ValueError, match="same shape"):
        stepscope.ClassificationMetrics("binary", device=device).update(
            torch.rand(4, device=device), torch.zeros(5, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"labels in dim 1 but num_labels = 3"):
        stepscope.ClassificationMetrics("multilabel", num_labels=3, device=device).update(
            torch.rand(4, 2, device=device), torch.zeros(4, 2, dtype=torch.long, device=device))
    assert m.state.abs().sum() == 0


def run_fuzz(device: str, seed: int, cases: int) -> dict:
    """The misuse fuzz in a child process: a crash there is a failed case, not a dead test run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("misuse_fuzz.py")
    p = subprocess.run([sys.executable, str(script), "--device", device, "--seed", str(seed), "--cases", str(cases)],
                       capture_output=True, text=True, timeout=600)
    out = {}
    for line in p.stdout.splitlines():
        rec = json.loads(line)
        out[rec["seed"]] = rec["outcome"]
    last = max(out, default=seed - 1)
    assert p.returncode == 0 and len(out) == cases, (
        f"misuse fuzz on {device} died (rc {p.returncode}) at case seed {last + 1} "
        f"(replay: python {script} --device {device} --seed {last + 1} --cases 1)\n{p.stderr[-2000:]}")
    return out


def test_misuse_fuzz_cpu_never_crashes(base_seed):
    out = run_fuzz("cpu", base_seed, 400)
    bad = {s: o for s, o in out.items() if not (o == "ok" or o.startswith(("TypeError:", "ValueError:")))}
    assert not bad, f"base seed {base_seed}: {bad}"
    # The fuzz must reach the op's checks and its kernels, not just the constructor.
    assert sum(o == "ok" for o in out.values()) >= 20
    assert sum("stepscope: preds" in o or "stepscope: target" in o for o in out.values()) >= 50


@pytest.mark.cuda
def test_misuse_fuzz_cuda_raises_what_cpu_raises(base_seed):
    cpu = run_fuzz("cpu", base_seed, 400)
    cuda = run_fuzz("cuda", base_seed, 400)
    differ = {}
    for s, o in cpu.items():
        c = cuda[s]
        if c == o:
            continue
        if c.startswith("TypeError:") and "float64 preds are supported on CPU only" in c and (
                o == "ok" or not o.startswith("ValueError: stepscope: preds")
                and not o.startswith("ValueError: stepscope: target must")):
            continue  # float64 is a CPU-only dtype, said as such once the shapes are right
        differ[s] = (o, c)
    assert not differ, f"base seed {base_seed}: cpu vs cuda {differ}"


def test_target_dtypes(base_seed):
    g = torch.Generator().manual_seed(base_seed)
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 6, (40,), generator=g)
    outs = []
    for dt in [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]:
        m = stepscope.ClassificationMetrics("multiclass", num_classes=6)
        m.update(x, y.to(dt))
        outs.append(m.state)
    for s in outs[1:]:
        assert torch.equal(s, outs[0])
    b1 = stepscope.ClassificationMetrics("binary")
    b2 = stepscope.ClassificationMetrics("binary")
    t = torch.randint(0, 2, (40,), generator=g)
    b1.update(x[:, 0], t.bool())
    b2.update(x[:, 0], t)
    assert torch.equal(b1.state, b2.state)


def test_reset_and_state_dict_round_trip(base_seed):
    g = torch.Generator().manual_seed(base_seed)
    m = stepscope.ClassificationMetrics("multiclass", num_classes=5, top_k=(1, 3))
    x, y = torch.randn(30, 5, generator=g), torch.randint(0, 5, (30,), generator=g)
    m.update(x[:10], y[:10])
    sd = m.state_dict()
    m2 = stepscope.ClassificationMetrics("multiclass", num_classes=5, top_k=(1, 3))
    m2.load_state_dict(sd)
    m.update(x[10:], y[10:])
    m2.update(x[10:], y[10:])
    assert torch.equal(m.state, m2.state)
    torch.save(sd, "/tmp/_stepscope_sd.pt")
    m3 = stepscope.ClassificationMetrics("multiclass", num_classes=5, top_k=(1, 3))
    m3.load_state_dict(torch.load("/tmp/_stepscope_sd.pt"))
    assert torch.equal(m3.state, sd["state"])
    with pytest.raises(ValueError, match="saved with config"):
        stepscope.ClassificationMetrics("multiclass", num_classes=6).load_state_dict(sd)
    m.reset()
    assert m.state.abs().sum() == 0


# ----------------------------------------------------------------------------- op registration
def _op_args(task, device="cpu"):
    g = torch.Generator().manual_seed(0)
    if task == "multiclass":
        m = stepscope.ClassificationMetrics("multiclass", num_classes=7, top_k=(1, 3), ignore_index=-1, device=device)
        preds, target = torch.randn(12, 7, generator=g), torch.randint(-1, 7, (12,), generator=g)
    elif task == "binary":
        m = stepscope.ClassificationMetrics("binary", device=device)
        preds, target = torch.randn(12, 3, generator=g), torch.randint(0, 2, (12, 3), generator=g)
    else:
        m = stepscope.ClassificationMetrics("multilabel", num_labels=4, device=device)
        preds, target = torch.rand(12, 4, generator=g), torch.randint(0, 2, (12, 4), generator=g)
    args = (preds.to(device), target.to(device), m.state, {"binary": 0, "multiclass": 1, "multilabel": 2}[task],
            m.num_classes, list(m.top_k), m.ignore_index, m.threshold, 0, m.keeps_confusion_matrix)
    return m, args


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel"])
def test_opcheck(task):
    _, args = _op_args(task)
    torch.library.opcheck(torch.ops.stepscope.classification_update.default, args)


def test_torch_compile_fullgraph(base_seed):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(base_seed)
    eager = stepscope.ClassificationMetrics("multiclass", num_classes=5, top_k=(1, 2), device="cpu")
    compiled = stepscope.ClassificationMetrics("multiclass", num_classes=5, top_k=(1, 2), device="cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, y):
        logits = x * 2.0
        compiled.update(logits, y)
        return logits.sum()

    for _ in range(3):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
        step(x, y)
        eager.update(x * 2.0, y)
    assert torch.equal(compiled.state, eager.state)


# ----------------------------------------------------------------------------- distributed
def _gloo_worker(rank, world, init_file, seed, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(world * 37, 9, generator=g), torch.randint(0, 9, (world * 37,), generator=g)
    m = stepscope.ClassificationMetrics("multiclass", num_classes=9, top_k=(1, 3), device="cpu")
    m.update(x[rank::world], y[rank::world])
    m.sync()
    if rank == 0:
        queue.put(m.state.clone())
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_sync_equals_single_process(tmp_path, base_seed, world):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, world, str(tmp_path / "init"), base_seed, q))
             for r in range(world)]
    for p in procs:
        p.start()
    synced = q.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    g = torch.Generator().manual_seed(base_seed)
    x, y = torch.randn(world * 37, 9, generator=g), torch.randint(0, 9, (world * 37,), generator=g)
    single = stepscope.ClassificationMetrics("multiclass", num_classes=9, top_k=(1, 3), device="cpu")
    single.update(x, y)
    s, ref = synced, single.state
    lay = single._cfg.layout
    # Counts exactly; the float64 loss/confidence sums to rounding (summation order differs).
    floats = {lay["loss"]} | set(range(lay["ece_conf"], lay["ece_conf"] + 16))
    counts = [i for i in range(ref.numel()) if i not in floats]
    assert torch.equal(s[counts], ref[counts])
    torch.testing.assert_close(s, ref, rtol=1e-12, atol=1e-9)


# ----------------------------------------------------------------------------- multiclass 'auto'
def _readings(preds, target, C, device, **kw):
    """Our state for input='auto', 'logits' and 'probs' on the same batch."""
    out = {}
    for kind in ("auto", "logits", "probs"):
        m = stepscope.ClassificationMetrics("multiclass", num_classes=C, input=kind, device=device, **kw)
        m.update(preds, target)
        out[kind] = m
    return out


def _same_reading(auto, other):
    """Every state block of `auto` equals `other`'s (the pending scratch is zero again)."""
    la, lo = auto._cfg.layout, other._cfg.layout
    assert la["pending"] >= 0 and lo["pending"] == -1
    a = auto.state.cpu()
    assert not a[la["pending"]:la["pending"] + 100].any(), "pending scratch not cleared"
    keep = torch.cat([a[:la["pending"]], a[la["pending"] + 100:]])
    # CUDA sums its float64 loss and confidence with atomics, in no fixed order.
    tol = dict(rtol=1e-12, atol=1e-9) if auto.state.device.type == "cpu" else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(keep, other.state.cpu(), **tol)


@pytest.mark.parametrize("device", MISUSE_DEVICES)
def test_multiclass_auto_reads_softmax_as_probabilities(device, base_seed):
    g = torch.Generator().manual_seed(base_seed)
    C = 10
    logits = torch.randn(300, C, generator=g) * 3
    target = torch.randint(0, C, (300,), generator=g)
    probs = logits.softmax(1)
    for x, expect in ((probs, "probs"), (logits, "logits"), (logits.log_softmax(1), "logits")):
        r = _readings(x.to(device), target.to(device), C, device)
        _same_reading(r["auto"], r[expect])
    # torchmetrics 1.9 reads the softmax outputs as probabilities too: same ECE.
    m = stepscope.ClassificationMetrics("multiclass", num_classes=C, device=device)
    m.update(probs.to(device), target.to(device))
    ref = tmc.MulticlassCalibrationError(num_classes=C, n_bins=15, norm="l1")(probs, target)
    torch.testing.assert_close(m.compute()["ece"].cpu(), ref, rtol=1e-5, atol=1e-6)
    loss = torch.nn.functional.nll_loss(probs.log(), target)
    torch.testing.assert_close(m.compute()["loss"].cpu(), loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", MISUSE_DEVICES)
def test_multiclass_auto_one_value_outside_makes_the_batch_logits(device, base_seed):
    # A large batch of probabilities with a single value outside [0, 1] (in the first, a middle
    # or the last row): the whole batch is read as logits, as torchmetrics does. In an ignored
    # row the value does not count (torchmetrics drops those rows first): still probabilities.
    g = torch.Generator().manual_seed(base_seed)
    C = 37
    for n, where in ((5000, "last"), (5000, "ignored"), (5000, "first"), (5000, "middle")):
        probs = torch.randn(n, C, generator=g).softmax(1)
        target = torch.randint(0, C, (n,), generator=g)
        row = {"last": n - 1, "first": 0, "ignored": n // 2, "middle": n // 3}[where]
        probs[row, 3] = 1.5
        if where == "ignored":
            target[row] = -100
        r = _readings(probs.to(device), target.to(device), C, device, ignore_index=-100)
        _same_reading(r["auto"], r["probs" if where == "ignored" else "logits"])
        # Without the outlier the same batch is probabilities.
        probs[row, 3] = 0.5
        r = _readings(probs.to(device), target.to(device), C, device, ignore_index=-100)
        _same_reading(r["auto"], r["probs"])


def test_multiclass_auto_decides_per_update(base_seed):
    g = torch.Generator().manual_seed(base_seed)
    C = 5
    logits = torch.randn(64, C, generator=g) * 4
    target = torch.randint(0, C, (64,), generator=g)
    auto = stepscope.ClassificationMetrics("multiclass", num_classes=C)
    ref_l = stepscope.ClassificationMetrics("multiclass", num_classes=C, input="logits")
    ref_p = stepscope.ClassificationMetrics("multiclass", num_classes=C, input="probs")
    auto.update(logits, target)
    auto.update(logits.softmax(1), target)
    ref_l.update(logits, target)
    ref_p.update(logits.softmax(1), target)
    torch.testing.assert_close(auto.compute()["loss"], (ref_l.compute()["loss"] + ref_p.compute()["loss"]) / 2)


# ----------------------------------------------------------------------------- CUDA
def assert_cuda_state_matches(gpu_state, cpu_state, lay, msg):
    """Every count exact, except that a sample may fall in the neighbouring calibration bin: its
    confidence, a float32 softmax maximum, is summed in another order on each device (and with
    the hardware exp2 on the GPU), so one whose confidence lies within ~1e-6 of a bin edge can
    land either side. The last two slots (conf in [14/15, 1) and conf == 1.0 exactly) are one bin
    here: a confident sample's 1 / sum(exp) is 1.0 or the float below it depending on whether its
    tiny terms are added to the max's 1 one by one (CPU) or together first (GPU), which moves many
    samples at once when logits are large (seen on an H200: 21 of 1368). Float sums to rounding."""
    g, c = gpu_state.cpu(), cpu_state
    ece = set(range(lay["ece_count"], lay["ece_count"] + 48))  # count, conf, acc per bin
    counts = [j for j in range(c.numel()) if j not in ece | {lay["loss"]}]
    exact(g[counts], c[counts], msg)
    n = float(c[lay["valid"]])
    def merged(x, start):
        b = x[start:start + 16]
        return torch.cat([b[:14], b[14:].sum().reshape(1)])

    for start in (lay["ece_count"], lay["ece_acc"]):
        moved = float((merged(g, start) - merged(c, start)).abs().sum()) / 2
        assert moved <= 2 + 1e-4 * n, f"{msg}: {moved} samples changed calibration bin"
        assert float(g[start:start + 16].sum()) == float(c[start:start + 16].sum()), msg
    # Float sums to rounding (a moved sample carries its confidence to the next bin: totals only).
    conf = lay["ece_conf"]
    torch.testing.assert_close(g[conf:conf + 16].sum(), c[conf:conf + 16].sum(), rtol=1e-5, atol=1e-3,
                               msg=lambda m: f"{msg}: confidence total\n{m}")
    torch.testing.assert_close(g[lay["loss"]], c[lay["loss"]], rtol=1e-5, atol=1e-3, equal_nan=True,
                               msg=lambda m: f"{msg}: loss\n{m}")


@pytest.mark.cuda
@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel"])
def test_cuda_equals_cpu_and_never_syncs(base_seed, task):
    for i in range(50):
        seed = base_seed + i
        if task == "multiclass":
            c = multiclass_case(seed)
            kw = dict(num_classes=c["C"], top_k=c["ks"], ignore_index=c["ignore"], input=c["kind"])
        else:
            c = elementwise_case(seed, task == "multilabel")
            kw = dict(ignore_index=c["ignore"], threshold=c["threshold"], input=c["kind"])
            if task == "multilabel":
                kw["num_labels"] = c["L"]
        if c["dtype"] == torch.float64:
            c["preds"] = c["preds"].float()
        cpu = stepscope.ClassificationMetrics(task, device="cpu", **kw)
        gpu = stepscope.ClassificationMetrics(task, device="cuda", **kw)
        cpu.update(c["preds"], c["target"])
        p, t = c["preds"].cuda(), c["target"].cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu.update(p, t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert_cuda_state_matches(gpu.state, cpu.state, cpu._cfg.layout, f"seed={seed} task={task}")


# Shapes that reach each multiclass CUDA kernel (tile: contiguous rows of up to a few thousand
# classes; row: long rows, aligned or not; strided: classes strided, segmentation) with enough
# rows for many blocks, so that the 'auto' fold across blocks is exercised.
CUDA_PATHS = [
    ("tile C=10", lambda g: torch.randn(40000, 10, generator=g)),
    ("tile C=100 bf16", lambda g: torch.randn(20000, 100, generator=g).bfloat16()),
    ("tile C=1000 fp16", lambda g: torch.randn(3000, 1000, generator=g).half()),
    ("tile channels-last seg C=21", lambda g: torch.randn(4, 21, 32, 48, generator=g).contiguous(
        memory_format=torch.channels_last)),
    ("row C=5000", lambda g: torch.randn(600, 5000, generator=g)),
    ("row C=32000 bf16", lambda g: torch.randn(300, 32000, generator=g).bfloat16()),
    ("row unaligned C=3001", lambda g: torch.randn(500, 3002, generator=g)[:, 1:]),
    ("strided seg C=21", lambda g: torch.randn(4, 21, 32, 48, generator=g)),
    ("strided seg C=150 bf16", lambda g: torch.randn(2, 150, 24, 40, generator=g).bfloat16()),
    ("strided transposed C=37", lambda g: torch.randn(37, 9000, generator=g).t()),
]


@pytest.mark.cuda
@pytest.mark.parametrize("name,make", CUDA_PATHS, ids=[p[0] for p in CUDA_PATHS])
@pytest.mark.parametrize("data", ["logits", "probs"])
def test_cuda_kernel_paths_equal_cpu(base_seed, name, make, data):
    g = torch.Generator().manual_seed(base_seed)
    x = make(g)
    if data == "probs":
        x = x.float().softmax(1).to(x.dtype)
        x = x.clamp(0, 1)  # bf16/fp16 rounding may not leave every value in [0, 1] otherwise
    C = x.shape[1]
    tshape = (x.shape[0],) + tuple(x.shape[2:])
    target = torch.randint(0, C, tshape, generator=g)
    target[torch.rand(tshape, generator=g) < 0.05] = -1
    target[torch.rand(tshape, generator=g) < 0.01] = C + 3  # invalid
    for kind in ("auto", "logits", "probs"):
        kw = dict(num_classes=C, top_k=(1, 5), ignore_index=-1, input=kind, confusion_matrix=C <= 1024)
        cpu = stepscope.ClassificationMetrics("multiclass", device="cpu", **kw)
        gpu = stepscope.ClassificationMetrics("multiclass", device="cuda", **kw)
        cpu.update(x, target)
        xg, tg = x.cuda(), target.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu.update(xg, tg)
            gpu.update(xg, tg)  # twice: the 'auto' scratch must be clear after the first
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cpu.update(x, target)
        assert_cuda_state_matches(gpu.state, cpu.state, cpu._cfg.layout,
                                  f"{name} data={data} input={kind} seed={base_seed}")


@pytest.mark.cuda
def test_cuda_one_launch_and_graph_capture(base_seed):
    from torch.profiler import ProfilerActivity, profile

    m = stepscope.ClassificationMetrics("multiclass", num_classes=1000, top_k=(1, 5), device="cuda")
    x = torch.randn(4096, 1000, device="cuda")
    y = torch.randint(0, 1000, (4096,), device="cuda")
    m.update(x, y)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        m.update(x, y)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]
    # CUDA graph capture and replay.
    m.reset()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m.update(x, y)
    torch.cuda.current_stream().wait_stream(s)
    m.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        m.update(x, y)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    ref = stepscope.ClassificationMetrics("multiclass", num_classes=1000, top_k=(1, 5), device="cpu")
    ref.update(x.cpu(), y.cpu())
    assert int(m.compute()["samples"]) == 3 * 4096
    exact(m.state.cpu()[ref._cfg.layout["tp"]:ref._cfg.layout["tp"] + 1000] / 3,
          ref.state[ref._cfg.layout["tp"]:ref._cfg.layout["tp"] + 1000], f"seed={base_seed}")


@pytest.mark.cuda
def test_cuda_opcheck():
    for task in ["multiclass", "binary", "multilabel"]:
        _, args = _op_args(task, device="cuda")
        torch.library.opcheck(torch.ops.stepscope.classification_update.default, args)


def test_warnings_are_not_errors():
    # compute() on a healthy state emits nothing.
    m = stepscope.ClassificationMetrics("multiclass", num_classes=3)
    m.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.compute()


# ----------------------------------------------------------------------------- as an nn.Module
def test_module_to_and_state_dict_through_a_parent(base_seed):
    g = torch.Generator().manual_seed(base_seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 5)
            self.acc = stepscope.ClassificationMetrics("multiclass", num_classes=5, top_k=(1, 2))

    a, b = Net(), Net()
    assert isinstance(a.acc, torch.nn.Module)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 5, (40,), generator=g)
    a.acc.update(x, y)
    sd = a.state_dict()
    assert "acc.state" in sd and "acc._extra_state" in sd
    assert sd["acc._extra_state"]["num_classes"] == 5
    b.load_state_dict(sd)
    assert torch.equal(b.acc.state, a.acc.state)
    b.acc.update(x, y)
    a.acc.update(x, y)
    assert torch.equal(b.acc.state, a.acc.state)
    # a parent's dtype change leaves the counts in float64; .to() moves the buffer
    b.double().half()
    assert b.acc.state.dtype == torch.float64 and b.lin.weight.dtype == torch.float16
    b.to("meta")
    assert b.acc.state.device.type == "meta"
    # a different configuration is refused before anything is copied
    c = Net()
    c.acc = stepscope.ClassificationMetrics("multiclass", num_classes=5, top_k=(1, 3))
    with pytest.raises(ValueError, match="saved with config"):
        c.load_state_dict(sd)
    assert c.acc.state.abs().sum() == 0
    # persistent=False leaves it out of the parent's state_dict
    c.acc = stepscope.ClassificationMetrics("multiclass", num_classes=5, persistent=False)
    assert "acc.state" not in c.state_dict()


@pytest.mark.parametrize("device", DEVICES)
def test_module_to_device_and_first_update_placement(device):
    m = stepscope.ClassificationMetrics("multiclass", num_classes=3)
    assert m.state.device.type == "cpu"
    m.to(device)
    assert m.state.device.type == device
    m.update(torch.randn(4, 3, device=device), torch.randint(0, 3, (4,), device=device))
    assert int(m.compute()["samples"]) == 4


def test_forward_returns_the_batch_and_accumulates(base_seed):
    g = torch.Generator().manual_seed(base_seed)
    m = stepscope.ClassificationMetrics("multiclass", num_classes=7, top_k=(1, 3), ignore_index=-100)
    total = stepscope.ClassificationMetrics("multiclass", num_classes=7, top_k=(1, 3), ignore_index=-100)
    for i in range(3):
        x, y = torch.randn(32, 7, generator=g), torch.randint(0, 7, (32,), generator=g)
        y[::5] = -100
        got = m(x, y)
        fresh = stepscope.ClassificationMetrics("multiclass", num_classes=7, top_k=(1, 3), ignore_index=-100)
        fresh.update(x, y)
        want = fresh.compute()
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"{k} seed={base_seed}"
        total.update(x, y)
        # the batch's state is added to the total: float sums (loss, ECE) may round differently
        torch.testing.assert_close(m.state, total.state, rtol=1e-12, atol=1e-9)
        assert torch.equal(m.confusion_matrix(), total.confusion_matrix())


def test_scalars_and_log_dict_only_single_numbers(base_seed):
    g = torch.Generator().manual_seed(base_seed)
    m = stepscope.ClassificationMetrics("multiclass", num_classes=4)
    m.update(torch.randn(20, 4, generator=g), torch.randint(0, 4, (20,), generator=g))
    full, sc = m.compute(), m.compute(scalars=True)
    assert set(sc) == {k for k, v in full.items() if v.numel() == 1}
    assert "accuracy_per_class" in full and "accuracy_per_class" not in sc and "confusion_matrix" not in sc
    assert {"accuracy", "f1_macro", "loss"} <= set(sc)
    logged = m.log_dict("train/")
    assert set(logged) == {"train/" + k for k in sc}
    assert torch.equal(logged["train/accuracy"], sc["accuracy"])
    assert all(v.is_floating_point() for v in logged.values())
    assert float(logged["train/samples"]) == 20


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 4)])
def test_class_dim_last_equals_the_permuted_call(base_seed, shape):
    g = torch.Generator().manual_seed(base_seed)
    V = 11
    logits = torch.randn(*shape, V, generator=g)
    target = torch.randint(0, V, shape, generator=g)
    target.view(-1)[::4] = -100
    last = stepscope.ClassificationMetrics("multiclass", num_classes=V, top_k=(1, 5), ignore_index=-100,
                                           class_dim=-1)
    ref = stepscope.ClassificationMetrics("multiclass", num_classes=V, top_k=(1, 5), ignore_index=-100)
    last.update(logits, target)
    ref.update(logits.movedim(-1, 1).contiguous(), target)
    assert torch.equal(last.state, ref.state), f"seed={base_seed}"
    # the kernel reads the movedim view in place: no contiguous copy is made
    view = last._inputs(logits, target)[0]
    assert view.data_ptr() == logits.data_ptr() and not view.is_contiguous()
    # multilabel [N, d, L] too
    ml = torch.randn(5, 3, 4, generator=g)
    mt = torch.randint(0, 2, (5, 3, 4), generator=g)
    a = stepscope.ClassificationMetrics("multilabel", num_labels=4, class_dim=-1)
    b = stepscope.ClassificationMetrics("multilabel", num_labels=4)
    a.update(ml, mt)
    b.update(ml.movedim(-1, 1).contiguous(), mt.movedim(-1, 1).contiguous())
    assert torch.equal(a.state, b.state)


def test_class_dim_bad_values_are_refused():
    with pytest.raises(TypeError, match="class_dim"):
        stepscope.ClassificationMetrics("multiclass", num_classes=3, class_dim=1.0)
    with pytest.raises(ValueError, match="binary"):
        stepscope.ClassificationMetrics("binary", class_dim=-1)
    m = stepscope.ClassificationMetrics("multiclass", num_classes=3, class_dim=3)
    with pytest.raises(ValueError, match="class_dim=3 is out of range"):
        m.update(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- copies and pickles
class _Holder(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.lin = torch.nn.Linear(4, 5)
        self.metrics = stepscope.ClassificationMetrics("multiclass", num_classes=5, top_k=(1, 2), ignore_index=-1,
                                                       **kw)

    def forward(self, x):
        return self.lin(x)


def _saved_and_loaded(model):
    import io

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": lambda m: __import__("copy").deepcopy(m),
    "AveragedModel": lambda m: torch.optim.swa_utils.AveragedModel(m).module,
    "torch.save": _saved_and_loaded,
    "pickle": lambda m: __import__("pickle").loads(__import__("pickle").dumps(m)),
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("updated", [True, False])
def test_copies_and_pickles_keep_their_own_state(how, updated, base_seed):
    g = torch.Generator().manual_seed(base_seed)
    x, y = torch.randn(40, 5, generator=g), torch.randint(-1, 5, (40,), generator=g)
    model = _Holder()
    if updated:
        model.metrics.update(x[:20], y[:20])
    copy_ = COPIES[how](model)
    cm = copy_.metrics
    assert cm is not model.metrics
    assert torch.equal(cm.state, model.metrics.state)
    assert cm.state.data_ptr() != model.metrics.state.data_ptr()
    assert cm._config_dict() == model.metrics._config_dict() and cm._placed == model.metrics._placed
    # Independent from here on: the copy accumulates, the original does not see it.
    before = model.metrics.state.clone()
    cm.update(x[20:], y[20:])
    assert torch.equal(model.metrics.state, before)
    ref = stepscope.ClassificationMetrics("multiclass", num_classes=5, top_k=(1, 2), ignore_index=-1)
    if updated:
        ref.update(x[:20], y[:20])
    ref.update(x[20:], y[20:])
    assert torch.equal(cm.state, ref.state)
    for k, v in ref.compute().items():
        torch.testing.assert_close(cm.compute()[k], v, msg=k)
    assert int(cm(x[:4], y[:4])["samples"]) == int((y[:4] != -1).sum())  # forward works on the copy


def test_deepcopy_shares_the_process_group_and_a_pickle_drops_it():
    sentinel = object()  # a process group cannot be copied or pickled; the copy keeps the same one
    m = stepscope.ClassificationMetrics("binary", process_group=sentinel)
    assert __import__("copy").deepcopy(m).process_group is sentinel
    m.process_group = None
    assert __import__("pickle").loads(__import__("pickle").dumps(m)).process_group is None


# A ClassificationMetrics("binary", threshold=0.25, ignore_index=-1) after one update, pickled (zlib,
# base64) by the version that kept the configuration as plain attributes: pickles keep that form.
_OLD_PICKLE = (
    "eNq1VEtrU0EUTtKk77dWtBVxmW5C7UNbXLRoUTC0at1kI4fJvZNkzM3MvTNz20Yo1EWhlQEXjkLBhbjyLwgu/AFdCP4KwUVX"
    "giDouUlqmzZUBDuLDPOd77xy7vk2k69utsdqxwwpTX3lCJ9mKlRL5ihrRm57RClWYA7RTPClBv7Sjj+zGzZtOrUkjDNetNum"
    "B3wiCbpSqdBoOiEfFgqNR0ppoqk1vVpIp5SBUDMP4w+DpPmQeS5oypWQsDqJwdOmr05TeJEiug2CJ4gLBSkqkK9qGpVw62Mi"
    "FttMPO/2fr658+Pqk/cPLmU2E0tf2/B3I4ilc4PYlS+FFo7wYBULwQ6COBJyfWjxmNYeBcpdRniQ2M51I6irPgXFnlIVtG0E"
    "yXQuhaAqCamDVDaRa8MX4zpozyZzySiG4MWgI5sMQ8yZznVE5HrJQcyptdC9KMK8Rx/V0e4gnutH0tz01Mzs3MT0tcmZG9cn"
    "gnpgxw+Dtuzssg6SDzHc4yDWihsnmdlY01lofXdG9/nX777PN9P3j73/hv/rOTXO293dD63sC1NTX/5H/k97e9/mz6DuM4iz"
    "P2+37IrNxrKzWzYb37I7pgc/VI860abhbvTcly6V1F1kjo42bsVq5CszBlxw8KPvGTeW64M1A0W1fWHNOcgTp7xGpAu+pFAS"
    "oqxs6SL6m4FD01H4AjAFhdDzms122fRDQcgT/NFmFNaYLkHkVzxgXD7GIN4aqSpwCPbnNjjDfzjHy7xy0tIixxDUNAVc/H+a"
    "3EeOGo7HHq0rySmMsZMMoZozdEJFuKFHa9I2oKrcARyJIyp+iCK3bPpQdhyqFBSlCH0EemsczSpUhBrfgxAB1AWGk/SIQ3H6"
    "SU1U2Zr2PONEVnH+PKyAE+kv5snGTUoLH8p23PSyIhdYNOMuXbf3fuExXbokKQqV59q7858bip5iHAuyJklCLXDMZYoCj2Xy"
    "QhhpIVQIyvl6lDpPNUHH/YZjVy0tNl+JEg9it6tUwSG4YzrqZbt2O8xnfgNsHr77"
)


def test_a_pickle_of_the_earlier_configuration_form_loads():
    import base64
    import pickle
    import zlib

    old = pickle.loads(zlib.decompress(base64.b64decode(_OLD_PICKLE)))
    ref = stepscope.ClassificationMetrics("binary", threshold=0.25, ignore_index=-1)
    ref.update(torch.tensor([0.1, 0.9, 0.3, 0.7]), torch.tensor([0, 1, 1, -1]))
    assert old._config_dict() == ref._config_dict() and repr(old) == repr(ref)
    assert (old.task, old.threshold, old.ignore_index, old.top_k) == ("binary", 0.25, -1, ())
    assert torch.equal(old.state, ref.state)
    old.update(torch.tensor([0.2, 0.8]), torch.tensor([1, 1]))
    ref.update(torch.tensor([0.2, 0.8]), torch.tensor([1, 1]))
    for k, v in ref.compute().items():
        torch.testing.assert_close(old.compute()[k], v, msg=k)
    # And what this version pickles keeps the plain fields, so an earlier version reads it too.
    state = ref.__getstate__()
    assert {k: state[k] for k in ("task", "num_classes", "top_k", "ignore_index", "threshold", "input",
                                  "keeps_confusion_matrix")} == {
        "task": "binary", "num_classes": 1, "top_k": (), "ignore_index": -1, "threshold": 0.25, "input": "auto",
        "keeps_confusion_matrix": False}


def test_the_configuration_is_read_only_and_one_object():
    m = stepscope.ClassificationMetrics("multiclass", num_classes=4, top_k=(1, 2), threshold=0.5)
    with pytest.raises(AttributeError):
        m.threshold = 0.3  # would not reach the op's arguments, which are built once
    assert m._op_args == (1, 4, [1, 2], None, 0.5, 0, True, 0)
    assert m._cfg.numel == m.state.numel() and m._cfg.layout["numel"] == m.state.numel()
    assert m._config_dict() == {"task": "multiclass", "num_classes": 4, "top_k": [1, 2], "ignore_index": None,
                                "threshold": 0.5, "input": "auto", "confusion_matrix": True}


def test_metrics_config_is_parsed_from_the_op_arguments():
    m = stepscope.ClassificationMetrics("multiclass", num_classes=6, top_k=(1, 3), ignore_index=-1)
    from stepscope import _C

    assert _C.MetricsConfig(*m._op_args).layout == m._cfg.layout
    assert _C.MetricsConfig(*m._op_args[:7]).layout == m._cfg.layout  # thresholds may be left out
    with pytest.raises(ValueError, match="8 configuration arguments"):
        _C.MetricsConfig(*m._op_args[:6])
    with pytest.raises(ValueError, match="num_classes"):
        _C.MetricsConfig(1, 0, [1], None, 0.5, 0, True)


# The state's offsets as the sequential layout code placed them before the block table: saved states
# and the kernels depend on them, so the table must reproduce them exactly.
_EARLIER_LAYOUTS = [
    ({"task": "multiclass", "num_classes": 5, "top_k": (1, 3)},
     {"classes": 5, "tp": 0, "pred": 5, "target": 10, "valid": 15, "valid_len": 1, "topk": 16,
      "loss": 18, "ece_count": 19, "ece_conf": 35, "ece_acc": 51, "nonfinite": 67, "invalid": 68,
      "ignored": 69, "pending": 70, "confmat": 170, "numel": 195}),
    ({"task": "multiclass", "num_classes": 7, "input": "logits", "confusion_matrix": False},
     {"classes": 7, "tp": 0, "pred": 7, "target": 14, "valid": 21, "valid_len": 1, "topk": 22,
      "loss": 23, "ece_count": 24, "ece_conf": 40, "ece_acc": 56, "nonfinite": 72, "invalid": 73,
      "ignored": 74, "pending": -1, "confmat": -1, "numel": 75}),
    ({"task": "binary"},
     {"classes": 1, "tp": 0, "pred": 1, "target": 2, "valid": 3, "valid_len": 1, "topk": -1, "loss": 4,
      "ece_count": 5, "ece_conf": 21, "ece_acc": 37, "nonfinite": 53, "invalid": 54, "ignored": 55,
      "pending": -1, "confmat": -1, "numel": 56}),
    ({"task": "multilabel", "num_labels": 4, "input": "probs"},
     {"classes": 4, "tp": 0, "pred": 4, "target": 8, "valid": 12, "valid_len": 4, "topk": -1, "loss": 16,
      "ece_count": 17, "ece_conf": 33, "ece_acc": 49, "nonfinite": 65, "invalid": 66, "ignored": 67,
      "pending": -1, "confmat": -1, "numel": 68}),
]


@pytest.mark.parametrize("kw,expected", _EARLIER_LAYOUTS)
def test_layout_offsets_are_those_of_earlier_versions(kw, expected):
    lay = stepscope.ClassificationMetrics(**kw)._cfg.layout
    assert {k: lay[k] for k in expected} == expected
    assert lay["dense"] == (expected["confmat"] if expected["confmat"] >= 0 else expected["numel"])


# ----------------------------------------------------------------------------- unsigned and float64
@pytest.mark.parametrize("dtype", [torch.uint32, torch.uint64])
@pytest.mark.parametrize("device", MISUSE_DEVICES)
def test_wide_unsigned_targets_never_wrap(dtype, device):
    x = torch.randn(6, 4, device=device)
    big = [2**32 + 2, 2**32 - 1, 3, 2**31, 1, 0] if dtype == torch.uint64 else [2**32 - 1, 2**31, 3, 2**31 + 2, 1, 0]
    t = torch.tensor(big, dtype=dtype, device=device)
    m = stepscope.ClassificationMetrics("multiclass", num_classes=4, ignore_index=-1, device=device)
    m.update(x, t)
    out = m.compute(check=False)
    assert int(out["invalid_target"]) == 3 and int(out["ignored"]) == 0 and int(out["samples"]) == 3
    ref = stepscope.ClassificationMetrics("multiclass", num_classes=4, ignore_index=-1, device=device)
    keep = torch.tensor([b < 4 for b in big], device=device)
    ref.update(x[keep], t[keep].long())
    torch.testing.assert_close(out["confusion_matrix"], ref.compute()["confusion_matrix"])
    if dtype == torch.uint64:  # past INT64_MAX: reinterpreted as int64 these would be -1 (ignore_index)
        u = torch.tensor([2**64 - 1, 2**63, 2**64 - 2], dtype=torch.uint64, device=device)
        for ig in (-1, -2, 2**63 - 1):
            m = stepscope.ClassificationMetrics("binary", ignore_index=ig, device=device)
            m.update(torch.rand(3, device=device), u)
            out = m.compute(check=False)
            assert (int(out["invalid_target"]), int(out["ignored"])) == (3, 0), ig
    b = stepscope.ClassificationMetrics("binary", device=device)
    b.update(torch.rand(3, device=device), torch.tensor([2**32 + 1, 1, 0], dtype=dtype, device=device)
             if dtype == torch.uint64 else torch.tensor([2**32 - 1, 1, 0], dtype=dtype, device=device))
    assert int(b.compute(check=False)["invalid_target"]) == 1


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_float64_elementwise_preds_keep_their_precision(task):
    # 0.50000001 is 0.5 in float32; 1e300 is finite in float64 and inf in float32.
    p = torch.tensor([[0.50000001, 0.49999999], [0.5, 0.75]], dtype=torch.float64)
    t = torch.tensor([[1, 0], [1, 1]])
    kw = {"num_labels": 2} if task == "multilabel" else {}
    m = stepscope.ClassificationMetrics(task, threshold=0.5, input="probs", **kw)
    m.update(p, t)
    ref = (tmc.MultilabelStatScores(2, average="micro") if task == "multilabel" else tmc.BinaryStatScores())
    tp, fp, tn, fn, _ = ref(p, t).tolist()
    st = m.confusion_matrix()
    st = st.sum(0) if task == "multilabel" else st
    assert [int(st[1, 1]), int(st[0, 1]), int(st[0, 0]), int(st[1, 0])] == [tp, fp, tn, fn] == [2, 0, 1, 1]
    big = stepscope.ClassificationMetrics(task, input="logits", **kw)
    x = torch.tensor([[1e300, -1e300], [-3.5e38, 4e38]], dtype=torch.float64)
    big.update(x, t)
    assert int(big.compute()["nonfinite"]) == 0
    st = big.confusion_matrix()
    st = st.sum(0) if task == "multilabel" else st
    assert [int(st[1, 1]), int(st[0, 1]), int(st[0, 0]), int(st[1, 0])] == [2, 0, 1, 1]


# ----------------------------------------------------------------------------- a bad call changes nothing
@pytest.mark.parametrize("how", ["update", "forward"])
def test_a_failing_first_update_leaves_the_state_unplaced(how):
    m = stepscope.ClassificationMetrics("multiclass", num_classes=4)
    call = m.update if how == "update" else m
    with pytest.raises(ValueError, match="same device"):
        call(torch.randn(3, 4, device="meta"), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="preds must be a torch.Tensor"):
        call([[0.0] * 4] * 3, torch.zeros(3, dtype=torch.long))
    assert m.state.device.type == "cpu" and not m._placed
    call(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    assert int(m.compute()["samples"]) == 3 and m._placed


# ----------------------------------------------------------------------------- clear errors
def _sparse():
    return torch.randn(4, 3).to_sparse()


UPDATE_MISUSE = [
    (lambda: torch.randn(4, 3).to(torch.float8_e4m3fn), lambda: torch.zeros(4, dtype=torch.long), TypeError,
     r"preds must be a floating tensor of float32, float16, bfloat16 \(or float64 on CPU\); got Float8_e4m3fn"),
    (_sparse, lambda: torch.zeros(4, dtype=torch.long), TypeError, r"preds must be a dense \(torch.strided\) tensor"),
    (lambda: torch.randn(4, 3), lambda: torch.zeros(4, dtype=torch.long).to_sparse(), TypeError,
     r"target must be a dense"),
    (lambda: [[0.1, 0.2, 0.7]] * 4, lambda: torch.zeros(4, dtype=torch.long), TypeError,
     r"preds must be a torch.Tensor; got list"),
    (lambda: np.zeros((4, 3), dtype=np.float32), lambda: torch.zeros(4, dtype=torch.long), TypeError,
     r"preds must be a torch.Tensor; got ndarray"),
    (lambda: torch.randn(4, 3), lambda: [0, 1, 2, 0], TypeError, r"target must be a torch.Tensor; got list"),
]


@pytest.mark.parametrize("placed", [True, False])
@pytest.mark.parametrize("class_dim", [1, -1])
@pytest.mark.parametrize("preds,target,exc,match", UPDATE_MISUSE)
def test_update_misuse_names_the_argument(preds, target, exc, match, placed, class_dim):
    m = stepscope.ClassificationMetrics("multiclass", num_classes=3, class_dim=class_dim,
                                        device="cpu" if placed else None)
    for call in (m.update, m):
        with pytest.raises(exc, match=match):
            call(preds(), target())
    assert m.state.abs().sum() == 0


CONSTRUCTOR_MISUSE = [
    ({"top_k": 2.7}, TypeError, r"top_k must be an int or a sequence of at most 8 distinct ints; got float 2.7"),
    ({"top_k": (1, 2.0)}, TypeError, r"top_k must be an int or a sequence"),
    ({"top_k": (1, 2, 1)}, ValueError, r"top_k must be .*\[1, 2, 1\] \(a value repeats\)"),
    ({"top_k": "2"}, TypeError, r"top_k must be"),
    ({"top_k": True}, TypeError, r"top_k must be"),
    ({"threshold": "0.5x"}, TypeError, r"threshold must be a number in \[0, 1\]; got str '0.5x'"),
    ({"threshold": "0.5"}, TypeError, r"threshold must be a number"),
    ({"ignore_index": "x"}, TypeError, r"ignore_index must be an int \(a target value to skip\) or None; got str"),
    ({"ignore_index": 1.5}, TypeError, r"ignore_index must be an int .*got float 1.5"),
    ({"ignore_index": True}, TypeError, r"ignore_index must be an int"),
    ({"num_classes": 2.5}, TypeError, r"num_classes must be a positive int \(the number of classes\); got float 2.5"),
    ({"num_classes": "3"}, TypeError, r"num_classes must be a positive int .*got str '3'"),
    ({"num_classes": True}, TypeError, r"num_classes must be a positive int .*got bool True"),
    ({"num_classes": 3.0}, TypeError, r"num_classes must be a positive int"),
    ({"beta": float("inf")}, ValueError, r"beta must be a finite number > 0; got inf"),
    ({"beta": float("nan")}, ValueError, r"beta must be a finite number > 0; got nan"),
    ({"beta": "2"}, TypeError, r"beta must be a finite number > 0; got str"),
    ({"sync_timeout": 0}, ValueError, r"sync_timeout must be a finite number of seconds > 0"),
    ({"sync_timeout": "5"}, TypeError, r"sync_timeout must be a number of seconds or a datetime.timedelta"),
]


@pytest.mark.parametrize("kw,exc,match", CONSTRUCTOR_MISUSE)
def test_constructor_misuse_names_the_argument(kw, exc, match):
    kw = {"num_classes": 3, "top_k": (1,), **kw}
    with pytest.raises(exc, match=match):
        stepscope.ClassificationMetrics("multiclass", **kw)


def test_constructor_misuse_multilabel_and_integer_likes_still_work():
    with pytest.raises(TypeError, match=r"num_labels must be a positive int \(the number of labels\); got float"):
        stepscope.ClassificationMetrics("multilabel", num_labels=2.5)
    m = stepscope.ClassificationMetrics("multiclass", num_classes=np.int64(4), top_k=np.array([1, 3]),
                                        ignore_index=np.int32(-1), threshold=np.float32(0.25), beta=2)
    assert (m.num_classes, m.top_k, m.ignore_index, m.beta) == (4, (1, 3), -1, 2.0)
    assert type(m.num_classes) is int and all(type(k) is int for k in m.top_k)


def test_configuration_attributes_are_read_only():
    # Assigning one would leave the op's arguments and the state's layout on the old configuration.
    m = stepscope.ClassificationMetrics("multiclass", num_classes=4, top_k=(1, 2))
    for name, value in [("num_classes", 5), ("top_k", (1,)), ("threshold", 0.3), ("task", "binary"),
                        ("ignore_index", 0), ("input", "probs"), ("keeps_confusion_matrix", False)]:
        before = getattr(m, name)
        with pytest.raises(AttributeError, match="configuration is fixed"):
            setattr(m, name, value)
        assert getattr(m, name) == before
    m.update(torch.randn(3, 4), torch.tensor([0, 1, 3]))
    assert int(m.compute()["samples"]) == 3
