"""The queries both stores answer the same way (devices, telemetry, events, boots, dead
letters); each store supplies only how a query runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from collector.ingest import TelemetryRecord
from collector.store.protocol import (
    DEAD_LETTER_FIELDS,
    BootRange,
    DeadLetterRow,
    DeviceRow,
    EventRow,
    RolloutRow,
)
from collector.store.rows import device_from_row, rollout_from_row, telemetry_from_row
from collector.store.schema import (
    BOOT_COLUMNS,
    DEVICE_COLUMNS,
    ROLLOUT_COLUMNS,
    TELEMETRY_COLUMNS,
)

_ROLLOUT_SUMMARY = ", ".join(c for c in ROLLOUT_COLUMNS if c not in ("waves", "devices"))

__all__ = ["Reader"]

# --- shared read queries ----------------------------------------------------------------------


class Reader:
    """The read side, identical for both databases; subclasses provide ``_query``."""

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def schema_version(self) -> int:
        rows = self._query("SELECT MAX(version) FROM schema_version")
        return int(rows[0][0] or 0)

    def devices(self, fleet: str | None = None) -> list[DeviceRow]:
        where, params = _fleet_filter(fleet)
        rows = self._query(
            f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices{where} ORDER BY fleet, device",
            params,
        )
        return [device_from_row(r) for r in rows]

    def latest_telemetry(self, fleet: str | None = None) -> list[TelemetryRecord]:
        where, params = _fleet_filter(fleet, "d.")
        cols = ", ".join(f"t.{c}" for c in TELEMETRY_COLUMNS)
        rows = self._query(
            f"SELECT {cols} FROM devices d JOIN telemetry t ON t.fleet = d.fleet "
            "AND t.device = d.device AND t.received_at = d.last_telemetry_at"
            f"{where} ORDER BY t.fleet, t.device, t.seq",
            params,
        )
        latest: dict[tuple[str, str], TelemetryRecord] = {}
        for row in rows:  # two windows received at the same instant: keep the higher seq
            rec = telemetry_from_row(row)
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
        cols = ", ".join(f"t.{c}" for c in TELEMETRY_COLUMNS)
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
        return [telemetry_from_row(r) for r in reversed(rows)]

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
            f"SELECT {', '.join(BOOT_COLUMNS)} FROM boots{where} "
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

    def rollouts(
        self,
        fleet: str | None = None,
        *,
        limit: int | None = 50,
        per_fleet: int | None = None,
        state: str | None = None,
    ) -> list[RolloutRow]:
        where, params = _fleet_filter(fleet)
        if state is not None:
            where += " AND state = ?" if where else " WHERE state = ?"
            params.append(state)
        order = "started DESC, fleet, id"
        sql = f"SELECT {_ROLLOUT_SUMMARY} FROM edgeship_rollouts{where}"
        if per_fleet is not None:
            sql = (
                f"SELECT {_ROLLOUT_SUMMARY} FROM (SELECT {_ROLLOUT_SUMMARY}, ROW_NUMBER() "
                f"OVER (PARTITION BY fleet ORDER BY {order}) AS n FROM edgeship_rollouts{where})"
                " AS newest WHERE n <= ?"
            )
            params.append(int(per_fleet))
        sql += f" ORDER BY {order}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [rollout_from_row(r) for r in self._query(sql, params)]

    def rollout(self, fleet: str, rollout_id: str) -> RolloutRow | None:
        rows = self._query(
            f"SELECT {', '.join(ROLLOUT_COLUMNS)} FROM edgeship_rollouts "
            "WHERE fleet = ? AND id = ?",
            [fleet, rollout_id],
        )
        return rollout_from_row(rows[0]) if rows else None

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
