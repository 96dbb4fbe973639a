"""Staged rollouts in the collector (issue 14 item 2): the fleet-level ``rollouts`` topic is
ingested and the newest ``seq`` of each rollout is stored (SQLite and PostgreSQL, schema 5).

PostgreSQL tests use a schema of their own and are skipped when no server answers
(tests/test_collector_store.py's ``PG_URL``).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.errors import StoreError
from collector.ingest import DeadLetter, RolloutRecord, ingest
from collector.store import SCHEMA_VERSION, open_store
from collector.store.schema import SQLITE, schema_v1, schema_v2, schema_v3, schema_v4
from collector.worker import process_batch
from device_agent.contracts.messages import (
    ROLLOUT_STATES,
    RolloutEvent,
    encode,
    message_topic,
)
from tests.collector_helpers import FLEET
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
        "reverted": 1, "unreachable": 0,
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
