"""Planted sleeps for the timing tests: how long each one really lasted, per phase."""

import collections
import time

SLEPT = collections.defaultdict(list)  # phase -> how long each planted sleep really lasted


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
