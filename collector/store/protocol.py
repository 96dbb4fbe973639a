"""The store's interface (:class:`Store`), the rows it returns and its errors: what the
collector, the fleet state and the API read, whichever database is behind it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from collector.errors import StoreError
from collector.ingest import DeadLetter, Record, RolloutRecord, TelemetryRecord
from device_agent.contracts.messages import (
    ROLLOUT_DEVICE_STATES,
    DeployEvent,
    safe_text,
)

__all__ = [
    "DEAD_LETTER_FIELDS",
    "SCHEMA_VERSION",
    "BootRange",
    "DeadLetterRow",
    "DeviceRow",
    "EventRow",
    "InsertResult",
    "RecordError",
    "RolloutRow",
    "Store",
    "one_line",
]

SCHEMA_VERSION = 5

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
class RolloutRow:
    """The newest state of one staged rollout (the ``edgeship_rollouts`` table): the fields of
    :class:`~device_agent.contracts.messages.RolloutEvent` with the number of its waves and
    devices and ``counts`` (devices per state, every state named), ``received_at`` (when the
    collector received this state). ``waves`` and ``devices`` are None in a summary
    (:meth:`Store.rollouts`) and filled by :meth:`Store.rollout`."""

    fleet: str
    id: str
    seq: int
    ts: float
    started: float
    received_at: float
    state: str
    deploy: str
    model: str | None
    model_version: str | None
    soak_s: float
    wave: int
    waves_total: int
    devices_total: int
    counts: Mapping[str, int]
    reason: str | None
    waves: tuple[tuple[str, ...], ...] | None = None
    devices: Mapping[str, str] | None = None

    @property
    def wave_shown(self) -> int:
        """The wave as a person counts it, 1 to ``waves_total`` (``wave`` is an index, and
        equals ``waves_total`` when the rollout is done)."""
        return min(self.wave + 1, self.waves_total)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fleet": self.fleet,
            "id": self.id,
            "seq": self.seq,
            "state": self.state,
            "ts": self.ts,
            "started": self.started,
            "received_at": self.received_at,
            "deploy": self.deploy,
            "model": self.model,
            "model_version": self.model_version,
            "soak_s": self.soak_s,
            "wave": self.wave,
            "waves_total": self.waves_total,
            "devices_total": self.devices_total,
            "counts": {s: self.counts.get(s, 0) for s in ROLLOUT_DEVICE_STATES},
            "reason": self.reason,
        }
        if self.waves is not None:
            out["waves"] = [list(w) for w in self.waves]
        if self.devices is not None:
            out["devices"] = dict(self.devices)
        return out


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
        self,
        records: Sequence[Record],
        dead_letters: Sequence[DeadLetter] = (),
        rollouts: Sequence[RolloutRecord] = (),
    ) -> InsertResult:
        """Store a batch in one transaction; duplicates by (fleet, device, boot, seq) are
        dropped by the store's unique key. A rollout replaces the stored state of its
        (fleet, id) only with a higher ``seq``; one that does not counts as a duplicate.
        Raises StoreError (nothing is stored then)."""
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

    def rollouts(
        self,
        fleet: str | None = None,
        *,
        limit: int | None = 50,
        per_fleet: int | None = None,
        state: str | None = None,
    ) -> list[RolloutRow]:
        """Summaries (no ``waves``, ``devices``) of the newest rollouts by ``started``, newest
        first: at most ``limit`` (None: all), at most ``per_fleet`` of each fleet, only those
        in ``state`` when given."""
        ...

    def rollout(self, fleet: str, rollout_id: str) -> RolloutRow | None:
        """One rollout with its waves and every device's state; None if it is not stored."""
        ...

    def dead_letters(self, limit: int = 100) -> list[DeadLetterRow]:
        """The newest dead letters, newest first."""
        ...

    def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters by offending field."""
        ...

    def close(self) -> None: ...


def one_line(exc: BaseException) -> str:
    return safe_text(" ".join(str(exc).split()))
