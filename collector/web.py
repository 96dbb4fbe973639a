"""The collector's web pages and the monitor's HTTP routes (a FastAPI router over a monitor).

Routes (GET), beside :mod:`collector.api`'s ``/api/...``, served when the app has a monitor:

* ``/``: the fleet dashboard: one row per device (state, model and version, p95 latency,
  outlier rate, temperature, drift PSI, firing alerts), firing alerts above it, the newest
  staged rollouts below it (state, wave, devices per state, reason). The page is rendered here
  with the data of the moment, so it is readable without JavaScript; a small script
  (``/static/dashboard.js``, no build step, nothing from a CDN) then polls ``/api/devices``,
  ``/api/alerts``, ``/api/drift`` and ``/api/rollouts`` every 2 s and redraws it.
* ``/devices/{device}`` (``?fleet=``): one device: its facts, latency (p50, p95, max) and outlier
  rate per telemetry window drawn as inline SVG from ``/api/devices/{device}``'s series, its
  alerts and newest events.
* ``/metrics``: Prometheus text exposition (:mod:`collector.metrics`, the monitor's registry).
* ``/api/alerts`` (``?state=firing|resolved``, ``?limit=N``): firing alerts and the history.
* ``/api/drift``: drift settings, registered references and each device's verdict.
* ``/static/dashboard.js``, ``/static/dashboard.css``.

This module imports the monitor's type only; the monitor imports nothing of HTTP.
"""

from __future__ import annotations

import html
import json
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from collector.api import ApiError
from collector.api_routes import json_response
from collector.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from collector.metrics import exposition
from collector.state import DeviceState
from collector.store import RolloutRow
from device_agent.contracts.messages import ROLLOUT_DEVICE_STATES

if TYPE_CHECKING:
    from collector.monitor import Monitor

__all__ = ["device_page", "fleet_page", "monitor_router"]

_STATIC = Path(__file__).with_name("static")
# The dashboard's Rollouts panel shows this many, the newest first (dashboard.js asks the same).
DASHBOARD_ROLLOUTS = 10
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def monitor_router(monitor: Monitor) -> APIRouter:
    """The routes above, reading ``monitor`` (and its collector's fleet state)."""
    router = APIRouter(tags=["dashboard"])

    @router.get("/", response_class=HTMLResponse, summary="The fleet dashboard")
    def fleet() -> HTMLResponse:
        return HTMLResponse(fleet_page(monitor))

    @router.get("/index.html", response_class=HTMLResponse, summary="The fleet dashboard")
    def index() -> HTMLResponse:
        return HTMLResponse(fleet_page(monitor))

    @router.get("/devices/{device:path}", response_class=HTMLResponse, summary="One device")
    def device(device: str, fleet: str | None = None) -> HTMLResponse:
        status, body = device_page(monitor, device.strip("/"), fleet)
        return HTMLResponse(body, status_code=status)

    @router.get(
        "/metrics",
        summary="Prometheus metrics of the collector and its fleet",
        response_class=Response,
        responses={200: {"content": {METRICS_CONTENT_TYPE: {}}}},
    )
    def metrics() -> Response:
        return Response(exposition(monitor.registry), media_type=METRICS_CONTENT_TYPE)

    @router.get("/api/alerts", tags=["api"], summary="Firing alerts and the alert history")
    def alerts(
        state: Literal["firing", "resolved"] | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> Response:
        return json_response(200, monitor.alerts_dict(state=state, limit=limit))

    @router.get("/api/drift", tags=["api"], summary="Drift settings, references and verdicts")
    def drift() -> Response:
        return json_response(200, monitor.drift_dict())

    @router.get("/static/{name}", summary="The dashboard's script and style sheet")
    def static(name: str) -> Response:
        file = _STATIC / name
        if file.suffix not in _STATIC_TYPES or not file.is_file():
            raise ApiError(404, f"no route /static/{name}")
        return Response(file.read_bytes(), media_type=_STATIC_TYPES[file.suffix])

    return router


# --- pages ----------------------------------------------------------------------------------


def _page(title: str, page: str, body: str, data: Mapping[str, Any]) -> str:
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        '<link rel=stylesheet href="/static/dashboard.css"></head>'
        f'<body data-page="{page}" data-params="{html.escape(json.dumps(data))}">'
        f"{body}"
        '<script src="/static/dashboard.js"></script></body></html>\n'
    )


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def _ago(now: float, t: float | None) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def _device_href(d: DeviceState) -> str:
    q = "?fleet=" + urllib.parse.quote(d.fleet)
    return f"/devices/{urllib.parse.quote(d.device)}{q}"


def _deploy_marker(d: DeviceState) -> str:
    """A badge after the model when the device's last remote deploy was rolled back or
    failed (the reason in its tooltip); nothing otherwise."""
    dep = d.deploy
    if dep is None or dep.state not in ("rolled_back", "failed"):
        return ""
    text = "rolled back" if dep.state == "rolled_back" else "deploy failed"
    tip = f"deploy {dep.id} -> {dep.to_version}: {dep.reason or 'no reason given'}"
    return f' <span class="deploy {dep.state}" title="{html.escape(tip)}">{text}</span>'


_NO_ROLLOUTS = "<tr><td colspan=7 class=none>none</td></tr>"


def _rollout_devices(r: RolloutRow) -> str:
    """``2 applied, 1 rolled back, 3 pending``: the states its devices are in, in the
    protocol's order (dashboard.js writes the same)."""
    parts = [
        f"{r.counts[s]} {s.replace('_', ' ')}" for s in ROLLOUT_DEVICE_STATES if r.counts.get(s)
    ]
    return ", ".join(parts) or "–"


def _rollout_row(r: RolloutRow, now: float) -> str:
    href = f"/api/rollouts/{urllib.parse.quote(r.fleet)}/{urllib.parse.quote(r.id)}"
    model = f"{r.model or '–'}" + (f"@{r.model_version}" if r.model_version else "")
    return (
        f'<tr data-rollout="{html.escape(r.id)}" data-fleet="{html.escape(r.fleet)}">'
        f'<td><a href="{html.escape(href)}">{html.escape(r.id)}</a></td>'
        f"<td>{html.escape(model)}</td>"
        f'<td><span class="state {html.escape(r.state)}">{html.escape(r.state)}</span></td>'
        f"<td>{r.wave_shown} of {r.waves_total}</td>"
        f"<td>{html.escape(_rollout_devices(r))}</td>"
        f"<td class=reason>{html.escape(r.reason or '–')}</td>"
        f"<td>{_ago(now, r.received_at)}</td></tr>"
    )


def fleet_page(monitor: Monitor) -> str:
    """The fleet dashboard, rendered with the data of now."""
    snap = monitor.state.snapshot()
    now = time.time()
    drift = {(r.fleet, r.device): r for r in monitor.drift.results()}
    firing = monitor.engine.firing()
    by_device: dict[tuple[str, str | None], list[str]] = {}
    for a in firing:
        by_device.setdefault((a.fleet, a.device), []).append(a.rule)
    counts = snap.counts
    rollouts = monitor.state.store.rollouts(monitor.state.fleet, limit=DASHBOARD_ROLLOUTS)
    rollout_rows = "".join(_rollout_row(r, now) for r in rollouts)
    rows = []
    for d in snap.devices:
        r = drift.get((d.fleet, d.device))
        rules = by_device.get((d.fleet, d.device), [])
        t = d.last_window.temperature_c if d.last_window is not None else None
        model = f"{d.model or '–'}" + (f"@{d.model_version}" if d.model_version else "")
        rows.append(
            f'<tr data-device="{html.escape(d.device)}" data-fleet="{html.escape(d.fleet)}">'
            f'<td><a href="{html.escape(_device_href(d))}">{html.escape(d.device)}</a></td>'
            f'<td><span class="state {d.status}" title="{html.escape(d.reason)}">'
            f"{d.status}</span></td>"
            f"<td>{html.escape(model)}{_deploy_marker(d)}</td>"
            f"<td class=num>{_fmt(d.latency.p95, '.3g')}</td>"
            f"<td class=num>{_fmt(d.outlier_rate, '.1f', 100)}{'%' if d.outlier_rate is not None else ''}</td>"  # noqa: E501
            f"<td class=num>{_fmt(t, '.1f')}</td>"
            f'<td class="num psi {"" if r is None else r.level}">'
            f"{_fmt(None if r is None else r.psi, '.3f')}</td>"
            f"<td class=alerts>{html.escape(', '.join(rules)) if rules else '–'}</td>"
            f"<td>{_ago(now, d.last_seen)}</td></tr>"
        )
    alert_items = "".join(
        f'<li class="alert {a.severity}"><b>{html.escape(a.rule)}</b> '
        f"{html.escape(a.summary)} <small>since {_ago(now, a.started_at)}</small></li>"
        for a in firing
    )
    fleet = snap.fleet or "all fleets"
    body = (
        f"<header><h1>edgeship <span>{html.escape(fleet)}</span></h1>"
        f"<p id=summary>{len(snap.devices)} devices: {counts['online']} online, "
        f"{counts['stale']} stale, {counts['offline']} offline; {len(firing)} alerts firing</p>"
        "<p id=updated>rendered by the collector</p></header>"
        "<main><section><h2>Alerts firing</h2>"
        f"<ul id=alerts>{alert_items or '<li class=none>none</li>'}</ul></section>"
        "<section><h2>Devices</h2><table id=fleet><thead><tr>"
        "<th>device</th><th>state</th><th>model</th><th>p95 ms</th><th>outliers</th>"
        "<th>temp °C</th><th>drift PSI</th><th>alerts</th><th>last seen</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
        "<section><h2>Rollouts</h2><table id=rollouts><thead><tr>"
        "<th>rollout</th><th>model</th><th>state</th><th>wave</th><th>devices</th>"
        "<th>reason</th><th>updated</th></tr></thead>"
        f"<tbody>{rollout_rows or _NO_ROLLOUTS}</tbody></table></section>"
        '<p class=links><a href="/metrics">/metrics</a> · <a href="/api/devices">/api/devices</a>'
        ' · <a href="/api/alerts">/api/alerts</a> · <a href="/api/drift">/api/drift</a>'
        ' · <a href="/api/rollouts">/api/rollouts</a></p>'
        "</main>"
    )
    return _page(f"edgeship · {fleet}", "fleet", body, {"fleet": snap.fleet})


def device_page(monitor: Monitor, device: str, fleet: str | None) -> tuple[int, str]:
    """(HTTP status, HTML) of one device's page."""
    try:
        detail = monitor.state.device(device, fleet=fleet, series=0, events=0)
    except LookupError as exc:
        return 400, _page("edgeship", "error", f"<main><p>{html.escape(str(exc))}</p></main>", {})
    if detail is None:
        return 404, _page(
            "edgeship",
            "error",
            f'<main><p>No device {html.escape(device)!s} in the store. <a href="/">Fleet</a></p>'
            "</main>",
            {},
        )
    d = detail.state
    now = time.time()
    r = monitor.drift.result(d.fleet, d.device)
    facts = [
        ("state", f'<span class="state {d.status}">{d.status}</span> {html.escape(d.reason)}'),
        ("fleet", html.escape(d.fleet)),
        ("model", html.escape(f"{d.model or '–'} {d.model_version or ''}")),
        ("runtime", html.escape(str(d.runtime or "–"))),
        ("agent", html.escape(str(d.agent_version or "–"))),
        ("board", html.escape(str(d.host.get("model") or "–"))),
        ("last seen", _ago(now, d.last_seen)),
        ("p95 latency", f"{_fmt(d.latency.p95, '.3g')} ms"),
        ("outlier rate", _fmt(d.outlier_rate, ".2%")),
        ("drift", html.escape("–" if r is None else f"{r.level}: {r.reason}")),
        ("missing messages", str(d.gaps.missing)),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    alerts = [a for a in monitor.engine.firing() if (a.fleet, a.device) == (d.fleet, d.device)]
    items = "".join(
        f'<li class="alert {a.severity}"><b>{html.escape(a.rule)}</b> {html.escape(a.summary)}</li>'
        for a in alerts
    )
    body = (
        f'<header><h1><a href="/">edgeship</a> / <span>{html.escape(d.device)}</span></h1>'
        "<p id=updated>rendered by the collector</p></header>"
        f"<main><section><dl id=facts>{dl}</dl></section>"
        f"<section><h2>Alerts firing</h2><ul id=alerts>{items or '<li class=none>none</li>'}"
        "</ul></section>"
        "<section><h2>Latency per window (ms)</h2><div class=chart id=latency-chart>"
        "<p class=none>loading…</p></div></section>"
        "<section><h2>Outlier rate per window</h2><div class=chart id=outlier-chart>"
        "<p class=none>loading…</p></div></section>"
        "<section><h2>Newest events</h2><table id=events><thead><tr><th>received</th>"
        "<th>kind</th><th>seq</th><th>what</th></tr></thead><tbody></tbody></table></section>"
        "</main>"
    )
    return 200, _page(
        f"edgeship · {d.device}", "device", body, {"device": d.device, "fleet": d.fleet}
    )
