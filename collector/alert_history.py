"""The alert history: every firing and resolved alert, so a restarted collector resolves what
fired before instead of raising it again.

Two homes, one interface (:class:`AlertHistory`): :class:`AlertStore`, a SQLite file of the
collector's own (beside a SQLite store, or in memory), and :class:`SharedAlertStore`, the
``edgeship_alerts`` table of a PostgreSQL store (schema version 4), which every collector of
the fleet reads: only their leader writes it (:mod:`collector.leader`), and a collector that
becomes leader reads what is firing from it and goes on from there instead of firing it
again."""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from collector.alert_config import Severity
from collector.errors import StoreError
from device_agent.contracts.messages import Alert

if TYPE_CHECKING:
    from collector.store import PostgresStore

__all__ = ["AlertHistory", "AlertRecord", "AlertStore", "SharedAlertStore"]

# --- history --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertRecord:
    """One alert as stored and served. ``state`` is ``firing`` or ``resolved``; ``started_at``
    is when it fired, ``updated_at`` the last evaluation that changed its value or summary."""

    id: str
    fleet: str
    device: str | None
    rule: str
    severity: Severity
    state: Literal["firing", "resolved"]
    summary: str
    value: float | None
    started_at: float
    updated_at: float
    resolved_at: float | None
    source: str

    def message(self, ts: float) -> Alert:
        """The wire message for this alert's current state."""
        return Alert(
            id=self.id,
            source=self.source,
            ts=ts,
            rule=self.rule,
            severity=self.severity,
            state=self.state,
            summary=self.summary[:4096],
            device=self.device,
            value=self.value if self.value is None or math.isfinite(self.value) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "fleet": self.fleet,
            "device": self.device,
            "rule": self.rule,
            "severity": self.severity,
            "state": self.state,
            "summary": self.summary,
            "value": self.value,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "resolved_at": self.resolved_at,
            "source": self.source,
        }


class AlertHistory(Protocol):
    """Where alerts are kept: one row per alert id, updated from firing to resolved."""

    @property
    def path(self) -> str:
        """Where the history is, for /api/health (no password)."""
        ...

    def save(self, record: AlertRecord) -> None: ...

    def firing(self) -> list[AlertRecord]: ...

    def recent(self, limit: int = 100, state: str | None = None) -> list[AlertRecord]: ...

    def close(self) -> None: ...


_ALERT_COLUMNS = (
    "id, fleet, device, rule, severity, state, summary, value, started_at, updated_at, "
    "resolved_at, source"
)


class AlertStore:
    """Alert history in SQLite (``path``, or ``":memory:"``): one row per alert id, updated
    from firing to resolved. Thread-safe. The collector's main store (``collector.store``)
    keeps what devices sent; this one keeps what the collector concluded."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self._path = str(path)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS alerts (id TEXT PRIMARY KEY, fleet TEXT NOT NULL, "
                "device TEXT, rule TEXT NOT NULL, severity TEXT NOT NULL, state TEXT NOT NULL, "
                "summary TEXT NOT NULL, value REAL, started_at REAL NOT NULL, "
                "updated_at REAL NOT NULL, resolved_at REAL, source TEXT NOT NULL)"
            )
            self._db.execute(
                "CREATE INDEX IF NOT EXISTS alerts_state ON alerts (state, started_at)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the alert history {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        return self._path

    def save(self, record: AlertRecord) -> None:
        row = _row(record)
        with self._lock:
            try:
                self._db.execute(
                    f"INSERT OR REPLACE INTO alerts ({_ALERT_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write the alert history {self.path}: {exc}") from exc

    def firing(self) -> list[AlertRecord]:
        return self._select(*_firing())

    def recent(self, limit: int = 100, state: str | None = None) -> list[AlertRecord]:
        """The newest alerts by the time they fired (or resolved), newest first."""
        return self._select(*_recent(limit, state))

    def _select(self, where: str, params: tuple[Any, ...]) -> list[AlertRecord]:
        with self._lock:
            try:
                rows = self._db.execute(f"SELECT {_ALERT_COLUMNS} FROM alerts {where}", params)
                return [_record(r) for r in rows.fetchall()]
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the alert history {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SharedAlertStore:
    """The alert history in a PostgreSQL store's ``edgeship_alerts`` table, through that store's
    connection (its retries and reconnects). Closing it leaves the store open: its owner
    closes that. ``fleet``: the collector's ``--fleet``; it reads that fleet's alerts only
    (None: every fleet's), so a collector never shows or takes over another fleet's."""

    def __init__(self, store: PostgresStore, fleet: str | None = None) -> None:
        self._store = store
        self.fleet = fleet

    @property
    def path(self) -> str:
        return f"{self._store.url} (table edgeship_alerts)"

    def save(self, record: AlertRecord) -> None:
        updates = ", ".join(f"{c} = excluded.{c}" for c in _ALERT_COLUMNS.split(", ")[1:])
        self._store.execute(
            f"INSERT INTO edgeship_alerts ({_ALERT_COLUMNS}) VALUES ({', '.join('?' * 12)}) "
            f"ON CONFLICT (id) DO UPDATE SET {updates}",
            _row(record),
        )

    def firing(self) -> list[AlertRecord]:
        return self._select(*_firing(self.fleet))

    def recent(self, limit: int = 100, state: str | None = None) -> list[AlertRecord]:
        return self._select(*_recent(limit, state, self.fleet))

    def _select(self, where: str, params: tuple[Any, ...]) -> list[AlertRecord]:
        rows = self._store.execute(
            f"SELECT {_ALERT_COLUMNS} FROM edgeship_alerts {where}", params, fetch=True
        )
        return [_record(r) for r in rows]

    def close(self) -> None:
        """Nothing of its own to close (the store is its owner's)."""


def _where(state: str | None, fleet: str | None) -> tuple[str, tuple[Any, ...]]:
    given = [(column, v) for column, v in (("state", state), ("fleet", fleet)) if v is not None]
    where = " AND ".join(f"{column} = ?" for column, _ in given)
    return (f"WHERE {where}" if where else ""), tuple(v for _, v in given)


def _firing(fleet: str | None = None) -> tuple[str, tuple[Any, ...]]:
    where, params = _where("firing", fleet)
    return f"{where} ORDER BY started_at DESC", params


def _recent(limit: int, state: str | None, fleet: str | None = None) -> tuple[str, tuple[Any, ...]]:
    where, params = _where(state, fleet)
    return f"{where} ORDER BY COALESCE(resolved_at, started_at) DESC LIMIT ?", (*params, limit)


def _row(record: AlertRecord) -> tuple[Any, ...]:
    return (
        record.id, record.fleet, record.device, record.rule, record.severity, record.state,
        record.summary, record.value, record.started_at, record.updated_at,
        record.resolved_at, record.source,
    )  # fmt: skip


def _record(r: Sequence[Any]) -> AlertRecord:
    return AlertRecord(
        id=r[0],
        fleet=r[1],
        device=r[2],
        rule=r[3],
        severity=cast(Severity, r[4]),
        state=cast(Literal["firing", "resolved"], r[5]),
        summary=r[6],
        value=r[7],
        started_at=r[8],
        updated_at=r[9],
        resolved_at=r[10],
        source=r[11],
    )
