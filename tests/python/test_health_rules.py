"""The training-health rules (stepscope.diagnose_health) on crafted ``report()["health"]`` dicts:
each fires on its planted case with its evidence and stays silent on a healthy report, on health
None or absent, and on empty series; the summary's health section; and the rules in
diagnose.RULES, run on a real Monitor's report."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

import stepscope
from stepscope import diagnose as dg
from stepscope import diagnose_health as dh
from stepscope.report import format_summary

from test_diagnose import crafted

HEALTH_RULE_NAMES = {"nonfinite_grads", "grad_norm_spikes", "no_grad", "update_ratio", "loss_spikes",
                     "health_disabled"}


def healthy_health(steps: int = 200, seed: int = 0) -> dict:
    """A healthy run's health: noisy, slowly falling norms and losses, ratio near 1e-3."""
    rng = random.Random(seed)
    norms = [1.0 + 0.3 * rng.random() for _ in range(steps)]
    losses = [2.0 * math.exp(-i / 100) + 0.1 + 0.05 * rng.random() for i in range(steps)]
    return {
        "steps": steps,
        "grad_norm": {"count": steps, "mean": 1.15, "std": 0.09, "min": min(norms), "max": max(norms), "p50": 1.15,
                      "p90": 1.27, "p99": 1.3, "last": norms[-1]},
        "top_params": [{"name": "fc1.weight", "norm_last": 0.9, "norm_max": 1.1, "norm_mean": 0.95}],
        "nonfinite": {"steps": 0, "first_step": None, "first_param": None, "loss_nonfinite": None,
                      "counts": "elements", "mode": "warn", "skipped": 0},
        "no_grad": {"names": [], "steps": steps},
        "update_ratio": {"every": 10, "samples": steps // 10,
                         "overall": {"last": 1.1e-3, "mean": 1.2e-3, "min": 8e-4, "max": 2e-3},
                         "groups": [{"group": 0, "params": 4, "last": 1.1e-3, "mean": 1.2e-3, "min": 8e-4,
                                     "max": 2e-3}]},
        "loss": {"count": steps, "mean": 1.0, "min": min(losses), "max": max(losses), "last": losses[-1],
                 "nonfinite_steps": 0, "first_nonfinite_step": None},
        "recent": [[i, v] for i, v in enumerate(norms)],
        "recent_loss": [[i, v] for i, v in enumerate(losses)],
        "disabled": None,
    }


def with_health(health) -> dict:
    return crafted(health=health)


def health_findings(rep: dict) -> dict:
    return {f["rule"]: f for f in dg.diagnose(rep) if f["rule"] in HEALTH_RULE_NAMES}


def test_health_rules_are_in_the_diagnosis():
    for r in dh.HEALTH_RULES:
        assert r in dg.RULES
    assert len(set(dg.RULES)) == len(dg.RULES)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_healthy_report_has_no_health_finding(seed):
    assert health_findings(with_health(healthy_health(seed=seed))) == {}


@pytest.mark.parametrize("health", [None, "absent"])
def test_no_health_is_silent(health):
    rep = crafted() if health == "absent" else with_health(None)
    assert "health" not in rep or rep["health"] is None
    for r in dh.HEALTH_RULES:
        assert r(rep) == []


def test_empty_parts_are_silent():
    h = healthy_health()
    h.update(recent=[], recent_loss=[], update_ratio=None, loss=None, no_grad={"names": [], "steps": 0})
    assert health_findings(with_health(h)) == {}


@pytest.mark.parametrize("loss_bad,word", [(True, "forward or the loss"), (False, "backward made it"),
                                           (None, "loss was not seen")])
@pytest.mark.parametrize("mode", ["warn", "skip", "raise"])
def test_nonfinite_gradients_critical_with_step_param_and_cause(loss_bad, word, mode):
    h = healthy_health()
    h["nonfinite"] = {"steps": 3, "first_step": 41, "first_param": "encoder.layer2.weight",
                      "loss_nonfinite": loss_bad, "counts": "elements", "mode": mode,
                      "skipped": 3 if mode == "skip" else 0}
    f = health_findings(with_health(h))["nonfinite_grads"]
    assert f["severity"] == "critical"
    assert "step 41" in f["title"] and "encoder.layer2.weight" in f["title"]
    assert f["evidence"]["first_step"] == 41 and f["evidence"]["first_param"] == "encoder.layer2.weight"
    assert f["evidence"]["loss_nonfinite"] is loss_bad and f["evidence"]["mode"] == mode
    assert word in f["advice"]
    if mode == "skip":
        assert "skipped 3 update(s)" in f["advice"]
    if loss_bad:
        assert "bfloat16" in f["advice"] and "GradScaler" in f["advice"]


def test_grad_norm_spike_names_steps_and_factors():
    h = healthy_health()
    for i in (100, 150):
        h["recent"][i][1] = 40.0
    f = health_findings(with_health(h))["grad_norm_spikes"]
    assert f["severity"] == "warn"
    assert f["evidence"]["steps"] == [100, 150]
    assert all(25 < x < 45 for x in f["evidence"]["factors"])
    assert "clip_grad_norm_" in f["advice"] and "warm-up" in f["advice"]


def test_grad_norm_spike_needs_history_and_ignores_nonfinite():
    h = healthy_health()
    h["recent"][3][1] = 100.0                 # fewer than SPIKE_MIN_BEFORE steps before it
    h["recent"][60][1] = float("nan")         # the non-finite rule's, not a spike
    h["recent"][61][1] = float("inf")
    h["recent"][70][1] = 9.0                  # under 10x the median (~1.15)
    assert "grad_norm_spikes" not in health_findings(with_health(h))
    h["recent"][70][1] = 12.0
    assert health_findings(with_health(h))["grad_norm_spikes"]["evidence"]["steps"] == [70]


def test_no_grad_names_parameters_and_ddp():
    h = healthy_health()
    names = [f"heads.{i}.weight" for i in range(8)]
    h["no_grad"] = {"names": names, "steps": 200}
    f = health_findings(with_health(h))["no_grad"]
    assert f["severity"] == "warn" and f["evidence"]["count"] == 8
    assert "heads.0.weight" in f["title"] and "3 more" in f["title"]
    assert "find_unused_parameters=True" in f["advice"] and "detach" in f["advice"]
    h["no_grad"]["steps"] = dh.NO_GRAD_MIN_STEPS - 1
    assert "no_grad" not in health_findings(with_health(h))


@pytest.mark.parametrize("mean,word", [(5e-2, "too high"), (2e-6, "too low")])
def test_update_ratio_out_of_range(mean, word):
    h = healthy_health()
    h["update_ratio"]["overall"]["mean"] = mean
    h["update_ratio"]["groups"].append({"group": 1, "params": 2, "last": mean, "mean": mean, "min": mean,
                                        "max": mean})
    f = health_findings(with_health(h))["update_ratio"]
    assert f["severity"] == "warn" and word in f["advice"]
    assert [g["group"] for g in f["evidence"]["groups"]] == [0, 1]
    assert f["evidence"]["groups"][1]["mean"] == mean
    h["update_ratio"]["samples"] = dh.UPDATE_RATIO_MIN_SAMPLES - 1
    assert "update_ratio" not in health_findings(with_health(h))


@pytest.mark.parametrize("mean", [1e-2, 1e-5, 1e-3, float("nan")])
def test_update_ratio_in_range_or_unknown_is_silent(mean):
    h = healthy_health()
    h["update_ratio"]["overall"]["mean"] = mean
    assert "update_ratio" not in health_findings(with_health(h))


def test_loss_spike_names_its_step():
    h = healthy_health()
    h["recent_loss"][120][1] = 5.0            # the loss is ~0.5 there
    f = health_findings(with_health(h))["loss_spikes"]
    assert f["severity"] == "warn" and f["evidence"]["steps"] == [120]
    assert "step 120" in f["title"] and "batches of those steps" in f["advice"]


def test_loss_spike_needs_a_relative_jump_and_ignores_nonfinite():
    h = healthy_health()
    flat = [[i, 1.0 + 1e-6 * (i % 3)] for i in range(100)]
    flat[50][1] = 1.1                         # many MADs, but only 10% above
    flat[60][1] = float("nan")
    h["recent_loss"] = flat
    assert "loss_spikes" not in health_findings(with_health(h))
    flat[50][1] = 1.5
    assert health_findings(with_health(h))["loss_spikes"]["evidence"]["steps"] == [50]


def test_disabled_is_info_only():
    h = healthy_health()
    h["disabled"] = "a sparse gradient (embedding.weight)"
    f = health_findings(with_health(h))
    assert list(f) == ["health_disabled"] and f["health_disabled"]["severity"] == "info"
    assert "sparse gradient" in f["health_disabled"]["title"]


def test_summary_health_section():
    h = healthy_health()
    text = format_summary(with_health(h), findings=[])
    assert "health (gradient statistics over 200 steps)" in text
    assert f"p50 {1.15:.4g}" in text and "non-finite gradients: none" in text
    assert "update ratio" in text and "loss last" in text
    h2 = copy.deepcopy(h)
    h2["nonfinite"].update(steps=2, first_step=7, first_param="fc2.bias")
    h2["no_grad"]["names"] = ["head.weight", "head.bias"]
    h2.update(update_ratio=None, loss=None)
    text2 = format_summary(with_health(h2))
    assert "first at step 7 in fc2.bias" in text2 and "2 parameter(s): head.weight, head.bias" in text2
    assert "update ratio" not in text2 and "loss last" not in text2
    h2["update_ratio"] = {"every": 100, "samples": 1, "overall": {"mean": None}, "groups": []}
    assert "update ratio ||dw||/||w||: mean - over 1 sampled steps" in format_summary(with_health(h2))
    for rep in (crafted(), with_health(None)):
        assert "health" not in format_summary(rep)


def test_rules_run_on_a_monitor_report():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepscope.Monitor(model, opt, warmup_steps=1) as mon:
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 2, (4,)))
            loss.backward()
            opt.step()
            opt.zero_grad()
    rep = mon.report()
    if rep.get("health") is None:
        assert health_findings(rep) == {}
    assert [f for f in dg.diagnose(rep) if f["rule"] in HEALTH_RULE_NAMES and f["severity"] != "info"] == []
    format_summary(rep, findings=dg.diagnose(rep))


def test_spike_windows_kept_sorted_judge_as_the_plain_median_does():
    # dh._spikes keeps its window sorted as it slides; every judgement must be the one the plain
    # statistics.median over the previous finite values in order gives (ties, NaN/inf and
    # spikes planted at random, fresh every run).
    import statistics

    def plain(series, is_spike):
        out, window = [], []
        for step, v in series:
            if not math.isfinite(v):
                continue
            if len(window) >= dh.SPIKE_MIN_BEFORE:
                med = statistics.median(window)
                if is_spike == "grad":
                    if med > 0 and v >= dh.GRAD_SPIKE_FACTOR * med:
                        out.append({"step": step, "grad_norm": v, "median": med, "factor": v / med})
                else:
                    mad = statistics.median(abs(x - med) for x in window)
                    jump = v - med
                    quiet = jump <= dh.LOSS_SPIKE_MADS * mad or jump < dh.LOSS_SPIKE_REL * abs(med)
                    if jump > 0 and not quiet:
                        out.append({"step": step, "loss": v, "median": med, "mad": mad})
            window.append(v)
            if len(window) > dh.SPIKE_WINDOW:
                window.pop(0)
        return out

    rng = random.Random()
    for _ in range(40):
        series = []
        for step in range(rng.randrange(0, 400)):
            r = rng.random()
            v = (float("nan") if r < 0.03 else math.inf if r < 0.04 else rng.choice([1.0, 2.0]) if r < 0.2
                 else 30 * rng.random() if r < 0.25 else 1 + rng.random())
            series.append([step, v])
        assert dh._spikes(series, dh._grad_spike) == plain(series, "grad")
        assert dh._spikes(series, dh._loss_spike) == plain(series, "loss")


def test_summary_counts_finite_norms_only_where_they_differ_from_the_steps():
    h = healthy_health()
    (line,) = [x for x in dh.format_health({"health": h}) if x.startswith("  grad norm")]
    assert "over" not in line and f"over {h['steps']} steps" in dh.format_health({"health": h})[0]
    h["grad_norm"]["count"] = h["steps"] - 3
    (line,) = [x for x in dh.format_health({"health": h}) if x.startswith("  grad norm")]
    assert line.endswith(f"over {h['steps'] - 3} finite steps"), line
