"""What ingest makes of one received message: a record to store, a dead letter, or valid
traffic the collector ignores. Plain frozen values, shared by ingest, the store, the fleet state
and the monitor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeAlias

from device_agent.contracts.messages import (
    CommandReply,
    DeployEvent,
    OutlierEvent,
    RolloutEvent,
    StatusMessage,
)

__all__ = [
    "DEAD_LETTER_MAX_BYTES",
    "DeadLetter",
    "EventKind",
    "EventRecord",
    "Ignored",
    "IngestResult",
    "Record",
    "RolloutRecord",
    "TelemetryRecord",
]

# A dead letter keeps at most this much of its payload: enough to see what a broken publisher
# sends, not enough for a hostile one to fill the store with a few large messages.
DEAD_LETTER_MAX_BYTES = 64 * 1024

EventKind: TypeAlias = Literal["status", "outliers", "cmd/reply"]


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    """One telemetry window as the store keeps it (one row of the ``telemetry`` table).

    Field meanings are those of :class:`~device_agent.contracts.messages.TelemetryMessage`;
    ``max_ms`` is ``latency_ms.max``, ``throttled`` the raw ``get_throttled`` mask and
    ``received_at`` the collector's clock when the message arrived; ``deploy`` the remote
    deploy that changed state during the window, if any.
    """

    kind: ClassVar[Literal["telemetry"]] = "telemetry"

    fleet: str
    device: str
    boot: str
    seq: int
    ts: float
    received_at: float
    window_start: float
    window_s: float
    model: str | None
    model_version: str | None
    inferences: int
    errors: int
    outliers: int
    p50: float | None
    p95: float | None
    p99: float | None
    max_ms: float | None
    latency_bounds: tuple[float, ...]
    latency_counts: tuple[int, ...]
    score_bounds: tuple[float, ...]
    score_counts: tuple[int, ...]
    predictions: Mapping[str, int]
    cpu_percent: float | None
    system_cpu_percent: float | None
    rss_bytes: int | None
    mem_available_bytes: int | None
    temperature_c: float | None
    throttled: int | None
    spool_depth: int
    spool_dropped: int
    drops_since_last: int
    deploy: DeployEvent | None = None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.fleet, self.device, self.boot, self.seq)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A ``status``, ``outliers`` or ``cmd/reply`` message: ``body`` is its JSON text as
    received (unknown fields included), ``message`` the decoded form."""

    fleet: str
    device: str
    boot: str
    seq: int
    kind: EventKind
    ts: float
    received_at: float
    body: str
    message: StatusMessage | OutlierEvent | CommandReply

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.fleet, self.device, self.boot, self.seq)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message the wire contract rejects. ``field`` names the offending part (``topic``,
    ``payload``, ``v``, ``latency_ms.counts``...), ``error`` says what is wrong; ``payload``
    holds at most :data:`DEAD_LETTER_MAX_BYTES` of it and ``size`` its real length.

    ``digest`` (SHA-256 of the topic and the whole payload) identifies the message: the broker
    redelivers what a collector did not acknowledge, and the store keeps one dead letter per
    digest. Use :func:`dead_letter` to make one (it escapes the text and computes the digest).
    """

    topic: str
    received_at: float
    size: int
    field: str
    error: str
    payload: bytes
    digest: str = ""


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """A ``rollouts`` message (``edgeship/{fleet}/rollouts``): the whole state of one staged
    rollout. The store keeps, per ``(fleet, id)``, the one with the highest ``seq``."""

    kind: ClassVar[Literal["rollouts"]] = "rollouts"

    fleet: str
    received_at: float
    message: RolloutEvent

    @property
    def key(self) -> tuple[str, str]:
        return (self.fleet, self.message.id)


@dataclass(frozen=True, slots=True)
class Ignored:
    """Valid traffic the collector does not store: commands, alerts, cleared retained status."""

    topic: str
    reason: str


Record: TypeAlias = TelemetryRecord | EventRecord
IngestResult: TypeAlias = TelemetryRecord | EventRecord | RolloutRecord | DeadLetter | Ignored
