"""The on-disk outbox of MQTT messages, and the device's sequence-number counter.

:class:`Spool` owns one SQLite file. Every message the agent publishes is written here first
(:meth:`Spool.put`) and deleted once the broker has acknowledged it (:meth:`Spool.ack`), so
nothing is lost across a broker outage or an agent restart. The spool is bounded in payload
bytes: when a new message would not fit, the oldest messages are dropped and counted in a
persistent cumulative counter (:attr:`Spool.dropped_total`) that telemetry reports.

It also owns the per-device sequence number (:meth:`Spool.next_seq`) that every message
carries and that must never be reused, even after a SIGKILL or a power cut.

Durability choices:

* ``journal_mode=WAL``: readers never block the writer, and a crash at any point leaves a
  consistent database.
* ``synchronous=NORMAL`` for messages: in WAL mode a commit is then durable against a process
  crash (SIGKILL, OOM kill: the common failure of an agent), and the database can never be
  corrupted by a power cut; a power cut may only roll back the last commits before the previous
  WAL sync. That loses at most a few recent messages (or re-sends a few acknowledged ones, which
  subscribers drop as duplicates) and saves an fsync per put and per ack, which matters on SD
  cards (milliseconds each, and wear).
* Sequence numbers are handed out from a block reserved by a ``synchronous=FULL`` commit (one
  fsync per ``seq_block`` numbers), so a power cut can never roll the counter back. The last
  number used is also committed (``NORMAL``, no fsync) on every call: after a process restart
  within the same OS boot (the kernel's page cache survived, see ``boot_id_path``) the counter
  resumes exactly where it stopped; after an OS reboot it resumes at the reserved block's end,
  skipping at most ``seq_block - 1`` numbers (reported as :attr:`Spool.seq_skipped`).
  A clean :meth:`Spool.close` trims the reservation, so an orderly reboot skips nothing.

One process at a time: the spool holds an exclusive ``flock`` on ``<path>.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from device_agent.errors import ConfigError, EdgeshipError

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_SEQ_BLOCK", "Item", "Spool"]

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_SEQ_BLOCK = 64
_SCHEMA = 1
_OS_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_T = TypeVar("_T")

_DDL = """
CREATE TABLE IF NOT EXISTS queue (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so ids order messages
    topic    TEXT    NOT NULL,
    payload  BLOB    NOT NULL,
    qos      INTEGER NOT NULL,
    retain   INTEGER NOT NULL,
    enqueued REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value ANY
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Item:
    """One spooled message, in the order it was put."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    enqueued: float  # unix seconds when it was put


class Spool:
    """A durable, byte-bounded FIFO of MQTT messages plus the device's sequence counter.

    Thread-safe: inference threads may :meth:`put` while a network thread :meth:`peek`\\ s and
    :meth:`ack`\\ s. ``max_bytes`` bounds the sum of payload sizes (topics and SQLite overhead
    come on top, typically under 100 bytes a message).

    ``seq_skipped`` is how many sequence numbers this open skipped: 0, except after an OS
    reboot that followed an unclean stop (at most ``seq_block - 1``; see the module docstring).
    """

    seq_skipped: int

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        seq_block: int = DEFAULT_SEQ_BLOCK,
        boot_id_path: str | os.PathLike[str] | None = _OS_BOOT_ID,
    ) -> None:
        if max_bytes < 1:
            raise ConfigError(f"spool max_bytes: {max_bytes} must be positive")
        if seq_block < 1:
            raise ConfigError(f"spool seq_block: {seq_block} must be at least 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._seq_block = seq_block
        self._lock = threading.Lock()
        self._lock_fd = _acquire_file_lock(self.path)
        try:
            self._db = self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self._load(_read_boot_id(boot_id_path))
        except BaseException:
            self._db.close()
            os.close(self._lock_fd)
            raise
        self._closed = False

    # --- opening --------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ConfigError(f"spool {self.path}: cannot open: {exc}") from exc
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(f"spool {self.path}: the filesystem does not support WAL mode")
            db.execute("PRAGMA synchronous=NORMAL")
            # Keep a big drain from leaving a large -wal file behind on a small SD card.
            db.execute("PRAGMA journal_size_limit=4194304")
            db.executescript(_DDL)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise ConfigError(
                f"spool {self.path}: not a usable SQLite database ({exc}); "
                "move it aside to start a new spool"
            ) from exc
        except BaseException:
            db.close()
            raise
        return db

    def _load(self, os_boot: str | None) -> None:
        db = self._db
        with self._transaction():
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            schema = meta.get("schema", _SCHEMA)
            if schema != _SCHEMA:
                raise ConfigError(
                    f"spool {self.path}: schema {schema!r} is not {_SCHEMA}; "
                    "it was written by another edgeship version, move it aside"
                )
            seq_next = int(meta.get("seq_next", 0))
            reserved = int(meta.get("seq_reserved", 0))
            same_os_boot = os_boot is not None and meta.get("os_boot") == os_boot
            # Within one OS boot the page cache outlived any crash of ours, so the NORMAL
            # commit of seq_next is there; across a reboot only the fsynced reservation counts.
            start = seq_next if same_os_boot else max(seq_next, reserved)
            self.seq_skipped = start - seq_next
            self._next_seq = start
            self._reserved = max(reserved, start)
            self._dropped_total = int(meta.get("dropped_total", 0))
            row = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM queue")
            self._depth, self._bytes = (int(v) for v in row.fetchone())
            self._set(schema=_SCHEMA, seq_next=start, os_boot=os_boot or "")

    # --- sequence numbers -----------------------------------------------------------------

    def next_seq(self) -> int:
        """The next sequence number: strictly increasing and never reused, across restarts."""
        with self._lock:
            self._check_open()
            seq, reserve = self._claim_seq()
            with self._transaction(durable=reserve):
                self._record_seq(seq, reserve)
            self._commit_seq(seq, reserve)
            return seq

    # --- the queue ------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Append a message; return its id. Drops the oldest messages if it would not fit."""
        _check_message(topic, payload, qos, self.max_bytes)
        with self._lock:
            self._check_open()
            with self._transaction():
                item_id, dropped, freed = self._insert(topic, payload, qos, retain)
            self._commit_insert(len(payload), dropped, freed)
            return item_id

    def put_message(
        self,
        topic: str,
        make_payload: Callable[[int], bytes],
        qos: int = 1,
        retain: bool = False,
    ) -> tuple[int, int]:
        """Take the next sequence number, build the payload with it, append; return (seq, id).

        One lock and one commit for both, so messages sit in the spool in sequence order even
        with several producer threads. If ``make_payload`` raises, no number is used up.
        """
        with self._lock:
            self._check_open()
            seq, reserve = self._claim_seq()
            payload = make_payload(seq)
            _check_message(topic, payload, qos, self.max_bytes)
            with self._transaction(durable=reserve):
                self._record_seq(seq, reserve)
                item_id, dropped, freed = self._insert(topic, payload, qos, retain)
            self._commit_seq(seq, reserve)
            self._commit_insert(len(payload), dropped, freed)
            return seq, item_id

    def peek(self, limit: int = 100, *, after: int = 0) -> list[Item]:
        """Up to ``limit`` oldest messages with an id above ``after``, oldest first.

        Peeking does not remove anything: a message stays until :meth:`ack`. A publisher that
        keeps messages in flight passes the last id it holds as ``after``.
        """
        with self._lock:
            self._check_open()
            rows = self._guard(
                lambda: self._db.execute(
                    "SELECT id, topic, payload, qos, retain, enqueued FROM queue "
                    "WHERE id > ? ORDER BY id LIMIT ?",
                    (after, max(0, limit)),
                ).fetchall()
            )
        return [Item(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5]) for r in rows]

    def ack(self, item_id: int) -> bool:
        """Remove a delivered message. False if it is no longer there (dropped or acked)."""
        return self.ack_many((item_id,)) == 1

    def ack_many(self, ids: Iterable[int]) -> int:
        """Remove several delivered messages in one commit; return how many were there."""
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self._lock:
            self._check_open()
            removed = freed = 0
            with self._transaction():
                for start in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                    chunk = wanted[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    n, size = self._db.execute(
                        f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM queue "
                        f"WHERE id IN ({marks})",
                        chunk,
                    ).fetchone()
                    self._db.execute(f"DELETE FROM queue WHERE id IN ({marks})", chunk)
                    removed, freed = removed + n, freed + size
            self._depth -= removed
            self._bytes -= freed
            return int(removed)

    # --- figures --------------------------------------------------------------------------

    def depth(self) -> int:
        """How many messages wait to be delivered."""
        with self._lock:
            return self._depth

    def bytes_used(self) -> int:
        """The sum of the waiting messages' payload sizes."""
        with self._lock:
            return self._bytes

    @property
    def dropped_total(self) -> int:
        """Messages dropped to respect ``max_bytes`` over the spool's whole life."""
        with self._lock:
            return self._dropped_total

    def drops_since(self, mark: int) -> int:
        """Drops since ``mark``, a value of :attr:`dropped_total` read earlier."""
        return self.dropped_total - mark

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Trim the sequence reservation, checkpoint the WAL and release the file lock."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                with self._transaction(durable=True):
                    self._set(seq_reserved=self._next_seq, seq_next=self._next_seq)
                # Folding the WAL into the database is tidy, not needed: the next open replays it.
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()
                os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- helpers (callers hold self._lock, except during __init__) -----------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EdgeshipError(f"spool {self.path} is closed")

    @contextlib.contextmanager
    def _transaction(self, *, durable: bool = False) -> Iterator[None]:
        db = self._db
        try:
            if durable:
                # FULL makes this commit fsync the WAL (and every commit before it).
                db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise EdgeshipError(f"spool {self.path}: {exc}") from exc
        finally:
            if durable:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("PRAGMA synchronous=NORMAL")

    def _claim_seq(self) -> tuple[int, bool]:
        """The number to hand out and whether a new block must be reserved (fsynced) first."""
        seq = self._next_seq
        return seq, seq >= self._reserved

    def _record_seq(self, seq: int, reserve: bool) -> None:
        if reserve:
            self._set(seq_reserved=seq + self._seq_block, seq_next=seq + 1)
        else:
            self._set(seq_next=seq + 1)

    def _commit_seq(self, seq: int, reserve: bool) -> None:
        # In-memory state changes only after the transaction committed.
        self._next_seq = seq + 1
        if reserve:
            self._reserved = seq + self._seq_block

    def _insert(self, topic: str, payload: bytes, qos: int, retain: bool) -> tuple[int, int, int]:
        """INSERT (dropping the oldest rows to make room); return (id, dropped, freed bytes)."""
        db = self._db
        dropped = freed = 0
        excess = self._bytes + len(payload) - self.max_bytes
        if excess > 0:
            last_id = 0
            rows = db.execute("SELECT id, LENGTH(payload) FROM queue ORDER BY id")
            for row_id, length in rows:
                last_id, freed, dropped = row_id, freed + length, dropped + 1
                if freed >= excess:
                    break
            rows.close()
            db.execute("DELETE FROM queue WHERE id <= ?", (last_id,))
            self._set(dropped_total=self._dropped_total + dropped)
        cur = db.execute(
            "INSERT INTO queue (topic, payload, qos, retain, enqueued) VALUES (?, ?, ?, ?, ?)",
            (topic, bytes(payload), qos, int(bool(retain)), time.time()),
        )
        if cur.lastrowid is None:  # cannot happen for a rowid table; keeps the type honest
            raise EdgeshipError(f"spool {self.path}: INSERT returned no row id")
        return cur.lastrowid, dropped, freed

    def _commit_insert(self, size: int, dropped: int, freed: int) -> None:
        self._dropped_total += dropped
        self._depth += 1 - dropped
        self._bytes += size - freed

    def _guard(self, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except sqlite3.Error as exc:
            raise EdgeshipError(f"spool {self.path}: {exc}") from exc

    def _set(self, **values: int | str) -> None:
        self._db.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            list(values.items()),
        )


def _check_message(topic: str, payload: bytes, qos: int, max_bytes: int) -> None:
    if not isinstance(topic, str) or not topic:
        raise ConfigError(f"spool put: topic must be a non-empty string, got {topic!r}")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ConfigError(f"spool put: payload must be bytes, got {type(payload).__name__}")
    if qos not in (0, 1, 2):
        raise ConfigError(f"spool put: qos {qos!r} is not 0, 1 or 2")
    if len(payload) > max_bytes:
        raise ConfigError(
            f"spool put: a {len(payload)}-byte payload can never fit in max_bytes={max_bytes}; "
            "raise the spool size"
        )


def _acquire_file_lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"spool {path}: cannot create {lock_path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(
            f"spool {path} is in use by another process (lock {lock_path}); run one agent per spool"
        ) from exc
    return fd


def _read_boot_id(path: str | os.PathLike[str] | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None
