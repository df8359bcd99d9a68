"""The Monitor's throughput: FLOPs per step counted once per input shape, the peak they are
compared with, and ``report()["throughput"]`` (FLOP/s, MFU, samples/s, tokens/s).

Counting (``Monitor(flops="auto")``): the C hooks (hook::Shapes in csrc/python/step_hook.h) call
:meth:`Flops.on_shape` at the first training forward of a step whose first input has a shape they
have not seen. A :class:`FlopCount` dispatch mode is on from each training forward's pre hook of that
step to its post hook (which torch runs on exceptions too), never across a step; backward is
counted as twice the forward, the model-FLOPs convention of MFU (PaLM's 6N per token: activation
recomputation is not model work). The Timeline keeps that step out of every statistic, like a warm-up
step (the first shape is counted on step 0, a warm-up step already). Nothing runs in Python on the
other steps.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from typing import Any, Callable, Optional, Union

import torch
from torch.utils import flop_counter as _fc
from torch.utils._python_dispatch import TorchDispatchMode

from . import hardware

aten = torch.ops.aten

# What FlopCounterMode's registry misses that training on a CPU runs: scaled_dot_product_attention's
# CPU kernel and its backward (the same formulas as the CUDA flash kernels: q, k, v are [B, H, S, D]).
_EXTRA = {
    aten._scaled_dot_product_flash_attention_for_cpu: _fc.sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _fc.sdpa_backward_flop,
}
REGISTRY: dict = {**{k: v for k, v in _EXTRA.items() if k not in _fc.flop_registry}, **_fc.flop_registry}

MAX_SHAPES = 64  # distinct input shapes counted at most (the C hooks stop asking after these)

_FP8 = {d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                       "float8_e5m2fnuz")) if d is not None}


def precision_of(t: torch.Tensor, conv: bool) -> str:
    """The peak table's precision for a matmul (or convolution) on ``t``: fp32 on CUDA is tf32 when
    torch lets it run on tensor cores (``set_float32_matmul_precision`` below "highest"; for
    convolutions ``torch.backends.cudnn.allow_tf32``, on by default)."""
    d = t.dtype
    if d == torch.bfloat16:
        return "bf16"
    if d == torch.float16:
        return "fp16"
    if d in _FP8:
        return "fp8"
    if d == torch.float32:
        if t.is_cuda:
            tf32 = torch.backends.cudnn.allow_tf32 if conv else torch.get_float32_matmul_precision() != "highest"
            return "tf32" if tf32 else "fp32"
        return "fp32"
    return str(d).replace("torch.", "")


def _first_tensor(args: Any) -> Optional[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


_CONV = {aten.convolution, aten._convolution, aten.cudnn_convolution, aten.convolution_overrideable,
         aten._slow_conv2d_forward, aten.convolution_backward}


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops run under it, by precision, from torch.utils.flop_counter's formulas (matmuls,
    convolutions, attention) plus :data:`_EXTRA`; an op without a formula is decomposed where torch
    can (as FlopCounterMode does) and otherwise counts 0 (elementwise work, norms, the optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_precision: Counter = Counter()
        self.error: Optional[BaseException] = None  # a formula that failed: the op still ran

    @property
    def total(self) -> int:
        return int(sum(self.by_precision.values()))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = func._overloadpacket
        formula = REGISTRY.get(packet)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        if formula is not None and self.error is None:
            try:
                t = _first_tensor(args)
                key = precision_of(t, packet in _CONV) if t is not None else "fp32"
                self.by_precision[key] += int(formula(*args, **kwargs, out_val=out))
            except Exception as e:  # noqa: BLE001 - a count must never fail the training step
                self.error = e
        return out


def check_options(flops: Any, peak_flops: Any, tokens_per_sample: Any) -> None:
    if not (flops is None or flops == "auto" or callable(flops) or
            (isinstance(flops, int) and not isinstance(flops, bool) and flops > 0)):
        raise ValueError(f"stepscope: flops must be \"auto\", a positive int (FLOPs per optimizer step), a "
                         f"callable f(batch_size) -> FLOPs, or None; got {flops!r}")
    if peak_flops is not None and (isinstance(peak_flops, bool) or not isinstance(peak_flops, (int, float))
                                   or not peak_flops > 0):
        raise ValueError(f"stepscope: peak_flops must be a positive number (FLOP/s) or None; got {peak_flops!r}")
    if tokens_per_sample is not None and (isinstance(tokens_per_sample, bool) or
                                          not isinstance(tokens_per_sample, int) or tokens_per_sample < 1):
        raise ValueError(f"stepscope: tokens_per_sample must be a positive int or None; got {tokens_per_sample!r}")


class Flops:
    """One Monitor's FLOPs per step: the user's figure, or counts per input shape (``"auto"``)."""

    def __init__(self, spec: Union[None, str, int, Callable[[int], int]], peak_flops: Optional[float],
                 tokens_per_sample: Optional[int], batch_dim: int) -> None:
        self.spec = spec
        self.peak_user = float(peak_flops) if peak_flops is not None else None
        self.tokens_user = tokens_per_sample
        self.batch_dim = batch_dim
        self.counts: dict = {}  # shape key -> {"flops", "by_precision", "tokens_per_sample"}
        self.failed: Optional[str] = None
        self.off_reason: Optional[str] = None  # why "auto" does not count (a compiled model)
        self._mode: Optional[FlopCount] = None
        self._key: Any = None
        self._tokens: Optional[int] = None
        self._step: Optional[Counter] = None  # the counted step's forward FLOPs so far, by precision
        self._hooks: Any = None
        self.past_steps: Counter = Counter()  # shape key -> steps, of earlier attachments
        self.past_unseen = 0

    def attach(self, hooks: Any, compiled: bool) -> None:
        if self.spec != "auto":
            return
        if compiled:
            self.off_reason = ("not counted: a torch.compile'd model runs its graph where a dispatch mode does "
                               "not see the original ops; pass Monitor(flops=...)")
            return
        self._hooks = hooks
        hooks.count_shapes(self.on_shape)

    def detach(self, hooks: Any) -> None:
        try:
            self._leave()
        except Exception:  # noqa: BLE001 - detach always completes
            pass
        self._step = None  # a step cut by detach() counts nothing
        if hooks is not None and self._hooks is hooks:
            seen, unseen = hooks.shape_steps
            for k, n in seen:
                self.past_steps[k] += n
            self.past_unseen += unseen
            hooks.count_shapes(None)
        self._hooks = None

    def shape_steps(self) -> tuple:
        """({shape key: steps begun with it}, steps with shapes beyond MAX_SHAPES), attachments so far."""
        steps, unseen = Counter(self.past_steps), self.past_unseen
        if self._hooks is not None:
            seen, more = self._hooks.shape_steps
            for k, n in seen:
                steps[k] += n
            unseen += more
        return steps, unseen

    def on_shape(self, key: Optional[int], arg: Any = None) -> bool:
        # Called by the C hooks (hook::Shapes): on_shape(key, input) at a counted step's training
        # forwards (returns whether to count this one), on_shape(None, False) at the end of each
        # counted forward, on_shape(None, True) at the step's end. Never raises into the training
        # loop: a failure warns once and counting stops.
        try:
            if key is None:
                self._leave()
                if arg:
                    self._finish()
                return False
            self._leave()  # a forward whose post hook never ran (a KeyboardInterrupt in it)
            if self.failed is not None:
                return False
            if self._step is None:  # the step's first forward: a new shape?
                if key in self.counts:
                    return False
                if len(self.counts) >= MAX_SHAPES:  # over several attachments (each hooks' watch stops at 64)
                    return False
                self._key, self._tokens, self._step = key, self._tokens_of(arg), Counter()
            self._mode = FlopCount()
            self._mode.__enter__()
            return True
        except Exception as e:  # noqa: BLE001 - the training step must go on
            self._fail(e)
            return False

    def _tokens_of(self, first: Any) -> Optional[int]:
        # An integer input [B, T] (token ids) has T tokens per sample ([T, B] with batch_dim=1).
        if not isinstance(first, torch.Tensor) or first.dim() != 2 or first.is_floating_point() or first.is_complex():
            return None
        return int(first.shape[1 - self.batch_dim]) if self.batch_dim in (0, 1) else None

    def _leave(self) -> None:
        # The end of a counted forward: its FLOPs into the step's.
        mode, self._mode = self._mode, None
        if mode is None:
            return
        mode.__exit__(None, None, None)
        if mode.error is not None:
            raise mode.error
        if self._step is not None:
            self._step.update(mode.by_precision)

    def _finish(self) -> None:
        # The counted step's end. Backward is twice the forward (the model-FLOPs convention).
        step, self._step = self._step, None
        if step is not None:
            by = {k: 3 * v for k, v in step.items()}
            self.counts[self._key] = {"flops": sum(by.values()), "by_precision": by, "tokens_per_sample": self._tokens}

    def _fail(self, e: BaseException) -> None:
        mode, self._mode, self._step = self._mode, None, None
        if mode is not None:
            try:
                mode.__exit__(None, None, None)
            except Exception:  # noqa: BLE001
                pass
        if self.failed is None:
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"stepscope: counting FLOPs failed ({self.failed}); throughput is reported without "
                          "FLOPs. Pass Monitor(flops=<FLOPs per step>) to give them.", stacklevel=2)
        if self._hooks is not None:
            self._hooks.count_shapes(None)

    def per_step(self, shape_steps: dict, samples_per_step: Optional[float]) -> tuple:
        """(FLOPs per optimizer step, source, {precision: FLOPs}, tokens per sample from the input)."""
        if isinstance(self.spec, int):
            return self.spec, "user", {}, None
        if callable(self.spec) and self.spec != "auto":
            if not samples_per_step:
                return None, "callable: no samples counted yet", {}, None
            return int(self.spec(int(round(samples_per_step)))), "callable", {}, None
        if self.spec is None:
            return None, "off (Monitor(flops=None))", {}, None
        if self.off_reason is not None:
            return None, self.off_reason, {}, None
        # The shape most steps ran with (the hooks count steps per shape); counted when it was new.
        seen = sorted((n, k) for k, n in shape_steps.items() if k in self.counts)
        if not seen:
            why = f"counting failed: {self.failed}" if self.failed else "not counted yet (no step has ended)"
            return None, why, {}, None
        c = self.counts[seen[-1][1]]
        return c["flops"], "counted", c["by_precision"], c["tokens_per_sample"]


# --------------------------------------------------------------------------- peaks
_CPU_PEAKS: dict = {}
_REMEASURED: dict = {}  # (threads, dtype) -> how often a report found the peak below its own rate
MAX_REMEASURE = 3


#: The CPU peak's matmul: sized so that one takes about TARGET_S (from a 256x256 probe), between
#: MIN_N and MAX_N, the best of up to REPEATS, stopping once BUDGET_S has been spent.
MIN_N, MAX_N, TARGET_S, REPEATS, BUDGET_S = 256, 2048, 0.005, 12, 0.06
_CPU_PEAK_N: dict = {}  # (threads, dtype) -> the n its peak was measured with


#: The layouts the CPU peak is timed in: ``a @ b`` and ``a @ b.T`` (what ``nn.Linear`` runs). Some
#: CPUs take a slow path for one of them in bfloat16/float16 (``mm(a, b)`` 1.3 GFLOP/s against
#: ``linear`` 7.4 on the 2-core VM): the peak is the faster, so a linear layer's MFU stays <= 1.
PEAK_KERNELS = (torch.mm, torch.nn.functional.linear)


def _best_mm(n: int, dtype: torch.dtype, repeats: int, budget: float) -> float:
    # Seconds of the fastest n x n matmul over PEAK_KERNELS (each: at least two timed, then until
    # repeats or the budget).
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for mm in PEAK_KERNELS:
        mm(a, b)
        spent, i = 0.0, 0
        while i < repeats and (i < 2 or spent < budget):
            t0 = time.perf_counter()
            mm(a, b)
            dt = time.perf_counter() - t0
            best, spent, i = min(best, dt), spent + dt, i + 1
    return best


def cpu_peak_size(dtype: torch.dtype = torch.float32) -> int:
    """The matmul size the CPU peak is measured with: one that takes about ``TARGET_S`` at the rate a
    256x256 probe reaches (512 for float32 on one thread of this project's VM, larger with more
    threads, 256 for a bfloat16 matmul without hardware support, 10-60x slower there), a multiple of
    128 in [MIN_N, MAX_N]."""
    rate = 2.0 * MIN_N ** 3 / _best_mm(MIN_N, dtype, 3, 0.0)
    n = (rate * TARGET_S / 2.0) ** (1.0 / 3.0)
    return int(min(MAX_N, max(MIN_N, round(n / 128) * 128)))


def measured_cpu_peak(dtype: torch.dtype = torch.float32, *, again: bool = False) -> float:
    """FLOP/s of a square matmul on the threads torch uses now: measured once per process, thread
    count and dtype, at a size from :func:`cpu_peak_size`, the best of up to a dozen within about
    60 ms (tens of ms in all, never on the training path). ``again``: measure anew, keeping the
    higher figure (a first measurement taken while other work held the CPU reads low)."""
    key = (torch.get_num_threads(), dtype)
    if key not in _CPU_PEAKS or again:
        n = _CPU_PEAK_N.get(key) or cpu_peak_size(dtype)
        _CPU_PEAK_N[key] = n
        best = _best_mm(n, dtype, REPEATS, BUDGET_S)
        _CPU_PEAKS[key] = max(_CPU_PEAKS.get(key, 0.0), 2.0 * n ** 3 / best)
    return _CPU_PEAKS[key]


def _remeasure(dtype: torch.dtype) -> Optional[float]:
    # A measured peak below the loop's own achieved rate was taken under load: measure again, a
    # few times at most per process, keeping the best.
    key = (torch.get_num_threads(), dtype)
    if _REMEASURED.get(key, 0) >= MAX_REMEASURE:
        return None
    _REMEASURED[key] = _REMEASURED.get(key, 0) + 1
    return measured_cpu_peak(dtype, again=True)


def peak_for(precision: str, device: Optional[torch.device], user: Optional[float]) -> Optional[hardware.Peak]:
    if user is not None:
        return hardware.Peak(user, precision, "user", "Monitor(peak_flops=...)", "given by Monitor(peak_flops=...)")
    if device is None or device.type == "cpu":
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        threads = torch.get_num_threads()
        flops = measured_cpu_peak(dt)
        n = _CPU_PEAK_N.get((threads, dt), "?")
        return hardware.Peak(flops, precision if dt != torch.float32 else "fp32", "measured", "CPU",
                             f"measured: a {str(dt).replace('torch.', '')} {n}x{n} matmul on "
                             f"{threads} thread(s)")
    if device.type != "cuda" or precision not in hardware.DTYPES:
        return None
    p = torch.cuda.get_device_properties(device)
    clock = getattr(p, "clock_rate", None)  # kHz where torch reports it
    return hardware.lookup(precision, name=p.name, capability=(p.major, p.minor), sm_count=p.multi_processor_count,
                           clock_mhz=clock / 1000.0 if clock else None, estimate=True)


def device_name(device: Optional[torch.device]) -> str:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


# --------------------------------------------------------------------------- report
_AUTOCAST = {torch.bfloat16: "bf16", torch.float16: "fp16"}
NOT_COUNTED = ("elementwise ops, normalisation, softmax outside attention, losses and the optimizer "
               "(no formula: MFU counts matmul, convolution and attention FLOPs, as is usual)")


def _device_of(mon: Any) -> torch.device:
    for m in mon._models:
        for p in m.parameters():
            return p.device
    return torch.device("cpu")


def _precision_without_count(mon: Any, rep: dict, device: torch.device) -> str:
    # FLOPs given by the user: the precision the model most likely multiplies in.
    ctx = rep.get("context") or {}
    if device.type == "cuda" and ctx.get("autocast_forwards", 0) > 0:
        return _AUTOCAST.get(torch.get_autocast_dtype("cuda"), "fp32")
    dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(ctx.get("param_dtype") or "", "fp32")
    if dtype == "fp32" and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return dtype


def report_of(mon: Any, rep: dict, measure: bool = True) -> dict:
    """``report()["throughput"]`` of a local report ``rep`` (see the README's "Throughput and MFU").
    ``measure=False`` (the print_every line, mid-training): no CPU peak is measured for it."""
    f: Flops = mon._flops
    steady = rep.get("steady_steps") or 0
    per_sample = rep["samples"] / steady if steady and rep.get("samples") else None
    steps, unseen = f.shape_steps()
    flops, source, by_prec, tokens_auto = f.per_step(steps, per_sample)
    device = _device_of(mon)
    precision = max(by_prec, key=by_prec.get) if by_prec else _precision_without_count(mon, rep, device)
    tokens = f.tokens_user if f.tokens_user is not None else tokens_auto
    out = {"flops_per_step": flops, "flops_source": source, "flops_by_precision": by_prec, "precision": precision,
           "shapes_counted": len(f.counts), "steps_beyond_counted_shapes": unseen, "device_name": device_name(device),
           "achieved_flops": None, "achieved_flops_device": None, "peak_flops": None, "peak_source": None,
           "peak_part": None, "peak_note": None, "mfu": None, "mfu_device": None,
           "samples_per_s": rep.get("samples_per_s"), "tokens_per_sample": tokens,
           "tokens_source": None if tokens is None else ("user" if f.tokens_user is not None else "input [B, T]"),
           "tokens_per_s": None, "not_counted": NOT_COUNTED}
    if tokens is not None and rep.get("samples_per_s"):
        out["tokens_per_s"] = tokens * rep["samples_per_s"]
    if not flops:
        return out
    step = rep["phases"]["step"]
    host_p50 = step["host"]["p50"] if step["host"]["count"] else None
    dev = step.get("device")
    dev_p50 = dev["p50"] if dev and dev.get("count") else None
    out["achieved_flops"] = flops / host_p50 if host_p50 else None
    out["achieved_flops_device"] = flops / dev_p50 if dev_p50 else None
    if f.peak_user is None and not measure and device.type == "cpu" and not _CPU_PEAKS:
        return out
    peak = peak_for(precision, device, f.peak_user)
    if peak is None:
        out["peak_note"] = (f"no peak for {precision} on {out['device_name']}: not in stepscope.hardware's table"
                            if precision in hardware.DTYPES else f"no peak table entry for {precision}")
        return out
    if peak.source == "measured" and out["achieved_flops"] and out["achieved_flops"] > peak.flops:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        again = _remeasure(dt)
        if again is not None:
            peak = peak._replace(flops=again)
    out.update(peak_flops=peak.flops, peak_source=peak.source, peak_part=peak.part, peak_note=peak.note)
    if out["achieved_flops"] is not None:
        out["mfu"] = out["achieved_flops"] / peak.flops
    if out["achieved_flops_device"] is not None:
        out["mfu_device"] = out["achieved_flops_device"] / peak.flops
    return out
