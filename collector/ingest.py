"""Turn one received MQTT message into a record to store, or a dead letter. No I/O.

:func:`ingest` is the collector's only entry point for untrusted bytes. It never raises: every
``(topic, payload)`` becomes exactly one of

* :class:`TelemetryRecord`: a valid ``telemetry`` window, flattened into the columns the store
  keeps (histograms as tuples, host figures as numbers);
* :class:`EventRecord`: a valid ``status``, ``outliers`` or ``cmd/reply`` message, with its
  decoded message and its original JSON text;
* :class:`RolloutRecord`: a valid fleet-level ``rollouts`` message (a staged rollout's whole
  state; the store keeps the newest ``seq`` of each rollout);
* :class:`Ignored`: valid traffic the collector does not store (``cmd`` requests, ``alerts``,
  a cleared retained ``status``);
* :class:`DeadLetter`: anything the wire contract rejects (unknown topic, non-JSON, wrong
  schema version, wrong types, oversized payload, a string with a lone surrogate or a NUL...),
  with the offending field and message. Its text (topic, field, error) is made safe to store
  and print (:func:`~device_agent.contracts.messages.safe_text`); the payload is kept as bytes.

Validation is :func:`device_agent.contracts.messages.decode`, the reference decoder, with one
exception made for speed: telemetry is the bulk of a fleet's traffic and the reference decoder
spends ~130 us on one window (mostly checking 57 histogram bounds one call at a time), which
would cap a collector far below what paho can receive.
:func:`~collector.fast_telemetry.fast_telemetry` checks the same rules with whole-list
operations and *only ever accepts*: anything it is not certain about (an unusual shape, a colon
inside a string, a duplicate-key risk) goes to the reference decoder, which then accepts or
names the field. ``tests/test_collector_ingest.py`` checks on thousands of
generated and mutated payloads that whatever the fast path accepts, the reference decoder
accepts too and turns into the identical record.
"""

from __future__ import annotations

import functools
import hashlib

from collector.fast_telemetry import fast_telemetry as _fast_telemetry
from collector.records import (
    DEAD_LETTER_MAX_BYTES,
    DeadLetter,
    EventKind,
    EventRecord,
    Ignored,
    IngestResult,
    Record,
    RolloutRecord,
    TelemetryRecord,
)
from device_agent.contracts.messages import (
    CommandReply,
    OutlierEvent,
    RolloutEvent,
    StatusMessage,
    TelemetryMessage,
    TopicParts,
    decode,
    parse_topic,
    safe_text,
)
from device_agent.errors import ProtocolError

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
    "dead_letter",
    "ingest",
    "telemetry_record",
]


def ingest(
    topic: str,
    payload: bytes | bytearray | memoryview,
    received_at: float,
    *,
    fleet: str | None = None,
) -> IngestResult:
    """Validate one message received on ``topic`` at ``received_at`` (unix seconds).

    With ``fleet`` set, a message of another fleet is a dead letter (``field="topic.fleet"``).
    Never raises: a decoder failure that is not a :class:`ProtocolError` (a bug in the
    decoder) is a dead letter too, with ``field="decoder"``, so one bad message cannot stop
    the collector.
    """
    data = bytes(payload)
    try:
        parts = _parse_topic(topic)
        if fleet is not None and parts.fleet != fleet:
            raise ProtocolError(
                f"topic.fleet: {parts.fleet!r} is not the collected fleet {fleet!r}",
                field="topic.fleet",
            )
        if parts.kind == "telemetry" and parts.device is not None:
            fast = _fast_telemetry(parts.fleet, parts.device, data, received_at)
            if fast is not None:
                return fast
        elif parts.kind == "status" and not data:
            return Ignored(topic, "cleared retained status")
        message = decode(topic, data)
    except ProtocolError as exc:
        return _dead(topic, data, received_at, exc.field, str(exc))
    except Exception as exc:  # the decoder's own bug: keep the message, name the failure
        return _dead(topic, data, received_at, "decoder", f"{type(exc).__name__}: {exc}")
    if isinstance(message, TelemetryMessage):
        return telemetry_record(parts.fleet, message, received_at)
    if isinstance(message, StatusMessage | OutlierEvent | CommandReply):
        return EventRecord(
            fleet=parts.fleet,
            device=message.device,
            boot=message.boot,
            seq=message.seq,
            kind=message.KIND,
            ts=message.ts,
            received_at=received_at,
            body=data.decode("utf-8"),
            message=message,
        )
    if isinstance(message, RolloutEvent):
        return RolloutRecord(fleet=parts.fleet, received_at=received_at, message=message)
    return Ignored(topic, f"{parts.kind} messages are not stored")


@functools.lru_cache(maxsize=65536)
def _parse_topic(topic: str) -> TopicParts:
    # A fleet publishes on a few topics per device, over and over; only valid ones are cached
    # (lru_cache does not keep a call that raised).
    return parse_topic(topic)


def telemetry_record(fleet: str, m: TelemetryMessage, received_at: float) -> TelemetryRecord:
    """The record of a decoded telemetry message (what the fast path must reproduce)."""
    lat = m.latency_ms
    return TelemetryRecord(
        fleet=fleet,
        device=m.device,
        boot=m.boot,
        seq=m.seq,
        ts=m.ts,
        received_at=received_at,
        window_start=m.window_start,
        window_s=m.window_s,
        model=m.model,
        model_version=m.model_version,
        inferences=m.inferences,
        errors=m.errors,
        outliers=m.outliers,
        p50=lat.p50,
        p95=lat.p95,
        p99=lat.p99,
        max_ms=lat.max,
        latency_bounds=lat.histogram.bounds,
        latency_counts=lat.histogram.counts,
        score_bounds=m.scores.bounds,
        score_counts=m.scores.counts,
        predictions=dict(m.predictions),
        cpu_percent=m.cpu_percent,
        system_cpu_percent=m.system_cpu_percent,
        rss_bytes=m.rss_bytes,
        mem_available_bytes=m.mem_available_bytes,
        temperature_c=m.temperature_c,
        throttled=None if m.throttled is None else m.throttled.raw,
        spool_depth=m.spool_depth,
        spool_dropped=m.spool_dropped,
        drops_since_last=m.drops_since_last,
        deploy=m.deploy,
    )


def dead_letter(topic: str, data: bytes, received_at: float, field: str, error: str) -> DeadLetter:
    """The dead letter of ``data`` received on ``topic``: text escaped (no lone surrogate, no
    NUL reaches a store or a log), payload cut to :data:`DEAD_LETTER_MAX_BYTES`, digest of the
    whole message."""
    topic = safe_text(topic)
    digest = hashlib.sha256(topic.encode("utf-8") + b"\x00" + data).hexdigest()
    return DeadLetter(
        topic=topic,
        received_at=received_at,
        size=len(data),
        field=safe_text(field),
        error=safe_text(error),
        payload=data[:DEAD_LETTER_MAX_BYTES],
        digest=digest,
    )


_dead = dead_letter
