"""The SQLite store: one file, one writer at a time (a lock file serializes processes)."""

from __future__ import annotations

import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from collector.errors import ConfigError, StoreError
from collector.ingest import DeadLetter, Record, RolloutRecord, TelemetryRecord
from collector.store.protocol import InsertResult, RecordError, one_line
from collector.store.reader import Reader
from collector.store.rows import (
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
    DEAD_INSERT,
    MESSAGE_INSERT,
    SQLITE,
    TELEMETRY_INSERT,
    apply_migrations,
    rollout_upsert_sql,
    upsert_sql,
)

__all__ = ["SqliteStore"]

# --- SQLite ---------------------------------------------------------------------------------


# Errors that come from a value in the batch (text SQLite cannot encode, an integer over 64
# bits, a type it cannot bind, a constraint), not from the database's state.
_SQLITE_RECORD_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.DataError, sqlite3.IntegrityError, sqlite3.InterfaceError,
    UnicodeError, OverflowError, ValueError,
)  # fmt: skip


class SqliteStore(Reader):
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
        self._upsert_devices, self._upsert_boots = upsert_sql(SQLITE)
        self._upsert_rollouts = rollout_upsert_sql(SQLITE)
        if migrate:
            self.migrate()

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def migrate(self) -> int:
        """Create or upgrade the schema; returns the version now in place."""
        try:
            with self._transaction():
                apply_migrations(self._conn.execute, SQLITE, self.url)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: cannot upgrade the schema: {exc}") from exc
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
        self,
        records: Sequence[Record],
        dead_letters: Sequence[DeadLetter] = (),
        rollouts: Sequence[RolloutRecord] = (),
    ) -> InsertResult:
        ordered, deltas = plan_batch(records)
        dead_new = 0
        written = 0
        try:
            with self._transaction() as conn:
                new, dups = self._insert_messages(conn, ordered)
                conn.executemany(
                    TELEMETRY_INSERT,
                    [telemetry_row(r) for r in new if isinstance(r, TelemetryRecord)],
                )
                boot_rows, device_rows = aggregate_rows(new, dups, deltas)
                conn.executemany(self._upsert_boots, boot_rows)
                conn.executemany(self._upsert_devices, device_rows)
                if dead_letters:
                    before = conn.total_changes
                    conn.executemany(DEAD_INSERT, dead_rows(dead_letters))
                    dead_new = conn.total_changes - before
                if rollouts:
                    # An upsert whose WHERE refuses the update (an older seq) changes nothing.
                    before = conn.total_changes
                    conn.executemany(self._upsert_rollouts, rollout_rows(rollouts))
                    written = conn.total_changes - before
        except _SQLITE_RECORD_ERRORS as exc:
            raise RecordError(
                f"SQLite store {self.path}: refused a value in the batch: {one_line(exc)}"
            ) from exc
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: batch not stored: {exc}") from exc
        result = insert_result(len(records), new, len(dead_letters), dead_new)
        return result + rollout_result(len(rollouts), written) if rollouts else result

    def _insert_messages(
        self, conn: sqlite3.Connection, ordered: Sequence[Record]
    ) -> tuple[list[Record], list[Record]]:
        """Insert into ``messages`` (ON CONFLICT DO NOTHING); (new records, duplicates).

        Most batches hold no duplicate, so the insert is tried at once and the change count
        says whether every row was new. When it was not (redeliveries), the insert is rolled
        back to its savepoint and redone for the keys a look-up finds absent: BEGIN IMMEDIATE
        holds SQLite's write lock, so no other writer stores a key in between.
        """
        rows = [message_row(r) for r in ordered]
        conn.execute("SAVEPOINT batch_messages")
        before = conn.total_changes
        conn.executemany(MESSAGE_INSERT, rows)
        if conn.total_changes - before == len(rows):
            conn.execute("RELEASE batch_messages")
            return list(ordered), []
        conn.execute("ROLLBACK TO batch_messages")
        conn.execute("RELEASE batch_messages")
        stored = self._stored_keys(conn, ordered)
        new = [r for r in ordered if r.key not in stored]
        dups = [r for r in ordered if r.key in stored]
        before = conn.total_changes
        conn.executemany(MESSAGE_INSERT, [message_row(r) for r in new])
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
