"""The fleet's state, derived from the store: who is online, offline or stale, and how each
device and the fleet are doing.

Everything here reads the store (so several collectors sharing a fleet see the same state) and
takes the time from an injectable ``clock`` (unix seconds, the collector's clock: all times
compared are receive times, never the devices' own clocks, which a Pi without an RTC may have
wrong). The pure pieces are separate so that other views (alerts, Prometheus metrics, a
dashboard) compute the same numbers:

* :func:`device_status`: ``offline`` when the newest status message is ``offline`` (the device
  said goodbye, or the broker published its Last Will); ``stale`` when no telemetry arrived for
  ``stale_windows`` of the device's telemetry windows (3 by default); ``online`` otherwise once
  the device has said ``online`` or sent telemetry; ``unknown`` before either.
* :func:`histogram_quantile`: a percentile from fixed-bucket counts (Prometheus semantics:
  linear interpolation inside the bucket), which is how latency percentiles are aggregated
  across windows and devices: the protocol's buckets are the same on every device, so counts add.
* :func:`count_gaps`: sequence numbers missing between the first and the newest stored, per
  device, restarting the count when a device's counter went back (its spool was deleted).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from collector.ingest import TelemetryRecord
from collector.store import BootRange, DeviceRow, EventRow, Store
from device_agent.contracts.messages import LATENCY_BUCKETS_MS, DeployEvent

__all__ = [
    "DeviceDetail",
    "DeviceState",
    "DeviceStatus",
    "FleetSnapshot",
    "FleetState",
    "GapCount",
    "Latency",
    "StateConfig",
    "count_gaps",
    "device_status",
    "histogram_quantile",
    "summarize_latency",
]

DeviceStatus: TypeAlias = Literal["online", "offline", "stale", "unknown"]
# A collector commits up to ~20 batches a second; the snapshot is re-read at most this often.
_MIN_READ_INTERVAL_S = 0.2
_STD_LATENCY = tuple(LATENCY_BUCKETS_MS)
_THROTTLE_FLAGS = (
    ("under_voltage", 0), ("freq_capped", 1), ("throttled", 2), ("soft_temp_limit", 3),
    ("under_voltage_occurred", 16), ("freq_capped_occurred", 17),
    ("throttled_occurred", 18), ("soft_temp_limit_occurred", 19),
)  # fmt: skip


@dataclass(frozen=True)
class StateConfig:
    """``stale_windows``: telemetry windows without a message before a device is stale
    (``default_window_s`` stands in for a device that never sent telemetry). ``lookback_s``:
    the span latency percentiles, outlier rate and recent spool drops are computed over.
    ``cache_s``: how long a fleet snapshot is reused before the store is read again."""

    stale_windows: float = 3.0
    default_window_s: float = 10.0
    lookback_s: float = 300.0
    cache_s: float = 1.0


# --- pure pieces ----------------------------------------------------------------------------


def device_status(
    row: DeviceRow, now: float, config: StateConfig = StateConfig()
) -> tuple[DeviceStatus, str]:
    """(status, a one-line reason) of a device at ``now``."""
    if row.status == "offline":
        return "offline", "the device's last status is offline (goodbye or Last Will)"
    window = row.window_s if row.window_s else config.default_window_s
    limit = config.stale_windows * window
    reference = row.last_telemetry_at
    what = "telemetry"
    if reference is None:
        if row.status != "online" or row.status_at is None:
            return "unknown", "no status and no telemetry yet"
        reference, what = row.status_at, "telemetry since it came online"
    silent = now - reference
    if silent > limit:
        return "stale", (
            f"no {what} for {silent:.1f} s "
            f"({config.stale_windows:g} windows of {window:g} s allowed)"
        )
    return "online", f"telemetry within the last {config.stale_windows:g} windows"


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q``-quantile (0..1) of values counted in buckets ``counts`` with upper ``bounds``
    (``counts`` has one more entry: values above the last bound). Interpolates linearly inside
    the bucket (from 0 for the first one); the overflow bucket answers with the last bound.
    None when there are no values."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    for i, count in enumerate(counts):
        if count and cumulative + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1]) if bounds else None
            lower = bounds[i - 1] if i > 0 else 0.0
            upper = bounds[i]
            return float(lower + (upper - lower) * max(rank - cumulative, 0.0) / count)
        cumulative += count
    return float(bounds[-1]) if bounds else None


@dataclass(frozen=True)
class Latency:
    """Latency percentiles (ms) read from summed fixed-bucket histograms of ``inferences``
    inferences; None without any."""

    p50: float | None
    p95: float | None
    p99: float | None
    inferences: int

    def to_dict(self) -> dict[str, Any]:
        return {"p50": self.p50, "p95": self.p95, "p99": self.p99, "inferences": self.inferences}


def summarize_latency(windows: Iterable[TelemetryRecord]) -> Latency:
    """Add the latency histograms of ``windows`` (those on the protocol's standard buckets;
    a window with other bounds cannot be added and is left out) and read percentiles."""
    total = [0] * (len(_STD_LATENCY) + 1)
    for w in windows:
        if w.latency_bounds == _STD_LATENCY:
            for i, c in enumerate(w.latency_counts):
                total[i] += c
    n = sum(total)
    return Latency(
        histogram_quantile(0.50, _STD_LATENCY, total),
        histogram_quantile(0.95, _STD_LATENCY, total),
        histogram_quantile(0.99, _STD_LATENCY, total),
        n,
    )


@dataclass(frozen=True)
class GapCount:
    """``missing`` sequence numbers between each counting epoch's first and newest stored
    number, summed over epochs (a new epoch starts when a new boot's numbers overlap the old
    ones: the device's spool and counter were reset). Numbers that are late, not lost, leave
    the count when they arrive."""

    missing: int
    messages: int
    first_seq: int | None
    last_seq: int | None
    epochs: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "missing": self.missing,
            "messages": self.messages,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "epochs": self.epochs,
        }


def count_gaps(ranges: Sequence[BootRange]) -> GapCount:
    """Gaps of one device from its per-boot ranges (any order)."""
    epochs: list[list[BootRange]] = []
    for r in sorted(ranges, key=lambda b: (b.first_received, b.min_seq)):
        current = epochs[-1] if epochs else None
        if current is not None and not any(
            r.min_seq <= e.max_seq and e.min_seq <= r.max_seq for e in current
        ):
            current.append(r)
        else:
            epochs.append([r])
    missing = 0
    for epoch in epochs:
        lo = min(e.min_seq for e in epoch)
        hi = max(e.max_seq for e in epoch)
        missing += max(0, hi - lo + 1 - sum(e.messages for e in epoch))
    last = epochs[-1] if epochs else []
    return GapCount(
        missing=missing,
        messages=sum(r.messages for r in ranges),
        first_seq=min((e.min_seq for e in last), default=None),
        last_seq=max((e.max_seq for e in last), default=None),
        epochs=len(epochs),
    )


# --- the state ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceState:
    """One device as the collector sees it at ``FleetSnapshot.at``."""

    fleet: str
    device: str
    status: DeviceStatus
    reason: str
    last_seen: float | None
    status_at: float | None
    last_telemetry_at: float | None
    boot: str | None
    agent_version: str | None
    model: str | None
    model_version: str | None
    runtime: str | None
    host: Mapping[str, Any]
    window_s: float | None
    messages: int
    duplicates: int
    gaps: GapCount
    latency: Latency
    inferences: int
    errors: int
    outliers: int
    outlier_rate: float | None
    last_window: TelemetryRecord | None
    spool_drops_recent: int
    deploy: DeployEvent | None = None
    deploy_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        w = self.last_window
        return {
            "fleet": self.fleet,
            "device": self.device,
            "status": self.status,
            "reason": self.reason,
            "last_seen": self.last_seen,
            "status_at": self.status_at,
            "last_telemetry_at": self.last_telemetry_at,
            "boot": self.boot,
            "agent_version": self.agent_version,
            "model": self.model,
            "model_version": self.model_version,
            "runtime": self.runtime,
            "host": dict(self.host),
            "window_s": self.window_s,
            "messages": self.messages,
            "duplicates": self.duplicates,
            "gaps": self.gaps.to_dict(),
            "latency_ms": self.latency.to_dict(),
            "inferences": self.inferences,
            "errors": self.errors,
            "outliers": self.outliers,
            "outlier_rate": self.outlier_rate,
            "last_window": None if w is None else window_dict(w),
            "temperature_c": None if w is None else w.temperature_c,
            "throttled": None if w is None else throttled_dict(w.throttled),
            "spool": {
                "depth": None if w is None else w.spool_depth,
                "dropped": None if w is None else w.spool_dropped,
                "dropped_recent": self.spool_drops_recent,
            },
            "deploy": deploy_dict(self.deploy, self.deploy_at),
        }


def deploy_dict(deploy: DeployEvent | None, received_at: float | None) -> dict[str, Any] | None:
    """A deploy outcome as the API shows it: the protocol's fields and when it was received."""
    if deploy is None:
        return None
    return {**deploy.to_dict(), "received_at": received_at}


def throttled_dict(raw: int | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    return {"raw": raw, **{name: bool(raw & 1 << bit) for name, bit in _THROTTLE_FLAGS}}


def window_dict(w: TelemetryRecord) -> dict[str, Any]:
    """One telemetry window as a chart point."""
    return {
        "seq": w.seq,
        "ts": w.ts,
        "received_at": w.received_at,
        "window_start": w.window_start,
        "window_s": w.window_s,
        "model": w.model,
        "model_version": w.model_version,
        "inferences": w.inferences,
        "errors": w.errors,
        "outliers": w.outliers,
        "p50": w.p50,
        "p95": w.p95,
        "p99": w.p99,
        "max": w.max_ms,
        "cpu_percent": w.cpu_percent,
        "system_cpu_percent": w.system_cpu_percent,
        "rss_bytes": w.rss_bytes,
        "mem_available_bytes": w.mem_available_bytes,
        "temperature_c": w.temperature_c,
        "throttled": w.throttled,
        "spool_depth": w.spool_depth,
        "spool_dropped": w.spool_dropped,
        "drops_since_last": w.drops_since_last,
        "deploy": deploy_dict(w.deploy, w.received_at),
    }


@dataclass(frozen=True)
class FleetSnapshot:
    """The whole fleet at ``at`` (``fleet`` None: every fleet in the store)."""

    at: float
    fleet: str | None
    devices: tuple[DeviceState, ...]
    latency: Latency
    inferences: int
    errors: int
    outliers: int
    dead_letters: Mapping[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        out = {"online": 0, "offline": 0, "stale": 0, "unknown": 0}
        for d in self.devices:
            out[d.status] += 1
        return out

    @property
    def outlier_rate(self) -> float | None:
        return self.outliers / self.inferences if self.inferences else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "fleet": self.fleet,
            "summary": {
                "devices": len(self.devices),
                **self.counts,
                "latency_ms": self.latency.to_dict(),
                "inferences": self.inferences,
                "errors": self.errors,
                "outliers": self.outliers,
                "outlier_rate": self.outlier_rate,
                "missing": sum(d.gaps.missing for d in self.devices),
                "duplicates": sum(d.duplicates for d in self.devices),
                "spool_dropped": sum(
                    d.last_window.spool_dropped for d in self.devices if d.last_window
                ),
                "dead_letters": dict(self.dead_letters),
            },
            "devices": [d.to_dict() for d in self.devices],
        }


@dataclass(frozen=True)
class DeviceDetail:
    """One device with its recent telemetry (oldest first) and newest events."""

    state: DeviceState
    series: tuple[TelemetryRecord, ...]
    events: tuple[EventRow, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.state.to_dict(),
            "series": [window_dict(w) for w in self.series],
            "events": [
                {
                    "kind": e.kind,
                    "seq": e.seq,
                    "ts": e.ts,
                    "received_at": e.received_at,
                    "message": dict(e.body),
                }
                for e in self.events
            ],
        }


class FleetState:
    """Fleet state read from ``store``, cached for ``config.cache_s``.

    The collector calls :meth:`invalidate` after each commit, so the next read sees it; reads
    in between reuse the snapshot (a dashboard polling every second costs one read per second).
    Thread-safe.
    """

    def __init__(
        self,
        store: Store,
        *,
        fleet: str | None = None,
        config: StateConfig = StateConfig(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: FleetSnapshot | None = None
        self._cached_at = float("-inf")
        self._dirty = True

    def invalidate(self) -> None:
        self._dirty = True

    def snapshot(self) -> FleetSnapshot:
        with self._lock:
            now = self.clock()
            age = now - self._cached_at
            if self._cached is not None and (
                age < _MIN_READ_INTERVAL_S or (not self._dirty and age < self.config.cache_s)
            ):
                return self._cached
            self._dirty = False
            snap = self._read(now)
            self._cached, self._cached_at = snap, now
            return snap

    def _read(self, now: float) -> FleetSnapshot:
        store, fleet = self.store, self.fleet
        rows = store.devices(fleet)
        since = now - self.config.lookback_s
        recent: dict[tuple[str, str], list[TelemetryRecord]] = {}
        for f in sorted({r.fleet for r in rows}):
            for w in store.telemetry(f, since=since):
                recent.setdefault((w.fleet, w.device), []).append(w)
        latest = {(w.fleet, w.device): w for w in store.latest_telemetry(fleet)}
        ranges: dict[tuple[str, str], list[BootRange]] = {}
        for b in store.boot_ranges(fleet):
            ranges.setdefault((b.fleet, b.device), []).append(b)
        devices = tuple(
            self._device(r, now, recent.get((r.fleet, r.device), []),
                         latest.get((r.fleet, r.device)), ranges.get((r.fleet, r.device), []))
            for r in rows
        )  # fmt: skip
        windows = [w for ws in recent.values() for w in ws]
        return FleetSnapshot(
            at=now,
            fleet=fleet,
            devices=devices,
            latency=summarize_latency(windows),
            inferences=sum(w.inferences for w in windows),
            errors=sum(w.errors for w in windows),
            outliers=sum(w.outliers for w in windows),
            dead_letters=store.dead_letter_counts(),
        )

    def _device(
        self,
        row: DeviceRow,
        now: float,
        recent: Sequence[TelemetryRecord],
        latest: TelemetryRecord | None,
        ranges: Sequence[BootRange],
    ) -> DeviceState:
        status, reason = device_status(row, now, self.config)
        inferences = sum(w.inferences for w in recent)
        outliers = sum(w.outliers for w in recent)
        return DeviceState(
            fleet=row.fleet,
            device=row.device,
            status=status,
            reason=reason,
            last_seen=row.last_seen,
            status_at=row.status_at,
            last_telemetry_at=row.last_telemetry_at,
            boot=row.boot,
            agent_version=row.agent_version,
            model=row.model,
            model_version=row.model_version,
            runtime=row.runtime,
            host=row.host,
            window_s=row.window_s,
            messages=row.messages,
            duplicates=row.duplicates,
            gaps=count_gaps(ranges),
            latency=summarize_latency(recent),
            inferences=inferences,
            errors=sum(w.errors for w in recent),
            outliers=outliers,
            outlier_rate=outliers / inferences if inferences else None,
            last_window=latest,
            spool_drops_recent=sum(w.drops_since_last for w in recent),
            deploy=row.deploy,
            deploy_at=row.deploy_at,
        )

    def device(
        self, device: str, *, fleet: str | None = None, series: int = 120, events: int = 20
    ) -> DeviceDetail | None:
        """One device as the fleet snapshot shows it, with its newest ``series`` telemetry
        windows and ``events`` status/outlier/reply messages; None if the snapshot has no such
        device. Raises LookupError when ``fleet`` is None and several fleets have that id.

        The state is the snapshot's (the one :meth:`snapshot` returns now, so ``/api/devices``
        and ``/api/devices/{id}`` never disagree about a device), and the windows and events are
        those the snapshot had seen (received no later than its newest telemetry and message):
        a commit that lands between the two reads shows in both views at the next refresh, not
        in one view first.
        """
        fleet = fleet or self.fleet
        snap = self.snapshot()
        matches = [
            d for d in snap.devices if d.device == device and (fleet is None or d.fleet == fleet)
        ]
        if not matches:
            return None
        if len(matches) > 1:
            raise LookupError(
                f"device {device!r} exists in fleets {[d.fleet for d in matches]}; name one"
            )
        state = matches[0]
        store = self.store
        windows: list[TelemetryRecord] = []
        if series > 0 and state.last_telemetry_at is not None:
            seen = state.last_telemetry_at
            windows = [
                w
                for w in store.telemetry(state.fleet, state.device, limit=series)
                if w.received_at <= seen
            ]
        shown_events: list[EventRow] = []
        if events > 0 and state.last_seen is not None:
            last_seen = state.last_seen
            shown_events = [
                e
                for e in store.events(state.fleet, state.device, limit=events)
                if e.received_at <= last_seen
            ]
        return DeviceDetail(state=state, series=tuple(windows), events=tuple(shown_events))
