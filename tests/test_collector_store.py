"""collector.store on real SQLite and PostgreSQL, and the pure parts of collector.state.

PostgreSQL tests use a schema of their own (``?schema=test_<random>``), dropped afterwards;
they are skipped when no server answers on EDGESHIP_TEST_POSTGRES (default
postgresql://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.alert_history import AlertRecord, AlertStore
from collector.errors import ConfigError, StoreError
from collector.ingest import DeadLetter, EventRecord, Record, TelemetryRecord, ingest
from collector.state import (
    FleetState,
    StateConfig,
    count_gaps,
    device_status,
    histogram_quantile,
)
from collector.store import (
    SCHEMA_VERSION,
    BootRange,
    DeviceRow,
    PostgresStore,
    RecordError,
    SqliteStore,
    open_store,
    redact_url,
)
from collector.store.schema import SQLITE, schema_v1, schema_v2, schema_v3
from device_agent.contracts.messages import encode, topic
from tests.test_collector_ingest import DEVICE, FLEET, NOW, outlier, status, telemetry

PG_URL = os.environ.get("EDGESHIP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_URL, connect_timeout=3).close()
        return True
    except Exception:
        return False


def pg_url() -> str:
    return f"{PG_URL}?schema=test_{uuid.uuid4().hex[:12]}"


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


def rec(msg: Any, received_at: float = NOW, kind: str | None = None) -> Record:
    out = ingest(topic(FLEET, msg.device, kind or msg.KIND), encode(msg), received_at)
    assert isinstance(out, TelemetryRecord | EventRecord), out
    return out


# --- writing ---------------------------------------------------------------------------------


def test_schema_is_versioned_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    s = open_store(f"sqlite:///{path}")
    assert s.schema_version() == SCHEMA_VERSION
    s.close()
    again = open_store(f"sqlite:///{path}")  # opening twice migrates nothing
    assert again.schema_version() == SCHEMA_VERSION
    again.close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 0, 'from the future')")
    with pytest.raises(StoreError, match="schema version 99, newer"):
        open_store(f"sqlite:///{path}")


def _schema_3_store(path: Path) -> None:
    """A store as a schema-3 edgeship left it."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL, "
            "description TEXT NOT NULL)"
        )
        for version, ddl in ((1, schema_v1), (2, schema_v2), (3, schema_v3)):
            for statement in ddl(SQLITE):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, 0, 'old')", (version,))


def test_upgrade_to_4_beside_an_alert_store_in_the_same_sqlite_file(tmp_path: Path) -> None:
    """A schema-3 collector run with --alerts-db fleet.db kept its AlertStore (table
    ``alerts``) in the store's file: the upgrade keeps that table and its rows."""
    path = tmp_path / "fleet.db"
    _schema_3_store(path)
    old = AlertStore(path)
    record = AlertRecord(
        id="offline-1", fleet=FLEET, device=DEVICE, rule="offline", severity="critical",
        state="firing", summary="offline", value=None, started_at=NOW, updated_at=NOW,
        resolved_at=None, source="col-a",
    )  # fmt: skip
    old.save(record)
    old.close()
    s = open_store(f"sqlite:///{path}")
    assert s.schema_version() == SCHEMA_VERSION
    s.close()
    again = AlertStore(path)
    assert again.firing() == [record]
    again.close()
    with sqlite3.connect(path) as conn:  # a table that is not ours under our name: refused
        conn.execute("DROP TABLE edgeship_alerts")
        conn.execute("DELETE FROM schema_version WHERE version >= 4")
        conn.execute("CREATE TABLE edgeship_alerts (x INTEGER)")
    with pytest.raises(StoreError, match="edgeship_alerts"):
        open_store(f"sqlite:///{path}")


def test_a_postgresql_schema_with_another_applications_alerts_table() -> None:
    if not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    import psycopg

    url = pg_url()
    schema = url.rsplit("=", 1)[1]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.alerts (x INTEGER)")  # not ours
    s = open_store(url)
    try:
        assert s.schema_version() == SCHEMA_VERSION
    finally:
        s.drop_schema()
        s.close()


def test_store_urls() -> None:
    with pytest.raises(ConfigError, match="sqlite:///"):
        open_store("mysql://x/y")
    with pytest.raises(ConfigError, match="sqlite:///relative"):
        open_store("sqlite://fleet.db")
    assert redact_url("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert "secret" not in redact_url("postgresql://u:secret@h:5/db?schema=x")
    query = "postgresql://edge@db:5432/fleet?password=hunter2&schema=s1"
    assert redact_url(query) == "postgresql://edge@db:5432/fleet?password=***&schema=s1"
    both = redact_url("postgresql://u:pw1@h/db?sslmode=require&PassWord=pw2&sslpassword=pw3")
    assert both == "postgresql://u:***@h/db?sslmode=require&PassWord=***&sslpassword=***"
    assert redact_url("postgresql://u@h/db?schema=x") == "postgresql://u@h/db?schema=x"


def test_insert_batch_drops_duplicates_within_and_across_batches(store: Any) -> None:
    batch = [rec(status()), rec(telemetry(seq=2)), rec(telemetry(seq=3)), rec(outlier(seq=4))]
    first = store.insert_batch([*batch, batch[1]])
    assert (first.received, first.new, first.duplicates) == (5, 4, 1)
    assert first.new_by_kind == {"status": 1, "telemetry": 2, "outliers": 1}
    again = store.insert_batch([rec(telemetry(seq=3), NOW + 5), rec(telemetry(seq=5), NOW + 5)])
    assert (again.new, again.duplicates) == (1, 1)
    assert store.count_messages(FLEET) == {"status": 1, "telemetry": 3, "outliers": 1}
    (device,) = store.devices(FLEET)
    assert (device.messages, device.duplicates) == (5, 2)


def test_telemetry_round_trips_through_the_store(store: Any) -> None:
    original = rec(telemetry(seq=7))
    odd_bounds = rec(telemetry(seq=8).__class__(**{
        **telemetry(seq=8).__dict__,
        "scores": telemetry().scores.__class__((1.0, 2.0), (0, 3, 1)),
    }))  # fmt: skip
    store.insert_batch([original, odd_bounds])
    back = store.telemetry(FLEET, DEVICE)
    assert back == [original, odd_bounds]
    assert store.latest_telemetry(FLEET) == [odd_bounds]
    assert store.telemetry(FLEET, DEVICE, limit=1) == [odd_bounds]
    assert store.telemetry(FLEET, since=NOW + 1) == []


def test_device_row_takes_the_newest_status_by_receive_time(store: Any) -> None:
    # The will carries the seq and ts of its connect, older than the birth's; it still wins
    # when it arrives later, because status is ordered by when it was received.
    will = rec(status("offline", seq=10), NOW + 30)
    birth = rec(status("online", seq=11), NOW)
    store.insert_batch([will])
    store.insert_batch([birth])
    (row,) = store.devices(FLEET)
    assert (row.status, row.status_at, row.status_seq) == ("offline", NOW + 30, 10)
    store.insert_batch([rec(status("online", seq=12), NOW + 40)])
    (row,) = store.devices(FLEET)
    assert (row.status, row.agent_version, row.host) == ("online", "0.1.0", {"arch": "aarch64"})
    store.insert_batch([rec(telemetry(seq=13, model="other"), NOW + 41)])
    (row,) = store.devices(FLEET)
    assert (row.model, row.window_s, row.last_telemetry_at) == ("other", 10.0, NOW + 41)
    events = store.events(FLEET, DEVICE)
    assert [e.seq for e in events] == [12, 10, 11]
    assert events[0].body["state"] == "online"


def test_boot_ranges_and_dead_letters(store: Any) -> None:
    store.insert_batch([rec(telemetry(seq=s)) for s in (1, 2, 5)])
    bad = ingest(topic(FLEET, DEVICE, "telemetry"), b"{oops", NOW)
    other = ingest(topic(FLEET, DEVICE, "telemetry"), b"{oops!", NOW + 1)
    # The same message twice (a redelivery) is one dead letter; another message is another.
    first = store.insert_batch([], [bad, bad])  # type: ignore[list-item]
    assert (first.dead_letters, first.dead_letter_duplicates) == (1, 1)
    again = store.insert_batch([], [other, bad])  # type: ignore[list-item]
    assert (again.dead_letters, again.dead_letter_duplicates) == (1, 1)
    (r,) = store.boot_ranges(FLEET, DEVICE)
    assert (r.min_seq, r.max_seq, r.messages) == (1, 5, 3)
    assert count_gaps([r]).missing == 2
    assert store.dead_letter_counts() == {"payload": 2}
    newest = store.dead_letters(1)
    assert len(newest) == 1 and newest[0].payload == b"{oops!" and newest[0].field == "payload"


def test_a_value_the_database_refuses_is_a_record_error_and_nothing_of_the_batch_is_kept(
    store: Any,
) -> None:
    """Text it cannot encode, an integer over 64 bits, a NUL in PostgreSQL text: the store
    refuses the batch as a RecordError (the collector then splits it), not with a foreign
    exception, and keeps nothing of it; the next batch goes in."""
    good = rec(telemetry(seq=1))
    bad_values: list[Any] = [
        dataclasses.replace(good, seq=2, model="digits\ud800"),  # type: ignore[type-var]
        dataclasses.replace(good, seq=2**64),  # type: ignore[type-var]
    ]
    if isinstance(store, PostgresStore):
        bad_values.append(dataclasses.replace(good, seq=3, model="dig\x00its"))  # type: ignore[type-var]
    for bad in bad_values:
        with pytest.raises(RecordError):
            store.insert_batch([good, bad])
        assert store.count_messages(FLEET) == {}
    assert store.insert_batch([good]).new == 1


def test_dead_letters_hold_safe_text_and_are_kept_once_per_message(store: Any) -> None:
    """A dead letter is what a store must never refuse: its text is escaped, its payload kept
    as bytes; the same message again (a redelivery) is not stored twice."""
    raw = DeadLetter(
        "edgeship/f/\ud800/telemetry", NOW, 4, "k\x00", "bad \udc00", b"\x00\xff\xed\xa0"
    )
    first = store.insert_batch([], [raw, raw])
    again = store.insert_batch([], [dataclasses.replace(raw, received_at=NOW + 1)])
    assert (first.dead_letters, first.dead_letter_duplicates) == (1, 1)
    assert (again.dead_letters, again.dead_letter_duplicates) == (0, 1)
    (row,) = store.dead_letters()
    assert (row.topic, row.field, row.error) == (
        "edgeship/f/\\ud800/telemetry",
        "k\\x00",
        "bad \\udc00",
    )
    assert row.payload == raw.payload and row.size == 4


def test_postgres_writers_racing_on_the_same_messages_store_each_once() -> None:
    if not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    url = pg_url()
    stores = [PostgresStore(url) for _ in range(4)]
    try:
        batch = [rec(telemetry(seq=s)) for s in range(300)] + [rec(status(seq=300))]
        results: list[Any] = []
        barrier = threading.Barrier(len(stores))

        def write(s: PostgresStore, shift: int) -> None:
            barrier.wait()
            # Each writer sends the batch in its own order; the store sorts, so no deadlock.
            results.append(s.insert_batch(batch[shift:] + batch[:shift]))

        threads = [threading.Thread(target=write, args=(s, 77 * i)) for i, s in enumerate(stores)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert sum(r.new for r in results) == len(batch)
        assert sum(r.duplicates for r in results) == len(batch) * (len(stores) - 1)
        assert stores[0].count_messages(FLEET) == {"telemetry": 300, "status": 1}
        (row,) = stores[0].devices(FLEET)
        assert (row.messages, row.duplicates) == (301, 301 * 3)
        (boot,) = stores[0].boot_ranges(FLEET)
        assert (boot.min_seq, boot.max_seq, boot.messages) == (0, 300, 301)
    finally:
        stores[0].drop_schema()
        for s in stores:
            s.close()


def test_sqlite_store_is_shared_by_two_connections(tmp_path: Path) -> None:
    a = SqliteStore(tmp_path / "f.db")
    b = SqliteStore(tmp_path / "f.db")
    a.insert_batch([rec(telemetry(seq=1))])
    r = b.insert_batch([rec(telemetry(seq=1)), rec(telemetry(seq=2))])
    assert (r.new, r.duplicates) == (1, 1)
    assert a.count_messages() == {"telemetry": 2}
    a.close()
    b.close()


# --- the pure parts of the state ---------------------------------------------------------------


def _row(**over: Any) -> DeviceRow:
    values: dict[str, Any] = dict(
        fleet=FLEET, device=DEVICE, first_seen=NOW, last_seen=NOW, messages=1, duplicates=0,
        boot="b", status="online", status_at=NOW, status_seq=1, agent_version="1",
        runtime=None, host={}, model=None, model_version=None, model_at=None,
        last_telemetry_at=NOW, window_s=10.0,
    )  # fmt: skip
    values.update(over)
    return DeviceRow(**values)


def test_device_status_online_offline_stale_unknown() -> None:
    cfg = StateConfig(stale_windows=3)
    assert device_status(_row(), NOW + 29.9, cfg)[0] == "online"
    status_, reason = device_status(_row(), NOW + 30.1, cfg)
    assert status_ == "stale" and "3 windows of 10 s" in reason
    assert device_status(_row(status="offline"), NOW, cfg)[0] == "offline"
    assert device_status(_row(window_s=1.0), NOW + 3.5, cfg)[0] == "stale"
    never = _row(last_telemetry_at=None, window_s=None)
    assert device_status(never, NOW + 29, cfg)[0] == "online"  # default window 10 s
    assert device_status(never, NOW + 31, cfg)[0] == "stale"
    assert device_status(_row(status=None, last_telemetry_at=None), NOW, cfg)[0] == "unknown"


def test_histogram_quantile_interpolates_inside_buckets() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert histogram_quantile(0.5, bounds, (0, 10, 0, 0)) == pytest.approx(1.5)
    assert histogram_quantile(0.95, bounds, (50, 40, 10, 0)) == pytest.approx(3.0)
    assert histogram_quantile(0.99, bounds, (0, 0, 0, 5)) == 4.0  # overflow: the last bound
    assert histogram_quantile(0.5, bounds, (0, 0, 0, 0)) is None


def _boot(boot: str, lo: int, hi: int, n: int, t: float) -> BootRange:
    return BootRange(FLEET, DEVICE, boot, lo, hi, n, t, t)


def test_count_gaps_across_boots_and_counter_resets() -> None:
    # Two boots continue one counter: the gap between them (a lost will) counts.
    assert count_gaps([_boot("a", 0, 9, 10, 1), _boot("b", 11, 20, 10, 2)]).missing == 1
    # A new boot starting again at 0 (spool deleted) starts a new epoch.
    g = count_gaps([_boot("a", 0, 99, 90, 1), _boot("b", 0, 9, 10, 2)])
    assert (g.missing, g.epochs, g.first_seq, g.last_seq) == (10, 2, 0, 9)
    assert count_gaps([]).missing == 0


def test_fleet_state_with_an_injected_clock(store: Any) -> None:
    now = [NOW]
    store.insert_batch([rec(status(seq=1), NOW), rec(telemetry(seq=2), NOW)])
    state = FleetState(store, fleet=FLEET, config=StateConfig(cache_s=0), clock=lambda: now[0])
    snap = state.snapshot()
    (d,) = snap.devices
    assert d.status == "online" and d.inferences == 100 and d.outlier_rate == 0.05
    assert d.latency.p50 == pytest.approx(1.5 + 0.5 * 20 / 60)  # 30 in (1, 1.5], 60 in (1.5, 2]
    assert snap.to_dict()["summary"]["online"] == 1
    now[0] = NOW + 31
    state.invalidate()
    assert state.snapshot().devices[0].status == "stale"
    detail = state.device(DEVICE)
    assert detail is not None and len(detail.series) == 1 and detail.events[0].kind == "status"
    assert state.device("nobody") is None


def test_a_refused_value_on_a_link_that_breaks_is_retried_not_split() -> None:
    """The database refuses a value (a data exception) and the link breaks before the
    rollback: the rollback's error must end as a StoreError (the whole batch waits and is
    retried), never escape raw, which the collector would take for the batch's fault and
    split, dead-lettering what it could not store at that moment."""
    if not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    import psycopg

    from collector.worker import process_batch
    from tests.poison import good_windows, refuse_in_store, refused_by_store

    url = pg_url()
    s: Any = open_store(url)
    try:
        refuse_in_store(url)
        good = good_windows(FLEET, 2, 2)
        batch = [(t, p, NOW) for t, p in [good[0], refused_by_store(FLEET, 1), *good[1:]]]
        conn = s._conn
        real_rollback = conn.rollback

        def broken_rollback() -> None:
            conn.rollback = real_rollback
            conn.close()  # the link is gone: what a dropped connection gives a rollback
            raise psycopg.OperationalError("server closed the connection unexpectedly")

        conn.rollback = broken_rollback
        with pytest.raises(StoreError) as caught:
            process_batch(s, batch, FLEET)
        assert not isinstance(caught.value, RecordError), caught.value
        assert s.dead_letters() == []
        # The retry (the link back) splits the batch: the refused one alone is a dead letter.
        outcome = process_batch(s, batch, FLEET)
        assert outcome.refused == 1 and outcome.stored.new == 4
        assert [d.field for d in s.dead_letters()] == ["store"]
    finally:
        s.close()
