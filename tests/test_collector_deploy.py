"""Remote deploy outcomes in the collector: the store keeps each device's newest one (from
status or telemetry, whichever arrived last) across restarts and schema upgrades, the
``deploy_failed`` rule alerts once per bad deploy with its reason, Prometheus counts outcomes by
state, and the dashboard marks a rolled-back device. End to end: a real agent on the shared
Mosquitto, a bundle that fails on the application's inputs sent with ``sdk.deploy``, and a real
collector whose API, alerts, metrics and dashboard show the rollback, then again after a
restart."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collector.monitor import Monitor, MonitorConfig
from collector.service import Collector, CollectorConfig
from collector.state import FleetState
from collector.store import SCHEMA_VERSION, open_store
from collector.store.schema import SQLITE as _SQLITE
from collector.store.schema import schema_v1 as _schema_v1
from device_agent.contracts.messages import DeployEvent
from tests.brokers import wait_for
from tests.collector_helpers import FLEET, FakeClock, Fleet, status, store_messages, window
from tests.test_collector_store import PG_URL, pg_available, pg_url

BROKER = "mqtt://127.0.0.1:1883"  # the shared Mosquitto: unique fleet ids, connect only
T0 = 1_800_000_000.0


def deploy(state: str, deploy_id: str = "dep-1", reason: str | None = None) -> DeployEvent:
    return DeployEvent(
        id=deploy_id, state=state, ts=T0, model="digits-cnn", from_version="1",  # type: ignore[arg-type]
        to_version="2", reason=reason,
    )  # fmt: skip


def with_deploy(message: Any, event: DeployEvent) -> Any:
    return dataclasses.replace(message, deploy=event)


# --- the store --------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/fleet.db"
        return
    if not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    url = pg_url()
    yield url
    s = open_store(url)
    s.drop_schema()
    s.close()


def test_the_newest_deploy_outcome_is_kept_per_device_and_survives_a_reopen(
    store_url: str,
) -> None:
    rng = np.random.default_rng(0)
    s = open_store(store_url)
    # A status with an applied deploy, then telemetry with a later rollback.
    store_messages(s, FLEET, [with_deploy(status("pi-a", 0), deploy("applied", "dep-0"))], T0)
    bad = deploy("rolled_back", "dep-1", "input 'x': expected shape (1, 8), got (1, 16)")
    store_messages(s, FLEET, [with_deploy(window("pi-a", 1, rng=rng), bad)], T0 + 5)
    # A message without a deploy changes nothing; an outcome received earlier (a second
    # collector committing late) does not replace a newer one.
    store_messages(s, FLEET, [window("pi-a", 2, rng=rng)], T0 + 10)
    store_messages(s, FLEET, [with_deploy(status("pi-a", 3), deploy("applied", "dep-0"))], T0 + 3)
    store_messages(s, FLEET, [window("pi-b", 0, rng=rng)], T0 + 10)
    s.close()

    s = open_store(store_url)  # a collector restart
    try:
        rows = {r.device: r for r in s.devices(FLEET)}
        assert rows["pi-a"].deploy == bad and rows["pi-a"].deploy_at == T0 + 5
        assert rows["pi-b"].deploy is None and rows["pi-b"].deploy_at is None
        # The telemetry row keeps its deploy too (the device page's series marks the window).
        windows = s.telemetry(FLEET, "pi-a")
        assert [w.deploy for w in windows] == [bad, None]
        # A newer outcome by receive time replaces it, from a status message this time.
        late = with_deploy(status("pi-a", 4), deploy("probation", "dep-2"))
        store_messages(s, FLEET, [late], T0 + 20)
        state = FleetState(s, fleet=FLEET, clock=lambda: T0 + 21)
        detail = state.device("pi-a")
        assert detail is not None
        shown = detail.to_dict()["deploy"]
        assert shown["state"] == "probation" and shown["received_at"] == T0 + 20
        assert shown["from_version"] == "1" and shown["to_version"] == "2"
        listed = {d["device"]: d for d in state.snapshot().to_dict()["devices"]}
        assert listed["pi-a"]["deploy"]["id"] == "dep-2" and listed["pi-b"]["deploy"] is None
        assert detail.to_dict()["series"][0]["deploy"]["state"] == "rolled_back"
    finally:
        s.close()


def test_the_device_list_and_the_device_page_read_one_snapshot(tmp_path: Path) -> None:
    """/api/devices and /api/devices/{id} showed one device two ways (the page read the store
    at once, the list reused a snapshot up to 0.2 s old, or 1 s for another collector's
    commits): the page had the rolled-back deploy while the list said none. Both now come from
    one snapshot, so they agree at every instant and show a commit together."""
    rng = np.random.default_rng(0)
    clock = FakeClock(T0)
    s = open_store(f"sqlite:///{tmp_path}/fleet.db")
    try:
        store_messages(s, FLEET, [status("pi-d", 0, ts=T0)], T0)
        state = FleetState(s, fleet=FLEET, clock=clock)

        def views() -> tuple[dict[str, Any], dict[str, Any]]:
            detail = state.device("pi-d")
            assert detail is not None
            page = {k: v for k, v in detail.to_dict().items() if k not in ("series", "events")}
            listed = {d["device"]: d for d in state.snapshot().to_dict()["devices"]}["pi-d"]
            return page, listed

        assert views()[1]["deploy"] is None
        # A commit right after the list was read (the collector invalidates after each one).
        bad = deploy("rolled_back", "dep-1", "input 'x': expected shape (1, 8)")
        m = with_deploy(window("pi-d", 1, rng=rng, ts=T0), bad)
        store_messages(s, FLEET, [m], T0 + 0.05)
        state.invalidate()
        clock.advance(0.05)
        page, listed = views()
        assert page == listed
        clock.advance(0.3)  # the next refresh shows it in both
        page, listed = views()
        assert page == listed and listed["deploy"]["state"] == "rolled_back"
        detail = state.device("pi-d")
        assert detail is not None and [w.seq for w in detail.series] == [1]
    finally:
        s.close()


def test_a_version_1_store_is_upgraded_in_place_and_keeps_its_devices(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL, "
            "description TEXT NOT NULL)"
        )
        for statement in _schema_v1(_SQLITE):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 0, 'v1')")
        conn.execute(
            "INSERT INTO devices (fleet, device, messages, duplicates, model, model_version) "
            "VALUES ('farm', 'pi-old', 3, 0, 'digits-cnn', '1')"
        )
    s = open_store(f"sqlite:///{path}")
    try:
        assert s.schema_version() == SCHEMA_VERSION == 5
        (old,) = s.devices(FLEET)
        assert (old.device, old.model_version, old.deploy) == ("pi-old", "1", None)
        bad = deploy("failed", "dep-9", "bundle hash mismatch")
        store_messages(s, FLEET, [with_deploy(status("pi-old", 0), bad)], T0)
        assert s.devices(FLEET)[0].deploy == bad
    finally:
        s.close()


# --- the rule and the counter (store + monitor on a fake clock) -------------------------------


def test_a_rolled_back_or_failed_deploy_alerts_once_per_deploy_with_its_reason(
    tmp_path: Path,
) -> None:
    f = Fleet(tmp_path)
    rng = f.rng
    try:
        f.online("pi-a")
        assert ("firing", "pi-a", "deploy_failed") not in f.tick()
        reason = "input 'x': expected shape (1, 8), got (1, 16)"
        m = window("pi-a", f.next_seq("pi-a"), rng=rng, ts=f.clock())
        store_messages(f.store, FLEET, [with_deploy(m, deploy("rolled_back", "dep-1", reason))],
                       f.clock())  # fmt: skip
        assert ("firing", "pi-a", "deploy_failed") in f.tick(1)
        (alert,) = [a for _, a in f.sent if a.rule == "deploy_failed"]
        assert (
            reason in alert.summary and "dep-1" in alert.summary and "rolled back" in alert.summary
        )
        # It keeps holding: nothing is sent again, also by a restarted monitor on the same history.
        f.telemetry("pi-a")
        assert f.tick(1) == []
        f.monitor.stop()
        f.monitor = Monitor(f.state, f.store, f.config, clock=f.clock,
                            publish=lambda fl, a: f.sent.append((fl, a)))  # fmt: skip
        assert f.tick(1) == []
        assert [a.id for a in f.monitor.engine.firing()] == [alert.id]
        # Another deploy that fails: the first alert resolves, a new one fires for it.
        store_messages(f.store, FLEET, [with_deploy(status("pi-a", f.next_seq("pi-a")),
                       deploy("failed", "dep-2", "signature not trusted"))], f.clock())  # fmt: skip
        changes = f.tick(1)
        assert changes == [
            ("resolved", "pi-a", "deploy_failed"),
            ("firing", "pi-a", "deploy_failed"),
        ]
        new = f.sent[-1][1]
        assert new.id != alert.id and "signature not trusted" in new.summary
        # A later good deploy resolves it.
        m = window("pi-a", f.next_seq("pi-a"), rng=rng, ts=f.clock())
        store_messages(f.store, FLEET, [with_deploy(m, deploy("applied", "dep-3"))], f.clock())
        assert f.tick(1) == [("resolved", "pi-a", "deploy_failed")]
        # The counter: outcomes by state since this monitor started (dep-1 was seen before).
        text = f.monitor.metrics_text()
        assert "# TYPE edgeship_fleet_deploys_total counter" in text
        assert 'edgeship_fleet_deploys_total{fleet="farm",state="failed"} 1' in text
        assert 'edgeship_fleet_deploys_total{fleet="farm",state="applied"} 1' in text
        assert 'edgeship_fleet_deploys_total{fleet="farm",state="rolled_back"} 0' in text
        assert "dep-" not in "".join(
            line for line in text.splitlines() if line.startswith("edgeship_fleet_deploys")
        )
    finally:
        f.close()


def test_the_deploy_failed_rule_can_be_switched_off(tmp_path: Path) -> None:
    from collector.alerts import AlertsConfig

    cfg = MonitorConfig(
        alerts=AlertsConfig.from_dict({"rules": {"deploy_failed": {"enabled": False}}}),
        alerts_db=str(tmp_path / "alerts.db"),
    )
    f = Fleet(tmp_path, cfg)
    try:
        f.online("pi-a")
        store_messages(f.store, FLEET, [with_deploy(status("pi-a", f.next_seq("pi-a")),
                       deploy("failed", "dep-1", "bad hash"))], f.clock())  # fmt: skip
        assert f.tick(1) == []
    finally:
        f.close()


# --- end to end: a real agent, sdk.deploy, a real collector -----------------------------------


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read()
        return json.loads(body) if "json" in resp.headers["Content-Type"] else body.decode()


def _start(fleet: str, store: str) -> tuple[Collector, Monitor, str]:
    config = CollectorConfig(
        broker_url=BROKER,
        fleet=fleet,
        store_url=store,
        http="127.0.0.1:0",
        client_id=f"dep-{uuid.uuid4().hex[:8]}",
        batch_interval_s=0.05,
        worker="thread",
    )
    collector = Collector(config).start()
    monitor = Monitor.for_collector(collector, MonitorConfig(interval_s=0.2)).start()
    host, port = collector.http_address_bound()
    return collector, monitor, f"http://{host}:{port}"


def test_a_rolled_back_deploy_shows_in_the_api_alerts_metrics_and_dashboard_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    from sdk.deploy import deploy_bundle
    from tests.test_deploy import FEATURES, _bundle, _device

    v1 = _bundle(tmp_path, "v1", "1", features=FEATURES, seed=0)
    narrow = _bundle(tmp_path, "narrow", "3-narrow", features=8, seed=2)
    fleet = f"t{uuid.uuid4().hex[:10]}"
    store = f"sqlite:///{tmp_path}/fleet.db"
    collector, monitor, url = _start(fleet, store)
    try:
        with _device(v1, tmp_path / "state", fleet):
            assert wait_for(lambda: [d for d in _devices(url) if d["model_version"] == "1"], 20)
            result = deploy_bundle(narrow, BROKER, fleet, "pi-d", timeout_s=60)
            assert result.state == "rolled_back", result
            assert wait_for(lambda: (_get(url + "/api/devices/pi-d")["deploy"] or {}).get("state")
                            == "rolled_back", 20)  # fmt: skip
            device = _get(url + "/api/devices/pi-d")
            shown = device["deploy"]
            assert shown["id"] == result.deploy_id and "shape" in shown["reason"]
            assert (shown["from_version"], shown["to_version"]) == ("1", "3-narrow")
            assert device["model_version"] == "1"
            listed = {d["device"]: d for d in _get(url + "/api/devices")["devices"]}
            assert listed["pi-d"]["deploy"]["state"] == "rolled_back"
            assert wait_for(lambda: _firing(url), 10), _get(url + "/api/alerts")
            (alert,) = _firing(url)
            assert result.deploy_id in alert["summary"] and "shape" in alert["summary"]
            metrics = _get(url + "/metrics")
            assert (
                f'edgeship_fleet_deploys_total{{fleet="{fleet}",state="rolled_back"}} 1' in metrics
            )
            page = _get(url + "/")
            assert 'class="deploy rolled_back"' in page and "rolled back" in page
    finally:
        monitor.stop()
        collector.stop()
    # A restarted collector on the same store still shows it, and does not alert again.
    collector, monitor, url = _start(fleet, store)
    try:
        shown = _get(url + "/api/devices/pi-d")["deploy"]
        assert shown["state"] == "rolled_back" and shown["id"] == result.deploy_id
        assert wait_for(lambda: monitor.ticks >= 2, 10)
        # The same alert, read back from the history: not fired again (same start time).
        assert [(a["id"], a["started_at"]) for a in _firing(url)] == [
            (alert["id"], alert["started_at"])
        ]
    finally:
        monitor.stop()
        collector.stop()


def _devices(url: str) -> list[Any]:
    return [d for d in _get(url + "/api/devices")["devices"] if d["device"] == "pi-d"]


def _firing(url: str) -> list[dict[str, Any]]:
    return [a for a in _get(url + "/api/alerts")["firing"] if a["rule"] == "deploy_failed"]
