"""Prometheus text exposition (format 0.0.4) of the collector and its fleet, for ``GET /metrics``.

Written by hand (no client library): :func:`render_metrics` turns a fleet snapshot, the
collector's counters, per-device accumulators (:class:`DeviceCounters`), drift verdicts and
firing alerts into the text format. Names start with ``edgeship_`` and use base units
(``_seconds``, ``_bytes``, ``_celsius``, ``_ratio``; counters end in ``_total``). Per-device
series carry ``fleet``, ``device``, ``model`` and ``model_version`` labels (an unknown model is
``""``).

* **Latency** is a real histogram, ``edgeship_device_inference_latency_seconds``: the
  protocol's fixed millisecond buckets become ``le`` bounds in seconds, counts are cumulative
  (``le="+Inf"`` equals ``_count``) and add up every window this collector received since it
  started, so ``histogram_quantile(0.95, sum by (le, device) (rate(..._bucket[5m])))`` works
  across devices. Devices do not send the sum of their latencies; ``_sum`` is estimated from
  the bucket midpoints (within one bucket step of the truth, like any bucketed percentile).
* **Counters** of the collector (received, stored, duplicates, dead letters...) and of each
  device (inferences, errors, outliers) count since this collector process started; Prometheus
  handles the reset at a restart (``edgeship_collector_start_time_seconds`` shows it).
  ``edgeship_device_missing_messages`` (sequence numbers still missing) is a gauge, not a
  counter: a late message fills its gap and the count goes down.
  ``edgeship_fleet_deploys_total{fleet, state}`` counts remote deploy outcomes (each device's
  last deploy reaching ``probation``, ``applied``, ``rolled_back`` or ``failed``) received since
  this collector started; it has no deploy id or device label, so its series stay few.
* **Expiry**: a device not heard from for ``expire_after_s`` (default 1 h) has no series any
  more, so a decommissioned device disappears from dashboards instead of showing as down
  forever.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from collector.alerts import RULES, AlertRecord
from collector.drift import DriftResult
from collector.ingest import TelemetryRecord
from collector.state import FleetSnapshot
from device_agent.contracts.messages import DEPLOY_STATES, LATENCY_BUCKETS_MS

if TYPE_CHECKING:
    from collector.service import CollectorStats

__all__ = ["CONTENT_TYPE", "DeviceCounters", "escape_label", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BOUNDS_MS = tuple(LATENCY_BUCKETS_MS)
_STATES = ("online", "offline", "stale", "unknown")
_SEVERITIES = ("info", "warning", "critical")


@dataclass
class DeviceCounters:
    """Running totals of one device's telemetry (one model version) since the collector
    started: what the counters and the latency histogram expose."""

    fleet: str
    device: str
    model: str | None
    model_version: str | None
    windows: int = 0
    inferences: int = 0
    errors: int = 0
    outliers: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS_MS) + 1))
    latency_sum_s: float = 0.0
    last_received: float = 0.0

    def add(self, w: TelemetryRecord) -> None:
        self.windows += 1
        self.inferences += w.inferences
        self.errors += w.errors
        self.outliers += w.outliers
        self.last_received = max(self.last_received, w.received_at)
        if w.latency_bounds == _BOUNDS_MS:
            for i, c in enumerate(w.latency_counts):
                if c:
                    self.latency_counts[i] += c
                    self.latency_sum_s += c * _MIDPOINTS_S[i]


def _midpoints_s() -> tuple[float, ...]:
    out = []
    for i in range(len(_BOUNDS_MS) + 1):
        if i == len(_BOUNDS_MS):
            out.append(_BOUNDS_MS[-1] / 1000.0)
        else:
            lower = _BOUNDS_MS[i - 1] if i else 0.0
            out.append((lower + _BOUNDS_MS[i]) / 2000.0)
    return tuple(out)


_MIDPOINTS_S = _midpoints_s()


def escape_label(value: str) -> str:
    """A label value escaped for the text format (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


_LE = (*(_format_value(b / 1000.0) for b in _BOUNDS_MS), "+Inf")


class _Exposition:
    """Families in the order they are declared, each with its HELP, TYPE and samples."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def family(self, name: str, kind: str, help_text: str) -> None:
        self._families.setdefault(name, (kind, help_text, []))

    def sample(
        self,
        family: str,
        value: float | None,
        labels: Mapping[str, str] | None = None,
        *,
        suffix: str = "",
    ) -> None:
        if value is None:
            return
        label_text = ""
        if labels:
            label_text = "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"
        self._families[family][2].append(
            f"{family}{suffix}{label_text} {_format_value(float(value))}"
        )

    def text(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text, samples) in self._families.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


def render_metrics(
    snapshot: FleetSnapshot,
    *,
    stats: CollectorStats | None = None,
    counters: Iterable[DeviceCounters] = (),
    drift: Sequence[DriftResult] = (),
    alerts: Sequence[AlertRecord] = (),
    expire_after_s: float = 3600.0,
    deploys: Mapping[tuple[str, str], int] | None = None,
) -> str:
    """The exposition text for ``snapshot`` (taken at ``snapshot.at``). Devices last seen more
    than ``expire_after_s`` before it are left out. ``deploys``: deploy outcomes counted by
    (fleet, state)."""
    now = snapshot.at
    out = _Exposition()
    _collector(out, stats)

    live = [
        d
        for d in snapshot.devices
        if d.last_seen is not None and now - d.last_seen <= expire_after_s
    ]
    by_key = {(c.fleet, c.device): c for c in counters}
    drift_by_key = {(r.fleet, r.device): r for r in drift}

    out.family(
        "edgeship_fleet_devices", "gauge", "Devices by state (online, offline, stale, unknown)."
    )
    fleets = sorted({d.fleet for d in live})
    for fleet in fleets:
        for state in _STATES:
            n = sum(1 for d in live if d.fleet == fleet and d.status == state)
            out.sample("edgeship_fleet_devices", n, {"fleet": fleet, "state": state})

    families = (
        (
            "edgeship_device_up",
            "gauge",
            "1 if the device is online (status online, telemetry fresh), else 0.",
        ),
        (
            "edgeship_device_stale",
            "gauge",
            "1 if the device sent no telemetry for its stale_windows, else 0.",
        ),
        (
            "edgeship_device_last_seen_timestamp_seconds",
            "gauge",
            "When the collector last received anything from the device (unix seconds).",
        ),
        (
            "edgeship_device_messages_total",
            "counter",
            "Messages stored for the device (duplicates not counted).",
        ),
        (
            "edgeship_device_duplicates_total",
            "counter",
            "Duplicate deliveries of the device's messages that the store dropped.",
        ),
        (
            "edgeship_device_missing_messages",
            "gauge",
            "Sequence numbers missing between the first and newest stored (late ones lower it).",
        ),
        (
            "edgeship_device_inferences_total",
            "counter",
            "Inferences reported in telemetry received since the collector started.",
        ),
        (
            "edgeship_device_inference_errors_total",
            "counter",
            "Failed inferences reported in telemetry received since the collector started.",
        ),
        (
            "edgeship_device_outliers_total",
            "counter",
            "Inputs flagged as outliers, from telemetry received since the collector started.",
        ),
        (
            "edgeship_device_inference_latency_seconds",
            "histogram",
            "Inference latency, fixed buckets (_sum estimated from the bucket midpoints).",
        ),
        (
            "edgeship_device_latency_p95_seconds",
            "gauge",
            "p95 inference latency over the collector's lookback (from summed histograms).",
        ),
        (
            "edgeship_device_outlier_ratio",
            "gauge",
            "Outliers / inferences over the collector's lookback.",
        ),
        (
            "edgeship_device_temperature_celsius",
            "gauge",
            "SoC temperature in the newest telemetry window.",
        ),
        (
            "edgeship_device_throttled",
            "gauge",
            "1 if the board is under-volted, capped, throttled or soft-limited now.",
        ),
        (
            "edgeship_device_resident_memory_bytes",
            "gauge",
            "The agent's resident memory in the newest window.",
        ),
        (
            "edgeship_device_memory_available_bytes",
            "gauge",
            "The board's MemAvailable in the newest window.",
        ),
        (
            "edgeship_device_spool_depth_messages",
            "gauge",
            "Messages waiting in the device's spool.",
        ),
        (
            "edgeship_device_spool_dropped_total",
            "counter",
            "Messages the device dropped from its full spool over its life.",
        ),
        (
            "edgeship_device_drift_psi",
            "gauge",
            "PSI of recent predictions or outlier scores vs the reference or first windows.",
        ),
    )
    for name, kind, help_text in families:
        out.family(name, kind, help_text)

    for d in live:
        labels = {
            "fleet": d.fleet,
            "device": d.device,
            "model": d.model or "",
            "model_version": d.model_version or "",
        }
        out.sample("edgeship_device_up", 1 if d.status == "online" else 0, labels)
        out.sample("edgeship_device_stale", 1 if d.status == "stale" else 0, labels)
        out.sample("edgeship_device_last_seen_timestamp_seconds", d.last_seen, labels)
        out.sample("edgeship_device_messages_total", d.messages, labels)
        out.sample("edgeship_device_duplicates_total", d.duplicates, labels)
        out.sample("edgeship_device_missing_messages", d.gaps.missing, labels)
        c = by_key.get((d.fleet, d.device))
        if c is not None:
            clabels = {
                **labels,
                "model": c.model or "",
                "model_version": c.model_version or "",
            }
            out.sample("edgeship_device_inferences_total", c.inferences, clabels)
            out.sample("edgeship_device_inference_errors_total", c.errors, clabels)
            out.sample("edgeship_device_outliers_total", c.outliers, clabels)
            name = "edgeship_device_inference_latency_seconds"
            cumulative = 0
            for le, count in zip(_LE, c.latency_counts, strict=True):
                cumulative += count
                out.sample(name, cumulative, {**clabels, "le": le}, suffix="_bucket")
            out.sample(name, c.latency_sum_s, clabels, suffix="_sum")
            out.sample(name, cumulative, clabels, suffix="_count")
        if d.latency.p95 is not None:
            out.sample("edgeship_device_latency_p95_seconds", d.latency.p95 / 1000.0, labels)
        out.sample("edgeship_device_outlier_ratio", d.outlier_rate, labels)
        w = d.last_window
        if w is not None:
            out.sample("edgeship_device_temperature_celsius", w.temperature_c, labels)
            if w.throttled is not None:
                out.sample("edgeship_device_throttled", 1 if w.throttled & 0xF else 0, labels)
            out.sample("edgeship_device_resident_memory_bytes", w.rss_bytes, labels)
            out.sample("edgeship_device_memory_available_bytes", w.mem_available_bytes, labels)
            out.sample("edgeship_device_spool_depth_messages", w.spool_depth, labels)
            out.sample("edgeship_device_spool_dropped_total", w.spool_dropped, labels)
        r = drift_by_key.get((d.fleet, d.device))
        if r is not None and r.basis is not None:
            dl = {
                **labels,
                "model": r.model or "",
                "model_version": r.model_version or "",
                "basis": r.basis,
            }
            out.sample(
                "edgeship_device_drift_psi", r.predictions_psi, {**dl, "histogram": "predictions"}
            )
            out.sample("edgeship_device_drift_psi", r.scores_psi, {**dl, "histogram": "scores"})

    deploys = deploys or {}
    out.family(
        "edgeship_fleet_deploys_total",
        "counter",
        "Remote deploy outcomes received since the collector started, by state.",
    )
    for fleet in sorted(set(fleets) | {k[0] for k in deploys}):
        for state in DEPLOY_STATES:
            n = deploys.get((fleet, state), 0)
            out.sample("edgeship_fleet_deploys_total", n, {"fleet": fleet, "state": state})

    out.family("edgeship_alerts_firing", "gauge", "Alerts firing now, by fleet, rule and severity.")
    firing: dict[tuple[str, str, str], int] = {}
    for a in alerts:
        if a.state == "firing":
            k = (a.fleet, a.rule, a.severity)
            firing[k] = firing.get(k, 0) + 1
    for fleet in sorted(set(fleets) | {k[0] for k in firing}):
        for rule in RULES:
            severities = {k[2] for k in firing if k[:2] == (fleet, rule)} or {"none"}
            for sev in sorted(severities):
                n = firing.get((fleet, rule, sev), 0)
                out.sample(
                    "edgeship_alerts_firing", n, {"fleet": fleet, "rule": rule, "severity": sev}
                )
    return out.text()


def _collector(out: _Exposition, stats: CollectorStats | None) -> None:
    if stats is None:
        return
    counters = (
        (
            "edgeship_collector_messages_received_total",
            "Deliveries received from the broker (duplicates and dead letters included).",
            stats.received,
        ),
        ("edgeship_collector_messages_stored_total", "New messages stored.", stats.stored),
        (
            "edgeship_collector_duplicates_total",
            "Deliveries dropped as duplicates by (device, boot, seq).",
            stats.duplicates,
        ),
        (
            "edgeship_collector_dead_letters_total",
            "Messages the wire contract rejected (kept in the dead_letters table).",
            stats.dead_letters,
        ),
        (
            "edgeship_collector_ignored_total",
            "Valid messages not stored (commands, alerts, cleared retained status).",
            stats.ignored,
        ),
        ("edgeship_collector_batches_total", "Batches committed to the store.", stats.batches),
        (
            "edgeship_collector_store_errors_total",
            "Batches the store failed to commit (retried).",
            stats.store_errors,
        ),
        (
            "edgeship_collector_redelivered_total",
            "Deliveries the broker flagged as re-sent (after a reconnect or a crash).",
            stats.redelivered,
        ),
        (
            "edgeship_collector_connects_total",
            "Successful connections to the broker.",
            stats.connects,
        ),
    )
    for name, help_text, value in counters:
        out.family(name, "counter", help_text)
        out.sample(name, value)
    out.family(
        "edgeship_collector_dead_letters_by_field_total",
        "counter",
        "Dead letters by the field the wire contract rejected.",
    )
    for fld, count in sorted(stats.dead_by_field.items()):
        out.sample("edgeship_collector_dead_letters_by_field_total", count, {"field": fld})
    gauges = (
        (
            "edgeship_collector_connected",
            "1 while connected to the broker.",
            1 if stats.connected else 0,
        ),
        (
            "edgeship_collector_pending_messages",
            "Received messages waiting for the next commit.",
            stats.pending,
        ),
        (
            "edgeship_collector_uncommitted_messages",
            "Received messages not committed (so not acknowledged) yet.",
            stats.uncommitted,
        ),
        (
            "edgeship_collector_start_time_seconds",
            "When this collector process started (unix seconds).",
            stats.started_at,
        ),
        (
            "edgeship_collector_last_commit_timestamp_seconds",
            "When the last batch was committed (unix seconds).",
            stats.last_commit_at,
        ),
    )
    for name, help_text, gauge in gauges:
        out.family(name, "gauge", help_text)
        out.sample(name, gauge)
