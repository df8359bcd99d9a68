"""The throughput rule and the summary's throughput line, over ``report()["throughput"]``.

A report without throughput (a run saved before it, or ``Monitor(flops=None)`` with no peak) makes
the rule silent and the summary leave the line out.
"""

from __future__ import annotations

from typing import Any, Optional

# Well-tuned large-model training reaches 35-55% MFU: PaLM reported 46.2% on TPU v4 (Chowdhery et
# al. 2022, "PaLM: Scaling Language Modeling with Pathways", section 4 and table 3) and Megatron-LM's
# GPT runs on A100s 40-52% (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on
# GPU Clusters Using Megatron-LM", table 1). Below a quarter of the peak the GPU mostly waits.
LOW_MFU = 0.25


def _finding(*args: Any, **kw: Any) -> dict:
    from .diagnose import finding  # diagnose imports this module for its RULES

    return finding(*args, **kw)


def _tp(rep: dict) -> Optional[dict]:
    return rep.get("throughput") or None


def _si(x: float, unit: str) -> str:
    for k, p in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= p:
            return f"{x / p:.3g} {k}{unit}"
    return f"{x:.3g} {unit}"


def _advice(rep: dict) -> tuple:
    # What the other rules found decides what to try first: the loader, the launches, the precision.
    from .diagnose import rule_input_bound, rule_launch_bound, rule_precision

    found = [f["rule"] for r in (rule_input_bound, rule_launch_bound, rule_precision) for f in r(rep)]
    if "input_bound" in found:
        return found, ("The step waits for data first: fix the loader (see input_bound), then look at MFU "
                       "again.")
    if "launch_bound" in found:
        return found, ("The GPU waits for the host's launches (see launch_bound): CUDA graphs via "
                       "torch.compile(model, mode=\"reduce-overhead\"), a larger batch, fused optimizers.")
    if "precision" in found:
        return found, ("fp32 without autocast leaves the tensor cores idle (see precision): "
                       "torch.autocast(\"cuda\", dtype=torch.bfloat16) around forward and loss.")
    return found, ("Raise the arithmetic per launch: a larger batch or sequence, torch.compile(model) to fuse "
                   "elementwise work, FlashAttention (F.scaled_dot_product_attention), and look at the "
                   "modules that take the most time (Monitor(per_module=True)); stepscope.tune.step(train_step, "
                   "model, optimizer, batch) times the step-level candidates.")


def rule_low_mfu(rep: dict) -> list:
    """On a GPU: MFU below :data:`LOW_MFU` (warn), or MFU unknown because no peak is known (info,
    evidence says why). Silent on CPU and without a FLOP count."""
    tp = _tp(rep)
    if tp is None or not tp.get("flops_per_step") or not rep.get("device"):
        return []
    if tp.get("peak_flops") is None:
        return [_finding(
            "mfu_unknown", "info", f"MFU unknown: no peak FLOP/s for {tp.get('device_name')}",
            {"device_name": tp.get("device_name"), "precision": tp.get("precision"), "why": tp.get("peak_note"),
             "achieved_flops": tp.get("achieved_flops")},
            "stepscope.hardware's datasheet table does not have this part (it never takes another part's "
            "figure). Pass Monitor(peak_flops=<the datasheet's dense FLOP/s for this precision>).")]
    mfu = tp.get("mfu_device") if tp.get("mfu_device") is not None else tp.get("mfu")
    if mfu is None or mfu >= LOW_MFU:
        return []
    found, advice = _advice(rep)
    return [_finding(
        "low_mfu", "warn", f"low MFU: {100 * mfu:.0f}% of the {tp['precision']} peak",
        {"mfu": mfu, "achieved_flops": tp.get("achieved_flops_device") or tp.get("achieved_flops"),
         "peak_flops": tp["peak_flops"], "peak_source": tp.get("peak_source"), "peak_part": tp.get("peak_part"),
         "flops_per_step": tp["flops_per_step"], "other_findings": found},
        advice)]


THROUGHPUT_RULES: list = [rule_low_mfu]


def format_throughput(rep: dict) -> list:
    """The summary's throughput line: ``MFU 41% of 989 TFLOP/s bf16 (NVIDIA H200, datasheet)`` with
    the achieved FLOP/s, the FLOPs per step and tokens/s; a warning when no peak is known."""
    tp = _tp(rep)
    if tp is None:
        return []
    tokens = f", tokens/s {tp['tokens_per_s']:.4g}" if tp.get("tokens_per_s") else ""
    if not tp.get("flops_per_step"):
        return [f"throughput: FLOPs {tp.get('flops_source')}{tokens}"] if tokens else []
    got = tp.get("achieved_flops_device") or tp.get("achieved_flops")
    done = (f"{_si(got, 'FLOP/s')} achieved, " if got else "") + \
        f"{_si(tp['flops_per_step'], 'FLOP')} per step ({tp['flops_source']})"
    if tp.get("peak_flops") is None:
        return [f"throughput: {done}{tokens}",
                f"  warning: MFU unknown: {tp.get('peak_note')}; pass Monitor(peak_flops=...)"]
    mfu = tp.get("mfu_device") if tp.get("mfu_device") is not None else tp.get("mfu")
    where = f"{tp.get('peak_part')}, {tp.get('peak_source')}"
    head = f"MFU {100 * mfu:.0f}% of " if mfu is not None else "peak "
    return [f"throughput: {head}{_si(tp['peak_flops'], 'FLOP/s')} {tp['precision']} ({where}); {done}{tokens}"]


def step_rates(rep: dict, step: dict) -> tuple:
    """(MFU, tokens/s) of one step of ``recent_steps`` from its host time: the report's FLOPs per
    step (the most common input shape's) and tokens per sample; None where either is unknown."""
    tp = _tp(rep) or {}
    host_s = sum((step.get("host") or {}).values())
    if host_s <= 0:
        return None, None
    flops, peak, tokens = tp.get("flops_per_step"), tp.get("peak_flops"), tp.get("tokens_per_sample")
    mfu = flops / host_s / peak if flops and peak else None
    tps = tokens * step.get("samples", 0) / host_s if tokens and step.get("samples") else None
    return mfu, tps
