"""Distributed view: gathered reports, the straggler rule, global metrics and DDP, on Gloo (CPU).

Each case spawns 2 or 4 processes (one torch thread each) that train a small DDP model for a few
sleep-dominated steps, so that timings hold on a loaded 2-core machine, and send what they saw
back through a queue.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import stepscope
import torch
from stepscope import _C, distributed

ROOT = Path(__file__).resolve().parents[2]
DATA_SLEEP = 0.015  # every rank's loader
PLANT_SLEEP = 0.060  # the planted straggler's loader
STEPS = 24
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_gather_object", "all_reduce", "broadcast",
               "gather", "reduce", "scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "barrier")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(seed: int, n: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def _logits(seed: int, world: int) -> tuple:
    # Fixed logits and targets for the metrics (rank r updates rows r, r + world, ...), so that one
    # process can replay the union; targets include ignore_index to check that it counts nowhere.
    g = torch.Generator().manual_seed(seed + 1)
    n = world * STEPS * 3
    return torch.randn(n, 5, generator=g) * 3, torch.randint(-1, 5, (n,), generator=g)


def _metrics(**kw) -> stepscope.ClassificationMetrics:
    return stepscope.ClassificationMetrics("multiclass", num_classes=5, top_k=(1, 2), ignore_index=-1, device="cpu",
                                           **kw)


def _worker(rank: int, world: int, port: int, seed: int, plant: int, q) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=__import__("datetime").timedelta(seconds=40))
        torch.manual_seed(0)
        model = DDP(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = _data(seed, world * STEPS * 8)
        metrics = _metrics()
        lx, ly = _logits(seed, world)
        lx, ly = lx[rank::world], ly[rank::world]

        calls: dict = {}
        originals = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

        def counting(name: str):
            def f(*a, **k):
                calls[name] = calls.get(name, 0) + 1
                return originals[name](*a, **k)
            return f

        for n in originals:
            setattr(dist, n, counting(n))
        with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
            for s in range(STEPS):
                time.sleep(PLANT_SLEEP if rank == plant else DATA_SLEEP)  # the loader
                lo = (s * world + rank) * 8
                xb, yb = x[lo:lo + 8], y[lo:lo + 8]
                logits = model(xb)
                torch.nn.functional.cross_entropy(logits, yb).backward()
                opt.step()
                opt.zero_grad()
                metrics.update(lx[3 * s:3 * s + 3], ly[3 * s:3 * s + 3])
        during_steps = dict(calls)
        local = mon.report()
        rep = mon.report(gather=True)
        gather_calls = {k: v - during_steps.get(k, 0) for k, v in calls.items() if v != during_steps.get(k, 0)}
        for n, f in originals.items():
            setattr(dist, n, f)
        state_before = metrics.state.clone()
        computed = metrics.compute()
        local_unchanged = torch.equal(metrics.state, state_before)
        kept_local = _metrics(sync_on_compute=False)
        kept_local.update(lx[:3 * STEPS], ly[:3 * STEPS])
        local_samples = int(kept_local.compute()["samples"])
        q.put({"rank": rank, "local": local, "rep": rep, "during_steps": during_steps, "gather_calls": gather_calls,
               # plain lists: a tensor sent through the queue dies with this process's shared memory
               "computed": {k: v.tolist() for k, v in computed.items()}, "local_unchanged": local_unchanged,
               "local_samples": local_samples, "shard_samples": int((ly[:3 * STEPS] != -1).sum()),
               "findings": distributed.straggler_findings(rep), "summary": mon.summary(gather=True)})
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # the parent reads the error instead of waiting for a timeout
        q.put({"rank": rank, "error": repr(e)})
        raise


def _run(world: int, plant: int, seed: int) -> list:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        procs = [ctx.Process(target=_worker, args=(r, world, port, seed, plant, q)) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = []
    try:
        for _ in range(world):
            out.append(q.get(timeout=50))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [o for o in out if "error" in o]
    assert not errors, errors
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return sorted(out, key=lambda o: o["rank"])


# (world size, planted straggler rank or -1): 4 processes with a straggler, 2 without one.
CASES = [(4, 2), (2, -1)]


@pytest.fixture(scope="module")
def runs() -> dict:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed {seed}")
    return {"seed": seed, **{case: _run(*case, seed) for case in CASES}}



@pytest.mark.parametrize("case", CASES)
def test_gathered_per_rank_numbers_equal_each_local_report(runs, case):
    out = runs[case]
    names = list(stepscope.report.PARTITION) + ["step"]
    for o in out:
        r = o["rank"]
        for other in out:  # every rank got the same view
            assert other["rep"]["ranks"] == o["rep"]["ranks"]
        mine = o["rep"]["ranks"]["per_rank"][r]
        assert mine["rank"] == r
        assert mine["steps"] == o["local"]["steps"] == STEPS
        assert mine["samples"] == o["local"]["samples"]
        for k in names:
            assert mine["p50"][k] == o["local"]["phases"][k]["host"]["p50"], (r, k)
            assert mine["count"][k] == o["local"]["phases"][k]["host"]["count"], (r, k)
        assert mine["device_p50"] is None
    rep = out[0]["rep"]
    for k in names:  # merged series hold every rank's samples
        assert rep["phases"][k]["host"]["count"] == sum(o["local"]["phases"][k]["host"]["count"] for o in out)
        assert rep["phases"][k]["host"]["max"] == max(o["local"]["phases"][k]["host"]["max"] for o in out)
    assert rep["steps"] == STEPS
    assert rep["samples"] == sum(o["local"]["samples"] for o in out) == len(out) * STEPS * 8
    skew = rep["ranks"]["phases"]["data"]
    vals = [o["local"]["phases"]["data"]["host"]["p50"] for o in out]
    assert skew["slowest_p50"] == max(vals)
    assert "per rank p50" in out[0]["summary"] and "slowest" in out[0]["summary"]


@pytest.mark.parametrize("case", CASES)
def test_the_gather_is_one_collective_at_report_time(runs, case):
    for o in runs[case]:
        assert o["during_steps"] == {}  # nothing from Python during the steps
        assert sum(o["gather_calls"].values()) == 1, o["gather_calls"]
        assert set(o["gather_calls"]) <= {"all_gather_single", "all_gather_into_tensor"}


@pytest.mark.parametrize("case", CASES)
def test_straggler_named_with_its_phase_or_none(runs, case):
    _, plant = case
    for o in runs[case]:
        f = o["findings"]
        if plant < 0:
            assert f == [], f
            continue
        assert len(f) == 1, f
        assert f[0]["rule"] == "straggler" and f[0]["evidence"]["rank"] == plant
        assert f[0]["severity"] == "critical"  # ~45 ms over a ~20 ms median step
        assert "most of it in data" in f[0]["title"]
        assert "backward" in f[0]["advice"].lower() and "all-reduce" in f[0]["advice"]
        assert 0 < f[0]["saving"] <= 1


@pytest.mark.parametrize("case", CASES)
def test_ddp_phases_sum_to_the_step_and_the_wait_is_in_backward(runs, case):
    _, plant = case
    for o in runs[case]:
        ph = o["local"]["phases"]
        parts = sum(ph[k]["host"]["total"] for k in stepscope.report.PARTITION)
        assert parts == pytest.approx(ph["step"]["host"]["total"], rel=1e-9)
        if plant >= 0 and o["rank"] != plant:
            # The fast ranks wait for the straggler inside DDP's all-reduce: backward, not other.
            assert ph["backward"]["host"]["p50"] > 0.5 * (PLANT_SLEEP - DATA_SLEEP)
            assert ph["other"]["host"]["p50"] < 0.2 * (PLANT_SLEEP - DATA_SLEEP)


@pytest.mark.parametrize("case", CASES)
def test_compute_is_global_and_equals_one_process_over_all_data(runs, case):
    world, _ = case
    out = runs[case]
    ref = _metrics()
    ref.update(*_logits(runs["seed"], world))
    want = ref.compute()
    for o in out:
        assert o["local_unchanged"]  # compute() reduced a copy: local accumulation goes on
        got = o["computed"]
        assert set(got) == set(want)
        got = {k: torch.tensor(v, dtype=want[k].dtype) for k, v in got.items()}
        for k in ("samples", "ignored", "confusion_matrix", "nonfinite", "invalid_target"):
            assert torch.equal(got[k], want[k]), k  # counts exact
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, msg=k)
    assert int(want["samples"]) < world * STEPS * 3  # ignored targets were left out everywhere
    for o in out:  # sync_on_compute=False: this rank's shard only
        assert o["local_samples"] == o["shard_samples"]
    assert sum(o["shard_samples"] for o in out) == int(want["samples"])


def test_gathered_report_needs_an_initialised_process_group():
    model = torch.nn.Linear(4, 2)
    with stepscope.Monitor(model, warmup_steps=0, flops=None) as mon:
        model(torch.randn(3, 4)).sum().backward()
        mon.step()
    with pytest.raises(RuntimeError, match="stepscope: gather=True needs torch.distributed initialised"):
        mon.report(gather=True)
    m = stepscope.ClassificationMetrics("multiclass", num_classes=3, sync_on_compute=True)
    m.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(RuntimeError, match="sync_on_compute=True but torch.distributed is not initialised"):
        m.compute()
    with pytest.raises(TypeError, match="sync_on_compute must be None, True or False"):
        stepscope.ClassificationMetrics("multiclass", num_classes=3, sync_on_compute="yes")
    # Without a process group the default is local.
    assert float(stepscope.ClassificationMetrics("multiclass", num_classes=3).compute()["samples"]) == 0


def test_report_from_gathered_refuses_bad_shapes_and_foreign_buffers():
    model = torch.nn.Linear(4, 2)
    with stepscope.Monitor(model, warmup_steps=0, flops=None) as mon:
        for _ in range(3):
            model(torch.randn(3, 4)).sum().backward()
            mon.step()
    with pytest.raises(ValueError, match="gathered statistics must be"):
        distributed.report_from_gathered(torch.zeros(2, 5, dtype=torch.float64), mon.report())
    bad = torch.zeros(1, _C.PACKED_WORDS + distributed._TAIL, dtype=torch.float64)
    with pytest.raises(ValueError, match="not a packed Timeline"):
        distributed.report_from_gathered(bad, mon.report())
    with pytest.raises(ValueError, match="whole number of buffers"):
        _C.report_from_packed(torch.zeros(7, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        _C.report_from_packed(torch.zeros(_C.PACKED_WORDS, dtype=torch.float32))


def test_packed_round_trip_equals_the_local_report_and_merges():
    models = [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)]
    mons = []
    for k, model in enumerate(models):
        with stepscope.Monitor(model, warmup_steps=0, flops=None) as mon:
            for _ in range(5 + 3 * k):
                # Rank 1's data holds a planted 20 ms; rank 0's none, so that a loaded machine's noise
                # (milliseconds at worst in a median) cannot make rank 0 the slower one.
                time.sleep(0.020 * k)
                model(torch.randn(3, 4)).sum().backward()
                mon.step()
        mons.append(mon)
    raws = [m._tl.report() for m in mons]
    packs = [m._tl.pack() for m in mons]
    for raw, p in zip(raws, packs):
        back = _C.report_from_packed(p)
        assert back["phases"] == raw["phases"]  # every number, exactly
        assert back["steps"] == raw["steps"] and back["samples"] == raw["samples"]
        assert back["step_host_total"] == raw["step_host_total"]
    # Single process: the gathered report from stacked buffers, as the all_gather would give them.
    tail = torch.full((6,), -1.0, dtype=torch.float64)
    stacked = torch.stack([torch.cat([p, tail]) for p in packs])
    rep = distributed.report_from_gathered(stacked, mons[0].report())
    assert rep["steps"] == 8 and rep["samples"] == 3 * 13
    assert rep["phases"]["step"]["host"]["count"] == 13
    assert rep["ranks"]["phases"]["data"]["slowest_rank"] == 1
    assert rep["memory"] is None


def _rep_with(p50s: list, backward: list) -> dict:
    # A gathered report's `ranks` from per-rank p50s (data, forward, loss, optimizer) and backward.
    names = list(stepscope.report.PARTITION) + ["step"]
    per = []
    for r, (d, bw) in enumerate(zip(p50s, backward)):
        p = {"data": d, "forward": 0.002, "loss": 0.0005, "backward": bw, "other": 0.0001, "optimizer": 0.001}
        p["step"] = sum(p.values())
        per.append({"rank": r, "steps": 10, "samples": 80, "count": {k: 10 for k in names}, "p50": p,
                    "device_p50": None, "memory": None})
    return {"ranks": {"world_size": len(per), "per_rank": per, "phases": {}}}


def test_straggler_rule_thresholds_and_ddp_aligned_steps():
    assert distributed.straggler_findings({"phases": {}}) == []  # a local report
    # DDP: every step is as long; the fast ranks wait in backward. 5 ms more data on a 21 ms step.
    f = distributed.straggler_findings(_rep_with([0.010, 0.010, 0.015, 0.010], [0.0075, 0.0075, 0.0025, 0.0075]))
    assert [(x["evidence"]["rank"], x["severity"]) for x in f] == [(2, "critical")]
    assert "in data" in f[0]["title"]
    f = distributed.straggler_findings(_rep_with([0.010, 0.0125, 0.010], [0.0065, 0.0040, 0.0065]))
    assert [(x["evidence"]["rank"], x["severity"]) for x in f] == [(1, "warn")]
    assert distributed.straggler_findings(_rep_with([0.010, 0.0105, 0.010], [0.0065, 0.006, 0.0065])) == []
    assert distributed.straggler_findings(_rep_with([0.010], [0.006])) == []


def test_straggler_rule_names_a_device_phase_on_cuda():
    # The host loop of every rank looks alike, but rank 1's forward kernels take 6 ms longer (a slower
    # GPU): its host step stretches in loss (the host waits on the loss) and the device forward says why.
    rep = _rep_with([0.010, 0.010, 0.010], [0.0065, 0.0065, 0.0065])
    for p in rep["ranks"]["per_rank"]:
        slow = p["rank"] == 1
        p["p50"]["loss"] += 0.005 if slow else 0.0
        p["p50"]["step"] += 0.005 if slow else 0.0
        p["device_p50"] = {k: 0.0 for k in p["p50"]}
        p["device_p50"]["forward"] = 0.008 if slow else 0.002
    f = distributed.straggler_findings(rep)
    assert [(x["evidence"]["rank"], x["severity"]) for x in f] == [(1, "critical")]
    assert f[0]["title"].endswith("most of it in forward (device)")
    # Without device times everywhere, only host phases are compared.
    rep["ranks"]["per_rank"][0]["device_p50"] = None
    assert distributed.straggler_findings(rep)[0]["title"].endswith("most of it in loss")


def test_ddp_train_example_runs_with_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "python"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(ROOT / "examples" / "ddp_train.py"), "--epochs", "3"]
    p = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=80, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "per rank p50" in p.stdout and "val_acc" in p.stdout
    assert p.stdout.count("per rank p50") == 1  # printed on rank 0 only


def _fsdp_worker(rank: int, world: int, port: int, q) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=40))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = _data(rank, 64)
        with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
            for s in range(8):
                torch.nn.functional.cross_entropy(model(x[8 * s:8 * s + 8]), y[8 * s:8 * s + 8]).backward()
                opt.step()
                opt.zero_grad()
        local = mon.report()
        rep = mon.report(gather=True)
        q.put({"rank": rank, "local": local, "rep": rep})
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:
        q.put({"rank": rank, "error": repr(e)})
        raise


def test_fsdp2_fully_shard_phases_sum_to_the_step():
    pytest.importorskip("torch.distributed.fsdp")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_fsdp_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        out = sorted((q.get(timeout=50) for _ in procs), key=lambda o: o["rank"])
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert not [o for o in out if "error" in o], out
    for o in out:
        ph = o["local"]["phases"]
        assert o["local"]["steps"] == 8
        for k in stepscope.report.PARTITION:
            assert ph[k]["host"]["count"] == 8, k
        parts = sum(ph[k]["host"]["total"] for k in stepscope.report.PARTITION)
        assert parts == pytest.approx(ph["step"]["host"]["total"], rel=1e-9)
        assert o["rep"]["ranks"]["per_rank"][o["rank"]]["p50"]["step"] == ph["step"]["host"]["p50"]


# ----------------------------------------------------------------------------- misuse across ranks
def _spawn(target, world: int, *args, expect: int = 0, wait: float = 90) -> list:
    """Runs target(rank, world, port, q, done, ready, *args) in `world` processes; returns what `expect`
    of them (default: all) put, by rank; `done` is set once they have; `ready` is a barrier for those
    `expect` processes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q, done, ready = ctx.Queue(), ctx.Event(), ctx.Barrier(expect or world)
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, q, done, ready, *args)) for r in range(world)]
    for p in procs:
        p.start()
    out = []
    try:
        while len(out) < (expect or world):
            out.append(q.get(timeout=wait))
    finally:
        done.set()
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    return sorted(out, key=lambda o: o["rank"])


def _init(rank: int, world: int, port: int):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=40))
    return dist


def _leave(q) -> None:
    # A timed-out collective may still be pending in the backend: leave without tearing the group down.
    q.close()
    q.join_thread()
    os._exit(0)


# (the field the error must name, rank 0's and rank 1's configuration; the same state size except the
# last two, whose mismatch used to abort both processes inside Gloo)
CONFIG_CASES = [
    ("ignore_index", dict(num_classes=3, ignore_index=-1), dict(num_classes=3)),
    ("top_k", dict(num_classes=3, top_k=(1, 2)), dict(num_classes=3, top_k=(1, 3))),
    ("input", dict(num_classes=3, input="logits"), dict(num_classes=3, input="probs")),
    ("task", dict(num_classes=2), dict(task="multilabel", num_labels=2)),
    ("threshold", dict(task="binary", threshold=0.5), dict(task="binary", threshold=0.25)),
    ("top_k", dict(num_classes=3, top_k=(1,)), dict(num_classes=3, top_k=(1, 2))),
    ("num_classes", dict(num_classes=3), dict(num_classes=4)),
    ("thresholds", dict(num_classes=3, thresholds=5), dict(num_classes=3)),
]


def _make(kw: dict, **extra) -> stepscope.ClassificationMetrics:
    kw = {"task": "multiclass", **kw, **extra}
    return stepscope.ClassificationMetrics(kw.pop("task"), device="cpu", **kw)


def _feed(m: stepscope.ClassificationMetrics, rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    n = 10 + 3 * rank
    if m.task == "multiclass":
        m.update(torch.rand(n, m.num_classes, generator=g), torch.randint(0, m.num_classes, (n,), generator=g))
    elif m.task == "multilabel":
        m.update(torch.rand(n, m.num_classes, generator=g), torch.randint(0, 2, (n, m.num_classes), generator=g))
    else:
        m.update(torch.rand(n, generator=g), torch.randint(0, 2, (n,), generator=g))


def _config_worker(rank: int, world: int, port: int, q, done, ready) -> None:
    try:
        dist = _init(rank, world, port)
        outcomes = []
        for i, (_, a, b) in enumerate(CONFIG_CASES):
            m = _make(a if rank == 0 else b)
            _feed(m, rank)
            before = m.state.clone()
            try:
                (m.compute if i % 2 == 0 else m.sync)()
                outcomes.append("no error")
            except ValueError as e:
                outcomes.append(str(e))
            outcomes[-1] = (outcomes[-1], torch.equal(m.state, before))
        # The same configuration on every rank: one check, then the sums of every compute.
        m = _make(dict(num_classes=3, top_k=(1, 2), ignore_index=-1))
        _feed(m, rank)
        calls = {"gather": 0, "all_reduce": 0}
        originals = {n: getattr(dist, n) for n in ("all_gather_single", "all_gather_into_tensor", "all_reduce")
                     if hasattr(dist, n)}

        def counting(name, f):
            def wrapped(*a, **k):
                calls["all_reduce" if name == "all_reduce" else "gather"] += 1
                return f(*a, **k)
            return wrapped

        for n, f in originals.items():
            setattr(dist, n, counting(n, f))
        samples = [int(m.compute()["samples"]) for _ in range(3)]
        for n, f in originals.items():
            setattr(dist, n, f)
        q.put({"rank": rank, "outcomes": outcomes, "samples": samples, "calls": calls})
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:
        q.put({"rank": rank, "error": repr(e)})
        raise


def test_compute_refuses_ranks_configured_differently_on_every_rank():
    out = _spawn(_config_worker, 2)
    assert not [o for o in out if "error" in o], out
    for (field, a, b), o0, o1 in zip(CONFIG_CASES, out[0]["outcomes"], out[1]["outcomes"]):
        for msg, unchanged in (o0, o1):
            assert msg.startswith("stepscope: ClassificationMetrics.") and "configured differently" in msg, msg
            va, vb = (_make(c)._config_dict().get(field) for c in (a, b))  # thresholds=None is not saved
            va, vb = (tuple(v) if isinstance(v, list) else v for v in (va, vb))
            assert f"{field}: {va!r} on rank(s) [0], {vb!r} on rank(s) [1]" in msg, msg
            assert unchanged, "a refused sync() changed the state"
        assert o0[0] == o1[0]
    assert out[0]["samples"] == out[1]["samples"] == [10 + 13] * 3
    # The configuration is compared once, then each compute() is its one all_reduce.
    assert out[0]["calls"] == out[1]["calls"] == {"gather": 1, "all_reduce": 3}


def _timeout_worker(rank: int, world: int, port: int, q, done, ready, what: str, missing: int) -> None:
    import time

    try:
        _init(rank, world, port)
        if rank == missing:  # in the group, alive, but never calls
            done.wait(80)
            _leave(q)
        m = _metrics(sync_on_compute=True, sync_timeout=2.0 if what == "compute" else None)
        m.update(torch.randn(4, 5), torch.randint(0, 5, (4,)))
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with stepscope.Monitor(model, opt, warmup_steps=0, flops=None) as mon:
            for _ in range(3):
                model(torch.randn(2, 3)).sum().backward()
                opt.step()
        ready.wait(60)  # the callers arrive together: the timeout is not spent on a slow start-up
        t0 = time.monotonic()
        try:
            if what == "compute":
                m.compute()
            elif what == "sync":
                m.sync(timeout=2)
            else:
                distributed.gather_report(mon, timeout=2)
            rec = {"type": None}
        except Exception as e:  # noqa: BLE001  (what it raised is the result)
            rec = {"type": type(e).__name__, "msg": str(e),
                   "is_timeout": isinstance(e, (TimeoutError, distributed.CollectiveTimeoutError))}
        q.put({"rank": rank, "s": time.monotonic() - t0, **rec})
        done.wait(80)  # rank 0's process holds the store the other ranks read the arrivals from
        _leave(q)
    except BaseException as e:
        q.put({"rank": rank, "error": repr(e)})
        raise


@pytest.mark.parametrize("what,world,missing,call", [
    ("compute", 3, 1, "ClassificationMetrics.compute()"),
    ("sync", 2, 1, "ClassificationMetrics.sync()"),
    ("gather", 2, 0, "mon.report(gather=True)"),
])
def test_a_missing_rank_is_named_after_the_timeout(what, world, missing, call):
    out = _spawn(_timeout_worker, world, what, missing, expect=world - 1)
    assert len(out) == world - 1 and not [o for o in out if "error" in o], out
    for o in out:
        assert o["type"] == "CollectiveTimeoutError" and o["is_timeout"], o
        assert o["msg"].startswith(f"stepscope: {call} is a collective and timed out after 2 s"), o["msg"]
        assert f"rank(s) [{missing}] had not called it" in o["msg"], o["msg"]
        # bounded by stepscope's timeout, not the group's 40 s (loose: a loaded machine is slow)
        assert 2.0 <= o["s"] < 25, o["s"]
