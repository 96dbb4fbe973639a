"""Alert rules, the firing -> resolved lifecycle, the TOML format, and the alert history,
driven through the monitor over a real SQLite store with a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collector.alerts import RULES, AlertRecord, AlertsConfig, AlertStore, load_alerts_config
from collector.drift import Reference, ReferenceSet
from collector.errors import StoreError
from collector.monitor import Monitor, MonitorConfig, default_alerts_db
from device_agent.errors import ConfigError
from sdk.reference import ReferenceStats
from tests.collector_helpers import (
    LABELS,
    UNIFORM,
    Fleet,
    gamma_score_counts,
    reference_doc,
)


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    f = Fleet(tmp_path)
    yield f
    f.close()


def test_offline_fires_once_and_resolves_under_the_same_id(fleet: Fleet) -> None:
    fleet.online("pi-1")
    fleet.telemetry("pi-1")
    assert fleet.tick(1) == []
    fleet.offline("pi-1")
    assert fleet.tick(1) == [("firing", "pi-1", "offline")]
    for _ in range(5):  # de-duplicated: nothing is sent again while it keeps firing
        assert fleet.tick(1) == []
    fired = fleet.sent[-1][1]
    assert fired.severity == "critical" and fired.state == "firing"
    assert [a.rule for a in fleet.monitor.engine.firing()] == ["offline"]
    fleet.online("pi-1")
    fleet.telemetry("pi-1")
    assert fleet.tick(1) == [("resolved", "pi-1", "offline")]
    assert fleet.sent[-1][1].id == fired.id
    history = fleet.monitor.alerts_dict()
    assert history["firing"] == [] and history["recent"][0]["state"] == "resolved"
    assert history["recent"][0]["id"] == fired.id and history["recent"][0]["resolved_at"]


def test_stale_and_telemetry_rules(fleet: Fleet) -> None:
    fleet.online("pi-1")
    fleet.online("pi-2")
    for _ in range(6):
        fleet.telemetry("pi-1", median_ms=8.0)
        fleet.telemetry("pi-2", median_ms=8.0, outlier_share=0.3, temperature=84.0, throttled=0x4)
        fleet.tick(10)
    sent = {(d, r) for s, d, r in fleet.tick(1)} | {(a.device, a.rule) for _, a in fleet.sent}
    assert ("pi-2", "outlier_rate") in sent and ("pi-2", "throttled") in sent
    assert not any(d == "pi-1" for d, _ in sent)
    rate = next(a for _, a in fleet.sent if a.rule == "outlier_rate")
    assert rate.value == pytest.approx(0.3) and "30.0% of 100 inferences" in rate.summary
    throttled = next(a for _, a in fleet.sent if a.rule == "throttled")
    assert "throttled" in throttled.summary and throttled.value == 4
    # pi-1 goes quiet: stale after 3 windows of 10 s; its telemetry rules have nothing to say.
    for _ in range(4):
        fleet.telemetry("pi-2")
        changes = fleet.tick(10)
    assert ("firing", "pi-1", "stale") in changes or ("pi-1", "stale") in {
        (a.device, a.rule) for a in fleet.monitor.engine.firing()
    }
    resolved = {
        (d, r)
        for s, d, r in [(a.state, a.device, a.rule) for _, a in fleet.sent]
        if s == "resolved"
    }
    assert ("pi-2", "outlier_rate") in resolved and ("pi-2", "throttled") in resolved


def test_p95_threshold_from_toml_per_model_and_from_the_bundle_budget(tmp_path: Path) -> None:
    toml = tmp_path / "alerts.toml"
    toml.write_text(
        "[rules.p95_latency]\nthreshold_ms = 100.0\nwindows = 3\n"
        '[rules.p95_latency.models]\n"fast-model" = 5.0\n'
    )
    rng = np.random.default_rng(1)
    doc = reference_doc(dict(zip(LABELS, UNIFORM, strict=True)), gamma_score_counts(rng))
    budget = Reference("digits-cnn", "1", ReferenceStats.from_dict(doc), "b", p95_budget_ms=6.0)
    f = Fleet(
        tmp_path,
        MonitorConfig(alerts=load_alerts_config(toml), alerts_db=":memory:"),
        references=ReferenceSet([budget]),
    )
    try:
        for _ in range(3):
            f.telemetry("a", median_ms=8.0, model="fast-model")  # 8 ms > the 5 ms model threshold
            f.telemetry("b", median_ms=8.0)  # digits-cnn@1: > its bundle's 6 ms p95 budget
            f.telemetry("c", median_ms=8.0, model="other")  # < the default 100 ms
            f.tick(10)
        firing = {(a.device, a.rule): a for a in f.monitor.engine.firing()}
        assert set(firing) == {("a", "p95_latency"), ("b", "p95_latency")}
        assert "5 ms threshold for fast-model" in firing[("a", "p95_latency")].summary
        assert "6 ms p95 budget of digits-cnn@1" in firing[("b", "p95_latency")].summary
    finally:
        f.close()


def test_drift_alert_with_hysteresis(fleet: Fleet) -> None:
    shifted = (0.3, 0.3) + (0.05,) * 8
    for _ in range(12):  # the device's own baseline: 12 windows x 100 (no reference)
        fleet.telemetry("pi-1")
        assert fleet.tick(10) == []
    fired_after = None
    for j in range(1, 6):
        fleet.telemetry("pi-1", probs=shifted)
        if ("firing", "pi-1", "drift") in fleet.tick(10):
            fired_after = j
            break
    assert fired_after is not None and fired_after <= 3
    alert = fleet.sent[-1][1]
    assert alert.value is not None and alert.value >= 0.25 and "first windows" in alert.summary
    for _ in range(12):  # back to normal: resolves once PSI < 0.1 (not as soon as < 0.25)
        fleet.telemetry("pi-1")
        if ("resolved", "pi-1", "drift") in fleet.tick(10):
            break
    else:
        pytest.fail("the drift alert did not resolve")
    assert fleet.sent[-1][1].value is not None and fleet.sent[-1][1].value < 0.1


def test_gaps_and_spool_drops(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    try:
        f.online("pi-1")
        f.telemetry("pi-1")
        f.tick(1)
        f.seq["pi-1"] += 5  # five numbers never arrive...
        f.telemetry("pi-1", drops=5, dropped=5)  # ...because the spool dropped them
        assert ("firing", "pi-1", "spool_drops") in f.tick(1)
        assert f.tick(10) == []  # gaps must hold for 30 s (late messages fill transient gaps)
        assert ("firing", "pi-1", "gaps") in f.tick(25)
        gap = next(a for _, a in f.sent if a.rule == "gaps")
        assert gap.value == 5 and "dropped by the device's full spool" in gap.summary
        assert gap.severity == "info"
        changes = f.tick(300)  # no new gaps or drops for a period: both resolve
        assert ("resolved", "pi-1", "gaps") in changes
        assert ("resolved", "pi-1", "spool_drops") in changes
    finally:
        f.close()


def test_firing_alerts_survive_a_restart(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    f.online("pi-1")
    f.offline("pi-1")
    assert f.tick(1) == [("firing", "pi-1", "offline")]
    first = f.sent[-1][1]
    f.monitor.stop()
    again = Monitor(
        f.state, f.store, f.config, clock=f.clock, publish=lambda fl, a: f.sent.append((fl, a))
    )
    assert [a.id for a in again.engine.firing()] == [first.id]
    f.clock.advance(1)
    again.tick()
    assert len(f.sent) == 1  # not raised a second time
    f.online("pi-1")
    f.clock.advance(1)
    f.state.invalidate()
    again.tick()
    assert (f.sent[-1][1].state, f.sent[-1][1].id) == ("resolved", first.id)
    again.stop()
    f.store.close()


def test_disabled_rule_and_toml_errors(tmp_path: Path) -> None:
    cfg = AlertsConfig.from_dict(
        {"rules": {"offline": {"enabled": False}}, "drift": {"windows": 4}}
    )
    assert not cfg.rules["offline"].enabled and cfg.drift.windows == 4
    assert set(cfg.rules) == set(RULES)
    assert cfg.rules["stale"].severity == "warning"  # untouched rules keep their defaults
    bad = [
        ({"rules": {"offlin": {}}}, "unknown rule"),
        ({"rules": {"offline": {"threshold": 1}}}, "unknown keys"),
        ({"rules": {"stale": {"severity": "page"}}}, "not one of"),
        ({"rules": {"outlier_rate": {"threshold": 5}}}, "fraction"),
        ({"rules": {"p95_latency": {"windows": 0}}}, "integer >= 1"),
        ({"drift": {"windowz": 3}}, "unknown key"),
        ({"drift": {"moderate": 0.5}}, "moderate <= significant"),
        ({"alerts": {}}, "unknown keys"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            AlertsConfig.from_dict(data)
    (tmp_path / "bad.toml").write_text("[rules\n")
    with pytest.raises(ConfigError, match="not a readable TOML file"):
        load_alerts_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_alerts_config(tmp_path / "missing.toml")
    assert default_alerts_db("sqlite:///data/fleet.db") == "data/fleet.alerts.db"
    assert default_alerts_db("sqlite:////var/lib/fleet.db") == "/var/lib/fleet.alerts.db"
    assert default_alerts_db("postgresql://u@h/db") == ":memory:"


def test_example_alerts_toml_is_valid() -> None:
    cfg = load_alerts_config(
        Path(__file__).parent.parent / "examples" / "collector" / "alerts.toml"
    )
    assert cfg.rules["p95_latency"].threshold == 50.0


class _FailingSaves:
    """A real alert history (SQLite) whose next ``fail`` saves raise StoreError, as a store
    that is briefly down does."""

    def __init__(self, path: Path) -> None:
        self.real = AlertStore(path)
        self.fail = 0
        self.saved: list[tuple[str, str]] = []

    @property
    def path(self) -> str:
        return self.real.path

    def save(self, record: AlertRecord) -> None:
        if self.fail:
            self.fail -= 1
            raise StoreError("the alert history is down (injected)")
        self.real.save(record)
        self.saved.append((record.id, record.state))

    def firing(self) -> list[AlertRecord]:
        return self.real.firing()

    def recent(self, limit: int = 100, state: str | None = None) -> list[AlertRecord]:
        return self.real.recent(limit, state)

    def close(self) -> None:
        self.real.close()


def test_a_change_whose_save_failed_is_stored_and_published_once_the_store_is_back(
    tmp_path: Path,
) -> None:
    history = _FailingSaves(tmp_path / "alerts.db")
    f = Fleet(tmp_path, alert_history=history)
    try:
        f.online("pi-1")
        f.online("pi-2")
        f.offline("pi-1")
        f.offline("pi-2")
        history.fail = 1  # pi-1's alert is saved first (views in device order): it fails
        with pytest.raises(StoreError, match="injected"):
            f.tick(1)
        # pi-2's alert was stored in that round: it is published too, not lost with the round.
        assert [(a.state, a.device) for _, a in f.sent] == [("firing", "pi-2")]
        assert [a.device for a in f.monitor.engine.firing()] == ["pi-2"]
        assert f.tick(1) == [("firing", "pi-1", "offline")]  # retried: stored, then published
        assert f.tick(1) == []  # and only once
        fired = {a.device: a.id for _, a in f.sent}
        assert sorted(history.saved) == sorted((i, "firing") for i in fired.values())
        assert {r.device for r in history.firing()} == {"pi-1", "pi-2"}

        f.online("pi-1")
        history.fail = 1  # the resolution's save fails: pi-1 still counts as firing
        with pytest.raises(StoreError):
            f.tick(1)
        assert {a.device for a in f.monitor.engine.firing()} == {"pi-1", "pi-2"}
        assert f.tick(1) == [("resolved", "pi-1", "offline")]
        assert f.tick(1) == []
        assert history.saved.count((fired["pi-1"], "resolved")) == 1
        assert [r.device for r in history.firing()] == ["pi-2"]
        assert len(f.sent) == 3
    finally:
        f.close()
