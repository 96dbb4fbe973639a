"""Records into rows and rows back into records, and the per-device aggregates one batch adds:
the part of a write that is the same for SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from collector.ingest import DeadLetter, EventRecord, Record, RolloutRecord, TelemetryRecord
from collector.store.protocol import DeviceRow, InsertResult, RolloutRow
from collector.store.schema import DEVICE_COLUMNS
from device_agent.contracts.messages import (
    LATENCY_BUCKETS_MS,
    ROLLOUT_DEVICE_STATES,
    SCORE_BUCKETS,
    DeployEvent,
    StatusMessage,
    safe_text,
)

__all__ = [
    "DeviceDelta",
    "aggregate_rows",
    "dead_rows",
    "device_from_row",
    "insert_result",
    "message_row",
    "plan_batch",
    "rollout_from_row",
    "rollout_result",
    "rollout_rows",
    "telemetry_from_row",
    "telemetry_row",
]

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


def telemetry_row(r: TelemetryRecord) -> tuple[Any, ...]:
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


def telemetry_from_row(row: Sequence[Any]) -> TelemetryRecord:
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


def device_from_row(row: Sequence[Any]) -> DeviceRow:
    values = dict(zip(DEVICE_COLUMNS, row, strict=True))
    host = values.pop("host")
    values["host"] = {} if host is None else json.loads(host)
    for key in ("messages", "duplicates"):
        values[key] = int(values[key])
    if values["status_seq"] is not None:
        values["status_seq"] = int(values["status_seq"])
    values["deploy"] = _deploy(values["deploy"])
    return DeviceRow(**values)


@dataclass
class DeviceDelta:
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
        return tuple(getattr(self, c) for c in DEVICE_COLUMNS)


def plan_batch(
    records: Sequence[Record],
) -> tuple[list[Record], dict[tuple[str, str], DeviceDelta]]:
    """Records sorted by key with in-batch repeats removed (counted as duplicates).

    Sorting gives every writer the same lock order, so two collectors inserting overlapping
    batches into PostgreSQL wait for each other instead of deadlocking.
    """
    unique: dict[tuple[str, str, str, int], Record] = {}
    deltas: dict[tuple[str, str], DeviceDelta] = {}
    for r in records:
        if r.key in unique:
            _delta(deltas, r).duplicates += 1
        else:
            unique[r.key] = r
    return [unique[k] for k in sorted(unique)], deltas


def _delta(deltas: dict[tuple[str, str], DeviceDelta], r: Record) -> DeviceDelta:
    key = (r.fleet, r.device)
    d = deltas.get(key)
    if d is None:
        d = deltas[key] = DeviceDelta(r.fleet, r.device)
    return d


def aggregate_rows(
    new: Sequence[Record], duplicates: Iterable[Record], deltas: dict[tuple[str, str], DeviceDelta]
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


def dead_rows(dead_letters: Sequence[DeadLetter]) -> list[tuple[Any, ...]]:
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


def insert_result(
    received: int, new: Sequence[Record], dead: int, dead_new: int | None = None
) -> InsertResult:
    by_kind: dict[str, int] = {}
    for r in new:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
    stored_dead = dead if dead_new is None else dead_new
    return InsertResult(
        received, len(new), received - len(new), stored_dead, by_kind, dead - stored_dead
    )


def message_row(r: Record) -> tuple[Any, ...]:
    body = r.body if isinstance(r, EventRecord) else None
    return (r.fleet, r.device, r.boot, r.seq, r.kind, r.ts, r.received_at, body)


# --- rollouts -------------------------------------------------------------------------------


def rollout_rows(rollouts: Sequence[RolloutRecord]) -> list[tuple[Any, ...]]:
    """One row per (fleet, id), the highest ``seq`` of the batch (of equal ones, the first
    received: a repeat changes nothing), sorted by key so concurrent writers lock in one
    order. A store cannot write one row twice in one statement, hence the choice here."""
    best: dict[tuple[str, str], RolloutRecord] = {}
    for r in rollouts:
        kept = best.get(r.key)
        if kept is None or r.message.seq > kept.message.seq:
            best[r.key] = r
    return [_rollout_row(best[k]) for k in sorted(best)]


def _rollout_row(r: RolloutRecord) -> tuple[Any, ...]:
    m = r.message
    counts = dict.fromkeys(ROLLOUT_DEVICE_STATES, 0)
    for state in m.devices.values():
        counts[state] += 1
    return (
        r.fleet, m.id, m.seq, m.ts, m.started, r.received_at, m.state, m.deploy, m.model,
        m.model_version, m.soak_s, m.wave, len(m.waves), len(m.devices), _jdump(counts),
        m.reason, _jdump([list(w) for w in m.waves]), _jdump(dict(m.devices)),
    )  # fmt: skip


def rollout_from_row(row: Sequence[Any]) -> RolloutRow:
    """A row of ``edgeship_rollouts``: every column but ``waves`` and ``devices`` (a summary),
    or all of them."""
    (fleet, rid, seq, ts, started, received_at, state, deploy, model, model_version, soak_s,
     wave, waves_total, devices_total, counts, reason, *detail) = row  # fmt: skip
    waves: tuple[tuple[str, ...], ...] | None = None
    devices: dict[str, str] | None = None
    if detail:
        waves = tuple(tuple(str(d) for d in w) for w in json.loads(detail[0]))
        devices = {str(k): str(v) for k, v in json.loads(detail[1]).items()}
    return RolloutRow(
        fleet=fleet,
        id=rid,
        seq=int(seq),
        ts=float(ts),
        started=float(started),
        received_at=float(received_at),
        state=state,
        deploy=deploy,
        model=model,
        model_version=model_version,
        soak_s=float(soak_s),
        wave=int(wave),
        waves_total=int(waves_total),
        devices_total=int(devices_total),
        counts={str(k): int(v) for k, v in json.loads(counts).items()},
        reason=reason,
        waves=waves,
        devices=devices,
    )


def rollout_result(received: int, written: int) -> InsertResult:
    """What a batch's rollouts add to its InsertResult: ``written`` rows new or replaced by a
    higher ``seq`` are new, the rest (an older or equal ``seq``) duplicates."""
    by_kind = {"rollouts": written} if written else {}
    return InsertResult(received, written, received - written, 0, by_kind)
