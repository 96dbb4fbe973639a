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
    rollout_halted
                  a staged rollout's newest stored state is halted            critical
                  (fleet-level, no device; one alert per rollout, value =
                  its devices rolled back, failed or reverted, its reason
                  in the summary; resolves when a later state is running,
                  done or aborted)

Telemetry rules look only at windows received in the last ``max_age_s`` (300 s): a device that
stopped sending resolves them, and ``offline``/``stale`` say why.

**Lifecycle.** One alert per (fleet, device, rule) at a time (per (fleet, rollout) for
``rollout_halted``). A condition that holds for ``for_s`` seconds fires an alert with a new
``id``; while it keeps holding nothing is sent again (de-duplication; the stored alert's value
and summary are updated); when it stops holding the alert is resolved under the same ``id``.
``deploy_failed`` is tied to the deploy: its id is derived from the deploy's id, and a later
deploy that also fails resolves it and fires a new one (so each bad deploy alerts once, a
restarted collector included); ``rollout_halted``'s id is derived from the rollout's
(:func:`rollout_alert_id`) likewise. A rule that cannot be
evaluated (too few inferences, a drift baseline still being learned) leaves the alert as it is.
Both transitions are stored (:mod:`~collector.alert_history`: a SQLite file, or the PostgreSQL
store's ``edgeship_alerts`` table shared by the fleet's collectors) and published as
:class:`~device_agent.contracts.messages.Alert` messages on ``edgeship/{fleet}/alerts``, QoS 1,
**not retained** (the protocol's rule for the topic: a retained message would show one stale
alert per fleet to every new subscriber; the current set is ``GET /api/alerts``). Firing alerts
are read back from the store at start, so a restarted collector resolves them instead of
raising them again. Of several collectors sharing a fleet only the leader evaluates
(:mod:`~collector.leader`, :meth:`AlertEngine.lead`).

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
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeAlias

from collector.alert_config import (
    DEVICE_RULES,
    RULES,
    AlertsConfig,
    RuleConfig,
    load_alerts_config,
)
from collector.alert_history import AlertHistory, AlertRecord, AlertStore
from collector.alert_rules import Condition, DeviceView, evaluate_rule, rollout_halted
from collector.errors import StoreError
from collector.store import RolloutRow
from device_agent.contracts.broker import BrokerUrl
from device_agent.contracts.messages import Alert, encode, message_topic

__all__ = [
    "ROLLOUT_RULE",
    "RULES",
    "AlertEngine",
    "AlertHistory",
    "AlertRecord",
    "AlertStore",
    "AlertsConfig",
    "Condition",
    "DeviceView",
    "MqttAlertPublisher",
    "RuleConfig",
    "evaluate_rule",
    "load_alerts_config",
    "rollout_alert_id",
    "source_id",
]

log = logging.getLogger("collector.alerts")

_SAVE_EVERY_S = 30.0

# --- the engine -----------------------------------------------------------------------------

Publish: TypeAlias = Callable[[str, Alert], None]
# (fleet, device, rule, subject): one alert at a time per key. ``subject`` is "" for a device
# rule; for a fleet-level rule (no device) it is the alert's id, which names what the alert is
# about (a rollout) and is derived from it (rollout_alert_id), so a key is also rebuilt from a
# stored alert.
_Key: TypeAlias = tuple[str, str | None, str, str]
ROLLOUT_RULE = "rollout_halted"


def source_id(text: str) -> str:
    """A valid protocol id (``[A-Za-z0-9_.-]{1,64}``) made from ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:64] or "collector"


def episode_id(fleet: str, device: str | None, rule: str, episode: str) -> str:
    """The alert id of one episode (a deploy, a rollout): the same in every round and after a
    restart (whatever the collector's client id), so the episode alerts once."""
    digest = hashlib.sha256(f"{fleet}/{device}/{rule}/{episode}".encode())
    return f"{rule}-{digest.hexdigest()[:16]}"


def rollout_alert_id(fleet: str, rollout_id: str) -> str:
    """The id of the ``rollout_halted`` alert of one rollout."""
    return episode_id(fleet, None, ROLLOUT_RULE, rollout_id)


def _key_of(record: AlertRecord) -> _Key:
    subject = record.id if record.device is None else ""
    return (record.fleet, record.device, record.rule, subject)


class AlertEngine:
    """Turns rule verdicts into alerts: de-duplicated, stored, published.

    ``publish(fleet, alert)`` sends one Alert message (None: store only). A publish failure is
    logged and the alert stays stored; the API still shows it. Thread-safe.

    An engine that does not lead its fleet (:meth:`lead` False: another collector evaluates
    the rules) evaluates nothing and shows the shared history's firing alerts; when it takes
    the lead it reads them back and goes on from there, so nothing already firing fires again.
    """

    def __init__(
        self,
        config: AlertsConfig,
        store: AlertHistory,
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
        self._firing: dict[_Key, AlertRecord] = {}
        self._pending: dict[_Key, float] = {}
        self._saved: dict[_Key, float] = {}
        self._serial = itertools.count()
        self.published = 0
        self.publish_errors = 0
        self.leading = True
        self._reload()

    def _reload(self) -> None:
        self._firing = {_key_of(r): r for r in self.store.firing()}
        self._pending.clear()
        self._saved.clear()

    def lead(self, leading: bool) -> None:
        """Evaluate (True) or leave it to the fleet's leader (False); taking the lead reads
        the firing alerts back from the history, as a restart does."""
        with self._lock:
            if leading and not self.leading:
                self._reload()
            self.leading = leading

    def evaluate(
        self,
        views: Sequence[DeviceView],
        rollouts: Sequence[RolloutRow] = (),
        rollouts_gone: Sequence[str] = (),
    ) -> list[AlertRecord]:
        """Evaluate every enabled device rule on every view, and ``rollout_halted`` on every
        rollout; returns the alerts that changed state (nothing while another collector
        leads). ``rollouts`` must hold every halted rollout and the rollout of every firing
        ``rollout_halted`` alert (:meth:`rollout_alerts`); ``rollouts_gone`` names such alerts
        whose rollout the store no longer holds: they are resolved.

        A change is stored before it counts: when the history cannot store it (StoreError)
        the alert stays as it was, so the next round tries the change again; the other
        alerts go on, the changes that were stored are published, and then the first
        error is raised (the monitor counts it)."""
        now = self._clock()
        changes: list[AlertRecord] = []
        failed: StoreError | None = None
        with self._lock:
            if not self.leading:
                return []
            for view in views:
                for name in DEVICE_RULES:
                    try:
                        self._evaluate_rule(view, name, now, changes)
                    except StoreError as exc:
                        failed = failed or exc
            try:
                self._evaluate_rollouts(rollouts, rollouts_gone, now, changes)
            except StoreError as exc:
                failed = failed or exc
        for record in changes:
            self._send(record, now)
        if failed is not None:
            raise failed
        return changes

    def _evaluate_rule(
        self, view: DeviceView, name: str, now: float, changes: list[AlertRecord]
    ) -> None:
        rule = self.config.rules[name]
        key = (view.state.fleet, view.state.device, name, "")
        current = self._firing.get(key)
        if not rule.enabled:
            if current is not None:
                changes.append(self._resolve(key, current, now, "rule disabled"))
            return
        cond = evaluate_rule(name, rule, view, drift=self.config.drift, firing=current is not None)
        if cond is not None:
            self._apply(key, rule, cond, current, now, changes)

    def _evaluate_rollouts(
        self,
        rollouts: Sequence[RolloutRow],
        gone: Sequence[str],
        now: float,
        changes: list[AlertRecord],
    ) -> None:
        """``rollout_halted`` on each rollout (see :meth:`evaluate`); a StoreError is raised
        after the other rollouts were judged."""
        rule = self.config.rules[ROLLOUT_RULE]
        failed: StoreError | None = None
        ended = [
            (key, current)
            for key, current in self._firing.items()
            if key[2] == ROLLOUT_RULE and (not rule.enabled or key[3] in gone)
        ]
        for key, current in ended:
            why = "rule disabled" if not rule.enabled else "the rollout is no longer in the store"
            try:
                changes.append(self._resolve(key, current, now, why))
            except StoreError as exc:
                failed = failed or exc
        for r in rollouts if rule.enabled else ():
            key = (r.fleet, None, ROLLOUT_RULE, rollout_alert_id(r.fleet, r.id))
            try:
                self._apply(key, rule, rollout_halted(r), self._firing.get(key), now, changes)
            except StoreError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def rollout_alerts(self) -> list[AlertRecord]:
        """The firing ``rollout_halted`` alerts this engine holds (while it leads)."""
        with self._lock:
            return [r for k, r in self._firing.items() if k[2] == ROLLOUT_RULE]

    def firing(self) -> list[AlertRecord]:
        """The firing alerts: this engine's while it leads, else the shared history's."""
        with self._lock:
            if not self.leading:
                return self.store.firing()
            return sorted(self._firing.values(), key=lambda r: r.started_at, reverse=True)

    def _apply(
        self,
        key: _Key,
        rule: RuleConfig,
        cond: Condition,
        current: AlertRecord | None,
        now: float,
        changes: list[AlertRecord],
    ) -> None:
        """Append what changed to ``changes``, each change stored first (see evaluate)."""
        if not cond.active:
            self._pending.pop(key, None)
            if current is not None:
                changes.append(self._resolve(key, current, now, cond.summary, cond.value))
            return
        fleet, device, name, _ = key
        alert_id = None if cond.episode is None else episode_id(fleet, device, name, cond.episode)
        if current is not None and alert_id is not None and current.id != alert_id:
            changes.append(self._resolve(key, current, now, f"superseded: {cond.summary}"))
            self._apply(key, rule, cond, None, now, changes)
            return
        if current is not None:
            if (current.value, current.summary) != (cond.value, cond.summary):
                # The API shows the newest value at once; the history is written at most every
                # _SAVE_EVERY_S per alert (a stale device's "silent for N s" changes each tick).
                updated = replace(current, value=cond.value, summary=cond.summary, updated_at=now)
                self._firing[key] = updated
                if now - self._saved.get(key, current.updated_at) >= _SAVE_EVERY_S:
                    self.store.save(updated)
                    self._saved[key] = now
            return
        since = self._pending.setdefault(key, now)
        if now - since < rule.for_s:
            return
        if alert_id is None:
            digest = hashlib.sha256(
                f"{self.source}/{fleet}/{device}/{name}/{now!r}/{next(self._serial)}".encode()
            ).hexdigest()[:16]
            alert_id = f"{name}-{digest}"
        record = AlertRecord(
            id=alert_id,
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
        self.store.save(record)  # a StoreError leaves it pending: the next round tries again
        self._pending.pop(key, None)
        self._firing[key] = record
        log.warning("alert %s firing: %s", record.id, record.summary)
        changes.append(record)

    def _resolve(
        self,
        key: _Key,
        current: AlertRecord,
        now: float,
        summary: str,
        value: float | None = None,
    ) -> AlertRecord:
        record = replace(
            current,
            state="resolved",
            summary=summary,
            value=value if value is not None else current.value,
            updated_at=now,
            resolved_at=now,
        )
        self.store.save(record)  # a StoreError leaves it firing: the next round tries again
        del self._firing[key]
        self._saved.pop(key, None)
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

        broker = BrokerUrl.parse(broker_url)
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
