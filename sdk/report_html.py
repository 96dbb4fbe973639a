"""The optimize report as one self-contained HTML page (no scripts, no external assets).

It holds the candidate table (with each candidate's search time, whether its calibration came
from the cache, and the nodes it keeps in float), the recipes the search skipped and why, a
Pareto chart (p95 latency against quality, marker area
proportional to the model file's size, the Pareto front joined by a line), the budget verdict
of every line, notes (detector, ISA, fallbacks, exclusions) and the command that reproduces
the run. Input is :meth:`sdk.optimize.OptimizeReport.to_dict`, so a report saved as JSON can
be rendered again later.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["pareto_front", "render_report", "write_report"]

_W, _H, _PAD = 640, 360, 56


def _quality(c: Mapping[str, Any]) -> float | None:
    for key in ("accuracy", "agreement"):
        value = c.get(key)
        if isinstance(value, int | float):
            return float(value)
    quality = c.get("quality") or {}
    value = quality.get("cosine_mean") if isinstance(quality, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def _p95(c: Mapping[str, Any]) -> float | None:
    lat = c.get("latency_ms") or {}
    value = lat.get("p95") if isinstance(lat, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def pareto_front(candidates: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the candidates no other candidate beats on every axis at once: p95 latency,
    peak RSS increase and file size (lower is better) and quality (higher is better)."""

    def axes(c: Mapping[str, Any]) -> tuple[float, float, float, float] | None:
        p95, q = _p95(c), _quality(c)
        if c.get("error") or p95 is None:
            return None
        rss = c.get("rss_increase_mb")
        return (
            p95,
            float(rss) if isinstance(rss, int | float) else math.inf,
            float(c.get("size_bytes") or math.inf),
            -(q if q is not None else -math.inf),
        )

    scored = [(c["name"], a) for c in candidates if (a := axes(c)) is not None]
    front = []
    for name, a in scored:
        dominated = any(
            all(o <= s for o, s in zip(other, a, strict=True)) and other != a
            for n, other in scored
            if n != name
        )
        if not dominated:
            front.append(name)
    return front


def _chart(candidates: Sequence[Mapping[str, Any]], chosen: str, front: Sequence[str]) -> str:
    points = []
    for c in candidates:
        p95, q = _p95(c), _quality(c)
        if p95 is None or q is None or c.get("error"):
            continue
        points.append((c["name"], p95, q, float(c.get("size_bytes") or 0)))
    if not points:
        return "<p>No candidate has both a latency and a quality figure to plot.</p>"
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    x0, x1 = 0.0, max(xs) * 1.15 or 1.0
    y_lo, y_hi = min(ys), max(ys)
    spread = max(y_hi - y_lo, 0.01)
    y0, y1 = (
        y_lo - spread * 0.3,
        min(1.0, y_hi + spread * 0.3) if y_hi <= 1 else y_hi + spread * 0.3,
    )
    if y1 <= y0:
        y1 = y0 + 0.01
    biggest = max(p[3] for p in points) or 1.0

    def sx(x: float) -> float:
        return _PAD + (x - x0) / (x1 - x0) * (_W - 2 * _PAD)

    def sy(y: float) -> float:
        return _H - _PAD - (y - y0) / (y1 - y0) * (_H - 2 * _PAD)

    parts = [
        f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        'aria-label="Pareto chart: p95 latency against quality">',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" class="axis"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" class="axis"/>',
        f'<text x="{_W / 2}" y="{_H - 14}" text-anchor="middle">p95 latency (ms, host)</text>',
        f'<text x="16" y="{_H / 2}" transform="rotate(-90 16 {_H / 2})" '
        'text-anchor="middle">quality</text>',
    ]
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        yv = y0 + (y1 - y0) * i / 4
        parts.append(
            f'<text x="{sx(xv):.1f}" y="{_H - _PAD + 16}" text-anchor="middle" '
            f'class="tick">{xv:.3g}</text>'
        )
        parts.append(
            f'<text x="{_PAD - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end" '
            f'class="tick">{yv:.3g}</text>'
        )
    on_front = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
    if len(on_front) > 1:
        path = " ".join(f"{sx(p[1]):.1f},{sy(p[2]):.1f}" for p in on_front)
        parts.append(f'<polyline points="{path}" class="front"/>')
    for name, x, y, size in points:
        r = 5 + 20 * math.sqrt(size / biggest)
        cls = "chosen" if name == chosen else ("onfront" if name in front else "point")
        parts.append(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r:.1f}" class="{cls}">'
            f"<title>{html.escape(name)}: p95 {x:.4g} ms, quality {y:.4g}, "
            f"{size / 1024:.0f} KiB</title></circle>"
        )
        parts.append(
            f'<text x="{sx(x) + r + 3:.1f}" y="{sy(y) + 4:.1f}" class="label">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def render_report(report: Mapping[str, Any], *, command: str | None = None) -> str:
    """The HTML page for one optimize report dict."""
    candidates: list[Mapping[str, Any]] = list(report.get("candidates", []))
    chosen = str(report.get("chosen", ""))
    front = pareto_front(candidates)
    rows = _candidate_rows(candidates, chosen, front)
    budget_rows = _budget_rows(candidates, chosen)
    notes = _notes(report, candidates)
    skipped = _skipped_table(report)
    search = _search_line(report)
    target = report.get("target") or {}
    verdict = (
        "the chosen candidate meets every budget line"
        if report.get("meets_budget")
        else "NO candidate meets the budget: the best effort was bundled"
    )
    reproduce = html.escape(command) if command else "edgeship optimize … (see the report JSON)"
    each = _reproduce_each(candidates)
    latency = _latency_aware_section(candidates)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>edgeship optimize: {html.escape(chosen)} for {html.escape(str(target.get("name", "")))}
</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child, td.why, th.why {{ text-align: left; }}
tr.chosen {{ background: #eef6ee; font-weight: 600; }}
.meets {{ color: #1a7f37; }} .misses, .failed {{ color: #b42318; }}
svg text {{ font-size: 12px; fill: #333; }} svg .tick {{ font-size: 10px; fill: #666; }}
.axis {{ stroke: #999; }} .front {{ fill: none; stroke: #4a7; stroke-dasharray: 4 3; }}
.point {{ fill: #8aa4c8; opacity: .75; }} .onfront {{ fill: #4a7; opacity: .8; }}
.chosen {{ fill: #f2a33a; stroke: #333; }}
code {{ background: #f4f4f4; padding: 2px 4px; }}
</style></head><body>
<h1>edgeship optimize</h1>
<p>Target <b>{html.escape(str(target.get("name", "?")))}</b>
({html.escape(str(target.get("description", "")))}); budget
<code>{html.escape(str(report.get("budget_text", "")))}</code>. Chosen:
<b>{html.escape(chosen)}</b>, bundled in <code>{html.escape(str(report.get("bundle", "")))}</code>:
{verdict}.<br>Latencies were measured on
{html.escape(str(report.get("measured_on") or "this host"))}, not on the board.</p>
<h2>Candidates</h2>
<table><tr><th>candidate</th><th>size KiB</th><th>p50 ms</th><th>p95 ms</th><th>RSS+ MB</th>
<th>quality</th><th>drop (points)</th><th>time s</th><th>calibration</th><th>verdict</th>
<th>off by</th></tr>
{"".join(rows)}</table>
<p>{search}</p>
<h2>Skipped recipes</h2>
{skipped}
<h2>Latency against quality</h2>
{_chart(candidates, chosen, front)}
<p>Marker area is proportional to the model file's size; the dashed line joins the Pareto
front (no other candidate is at least as good on latency, memory, size and quality at once).</p>
<h2>Budget lines of the chosen candidate</h2>
<table><tr><th>line</th><th>measured</th><th>limit</th><th></th></tr>{"".join(budget_rows)}</table>
{latency}<h2>Notes</h2>
<ul>{"".join(f"<li>{n}</li>" for n in notes) or "<li>none</li>"}</ul>
<h2>Reproduce</h2>
<p><code>{reproduce}</code></p>
{each}
</body></html>
"""


def _candidate_rows(
    candidates: list[Mapping[str, Any]], chosen: str, front: list[str]
) -> list[str]:
    """One table row per candidate, the chosen one marked."""
    rows = []
    for c in candidates:
        lat = c.get("latency_ms") or {}
        q = _quality(c)
        verdict = (
            "failed" if c.get("error") else ("meets budget" if c.get("meets_budget") else "misses")
        )
        cls = "chosen" if c["name"] == chosen else ""
        drop = c.get("accuracy_drop")
        rows.append(
            f'<tr class="{cls}"><td>{html.escape(c["name"])}{" ★" if c["name"] == chosen else ""}'
            f"{' (Pareto)' if c['name'] in front else ''}</td>"
            f"<td>{_fmt((c.get('size_bytes') or 0) / 1024, 5)}</td>"
            f"<td>{_fmt(lat.get('p50'))}</td><td>{_fmt(lat.get('p95'))}</td>"
            f"<td>{_fmt(c.get('rss_increase_mb'), 3)}</td><td>{_fmt(q)}</td>"
            f"<td>{_fmt(None if drop is None else drop * 100, 3)}</td>"
            f"<td>{_fmt(c.get('elapsed_s'), 3)}</td><td>{_cache_cell(c)}</td>"
            f'<td class="{verdict.split()[0]}">{verdict}</td>'
            f"<td>{'<br>'.join(html.escape(v) for v in c.get('violations', []))}</td></tr>"
        )
    return rows


def _budget_rows(candidates: list[Mapping[str, Any]], chosen: str) -> list[str]:
    """The chosen candidate's budget lines, one row each."""
    budget_rows = []
    chosen_c = next((c for c in candidates if c["name"] == chosen), None)
    for line in (chosen_c or {}).get("budget", []):
        budget_rows.append(
            f"<tr><td>{html.escape(line['name'])}</td><td>{_fmt(line.get('measured'))}</td>"
            f"<td>{_fmt(line.get('limit'))} {html.escape(line.get('unit', ''))}</td>"
            f'<td class="{"meets" if line.get("passed") else "misses"}">'
            f"{'ok' if line.get('passed') else 'over'}</td></tr>"
        )
    return budget_rows


def _notes(report: Mapping[str, Any], candidates: list[Mapping[str, Any]]) -> list[str]:
    """The report's notes, then each candidate's nodes kept in float (escaped HTML)."""
    notes = [html.escape(str(n)) for n in report.get("notes", [])]
    for c in candidates:
        details = c.get("details") or {}
        excluded = details.get("excluded_nodes") if isinstance(details, Mapping) else None
        if excluded:
            notes.append(
                f"{html.escape(c['name'])}: kept in float: "
                + ", ".join(html.escape(str(n)) for n in excluded)
            )
        corrected = details.get("bias_correction") if isinstance(details, Mapping) else None
        if corrected:
            from sdk.quantize.bias_correction import describe

            what = html.escape(describe(corrected))
            notes.append(f"{html.escape(c['name'])}: bias correction: {what}")
    return notes


def _latency_aware_section(candidates: list[Mapping[str, Any]], top: int = 10) -> str:
    """The latency-aware int8 candidate's per-node evidence (its ``details["latency_aware"]``):
    the nodes whose int8 cost most exceeds their fp32 cost, and which it keeps in float."""
    parts = []
    for c in candidates:
        details = c.get("details") or {}
        evidence = details.get("latency_aware") if isinstance(details, Mapping) else None
        if not isinstance(evidence, Mapping):
            continue
        rows = "".join(
            f"<tr><td>{html.escape(str(n.get('node')))}</td>"
            f'<td class="why">{html.escape(str(n.get("op_type")))}</td>'
            f"<td>{_fmt(n.get('fp32_us'))}</td><td>{_fmt(n.get('int8_us'))}</td>"
            f"<td>{'kept in float' if n.get('kept_in_float') else 'int8'}</td></tr>"
            for n in list(evidence.get("nodes") or [])[:top]
        )
        rounds = ", ".join(
            f"round {r.get('round')}: {r.get('excluded')} in float, {_fmt(r.get('wall_us'))} µs"
            for r in evidence.get("rounds") or []
        )
        parts.append(
            f"<h3>{html.escape(str(c['name']))}</h3><p>Measured per node with ONNX Runtime's "
            f"profiler at {_fmt(evidence.get('threads'))} thread(s), median of "
            f"{_fmt(evidence.get('runs'))} runs (fp32 run {_fmt(evidence.get('fp32_wall_us'))} "
            f"µs; {html.escape(rounds)}; chosen round {_fmt(evidence.get('chosen_round'))}). "
            "int8 µs counts the Quantize/DequantizeLinear pairs around the node.</p>"
            '<table><tr><th>node</th><th class="why">op type</th><th>fp32 µs</th>'
            f"<th>int8 µs</th><th></th></tr>{rows}</table>"
        )
    if not parts:
        return ""
    return "<h2>Latency-aware int8: per-node evidence</h2>\n" + "\n".join(parts) + "\n"


def _skipped_table(report: Mapping[str, Any]) -> str:
    skipped_rows = "".join(
        f"<tr><td>{html.escape(str(s.get('name')))}</td>"
        f'<td class="why">{html.escape(str(s.get("reason")))}</td></tr>'
        for s in report.get("skipped", [])
    )
    return (
        f'<table><tr><th>recipe</th><th class="why">why it was not tried</th></tr>'
        f"{skipped_rows}</table>"
        if skipped_rows
        else "<p>none: every recipe was tried.</p>"
    )


def _reproduce_each(candidates: list[Mapping[str, Any]]) -> str:
    """The command that makes each int8 candidate again, as a list (empty: none)."""
    per_candidate = "".join(
        f"<li>{html.escape(str(c['name']))}: <code>{html.escape(str(c['reproduce']))}</code></li>"
        for c in candidates
        if c.get("reproduce")
    )
    return (
        "<p>Each int8 candidate on its own, from the ONNX model it was quantized from:</p>"
        f"<ul>{per_candidate}</ul>"
        if per_candidate
        else ""
    )


def _cache_cell(c: Mapping[str, Any]) -> str:
    hit = c.get("calibration_cache_hit")
    return "–" if hit is None else ("cached" if hit else "calibrated")


def _search_line(report: Mapping[str, Any]) -> str:
    elapsed = report.get("elapsed_s")
    limit = report.get("time_limit_s")
    text = "The search took " + (
        f"{elapsed:.1f} s" if isinstance(elapsed, int | float) else "an unknown time"
    )
    if isinstance(limit, int | float):
        text += f" (time limit {limit:g} s: no candidate started after it)"
    cache = report.get("calibration_cache") or {}
    if isinstance(cache, Mapping) and cache.get("dir"):
        text += (
            f"; calibration cache {html.escape(str(cache['dir']))}: {cache.get('hits', 0)} "
            f"hit(s), {cache.get('misses', 0)} miss(es)"
        )
    return text + "."


def write_report(
    path: str | Path, report: Mapping[str, Any], *, command: str | None = None
) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(report, command=command), encoding="utf-8")
    return out
