"""Alerts: rules over the fleet's state, a firing -> resolved lifecycle, history, publication.

**Rules** (one of each; every one can be tuned or switched off in a TOML file, ``edgeship
collect --alerts alerts.toml``; without a file the defaults below apply)::

    rule          fires while                                                 default severity
    offline       the device's last status is offline (goodbye or Last Will)  critical
    stale         no telemetry for stale_windows of its windows (FleetState)  warning
    p95_latency   p95 of the newest `windows` windows > threshold_ms          warning
                  (per-model `models` table, else the bundle's p95 budget
                  when --reference named its bundle, else `threshold_ms`)
    outlier_rate  outliers / inferences of the newest `windows` windows       warning
                  > threshold (per-model `models` table)
    drift         PSI of predictions or outlier scores >= drift.significant;  warning
                  resolves below drift.moderate (see collector.drift)
    throttled     the newest window reports under-voltage, a frequency cap,   warning
                  throttling or the soft temperature limit right now
    gaps          sequence numbers went missing in the last period_s          info
                  (at least `threshold`; held for for_s = 30 s, since late
                  messages fill transient gaps)
    spool_drops   the device dropped >= threshold messages from its full      warning
                  spool in the last period_s
    deploy_failed the device's last remote deploy was rolled_back or failed   warning
                  (one alert per deploy id, its reason in the summary;
                  resolves when a later deploy of the device is not)

Telemetry rules look only at windows received in the last ``max_age_s`` (300 s): a device that
stopped sending resolves them, and ``offline``/``stale`` say why.

**Lifecycle.** One alert per (fleet, device, rule) at a time. A condition that holds for
``for_s`` seconds fires an alert with a new ``id``; while it keeps holding nothing is sent again
(de-duplication; the stored alert's value and summary are updated); when it stops holding the
alert is resolved under the same ``id``. ``deploy_failed`` is tied to the deploy: its id is
derived from the deploy's id, and a later deploy that also fails resolves it and fires a new
one (so each bad deploy alerts once, a restarted collector included). A rule that cannot be
evaluated (too few inferences, a drift baseline still being learned) leaves the alert as it is.
Both transitions are stored (:class:`AlertStore`, SQLite) and published as
:class:`~device_agent.contracts.messages.Alert` messages on ``edgeship/{fleet}/alerts``, QoS 1,
**not retained** (the protocol's rule for the topic: a retained message would show one stale
alert per fleet to every new subscriber; the current set is ``GET /api/alerts``). Firing alerts
are read back from the store at start, so a restarted collector resolves them instead of
raising them again.

TOML format (every table and key optional)::

    max_age_s = 300                # telemetry older than this does not count
    source = "collector-eu-1"      # the id alerts carry as their source

    [rules.p95_latency]
    severity = "warning"           # info | warning | critical
    for_s = 0                      # how long the condition must hold before firing
    threshold_ms = 50.0
    use_budget = true
    windows = 6
    min_inferences = 20
    models = { "digits-cnn" = 20.0 }

    [rules.gaps]
    enabled = false

    [drift]                        # collector.drift.DriftConfig
    windows = 3
    min_samples = 300
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast

from collector.drift import DriftConfig, DriftResult, Reference
from collector.errors import ConfigError, StoreError
from collector.ingest import TelemetryRecord
from collector.state import DeviceState, summarize_latency
from device_agent.contracts.messages import Alert, encode, message_topic
from device_agent.errors import ProtocolError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "RULES",
    "AlertEngine",
    "AlertRecord",
    "AlertStore",
    "AlertsConfig",
    "Condition",
    "DeviceView",
    "MqttAlertPublisher",
    "RuleConfig",
    "evaluate_rule",
    "load_alerts_config",
    "source_id",
]

log = logging.getLogger("collector.alerts")

Severity: TypeAlias = Literal["info", "warning", "critical"]
RULES: tuple[str, ...] = (
    "offline",
    "stale",
    "p95_latency",
    "outlier_rate",
    "drift",
    "throttled",
    "gaps",
    "spool_drops",
    "deploy_failed",
)
_SEVERITIES = ("info", "warning", "critical")
_COMMON_KEYS = frozenset({"enabled", "severity", "for_s"})
_RULE_KEYS: Mapping[str, frozenset[str]] = {
    "offline": _COMMON_KEYS,
    "stale": _COMMON_KEYS,
    "p95_latency": _COMMON_KEYS
    | {"threshold_ms", "use_budget", "windows", "min_inferences", "models"},
    "outlier_rate": _COMMON_KEYS | {"threshold", "windows", "min_inferences", "models"},
    "drift": _COMMON_KEYS,
    "throttled": _COMMON_KEYS,
    "gaps": _COMMON_KEYS | {"threshold", "period_s"},
    "spool_drops": _COMMON_KEYS | {"threshold", "period_s"},
    "deploy_failed": _COMMON_KEYS,
}
_SAVE_EVERY_S = 30.0
_THROTTLE_NOW = (
    (0, "under-voltage"),
    (1, "frequency capped"),
    (2, "throttled"),
    (3, "soft temperature limit"),
)


# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleConfig:
    """One rule's settings; each rule reads the fields its table in the module docstring
    names. ``threshold`` is ms for ``p95_latency`` (``threshold_ms`` in TOML), a fraction for
    ``outlier_rate``, a message count for ``gaps`` and ``spool_drops``; ``models`` maps a
    model name to its own threshold."""

    enabled: bool = True
    severity: Severity = "warning"
    for_s: float = 0.0
    threshold: float | None = None
    use_budget: bool = True
    windows: int = 6
    min_inferences: int = 0
    period_s: float = 300.0
    models: Mapping[str, float] = field(default_factory=dict)


_DEFAULT_RULES: Mapping[str, RuleConfig] = {
    "offline": RuleConfig(severity="critical"),
    "stale": RuleConfig(severity="warning"),
    "p95_latency": RuleConfig(severity="warning", windows=6, min_inferences=20),
    "outlier_rate": RuleConfig(severity="warning", threshold=0.10, windows=6, min_inferences=100),
    "drift": RuleConfig(severity="warning"),
    "throttled": RuleConfig(severity="warning"),
    "gaps": RuleConfig(severity="info", threshold=1, period_s=300.0, for_s=30.0),
    "spool_drops": RuleConfig(severity="warning", threshold=1, period_s=300.0),
    "deploy_failed": RuleConfig(severity="warning"),
}


@dataclass(frozen=True)
class AlertsConfig:
    """Every rule's settings, the drift settings, and ``max_age_s`` (telemetry older than this
    does not count for telemetry rules). ``source``: the id alerts carry (default: derived
    from the collector's MQTT client id)."""

    rules: Mapping[str, RuleConfig] = field(default_factory=lambda: dict(_DEFAULT_RULES))
    drift: DriftConfig = field(default_factory=DriftConfig)
    max_age_s: float = 300.0
    source: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.rules) - set(RULES)
        if unknown:
            raise ConfigError(f"alerts: unknown rules {sorted(unknown)}; known: {list(RULES)}")
        missing = [r for r in RULES if r not in self.rules]
        if missing:
            merged = dict(self.rules)
            merged.update({r: _DEFAULT_RULES[r] for r in missing})
            object.__setattr__(self, "rules", merged)
        if not self.max_age_s > 0:
            raise ConfigError("alerts: max_age_s must be positive")
        if self.source is not None:
            try:
                from device_agent.contracts.messages import validate_id

                validate_id(self.source, "source")
            except ProtocolError as exc:
                raise ConfigError(f"alerts: {exc}") from exc

    def rule(self, name: str) -> RuleConfig:
        return self.rules[name]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "alerts") -> AlertsConfig:
        """Build from a parsed TOML document; raises ConfigError naming the key."""
        top = set(data) - {"rules", "drift", "max_age_s", "source"}
        if top:
            raise ConfigError(
                f"{where}: unknown keys {sorted(top)}; expected rules, drift, max_age_s, source"
            )
        rules = dict(_DEFAULT_RULES)
        for name, table in _table(data.get("rules", {}), f"{where}.rules").items():
            if name not in RULES:
                raise ConfigError(f"{where}.rules.{name}: unknown rule; known: {list(RULES)}")
            rules[name] = _rule(name, _table(table, f"{where}.rules.{name}"), rules[name], where)
        drift_raw = _table(data.get("drift", {}), f"{where}.drift")
        known = {f.name: f for f in fields(DriftConfig)}
        drift_kwargs: dict[str, Any] = {}
        for key, value in drift_raw.items():
            if key not in known:
                raise ConfigError(f"{where}.drift.{key}: unknown key; known: {sorted(known)}")
            if known[key].type in ("int", int):
                drift_kwargs[key] = _int(value, f"{where}.drift.{key}")
            else:
                drift_kwargs[key] = _num(value, f"{where}.drift.{key}")
        max_age = data.get("max_age_s", 300.0)
        source = data.get("source")
        if source is not None and not isinstance(source, str):
            raise ConfigError(f"{where}.source: expected a string")
        return cls(
            rules=rules,
            drift=DriftConfig(**drift_kwargs),
            max_age_s=_num(max_age, f"{where}.max_age_s"),
            source=source,
        )


def load_alerts_config(path: str | Path | None) -> AlertsConfig:
    """The defaults, or the defaults overridden by the TOML file at ``path``."""
    if path is None:
        return AlertsConfig()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"alerts file not found: {p}") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: not a readable TOML file: {exc}") from exc
    return AlertsConfig.from_dict(data, where=p.name)


def _rule(name: str, table: Mapping[str, Any], base: RuleConfig, where: str) -> RuleConfig:
    here = f"{where}.rules.{name}"
    allowed = _RULE_KEYS[name]
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"{here}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        at = f"{here}.{key}"
        if key in ("enabled", "use_budget"):
            if not isinstance(value, bool):
                raise ConfigError(f"{at}: expected true or false")
            changes[key] = value
        elif key == "severity":
            if value not in _SEVERITIES:
                raise ConfigError(f"{at}: {value!r} is not one of {list(_SEVERITIES)}")
            changes[key] = value
        elif key in ("windows", "min_inferences"):
            changes[key] = _int(value, at, lo=1 if key == "windows" else 0)
        elif key in ("threshold", "threshold_ms"):
            changes["threshold"] = _num(value, at)
        elif key in ("for_s", "period_s"):
            changes[key] = _num(value, at)
        elif key == "models":
            changes[key] = {str(k): _num(v, f"{at}.{k}") for k, v in _table(value, at).items()}
    if name == "outlier_rate" and not 0 <= changes.get("threshold", 0.0) <= 1:
        raise ConfigError(f"{here}.threshold: an outlier rate is a fraction in [0, 1]")
    return replace(base, **changes)


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
    return value


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if value < 0:
        raise ConfigError(f"{where}: {value} is negative")
    return float(value)


def _int(value: Any, where: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{where}: expected an integer >= {lo}, got {value!r}")
    return value


# --- rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    """What the rules see of one device: its state (:class:`FleetState`), its newest telemetry
    windows of the current model (oldest first, received within ``max_age_s``), its drift
    verdict, its reference (for the p95 budget) and how many sequence numbers went missing and
    how many messages its spool dropped within each rule's ``period_s``."""

    state: DeviceState
    now: float
    windows: Sequence[TelemetryRecord] = ()
    drift: DriftResult | None = None
    reference: Reference | None = None
    new_gaps: int = 0
    spool_drops: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.state.fleet, self.state.device)


@dataclass(frozen=True)
class Condition:
    """A rule's verdict: ``active`` (the condition holds), the measured ``value`` and a
    one-line ``summary`` for a human. ``episode``, when set, names what the alert is about
    (a deploy id): the alert's id is derived from it, and another episode while one fires
    resolves that alert and fires a new one."""

    active: bool
    value: float | None
    summary: str
    episode: str | None = None


def evaluate_rule(
    name: str, rule: RuleConfig, view: DeviceView, *, drift: DriftConfig, firing: bool
) -> Condition | None:
    """The verdict of rule ``name`` on one device; None when it cannot be evaluated (the alert,
    if any, stays as it is). ``firing`` says whether its alert fires now (drift hysteresis)."""
    s = view.state
    who = s.device
    if name == "offline":
        return Condition(s.status == "offline", None, f"{who} is offline: {s.reason}")
    if name == "stale":
        return Condition(s.status == "stale", None, f"{who} is stale: {s.reason}")
    windows = list(view.windows)[-rule.windows :]
    if name == "p95_latency":
        threshold, basis = _latency_threshold(rule, view)
        if threshold is None:
            return None
        if not windows:
            return Condition(False, None, f"{who}: no recent telemetry")
        lat = summarize_latency(windows)
        if lat.p95 is None or lat.inferences < max(rule.min_inferences, 1):
            return None
        return Condition(
            lat.p95 > threshold,
            lat.p95,
            f"{who}: p95 latency {lat.p95:.3g} ms over {len(windows)} windows "
            f"({'above' if lat.p95 > threshold else 'within'} the {threshold:g} ms {basis})",
        )
    if name == "outlier_rate":
        threshold = rule.models.get(s.model or "", rule.threshold)
        if threshold is None:
            return None
        inferences = sum(w.inferences for w in windows)
        outliers = sum(w.outliers for w in windows)
        if not windows:
            return Condition(False, None, f"{who}: no recent telemetry")
        if inferences < max(rule.min_inferences, 1):
            return None
        rate = outliers / inferences
        return Condition(
            rate > threshold,
            rate,
            f"{who}: {rate:.1%} of {inferences} inferences were outliers over {len(windows)} "
            f"windows (threshold {threshold:.1%})",
        )
    if name == "drift":
        d = view.drift
        if not view.windows:
            return Condition(False, None, f"{who}: no recent telemetry")
        if d is None or d.psi is None:
            return None
        limit = drift.moderate if firing else drift.significant
        active = d.psi >= limit
        return Condition(
            active,
            d.psi,
            f"{who}: {d.reason}"
            + (f" (>= {drift.significant:g}: significant)" if d.psi >= drift.significant else ""),
        )
    if name == "throttled":
        newest = windows[-1] if windows else None
        raw = None if newest is None else newest.throttled
        if raw is None:
            return Condition(False, None, f"{who}: no throttling reported")
        now = [text for bit, text in _THROTTLE_NOW if raw & 1 << bit]
        return Condition(
            bool(now),
            float(raw),
            f"{who}: {', '.join(now)} (get_throttled {raw:#x})"
            if now
            else f"{who}: not throttled ({raw:#x})",
        )
    if name == "gaps":
        limit = rule.threshold if rule.threshold is not None else 1.0
        return Condition(
            view.new_gaps >= limit,
            float(view.new_gaps),
            f"{who}: {view.new_gaps} sequence numbers missing in the last {rule.period_s:g} s"
            + (
                f" ({view.spool_drops} messages dropped by the device's full spool)"
                if view.spool_drops
                else ""
            ),
        )
    if name == "spool_drops":
        limit = rule.threshold if rule.threshold is not None else 1.0
        return Condition(
            view.spool_drops >= limit,
            float(view.spool_drops),
            f"{who}: its spool dropped {view.spool_drops} messages in the last {rule.period_s:g} s",
        )
    if name == "deploy_failed":
        dep = s.deploy
        if dep is None:
            return Condition(False, None, f"{who}: no remote deploy reported")
        what = f"deploy {dep.id} of {dep.model or 'a model'} {dep.from_version} -> {dep.to_version}"
        if dep.state in ("rolled_back", "failed"):
            verb = "rolled back" if dep.state == "rolled_back" else "failed"
            return Condition(
                True, None, f"{who}: {what} {verb}: {dep.reason or 'no reason given'}", dep.id
            )
        return Condition(False, None, f"{who}: {what} is {dep.state}")
    raise ConfigError(f"unknown rule {name!r}")


def _latency_threshold(rule: RuleConfig, view: DeviceView) -> tuple[float | None, str]:
    model = view.state.model or ""
    if model in rule.models:
        return rule.models[model], f"threshold for {model}"
    ref = view.reference
    if rule.use_budget and ref is not None and ref.p95_budget_ms is not None:
        return ref.p95_budget_ms, f"p95 budget of {ref.model}@{ref.version}"
    return rule.threshold, "threshold"


# --- history --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertRecord:
    """One alert as stored and served. ``state`` is ``firing`` or ``resolved``; ``started_at``
    is when it fired, ``updated_at`` the last evaluation that changed its value or summary."""

    id: str
    fleet: str
    device: str | None
    rule: str
    severity: Severity
    state: Literal["firing", "resolved"]
    summary: str
    value: float | None
    started_at: float
    updated_at: float
    resolved_at: float | None
    source: str

    def message(self, ts: float) -> Alert:
        """The wire message for this alert's current state."""
        return Alert(
            id=self.id,
            source=self.source,
            ts=ts,
            rule=self.rule,
            severity=self.severity,
            state=self.state,
            summary=self.summary[:4096],
            device=self.device,
            value=self.value if self.value is None or math.isfinite(self.value) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "fleet": self.fleet,
            "device": self.device,
            "rule": self.rule,
            "severity": self.severity,
            "state": self.state,
            "summary": self.summary,
            "value": self.value,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "resolved_at": self.resolved_at,
            "source": self.source,
        }


_ALERT_COLUMNS = (
    "id, fleet, device, rule, severity, state, summary, value, started_at, updated_at, "
    "resolved_at, source"
)


class AlertStore:
    """Alert history in SQLite (``path``, or ``":memory:"``): one row per alert id, updated
    from firing to resolved. Thread-safe. The collector's main store (``collector.store``)
    keeps what devices sent; this one keeps what the collector concluded."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS alerts (id TEXT PRIMARY KEY, fleet TEXT NOT NULL, "
                "device TEXT, rule TEXT NOT NULL, severity TEXT NOT NULL, state TEXT NOT NULL, "
                "summary TEXT NOT NULL, value REAL, started_at REAL NOT NULL, "
                "updated_at REAL NOT NULL, resolved_at REAL, source TEXT NOT NULL)"
            )
            self._db.execute(
                "CREATE INDEX IF NOT EXISTS alerts_state ON alerts (state, started_at)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the alert history {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def save(self, record: AlertRecord) -> None:
        row = (
            record.id, record.fleet, record.device, record.rule, record.severity, record.state,
            record.summary, record.value, record.started_at, record.updated_at,
            record.resolved_at, record.source,
        )  # fmt: skip
        with self._lock:
            try:
                self._db.execute(
                    f"INSERT OR REPLACE INTO alerts ({_ALERT_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write the alert history {self.path}: {exc}") from exc

    def firing(self) -> list[AlertRecord]:
        return self._select("WHERE state = 'firing' ORDER BY started_at DESC", ())

    def recent(self, limit: int = 100, state: str | None = None) -> list[AlertRecord]:
        """The newest alerts by the time they fired (or resolved), newest first."""
        if state is None:
            return self._select("ORDER BY COALESCE(resolved_at, started_at) DESC LIMIT ?", (limit,))
        return self._select(
            "WHERE state = ? ORDER BY COALESCE(resolved_at, started_at) DESC LIMIT ?",
            (state, limit),
        )

    def _select(self, where: str, params: tuple[Any, ...]) -> list[AlertRecord]:
        with self._lock:
            try:
                rows = self._db.execute(f"SELECT {_ALERT_COLUMNS} FROM alerts {where}", params)
                return [_record(r) for r in rows.fetchall()]
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the alert history {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(r: Sequence[Any]) -> AlertRecord:
    return AlertRecord(
        id=r[0],
        fleet=r[1],
        device=r[2],
        rule=r[3],
        severity=cast(Severity, r[4]),
        state=cast(Literal["firing", "resolved"], r[5]),
        summary=r[6],
        value=r[7],
        started_at=r[8],
        updated_at=r[9],
        resolved_at=r[10],
        source=r[11],
    )


# --- the engine -----------------------------------------------------------------------------

Publish: TypeAlias = Callable[[str, Alert], None]


def source_id(text: str) -> str:
    """A valid protocol id (``[A-Za-z0-9_.-]{1,64}``) made from ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:64] or "collector"


class AlertEngine:
    """Turns rule verdicts into alerts: de-duplicated, stored, published.

    ``publish(fleet, alert)`` sends one Alert message (None: store only). A publish failure is
    logged and the alert stays stored; the API still shows it. Thread-safe.
    """

    def __init__(
        self,
        config: AlertsConfig,
        store: AlertStore,
        *,
        source: str,
        publish: Publish | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.source = source_id(config.source or source)
        self._publish = publish
        self._clock = clock
        self._lock = threading.Lock()
        self._firing: dict[tuple[str, str | None, str], AlertRecord] = {}
        self._pending: dict[tuple[str, str | None, str], float] = {}
        self._saved: dict[tuple[str, str | None, str], float] = {}
        self._serial = itertools.count()
        self.published = 0
        self.publish_errors = 0
        for record in store.firing():
            self._firing[(record.fleet, record.device, record.rule)] = record

    def evaluate(self, views: Sequence[DeviceView]) -> list[AlertRecord]:
        """Evaluate every enabled rule on every view; returns the alerts that changed state."""
        now = self._clock()
        changes: list[AlertRecord] = []
        with self._lock:
            for view in views:
                for name in RULES:
                    rule = self.config.rules[name]
                    key = (view.state.fleet, view.state.device, name)
                    current = self._firing.get(key)
                    if not rule.enabled:
                        if current is not None:
                            changes.append(self._resolve(key, current, now, "rule disabled"))
                        continue
                    cond = evaluate_rule(
                        name, rule, view, drift=self.config.drift, firing=current is not None
                    )
                    if cond is None:
                        continue
                    changes.extend(self._apply(key, rule, cond, current, now))
        for record in changes:
            self._send(record, now)
        return changes

    def firing(self) -> list[AlertRecord]:
        with self._lock:
            return sorted(self._firing.values(), key=lambda r: r.started_at, reverse=True)

    def _apply(
        self,
        key: tuple[str, str | None, str],
        rule: RuleConfig,
        cond: Condition,
        current: AlertRecord | None,
        now: float,
    ) -> list[AlertRecord]:
        if not cond.active:
            self._pending.pop(key, None)
            if current is not None:
                return [self._resolve(key, current, now, cond.summary, cond.value)]
            return []
        episode_id = None if cond.episode is None else self._episode_id(key, cond.episode)
        if current is not None and episode_id is not None and current.id != episode_id:
            superseded = self._resolve(key, current, now, f"superseded: {cond.summary}")
            return [superseded, *self._apply(key, rule, cond, None, now)]
        if current is not None:
            if (current.value, current.summary) != (cond.value, cond.summary):
                # The API shows the newest value at once; the history is written at most every
                # _SAVE_EVERY_S per alert (a stale device's "silent for N s" changes each tick).
                updated = replace(current, value=cond.value, summary=cond.summary, updated_at=now)
                self._firing[key] = updated
                if now - self._saved.get(key, current.updated_at) >= _SAVE_EVERY_S:
                    self.store.save(updated)
                    self._saved[key] = now
            return []
        since = self._pending.setdefault(key, now)
        if now - since < rule.for_s:
            return []
        self._pending.pop(key, None)
        fleet, device, name = key
        if episode_id is None:
            digest = hashlib.sha256(
                f"{self.source}/{fleet}/{device}/{name}/{now!r}/{next(self._serial)}".encode()
            ).hexdigest()[:16]
            episode_id = f"{name}-{digest}"
        record = AlertRecord(
            id=episode_id,
            fleet=fleet,
            device=device,
            rule=name,
            severity=rule.severity,
            state="firing",
            summary=cond.summary,
            value=cond.value,
            started_at=now,
            updated_at=now,
            resolved_at=None,
            source=self.source,
        )
        self._firing[key] = record
        self.store.save(record)
        log.warning("alert %s firing: %s", record.id, record.summary)
        return [record]

    def _episode_id(self, key: tuple[str, str | None, str], episode: str) -> str:
        """The alert id of one episode (a deploy): the same in every round and after a
        restart (whatever the collector's client id), so the episode alerts once."""
        fleet, device, name = key
        digest = hashlib.sha256(f"{fleet}/{device}/{name}/{episode}".encode())
        return f"{name}-{digest.hexdigest()[:16]}"

    def _resolve(
        self,
        key: tuple[str, str | None, str],
        current: AlertRecord,
        now: float,
        summary: str,
        value: float | None = None,
    ) -> AlertRecord:
        del self._firing[key]
        self._saved.pop(key, None)
        record = replace(
            current,
            state="resolved",
            summary=summary,
            value=value if value is not None else current.value,
            updated_at=now,
            resolved_at=now,
        )
        self.store.save(record)
        log.info("alert %s resolved: %s", record.id, summary)
        return record

    def _send(self, record: AlertRecord, now: float) -> None:
        if self._publish is None:
            return
        try:
            self._publish(record.fleet, record.message(now))
            self.published += 1
        except Exception as exc:  # the alert is stored; a broker problem must not stop alerting
            self.publish_errors += 1
            log.warning("could not publish alert %s: %s", record.id, exc)


# --- publication ----------------------------------------------------------------------------


class MqttAlertPublisher:
    """Publishes Alert messages with its own MQTT connection (QoS 1, not retained). paho keeps
    QoS 1 messages sent while the connection is down and delivers them on reconnect."""

    def __init__(
        self,
        broker_url: str,
        client_id: str,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        keepalive_s: int = 30,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        from collector.service import parse_broker_url

        broker = parse_broker_url(broker_url)
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id[:64],
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        if broker.username is not None:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            self._client.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file)
        self._client.reconnect_delay_set(1, 30)
        self._client.connect_async(broker.host, broker.port, keepalive_s)
        self._client.loop_start()

    def __call__(self, fleet: str, alert: Alert) -> None:
        self._client.publish(message_topic(fleet, alert), encode(alert), qos=1, retain=False)

    def close(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self._client.want_write() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._client.disconnect()
        self._client.loop_stop()
