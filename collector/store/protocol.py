"""The store's interface (:class:`Store`), the rows it returns and its errors: what the
collector, the fleet state and the API read, whichever database is behind it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from collector.errors import StoreError
from collector.ingest import DeadLetter, Record, TelemetryRecord
from device_agent.contracts.messages import (
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
    "Store",
    "one_line",
]

SCHEMA_VERSION = 4

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


def one_line(exc: BaseException) -> str:
    return safe_text(" ".join(str(exc).split()))
