"""Which collector of a fleet leads: evaluates the alert rules, publishes alerts and exports the
fleet-wide series of ``/metrics``.

Several collectors can share a fleet (an MQTT shared subscription and one PostgreSQL store).
Every one of them stores what the broker hands it and serves the fleet's state, but the work
that must happen once per fleet is the leader's:

* **SQLite, or a collector alone**: :class:`SoleLeader`, always the leader.
* **PostgreSQL**: :class:`AdvisoryLock`, a session-level ``pg_try_advisory_lock`` on a key
  derived from the store's schema and the collector's fleet, held on a connection of its own.
  :meth:`AdvisoryLock.check` runs at the start of every monitor round (each evaluation
  period): the leader checks its connection is alive, the others try to take the lock. When
  the leader dies (SIGKILL, OOM, a crash) its socket closes, the server ends its session and
  releases the lock, and another collector takes it on its next round.

**A silent link: the exact bound.** A leader whose link to the server goes silent (a
partition) learns it only at its next check. Say its last check that got through was at
``c``: the next starts when that monitor round has ended and ``interval_s`` (1 s) has passed,
at most ``c + R + interval_s`` (``R``: how long one round takes), and its ``SELECT 1`` fails
after the lock connection's ``tcp_user_timeout`` (10 s), when the leader steps down. The
server ends the silent session, and only then releases the lock, after the keepalives set on
that session: 10 s idle plus 3 probes 5 s apart, about ``c + 25 s``. So no two collectors lead
at once as long as ``R + interval_s + 10 s < 25 s``, i.e. a round takes under about 14 s;
a round that takes longer (store queries slowed down, not yet failed) can overlap by that
excess, and both may then publish an alert change (a duplicate, never a lost one). Nothing
fences a leader that overruns: it is a bound, not a guarantee.

**Mixed ``--fleet`` settings** on one store (one collector for every fleet, another for
``greenhouse``) must not both lead ``greenhouse``. A collector for every fleet takes the
every-fleet key exclusively; a collector for one fleet takes the every-fleet key *shared* and
then its fleet's key exclusively (and lets the shared one go again when its fleet's is
taken). So collectors for different single fleets lead side by side, and a collector for
every fleet leads only while no collector for one fleet leads, and the other way round: no
fleet ever has two leaders, but while a collector for ``greenhouse`` leads, a collector for
every fleet does not lead ``barn`` either (its ``/api/health`` shows ``leader`` false). Run
one kind or the other on a store, not both.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from collector.store.postgres import link_options, split_schema
from collector.store.protocol import one_line

__all__ = ["AdvisoryLock", "Leadership", "SoleLeader", "leadership_for", "lock_key"]

log = logging.getLogger("collector.leader")

# Session settings of the lock's connection: the server notices a silent client in about
# 10 + 3 * 5 s and ends its session (releasing the lock); the client gives up on a round trip
# after 10 s (the bound this gives is in the module's docstring).
_SERVER_KEEPALIVE = (
    "SET tcp_keepalives_idle = 10",
    "SET tcp_keepalives_interval = 5",
    "SET tcp_keepalives_count = 3",
)
_CLIENT_LINK = {"keepalives_idle": "10", "keepalives_interval": "5", "tcp_user_timeout": "10000"}
_RECENT_TRIES = 8


class Leadership(Protocol):
    """Whether this collector leads its fleet now."""

    @property
    def is_leader(self) -> bool: ...

    def check(self) -> bool:
        """Keep or try to take the lead (one round trip at most); True while leading."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """What ``/api/health`` shows under ``leader``."""
        ...

    def close(self) -> None:
        """Give the lead up (another collector takes it on its next try)."""
        ...


class SoleLeader:
    """The only collector of its store (SQLite): always the leader."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._since = clock()

    @property
    def is_leader(self) -> bool:
        return True

    def check(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"leader": True, "election": "none (a SQLite store has one collector)",
                "since": self._since}  # fmt: skip

    def close(self) -> None:
        """Nothing to give up."""


def lock_key(schema: str | None, fleet: str | None) -> int:
    """The advisory lock's key (a signed 64-bit integer) of a fleet in a schema: the same in
    every collector of that fleet, whatever its client id or host."""
    text = f"edgeship-leader\0{schema or 'public'}\0{fleet if fleet is not None else '+'}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


class AdvisoryLock:
    """Leadership by a PostgreSQL session-level advisory lock on its own connection (see the
    module's docstring). Thread-safe; :meth:`check` never raises: a database it cannot reach
    means not leading, and the next check tries again."""

    def __init__(
        self,
        store_url: str,
        fleet: str | None,
        *,
        clock: Callable[[], float] = time.time,
        connect_timeout_s: int = 5,
    ) -> None:
        import psycopg

        self._psycopg = psycopg
        self._conninfo, self.schema = split_schema(store_url)
        self.fleet = fleet
        self.key = lock_key(self.schema, fleet)
        # A collector for one fleet also holds the every-fleet key, shared (module docstring).
        self.every_fleet_key = None if fleet is None else lock_key(self.schema, None)
        self._clock = clock
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._conn: Any = None
        self._leader = False
        self._since: float | None = None
        self._tries = 0
        self._recent: deque[float] = deque(maxlen=_RECENT_TRIES)
        self._before: list[float] = []
        self._last_error: str | None = None
        # What /api/health shows: replaced whole after each check or close, read without the
        # lock, which a check holds across its network calls (up to connect + query timeouts).
        self._status: dict[str, Any] = self._status_now()

    @property
    def is_leader(self) -> bool:
        return self._leader

    def check(self) -> bool:
        with self._lock:
            try:
                return self._check()
            finally:
                self._status = self._status_now()

    def _check(self) -> bool:
        now = self._clock()
        try:
            if self._leader:
                self._conn.execute("SELECT 1").fetchall()
                return True
            self._tries += 1
            if self._conn is None or self._conn.closed:
                self._connect()
            taken = self._try_lock()
            self._last_error = None
        except self._psycopg.Error as exc:
            self._lost(f"{type(exc).__name__}: {one_line(exc)}")
            return False
        if not taken:
            self._recent.append(now)
            return False
        self._leader, self._since = True, now
        self._before = list(self._recent)  # the failed tries just before this one
        self._recent.clear()
        log.warning(
            "leader of %s: took advisory lock %d after %d tries", self._what(), self.key,
            self._tries,
        )  # fmt: skip
        return True

    def _try_lock(self) -> bool:
        """Take the key (for one fleet: the every-fleet key shared first); False, holding
        nothing, when another collector holds what this one needs."""
        execute = self._conn.execute
        shared = self.every_fleet_key
        lock_shared = "SELECT pg_try_advisory_lock_shared(%s)"
        if shared is not None and not execute(lock_shared, (shared,)).fetchone()[0]:
            return False  # a collector for every fleet leads
        if execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]:
            return True
        if shared is not None:
            execute("SELECT pg_advisory_unlock_shared(%s)", (shared,)).fetchall()
        return False

    def _connect(self) -> None:
        link: dict[str, Any] = link_options(self._conninfo, **_CLIENT_LINK)
        conn = self._psycopg.connect(
            self._conninfo, autocommit=True, connect_timeout=self._connect_timeout_s, **link
        )
        for statement in _SERVER_KEEPALIVE:
            conn.execute(statement)
        self._conn = conn

    def _lost(self, error: str) -> None:
        if self._leader:
            log.warning("leader of %s: lost the lock's connection (%s)", self._what(), error)
        elif error != self._last_error:
            log.warning("leader election for %s: %s (trying again)", self._what(), error)
        self._leader, self._since, self._last_error = False, None, error
        self._close_conn()

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except self._psycopg.Error:
                log.debug("leader: close failed", exc_info=True)

    def _what(self) -> str:
        fleet = self.fleet if self.fleet is not None else "every fleet"
        return f"{fleet} in schema {self.schema or 'public'}"

    def to_dict(self) -> dict[str, Any]:
        """The state after the last check, at once (never waits for a check in progress)."""
        return dict(self._status)

    def _status_now(self) -> dict[str, Any]:
        return {
            "leader": self._leader,
            "election": "postgresql advisory lock",
            "key": self.key,
            "every_fleet_key": self.every_fleet_key,
            "schema": self.schema or "public",
            "fleet": self.fleet,
            "since": self._since,
            "tries": self._tries,
            "failed_tries_before": list(self._before),
            "last_error": self._last_error,
        }

    def close(self) -> None:
        """Close the lock's connection: the server releases the lock with the session."""
        with self._lock:
            self._leader, self._since = False, None
            self._close_conn()
            self._status = self._status_now()


def leadership_for(store_url: str, fleet: str | None) -> Leadership:
    """:class:`AdvisoryLock` for a PostgreSQL store, :class:`SoleLeader` otherwise."""
    scheme = store_url.split(":", 1)[0].lower() if "://" in store_url else ""
    if scheme in ("postgresql", "postgres"):
        return AdvisoryLock(store_url, fleet)
    return SoleLeader()
