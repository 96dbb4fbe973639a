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

A batch the database refuses for what it holds (a value it cannot store: text it cannot encode,
a number out of range, a constraint an operator added) raises :class:`RecordError`; the collector
then splits the batch until the refused record is alone (``collector.service``). Every other
failure (the database down, locked, out of space) is a plain :class:`StoreError`, and the whole
batch is tried again later.

Tables (schema version 3; column types shown for SQLite, PostgreSQL uses BIGINT, DOUBLE
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

psycopg is imported only when a PostgreSQL store is opened.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from collector.errors import ConfigError, StoreError
from collector.ingest import DeadLetter, EventRecord, Record, TelemetryRecord
from device_agent.contracts.messages import (
    LATENCY_BUCKETS_MS,
    SCORE_BUCKETS,
    DeployEvent,
    StatusMessage,
    safe_text,
)

__all__ = [
    "SCHEMA_VERSION",
    "BootRange",
    "DeadLetterRow",
    "DeviceRow",
    "EventRow",
    "InsertResult",
    "PostgresStore",
    "RecordError",
    "SqliteStore",
    "Store",
    "open_store",
    "redact_url",
]

SCHEMA_VERSION = 3

# Store.dead_letter_counts names at most this many fields (the rest: "(other)").
DEAD_LETTER_FIELDS = 100


class RecordError(StoreError):
    """The store refused a batch for a value one of its records holds, not for its own state:
    trying the same batch again cannot succeed. The collector splits the batch until the
    refused record is alone and keeps that one as a dead letter (``field="store"``)."""


# --- what the store returns -----------------------------------------------------------------


@dataclass(frozen=True)
class InsertResult:
    """What one :meth:`Store.insert_batch` did. ``duplicates`` are records whose key was
    already stored (or appeared twice in the batch); ``new_by_kind`` counts the new ones.
    ``dead_letters`` counts the dead letters stored, ``dead_letter_duplicates`` those already
    stored (same digest: a redelivery) and so not stored again."""

    received: int
    new: int
    duplicates: int
    dead_letters: int
    new_by_kind: Mapping[str, int] = field(default_factory=dict)
    dead_letter_duplicates: int = 0

    def __add__(self, other: InsertResult) -> InsertResult:
        by_kind = dict(self.new_by_kind)
        for kind, n in other.new_by_kind.items():
            by_kind[kind] = by_kind.get(kind, 0) + n
        return InsertResult(
            self.received + other.received,
            self.new + other.new,
            self.duplicates + other.duplicates,
            self.dead_letters + other.dead_letters,
            by_kind,
            self.dead_letter_duplicates + other.dead_letter_duplicates,
        )


@dataclass(frozen=True)
class DeviceRow:
    """One device's running summary (the ``devices`` table).

    ``status`` is the state of the newest status message by receive time (``online`` or
    ``offline``, the Last Will included; None before any), ``status_at`` when it arrived.
    ``model``/``model_version`` come from the newest status or telemetry message, ``deploy``
    (received at ``deploy_at``) from the newest one that carried a remote deploy outcome.
    """

    fleet: str
    device: str
    first_seen: float | None
    last_seen: float | None
    messages: int
    duplicates: int
    boot: str | None
    status: str | None
    status_at: float | None
    status_seq: int | None
    agent_version: str | None
    runtime: str | None
    host: Mapping[str, Any]
    model: str | None
    model_version: str | None
    model_at: float | None
    last_telemetry_at: float | None
    window_s: float | None
    deploy: DeployEvent | None = None
    deploy_at: float | None = None


@dataclass(frozen=True)
class BootRange:
    """The sequence numbers stored for one boot of one device: ``messages`` distinct numbers
    between ``min_seq`` and ``max_seq``."""

    fleet: str
    device: str
    boot: str
    min_seq: int
    max_seq: int
    messages: int
    first_received: float
    last_received: float


@dataclass(frozen=True)
class EventRow:
    """A stored status, outlier or command-reply message; ``body`` is its decoded JSON."""

    fleet: str
    device: str
    boot: str
    seq: int
    kind: str
    ts: float
    received_at: float
    body: Mapping[str, Any]


@dataclass(frozen=True)
class DeadLetterRow:
    id: int
    received_at: float
    topic: str
    size: int
    field: str
    error: str
    payload: bytes


class Store(Protocol):
    """The collector's storage. One instance is used by one thread at a time or guarded by
    its own lock (both implementations are); open a second one for another process."""

    @property
    def url(self) -> str:
        """The store's URL with any password removed."""
        ...

    def schema_version(self) -> int: ...

    def insert_batch(
        self, records: Sequence[Record], dead_letters: Sequence[DeadLetter] = ()
    ) -> InsertResult:
        """Store a batch in one transaction; duplicates by (fleet, device, boot, seq) are
        dropped by the store's unique key. Raises StoreError (nothing is stored then)."""
        ...

    def devices(self, fleet: str | None = None) -> list[DeviceRow]: ...

    def latest_telemetry(self, fleet: str | None = None) -> list[TelemetryRecord]:
        """The newest telemetry window (by receive time) of each device."""
        ...

    def telemetry(
        self,
        fleet: str,
        device: str | None = None,
        *,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[TelemetryRecord]:
        """Windows received at or after ``since``, oldest first; with ``limit``, the newest
        ``limit`` of them."""
        ...

    def events(
        self, fleet: str, device: str, kind: str | None = None, *, limit: int = 50
    ) -> list[EventRow]:
        """The newest status / outliers / cmd/reply messages of a device, newest first."""
        ...

    def boot_ranges(
        self, fleet: str | None = None, device: str | None = None
    ) -> list[BootRange]: ...

    def count_messages(self, fleet: str | None = None) -> dict[str, int]:
        """Stored messages by kind."""
        ...

    def dead_letters(self, limit: int = 100) -> list[DeadLetterRow]:
        """The newest dead letters, newest first."""
        ...

    def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters by offending field."""
        ...

    def close(self) -> None: ...


def open_store(url: str, *, migrate: bool = True) -> SqliteStore | PostgresStore:
    """Open the store at ``url`` and (unless ``migrate`` is False) bring its schema up to date.

    ``sqlite:///relative.db``, ``sqlite:////absolute/path.db`` or a plain file path;
    ``postgresql://user:password@host:5432/db`` with an optional ``?schema=NAME`` (created if
    missing; default ``public``). Raises ConfigError for a URL it cannot use, StoreError when
    the database cannot be opened.
    """
    scheme = url.split(":", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        return SqliteStore(_sqlite_path(url), migrate=migrate)
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url, migrate=migrate)
    if scheme == "":
        return SqliteStore(Path(url), migrate=migrate)
    raise ConfigError(
        f"store URL {redact_url(url)!r}: use sqlite:///path.db or postgresql://user@host/db"
    )


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and the API."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _sqlite_path(url: str) -> Path:
    rest = url.split("://", 1)[1]
    if not rest.startswith("/") or rest == "/":
        raise ConfigError(
            f"store URL {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return Path(rest[1:])


# --- the schema -----------------------------------------------------------------------------

_TELEMETRY_COLUMNS = (
    "fleet", "device", "boot", "seq", "ts", "received_at", "window_start", "window_s",
    "model", "model_version", "inferences", "errors", "outliers", "p50", "p95", "p99", "max_ms",
    "latency_bounds", "latency_counts", "score_bounds", "score_counts", "predictions",
    "cpu_percent", "system_cpu_percent", "rss_bytes", "mem_available_bytes", "temperature_c",
    "throttled", "spool_depth", "spool_dropped", "drops_since_last", "deploy",
)  # fmt: skip

_DEVICE_COLUMNS = (
    "fleet", "device", "first_seen", "last_seen", "messages", "duplicates", "boot", "status",
    "status_at", "status_seq", "agent_version", "runtime", "host", "model", "model_version",
    "model_at", "last_telemetry_at", "window_s", "deploy", "deploy_at",
)  # fmt: skip

_BOOT_COLUMNS = (
    "fleet", "device", "boot", "min_seq", "max_seq", "messages", "first_received",
    "last_received",
)  # fmt: skip


def _schema_v1(d: _Dialect) -> tuple[str, ...]:
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


def _schema_v2(d: _Dialect) -> tuple[str, ...]:
    return (
        "ALTER TABLE telemetry ADD COLUMN deploy TEXT",
        "ALTER TABLE devices ADD COLUMN deploy TEXT",
        f"ALTER TABLE devices ADD COLUMN deploy_at {d.real}",
    )


def _schema_v3(d: _Dialect) -> tuple[str, ...]:
    return (
        "ALTER TABLE dead_letters ADD COLUMN digest TEXT",
        "CREATE UNIQUE INDEX dead_letters_by_digest ON dead_letters (digest)",
    )


# version -> (description, DDL); applied in order inside one transaction each.
_MIGRATIONS: dict[int, tuple[str, Callable[[_Dialect], tuple[str, ...]]]] = {
    1: ("messages, telemetry, boots, devices, dead_letters", _schema_v1),
    2: ("remote deploy outcomes: telemetry.deploy, devices.deploy, devices.deploy_at", _schema_v2),
    3: ("dead letters kept once per message: dead_letters.digest", _schema_v3),
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


_SQLITE = _Dialect("REAL", "INTEGER", "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT",
                   " WITHOUT ROWID", "min", "max")  # fmt: skip
_POSTGRES = _Dialect("DOUBLE PRECISION", "BIGINT", "BYTEA", "BIGSERIAL PRIMARY KEY", "",
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


def _upsert_sql(d: _Dialect, *, arrays: bool = False) -> tuple[str, str]:
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
        f"INSERT INTO devices ({', '.join(_DEVICE_COLUMNS)}) "
        f"{values(_DEVICE_COLUMNS, _DEVICE_PG_TYPES)} "
        f"ON CONFLICT (fleet, device) DO UPDATE SET {', '.join(device_sets)}"
    )
    boots = (
        f"INSERT INTO boots ({', '.join(_BOOT_COLUMNS)}) "
        f"{values(_BOOT_COLUMNS, _BOOT_PG_TYPES)} "
        f"ON CONFLICT (fleet, device, boot) DO UPDATE SET "
        f"min_seq = {lo}(boots.min_seq, excluded.min_seq), "
        f"max_seq = {hi}(boots.max_seq, excluded.max_seq), "
        f"messages = boots.messages + excluded.messages, "
        f"first_received = {lo}(boots.first_received, excluded.first_received), "
        f"last_received = {hi}(boots.last_received, excluded.last_received)"
    )
    return devices, boots


# --- turning records into rows and back -----------------------------------------------------

_STD_LATENCY = tuple(LATENCY_BUCKETS_MS)
_STD_SCORES = tuple(SCORE_BUCKETS)


_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _stdlib_dump(value: Any) -> str:
    return _ENCODER.encode(value)


try:  # orjson, when installed, writes the JSON columns several times faster
    import orjson

    def _jdump(value: Any) -> str:
        return orjson.dumps(value).decode()

except ImportError:  # pragma: no cover - exercised where orjson is missing
    _jdump = _stdlib_dump

_jnumbers = _jdump  # JSON arrays of numbers


def _telemetry_row(r: TelemetryRecord) -> tuple[Any, ...]:
    return (
        r.fleet, r.device, r.boot, r.seq, r.ts, r.received_at, r.window_start, r.window_s,
        r.model, r.model_version, r.inferences, r.errors, r.outliers,
        r.p50, r.p95, r.p99, r.max_ms,
        None if r.latency_bounds == _STD_LATENCY else _jnumbers(r.latency_bounds),
        _jnumbers(r.latency_counts),
        None if r.score_bounds == _STD_SCORES else _jnumbers(r.score_bounds),
        _jnumbers(r.score_counts),
        _jdump(dict(r.predictions)),
        r.cpu_percent, r.system_cpu_percent, r.rss_bytes, r.mem_available_bytes,
        r.temperature_c, r.throttled, r.spool_depth, r.spool_dropped, r.drops_since_last,
        None if r.deploy is None else _jdump(r.deploy.to_dict()),
    )  # fmt: skip


def _telemetry_from_row(row: Sequence[Any]) -> TelemetryRecord:
    (fleet, device, boot, seq, ts, received_at, window_start, window_s, model, model_version,
     inferences, errors, outliers, p50, p95, p99, max_ms, latency_bounds, latency_counts,
     score_bounds, score_counts, predictions, cpu, system_cpu, rss, mem, temperature,
     throttled, spool_depth, spool_dropped, drops, deploy) = row  # fmt: skip
    return TelemetryRecord(
        fleet=fleet,
        device=device,
        boot=boot,
        seq=int(seq),
        ts=float(ts),
        received_at=float(received_at),
        window_start=float(window_start),
        window_s=float(window_s),
        model=model,
        model_version=model_version,
        inferences=int(inferences),
        errors=int(errors),
        outliers=int(outliers),
        p50=p50,
        p95=p95,
        p99=p99,
        max_ms=max_ms,
        latency_bounds=_STD_LATENCY
        if latency_bounds is None
        else tuple(float(b) for b in json.loads(latency_bounds)),
        latency_counts=tuple(json.loads(latency_counts)),
        score_bounds=_STD_SCORES
        if score_bounds is None
        else tuple(float(b) for b in json.loads(score_bounds)),
        score_counts=tuple(json.loads(score_counts)),
        predictions=json.loads(predictions),
        cpu_percent=cpu,
        system_cpu_percent=system_cpu,
        rss_bytes=None if rss is None else int(rss),
        mem_available_bytes=None if mem is None else int(mem),
        temperature_c=temperature,
        throttled=None if throttled is None else int(throttled),
        spool_depth=int(spool_depth),
        spool_dropped=int(spool_dropped),
        drops_since_last=int(drops),
        deploy=_deploy(deploy),
    )


def _deploy(text: str | None) -> DeployEvent | None:
    """A deploy outcome stored as JSON (it passed the wire contract when it was received)."""
    return None if text is None else DeployEvent.from_dict(json.loads(text), "deploy")


def _device_from_row(row: Sequence[Any]) -> DeviceRow:
    values = dict(zip(_DEVICE_COLUMNS, row, strict=True))
    host = values.pop("host")
    values["host"] = {} if host is None else json.loads(host)
    for key in ("messages", "duplicates"):
        values[key] = int(values[key])
    if values["status_seq"] is not None:
        values["status_seq"] = int(values["status_seq"])
    values["deploy"] = _deploy(values["deploy"])
    return DeviceRow(**values)


@dataclass
class _DeviceDelta:
    """What one batch adds to one device's row."""

    fleet: str
    device: str
    first_seen: float | None = None
    last_seen: float | None = None
    messages: int = 0
    duplicates: int = 0
    boot: str | None = None
    status: str | None = None
    status_at: float | None = None
    status_seq: int | None = None
    agent_version: str | None = None
    runtime: str | None = None
    host: str | None = None
    model: str | None = None
    model_version: str | None = None
    model_at: float | None = None
    last_telemetry_at: float | None = None
    window_s: float | None = None
    deploy: str | None = None
    deploy_at: float | None = None

    def add(self, r: Record) -> None:
        t = r.received_at
        self.messages += 1
        if self.first_seen is None or t < self.first_seen:
            self.first_seen = t
        if self.last_seen is None or t >= self.last_seen:
            self.last_seen, self.boot = t, r.boot
        if isinstance(r, TelemetryRecord):
            if self.last_telemetry_at is None or t >= self.last_telemetry_at:
                self.last_telemetry_at, self.window_s = t, r.window_s
            self._model(r.model, r.model_version, t)
            self._deploy(r.deploy, t)
        elif isinstance(r.message, StatusMessage):
            m = r.message
            if self.status_at is None or (t, m.seq) > (self.status_at, self.status_seq or 0):
                self.status, self.status_at, self.status_seq = m.state, t, m.seq
                self.agent_version, self.runtime = m.agent_version, m.runtime
                self.host = _jdump(dict(m.host))
            self._model(m.model, m.model_version, t)
            self._deploy(m.deploy, t)

    def _deploy(self, deploy: DeployEvent | None, t: float) -> None:
        if deploy is not None and (self.deploy_at is None or t >= self.deploy_at):
            self.deploy, self.deploy_at = _jdump(deploy.to_dict()), t

    def _model(self, model: str | None, version: str | None, t: float) -> None:
        if self.model_at is None or t >= self.model_at:
            self.model, self.model_version, self.model_at = model, version, t

    def row(self) -> tuple[Any, ...]:
        return tuple(getattr(self, c) for c in _DEVICE_COLUMNS)


def _plan(
    records: Sequence[Record],
) -> tuple[list[Record], dict[tuple[str, str], _DeviceDelta]]:
    """Records sorted by key with in-batch repeats removed (counted as duplicates).

    Sorting gives every writer the same lock order, so two collectors inserting overlapping
    batches into PostgreSQL wait for each other instead of deadlocking.
    """
    unique: dict[tuple[str, str, str, int], Record] = {}
    deltas: dict[tuple[str, str], _DeviceDelta] = {}
    for r in records:
        if r.key in unique:
            _delta(deltas, r).duplicates += 1
        else:
            unique[r.key] = r
    return [unique[k] for k in sorted(unique)], deltas


def _delta(deltas: dict[tuple[str, str], _DeviceDelta], r: Record) -> _DeviceDelta:
    key = (r.fleet, r.device)
    d = deltas.get(key)
    if d is None:
        d = deltas[key] = _DeviceDelta(r.fleet, r.device)
    return d


def _aggregate(
    new: Sequence[Record], duplicates: Iterable[Record], deltas: dict[tuple[str, str], _DeviceDelta]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(boots rows, devices rows), sorted by key, for the new and duplicate records."""
    boots: dict[tuple[str, str, str], list[Any]] = {}
    for r in new:
        _delta(deltas, r).add(r)
        b = boots.get((r.fleet, r.device, r.boot))
        if b is None:
            boots[(r.fleet, r.device, r.boot)] = [r.seq, r.seq, 1, r.received_at, r.received_at]
        else:
            b[0], b[1] = min(b[0], r.seq), max(b[1], r.seq)
            b[2] += 1
            b[3], b[4] = min(b[3], r.received_at), max(b[4], r.received_at)
    for r in duplicates:
        _delta(deltas, r).duplicates += 1
    boot_rows = [(*k, *boots[k]) for k in sorted(boots)]
    device_rows = [deltas[k].row() for k in sorted(deltas)]
    return boot_rows, device_rows


def _dead_rows(dead_letters: Sequence[DeadLetter]) -> list[tuple[Any, ...]]:
    """Rows for ``dead_letters``, one per digest. The text is escaped once more here (it is
    when ingest makes a dead letter): a dead letter must never be what a store refuses."""
    rows: dict[str, tuple[Any, ...]] = {}
    for d in dead_letters:
        digest = d.digest or _digest(d)
        if digest not in rows:
            rows[digest] = (
                d.received_at, safe_text(d.topic), d.size, safe_text(d.field),
                safe_text(d.error), bytes(d.payload), digest,
            )  # fmt: skip
    return list(rows.values())


def _digest(d: DeadLetter) -> str:
    # A dead letter made without ingest.dead_letter(): its digest from what it holds.
    data = safe_text(d.topic).encode("utf-8") + b"\x00" + bytes(d.payload)
    return hashlib.sha256(data).hexdigest()


def _result(
    received: int, new: Sequence[Record], dead: int, dead_new: int | None = None
) -> InsertResult:
    by_kind: dict[str, int] = {}
    for r in new:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
    stored_dead = dead if dead_new is None else dead_new
    return InsertResult(
        received, len(new), received - len(new), stored_dead, by_kind, dead - stored_dead
    )


_MESSAGE_COLUMNS = "fleet, device, boot, seq, kind, ts, received_at, body"
_MESSAGE_INSERT = (
    f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)
_DEAD_INSERT = (
    "INSERT INTO dead_letters (received_at, topic, size, field, error, payload, digest) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_DEAD_INSERT_PG = (
    "INSERT INTO dead_letters (received_at, topic, size, field, error, payload, digest) "
    "SELECT * FROM unnest(%s::float8[], %s::text[], %s::int8[], %s::text[], %s::text[], "
    "%s::bytea[], %s::text[]) ON CONFLICT DO NOTHING RETURNING id"
)
_TELEMETRY_INSERT = (
    f"INSERT INTO telemetry ({', '.join(_TELEMETRY_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _TELEMETRY_COLUMNS)})"
)


def _message_row(r: Record) -> tuple[Any, ...]:
    body = r.body if isinstance(r, EventRecord) else None
    return (r.fleet, r.device, r.boot, r.seq, r.kind, r.ts, r.received_at, body)


# --- shared read queries ----------------------------------------------------------------------


class _Reader:
    """The read side, identical for both databases; subclasses provide ``_query``."""

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def schema_version(self) -> int:
        rows = self._query("SELECT MAX(version) FROM schema_version")
        return int(rows[0][0] or 0)

    def devices(self, fleet: str | None = None) -> list[DeviceRow]:
        where, params = _fleet_filter(fleet)
        rows = self._query(
            f"SELECT {', '.join(_DEVICE_COLUMNS)} FROM devices{where} ORDER BY fleet, device",
            params,
        )
        return [_device_from_row(r) for r in rows]

    def latest_telemetry(self, fleet: str | None = None) -> list[TelemetryRecord]:
        where, params = _fleet_filter(fleet, "d.")
        cols = ", ".join(f"t.{c}" for c in _TELEMETRY_COLUMNS)
        rows = self._query(
            f"SELECT {cols} FROM devices d JOIN telemetry t ON t.fleet = d.fleet "
            "AND t.device = d.device AND t.received_at = d.last_telemetry_at"
            f"{where} ORDER BY t.fleet, t.device, t.seq",
            params,
        )
        latest: dict[tuple[str, str], TelemetryRecord] = {}
        for row in rows:  # two windows received at the same instant: keep the higher seq
            rec = _telemetry_from_row(row)
            latest[(rec.fleet, rec.device)] = rec
        return list(latest.values())

    def telemetry(
        self,
        fleet: str,
        device: str | None = None,
        *,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[TelemetryRecord]:
        cols = ", ".join(f"t.{c}" for c in _TELEMETRY_COLUMNS)
        params: list[Any] = [fleet]
        if device is None:
            # Walk the devices so each device's (fleet, device, received_at) index range serves
            # the time filter, instead of scanning the fleet's whole history.
            sql = (
                f"SELECT {cols} FROM devices d {self._join_order()} telemetry t "
                "ON t.fleet = d.fleet AND t.device = d.device WHERE d.fleet = ?"
            )
        else:
            sql = f"SELECT {cols} FROM telemetry t WHERE t.fleet = ? AND t.device = ?"
            params.append(device)
        if since is not None:
            sql += " AND t.received_at >= ?"
            params.append(since)
        sql += " ORDER BY t.received_at DESC, t.seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        rows = self._query(sql, params)
        return [_telemetry_from_row(r) for r in reversed(rows)]

    def _join_order(self) -> str:
        return "JOIN"

    def events(
        self, fleet: str, device: str, kind: str | None = None, *, limit: int = 50
    ) -> list[EventRow]:
        sql = (
            "SELECT fleet, device, boot, seq, kind, ts, received_at, body FROM messages "
            "WHERE fleet = ? AND device = ? AND kind <> 'telemetry'"
        )
        params: list[Any] = [fleet, device]
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        sql += " ORDER BY received_at DESC, seq DESC LIMIT ?"
        params.append(int(limit))
        return [
            EventRow(f, d, b, int(s), k, float(ts), float(ra), json.loads(body or "{}"))
            for f, d, b, s, k, ts, ra, body in self._query(sql, params)
        ]

    def boot_ranges(self, fleet: str | None = None, device: str | None = None) -> list[BootRange]:
        where, params = _fleet_filter(fleet)
        if device is not None:
            where += " AND device = ?" if where else " WHERE device = ?"
            params.append(device)
        rows = self._query(
            f"SELECT {', '.join(_BOOT_COLUMNS)} FROM boots{where} "
            "ORDER BY fleet, device, first_received",
            params,
        )
        return [
            BootRange(f, d, b, int(lo), int(hi), int(n), float(t0), float(t1))
            for f, d, b, lo, hi, n, t0, t1 in rows
        ]

    def count_messages(self, fleet: str | None = None) -> dict[str, int]:
        where, params = _fleet_filter(fleet)
        rows = self._query(f"SELECT kind, COUNT(*) FROM messages{where} GROUP BY kind", params)
        return {str(k): int(n) for k, n in rows}

    def dead_letters(self, limit: int = 100) -> list[DeadLetterRow]:
        rows = self._query(
            "SELECT id, received_at, topic, size, field, error, payload FROM dead_letters "
            "ORDER BY id DESC LIMIT ?",
            [int(limit)],
        )
        return [
            DeadLetterRow(int(i), float(t), topic, int(size), fld, err, bytes(payload))
            for i, t, topic, size, fld, err, payload in rows
        ]

    def dead_letter_counts(self) -> dict[str, int]:
        # A field can be a key of the message, which its sender picks: the most frequent
        # DEAD_LETTER_FIELDS fields, and the others together under "(other)".
        rows = self._query(
            "SELECT field, COUNT(*) AS n FROM dead_letters GROUP BY field "
            "ORDER BY n DESC, field LIMIT ?",
            [DEAD_LETTER_FIELDS],
        )
        counts = {str(f): int(n) for f, n in rows}
        if len(counts) == DEAD_LETTER_FIELDS:
            total = int(self._query("SELECT COUNT(*) FROM dead_letters")[0][0])
            if total > sum(counts.values()):
                counts["(other)"] = total - sum(counts.values())
        return counts


def _fleet_filter(fleet: str | None, prefix: str = "") -> tuple[str, list[Any]]:
    if fleet is None:
        return "", []
    return f" WHERE {prefix}fleet = ?", [fleet]


# --- SQLite ---------------------------------------------------------------------------------


# Errors that come from a value in the batch (text SQLite cannot encode, an integer over 64
# bits, a type it cannot bind, a constraint), not from the database's state.
_SQLITE_RECORD_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.DataError, sqlite3.IntegrityError, sqlite3.InterfaceError,
    UnicodeError, OverflowError, ValueError,
)  # fmt: skip


class SqliteStore(_Reader):
    """A SQLite file in WAL mode: one writer at a time, readers alongside it.

    ``synchronous=FULL`` by default: the collector acknowledges a message to the broker only
    after the commit that stored it, so a commit must survive a power cut, not only a crash.
    """

    def __init__(
        self, path: str | Path, *, migrate: bool = True, synchronous: str = "FULL"
    ) -> None:
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigError(f"synchronous={synchronous!r}: use OFF, NORMAL, FULL or EXTRA")
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            if self.path.parent != Path():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={synchronous}")
            self._conn.execute("PRAGMA foreign_keys=OFF")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._lock_file: Any = None
        if sys.platform != "win32":
            try:
                self._lock_file = open(f"{self.path}-writer.lock", "a+b")  # noqa: SIM115
            except OSError:
                self._lock_file = None  # a read-only directory: SQLite's own locking only
        self._upsert_devices, self._upsert_boots = _upsert_sql(_SQLITE)
        if migrate:
            self.migrate()

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def migrate(self) -> int:
        """Create or upgrade the schema; returns the version now in place."""
        with self._transaction():
            _migrate(self._conn.execute, _SQLITE, self.url)
        return self.schema_version()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._writer_lock():
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path}: cannot start a write: {exc}") from exc
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """Queue edgeship's writers on an flock of ``<db>-writer.lock``.

        SQLite lets one writer in at a time and makes the others poll with growing sleeps
        (1, 2, 5, 10... 100 ms), so a waiting collector worker can sleep well past the moment
        the lock frees; the kernel wakes an flock waiter at once. Other programs writing the
        file still work, through SQLite's own lock and busy timeout.
        """
        if self._lock_file is None:
            yield
            return
        import fcntl

        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def insert_batch(
        self, records: Sequence[Record], dead_letters: Sequence[DeadLetter] = ()
    ) -> InsertResult:
        ordered, deltas = _plan(records)
        dead_new = 0
        try:
            with self._transaction() as conn:
                new, dups = self._insert_messages(conn, ordered)
                conn.executemany(
                    _TELEMETRY_INSERT,
                    [_telemetry_row(r) for r in new if isinstance(r, TelemetryRecord)],
                )
                boot_rows, device_rows = _aggregate(new, dups, deltas)
                conn.executemany(self._upsert_boots, boot_rows)
                conn.executemany(self._upsert_devices, device_rows)
                if dead_letters:
                    before = conn.total_changes
                    conn.executemany(_DEAD_INSERT, _dead_rows(dead_letters))
                    dead_new = conn.total_changes - before
        except _SQLITE_RECORD_ERRORS as exc:
            raise RecordError(
                f"SQLite store {self.path}: refused a value in the batch: {_one_line(exc)}"
            ) from exc
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: batch not stored: {exc}") from exc
        return _result(len(records), new, len(dead_letters), dead_new)

    def _insert_messages(
        self, conn: sqlite3.Connection, ordered: Sequence[Record]
    ) -> tuple[list[Record], list[Record]]:
        """Insert into ``messages`` (ON CONFLICT DO NOTHING); (new records, duplicates).

        Most batches hold no duplicate, so the insert is tried at once and the change count
        says whether every row was new. When it was not (redeliveries), the insert is rolled
        back to its savepoint and redone for the keys a look-up finds absent: BEGIN IMMEDIATE
        holds SQLite's write lock, so no other writer stores a key in between.
        """
        rows = [_message_row(r) for r in ordered]
        conn.execute("SAVEPOINT batch_messages")
        before = conn.total_changes
        conn.executemany(_MESSAGE_INSERT, rows)
        if conn.total_changes - before == len(rows):
            conn.execute("RELEASE batch_messages")
            return list(ordered), []
        conn.execute("ROLLBACK TO batch_messages")
        conn.execute("RELEASE batch_messages")
        stored = self._stored_keys(conn, ordered)
        new = [r for r in ordered if r.key not in stored]
        dups = [r for r in ordered if r.key in stored]
        before = conn.total_changes
        conn.executemany(_MESSAGE_INSERT, [_message_row(r) for r in new])
        if conn.total_changes - before != len(new):
            raise StoreError(f"SQLite store {self.path}: another writer stored keys of this batch")
        return new, dups

    @staticmethod
    def _stored_keys(
        conn: sqlite3.Connection, ordered: Sequence[Record]
    ) -> set[tuple[str, str, str, int]]:
        groups: dict[tuple[str, str, str], list[int]] = {}
        for r in ordered:
            groups.setdefault((r.fleet, r.device, r.boot), []).append(r.seq)
        stored: set[tuple[str, str, str, int]] = set()
        for (fleet, device, boot), seqs in groups.items():
            for start in range(0, len(seqs), 500):
                chunk = seqs[start : start + 500]
                rows = conn.execute(
                    "SELECT seq FROM messages WHERE fleet = ? AND device = ? AND boot = ? "
                    f"AND seq IN ({', '.join('?' * len(chunk))})",
                    (fleet, device, boot, *chunk),
                )
                stored.update((fleet, device, boot, int(s)) for (s,) in rows)
        return stored

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._conn.execute(sql, tuple(params)).fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path}: query failed: {exc}") from exc

    def _join_order(self) -> str:
        return "CROSS JOIN"  # SQLite: devices first, then the telemetry index per device

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._lock_file is not None:
                self._lock_file.close()


def _migrate(execute: Callable[..., Any], dialect: _Dialect, where: str) -> None:
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
            + ("(?, ?, ?)" if dialect is _SQLITE else "(%s, %s, %s)"),
            (version, time.time(), description),
        )


# --- PostgreSQL -----------------------------------------------------------------------------


# TCP settings for the connection, unless the URL sets them: a link that goes silent (a
# partition, a dropped route, a server host gone) ends in an error after about a minute, and
# the batch is retried, instead of a query that waits as long as the kernel retransmits.
_PG_LINK_DEFAULTS = {
    "keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
    "keepalives_count": "3", "tcp_user_timeout": "60000",
}  # fmt: skip


class PostgresStore(_Reader):
    """PostgreSQL, for several collectors sharing a fleet (``psycopg`` 3, imported here).

    ``?schema=NAME`` in the URL puts the tables in that schema (created if missing). A batch
    that deadlocks or loses its connection is retried (``retries`` times, reconnecting): the
    batch is idempotent, because the store drops what was already stored.
    """

    def __init__(self, url: str, *, migrate: bool = True, retries: int = 3) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigError(
                "a PostgreSQL store needs psycopg: pip install 'psycopg[binary]'"
            ) from exc
        self._psycopg = psycopg
        self._display = redact_url(url)
        self._conninfo, self.schema = _split_schema(url)
        self._retries = retries
        self._lock = threading.RLock()
        self._conn: Any = None
        self._upsert_devices, self._upsert_boots = _upsert_sql(_POSTGRES, arrays=True)
        self._connect()
        if migrate:
            self.migrate()

    @property
    def url(self) -> str:
        return self._display

    def _connect(self) -> None:
        psycopg = self._psycopg
        try:
            given = psycopg.conninfo.conninfo_to_dict(self._conninfo)
            link = {k: v for k, v in _PG_LINK_DEFAULTS.items() if k not in given}
            conn = psycopg.connect(self._conninfo, autocommit=False, connect_timeout=10, **link)
            if self.schema is not None:
                with conn.transaction():
                    # Serialized: two collectors starting together both run this.
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.schema,))
                    conn.execute(
                        psycopg.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                            psycopg.sql.Identifier(self.schema)
                        )
                    )
                conn.execute(
                    psycopg.sql.SQL("SET search_path TO {}").format(
                        psycopg.sql.Identifier(self.schema)
                    )
                )
                conn.commit()
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot open PostgreSQL store {self._display}: {_one_line(exc)}"
            ) from exc
        self._conn = conn

    def migrate(self) -> int:
        def run() -> None:
            with self._conn.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(hashtext('edgeship-migrate'))")
                _migrate(
                    lambda sql, params=(): self._conn.execute(_pg(sql), params),
                    _POSTGRES,
                    self._display,
                )

        self._with_retry(run, "migration")
        return self.schema_version()

    def _with_retry(self, action: Callable[[], Any], what: str) -> Any:
        psycopg = self._psycopg
        errors = psycopg.errors
        retryable = (errors.DeadlockDetected, errors.SerializationFailure)
        with self._lock:
            for attempt in range(self._retries + 1):
                try:
                    if self._conn is None or self._conn.closed:
                        self._connect()
                    return action()
                except StoreError:
                    raise
                except (psycopg.DataError, psycopg.IntegrityError, *_VALUE_ERRORS) as exc:
                    # A value the database refuses: the same batch fails again, whole. Unless
                    # the link broke too (the rollback fails): then it is the database's state.
                    if not self._rollback_quietly():
                        raise StoreError(
                            f"PostgreSQL store {self._display}: {what} failed: {_one_line(exc)}"
                            " (and the connection was lost)"
                        ) from exc
                    raise RecordError(
                        f"PostgreSQL store {self._display}: {what}: refused a value: "
                        f"{_one_line(exc)}"
                    ) from exc
                except retryable as exc:
                    self._rollback_quietly()
                    if attempt == self._retries:
                        raise StoreError(f"PostgreSQL {what} failed: {_one_line(exc)}") from exc
                    time.sleep(0.05 * (attempt + 1))
                except psycopg.OperationalError as exc:
                    self._close_quietly()
                    if attempt == self._retries:
                        raise StoreError(
                            f"PostgreSQL store {self._display}: {what} failed: {_one_line(exc)}"
                        ) from exc
                    time.sleep(0.5 * (attempt + 1))
                except psycopg.Error as exc:
                    self._rollback_quietly()
                    raise StoreError(
                        f"PostgreSQL store {self._display}: {what} failed: {_one_line(exc)}"
                    ) from exc
        raise AssertionError("unreachable")

    def _rollback_quietly(self) -> bool:
        """Roll back the failed transaction; False (and the connection closed, so the next
        call reconnects) when that fails too: the rollback's own error must not escape as
        if it were the batch's (a caller splits a batch on errors that are not StoreError)."""
        if self._conn is None or self._conn.closed:
            return False
        try:
            self._conn.rollback()
        except self._psycopg.Error:
            self._close_quietly()
            return False
        return True

    def _close_quietly(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(self._psycopg.Error):
                conn.close()

    def insert_batch(
        self, records: Sequence[Record], dead_letters: Sequence[DeadLetter] = ()
    ) -> InsertResult:
        ordered, base_deltas = _plan(records)
        outcome: list[Record] = []
        dead_new = [0]  # dead letters stored (not already there), set by run()

        def run() -> None:
            deltas = {k: _DeviceDelta(v.fleet, v.device, duplicates=v.duplicates)
                      for k, v in base_deltas.items()}  # fmt: skip
            conn = self._conn
            with conn.transaction(), conn.cursor() as cur:
                new: list[Record] = []
                dups: list[Record] = []
                if ordered:
                    columns = list(zip(*(_message_row(r) for r in ordered), strict=True))
                    cur.execute(
                        f"INSERT INTO messages ({_MESSAGE_COLUMNS}) "
                        "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], "
                        "%s::text[], %s::float8[], %s::float8[], %s::text[]) "
                        "ON CONFLICT DO NOTHING RETURNING fleet, device, boot, seq",
                        [list(c) for c in columns],
                    )
                    stored = {(f, d, b, int(s)) for f, d, b, s in cur.fetchall()}
                    for r in ordered:
                        (new if r.key in stored else dups).append(r)
                telemetry = [_telemetry_row(r) for r in new if isinstance(r, TelemetryRecord)]
                if telemetry:
                    with cur.copy(_TELEMETRY_COPY) as copy:
                        for row in telemetry:
                            copy.write_row(row)
                boot_rows, device_rows = _aggregate(new, dups, deltas)
                if boot_rows:
                    cur.execute(self._upsert_boots, _columns(boot_rows))
                if device_rows:
                    cur.execute(self._upsert_devices, _columns(device_rows))
                if dead_letters:
                    cur.execute(_DEAD_INSERT_PG, _columns(_dead_rows(dead_letters)))
                    dead_new[:] = [len(cur.fetchall())]
            outcome[:] = new

        self._with_retry(run, "batch insert")
        return _result(len(records), outcome, len(dead_letters), dead_new[0])

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def run() -> list[tuple[Any, ...]]:
            with self._conn.transaction(), self._conn.cursor() as cur:
                cur.execute(_pg(sql), list(params))
                return list(cur.fetchall())

        result: list[tuple[Any, ...]] = self._with_retry(run, "query")
        return result

    def drop_schema(self) -> None:
        """Drop this store's schema and everything in it (tests and benchmarks clean up)."""
        if self.schema is None:
            raise StoreError("drop_schema: this store has no ?schema= of its own")
        psycopg = self._psycopg

        def run() -> None:
            with self._conn.transaction():
                self._conn.execute(
                    psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                        psycopg.sql.Identifier(self.schema)
                    )
                )

        self._with_retry(run, "drop schema")

    def close(self) -> None:
        with self._lock:
            self._close_quietly()


def _one_line(exc: BaseException) -> str:
    return safe_text(" ".join(str(exc).split()))


# Python-side errors while binding a batch's values (psycopg adapts them before sending).
_VALUE_ERRORS: tuple[type[Exception], ...] = (UnicodeError, OverflowError, ValueError)


_TELEMETRY_COPY = f"COPY telemetry ({', '.join(_TELEMETRY_COLUMNS)}) FROM STDIN"


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows to one list per column, for the unnest() statements."""
    return [list(c) for c in zip(*rows, strict=True)]


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


def _split_schema(url: str) -> tuple[str, str | None]:
    """(conninfo without our ``schema`` parameter, the schema)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    rest = []
    for key, value in query:
        if key == "schema":
            schema = value
        else:
            rest.append((key, value))
    if schema is not None and not schema.replace("_", "").isalnum():
        raise ConfigError(f"store URL: schema {schema!r} must be letters, digits and _")
    scheme = "postgresql"
    conninfo = urllib.parse.urlunsplit(
        (scheme, parts.netloc, parts.path, urllib.parse.urlencode(rest), parts.fragment)
    )
    return conninfo, schema
