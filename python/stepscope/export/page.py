"""One self-contained HTML file of a run: a colleague opens it in any browser, offline.

    mon.to_html("run.html")                        # or stepscope.export.html(run, "run.html")
    python -m stepscope report run.json --html run.html

Styles and charts are inline (SVG), with no script and no network request, and the page reads in
a narrow window (tables scroll sideways, charts scale). It holds the summary table and the
lines under it (the text summary's very rows), the findings with their evidence and advice, the
steps of the ring as stacked phase bars, the step-time histogram, the phases' shares (host and
device), the health and throughput sections when present, metrics when given, and the build and
versions. :func:`html_report` returns the text; Jupyter shows it through ``_repr_html_``.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any, Optional

from ..report import _summary_rows, _summary_tail, partition
from ..run import PathLike, Source, _atomic_write, phase_table_of, run_data

_CSS = """
.ss{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:12px;color:#1d232a;background:#fff}
.ss h1{font-size:20px;margin:4px 0 2px}.ss h2{font-size:16px;margin:22px 0 6px;border-bottom:1px solid #dde}
.ss .meta{color:#5a6470;font-size:12px}.ss .scroll{overflow-x:auto}
.ss table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:13px}
.ss th,.ss td{padding:3px 8px;border-bottom:1px solid #eef;text-align:right;white-space:nowrap}
.ss th:first-child,.ss td:first-child{text-align:left}.ss th{background:#f4f6fa}
.ss ul{padding-left:18px;margin:4px 0}.ss li{margin:2px 0}
.ss .f{border-left:4px solid #999;padding:4px 10px;margin:8px 0;background:#fafbfd}
.ss .f.critical{border-color:#c62828}.ss .f.warn{border-color:#ef8f00}.ss .f.info{border-color:#1e88e5}
.ss .sev{font-weight:600;text-transform:uppercase;font-size:11px;margin-right:6px}
.ss .ev{font:12px ui-monospace,Menlo,Consolas,monospace;color:#445;word-break:break-word}
.ss svg{width:100%;height:auto;max-width:1000px;display:block}.ss .legend span{margin-right:12px;font-size:12px}
.ss .sw{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
"""

_FALLBACK = ("#4E79A7", "#F28E2B", "#E15759", "#76B7B2", "#59A14F", "#EDC948", "#B07AA1")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(head: list, rows: list) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _colors(data: dict, names: list) -> dict:
    saved = data.get("nvtx_colors") or {}
    return {n: saved.get(n, _FALLBACK[i % len(_FALLBACK)]) for i, n in enumerate(names)}


def _steps_chart(ring: list, names: list, colors: dict) -> str:
    # Stacked host time per phase, one bar per step of the ring (ms on the axis).
    if not ring:
        return "<p>No step in the ring.</p>"
    w, h, pad = 1000, 240, 40
    totals = [sum(float(r["host"].get(p, 0.0)) for p in names) for r in ring]
    top = max(totals) or 1.0
    bw = (w - pad) / len(ring)
    parts = []
    for i, r in enumerate(ring):
        y = h - 20
        for p in names:
            v = float(r["host"].get(p, 0.0))
            hh = (h - 30) * v / top
            if hh > 0:
                parts.append(f'<rect x="{pad + i * bw:.2f}" y="{y - hh:.2f}" width="{max(bw * 0.9, 0.5):.2f}" '
                             f'height="{hh:.2f}" fill="{colors[p]}"><title>step {_e(r.get("step"))} {p} '
                             f'{v * 1e3:.3f} ms</title></rect>')
            y -= hh
    axis = (f'<text x="0" y="16" font-size="11">{top * 1e3:.3g} ms</text>'
            f'<text x="0" y="{h - 22}" font-size="11">0</text>'
            f'<text x="{pad}" y="{h - 4}" font-size="11">step {_e(ring[0].get("step"))}</text>'
            f'<text x="{w - 80}" y="{h - 4}" font-size="11">step {_e(ring[-1].get("step"))}</text>')
    legend = "".join(f'<span><i class="sw" style="background:{colors[p]}"></i>{_e(p)}</span>' for p in names)
    return (f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="host time per phase, per step">{axis}'
            f'{"".join(parts)}</svg><div class="legend">{legend}</div>')


def _histogram(ring: list, names: list, bins: int = 30) -> str:
    totals = [sum(float(r["host"].get(p, 0.0)) for p in names) for r in ring if not r.get("warmup")]
    if len(totals) < 2:
        return "<p>Too few steady steps in the ring for a histogram.</p>"
    lo, hi = min(totals), max(totals)
    span = (hi - lo) or max(hi * 1e-3, 1e-9)
    counts = [0] * bins
    for t in totals:
        counts[min(bins - 1, int((t - lo) / span * bins))] += 1
    w, h = 1000, 180
    bw, top = w / bins, max(counts)
    bars = "".join(
        f'<rect x="{i * bw:.2f}" y="{h - 20 - (h - 40) * c / top:.2f}" width="{bw * 0.92:.2f}" '
        f'height="{(h - 40) * c / top:.2f}" fill="#4E79A7"><title>{(lo + i * span / bins) * 1e3:.3f}-'
        f'{(lo + (i + 1) * span / bins) * 1e3:.3f} ms: {c}</title></rect>' for i, c in enumerate(counts) if c)
    axis = (f'<text x="0" y="{h - 4}" font-size="11">{lo * 1e3:.3f} ms</text>'
            f'<text x="{w - 90}" y="{h - 4}" font-size="11">{hi * 1e3:.3f} ms</text>'
            f'<text x="0" y="12" font-size="11">{top} step(s)</text>')
    return f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="step time histogram">{axis}{bars}</svg>'


def _shares(rep: dict, names: list, colors: dict) -> str:
    rows = []
    for p in names:
        e = rep["phases"].get(p) or {}
        for kind in ("host", "device"):
            s = e.get(f"share_{kind}")
            if s is not None and (kind == "host" or rep.get("device")):
                rows.append((p, kind, s))
    if not rows:
        return "<p>No steady step yet.</p>"
    w, rh = 1000, 18
    h = rh * len(rows) + 4
    out = []
    for i, (p, kind, s) in enumerate(rows):
        y = i * rh
        out.append(f'<text x="0" y="{y + 13}" font-size="12">{_e(p)} ({kind})</text>'
                   f'<rect x="160" y="{y + 3}" width="{(w - 240) * min(max(s, 0.0), 1.0):.2f}" height="{rh - 6}" '
                   f'fill="{colors[p]}" opacity="{1.0 if kind == "host" else 0.6}"></rect>'
                   f'<text x="{w - 70}" y="{y + 13}" font-size="12">{100 * s:.1f}%</text>')
    return f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="share of the step per phase">{"".join(out)}</svg>'


def _findings(findings: Optional[list]) -> str:
    if findings is None:
        return "<p>No diagnosis saved with this run.</p>"
    if not findings:
        return "<p>Nothing to fix: no rule fired.</p>"
    out = []
    for f in findings:
        sev = f.get("severity", "info")
        ev = json.dumps(f.get("evidence"), default=str, sort_keys=True)
        saving = f.get("saving")
        save = f" (~{100 * saving:.0f}% of the step)" if isinstance(saving, (int, float)) and saving else ""
        out.append(f'<div class="f {_e(sev)}"><div><span class="sev">{_e(sev)}</span><b>{_e(f.get("title"))}</b>'
                   f'{_e(save)} <span class="meta">[{_e(f.get("rule"))}]</span></div>'
                   f'<div>{_e(f.get("advice", ""))}</div><div class="ev">{_e(ev)}</div></div>')
    return "".join(out)


def findings_html(findings: list) -> str:
    """The findings as the HTML report shows them (one scoped ``<div>``: Jupyter's view of a list)."""
    return _page(f"<h2>What to fix first</h2>{_findings(list(findings))}", "", True)


def _page(body: str, title: str, fragment: bool) -> str:
    # The content in its scoped <div> (Jupyter's view), or a whole page around it.
    content = f"<div class='ss'><style>{_CSS}</style>{body}</div>"
    if fragment:
        return content
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>{_e(title)}</title></head>"
            f"<body style='margin:0'>{content}</body></html>")


def _kv(d: Optional[dict], keys: Optional[list] = None) -> str:
    if not d:
        return ""
    items = [(k, d.get(k)) for k in (keys or list(d))]
    return _table(["key", "value"], [(k, _fmt(v)) for k, v in items if v is not None and not isinstance(v, list)])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items() if not isinstance(x, (list, dict)))
    return str(v)


def _metrics(metrics: Optional[dict]) -> str:
    if not metrics:
        return ""
    rows = []
    for k, v in metrics.items():
        numel = getattr(v, "numel", None)
        if numel is not None:
            if numel() != 1:
                continue  # vectors and the confusion matrix: not a one-line figure
            v = v.item()
        rows.append((k, _fmt(v)))
    return "<h2>Metrics</h2>" + _table(["metric", "value"], rows)


def html_report(source: Source, metrics: Optional[dict] = None, *, title: str = "stepscope run",
                fragment: bool = False) -> str:
    """The HTML text of a run (a Monitor, a :class:`~stepscope.SavedRun` or run data); ``metrics``:
    a ``ClassificationMetrics.compute()`` dict (its one-element values; reading them is the host sync
    compute() leaves to the caller). ``fragment=True``: the page's content alone, one ``<div>`` with
    its own scoped style, as Jupyter shows it (``_repr_html_``)."""
    data = run_data(source)
    rep, ring = data["report"], data.get("recent_steps") or []
    table = phase_table_of(data)
    names = list(partition(table))
    colors = _colors(data, names)
    head = ["phase", "count", "mean", "p50", "p90", "p99", "max", "total s", "share"]
    if rep["device"]:
        head += ["dev mean", "dev p50", "dev p90", "dev p99", "dev max", "dev total s", "dev share"]
    tail = "".join(f"<li>{_e(line.strip())}</li>" for line in _summary_tail(rep))
    versions = {**(data.get("versions") or {}), **{f"build {k}": v for k, v in (data.get("build_info") or {}).items()}}
    body = [
        f"<h1>{_e(title)}</h1><div class='meta'>saved {_e(data.get('created', ''))} · rank {_e(data.get('rank', 0))}"
        f" · {_e(rep['steps'])} steps · {'CUDA' if rep['device'] else 'host'} timing</div>",
        "<h2>Where the time goes</h2><p class='meta'>times in ms unless marked s; share = phase total / step "
        "total; (share) = part of the phase above</p>", _table(head, _summary_rows(rep, names)), f"<ul>{tail}</ul>",
        "<h2>What to fix first</h2>", _findings(data.get("diagnosis")),
        f"<h2>Steps in the ring ({len(ring)})</h2>", _steps_chart(ring, names, colors),
        "<h2>Step time</h2>", _histogram(ring, names),
        "<h2>Share of the step</h2>", _shares(rep, names, colors),
    ]
    if rep.get("throughput"):
        body += ["<h2>Throughput</h2>", _kv(rep["throughput"], ["flops_per_step", "flops_source", "precision",
                 "achieved_flops", "achieved_flops_device", "peak_flops", "peak_source", "peak_part", "peak_note",
                 "mfu", "mfu_device", "samples_per_s", "tokens_per_sample", "tokens_per_s"])]
    if rep.get("health"):
        h = rep["health"]
        body += ["<h2>Training health</h2>", _kv({"steps": h.get("steps"), "grad_norm": h.get("grad_norm"),
                 "nonfinite": h.get("nonfinite"), "never a gradient": ", ".join((h.get("no_grad") or {}).get(
                     "names") or []) or "none", "loss": h.get("loss"), "update ratio": (h.get("update_ratio") or
                 {}).get("overall")})]
    body.append(_metrics(metrics))
    body += ["<h2>Build and versions</h2>", _kv(versions)]
    return _page("".join(body), title, fragment)


def write_html(source: Source, path: PathLike, metrics: Optional[dict] = None) -> None:
    """Writes :func:`html_report` to ``path`` (UTF-8), atomically."""
    _atomic_write(path, html_report(source, metrics).encode("utf-8"))


def comparison_html(cmp: dict, *, fragment: bool = False) -> str:
    """The HTML of a :func:`stepscope.compare` result: the verdict, the table and the rest."""
    rows = [(k, f"{v['p50_a'] * 1e3:.3f}" if v["p50_a"] is not None else "-",
             f"{v['p50_b'] * 1e3:.3f}" if v["p50_b"] is not None else "-",
             f"{100 * (v['ratio'] - 1):+.1f}%" if v["ratio"] is not None else "-",
             f"{v['p_value']:.2g}" if v["p_value"] is not None else "-", "yes" if v["beyond_noise"] else "no")
            for k, v in cmp["phases"].items()]
    tput = [(k, _fmt(a) if a is not None else "-", _fmt(b) if b is not None else "-")
            for k, (a, b) in cmp["throughput"].items()]
    f = cmp["findings"]
    body = (f"<h1>stepscope: two runs compared</h1><p><b>{_e(cmp['verdict'])}</b></p>"
            + _table(["phase", "p50 a ms", "p50 b ms", "change", "p", "beyond noise"], rows)
            + "<h2>Throughput</h2>" + _table(["", "a", "b"], tput)
            + f"<h2>Findings</h2><ul><li>new: {_e(', '.join(f['appeared']) or 'none')}</li>"
            f"<li>gone: {_e(', '.join(f['disappeared']) or 'none')}</li></ul>"
            + f"<p class='meta'>{_e(cmp['method'])}</p>")
    return _page(body, "stepscope compare", fragment)
