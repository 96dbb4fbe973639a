"""Prometheus metrics of the collector and its fleet, for ``GET /metrics``, through
``prometheus_client``.

:class:`FleetMetrics` is a custom collector in the library's sense (``collect()`` yields metric
families): it reads a :class:`MetricsView` (the fleet snapshot, the collector's counters,
per-device accumulators, drift verdicts, firing alerts) when Prometheus scrapes, so nothing is
kept twice and a scrape always shows the store's state of that moment. :func:`make_registry`
registers it in a registry of its own (never the process-wide default, which would add the
library's process and GC series and collide between two collectors in one process), and
:func:`exposition` writes the text format (0.0.4) with the library's own writer.

Names start with ``edgeship_`` and use base units (``_seconds``, ``_bytes``, ``_celsius``,
``_ratio``; counters end in ``_total``). Per-device series carry ``fleet``, ``device``, ``model``
and ``model_version`` labels (an unknown model is ``""``).

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
* **Rollouts**: ``edgeship_rollout_devices{fleet, rollout, state}`` (a rollout's devices per
  state in it, every state named) and ``edgeship_rollout_state{fleet, rollout, state}`` (1 for
  the rollout's current state, 0 for the others), for the newest
  :data:`ROLLOUT_SERIES_PER_FLEET` rollouts of each fleet (by start), from the store: an older
  rollout's series end, so their number stays bounded.
* **Several collectors, one fleet** (a shared subscription and one PostgreSQL store): every
  collector exports its own ingest series (``edgeship_collector_*``, labelled
  ``collector`` = its client id: each counts what the broker handed *it*, so ``sum`` over the
  scrape targets is the fleet's), and ``edgeship_collector_leader`` (1 on the fleet's leader,
  :mod:`collector.leader`). The fleet-wide series (``edgeship_fleet_*``, ``edgeship_device_*``,
  ``edgeship_alerts_firing``, ``edgeship_rollout_*``), which every collector could read from the
  shared store, come from the leader alone, so a ``sum`` over every target counts each device once.
* **Expiry**: a device not heard from for ``expire_after_s`` (default 1 h) has no series any
  more, so a decommissioned device disappears from dashboards instead of showing as down
  forever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.utils import floatToGoString

from device_agent.contracts.messages import (
    DEPLOY_STATES,
    LATENCY_BUCKETS_MS,
    ROLLOUT_DEVICE_STATES,
    ROLLOUT_STATES,
)

if TYPE_CHECKING:  # types only: this module reads a view, whoever builds it
    from collector.alerts import AlertRecord
    from collector.drift import DriftResult
    from collector.ingest import TelemetryRecord
    from collector.service import CollectorStats
    from collector.state import DeviceState, FleetSnapshot
    from collector.store import RolloutRow

__all__ = [
    "CONTENT_TYPE",
    "ROLLOUT_SERIES_PER_FLEET",
    "DeviceCounters",
    "FleetMetrics",
    "MetricsView",
    "exposition",
    "make_registry",
]

# The classic text format: what every Prometheus and promtool reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
_BOUNDS_MS = tuple(LATENCY_BUCKETS_MS)
_STATES = ("online", "offline", "stale", "unknown")
_DEVICE_LABELS = ("fleet", "device", "model", "model_version")
# /metrics shows this many rollouts of each fleet, the newest by start.
ROLLOUT_SERIES_PER_FLEET = 5


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
_LE = tuple(
    [str(floatToGoString(b / 1000.0)) for b in _BOUNDS_MS]  # type: ignore[no-untyped-call]
    + ["+Inf"]
)


@dataclass(frozen=True)
class MetricsView:
    """What one scrape shows, read at scrape time. ``stats`` None leaves the collector's own
    series out; ``deploys`` counts deploy outcomes by (fleet, state); ``rules`` names every
    alert rule (each gets a series per fleet); devices last seen more than ``expire_after_s``
    before ``snapshot.at`` are left out. ``rollouts``: the rollouts to show (the newest
    :data:`ROLLOUT_SERIES_PER_FLEET` of each fleet). ``leader`` False (another collector leads
    the fleet) leaves the fleet-wide series out; ``collector`` labels the collector's own
    series (None: no label)."""

    snapshot: FleetSnapshot
    stats: CollectorStats | None = None
    counters: Sequence[DeviceCounters] = ()
    drift: Sequence[DriftResult] = ()
    alerts: Sequence[AlertRecord] = ()
    rules: Sequence[str] = ()
    deploys: Mapping[tuple[str, str], int] = field(default_factory=dict)
    rollouts: Sequence[RolloutRow] = ()
    expire_after_s: float = 3600.0
    monitor_errors: int | None = None
    alerts_published: int | None = None
    leader: bool = True
    collector: str | None = None


class FleetMetrics:
    """A ``prometheus_client`` collector: every scrape calls ``read`` and turns its view into
    metric families (nothing is cached between scrapes)."""

    def __init__(self, read: Callable[[], MetricsView]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        """No names up front: the families depend on the fleet, and registering must not
        read the store."""
        return []

    def collect(self) -> Iterator[Metric]:
        view = self._read()
        own = _Own(view.collector)
        if view.stats is not None:
            yield from _collector_families(view.stats, own)
        yield own.gauge(
            "edgeship_collector_leader",
            "1 while this collector leads its fleet: evaluates the alert rules and exports the "
            "fleet-wide series.",
            1 if view.leader else 0,
        )
        if view.leader:
            yield from _fleet_families(view)
        if view.monitor_errors is not None:
            yield own.counter(
                "edgeship_collector_monitor_errors",
                "Monitor rounds that failed (see the log).",
                view.monitor_errors,
            )
        if view.alerts_published is not None:
            yield own.counter(
                "edgeship_collector_alerts_published",
                "Alert messages published over MQTT.",
                view.alerts_published,
            )


def make_registry(read: Callable[[], MetricsView]) -> CollectorRegistry:
    """A registry of its own holding one :class:`FleetMetrics` over ``read``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetMetrics(read))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's samples in the text format (:data:`CONTENT_TYPE`)."""
    return generate_latest(registry)


# --- families -----------------------------------------------------------------------------------


class _Own:
    """Families of the collector's own series, labelled ``collector`` when it has a name."""

    def __init__(self, collector: str | None) -> None:
        self.labels: tuple[str, ...] = () if collector is None else ("collector",)
        self.values: tuple[str, ...] = () if collector is None else (collector,)

    def counter(self, name: str, help_text: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, help_text, labels=self.labels)
        family.add_metric(self.values, value)
        return family

    def gauge(self, name: str, help_text: str, value: float | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, help_text, labels=self.labels)
        if value is not None:
            family.add_metric(self.values, value)
        return family


def _collector_families(stats: CollectorStats, own: _Own) -> Iterator[Metric]:
    counters = (
        ("edgeship_collector_messages_received",
         "Deliveries received from the broker (duplicates and dead letters included).",
         stats.received),
        ("edgeship_collector_messages_stored", "New messages stored.", stats.stored),
        ("edgeship_collector_duplicates",
         "Deliveries dropped as duplicates by (device, boot, seq), and rollout states not "
         "newer than the one stored.", stats.duplicates),
        ("edgeship_collector_dead_letters",
         "Messages the wire contract rejected (kept in the dead_letters table).",
         stats.dead_letters),
        ("edgeship_collector_ignored",
         "Valid messages not stored (commands, alerts, cleared retained status).", stats.ignored),
        ("edgeship_collector_batches", "Batches committed to the store.", stats.batches),
        ("edgeship_collector_store_errors",
         "Batches the store failed to commit (retried).", stats.store_errors),
        ("edgeship_collector_redelivered",
         "Deliveries the broker flagged as re-sent (after a reconnect or a crash).",
         stats.redelivered),
        ("edgeship_collector_connects", "Successful connections to the broker.", stats.connects),
    )  # fmt: skip
    for name, help_text, value in counters:
        yield own.counter(name, help_text, value)
    by_field = CounterMetricFamily(
        "edgeship_collector_dead_letters_by_field",
        "Dead letters by the field the wire contract rejected.",
        labels=(*own.labels, "field"),
    )
    for fld, count in sorted(stats.dead_by_field.items()):
        by_field.add_metric((*own.values, fld), count)
    yield by_field
    gauges = (
        ("edgeship_collector_connected", "1 while connected to the broker.",
         1 if stats.connected else 0),
        ("edgeship_collector_pending_messages",
         "Received messages waiting for the next commit.", stats.pending),
        ("edgeship_collector_uncommitted_messages",
         "Received messages not committed (so not acknowledged) yet.", stats.uncommitted),
        ("edgeship_collector_start_time_seconds",
         "When this collector process started (unix seconds).", stats.started_at),
        ("edgeship_collector_last_commit_timestamp_seconds",
         "When the last batch was committed (unix seconds).", stats.last_commit_at),
    )  # fmt: skip
    for name, help_text, gauge in gauges:
        yield own.gauge(name, help_text, gauge)


# Per-device families: (name, kind, help); counters are named without ``_total`` (the library
# adds it, as the text format wants).
_DEVICE_FAMILIES = (
    ("edgeship_device_up", "gauge",
     "1 if the device is online (status online, telemetry fresh), else 0."),
    ("edgeship_device_stale", "gauge",
     "1 if the device sent no telemetry for its stale_windows, else 0."),
    ("edgeship_device_last_seen_timestamp_seconds", "gauge",
     "When the collector last received anything from the device (unix seconds)."),
    ("edgeship_device_messages", "counter",
     "Messages stored for the device (duplicates not counted)."),
    ("edgeship_device_duplicates", "counter",
     "Duplicate deliveries of the device's messages that the store dropped."),
    ("edgeship_device_missing_messages", "gauge",
     "Sequence numbers missing between the first and newest stored (late ones lower it)."),
    ("edgeship_device_inferences", "counter",
     "Inferences reported in telemetry received since the collector started."),
    ("edgeship_device_inference_errors", "counter",
     "Failed inferences reported in telemetry received since the collector started."),
    ("edgeship_device_outliers", "counter",
     "Inputs flagged as outliers, from telemetry received since the collector started."),
    ("edgeship_device_latency_p95_seconds", "gauge",
     "p95 inference latency over the collector's lookback (from summed histograms)."),
    ("edgeship_device_outlier_ratio", "gauge",
     "Outliers / inferences over the collector's lookback."),
    ("edgeship_device_temperature_celsius", "gauge",
     "SoC temperature in the newest telemetry window."),
    ("edgeship_device_throttled", "gauge",
     "1 if the board is under-volted, capped, throttled or soft-limited now."),
    ("edgeship_device_resident_memory_bytes", "gauge",
     "The agent's resident memory in the newest window."),
    ("edgeship_device_memory_available_bytes", "gauge",
     "The board's MemAvailable in the newest window."),
    ("edgeship_device_spool_depth_messages", "gauge", "Messages waiting in the device's spool."),
    ("edgeship_device_spool_dropped", "counter",
     "Messages the device dropped from its full spool over its life."),
)  # fmt: skip


class _DeviceFamilies:
    """The per-device families of one scrape, by name; values None are left out."""

    def __init__(self) -> None:
        self.by_name: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for name, kind, help_text in _DEVICE_FAMILIES:
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            self.by_name[name] = cls(name, help_text, labels=_DEVICE_LABELS)
        self.latency = HistogramMetricFamily(
            "edgeship_device_inference_latency_seconds",
            "Inference latency, fixed buckets (_sum estimated from the bucket midpoints).",
            labels=_DEVICE_LABELS,
        )
        self.drift = GaugeMetricFamily(
            "edgeship_device_drift_psi",
            "PSI of recent predictions or outlier scores vs the reference or first windows.",
            labels=(*_DEVICE_LABELS, "basis", "histogram"),
        )

    def add(self, name: str, labels: Sequence[str], value: float | None) -> None:
        if value is not None:
            self.by_name[name].add_metric(labels, value)

    def families(self) -> Iterator[Metric]:
        """In the order the hand-written exposition had: histogram after the counters."""
        for name, family in self.by_name.items():
            yield family
            if name == "edgeship_device_outliers":
                yield self.latency
        yield self.drift


def _add_device(
    out: _DeviceFamilies,
    d: DeviceState,
    c: DeviceCounters | None,
    r: DriftResult | None,
) -> None:
    labels = (d.fleet, d.device, d.model or "", d.model_version or "")
    out.add("edgeship_device_up", labels, 1 if d.status == "online" else 0)
    out.add("edgeship_device_stale", labels, 1 if d.status == "stale" else 0)
    out.add("edgeship_device_last_seen_timestamp_seconds", labels, d.last_seen)
    out.add("edgeship_device_messages", labels, d.messages)
    out.add("edgeship_device_duplicates", labels, d.duplicates)
    out.add("edgeship_device_missing_messages", labels, d.gaps.missing)
    if c is not None:  # the counters' own model: the one their windows came from
        clabels = (d.fleet, d.device, c.model or "", c.model_version or "")
        out.add("edgeship_device_inferences", clabels, c.inferences)
        out.add("edgeship_device_inference_errors", clabels, c.errors)
        out.add("edgeship_device_outliers", clabels, c.outliers)
        cumulative, buckets = 0, []
        for le, count in zip(_LE, c.latency_counts, strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        out.latency.add_metric(clabels, buckets, c.latency_sum_s)
    if d.latency.p95 is not None:
        out.add("edgeship_device_latency_p95_seconds", labels, d.latency.p95 / 1000.0)
    out.add("edgeship_device_outlier_ratio", labels, d.outlier_rate)
    w = d.last_window
    if w is not None:
        out.add("edgeship_device_temperature_celsius", labels, w.temperature_c)
        if w.throttled is not None:
            out.add("edgeship_device_throttled", labels, 1 if w.throttled & 0xF else 0)
        out.add("edgeship_device_resident_memory_bytes", labels, w.rss_bytes)
        out.add("edgeship_device_memory_available_bytes", labels, w.mem_available_bytes)
        out.add("edgeship_device_spool_depth_messages", labels, w.spool_depth)
        out.add("edgeship_device_spool_dropped", labels, w.spool_dropped)
    if r is not None and r.basis is not None:
        dl = (d.fleet, d.device, r.model or "", r.model_version or "", r.basis)
        for histogram, psi in (("predictions", r.predictions_psi), ("scores", r.scores_psi)):
            if psi is not None:
                out.drift.add_metric((*dl, histogram), psi)


def _fleet_families(view: MetricsView) -> Iterator[Metric]:
    snapshot = view.snapshot
    now = snapshot.at
    live = [
        d
        for d in snapshot.devices
        if d.last_seen is not None and now - d.last_seen <= view.expire_after_s
    ]
    fleets = sorted({d.fleet for d in live})
    devices = GaugeMetricFamily(
        "edgeship_fleet_devices",
        "Devices by state (online, offline, stale, unknown).",
        labels=("fleet", "state"),
    )
    for fleet in fleets:
        for state in _STATES:
            n = sum(1 for d in live if d.fleet == fleet and d.status == state)
            devices.add_metric((fleet, state), n)
    yield devices

    per_device = _DeviceFamilies()
    counters = {(c.fleet, c.device): c for c in view.counters}
    drift = {(r.fleet, r.device): r for r in view.drift}
    for d in live:
        key = (d.fleet, d.device)
        _add_device(per_device, d, counters.get(key), drift.get(key))
    yield from per_device.families()

    deploys = CounterMetricFamily(
        "edgeship_fleet_deploys",
        "Remote deploy outcomes received since the collector started, by state.",
        labels=("fleet", "state"),
    )
    for fleet in sorted(set(fleets) | {k[0] for k in view.deploys}):
        for state in DEPLOY_STATES:
            deploys.add_metric((fleet, state), view.deploys.get((fleet, state), 0))
    yield deploys
    yield _alerts_family(fleets, view.rules, view.alerts)
    yield from _rollout_families(view.rollouts)


def _rollout_families(rollouts: Sequence[RolloutRow]) -> Iterator[Metric]:
    """Per rollout shown: its devices per state, and its state as 1 (the others 0), every
    state named so a panel can sum or filter them."""
    devices = GaugeMetricFamily(
        "edgeship_rollout_devices",
        "Devices of a staged rollout by their state in it (the newest rollouts of each fleet).",
        labels=("fleet", "rollout", "state"),
    )
    states = GaugeMetricFamily(
        "edgeship_rollout_state",
        "1 for a staged rollout's current state, 0 for the others (the newest rollouts of "
        "each fleet).",
        labels=("fleet", "rollout", "state"),
    )
    for r in sorted(rollouts, key=lambda r: (r.fleet, r.id)):
        for device_state in ROLLOUT_DEVICE_STATES:
            devices.add_metric((r.fleet, r.id, device_state), r.counts.get(device_state, 0))
        for state in ROLLOUT_STATES:
            states.add_metric((r.fleet, r.id, state), 1 if r.state == state else 0)
    yield devices
    yield states


def _alerts_family(
    fleets: Sequence[str], rules: Sequence[str], alerts: Sequence[AlertRecord]
) -> Metric:
    """Every rule has a series per fleet (``severity="none"`` at 0 when not firing), so a
    panel can sum them."""
    family = GaugeMetricFamily(
        "edgeship_alerts_firing",
        "Alerts firing now, by fleet, rule and severity.",
        labels=("fleet", "rule", "severity"),
    )
    firing: dict[tuple[str, str, str], int] = {}
    for a in alerts:
        if a.state == "firing":
            k = (a.fleet, a.rule, a.severity)
            firing[k] = firing.get(k, 0) + 1
    for fleet in sorted(set(fleets) | {k[0] for k in firing}):
        for rule in rules:
            severities = {k[2] for k in firing if k[:2] == (fleet, rule)} or {"none"}
            for sev in sorted(severities):
                family.add_metric((fleet, rule, sev), firing.get((fleet, rule, sev), 0))
    return family
