"""Throughput: FLOPs per step (against analytic counts and FlopCounterMode), the peak table, MFU,
tokens/s, the rule and the exports."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import stepscope
from stepscope import _monitor_throughput as tp
from stepscope import distributed, hardware
from stepscope.diagnose_throughput import format_throughput, rule_low_mfu, step_rates

F = torch.nn.functional
HARDWARE = Path(stepscope.__file__).with_name("hardware.py")


def train(model, batches, opt=None, micro=1, **kw):
    opt = opt or torch.optim.SGD(model.parameters(), lr=1e-3)
    with stepscope.Monitor(model, opt, **kw) as mon:
        for x, y in batches:
            for _ in range(micro):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return mon


def reference_flops(model, x, y):
    # FlopCounterMode over forward and backward, the input needing a gradient too, so that every
    # layer's backward is twice its forward (the model-FLOPs convention stepscope counts by).
    with FlopCounterMode(display=False) as c:
        F.cross_entropy(model(x.detach().requires_grad_(x.is_floating_point())), y).backward()
    model.zero_grad()
    return c.get_total_flops()


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48), torch.nn.ReLU(),
                               torch.nn.Linear(48, 10))


def batches(n, b=16, width=32, classes=10):
    return [(torch.randn(b, width), torch.randint(0, classes, (b,))) for _ in range(n)]


# ----------------------------------------------------------------------------- counts
def test_mlp_count_is_the_analytic_count_and_flopcountermode_s():
    model, data = mlp(), batches(6)
    mon = train(model, data)
    t = mon.report()["throughput"]
    b, dims = 16, [(32, 64), (64, 48), (48, 10)]
    analytic = 3 * sum(2 * b * i * o for i, o in dims)  # 2*in*out per sample per Linear forward, 2x that backward
    assert t["flops_per_step"] == analytic == reference_flops(model, *data[0])
    assert t["flops_source"] == "counted" and t["precision"] == "fp32"
    assert t["flops_by_precision"] == {"fp32": analytic}


def test_small_cnn_count_equals_flopcountermode_and_the_analytic_forward():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10))
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(5)]
    mon = train(model, data)
    got = mon.report()["throughput"]["flops_per_step"]
    assert got == reference_flops(model, *data[0])
    conv1, conv2, lin = 2 * 4 * 8 * 8 * 8 * 3 * 9, 2 * 4 * 16 * 6 * 6 * 8 * 9, 2 * 4 * 576 * 10
    assert got == 3 * (conv1 + conv2 + lin)


class Block(torch.nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, 10)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        return self.head(self.out(a).mean(1))


def test_cpu_attention_is_counted_where_flopcountermode_counts_zero():
    torch.manual_seed(2)
    model = Block()
    b, s, d, h = 2, 24, 32, 4
    x = torch.randn(b, s, d)
    data = [(x, torch.randint(0, 10, (b,))) for _ in range(4)]
    mon = train(model, data)
    got = mon.report()["throughput"]["flops_per_step"]
    # FlopCounterMode misses the CPU kernel (aten._scaled_dot_product_flash_attention_for_cpu):
    # the difference is attention alone. Forward Q K^T and P V, 2 b h s^2 (d/h) each; backward twice.
    attention = 3 * 2 * 2 * b * h * s * s * (d // h)
    assert got - reference_flops(model, *data[0]) == attention


def test_gradient_accumulation_counts_every_micro_batch_of_the_step():
    one = train(mlp(), batches(5)).report()["throughput"]["flops_per_step"]
    three = train(mlp(), batches(5), micro=3).report()["throughput"]["flops_per_step"]
    assert three == 3 * one


def test_a_new_shape_is_recounted_and_its_step_kept_out_of_the_statistics():
    data = batches(8, b=16) + batches(6, b=8)
    calls = []
    mon = stepscope.Monitor(mlp(), None, warmup_steps=2)
    orig = mon._flops.on_shape
    mon._flops.on_shape = lambda k, first=None: calls.append(k) or orig(k, first)
    model = mon._models[0]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with mon:
        for x, y in data:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    rep = mon.report()
    t = rep["throughput"]
    assert t["shapes_counted"] == 2
    # Python ran on two steps only: each counted step's forward, its end and the step's end.
    assert len(calls) == 6 and calls[0] != calls[3] and calls[1] is calls[2] is calls[4] is calls[5] is None
    assert rep["warmup"]["steps"] == 3 and rep["steady_steps"] == 11  # warm-up 2 + the batch-8 count
    assert t["flops_per_step"] == reference_flops(model, *data[0])  # 7 steady steps ran batch 16


@pytest.mark.filterwarnings("ignore:stepscope.*no step ended")
def test_counting_is_on_only_inside_forwards_and_a_step_cut_short_counts_nothing():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = []
    model[0].register_forward_hook(lambda *a: seen.append(_get_current_dispatch_mode()))
    with stepscope.Monitor(model, opt) as mon:
        out = model(torch.randn(2, 32))  # the counted step's forward ...
        assert isinstance(seen[-1], tp.FlopCount) and _get_current_dispatch_mode() is None  # ... and after it
        out.sum().backward()
        model(torch.randn(2, 32))  # a second forward of the step: counted as well
        assert isinstance(seen[-1], tp.FlopCount)
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 5))  # a forward that raises leaves no mode on
        assert _get_current_dispatch_mode() is None
    # detached before the step ended: nothing is counted
    assert mon.report()["throughput"]["flops_per_step"] is None and mon._flops.counts == {}
    mon = train(model, batches(3), opt=opt)
    assert _get_current_dispatch_mode() is None and mon.report()["throughput"]["flops_source"] == "counted"


def test_user_flops_int_callable_none_and_bad_arguments():
    rep = train(mlp(), batches(5), flops=12345).report()["throughput"]
    assert rep["flops_per_step"] == 12345 and rep["flops_source"] == "user"
    seen = []
    rep = train(mlp(), batches(5), flops=lambda b: seen.append(b) or 100 * b).report()["throughput"]
    assert seen[-1] == 16 and rep["flops_per_step"] == 1600 and rep["flops_source"] == "callable"
    rep = train(mlp(), batches(5), flops=None).report()["throughput"]
    assert rep["flops_per_step"] is None and rep["mfu"] is None
    for bad in (dict(flops=0), dict(flops="yes"), dict(flops=True), dict(peak_flops=-1.0),
                dict(peak_flops="a"), dict(tokens_per_sample=0), dict(tokens_per_sample=2.5)):
        with pytest.raises(ValueError):
            stepscope.Monitor(mlp(), None, **bad)


def test_mfu_is_achieved_over_the_peak_given():
    rep = train(mlp(), batches(8), peak_flops=1e9).report()
    t = rep["throughput"]
    p50 = rep["phases"]["step"]["host"]["p50"]
    assert t["achieved_flops"] == pytest.approx(t["flops_per_step"] / p50)
    assert t["mfu"] == pytest.approx(t["achieved_flops"] / 1e9)
    assert t["peak_source"] == "user" and t["mfu_device"] is None


def test_tokens_from_an_integer_input_b_t_and_from_the_user():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 12, 50))
    data = [(torch.randint(0, 50, (4, 12)), torch.randint(0, 50, (4,))) for _ in range(6)]
    rep = train(model, data).report()
    t = rep["throughput"]
    assert t["tokens_per_sample"] == 12 and t["tokens_source"] == "input [B, T]"
    assert t["tokens_per_s"] == pytest.approx(12 * rep["samples_per_s"])
    t = train(model, data, tokens_per_sample=7).report()["throughput"]
    assert t["tokens_per_sample"] == 7 and t["tokens_source"] == "user"
    assert train(mlp(), batches(4)).report()["throughput"]["tokens_per_s"] is None  # float input


def test_cpu_mfu_of_a_matmul_bound_loop_is_a_fraction_of_the_measured_peak():
    torch.manual_seed(4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = 768
        model = torch.nn.Sequential(*[torch.nn.Linear(w, w) for _ in range(4)], torch.nn.Linear(w, 10))
        data = [(torch.randn(256, w), torch.randint(0, 10, (256,))) for _ in range(8)]
        t = train(model, data).report()["throughput"]
    finally:
        torch.set_num_threads(threads)
    assert t["peak_source"] == "measured" and "1 thread" in t["peak_note"]
    assert 0.2 <= t["mfu"] <= 1.0, t


def test_a_compiled_model_says_it_is_not_counted():
    model = torch.compile(mlp())
    mon = stepscope.Monitor(model, None).attach()
    mon.detach()
    t = mon.report()["throughput"]
    assert t["flops_per_step"] is None and "torch.compile" in t["flops_source"]


def test_a_failing_formula_warns_and_training_goes_on(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no formula")

    monkeypatch.setitem(tp.REGISTRY, torch.ops.aten.addmm, broken)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mon = train(mlp(), batches(5))
    assert any("counting FLOPs failed" in str(x.message) for x in w)
    t = mon.report()["throughput"]
    assert t["flops_per_step"] is None and "no formula" in t["flops_source"]
    assert mon.steps == 5


# ----------------------------------------------------------------------------- peaks
@pytest.mark.parametrize("name,cap,sms,dtype,tflops", [
    ("Tesla V100-SXM2-16GB", (7, 0), 80, "fp16", 125.0),
    ("Tesla V100-PCIE-32GB", (7, 0), 80, "fp16", 112.0),
    ("Tesla V100S-PCIE-32GB", (7, 0), 80, "fp32", 16.4),
    ("Tesla T4", (7, 5), 40, "fp16", 65.0),
    ("NVIDIA A100-SXM4-40GB", (8, 0), 108, "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", (8, 0), 108, "tf32", 156.0),
    ("NVIDIA A10", (8, 6), 72, "bf16", 125.0),
    ("NVIDIA A40", (8, 6), 84, "fp32", 37.4),
    ("NVIDIA L4", (8, 9), 58, "bf16", 121.0),
    ("NVIDIA L40", (8, 9), 142, "bf16", 181.0),
    ("NVIDIA L40S", (8, 9), 142, "bf16", 362.05),
    ("NVIDIA RTX 6000 Ada Generation", (8, 9), 142, "fp8", 364.2),
    ("NVIDIA GeForce RTX 4090", (8, 9), 128, "bf16", 165.2),
    ("NVIDIA H100 80GB HBM3", (9, 0), 132, "bf16", 989.5),
    ("NVIDIA H100 PCIe", (9, 0), 114, "bf16", 756.5),
    ("NVIDIA H100 NVL", (9, 0), 132, "bf16", 835.5),
    ("NVIDIA H200", (9, 0), 132, "fp8", 1979.0),
    ("NVIDIA H200 NVL", (9, 0), 132, "bf16", 835.5),
    ("NVIDIA GH200 480GB", (9, 0), 132, "bf16", 989.5),
    ("NVIDIA B200", (10, 0), 148, "bf16", 2250.0),
])
def test_the_table_pins_each_part(name, cap, sms, dtype, tflops):
    got = hardware.lookup(dtype, name=name, capability=cap, sm_count=sms)
    assert got is not None and got.flops == pytest.approx(tflops * 1e12) and got.source == "datasheet"
    assert hardware.peak_flops(dtype, name=name, capability=cap, sm_count=sms) == got.flops


def test_near_names_get_their_own_rows():
    def part(name, cap, sms):
        p = hardware.find_part(name=name, capability=cap, sm_count=sms)
        return p.name if p else None

    assert [part(n, (8, 9), s) for n, s in (("NVIDIA L4", 58), ("NVIDIA L40", 142), ("NVIDIA L40S", 142))] == \
        ["L4", "L40", "L40S"]
    assert part("NVIDIA L4", (8, 9), 142) is None  # "L4" is not a word of any 142-SM row
    assert [part(n, (9, 0), s) for n, s in (("NVIDIA H100 PCIe", 114), ("NVIDIA H100 80GB HBM3", 132),
                                            ("NVIDIA H100 NVL", 132), ("NVIDIA H200", 132))] == \
        ["H100 PCIe", "H100 SXM", "H100 NVL", "H200 SXM"]
    # Without a name, a (capability, SMs) pair several rows share names none of them.
    assert hardware.find_part(name=None, capability=(9, 0), sm_count=132) is None
    assert hardware.find_part(name=None, capability=(9, 0), sm_count=114).name == "H100 PCIe"


def test_an_unknown_part_gets_none_and_an_estimate_only_when_asked_and_labelled():
    kw = dict(name="NVIDIA H800", capability=(9, 0), sm_count=132)
    assert hardware.peak_flops("bf16", **kw) is None
    assert hardware.lookup("bf16", **kw) is None
    assert hardware.lookup("bf16", **kw, estimate=True) is None  # no clock, no estimate
    est = hardware.lookup("bf16", **kw, clock_mhz=1830.0, estimate=True)
    assert est.source == "estimate" and "estimate" in est.note
    assert est.flops == pytest.approx(132 * 1830e6 * 4096)
    assert hardware.lookup("bf16", name="NVIDIA RTX 9999", capability=(8, 9), sm_count=77, clock_mhz=2000,
                           estimate=True) is None  # Ada: no one figure per SM
    with pytest.raises(ValueError):
        hardware.peak_flops("int8", name="NVIDIA A100-SXM4-40GB", capability=(8, 0), sm_count=108)


def test_precisions_a_part_lacks():
    v100 = dict(name="Tesla V100-SXM2-16GB", capability=(7, 0), sm_count=80)
    assert hardware.lookup("bf16", **v100) is None
    tf32 = hardware.lookup("tf32", **v100)
    assert tf32.dtype == "fp32" and tf32.flops == 15.7e12 and "no TF32" in tf32.note
    assert hardware.lookup("fp8", name="NVIDIA A100-SXM4-40GB", capability=(8, 0), sm_count=108) is None


def test_the_table_needs_no_torch():
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('hw', {str(HARDWARE)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.peak_flops('bf16', name='NVIDIA H200', capability=(9, 0), sm_count=132)); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["989500000000000.0", "False"]


def test_precision_of_follows_torch_s_tf32_switches():
    x = torch.zeros(1)
    assert tp.precision_of(x.bfloat16(), False) == "bf16" and tp.precision_of(x.half(), True) == "fp16"
    assert tp.precision_of(x, False) == "fp32"  # CPU fp32 is fp32 whatever the matmul precision


# ----------------------------------------------------------------------------- rule, summary, exports
def gpu_report(mfu=0.1, peak=989.5e12, lag_us=None, data_share=None, **ctx):
    tput = {"flops_per_step": 1e12, "flops_source": "counted", "precision": "bf16", "device_name": "NVIDIA H200",
            "achieved_flops": mfu * peak if peak else 1e13, "achieved_flops_device": None,
            "peak_flops": peak, "peak_source": "datasheet" if peak else None, "peak_part": "H200 SXM" if peak else None,
            "peak_note": None if peak else "no peak for bf16 on NVIDIA H200: not in stepscope.hardware's table",
            "mfu": mfu if peak else None, "mfu_device": None, "tokens_per_s": 5000.0, "tokens_per_sample": 10}
    step = {"count": 10, "p50": 0.01, "mean": 0.01, "total": 0.1}
    phases = {p: {"host": dict(step, p50=0.001, total=0.01), "device": None, "share_host": 0.1}
              for p in ("data", "forward", "loss", "backward", "other", "optimizer")}
    phases["step"] = {"host": step, "device": None, "share_host": 1.0}
    phases["data"]["host"]["p50"] = 1e-5  # not input-bound unless asked
    if data_share:
        phases["data"]["host"]["p50"] = data_share * step["p50"]
    lag = {"forward_begin": {"count": 10, "p50": lag_us * 1e-6}} if lag_us is not None else None
    return {"device": True, "throughput": tput, "phases": phases, "lag": lag, "context": dict(ctx),
            "steps": 10, "steady_steps": 10}


def test_low_mfu_rule_advice_follows_the_other_findings():
    (f,) = rule_low_mfu(gpu_report(mfu=0.1))
    assert f["rule"] == "low_mfu" and f["severity"] == "warn" and "10%" in f["title"]
    (f,) = rule_low_mfu(gpu_report(mfu=0.1, lag_us=5))
    assert "launch_bound" in f["evidence"]["other_findings"] and "CUDA graphs" in f["advice"]
    (f,) = rule_low_mfu(gpu_report(mfu=0.1, cuda_capability=[9, 0], param_dtype="float32", train_forwards=5,
                                   autocast_forwards=0))
    assert "bfloat16" in f["advice"]
    (f,) = rule_low_mfu(gpu_report(mfu=0.1, lag_us=5, data_share=0.3))
    assert f["evidence"]["other_findings"][0] == "input_bound" and "loader" in f["advice"]
    assert "torch.compile" in rule_low_mfu(gpu_report(mfu=0.1))[0]["advice"]
    assert rule_low_mfu(gpu_report(mfu=0.5)) == []
    cpu = gpu_report(mfu=0.1)
    cpu["device"] = False
    assert rule_low_mfu(cpu) == []
    (f,) = rule_low_mfu(gpu_report(peak=None))
    assert f["rule"] == "mfu_unknown" and f["severity"] == "info" and "not in" in f["evidence"]["why"]


def test_summary_line_and_unknown_peak_warning():
    (line,) = format_throughput(gpu_report(mfu=0.41))
    assert line.startswith("throughput: MFU 41% of 990 TFLOP/s bf16 (H200 SXM, datasheet)")
    lines = format_throughput(gpu_report(peak=None))
    assert "warning: MFU unknown" in lines[1] and "peak_flops" in lines[1]
    assert format_throughput({}) == []


def test_csv_trace_and_tensorboard_carry_mfu_and_tokens(tmp_path):
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 12, 50))
    data = [(torch.randint(0, 50, (4, 12)), torch.randint(0, 50, (4,))) for _ in range(6)]
    mon = train(model, data, peak_flops=1e10)
    rep = mon.report()
    mon.to_csv(tmp_path / "s.csv")
    head, *rows = [r.split(",") for r in (tmp_path / "s.csv").read_text().splitlines()]
    last, step = rows[-1], mon.recent_steps()[-1]
    mfu, tokens = step_rates(rep, step)
    assert float(last[head.index("mfu")]) == pytest.approx(mfu, rel=1e-6)
    assert float(last[head.index("tokens_per_s")]) == pytest.approx(tokens, rel=1e-6)
    assert mfu == pytest.approx(rep["throughput"]["flops_per_step"] / sum(step["host"].values()) / 1e10)
    mon.export_trace(tmp_path / "t.json")
    names = {e["name"] for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"]}
    assert {"mfu", "tokens/s"} <= names

    class W:
        def __init__(self):
            self.tags = {}

        def add_scalar(self, tag, v, step):
            self.tags[tag] = v

    w = W()
    stepscope.export.log_tensorboard(w, mon, step=6)
    assert w.tags["stepscope/mfu"] == pytest.approx(rep["throughput"]["mfu"], rel=0.5)
    assert "stepscope/tokens_per_s" in w.tags
    from stepscope.integrations._common import phase_scalars

    got = phase_scalars(rep)
    assert got["mfu"] == rep["throughput"]["mfu"] and got["tokens_per_s"] == rep["throughput"]["tokens_per_s"]
    assert "MFU" in mon.summary()


def test_gathered_throughput_sums_the_ranks():
    mon = train(mlp(), batches(5), peak_flops=1e9)
    local = mon.report()
    pack = mon._tl.pack()
    rows = [torch.cat([pack, torch.tensor([-1.0, -1.0, 10.0, 5.0, 20.0, 100.0], dtype=torch.float64)]),
            torch.cat([pack, torch.tensor([-1.0, -1.0, 10.0, 3.0, 20.0, 50.0], dtype=torch.float64)])]
    t = distributed.report_from_gathered(torch.stack(rows), local)["throughput"]
    assert (t["ranks"], t["flops_per_step"], t["achieved_flops"], t["peak_flops"]) == (2, 20.0, 8.0, 40.0)
    assert t["mfu"] == pytest.approx(0.2) and t["tokens_per_s"] == 150.0
    rows[1][-1] = -1.0  # one rank without tokens: no total
    assert distributed.report_from_gathered(torch.stack(rows), local)["throughput"]["tokens_per_s"] is None


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_counting_adds_no_sync_after_the_counted_step():
    torch.manual_seed(6)
    model = mlp().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = [(x.cuda(), y.cuda()) for x, y in batches(12)]
    with stepscope.Monitor(model, opt) as mon:
        for i, (x, y) in enumerate(data):
            if i == 4:
                torch.cuda.set_sync_debug_mode("error")
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.set_sync_debug_mode(0)
    t = mon.report()["throughput"]
    assert t["flops_per_step"] == reference_flops(model, *data[0])
    name = torch.cuda.get_device_name()
    assert t["device_name"] == name and (t["peak_flops"] is None or t["peak_source"] == "datasheet")
    assert t["precision"] == ("tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32")


def test_the_cpu_peak_matmul_is_sized_from_a_probe_and_bounded_in_time(monkeypatch):
    # The size: one matmul of about TARGET_S at the probe's rate, a multiple of 128 in [256, 2048].
    for rate, n in ((1e9, 256), (7.5e10, 512), (1.2e11, 640), (1e13, 2048)):
        monkeypatch.setattr(tp, "_best_mm", lambda m, *a, r=rate: 2.0 * m ** 3 / r)
        assert tp.cpu_peak_size() == n, (rate, tp.cpu_peak_size())
    monkeypatch.undo()
    # The timing loop: at least two timed matmuls, then until the repeats or the budget.
    calls = []
    kernels = tuple((lambda a, b, k=k, mm=mm: calls.append(k) or mm(a, b)) for k, mm in enumerate(tp.PEAK_KERNELS))
    monkeypatch.setattr(tp, "PEAK_KERNELS", kernels)
    tp._best_mm(64, torch.float32, 12, 0.0)
    assert calls == [0] * 3 + [1] * 3  # per layout the untimed first call, then two
    calls.clear()
    tp._best_mm(64, torch.float32, 5, 3600.0)
    assert calls == [0] * 6 + [1] * 6
    # A dtype a CPU multiplies a thousand times slower (bfloat16 without hardware support) is
    # measured at the smallest size, not the 1024 that took 13 x 2.5 s there.
    monkeypatch.undo()
    monkeypatch.setattr(tp, "_CPU_PEAKS", {})
    monkeypatch.setattr(tp, "_CPU_PEAK_N", {})
    monkeypatch.setattr(tp, "_best_mm",
                        lambda m, dtype, *a: 2.0 * m ** 3 / (1e9 if dtype == torch.bfloat16 else 1e11))
    assert tp.measured_cpu_peak(torch.bfloat16) == pytest.approx(1e9)
    assert tp._CPU_PEAK_N[(torch.get_num_threads(), torch.bfloat16)] == 256
    peak = tp.peak_for("bf16", None, None)
    assert peak.source == "measured" and "bfloat16 256x256 matmul" in peak.note


def test_a_peak_measured_under_load_is_measured_again(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(tp, "_CPU_PEAKS", {(1, torch.float32): 1e6})  # as if measured on a busy CPU
        monkeypatch.setattr(tp, "_REMEASURED", {})
        t = train(mlp(), batches(6)).report()["throughput"]
    finally:
        torch.set_num_threads(threads)
    assert t["peak_flops"] > 1e6 and tp._REMEASURED[(1, torch.float32)] == 1 and t["mfu"] < 1.5
