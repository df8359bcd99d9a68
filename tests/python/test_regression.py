"""RegressionMetrics against scikit-learn and scipy: random cases with a large offset, multi-output,
per-batch forward, dtypes, degenerate cases, non-finite pairs, misuse, state round trips, one op per
update without a host read, the ATen path (CUDA's) on the CPU, and two Gloo ranks."""

import copy
import io
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.metrics import (explained_variance_score, max_error, mean_absolute_error, mean_squared_error,
                             r2_score)

import stepscope
from seen_ops import SeenOps
from stepscope import _C

SCORES = ("mse", "rmse", "mae", "r2", "explained_variance", "pearson", "max_error", "mape")


def reference(p: np.ndarray, t: np.ndarray) -> dict:
    """Per output: scikit-learn's scores and scipy's Pearson r, torchmetrics' MAPE rule (float64)."""
    p, t = p.reshape(len(p), -1), t.reshape(len(t), -1)
    out = {k: [] for k in SCORES}
    for j in range(p.shape[1]):
        a, b = p[:, j], t[:, j]
        out["mse"].append(mean_squared_error(b, a))
        out["rmse"].append(math.sqrt(mean_squared_error(b, a)))
        out["mae"].append(mean_absolute_error(b, a))
        out["r2"].append(r2_score(b, a))
        out["explained_variance"].append(explained_variance_score(b, a))
        out["pearson"].append(pearsonr(a, b)[0])
        out["max_error"].append(max_error(b, a))
        out["mape"].append(float(np.mean(np.abs(a - b) / np.maximum(np.abs(b), 1.17e-6))))
    return {k: np.array(v) for k, v in out.items()}


def assert_matches(got: dict, p: np.ndarray, t: np.ndarray, rel: float) -> None:
    ref = reference(p, t)
    for k in SCORES:
        raw = got[k + "_per_output"].cpu().numpy()
        np.testing.assert_allclose(raw, ref[k], rtol=rel, atol=0, err_msg=k)
        whole = ref[k].max() if k == "max_error" else ref[k].mean()
        np.testing.assert_allclose(float(got[k]), whole, rtol=rel, atol=0, err_msg=k)
    assert int(got["samples"]) == p.size and int(got["nonfinite"]) == 0


def planted(n: int, k: int, seed: int, dtype=torch.float64, offset: float = 1e6):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, k, generator=g, dtype=torch.float64) * 3 + offset
    p = t + 0.5 * torch.randn(n, k, generator=g, dtype=torch.float64) + 0.2
    return p.to(dtype), t.to(dtype)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_a_million_samples_at_an_offset_of_1e6_match_scikit_learn(k, dtype, rel, base_seed):
    n = 10**6
    # float32 keeps ~7 digits: at 1e6 the inputs are quantised to 1/16, so the offset is smaller there
    # (the reference reads the same rounded values, in float64).
    p, t = planted(n, k, base_seed, dtype, offset=1e6 if dtype == torch.float64 else 1e3)
    m = stepscope.RegressionMetrics(num_outputs=k)
    for i in range(0, n, 65536 + 17):  # uneven batches: blocks straddle them
        m.update(p[i:i + 65536 + 17].squeeze(1) if k == 1 else p[i:i + 65536 + 17],
                 t[i:i + 65536 + 17].squeeze(1) if k == 1 else t[i:i + 65536 + 17])
    assert_matches(m.compute(), p.double().numpy(), t.double().numpy(), rel)


def test_the_aten_path_used_on_cuda_matches_the_kernel_and_scikit_learn(base_seed):
    for k, n in ((1, 3000), (3, 70000)):
        p, t = planted(n, k, base_seed + k)
        kern, aten = (torch.zeros(k * _C.REGRESSION_FIELDS, dtype=torch.float64) for _ in range(2))
        for i in range(0, n, 999):
            torch.ops.stepscope.regression_update(p[i:i + 999], t[i:i + 999], kern, k)
            _C._regression_update_aten(p[i:i + 999], t[i:i + 999], aten, k)
        assert_matches(_C.regression_compute(aten), p.numpy(), t.numpy(), 1e-9)
        torch.testing.assert_close(aten, kern, rtol=1e-9, atol=1e-6)


def test_forward_gives_each_batch_its_own_metrics_and_accumulates_them_all(base_seed):
    p, t = planted(900, 2, base_seed, offset=5.0)
    m = stepscope.RegressionMetrics(num_outputs=2)
    for i in range(0, 900, 300):
        assert_matches(m(p[i:i + 300], t[i:i + 300]), p[i:i + 300].numpy(), t[i:i + 300].numpy(), 1e-9)
    assert_matches(m.compute(), p.numpy(), t.numpy(), 1e-9)


def test_thread_count_does_not_change_the_result(base_seed):
    p, t = planted(200_000, 2, base_seed)
    states = []
    n = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        m = stepscope.RegressionMetrics(num_outputs=2)
        m.update(p, t)
        states.append(m.state.clone())
    torch.set_num_threads(n)
    assert torch.equal(states[0], states[1])


@pytest.mark.parametrize("pdtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tdtype", [torch.float32, torch.int64, torch.bool])
def test_dtypes_are_read_as_they_are(pdtype, tdtype, base_seed):
    g = torch.Generator().manual_seed(base_seed)
    t = (torch.rand(500, generator=g) * 4).to(tdtype)
    p = (t.double() + torch.randn(500, generator=g, dtype=torch.float64)).to(pdtype)
    m = stepscope.RegressionMetrics()
    m.update(p, t)
    assert_matches(m.compute(), p.double().numpy(), t.double().numpy(), 1e-9)


def test_any_shape_with_one_output_and_strided_views(base_seed):
    p, t = planted(600, 1, base_seed, offset=0.0)
    m = stepscope.RegressionMetrics()
    m.update(p.view(20, 30), t.view(20, 30))
    assert_matches(m.compute(), p.numpy(), t.numpy(), 1e-9)
    wide_p, wide_t = planted(400, 6, base_seed + 1, offset=2.0)
    m = stepscope.RegressionMetrics(num_outputs=3)
    m.update(wide_p[:, ::2], wide_t[:, 1::2])  # non-contiguous columns
    assert_matches(m.compute(), wide_p[:, ::2].numpy(), wide_t[:, 1::2].numpy(), 1e-9)


def test_degenerate_cases_follow_scikit_learn_and_scipy():
    m = stepscope.RegressionMetrics()
    out = m.compute(check=False)
    assert all(math.isnan(float(out[k])) for k in SCORES) and int(out["samples"]) == 0
    m.update(torch.tensor([1.0]), torch.tensor([2.0]))  # one sample: R², EV and r undefined
    out = m.compute()
    assert float(out["mse"]) == 1.0 and math.isnan(float(out["r2"])) and math.isnan(float(out["pearson"]))
    for preds, target in (([3.0, 3.0, 3.0], [0.5, 0.5, 0.5]), ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
                          ([1.0, 2.0, 4.0], [1.0, 2.0, 4.0]), ([1.0, 2.0, 4.0], [3.0, 3.0, 3.0])):
        m = stepscope.RegressionMetrics()
        m.update(torch.tensor(preds, dtype=torch.float64), torch.tensor(target, dtype=torch.float64))
        out = m.compute()
        a, b = np.array(preds), np.array(target)
        assert float(out["r2"]) == r2_score(b, a), (preds, target)
        assert float(out["explained_variance"]) == explained_variance_score(b, a), (preds, target)
        constant = np.ptp(a) == 0 or np.ptp(b) == 0
        assert math.isnan(float(out["pearson"])) == constant
    # A constant target that float64 cannot hold exactly: scikit-learn's mean of [0.1] * 3 rounds away
    # from 0.1, so its "constant" target has a variance of 1e-34 and R^2 comes out near -4e34; the
    # shifted mean here stays 0.1 and the force_finite rule gives what it means to give.
    m = stepscope.RegressionMetrics()
    m.update(torch.full((3,), 3.0, dtype=torch.float64), torch.full((3,), 0.1, dtype=torch.float64))
    assert float(m.compute()["r2"]) == 0.0 and r2_score([0.1] * 3, [3.0] * 3) < -1e30


def test_non_finite_pairs_are_left_out_counted_and_warned(base_seed):
    p, t = planted(100, 2, base_seed, offset=0.0)
    p[3, 0], t[7, 1], p[9, 1] = float("nan"), float("inf"), -float("inf")
    m = stepscope.RegressionMetrics(num_outputs=2)
    m.update(p, t)
    with pytest.warns(UserWarning, match="left out 3"):
        out = m.compute()
    assert out["nonfinite_per_output"].tolist() == [1, 2] and out["samples_per_output"].tolist() == [99, 98]
    keep0, keep1 = torch.isfinite(p[:, 0] + t[:, 0]), torch.isfinite(p[:, 1] + t[:, 1])
    want0 = reference(p[keep0, 0].numpy(), t[keep0, 0].numpy())
    want1 = reference(p[keep1, 1].numpy(), t[keep1, 1].numpy())
    for k in SCORES:
        np.testing.assert_allclose(float(out[k + "_per_output"][0]), want0[k][0], rtol=1e-9, err_msg=k)
        np.testing.assert_allclose(float(out[k + "_per_output"][1]), want1[k][0], rtol=1e-9, err_msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.compute(check=False)


def test_an_update_is_one_op_and_reads_nothing_back(base_seed):
    p, t = planted(1000, 3, base_seed)
    m = stepscope.RegressionMetrics(num_outputs=3)
    m.update(p, t)
    with SeenOps() as ops:
        for _ in range(5):
            m.update(p, t)
    assert ops.seen == ["stepscope.regression_update.default"] * 5


def test_bad_calls_say_what_is_wrong_and_change_nothing():
    m = stepscope.RegressionMetrics(num_outputs=2)
    m.update(torch.zeros(4, 2), torch.ones(4, 2))
    before = m.state.clone()
    cases = [
        ((torch.zeros(4, 2), torch.zeros(4, 3)), ValueError, "same shape"),
        ((torch.zeros(4, 3), torch.zeros(4, 3)), ValueError, r"\[N, 2\]"),
        ((torch.zeros(4), torch.zeros(4)), ValueError, r"\[N, 2\]"),
        ((torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2)), TypeError, "preds must be a floating"),
        ((torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.complex64)), TypeError, "target must be a real"),
        ((torch.zeros(4, 2), torch.zeros(4, 2, device="meta")), ValueError, "same device"),
        (([[0.0, 1.0]], torch.zeros(1, 2)), TypeError, "torch.Tensor"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            m.update(*args)
        assert torch.equal(m.state, before)
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises((TypeError, ValueError), match="num_outputs"):
            stepscope.RegressionMetrics(num_outputs=bad)
    with pytest.raises(ValueError, match="must be"):
        _C.regression_merge(m.state, torch.zeros(5, dtype=torch.float64))


def test_opcheck_and_compile(base_seed):
    p, t = planted(64, 2, base_seed)
    torch.library.opcheck(torch.ops.stepscope.regression_update.default,
                          (p, t, torch.zeros(2 * _C.REGRESSION_FIELDS, dtype=torch.float64), 2))
    m = stepscope.RegressionMetrics(num_outputs=2)
    m.update(p[:1], t[:1])

    @torch.compile(fullgraph=True, backend="eager")
    def step(a, b):
        m.update(a, b)

    step(p[1:], t[1:])
    assert_matches(m.compute(), p.numpy(), t.numpy(), 1e-9)


def test_state_dict_pickle_deepcopy_and_dtype_casts_keep_the_state(base_seed):
    p, t = planted(300, 2, base_seed)
    m = stepscope.RegressionMetrics(num_outputs=2)
    m.update(p, t)
    holder = torch.nn.Module()
    holder.metrics = m
    sd = holder.state_dict()
    assert set(sd) == {"metrics.state", "metrics._extra_state"}
    fresh = torch.nn.Module()
    fresh.metrics = stepscope.RegressionMetrics(num_outputs=2)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.metrics.state, m.state)
    other = torch.nn.Module()
    other.metrics = stepscope.RegressionMetrics(num_outputs=3)
    with pytest.raises(ValueError, match="num_outputs"):
        other.load_state_dict(sd)
    buf = io.BytesIO()
    torch.save(holder, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False).metrics
    loaded.update(p, t)
    copied = copy.deepcopy(m)
    copied.update(p, t)
    assert torch.equal(loaded.state, copied.state)
    assert pickle.loads(pickle.dumps(m)).num_outputs == 2
    holder.half()
    assert m.state.dtype == torch.float64
    m.reset()
    assert int(m.compute()["samples"]) == 0


def test_readme_example_and_log_dict():
    m = stepscope.RegressionMetrics()
    m.update(torch.tensor([2.5, 0.0, 2.0, 8.0]), torch.tensor([3.0, -0.5, 2.0, 7.0]))
    logged = m.log_dict("val/")
    assert logged["val/mse"].item() == pytest.approx(0.375) and "val/mse_per_output" not in logged
    assert logged["val/samples"].dtype == torch.float64


# ------------------------------------------------------------------------------- two Gloo ranks
def _rank_data(rank: int, seed: int):
    return planted(5000 + 1234 * rank, 2, seed + rank)


def _ddp_worker(rank, world, port, q, done, ready, seed, k_of_rank):
    from test_distributed import _init

    try:
        _init(rank, world, port)
        m = stepscope.RegressionMetrics(num_outputs=k_of_rank[rank])
        if k_of_rank[0] == k_of_rank[1]:
            p, t = _rank_data(rank, seed)
            m.update(p, t)
            before = m.state.clone()
            out = {k: v.tolist() for k, v in m.compute().items()}
            local_kept = torch.equal(m.state, before)
            m.sync()
            synced = {k: v.tolist() for k, v in m.compute().items()}
            q.put({"rank": rank, "out": out, "kept": local_kept, "synced": synced})
        else:
            try:
                m.compute()
                q.put({"rank": rank, "error": None})
            except ValueError as e:
                q.put({"rank": rank, "error": str(e)})
    except BaseException as e:  # noqa: BLE001
        q.put({"rank": rank, "error": repr(e)})
    ready.wait()


def test_two_gloo_ranks_give_the_metrics_of_their_union(base_seed):
    from test_distributed import _spawn

    out = _spawn(_ddp_worker, 2, base_seed, (2, 2))
    parts = [_rank_data(r, base_seed) for r in range(2)]
    p = torch.cat([a for a, _ in parts]).numpy()
    t = torch.cat([b for _, b in parts]).numpy()
    for o in out:
        assert "error" not in o, o
        assert o["kept"]
        for got in (o["out"], o["synced"]):
            assert_matches({k: torch.tensor(v, dtype=torch.float64) for k, v in got.items()}, p, t, 1e-9)


def test_ranks_with_different_num_outputs_are_told_on_every_rank(base_seed):
    from test_distributed import _spawn

    out = _spawn(_ddp_worker, 2, base_seed, (2, 3))
    for o in out:
        assert o["error"] and "num_outputs: 2 on rank 0, 3 on rank 1" in o["error"], o


# ------------------------------------------------------------------------------- CUDA (the ATen path)
@pytest.mark.cuda
def test_cuda_matches_the_cpu_and_never_syncs(base_seed):
    p, t = planted(300_000, 3, base_seed)
    cpu = stepscope.RegressionMetrics(num_outputs=3)
    gpu = stepscope.RegressionMetrics(num_outputs=3, device="cuda")
    pc, tc = p.float().cuda(), t.float().cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(0, len(p), 50_000):
            gpu.update(pc[i:i + 50_000], tc[i:i + 50_000])
        batch = gpu(pc[:1000], tc[:1000])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for i in range(0, len(p), 50_000):
        cpu.update(p.float()[i:i + 50_000], t.float()[i:i + 50_000])
    cpu.update(p.float()[:1000], t.float()[:1000])
    got, want = gpu.compute(), cpu.compute()
    assert batch["mse"].device.type == "cuda"
    for k in SCORES:
        torch.testing.assert_close(got[k + "_per_output"].cpu(), want[k + "_per_output"], rtol=1e-9,
                                   atol=1e-12)


@pytest.mark.cuda
def test_cuda_opcheck_and_bad_devices(base_seed):
    p, t = planted(64, 2, base_seed)
    torch.library.opcheck(torch.ops.stepscope.regression_update.default,
                          (p.cuda(), t.cuda(), torch.zeros(2 * _C.REGRESSION_FIELDS, dtype=torch.float64,
                                                             device="cuda"), 2))
    m = stepscope.RegressionMetrics(num_outputs=2, device="cuda")
    with pytest.raises(ValueError, match="same device"):
        m.update(p, t.cuda())
