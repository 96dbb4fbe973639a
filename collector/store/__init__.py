"""Where the collector keeps a fleet's history: SQLite for one machine, PostgreSQL for more.

:func:`open_store` opens a store from a URL (``sqlite:///fleet.db``, ``sqlite:////abs/fleet.db``,
``postgresql://user@host/db?schema=edgeship``) and brings its schema up to
:data:`SCHEMA_VERSION` (the ``schema_version`` table records every migration applied; a store
written by a newer edgeship is refused, not downgraded).

Writes go through :meth:`Store.insert_batch`, one transaction per batch: each record is
inserted into ``messages`` under the unique key ``(fleet, device, boot, seq)`` with ``ON
CONFLICT DO NOTHING``, so the *store* drops duplicates, also when two collectors race on a
redelivered message; only the rows that were new go on to ``telemetry`` and to the running
aggregates in ``boots`` (per boot: seq range and count, from which gaps are counted) and
``devices`` (last status, model, last seen). Aggregates merge commutatively (sums, min/max,
newest-wins by receive time), so concurrent writers and any arrival order give the same rows.
A fleet's ``rollouts`` messages go to ``edgeship_rollouts``, one row per rollout replaced only
by a higher ``seq``: the same rows in any arrival order too.

A batch the database refuses for what it holds (a value it cannot store: text it cannot encode,
a number out of range, a constraint an operator added) raises :class:`RecordError`; the collector
then splits the batch until the refused record is alone (``collector.service``). Every other
failure (the database down, locked, out of space) is a plain :class:`StoreError`, and the whole
batch is tried again later.

Tables (schema version 5; column types shown for SQLite, PostgreSQL uses BIGINT, DOUBLE
PRECISION and BYTEA)::

    schema_version(version PK, applied_at, description)
    messages(fleet, device, boot, seq, kind, ts, received_at, body)   PK (fleet, device, boot, seq)
        body: the JSON text of status / outliers / cmd/reply messages; NULL for telemetry
    telemetry(fleet, device, boot, seq, ts, received_at, window_start, window_s, model,
              model_version, inferences, errors, outliers, p50, p95, p99, max_ms,
              latency_bounds, latency_counts, score_bounds, score_counts, predictions,
              cpu_percent, system_cpu_percent, rss_bytes, mem_available_bytes, temperature_c,
              throttled, spool_depth, spool_dropped, drops_since_last, deploy)
        index (fleet, device, received_at); histograms as JSON arrays, bounds NULL when they
        are the protocol's standard LATENCY_BUCKETS_MS / SCORE_BUCKETS; deploy the window's
        remote deploy outcome as JSON (NULL without one)
    boots(fleet, device, boot, min_seq, max_seq, messages, first_received, last_received)
    devices(fleet, device, first_seen, last_seen, messages, duplicates, boot, status,
            status_at, status_seq, agent_version, runtime, host, model, model_version,
            model_at, last_telemetry_at, window_s, deploy, deploy_at)
        deploy: the newest remote deploy outcome (JSON) from status or telemetry, deploy_at
        when it was received
    dead_letters(id, received_at, topic, size, field, error, payload, digest)
        digest: SHA-256 of the topic and the whole payload, unique: a message the broker
        redelivers (not acknowledged before a crash) is kept once; NULL for rows of version 2
    edgeship_alerts(id, fleet, device, rule, severity, state, summary, value, started_at,
                    updated_at, resolved_at, source)
        the alert history of a PostgreSQL store's collectors (collector.alert_history): only
        their leader writes it, and a new leader reads what is firing from it (not named
        ``alerts``: a SQLite AlertStore, --alerts-db, may share the file under that name)
    edgeship_rollouts(fleet, id, seq, ts, started, received_at, state, deploy, model,
                      model_version, soak_s, wave, waves_total, devices_total, counts, reason,
                      waves, devices)                                      PK (fleet, id)
        the newest state of each staged rollout (the ``rollouts`` message with the highest
        seq; an older or equal one changes nothing); counts, waves and devices as JSON

psycopg is imported only when a PostgreSQL store is opened.

Modules: :mod:`~collector.store.protocol` (the :class:`Store` interface, its rows and errors),
:mod:`~collector.store.schema` (tables, migrations, shared SQL), :mod:`~collector.store.rows`
(records to rows and back), :mod:`~collector.store.reader` (the queries both stores share),
:mod:`~collector.store.sqlite` and :mod:`~collector.store.postgres`, :mod:`~collector.store.urls`.
"""

from __future__ import annotations

from pathlib import Path

from collector.errors import ConfigError
from collector.store.postgres import PostgresStore
from collector.store.protocol import (
    DEAD_LETTER_FIELDS,
    SCHEMA_VERSION,
    BootRange,
    DeadLetterRow,
    DeviceRow,
    EventRow,
    InsertResult,
    RecordError,
    RolloutRow,
    Store,
)
from collector.store.sqlite import SqliteStore
from collector.store.urls import redact_url, sqlite_path

__all__ = [
    "DEAD_LETTER_FIELDS",
    "SCHEMA_VERSION",
    "BootRange",
    "DeadLetterRow",
    "DeviceRow",
    "EventRow",
    "InsertResult",
    "PostgresStore",
    "RecordError",
    "RolloutRow",
    "SqliteStore",
    "Store",
    "open_store",
    "redact_url",
]


def open_store(url: str, *, migrate: bool = True) -> SqliteStore | PostgresStore:
    """Open the store at ``url`` and (unless ``migrate`` is False) bring its schema up to date.

    ``sqlite:///relative.db``, ``sqlite:////absolute/path.db`` or a plain file path;
    ``postgresql://user:password@host:5432/db`` with an optional ``?schema=NAME`` (created if
    missing; default ``public``). Raises ConfigError for a URL it cannot use, StoreError when
    the database cannot be opened.
    """
    scheme = url.split(":", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        return SqliteStore(sqlite_path(url), migrate=migrate)
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url, migrate=migrate)
    if scheme == "":
        return SqliteStore(Path(url), migrate=migrate)
    raise ConfigError(
        f"store URL {redact_url(url)!r}: use sqlite:///path.db or postgresql://user@host/db"
    )
