"""The schema (version 5; see :mod:`collector.store`), its migrations, and the SQL shared by
the SQLite and PostgreSQL stores, written once for both dialects."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from collector.errors import StoreError
from collector.store.protocol import SCHEMA_VERSION

__all__ = [
    "BOOT_COLUMNS",
    "DEAD_INSERT",
    "DEAD_INSERT_PG",
    "DEVICE_COLUMNS",
    "MESSAGE_COLUMNS",
    "MESSAGE_INSERT",
    "POSTGRES",
    "ROLLOUT_COLUMNS",
    "SQLITE",
    "TELEMETRY_COLUMNS",
    "TELEMETRY_INSERT",
    "apply_migrations",
    "rollout_upsert_sql",
    "schema_v1",
    "schema_v2",
    "schema_v3",
    "schema_v4",
    "schema_v5",
    "upsert_sql",
]

# --- the schema -----------------------------------------------------------------------------

TELEMETRY_COLUMNS = (
    "fleet", "device", "boot", "seq", "ts", "received_at", "window_start", "window_s",
    "model", "model_version", "inferences", "errors", "outliers", "p50", "p95", "p99", "max_ms",
    "latency_bounds", "latency_counts", "score_bounds", "score_counts", "predictions",
    "cpu_percent", "system_cpu_percent", "rss_bytes", "mem_available_bytes", "temperature_c",
    "throttled", "spool_depth", "spool_dropped", "drops_since_last", "deploy",
)  # fmt: skip

DEVICE_COLUMNS = (
    "fleet", "device", "first_seen", "last_seen", "messages", "duplicates", "boot", "status",
    "status_at", "status_seq", "agent_version", "runtime", "host", "model", "model_version",
    "model_at", "last_telemetry_at", "window_s", "deploy", "deploy_at",
)  # fmt: skip

BOOT_COLUMNS = (
    "fleet", "device", "boot", "min_seq", "max_seq", "messages", "first_received",
    "last_received",
)  # fmt: skip

# The newest state of each staged rollout; ``waves`` and ``devices`` (JSON) are read by
# Store.rollout only, the summaries leave them out.
ROLLOUT_COLUMNS = (
    "fleet", "id", "seq", "ts", "started", "received_at", "state", "deploy", "model",
    "model_version", "soak_s", "wave", "waves_total", "devices_total", "counts", "reason",
    "waves", "devices",
)  # fmt: skip


def schema_v1(d: _Dialect) -> tuple[str, ...]:
    real, big, text = d.real, d.bigint, "TEXT"
    return (
        f"""CREATE TABLE messages (
            fleet {text} NOT NULL, device {text} NOT NULL, boot {text} NOT NULL,
            seq {big} NOT NULL, kind {text} NOT NULL, ts {real} NOT NULL,
            received_at {real} NOT NULL, body {text},
            PRIMARY KEY (fleet, device, boot, seq)){d.without_rowid}""",
        """CREATE INDEX messages_events ON messages (fleet, device, kind, received_at)
            WHERE kind <> 'telemetry'""",
        f"""CREATE TABLE telemetry (
            fleet {text} NOT NULL, device {text} NOT NULL, boot {text} NOT NULL,
            seq {big} NOT NULL, ts {real} NOT NULL, received_at {real} NOT NULL,
            window_start {real} NOT NULL, window_s {real} NOT NULL,
            model {text}, model_version {text},
            inferences {big} NOT NULL, errors {big} NOT NULL, outliers {big} NOT NULL,
            p50 {real}, p95 {real}, p99 {real}, max_ms {real},
            latency_bounds {text}, latency_counts {text} NOT NULL,
            score_bounds {text}, score_counts {text} NOT NULL, predictions {text} NOT NULL,
            cpu_percent {real}, system_cpu_percent {real}, rss_bytes {big},
            mem_available_bytes {big}, temperature_c {real}, throttled {big},
            spool_depth {big} NOT NULL, spool_dropped {big} NOT NULL,
            drops_since_last {big} NOT NULL)""",
        "CREATE INDEX telemetry_by_device ON telemetry (fleet, device, received_at)",
        f"""CREATE TABLE boots (
            fleet {text} NOT NULL, device {text} NOT NULL, boot {text} NOT NULL,
            min_seq {big} NOT NULL, max_seq {big} NOT NULL, messages {big} NOT NULL,
            first_received {real} NOT NULL, last_received {real} NOT NULL,
            PRIMARY KEY (fleet, device, boot))""",
        f"""CREATE TABLE devices (
            fleet {text} NOT NULL, device {text} NOT NULL,
            first_seen {real}, last_seen {real},
            messages {big} NOT NULL, duplicates {big} NOT NULL, boot {text},
            status {text}, status_at {real}, status_seq {big},
            agent_version {text}, runtime {text}, host {text},
            model {text}, model_version {text}, model_at {real},
            last_telemetry_at {real}, window_s {real},
            PRIMARY KEY (fleet, device))""",
        f"""CREATE TABLE dead_letters (
            id {d.serial_pk}, received_at {real} NOT NULL, topic {text} NOT NULL,
            size {big} NOT NULL, field {text} NOT NULL, error {text} NOT NULL,
            payload {d.blob} NOT NULL)""",
        "CREATE INDEX dead_letters_by_time ON dead_letters (received_at)",
    )


def schema_v2(d: _Dialect) -> tuple[str, ...]:
    return (
        "ALTER TABLE telemetry ADD COLUMN deploy TEXT",
        "ALTER TABLE devices ADD COLUMN deploy TEXT",
        f"ALTER TABLE devices ADD COLUMN deploy_at {d.real}",
    )


def schema_v3(d: _Dialect) -> tuple[str, ...]:
    return (
        "ALTER TABLE dead_letters ADD COLUMN digest TEXT",
        "CREATE UNIQUE INDEX dead_letters_by_digest ON dead_letters (digest)",
    )


def schema_v4(d: _Dialect) -> tuple[str, ...]:
    # Not "alerts": a schema-3 collector's AlertStore (--alerts-db fleet.db) or another
    # application may have a table of that name in the same database.
    real = d.real
    return (
        f"""CREATE TABLE edgeship_alerts (
            id TEXT PRIMARY KEY, fleet TEXT NOT NULL, device TEXT, rule TEXT NOT NULL,
            severity TEXT NOT NULL, state TEXT NOT NULL, summary TEXT NOT NULL, value {real},
            started_at {real} NOT NULL, updated_at {real} NOT NULL, resolved_at {real},
            source TEXT NOT NULL)""",
        "CREATE INDEX edgeship_alerts_by_state ON edgeship_alerts (state, started_at)",
    )


def schema_v5(d: _Dialect) -> tuple[str, ...]:
    # Not "rollouts", for the reason v4's table is not "alerts": another application sharing
    # the database (a PostgreSQL public schema) may own a table of that name.
    real, big = d.real, d.bigint
    return (
        f"""CREATE TABLE edgeship_rollouts (
            fleet TEXT NOT NULL, id TEXT NOT NULL, seq {big} NOT NULL, ts {real} NOT NULL,
            started {real} NOT NULL, received_at {real} NOT NULL, state TEXT NOT NULL,
            deploy TEXT NOT NULL, model TEXT, model_version TEXT, soak_s {real} NOT NULL,
            wave {big} NOT NULL, waves_total {big} NOT NULL, devices_total {big} NOT NULL,
            counts TEXT NOT NULL, reason TEXT, waves TEXT NOT NULL, devices TEXT NOT NULL,
            PRIMARY KEY (fleet, id))""",
        "CREATE INDEX edgeship_rollouts_by_start ON edgeship_rollouts (fleet, started)",
        "CREATE INDEX edgeship_rollouts_by_state ON edgeship_rollouts (state)",
    )


# version -> (description, DDL); applied in order inside one transaction each.
_MIGRATIONS: dict[int, tuple[str, Callable[[_Dialect], tuple[str, ...]]]] = {
    1: ("messages, telemetry, boots, devices, dead_letters", schema_v1),
    2: ("remote deploy outcomes: telemetry.deploy, devices.deploy, devices.deploy_at", schema_v2),
    3: ("dead letters kept once per message: dead_letters.digest", schema_v3),
    4: ("the alert history shared by a fleet's collectors: edgeship_alerts", schema_v4),
    5: ("the newest state of each staged rollout: edgeship_rollouts", schema_v5),
}


@dataclass(frozen=True)
class _Dialect:
    real: str
    bigint: str
    blob: str
    serial_pk: str
    without_rowid: str
    least: str
    greatest: str


SQLITE = _Dialect("REAL", "INTEGER", "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT",
                   " WITHOUT ROWID", "min", "max")  # fmt: skip
POSTGRES = _Dialect("DOUBLE PRECISION", "BIGINT", "BYTEA", "BIGSERIAL PRIMARY KEY", "",
                     "LEAST", "GREATEST")  # fmt: skip


def _newer(col: str, at: str = "status_at", tie: str | None = "status_seq") -> str:
    """SET expression: take the incoming ``col`` when the incoming row is newer by ``at``."""
    tie_cond = (
        f" OR (excluded.{at} = devices.{at} AND excluded.{tie} > devices.{tie})" if tie else ""
    )
    return (
        f"{col} = CASE WHEN excluded.{at} IS NOT NULL AND (devices.{at} IS NULL "
        f"OR excluded.{at} > devices.{at}{tie_cond}) THEN excluded.{col} ELSE devices.{col} END"
    )


_DEVICE_PG_TYPES = (
    "text", "text", "float8", "float8", "int8", "int8", "text", "text", "float8", "int8",
    "text", "text", "text", "text", "text", "float8", "float8", "float8", "text", "float8",
)  # fmt: skip
_BOOT_PG_TYPES = ("text", "text", "text", "int8", "int8", "int8", "float8", "float8")


def _unnest(types: Sequence[str]) -> str:
    """PostgreSQL: rows from one array parameter per column (one statement for a batch)."""
    return f"SELECT * FROM unnest({', '.join(f'%s::{t}[]' for t in types)})"


def upsert_sql(d: _Dialect, *, arrays: bool = False) -> tuple[str, str]:
    """(devices upsert, boots upsert); ``arrays`` takes one array per column (PostgreSQL)."""
    lo, hi = d.least, d.greatest

    def values(columns: Sequence[str], types: Sequence[str]) -> str:
        return _unnest(types) if arrays else f"VALUES ({', '.join('?' for _ in columns)})"

    def coalesced(fn: str, col: str, table: str) -> str:
        return (
            f"{col} = {fn}(COALESCE({table}.{col}, excluded.{col}), "
            f"COALESCE(excluded.{col}, {table}.{col}))"
        )

    device_sets = [
        coalesced(lo, "first_seen", "devices"),
        coalesced(hi, "last_seen", "devices"),
        "messages = devices.messages + excluded.messages",
        "duplicates = devices.duplicates + excluded.duplicates",
        _newer("boot", "last_seen", None),
        *(
            _newer(c)
            for c in ("status", "status_seq", "agent_version", "runtime", "host", "status_at")
        ),
        *(_newer(c, "model_at", None) for c in ("model", "model_version", "model_at")),
        _newer("window_s", "last_telemetry_at", None),
        *(_newer(c, "deploy_at", None) for c in ("deploy", "deploy_at")),
        coalesced(hi, "last_telemetry_at", "devices"),
    ]
    # SET expressions read the row as it was before the update, so the order above is free.
    devices = (
        f"INSERT INTO devices ({', '.join(DEVICE_COLUMNS)}) "
        f"{values(DEVICE_COLUMNS, _DEVICE_PG_TYPES)} "
        f"ON CONFLICT (fleet, device) DO UPDATE SET {', '.join(device_sets)}"
    )
    boots = (
        f"INSERT INTO boots ({', '.join(BOOT_COLUMNS)}) "
        f"{values(BOOT_COLUMNS, _BOOT_PG_TYPES)} "
        f"ON CONFLICT (fleet, device, boot) DO UPDATE SET "
        f"min_seq = {lo}(boots.min_seq, excluded.min_seq), "
        f"max_seq = {hi}(boots.max_seq, excluded.max_seq), "
        f"messages = boots.messages + excluded.messages, "
        f"first_received = {lo}(boots.first_received, excluded.first_received), "
        f"last_received = {hi}(boots.last_received, excluded.last_received)"
    )
    return devices, boots


def rollout_upsert_sql(d: _Dialect) -> str:
    """Insert rollout rows, or replace a stored row by one with a higher ``seq`` (an older or
    equal one changes nothing); PostgreSQL takes one array per column and returns the keys of
    the rows written, SQLite one row of ``?`` at a time (its change count says the same)."""
    columns = ", ".join(ROLLOUT_COLUMNS)
    if d is POSTGRES:
        values = _unnest(_ROLLOUT_PG_TYPES)
    else:
        values = f"VALUES ({', '.join('?' for _ in ROLLOUT_COLUMNS)})"
    sets = ", ".join(f"{c} = excluded.{c}" for c in ROLLOUT_COLUMNS[2:])
    returning = " RETURNING fleet, id" if d is POSTGRES else ""
    return (
        f"INSERT INTO edgeship_rollouts ({columns}) {values} ON CONFLICT (fleet, id) DO UPDATE "
        f"SET {sets} WHERE excluded.seq > edgeship_rollouts.seq{returning}"
    )


_ROLLOUT_PG_TYPES = (
    "text", "text", "int8", "float8", "float8", "float8", "text", "text", "text", "text",
    "float8", "int8", "int8", "int8", "text", "text", "text", "text",
)  # fmt: skip


MESSAGE_COLUMNS = "fleet, device, boot, seq, kind, ts, received_at, body"
MESSAGE_INSERT = (
    f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)
DEAD_INSERT = (
    "INSERT INTO dead_letters (received_at, topic, size, field, error, payload, digest) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
DEAD_INSERT_PG = (
    "INSERT INTO dead_letters (received_at, topic, size, field, error, payload, digest) "
    "SELECT * FROM unnest(%s::float8[], %s::text[], %s::int8[], %s::text[], %s::text[], "
    "%s::bytea[], %s::text[]) ON CONFLICT DO NOTHING RETURNING id"
)
TELEMETRY_INSERT = (
    f"INSERT INTO telemetry ({', '.join(TELEMETRY_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in TELEMETRY_COLUMNS)})"
)


def apply_migrations(execute: Callable[..., Any], dialect: _Dialect, where: str) -> None:
    execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
        f"applied_at {dialect.real} NOT NULL, description TEXT NOT NULL)"
    )
    rows = execute("SELECT MAX(version) FROM schema_version").fetchall()
    current = int(rows[0][0] or 0)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"store {where} has schema version {current}, newer than this edgeship's "
            f"{SCHEMA_VERSION}; upgrade edgeship"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        description, ddl = _MIGRATIONS[version]
        for statement in ddl(dialect):
            execute(statement)
        execute(
            "INSERT INTO schema_version (version, applied_at, description) VALUES "
            + ("(?, ?, ?)" if dialect is SQLITE else "(%s, %s, %s)"),
            (version, time.time(), description),
        )
