"""Matthews correlation and Cohen's kappa in ClassificationMetrics.compute(), from the per-class
counts (no C x C matrix), against scikit-learn (and torchmetrics for the multilabel definition)."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, matthews_corrcoef

import stepscope

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _sk(t, p, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns where kappa is undefined
        return matthews_corrcoef(t, p), cohen_kappa_score(t, p, **kw), cohen_kappa_score(t, p, weights="quadratic", **kw)


def _same(got, want, tol=1e-9):
    got = float(got)
    if np.isnan(want):
        return np.isnan(got)
    return abs(got - want) <= tol * max(1.0, abs(want))


def _multiclass(preds, target, C, **kw):
    m = stepscope.ClassificationMetrics("multiclass", num_classes=C, **kw)
    m.update(preds, target)
    return m.compute()


@pytest.mark.parametrize("C", [2, 3, 10, 257])
@pytest.mark.parametrize("confmat", [True, False])
def test_multiclass_mcc_and_kappa_equal_sklearn(C, confmat, base_seed):
    g = torch.Generator().manual_seed(base_seed + C)
    n = 3000
    target = torch.randint(0, C, (n,), generator=g)
    # skill: the logit of the true class raised, so that the scores are away from 0
    preds = torch.randn(n, C, generator=g)
    preds[torch.arange(n), target] += torch.rand(n, generator=g) * 3
    r = _multiclass(preds, target, C, confusion_matrix=confmat)
    t, p = target.numpy(), preds.argmax(1).numpy()
    mcc, kappa, quad = _sk(t, p, labels=list(range(C)))
    assert _same(r["mcc"], mcc) and _same(r["cohen_kappa"], kappa), (base_seed, float(r["mcc"]), mcc)
    assert r["mcc"].dtype == torch.float64
    if confmat:
        assert _same(r["cohen_kappa_quadratic"], quad), (base_seed, float(r["cohen_kappa_quadratic"]), quad)
    else:
        assert "cohen_kappa_quadratic" not in r


@pytest.mark.parametrize("case", ["one class only", "all wrong", "never predicted", "all correct", "constant pred"])
def test_degenerate_multiclass_cases_follow_sklearn(case):
    C = 4
    t = {"one class only": [2] * 6, "all wrong": [0, 1, 2, 3, 0, 1], "never predicted": [0, 1, 2, 3, 0, 1],
         "all correct": [0, 1, 2, 3, 0, 1], "constant pred": [0, 1, 2, 3, 0, 1]}[case]
    p = {"one class only": [2] * 6, "all wrong": [1, 2, 3, 0, 1, 2], "never predicted": [0, 1, 1, 0, 0, 1],
         "all correct": t, "constant pred": [3] * 6}[case]
    preds = torch.nn.functional.one_hot(torch.tensor(p), C).float() * 5
    r = _multiclass(preds, torch.tensor(t), C, confusion_matrix=True)
    mcc, kappa, quad = _sk(t, p, labels=list(range(C)))
    assert _same(r["mcc"], mcc), (case, float(r["mcc"]), mcc)
    assert _same(r["cohen_kappa"], kappa), (case, float(r["cohen_kappa"]), kappa)
    assert _same(r["cohen_kappa_quadratic"], quad), (case, float(r["cohen_kappa_quadratic"]), quad)


def test_no_sample_gives_mcc_0_and_kappa_nan():
    r = stepscope.ClassificationMetrics("multiclass", num_classes=5).compute(check=False)
    assert float(r["mcc"]) == 0.0 and np.isnan(float(r["cohen_kappa"]))


def test_100000_classes_without_a_confusion_matrix(base_seed):
    C, n = 100_000, 20_000
    g = torch.Generator().manual_seed(base_seed)
    target = torch.randint(0, 50, (n,), generator=g) * 1999  # 50 classes occur, spread over the range
    pred_class = torch.where(torch.rand(n, generator=g) < 0.6, target, torch.randint(0, C, (n,), generator=g))
    preds = torch.zeros(n, C, dtype=torch.bfloat16)
    preds[torch.arange(n), pred_class] = 1.0
    m = stepscope.ClassificationMetrics("multiclass", num_classes=C)
    assert m.state.numel() < 10 * C  # O(C): no C x C buffer
    m.update(preds, target)
    r = m.compute()
    mcc, kappa, _ = _sk(target.numpy(), pred_class.numpy())
    assert _same(r["mcc"], mcc) and _same(r["cohen_kappa"], kappa), base_seed


def test_ignore_index_and_invalid_targets_leave_the_samples_out(base_seed):
    g = torch.Generator().manual_seed(base_seed)
    C, n = 6, 2000
    target = torch.randint(0, C, (n,), generator=g)
    preds = torch.randn(n, C, generator=g)
    target[::7] = -100
    r = _multiclass(preds, target, C, ignore_index=-100)
    keep = target != -100
    mcc, kappa, _ = _sk(target[keep].numpy(), preds.argmax(1)[keep].numpy(), labels=list(range(C)))
    assert _same(r["mcc"], mcc) and _same(r["cohen_kappa"], kappa)
    bad = target.clone()
    bad[::7] = C  # out of range: counted apart, and compute() says so
    m = stepscope.ClassificationMetrics("multiclass", num_classes=C)
    m.update(preds, bad)
    with pytest.raises(ValueError, match="target value"):
        m.compute()
    r = m.compute(check=False)
    assert _same(r["mcc"], mcc) and _same(r["cohen_kappa"], kappa)


def test_forward_gives_each_batch_its_own(base_seed):
    g = torch.Generator().manual_seed(base_seed)
    m = stepscope.ClassificationMetrics("multiclass", num_classes=5)
    ts, ps = [], []
    for _ in range(3):
        t = torch.randint(0, 5, (400,), generator=g)
        x = torch.randn(400, 5, generator=g)
        out = m(x, t)
        mcc, kappa, _ = _sk(t.numpy(), x.argmax(1).numpy(), labels=list(range(5)))
        assert _same(out["mcc"], mcc) and _same(out["cohen_kappa"], kappa)
        ts.append(t)
        ps.append(x.argmax(1))
    mcc, kappa, _ = _sk(torch.cat(ts).numpy(), torch.cat(ps).numpy(), labels=list(range(5)))
    r = m.compute()
    assert _same(r["mcc"], mcc) and _same(r["cohen_kappa"], kappa)


@pytest.mark.parametrize("case", ["random", "all correct", "all wrong", "all positive", "no positive"])
def test_binary_follows_sklearn(case, base_seed):
    g = torch.Generator().manual_seed(base_seed)
    n = 1000
    t = torch.randint(0, 2, (n,), generator=g)
    x = {"random": torch.randn(n, generator=g), "all correct": (t * 2 - 1).float() * 3,
         "all wrong": (1 - 2 * t).float() * 3, "all positive": torch.full((n,), 3.0),
         "no positive": torch.full((n,), -3.0)}[case]
    if case == "no positive":
        t = torch.zeros(n, dtype=torch.long)
    m = stepscope.ClassificationMetrics("binary")
    m.update(x, t)
    r = m.compute()
    mcc, kappa, quad = _sk(t.numpy(), (x > 0).long().numpy(), labels=[0, 1])
    assert _same(r["mcc"], mcc) and _same(r["cohen_kappa"], kappa) and _same(r["cohen_kappa_quadratic"], quad), \
        (case, float(r["mcc"]), mcc, float(r["cohen_kappa"]), kappa)


def test_multilabel_mcc_micro_is_torchmetrics_and_per_label_is_sklearn(base_seed):
    torchmetrics = pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(base_seed)
    n, L = 800, 5
    t = torch.randint(0, 2, (n, L), generator=g)
    x = torch.randn(n, L, generator=g) + (t * 2 - 1) * torch.rand(L, generator=g)
    m = stepscope.ClassificationMetrics("multilabel", num_labels=L)
    m.update(x, t)
    r = m.compute()
    want = torchmetrics.classification.MultilabelMatthewsCorrCoef(num_labels=L)(x, t)
    assert abs(float(r["mcc_micro"]) - float(want)) < 1e-6, (float(r["mcc_micro"]), float(want))
    p = (x > 0).long().numpy()
    per = [matthews_corrcoef(t[:, j].numpy(), p[:, j]) for j in range(L)]
    assert all(_same(a, b) for a, b in zip(r["mcc_per_class"].tolist(), per))
    assert _same(r["mcc_macro"], float(np.mean(per)))
