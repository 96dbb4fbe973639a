"""The collector's watcher: drift, alerts and Prometheus metrics over what the collector stores.

A :class:`Monitor` runs beside a :class:`~collector.service.Collector` (same process, its
own thread and its own store connection) and never touches the ingest path::

    store ──(new telemetry windows, every interval_s)──► DriftMonitor, per-device counters
    FleetState.snapshot() ─────────────────────────────► AlertEngine ──► AlertStore, MQTT alerts
                                                          │
    GET /metrics, /api/alerts, /api/drift, /, /devices/x ◄┘  (served by collector.app)

Every ``interval_s`` (1 s) it reads the telemetry windows committed since the last read (by
receive time, re-reading the last ``slack_s`` seconds so a batch committed late is not missed,
de-duplicated by ``(fleet, device, boot, seq)``) and evaluates every rule on every device, so
an alert follows the window that triggers it by about a second, and ``offline`` / ``stale``
are noticed without any new message. At start it reads the last ``max_age_s`` (300 s) of
telemetry, so rules that look at recent windows work at once.

The monitor knows nothing of HTTP: :func:`collector.app.create_app` takes it and serves
its routes (:mod:`collector.web`). A monitor made with
:meth:`Monitor.for_collector` hands itself to the collector's HTTP server on :meth:`start`
(``attach_monitor``) and takes itself back on :meth:`stop`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from collector.alerts import (
    ROLLOUT_RULE,
    RULES,
    AlertEngine,
    AlertHistory,
    AlertsConfig,
    AlertStore,
    DeviceView,
    MqttAlertPublisher,
    Publish,
    rollout_alert_id,
)
from collector.drift import DriftMonitor, ReferenceSet
from collector.errors import ConfigError
from collector.ingest import TelemetryRecord
from collector.leader import Leadership, SoleLeader, leadership_for
from collector.metrics import (
    ROLLOUT_SERIES_PER_FLEET,
    DeviceCounters,
    MetricsView,
    exposition,
    make_registry,
)
from collector.state import DeviceState, FleetState
from collector.store import RolloutRow, Store
from device_agent.errors import EdgeshipError

if TYPE_CHECKING:
    from collector.service import Collector, CollectorStats

__all__ = ["LeaderHost", "Monitor", "MonitorConfig", "MonitorHost", "default_alerts_db"]

log = logging.getLogger("collector.monitor")

_RECENT_WINDOWS = 64


@dataclass(frozen=True)
class MonitorConfig:
    """``alerts``: the rules (``load_alerts_config``); ``references``: ``--reference`` specs
    (see :func:`collector.drift.load_reference_spec`); ``alerts_db``: the alert history's
    SQLite file (None: next to a SQLite store, the store's ``edgeship_alerts`` table for
    PostgreSQL);
    ``interval_s``: how often new telemetry is read and rules evaluated (the evaluation
    period; also how often a collector that does not lead tries to take the lead);
    ``expire_after_s``: a device silent that long has no metrics any more; ``publish``: send
    alerts over MQTT."""

    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    references: tuple[str, ...] = ()
    alerts_db: str | None = None
    interval_s: float = 1.0
    expire_after_s: float = 3600.0
    publish: bool = True
    slack_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.interval_s <= 60:
            raise ConfigError("monitor: interval_s must be in (0, 60]")
        if not self.expire_after_s > 0 or self.slack_s < 0:
            raise ConfigError("monitor: expire_after_s must be positive, slack_s >= 0")


def default_alerts_db(store_url: str) -> str:
    """``sqlite:///fleet.db`` (or a bare path) -> ``fleet.alerts.db`` beside it; a PostgreSQL
    store -> ``:memory:`` (:meth:`Monitor.for_collector` keeps a PostgreSQL store's history in
    the store's ``edgeship_alerts`` table instead, unless ``alerts_db`` names a file)."""
    if store_url.startswith("sqlite:///"):
        path = store_url[len("sqlite:///") :].split("?", 1)[0]
    elif "://" not in store_url:
        path = store_url  # open_store reads a bare path as a SQLite file
    else:
        return ":memory:"
    if not path or path == ":memory:":
        return ":memory:"
    p = Path(path)
    return str(p.with_name(p.stem + ".alerts.db"))


class MonitorHost(Protocol):
    """Where a started monitor is served (:class:`collector.http_server.ApiServer`)."""

    def attach_monitor(self, monitor: Monitor | None) -> None:
        """Serve ``monitor``'s routes from now on (None: stop serving them)."""
        ...


class LeaderHost(Protocol):
    """Who shows the monitor's leadership (:class:`collector.service.Collector`'s health)."""

    def attach_leadership(self, leadership: Leadership | None) -> None: ...


@dataclass
class _Track:
    """What the monitor keeps per device between ticks."""

    model: str | None
    version: str | None
    windows: deque[TelemetryRecord] = field(default_factory=lambda: deque(maxlen=_RECENT_WINDOWS))
    drops: deque[tuple[float, int]] = field(default_factory=deque)
    missing: deque[tuple[float, int]] = field(default_factory=deque)
    seen: int = 0


class Monitor:
    """Drift, alerts and metrics for one collector. :meth:`start` runs it on a thread;
    :meth:`tick` does one round (tests call it directly with a fake clock).

    Every monitor reads the telemetry and keeps its counters and drift verdicts, but only the
    fleet's leader (``leader``, :mod:`collector.leader`; alone, always) evaluates the rules,
    publishes alerts and exports the fleet's series: so a collector that takes the lead has
    counted everything already and knows the firing alerts from the shared history."""

    def __init__(
        self,
        state: FleetState,
        store: Store,
        config: MonitorConfig = MonitorConfig(),
        *,
        references: ReferenceSet | None = None,
        publish: Publish | None = None,
        stats: Callable[[], CollectorStats] | None = None,
        source: str = "collector",
        clock: Callable[[], float] = time.time,
        close: Sequence[Callable[[], None]] = (),
        host: MonitorHost | None = None,
        leader: Leadership | None = None,
        alert_history: AlertHistory | None = None,
        leader_host: LeaderHost | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.config = config
        self.references = (
            references if references is not None else ReferenceSet.from_specs(config.references)
        )
        self.drift = DriftMonitor(config.alerts.drift, self.references)
        self.leader = leader if leader is not None else SoleLeader(clock)
        self.source = source
        self.alert_store: AlertHistory = (
            alert_history
            if alert_history is not None
            else AlertStore(config.alerts_db or ":memory:")
        )
        self.engine = AlertEngine(
            config.alerts, self.alert_store, source=source, publish=publish, clock=clock
        )
        self._stats = stats
        self._clock = clock
        self._close = list(close)
        self._host = host
        self._leader_host = leader_host
        self.registry = make_registry(self.metrics_view)
        self._lock = threading.Lock()
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._counters: dict[tuple[str, str], DeviceCounters] = {}
        self._cursor: dict[str, float] = {}
        self._seen: dict[tuple[str, str, str, int], float] = {}
        # per device, the (deploy id, state) last counted; per (fleet, state), how many
        self._deploy_seen: dict[tuple[str, str], tuple[str, str]] = {}
        self._deploy_counts: dict[tuple[str, str], int] = {}
        self._started_at = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.errors = 0
        self.last_error: str | None = None

    @classmethod
    def for_collector(
        cls,
        collector: Collector,
        config: MonitorConfig = MonitorConfig(),
        *,
        references: ReferenceSet | None = None,
    ) -> Monitor:
        """A monitor for a started collector: its own store connection, alerts published to
        the collector's broker under the client id ``{collector id}-alerts``. ``references``
        (already loaded) replaces ``config.references``."""
        from collector.alert_history import SharedAlertStore
        from collector.store import PostgresStore, open_store

        cfg = collector.config
        if references is None:
            references = ReferenceSet.from_specs(config.references)
        store = open_store(cfg.store_url, migrate=False)
        history = None
        if config.alerts_db is None and isinstance(store, PostgresStore):
            history = SharedAlertStore(store, cfg.fleet)  # the fleet's collectors share it
        elif config.alerts_db is None:
            from dataclasses import replace

            config = replace(config, alerts_db=default_alerts_db(cfg.store_url))
        closers: list[Callable[[], None]] = [store.close]
        publisher = None
        if config.publish:
            publisher = MqttAlertPublisher(
                cfg.broker_url,
                f"{cfg.session_id[:57]}-alerts",
                ca_file=cfg.ca_file,
                cert_file=cfg.cert_file,
                key_file=cfg.key_file,
            )
            closers.insert(0, publisher.close)
        return cls(
            collector.state,
            store,
            config,
            references=references,
            publish=publisher,
            stats=lambda: collector.stats,
            source=cfg.session_id,
            close=closers,
            host=collector.http_server,
            leader=leadership_for(cfg.store_url, cfg.fleet),
            alert_history=history,
            leader_host=collector,
        )

    # --- lifecycle ---

    def start(self) -> Monitor:
        """Start the thread, and be served by the host's HTTP API (if it has one)."""
        if self._host is not None:
            self._host.attach_monitor(self)
        if self._leader_host is not None:
            self._leader_host.attach_leadership(self.leader)
        self._thread = threading.Thread(target=self._run, name="edgeship-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._host is not None:  # its routes read the stores closed below
            self._host.attach_monitor(None)
        if self._leader_host is not None:
            self._leader_host.attach_leadership(None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)
        self.leader.close()  # another collector may lead from its next round on
        for close in self._close:
            try:
                close()
            except Exception:  # closing a connection that is already broken
                log.debug("monitor: close failed", exc_info=True)
        self.alert_store.close()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except EdgeshipError as exc:
                self._note(f"{type(exc).__name__}: {exc}")
                log.warning("monitor: %s (retrying)", exc)
            except Exception as exc:  # a bug: keep the collector running, count and show it
                self._note(f"{type(exc).__name__}: {exc}")
                log.exception("monitor: tick failed")
            self._stop.wait(self.config.interval_s)

    def _note(self, message: str) -> None:
        self.errors += 1
        self.last_error = message

    # --- one round ---

    def tick(self) -> None:
        """Keep or try to take the lead, read new telemetry, update drift and counters, and
        (leading) evaluate every rule."""
        self.engine.lead(self.leader.check())
        now = self._clock()
        snap = self.state.snapshot()
        fleets = {d.fleet for d in snap.devices}
        if self.state.fleet is not None:
            fleets.add(self.state.fleet)
        new: list[TelemetryRecord] = []
        for fleet in sorted(fleets):
            new.extend(self._poll(fleet, now))
        new.sort(key=lambda w: (w.received_at, w.seq))
        with self._lock:
            for w in new:
                self._observe(w)
            views = [self._view(d, now) for d in snap.devices]
            self._count_deploys(snap.devices)
        rollouts, gone = self._rollouts_to_judge()
        self.engine.evaluate(views, rollouts, gone)
        self._expire(snap.devices, now)
        self.ticks += 1

    def _rollouts_to_judge(self) -> tuple[list[RolloutRow], list[str]]:
        """What ``rollout_halted`` judges (only while leading, the rule on): every halted
        rollout, and the rollout of each firing alert that is not halted any more, to resolve
        it (read whole only on those rounds); and the alerts whose rollout the store no longer
        holds."""
        if not self.engine.leading or not self.config.alerts.rules[ROLLOUT_RULE].enabled:
            return [], []
        fleet = self.state.fleet
        judged = self.store.rollouts(fleet, limit=None, state="halted")
        halted = {rollout_alert_id(r.fleet, r.id) for r in judged}
        waiting = {a.id for a in self.engine.rollout_alerts()} - halted
        if not waiting:
            return judged, []
        every = {rollout_alert_id(r.fleet, r.id): r for r in self.store.rollouts(fleet, limit=None)}
        judged += [every[i] for i in sorted(waiting) if i in every]
        return judged, sorted(waiting - set(every))

    def _poll(self, fleet: str, now: float) -> list[TelemetryRecord]:
        slack = self.config.slack_s
        cursor = self._cursor.get(fleet)
        if cursor is None:
            cursor = now - self.config.alerts.max_age_s
        rows = self.store.telemetry(fleet, since=cursor - slack)
        out = []
        for w in rows:
            if w.key in self._seen:
                continue
            self._seen[w.key] = w.received_at
            out.append(w)
            cursor = max(cursor, w.received_at)
        self._cursor[fleet] = cursor
        horizon = min(self._cursor.values()) - slack - 1.0
        if len(self._seen) > 1024 or out:
            self._seen = {k: t for k, t in self._seen.items() if t >= horizon}
        return out

    def _observe(self, w: TelemetryRecord) -> None:
        key = (w.fleet, w.device)
        track = self._tracks.get(key)
        if track is None or (track.model, track.version) != (w.model, w.model_version):
            old = track
            track = _Track(w.model, w.model_version)
            if old is not None:  # gap and drop history are the device's, not the model's
                track.drops, track.missing, track.seen = old.drops, old.missing, old.seen
            self._tracks[key] = track
        track.windows.append(w)
        track.seen += 1
        if w.drops_since_last:
            track.drops.append((w.received_at, w.drops_since_last))
        counters = self._counters.get(key)
        if counters is None or (counters.model, counters.model_version) != (
            w.model,
            w.model_version,
        ):
            counters = DeviceCounters(w.fleet, w.device, w.model, w.model_version)
            self._counters[key] = counters
        counters.add(w)
        self.drift.observe(w)

    def _count_deploys(self, devices: Sequence[DeviceState]) -> None:
        """Count each device's last deploy outcome once per (deploy id, state), if it was
        received since the monitor started (one already stored before is not counted again)."""
        for d in devices:
            dep = d.deploy
            if dep is None or d.deploy_at is None or d.deploy_at < self._started_at:
                continue
            key, seen = (d.fleet, d.device), (dep.id, dep.state)
            if self._deploy_seen.get(key) != seen:
                self._deploy_seen[key] = seen
                k = (d.fleet, dep.state)
                self._deploy_counts[k] = self._deploy_counts.get(k, 0) + 1

    def _view(self, d: DeviceState, now: float) -> DeviceView:
        cfg = self.config.alerts
        key = (d.fleet, d.device)
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track(d.model, d.model_version)
        oldest = now - cfg.max_age_s
        windows = [w for w in track.windows if w.received_at >= oldest]
        gap_period = cfg.rules["gaps"].period_s
        missing = track.missing
        if not missing or missing[-1][1] != d.gaps.missing:
            missing.append((now, d.gaps.missing))
        while len(missing) > 1 and missing[1][0] <= now - gap_period:
            missing.popleft()
        new_gaps = max(0, missing[-1][1] - min(v for _, v in missing))
        drop_period = cfg.rules["spool_drops"].period_s
        while track.drops and track.drops[0][0] < now - max(drop_period, gap_period):
            track.drops.popleft()
        drops = sum(n for t, n in track.drops if t >= now - drop_period)
        return DeviceView(
            state=d,
            now=now,
            windows=windows,
            drift=self.drift.result(d.fleet, d.device),
            reference=self.references.lookup(d.model, d.model_version),
            new_gaps=new_gaps,
            spool_drops=drops,
        )

    def _expire(self, devices: Sequence[DeviceState], now: float) -> None:
        limit = now - self.config.expire_after_s
        gone = [
            (d.fleet, d.device)
            for d in devices
            if d.last_seen is not None
            and d.last_seen < limit
            and (d.fleet, d.device) in self._tracks
        ]
        with self._lock:
            for key in gone:
                self._tracks.pop(key, None)
                self._counters.pop(key, None)
                self.drift.forget(*key)

    # --- views for the API ---

    def windows_seen(self, fleet: str, device: str) -> int:
        """How many telemetry windows of the device the monitor has read (tests wait on it)."""
        with self._lock:
            track = self._tracks.get((fleet, device))
            return 0 if track is None else track.seen

    def metrics_view(self) -> MetricsView:
        """What ``/metrics`` shows now (read by :attr:`registry` at every scrape)."""
        with self._lock:
            counters = list(self._counters.values())
            deploys = dict(self._deploy_counts)
        leader = self.leader.is_leader
        rollouts = (
            self.store.rollouts(self.state.fleet, limit=None, per_fleet=ROLLOUT_SERIES_PER_FLEET)
            if leader
            else []
        )
        return MetricsView(
            self.state.snapshot(),
            stats=self._stats() if self._stats is not None else None,
            counters=counters,
            deploys=deploys,
            rollouts=rollouts,
            drift=self.drift.results(),
            alerts=self.engine.firing(),
            rules=tuple(RULES),
            expire_after_s=self.config.expire_after_s,
            monitor_errors=self.errors,
            alerts_published=self.engine.published,
            leader=leader,
            collector=self.source,
        )

    def metrics_text(self) -> str:
        """The Prometheus text exposition of :attr:`registry`."""
        return exposition(self.registry).decode()

    def alerts_dict(self, *, state: str | None = None, limit: int = 100) -> dict[str, Any]:
        firing = [a.to_dict() for a in self.engine.firing()]
        recent = [a.to_dict() for a in self.alert_store.recent(limit, state)]
        return {
            "source": self.engine.source,
            "rules": list(RULES),
            "firing": firing,
            "recent": recent,
        }

    def drift_dict(self) -> dict[str, Any]:
        cfg = self.config.alerts.drift
        return {
            "config": {
                "windows": cfg.windows,
                "min_samples": cfg.min_samples,
                "max_windows": cfg.max_windows,
                "baseline_windows": cfg.baseline_windows,
                "baseline_samples": cfg.baseline_samples,
                "epsilon": cfg.epsilon,
                "moderate": cfg.moderate,
                "significant": cfg.significant,
            },
            "references": [r.to_dict() for r in self.references],
            "devices": [r.to_dict() for r in self.drift.results()],
        }

    def health(self) -> Mapping[str, Any]:
        return {
            "ticks": self.ticks,
            "errors": self.errors,
            "last_error": self.last_error,
            "alerts_published": self.engine.published,
            "alert_publish_errors": self.engine.publish_errors,
            "firing": len(self.engine.firing()),
            "alerts_db": self.alert_store.path,
            "leader": self.leader.to_dict(),
        }
