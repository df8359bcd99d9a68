"""Planted sleeps for the timing tests: how long each one really lasted, per phase, and the bounds
a reported time must meet on a loaded machine.

A planted sleep is a lower bound on the phase it lies in, whatever the load: every occurrence of
the phase holds its sleep, so the phase's p50 is at least the sleeps' p50 (same rank). Nothing
bounds a phase from above but what the test can guarantee: here, the sleep plus a stated slack of
unplanted work (the phase's own code and the scheduler's delays), taken at the p50 so that a few
delayed occurrences do not count. A slack below the smallest plant of the test still catches a
sleep reported in the wrong phase: the phase that lost it falls below its lower bound, the phase
that got it rises above its upper bound.
"""

import collections
import time

import torch

SLEPT = collections.defaultdict(list)  # phase -> how long each planted sleep really lasted

#: The Timeline's quantiles come from log buckets within 0.5% of the sample of that rank
#: (csrc/timing/stats.h); its min, max and totals are exact.
QUANTILE_ERROR = 0.005


def sleep(s: float, phase: str = "") -> None:
    # time.sleep overshoots by ~0.1 ms; spin the last 0.3 ms so the planted time is exact enough.
    t0 = time.perf_counter()
    end = t0 + s
    if s > 0.0005:
        time.sleep(s - 0.0003)
    while time.perf_counter() < end:
        pass
    if phase:
        SLEPT[phase].append(time.perf_counter() - t0)


def p50_bounds(slept: list, slack: float) -> tuple:
    """(lower, upper) for the reported p50 of a phase whose occurrences each hold one of ``slept``.

    The histogram's p50 is the sample of rank (n - 1) // 2; with u_i >= 0 the unplanted time of
    occurrence i, that sample is at least the sleeps' sample of the same rank, and at most the
    sleeps' next rank plus ``slack`` when at most one occurrence has u_i > slack.
    """
    s = sorted(slept)
    k = (len(s) - 1) // 2
    return s[k] * (1 - QUANTILE_ERROR), (s[min(k + 1, len(s) - 1)] + slack) * (1 + QUANTILE_ERROR)


def assert_planted(got: float, phase: str, slack: float, slept: list = None) -> None:
    """The reported p50 ``got`` of ``phase`` holds its planted sleeps (``SLEPT[phase]`` unless
    ``slept`` is given) and at most ``slack`` seconds more; see :func:`p50_bounds`."""
    slept = SLEPT[phase] if slept is None else slept
    assert slept, f"{phase}: no planted sleep was recorded"
    lo, hi = p50_bounds(slept, slack)
    assert lo <= got <= hi, (
        f"{phase}: reported p50 {got * 1e3:.3f} ms outside [{lo * 1e3:.3f}, {hi * 1e3:.3f}] ms "
        f"(its sleeps' p50 to the next rank + {slack * 1e3:.1f} ms of slack; slept "
        f"{', '.join(f'{x * 1e3:.2f}' for x in slept)} ms)")


class SleepInBackward(torch.autograd.Function):
    """Identity forward; its backward sleeps `secs` (recorded under `phase` when given)."""

    @staticmethod
    def forward(ctx, x, secs, phase=""):
        ctx.secs, ctx.phase = secs, phase
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        sleep(ctx.secs, ctx.phase)
        return g, None, None
