"""Staged rollouts in the collector (issue 14 item 2): the fleet-level ``rollouts`` topic is
ingested, the newest ``seq`` of each rollout is stored (SQLite and PostgreSQL, schema 5), served
by ``/api/rollouts``, drawn on the dashboard, exported to ``/metrics`` and alerted on
(``rollout_halted``).

The end-to-end test runs a real Mosquitto and a real collector with its monitor, publishes
RolloutEvents built with the contract's classes (a duplicate, an older ``seq`` after a newer
one, a halt), reads the API, ``/metrics`` and the alerts on ``edgeship/{fleet}/alerts``, and
restarts the collector on the same store. PostgreSQL tests use a schema of their own and are
skipped when no server answers (tests/test_collector_store.py's ``PG_URL``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sqlite3
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from collector.alert_config import AlertsConfig
from collector.alerts import rollout_alert_id
from collector.errors import ConfigError, StoreError
from collector.ingest import DeadLetter, RolloutRecord, ingest
from collector.leader import leadership_for
from collector.metrics import FleetMetrics, MetricsView
from collector.monitor import Monitor, MonitorConfig
from collector.service import Collector, CollectorConfig
from collector.state import FleetState, StateConfig
from collector.store import SCHEMA_VERSION, open_store
from collector.store.schema import SQLITE, schema_v1, schema_v2, schema_v3, schema_v4
from collector.worker import process_batch
from device_agent.contracts.messages import (
    ROLLOUT_DEVICE_STATES,
    ROLLOUT_STATES,
    Alert,
    RolloutEvent,
    encode,
    message_topic,
)
from tests.brokers import FleetListener, Mosquitto, wait_for
from tests.collector_helpers import FLEET, Fleet, Publisher
from tests.test_collector_store import PG_URL, pg_available, pg_url

T0 = 1_800_000_000.0
WAVES = (("pi-1",), ("pi-2", "pi-3"))
REASON = "pi-2 rolled back (class '3' predicted for 100% of 10 samples)"


def rollout(
    seq: int,
    state: str = "running",
    *,
    rid: str = "r-1",
    wave: int = 0,
    devices: dict[str, str] | None = None,
    reason: str | None = None,
    started: float = T0,
    model: str = "digits",
) -> RolloutEvent:
    """One rollout state over WAVES (every device pending unless ``devices`` says)."""
    states = dict.fromkeys(itertools.chain.from_iterable(WAVES), "pending")
    states.update(devices or {})
    fields: dict[str, Any] = dict(
        id=rid, seq=seq, ts=started + seq, started=started, state=state, wave=wave, waves=WAVES,
        devices=states, deploy="d0123456789abcdef01234567", model=model, model_version="4",
        soak_s=30.0, reason=reason,
    )  # fmt: skip
    return RolloutEvent(**fields)


def record(event: RolloutEvent, received_at: float, fleet: str = FLEET) -> RolloutRecord:
    out = ingest(message_topic(fleet, event), encode(event), received_at, fleet=fleet)
    assert isinstance(out, RolloutRecord), out
    return out


def halted(seq: int, rid: str = "r-1", started: float = T0) -> RolloutEvent:
    """Wave 2 failed: pi-2 rolled back by its probation, pi-3 reverted by the rollout."""
    return rollout(
        seq, "halted", rid=rid, wave=1, started=started, reason=REASON,
        devices={"pi-1": "applied", "pi-2": "rolled_back", "pi-3": "reverted"},
    )  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        s: Any = open_store(f"sqlite:///{tmp_path}/fleet.db")
        yield s
        s.close()
        return
    if not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    s = open_store(pg_url())
    try:
        yield s
    finally:
        s.drop_schema()
        s.close()


# --- ingest ----------------------------------------------------------------------------------


def test_a_rollouts_message_is_a_record_and_a_bad_one_a_dead_letter() -> None:
    event = halted(3)
    topic_name = message_topic(FLEET, event)
    assert topic_name == f"edgeship/{FLEET}/rollouts"
    got = record(event, T0)
    assert (got.fleet, got.key, got.message) == (FLEET, (FLEET, "r-1"), event)
    good = json.loads(encode(event))
    bad = [
        (topic_name, json.dumps({**good, "state": "paused"}), "state"),
        (topic_name, json.dumps({**good, "devices": {"pi-1": "applied"}}), "devices"),
        (topic_name, json.dumps({**good, "wave": 7}), "wave"),
        (topic_name, json.dumps({**good, "seq": -1}), "seq"),
        (topic_name, json.dumps({**good, "reason": "a\ud800b"}), "reason"),
        (topic_name, json.dumps({**good, "kind": "alerts"}), "kind"),
        (topic_name, encode(event)[:-1].decode(), "payload"),
        (f"edgeship/{FLEET}/pi-1/rollouts", encode(event).decode(), "topic.kind"),
        ("edgeship/other/rollouts", encode(event).decode(), "topic.fleet"),
    ]
    for name, payload, field in bad:
        out = ingest(name, payload.encode("utf-8", "surrogatepass"), T0, fleet=FLEET)
        assert isinstance(out, DeadLetter), (field, out)
        assert out.field.startswith(field), (field, out.field, out.error)


def test_process_batch_stores_rollouts_beside_telemetry_and_dead_letters(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path}/fleet.db")
    try:
        topic_name = f"edgeship/{FLEET}/rollouts"
        deliveries = [
            (topic_name, encode(rollout(1)), T0),
            (topic_name, encode(rollout(2, wave=1)), T0 + 1),
            (topic_name, b'{"v": 1, "kind": "rollouts"}', T0 + 2),
            (topic_name, encode(rollout(1)), T0 + 3),  # older: changes nothing
        ]
        outcome = process_batch(s, deliveries, FLEET)
        assert (outcome.stored.new, outcome.stored.duplicates, outcome.stored.dead_letters) == (
            1, 2, 1,
        )  # fmt: skip
        assert outcome.stored.new_by_kind == {"rollouts": 1}
        (row,) = s.rollouts(FLEET)
        assert (row.seq, row.wave, row.received_at) == (2, 1, T0 + 1)
    finally:
        s.close()


# --- the store -------------------------------------------------------------------------------


def test_the_store_keeps_the_highest_seq_of_each_rollout(store: Any) -> None:
    first = store.insert_batch([], [], [record(rollout(2, wave=1), T0)])
    assert (first.new, first.duplicates, first.new_by_kind) == (1, 0, {"rollouts": 1})
    # A redelivery of seq 2 (other content would be a broken publisher: still not newer) and
    # an older seq change nothing, received_at included.
    again = store.insert_batch(
        [], [], [record(rollout(1), T0 + 5), record(rollout(2, "done", wave=2), T0 + 5)]
    )
    assert (again.new, again.duplicates) == (0, 2)
    (row,) = store.rollouts(FLEET)
    assert (row.seq, row.state, row.wave, row.received_at) == (2, "running", 1, T0)
    # In one batch: the highest seq wins; of two equal ones, the first received.
    batch = [record(halted(4), T0 + 6), record(rollout(3), T0 + 6),
             record(rollout(4, "aborted"), T0 + 7)]  # fmt: skip
    third = store.insert_batch([], [], batch)
    assert (third.new, third.duplicates) == (1, 2)
    detail = store.rollout(FLEET, "r-1")
    assert (detail.seq, detail.state, detail.reason, detail.received_at) == (
        4, "halted", REASON, T0 + 6,
    )  # fmt: skip
    assert detail.waves == WAVES
    assert detail.devices == {"pi-1": "applied", "pi-2": "rolled_back", "pi-3": "reverted"}
    as_dict = detail.to_dict()
    assert as_dict["counts"] == {
        "pending": 0, "deploying": 0, "applied": 1, "rolled_back": 1, "failed": 0,
        "reverted": 1, "unreachable": 0, "skipped": 0,
    }  # fmt: skip
    assert (as_dict["waves"], as_dict["waves_total"], as_dict["devices_total"]) == (
        [["pi-1"], ["pi-2", "pi-3"]], 2, 3,
    )  # fmt: skip
    assert "waves" not in store.rollouts(FLEET)[0].to_dict()  # summaries leave them out
    assert store.rollout(FLEET, "r-9") is None and store.rollout("other", "r-1") is None


def test_rollouts_are_listed_newest_first_per_fleet_and_by_state(store: Any) -> None:
    batch = [record(rollout(1, rid=f"r-{i}", started=T0 + i), T0) for i in range(4)]
    batch += [record(halted(2, rid="r-1", started=T0 + 1), T0)]
    batch += [record(rollout(1, rid=f"o-{i}", started=T0 + i), T0, "other") for i in range(3)]
    store.insert_batch([], [], batch)
    assert [r.id for r in store.rollouts(FLEET)] == ["r-3", "r-2", "r-1", "r-0"]
    assert [r.id for r in store.rollouts(FLEET, limit=2)] == ["r-3", "r-2"]
    assert [r.id for r in store.rollouts(FLEET, state="halted")] == ["r-1"]
    newest = [(r.fleet, r.id) for r in store.rollouts(None, limit=None, per_fleet=2)]
    assert sorted(newest) == [(FLEET, "r-2"), (FLEET, "r-3"), ("other", "o-1"),
                              ("other", "o-2")]  # fmt: skip
    assert [r.id for r in store.rollouts("other", limit=None, per_fleet=1)] == ["o-2"]


_SEQS = st.lists(st.integers(0, 6), min_size=1, max_size=12)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(seqs=_SEQS, cuts=st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_any_arrival_order_keeps_the_highest_seq(
    store: Any, seqs: list[int], cuts: list[int]
) -> None:
    rid = f"h-{uuid.uuid4().hex[:8]}"
    # Each delivery is told apart by its state and received_at; the first of the highest seq
    # is what must stay.
    states = itertools.cycle(ROLLOUT_STATES)
    events = [(rollout(s, next(states), rid=rid), T0 + n) for n, s in enumerate(seqs)]
    stored_seq, new, duplicates, position = -1, 0, 0, 0
    for size in itertools.cycle(cuts):
        if position >= len(events):
            break
        batch = events[position : position + size]
        result = store.insert_batch([], [], [record(e, t) for e, t in batch])
        new, duplicates = new + result.new, duplicates + result.duplicates
        assert result.new == (1 if max(e.seq for e, _ in batch) > stored_seq else 0)
        stored_seq = max(stored_seq, *(e.seq for e, _ in batch))
        position += size
    winner, received = next((e, t) for e, t in events if e.seq == max(seqs))
    row = store.rollout(FLEET, rid)
    assert (row.seq, row.state, row.received_at) == (winner.seq, winner.state, received)
    assert new + duplicates == len(seqs)


def _schema_4_store(path: Path) -> None:
    """A store as a schema-4 edgeship left it, with one device."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL, "
            "description TEXT NOT NULL)"
        )
        for version, ddl in ((1, schema_v1), (2, schema_v2), (3, schema_v3), (4, schema_v4)):
            for statement in ddl(SQLITE):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, 0, 'old')", (version,))
        conn.execute(
            "INSERT INTO devices (fleet, device, messages, duplicates) VALUES (?, 'pi-old', 3, 0)",
            (FLEET,),
        )


def test_a_schema_4_store_is_upgraded_to_5_in_place(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    _schema_4_store(path)
    s = open_store(f"sqlite:///{path}")
    try:
        assert s.schema_version() == SCHEMA_VERSION == 5
        assert [d.device for d in s.devices(FLEET)] == ["pi-old"]
        assert s.insert_batch([], [], [record(halted(1), T0)]).new == 1
        assert s.rollout(FLEET, "r-1").state == "halted"  # type: ignore[union-attr]
    finally:
        s.close()
    again = tmp_path / "foreign.db"
    _schema_4_store(again)
    with sqlite3.connect(again) as conn:  # a table that is not ours under our name: refused
        conn.execute("CREATE TABLE edgeship_rollouts (x INTEGER)")
    with pytest.raises(StoreError, match="edgeship_rollouts"):
        open_store(f"sqlite:///{again}")


def test_a_postgresql_schema_with_another_applications_rollouts_table() -> None:
    if not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    import psycopg

    url = pg_url()
    schema = url.rsplit("=", 1)[1]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.rollouts (x INTEGER)")  # not ours
    s: Any = open_store(url)
    try:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.insert_batch([], [], [record(rollout(1), T0)]).new == 1
    finally:
        s.drop_schema()
        s.close()


# --- the alert, on a fake clock ------------------------------------------------------------------


def _store(f: Fleet, *events: RolloutEvent) -> None:
    f.store.insert_batch([], [], [record(e, f.clock()) for e in events])


def _rollout_alerts(f: Fleet) -> list[tuple[str, str | None, float | None, str]]:
    return [(a.state, a.device, a.value, a.id) for _, a in f.sent if a.rule == "rollout_halted"]


def test_rollout_halted_fires_once_and_resolves_when_the_rollout_goes_on(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    try:
        _store(f, rollout(1))
        assert f.tick(1) == []
        _store(f, halted(2))
        assert f.tick(1) == [("firing", None, "rollout_halted")]
        alert = f.sent[-1][1]
        assert (alert.severity, alert.device, alert.value) == ("critical", None, 2.0)
        assert alert.id == rollout_alert_id(FLEET, "r-1")
        assert "rollout r-1 of digits@4 halted at wave 2 of 2" in alert.summary
        assert REASON in alert.summary and "2 of 3 devices" in alert.summary
        # Another halted state of the same rollout (a device reverted late): no new alert.
        _store(f, dataclasses.replace(halted(3), devices={**halted(3).devices, "pi-1": "reverted"}))
        assert f.tick(1) == []
        assert f.monitor.engine.firing()[0].value == 3.0
        _store(f, rollout(4, wave=1, devices={"pi-1": "applied"}))  # resumed
        assert f.tick(1) == [("resolved", None, "rollout_halted")]
        assert f.sent[-1][1].id == alert.id and "is running at wave 2 of 2" in f.sent[-1][1].summary
        assert f.tick(1) == []
    finally:
        f.close()


def test_each_halted_rollout_alerts_and_a_restarted_monitor_resolves_what_fired(
    tmp_path: Path,
) -> None:
    f = Fleet(tmp_path)
    _store(f, halted(1, "r-1"), halted(1, "r-2", started=T0 + 1), rollout(1, rid="r-3"))
    assert sorted(f.tick(1)) == [("firing", None, "rollout_halted")] * 2
    fired = {a.id for _, a in f.sent}
    assert fired == {rollout_alert_id(FLEET, "r-1"), rollout_alert_id(FLEET, "r-2")}
    f.monitor.stop()
    again = Monitor(
        f.state, f.store, f.config, clock=f.clock, publish=lambda fl, a: f.sent.append((fl, a))
    )
    try:
        assert {a.id for a in again.engine.firing()} == fired
        f.clock.advance(1)
        again.tick()
        assert len(f.sent) == 2  # nothing raised a second time
        _store(f, rollout(2, "done", rid="r-2", wave=2, started=T0 + 1))
        _store(f, rollout(2, "aborted", rid="r-1", wave=1, started=T0))
        f.clock.advance(1)
        again.tick()
        resolved = {a.id: a.summary for _, a in f.sent[2:] if a.state == "resolved"}
        assert resolved.keys() == fired and len(f.sent) == 4
        assert "r-2 of digits@4 is done" in resolved[rollout_alert_id(FLEET, "r-2")]
        assert "r-1 of digits@4 was aborted" in resolved[rollout_alert_id(FLEET, "r-1")]
    finally:
        again.stop()
        f.store.close()


def test_the_rule_can_be_switched_off_and_a_deleted_rollout_resolves_its_alert(
    tmp_path: Path,
) -> None:
    f = Fleet(tmp_path)
    try:
        _store(f, halted(1))
        assert f.tick(1) == [("firing", None, "rollout_halted")]
        f.store._query("DELETE FROM edgeship_rollouts")  # an operator cleaned the table up
        assert f.tick(1) == [("resolved", None, "rollout_halted")]
        assert "no longer in the store" in f.sent[-1][1].summary
    finally:
        f.close()
    cfg = AlertsConfig.from_dict({"rules": {"rollout_halted": {"enabled": False}}})
    assert (
        cfg.rules["rollout_halted"].severity == "critical"
        and not cfg.rules["rollout_halted"].enabled
    )
    with pytest.raises(ConfigError, match="unknown keys"):
        AlertsConfig.from_dict({"rules": {"rollout_halted": {"threshold": 1}}})
    off = Fleet(tmp_path / "off", MonitorConfig(alerts=cfg, alerts_db=":memory:"))
    try:
        _store(off, halted(1))
        assert off.tick(1) == []
    finally:
        off.close()


def _samples(text: str, name: str) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[(s.labels["fleet"], s.labels["rollout"], s.labels["state"])] = s.value
    return out


def test_metrics_show_the_newest_rollouts_of_each_fleet(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    try:
        _store(f, *(rollout(1, rid=f"r-{i}", started=T0 + i) for i in range(7)))
        _store(f, halted(2, "r-6", started=T0 + 6))
        f.tick(1)
        text = f.monitor.metrics_text()
        devices = _samples(text, "edgeship_rollout_devices")
        states = _samples(text, "edgeship_rollout_state")
        assert {r for _, r, _ in devices} == {f"r-{i}" for i in range(2, 7)}  # the newest 5
        assert len(devices) == 5 * len(ROLLOUT_DEVICE_STATES)
        assert len(states) == 5 * len(ROLLOUT_STATES)
        assert devices[(FLEET, "r-6", "rolled_back")] == 1.0
        assert devices[(FLEET, "r-6", "reverted")] == 1.0
        assert devices[(FLEET, "r-6", "pending")] == 0.0
        assert devices[(FLEET, "r-5", "pending")] == 3.0
        assert states[(FLEET, "r-6", "halted")] == 1.0
        assert sum(v for (_, r, _), v in states.items() if r == "r-6") == 1.0
        assert states[(FLEET, "r-5", "running")] == 1.0
        assert "# TYPE edgeship_rollout_devices gauge" in text
        assert "# HELP edgeship_rollout_state " in text
        # A collector that does not lead the fleet exports no fleet-wide series.
        rows = f.store.rollouts(FLEET, limit=None, per_fleet=5)
        view = MetricsView(f.state.snapshot(), rollouts=rows, leader=False)
        names = {m.name for m in FleetMetrics(lambda: view).collect()}
        assert "edgeship_rollout_devices" not in names
        assert "edgeship_rollout_state" not in names
    finally:
        f.close()


def test_only_the_postgresql_leader_exports_rollout_series() -> None:
    if not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    url = pg_url()
    store: Any = open_store(url)
    monitors: list[Monitor] = []
    try:
        store.insert_batch([], [], [record(halted(1), T0)])
        for _ in range(2):
            state = FleetState(store, fleet=FLEET, config=StateConfig(cache_s=0.0))
            m = Monitor(state, store, MonitorConfig(alerts_db=":memory:", publish=False),
                        leader=leadership_for(url, FLEET))  # fmt: skip
            m.tick()
            monitors.append(m)
        leading = [m.leader.is_leader for m in monitors]
        assert leading == [True, False]
        lead, follow = (m.metrics_text() for m in monitors)
        assert _samples(lead, "edgeship_rollout_state")[(FLEET, "r-1", "halted")] == 1.0
        assert _samples(follow, "edgeship_rollout_state") == {}
        assert [a.rule for a in monitors[0].engine.firing()] == ["rollout_halted"]
    finally:
        for m in monitors:
            m.stop()
        store.drop_schema()
        store.close()


# --- end to end: Mosquitto, the collector, its monitor -------------------------------------------


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read().decode()
        return json.loads(body) if resp.headers["Content-Type"] == "application/json" else body


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class _Rig:
    """A collector of FLEET and its monitor on ``store_url``, over ``broker``."""

    def __init__(self, broker: Mosquitto, store_url: str) -> None:
        config = CollectorConfig(
            broker.url, fleet=FLEET, store_url=store_url, http="127.0.0.1:0",
            client_id=f"ro-{uuid.uuid4().hex[:8]}", workers=1, batch_interval_s=0.02,
        )  # fmt: skip
        self.collector = Collector(config).start()
        self.monitor = Monitor.for_collector(self.collector, MonitorConfig(interval_s=0.1)).start()
        host, port = self.collector.http_address_bound()
        self.api = f"http://{host}:{port}"

    def row(self) -> dict[str, Any]:
        rows: list[dict[str, Any]] = _get(f"{self.api}/api/rollouts")["rollouts"]
        return rows[0] if rows else {}

    def wait_seq(self, seq: int) -> dict[str, Any]:
        assert wait_for(lambda: self.row().get("seq") == seq, 20), self.row()
        return self.row()

    def stop(self) -> None:
        self.monitor.stop()
        self.collector.stop()


def _publish(pub: Publisher, *events: RolloutEvent) -> None:
    for e in events:  # retained, QoS 1, as the protocol says for this topic
        pub.client.publish(message_topic(FLEET, e), encode(e), qos=1, retain=True).wait_for_publish(
            10
        )


def _alerts(listener: FleetListener) -> list[Alert]:
    return [a for a in listener.of(Alert) if a.rule == "rollout_halted"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rollouts_over_mqtt_in_the_api_metrics_alerts_and_after_a_restart(
    backend: str, tmp_path: Path
) -> None:
    if backend == "postgresql" and not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    store_url = f"sqlite:///{tmp_path / 'fleet.db'}" if backend == "sqlite" else pg_url()
    with Mosquitto(tmp_path / "broker", persistence=False) as broker:
        listener = FleetListener(FLEET, port=broker.port)
        pub = Publisher(broker.port, FLEET)
        rig = _Rig(broker, store_url)
        try:
            _publish(pub, rollout(1))
            rig.wait_seq(1)
            _publish(pub, rollout(2, devices={"pi-1": "deploying"}))
            rig.wait_seq(2)
            _publish(pub, rollout(2, devices={"pi-1": "deploying"}), rollout(1))  # dup, older
            assert wait_for(lambda: rig.collector.stats.duplicates >= 2, 20)
            first = rig.wait_seq(2)
            assert first["counts"]["deploying"] == 1 and first["state"] == "running"
            _publish(pub, halted(3))
            row = rig.wait_seq(3)
            assert (row["state"], row["wave"], row["waves_total"], row["reason"]) == (
                "halted", 1, 2, REASON,
            )  # fmt: skip
            assert row["counts"]["rolled_back"] == row["counts"]["reverted"] == 1
            stats = rig.collector.stats
            assert (stats.duplicates, stats.dead_letters) == (2, 0)
            assert stats.stored == 3  # seq 1, 2 and 3, each once
            detail = _get(f"{rig.api}/api/rollouts/{FLEET}/r-1")
            assert detail["waves"] == [["pi-1"], ["pi-2", "pi-3"]]
            assert detail["devices"] == {"pi-1": "applied", "pi-2": "rolled_back",
                                         "pi-3": "reverted"}  # fmt: skip
            assert _status(f"{rig.api}/api/rollouts/{FLEET}/nope") == 404
            assert _status(f"{rig.api}/api/rollouts/other/r-1") == 400
            assert _status(f"{rig.api}/api/rollouts?fleet=b+d") == 400
            assert _status(f"{rig.api}/api/rollouts?limit=0") == 400
            assert "/api/rollouts/{fleet}/{rollout_id}" in _get(f"{rig.api}/openapi.json")["paths"]

            firing = listener.wait_for(lambda: _alerts(listener))
            (alert,) = firing
            assert (alert.state, alert.severity, alert.device, alert.value) == (
                "firing", "critical", None, 2.0,
            )  # fmt: skip
            assert "r-1" in alert.summary and REASON in alert.summary
            assert wait_for(lambda: "rollout_halted" in _metrics_firing(rig.api), 20)
            text = _get(f"{rig.api}/metrics")
            states = _samples(text, "edgeship_rollout_state")
            assert states[(FLEET, "r-1", "halted")] == 1.0
            assert states[(FLEET, "r-1", "running")] == 0.0
            devices = _samples(text, "edgeship_rollout_devices")
            assert devices[(FLEET, "r-1", "applied")] == devices[(FLEET, "r-1", "reverted")] == 1
            assert _metrics_firing(rig.api)["rollout_halted"] == ("critical", 1.0)
            _promtool_check(text)

            _publish(pub, rollout(4, wave=1, devices={"pi-1": "applied"}))  # resumed
            listener.wait_for(lambda: len(_alerts(listener)) == 2)
            resolved = _alerts(listener)[1]
            assert (resolved.state, resolved.id) == ("resolved", alert.id)
            _publish(pub, halted(5))  # halted again: the rollout's alert fires again
            listener.wait_for(lambda: len(_alerts(listener)) == 3)
            before = rig.wait_seq(5)
        finally:
            rig.stop()

        # A restart on the same store: another client id, so the broker sends the retained
        # seq 5 again; equal to the stored one, it changes nothing.
        rig = _Rig(broker, store_url)
        try:
            assert wait_for(lambda: rig.collector.stats.duplicates == 1, 20)
            assert rig.row() == before  # received_at included
            assert wait_for(lambda: rig.monitor.ticks >= 3, 20)
            assert [a.id for a in rig.monitor.engine.firing()] == [alert.id]
            _publish(pub, rollout(6, "aborted", wave=1, reason="stopped by the operator"))
            listener.wait_for(lambda: len(_alerts(listener)) == 4)
            assert [(a.state, a.id) for a in _alerts(listener)] == [
                ("firing", alert.id), ("resolved", alert.id),
                ("firing", alert.id), ("resolved", alert.id),
            ]  # fmt: skip
            assert "was aborted" in _alerts(listener)[3].summary
            assert rig.wait_seq(6)["state"] == "aborted"
        finally:
            rig.stop()
            pub.close()
            listener.close()
            if backend == "postgresql":
                cleanup: Any = open_store(store_url)
                cleanup.drop_schema()
                cleanup.close()


def _metrics_firing(api: str) -> dict[str, tuple[str, float]]:
    out = {}
    for family in text_string_to_metric_families(_get(f"{api}/metrics")):
        for s in family.samples:
            if s.name == "edgeship_alerts_firing" and s.value:
                out[s.labels["rule"]] = (s.labels["severity"], s.value)
    return out


def _promtool_check(text: str) -> None:
    """``promtool check metrics`` on a scrape, where promtool is there (or can be unpacked:
    tests/test_collector_metrics.py)."""
    from tests.test_collector_metrics import _promtool

    check = subprocess.run(
        [_promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_the_dashboard_shows_rollouts_escaped(chromium: str, tmp_path: Path) -> None:
    """The Rollouts panel, as the collector renders it and as dashboard.js redraws it: every
    string from the wire is text, never markup."""
    hostile = '<img src=x onerror="document.title=1">'
    with Mosquitto(tmp_path / "broker", persistence=False) as broker:
        pub = Publisher(broker.port, FLEET)
        rig = _Rig(broker, f"sqlite:///{tmp_path / 'fleet.db'}")
        try:
            bad = dataclasses.replace(halted(2), model=f"digits{hostile}", reason=f"{hostile} x")
            _publish(pub, rollout(1, rid="r-0", started=T0 - 10), bad)
            assert wait_for(lambda: len(_get(f"{rig.api}/api/rollouts")["rollouts"]) == 2, 20)
            page = _get(f"{rig.api}/")
            dom = _browse(chromium, f"{rig.api}/")
        finally:
            rig.stop()
            pub.close()
    assert re.search(r'id="updated"[^>]*>updated \d\d:\d\d:\d\d<', dom), dom[:2000]
    for html_text in (page, dom):
        pattern = rf'<tr data-rollout="([^"]+)" data-fleet="{FLEET}">(.*?)</tr>'
        rows = dict(re.findall(pattern, html_text))
        assert set(rows) == {"r-0", "r-1"}, html_text[:3000]
        assert "halted" in rows["r-1"] and "2 of 2" in rows["r-1"]
        assert "1 applied, 1 rolled back, 1 reverted" in rows["r-1"]
        assert "&lt;img" in rows["r-1"] and "<img" not in rows["r-1"]
        assert "running" in rows["r-0"] and "1 of 2" in rows["r-0"]
        assert "3 pending" in rows["r-0"]
        # newest first: r-1 started after r-0
        assert html_text.index('data-rollout="r-1"') < html_text.index('data-rollout="r-0"')
    assert "<img" not in page and "<img" not in dom


def _browse(chromium: str, url: str) -> str:
    from tests.browser import browse

    return browse(chromium, url)
