"""Two runs side by side, and whether what changed is beyond noise.

    cmp = stepscope.compare("before.json", mon)     # runs: paths, SavedRuns, Monitors or run data
    print(cmp)                                      # the table and a one-line verdict
    python -m stepscope compare before.json after.json [--html cmp.html]

For each partition phase and the step: both p50s (the runs' whole-run histograms), their ratio,
and whether the difference is beyond noise. The test is a two-sided Mann-Whitney U (a rank test:
no assumption on the distributions' shape, which for step times are skewed) on the steady steps
of the two rings (the last ``ring`` steps each run kept raw), normal approximation with the tie
correction, at ``alpha`` divided by the number of rows compared (Bonferroni). A difference must
also be larger than what separates two runs of one loop: on a shared machine those differ by a few
percent (load, clocks, caches) in ways no test within a run can see, and their small phases by tens
of percent. So a change counts from ``floor`` (10%) of the phase's p50 and ``min_share`` (5%) of the
step's p50 (measured here: two runs of one loop moved the step up to 8%, a 0.1 ms phase 80% and a
0.3 ms one by 0.1 ms, 2.4% of the step, each with p < 1e-3). Then
samples/s, tokens/s and MFU side by side, and the findings that appear or disappear. Pure: no
torch, so saved runs compare anywhere.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from .diagnose import diagnose as _diagnose
from .report import partition
from .run import SavedRun, load, phase_table_of, run_data

MIN_STEPS = 8  # steady steps in each ring below which no test is made


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test of x against y (normal approximation with the
    tie correction and a continuity correction); 1.0 when either has fewer than 2 values or all are equal."""
    n1, n2 = len(x), len(y)
    if n1 < 2 or n2 < 2:
        return 1.0
    pooled = sorted([(float(v), 0) for v in x] + [(float(v), 1) for v in y])
    n = n1 + n2
    ranks = [0.0] * n
    ties = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        r = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[k] = r
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    r1 = sum(r for r, (_, g) in zip(ranks, pooled) if g == 0)
    u = r1 - n1 * (n1 + 1) / 2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:
        return 1.0
    z = (abs(u - n1 * n2 / 2) - 0.5) / math.sqrt(var)
    return math.erfc(max(z, 0.0) / math.sqrt(2))


def _data(x: Any) -> dict:
    if isinstance(x, (str, bytes)) or hasattr(x, "__fspath__"):
        return load(x).data
    return run_data(x)


def _series(ring: list, names: list, name: str) -> list:
    steady = [r for r in ring if not r.get("warmup")]
    if name == "step":
        return [sum(float(r["host"].get(p, 0.0)) for p in names) for r in steady]
    return [float(r["host"].get(name, 0.0)) for r in steady]


def _findings(d: dict) -> set:
    saved = d.get("diagnosis")
    found = saved if saved is not None else _diagnose(d["report"], phases=phase_table_of(d))
    return {f["rule"] for f in found}


class Comparison(dict):
    """What :func:`compare` returns: ``phases`` (per row: ``p50_a``, ``p50_b``, ``ratio``, ``p_value``,
    ``beyond_noise``, ``steps_a``, ``steps_b``), ``throughput`` (samples/s, tokens/s, MFU of each),
    ``findings`` (``appeared``, ``disappeared``), ``method`` and ``verdict``. ``str()`` is the table."""

    def text(self) -> str:
        rows = [["phase", "p50 a ms", "p50 b ms", "change", "p", "beyond noise"]]
        for k, v in self["phases"].items():
            rows.append([k, _ms(v["p50_a"]), _ms(v["p50_b"]), _pct(v["ratio"]), _p(v["p_value"]),
                         "yes" if v["beyond_noise"] else "no"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        for k, (a, b) in self["throughput"].items():
            if a is not None or b is not None:
                lines.append(f"{k}: {_num(a)} -> {_num(b)}")
        f = self["findings"]
        if f["appeared"] or f["disappeared"]:
            lines.append(f"findings: new {sorted(f['appeared']) or '-'}, gone {sorted(f['disappeared']) or '-'}")
        lines += [f"method: {self['method']}", f"verdict: {self['verdict']}"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        from .export.page import comparison_html

        return comparison_html(self, fragment=True)

    def to_html(self, path: Any) -> None:
        from .export.page import comparison_html
        from .run import _atomic_write

        _atomic_write(path, comparison_html(self).encode("utf-8"))


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1e3:.3f}"


def _pct(r: Optional[float]) -> str:
    return "-" if r is None else f"{100 * (r - 1):+.1f}%"


def _p(p: Optional[float]) -> str:
    return "-" if p is None else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4g}"


def compare(a: Any, b: Any, *, alpha: float = 0.01, floor: float = 0.10, min_share: float = 0.05) -> Comparison:
    """Run ``b`` against run ``a`` (each a path, a :class:`~stepscope.SavedRun`, a Monitor or run
    data); see the module's docstring for the test. ``alpha``: the family-wise significance level;
    ``floor``: the smallest relative change of a p50 that counts; ``min_share``: the smallest change
    as a share of run ``a``'s p50 step."""
    if not 0 < alpha < 1 or not 0 <= floor < 1 or not 0 <= min_share < 1:
        raise ValueError("stepscope: compare needs 0 < alpha < 1, 0 <= floor < 1 and 0 <= min_share < 1; got "
                         f"{alpha}, {floor}, {min_share}")
    da, db = _data(a), _data(b)
    ra, rb = da["report"], db["report"]
    names = list(partition(phase_table_of(da)))
    rows = [n for n in names if ra["phases"][n]["host"]["count"] or rb["phases"][n]["host"]["count"]] + ["step"]
    step_a = ra["phases"]["step"]["host"].get("p50") or 0.0
    phases = {}
    for n in rows:
        pa, pb = ra["phases"][n]["host"].get("p50"), rb["phases"][n]["host"].get("p50")
        xa, xb = _series(da.get("recent_steps") or [], names, n), _series(db.get("recent_steps") or [], names, n)
        p = mann_whitney(xa, xb) if min(len(xa), len(xb)) >= MIN_STEPS else None
        ratio = pb / pa if pa and pb is not None else None
        big = (ratio is not None and abs(ratio - 1) >= floor and abs(pb - pa) >= min_share * step_a)
        phases[n] = {"p50_a": pa, "p50_b": pb, "ratio": ratio, "p_value": p, "steps_a": len(xa), "steps_b": len(xb),
                     "beyond_noise": bool(p is not None and p < alpha / len(rows) and big)}
    tpa, tpb = ra.get("throughput") or {}, rb.get("throughput") or {}
    throughput = {"samples/s": (ra.get("samples_per_s"), rb.get("samples_per_s")),
                  "tokens/s": (tpa.get("tokens_per_s"), tpb.get("tokens_per_s")),
                  "MFU": (tpa.get("mfu"), tpb.get("mfu"))}
    fa, fb = _findings(da), _findings(db)
    out = Comparison(phases=phases, throughput=throughput,
                     findings={"appeared": sorted(fb - fa), "disappeared": sorted(fa - fb)},
                     method=(f"two-sided Mann-Whitney U on the rings' steady steps, alpha {alpha} / {len(rows)} "
                             f"rows (Bonferroni), and a change of at least {100 * floor:.0f}% of the p50 and "
                             f"{100 * min_share:.0f}% of the step"))
    out["verdict"] = _verdict(phases)
    return out


def _verdict(phases: dict) -> str:
    step = phases["step"]
    moved = [(k, v) for k, v in phases.items() if k != "step" and v["beyond_noise"]]
    if step["p_value"] is None:
        return f"too few steady steps in a ring to test (at least {MIN_STEPS} in each)"
    parts = ", ".join(f"{k} {_pct(v['ratio'])}" for k, v in sorted(
        moved, key=lambda kv: -abs((kv[1]["p50_b"] or 0) - (kv[1]["p50_a"] or 0))))
    if step["beyond_noise"]:
        way = "faster" if step["ratio"] < 1 else "slower"
        return f"step p50 {_pct(step['ratio'])} (beyond noise): {way}" + (f"; {parts}" if parts else "")
    if parts:
        return f"step p50 {_pct(step['ratio'])} (within noise); beyond noise: {parts}"
    return f"no difference beyond noise (step p50 {_pct(step['ratio'])})"


__all__ = ["Comparison", "SavedRun", "compare", "mann_whitney"]
