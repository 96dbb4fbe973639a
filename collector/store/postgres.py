"""The PostgreSQL store: psycopg 3, imported only when one is opened; reconnects and retries
a call that failed for the link, not for the data."""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

from collector.errors import ConfigError, StoreError
from collector.ingest import DeadLetter, Record, RolloutRecord, TelemetryRecord
from collector.store.protocol import InsertResult, RecordError, one_line
from collector.store.reader import Reader
from collector.store.rows import (
    DeviceDelta,
    aggregate_rows,
    dead_rows,
    insert_result,
    message_row,
    plan_batch,
    rollout_result,
    rollout_rows,
    telemetry_row,
)
from collector.store.schema import (
    DEAD_INSERT_PG,
    MESSAGE_COLUMNS,
    POSTGRES,
    TELEMETRY_COLUMNS,
    apply_migrations,
    rollout_upsert_sql,
    upsert_sql,
)
from collector.store.urls import redact_url

__all__ = ["PostgresStore", "link_options", "split_schema"]

# --- PostgreSQL -----------------------------------------------------------------------------


# TCP settings for the connection, unless the URL sets them: a link that goes silent (a
# partition, a dropped route, a server host gone) ends in an error after about a minute, and
# the batch is retried, instead of a query that waits as long as the kernel retransmits.
_PG_LINK_DEFAULTS = {
    "keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
    "keepalives_count": "3", "tcp_user_timeout": "60000",
}  # fmt: skip


class PostgresStore(Reader):
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
                "a PostgreSQL store needs psycopg: pip install 'edgeship[collector]'"
            ) from exc
        self._psycopg = psycopg
        self._display = redact_url(url)
        self._conninfo, self.schema = split_schema(url)
        self._retries = retries
        self._lock = threading.RLock()
        self._conn: Any = None
        self._upsert_devices, self._upsert_boots = upsert_sql(POSTGRES, arrays=True)
        self._upsert_rollouts = rollout_upsert_sql(POSTGRES)
        self._connect()
        if migrate:
            self.migrate()

    @property
    def url(self) -> str:
        return self._display

    def _connect(self) -> None:
        psycopg = self._psycopg
        try:
            link = link_options(self._conninfo)
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
                f"cannot open PostgreSQL store {self._display}: {one_line(exc)}"
            ) from exc
        self._conn = conn

    def migrate(self) -> int:
        def run() -> None:
            with self._conn.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(hashtext('edgeship-migrate'))")
                apply_migrations(
                    lambda sql, params=(): self._conn.execute(_pg(sql), params),
                    POSTGRES,
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
                            f"PostgreSQL store {self._display}: {what} failed: {one_line(exc)}"
                            " (and the connection was lost)"
                        ) from exc
                    raise RecordError(
                        f"PostgreSQL store {self._display}: {what}: refused a value: "
                        f"{one_line(exc)}"
                    ) from exc
                except retryable as exc:
                    self._rollback_quietly()
                    if attempt == self._retries:
                        raise StoreError(f"PostgreSQL {what} failed: {one_line(exc)}") from exc
                    time.sleep(0.05 * (attempt + 1))
                except psycopg.OperationalError as exc:
                    self._close_quietly()
                    if attempt == self._retries:
                        raise StoreError(
                            f"PostgreSQL store {self._display}: {what} failed: {one_line(exc)}"
                        ) from exc
                    time.sleep(0.5 * (attempt + 1))
                except psycopg.Error as exc:
                    self._rollback_quietly()
                    raise StoreError(
                        f"PostgreSQL store {self._display}: {what} failed: {one_line(exc)}"
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
        self,
        records: Sequence[Record],
        dead_letters: Sequence[DeadLetter] = (),
        rollouts: Sequence[RolloutRecord] = (),
    ) -> InsertResult:
        ordered, base_deltas = plan_batch(records)
        outcome: list[Record] = []
        dead_new = [0]  # dead letters stored (not already there), set by run()
        written = [0]  # rollout rows inserted or replaced by a higher seq, set by run()
        rollout_values = rollout_rows(rollouts)

        def run() -> None:
            deltas = {k: DeviceDelta(v.fleet, v.device, duplicates=v.duplicates)
                      for k, v in base_deltas.items()}  # fmt: skip
            conn = self._conn
            with conn.transaction(), conn.cursor() as cur:
                new: list[Record] = []
                dups: list[Record] = []
                if ordered:
                    columns = list(zip(*(message_row(r) for r in ordered), strict=True))
                    cur.execute(
                        f"INSERT INTO messages ({MESSAGE_COLUMNS}) "
                        "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], "
                        "%s::text[], %s::float8[], %s::float8[], %s::text[]) "
                        "ON CONFLICT DO NOTHING RETURNING fleet, device, boot, seq",
                        [list(c) for c in columns],
                    )
                    stored = {(f, d, b, int(s)) for f, d, b, s in cur.fetchall()}
                    for r in ordered:
                        (new if r.key in stored else dups).append(r)
                telemetry = [telemetry_row(r) for r in new if isinstance(r, TelemetryRecord)]
                if telemetry:
                    with cur.copy(_TELEMETRY_COPY) as copy:
                        for row in telemetry:
                            copy.write_row(row)
                boot_rows, device_rows = aggregate_rows(new, dups, deltas)
                if boot_rows:
                    cur.execute(self._upsert_boots, _columns(boot_rows))
                if device_rows:
                    cur.execute(self._upsert_devices, _columns(device_rows))
                if dead_letters:
                    cur.execute(DEAD_INSERT_PG, _columns(dead_rows(dead_letters)))
                    dead_new[:] = [len(cur.fetchall())]
                if rollout_values:
                    # RETURNING names the rows written: not those an older seq left alone.
                    cur.execute(self._upsert_rollouts, _columns(rollout_values))
                    written[:] = [len(cur.fetchall())]
            outcome[:] = new

        self._with_retry(run, "batch insert")
        result = insert_result(len(records), outcome, len(dead_letters), dead_new[0])
        return result + rollout_result(len(rollouts), written[0]) if rollouts else result

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def run() -> list[tuple[Any, ...]]:
            with self._conn.transaction(), self._conn.cursor() as cur:
                cur.execute(_pg(sql), list(params))
                return list(cur.fetchall())

        result: list[tuple[Any, ...]] = self._with_retry(run, "query")
        return result

    def execute(self, sql: str, params: Sequence[Any] = (), *, fetch: bool = False) -> list[Any]:
        """Run one statement (``?`` placeholders) in its own transaction, retried like a batch
        when the link fails; its rows when ``fetch``. For tables beside the fleet's, such as
        the alert history (:mod:`collector.alert_history`)."""

        def run() -> list[Any]:
            with self._conn.transaction(), self._conn.cursor() as cur:
                cur.execute(_pg(sql), list(params))
                return list(cur.fetchall()) if fetch else []

        result: list[Any] = self._with_retry(run, "statement")
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


# Python-side errors while binding a batch's values (psycopg adapts them before sending).
_VALUE_ERRORS: tuple[type[Exception], ...] = (UnicodeError, OverflowError, ValueError)


_TELEMETRY_COPY = f"COPY telemetry ({', '.join(TELEMETRY_COLUMNS)}) FROM STDIN"


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows to one list per column, for the unnest() statements."""
    return [list(c) for c in zip(*rows, strict=True)]


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


def link_options(conninfo: str, **overrides: str) -> dict[str, str]:
    """The TCP settings (keepalives, ``tcp_user_timeout``) a connection to ``conninfo`` gets
    unless the URL sets them; ``overrides`` replace the defaults, not the URL's own."""
    import psycopg

    given = psycopg.conninfo.conninfo_to_dict(conninfo)
    wanted = {**_PG_LINK_DEFAULTS, **overrides}
    return {k: v for k, v in wanted.items() if k not in given}


def split_schema(url: str) -> tuple[str, str | None]:
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
