"""The MQTT wire contract: topics, message schemas (version 1), encode and strict decode.

This module owns everything a device and a subscriber must agree on to talk over MQTT:

* the topic tree ``edgeship/{fleet}/{device}/{kind}`` (kinds in :data:`DEVICE_KINDS`) plus the
  fleet-level ``edgeship/{fleet}/alerts``, with :func:`topic`, :func:`parse_topic` and
  :func:`subscription` for wildcard patterns;
* one frozen dataclass per message kind, each with ``to_dict``/``from_dict``;
* :func:`encode` (compact UTF-8 JSON) and :func:`decode`, which validates strictly and raises
  :class:`~device_agent.errors.ProtocolError` naming the offending field for anything it does not
  accept: oversized payloads, non-JSON, a wrong or newer schema version, wrong types, NaN or
  infinities, unknown kinds, a payload whose kind or device disagrees with its topic, a string
  (object keys included) holding a lone surrogate or a NUL, nesting deeper than
  :data:`MAX_DEPTH` (unknown fields included).

Every string of a message, anywhere in it, must be text any store, log or terminal can take: no
lone surrogate (U+D800..U+DFFF, which UTF-8 cannot encode; JSON can spell one as ``"\\ud800"``)
and no NUL (U+0000, which PostgreSQL text and C strings cannot hold). :func:`decode` refuses
such a message and :func:`encode` will not produce one; :func:`safe_text` escapes both, for
error messages and dead letters that must quote what was refused.

Every message a device publishes carries the envelope ``device``, ``boot``, ``seq``, ``ts``:
``seq`` is a per-device sequence number that survives restarts (owned by
:class:`device_agent.spool.Spool`), so a collector drops duplicates by ``(device, boot, seq)``
and counts gaps. Fields a decoder does not know are ignored, so adding an optional field keeps
``v`` at 1; any other change bumps :data:`SCHEMA_VERSION`. ``docs/protocol.md`` documents the
contract for third-party subscribers.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, TypeAlias, cast

from device_agent.contracts.errors import ProtocolError
from device_agent.contracts.text import escape

__all__ = [
    "ALERTS_KIND",
    "DEVICE_KINDS",
    "FLEET_KINDS",
    "KINDS",
    "LATENCY_BUCKETS_MS",
    "MAX_DEPTH",
    "MAX_PAYLOAD_BYTES",
    "MAX_ROLLOUT_DEVICES",
    "MAX_SEQ",
    "QOS",
    "RETAIN",
    "ROLLOUTS_KIND",
    "ROLLOUT_DEVICE_STATES",
    "ROLLOUT_STATES",
    "SCHEMA_VERSION",
    "SCORE_BUCKETS",
    "TOPIC_ROOT",
    "Alert",
    "Command",
    "CommandReply",
    "DeployEvent",
    "Histogram",
    "InputSummary",
    "JSONScalar",
    "LatencySummary",
    "Message",
    "OutlierEvent",
    "RolloutEvent",
    "StatusMessage",
    "TelemetryMessage",
    "Throttled",
    "TopicParts",
    "decode",
    "encode",
    "message_topic",
    "parse_topic",
    "safe_text",
    "shared_subscription",
    "subscription",
    "text_problem",
    "topic",
    "unique_keys",
    "validate_id",
]

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgeship"

# Large enough for any telemetry window or command, small enough that a hostile or buggy
# publisher cannot make a Pi-class collector or agent parse megabytes of JSON.
MAX_PAYLOAD_BYTES = 256 * 1024

# How deep objects and arrays may nest in a message (the envelope is level 1). Deeper payloads
# are refused by every decoder alike, instead of wherever one runs out of stack.
MAX_DEPTH = 64

# Sequence numbers stay below 2**53 so that JavaScript subscribers (IEEE doubles) read them
# exactly; at 1000 messages a second that lasts 285,000 years.
MAX_SEQ = 2**53 - 1

DeviceKind: TypeAlias = Literal["status", "telemetry", "outliers", "cmd", "cmd/reply"]
Kind: TypeAlias = Literal[
    "status", "telemetry", "outliers", "cmd", "cmd/reply", "alerts", "rollouts"
]
DEVICE_KINDS: tuple[DeviceKind, ...] = ("status", "telemetry", "outliers", "cmd", "cmd/reply")
ALERTS_KIND: Literal["alerts"] = "alerts"
ROLLOUTS_KIND: Literal["rollouts"] = "rollouts"
# Kinds published on a fleet's own topic, edgeship/{fleet}/{kind}, with no device level.
FLEET_KINDS: tuple[Kind, ...] = (ALERTS_KIND, ROLLOUTS_KIND)
KINDS: tuple[Kind, ...] = (*DEVICE_KINDS, *FLEET_KINDS)

# Delivery settings per kind. status is retained so a new subscriber learns every device's
# state at once (the Last Will overwrites it with "offline"); commands are never retained, or
# a device would re-run the last command on every reconnect.
# rollouts is retained too: a collector that starts late learns the latest rollout's state.
QOS: Mapping[Kind, int] = {
    "status": 1,
    "telemetry": 1,
    "outliers": 1,
    "cmd": 1,
    "cmd/reply": 1,
    "alerts": 1,
    "rollouts": 1,
}
RETAIN: Mapping[Kind, bool] = {
    "status": True,
    "telemetry": False,
    "outliers": False,
    "cmd": False,
    "cmd/reply": False,
    "alerts": False,
    "rollouts": True,
}

# Fixed latency bucket upper bounds in milliseconds, the same on every device so that a
# collector can add histograms across a fleet. Six steps per decade (1, 1.5, 2, 3, 5, 7.5):
# adjacent bounds differ by at most 1.67x, so a percentile read back from merged buckets is
# within one step; per-device percentiles are exact (computed from the window's raw
# latencies). 50 us is below any real model call on a Pi, 10 s is a hung call.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
    10.0, 15.0, 20.0, 30.0, 50.0, 75.0,
    100.0, 150.0, 200.0, 300.0, 500.0, 750.0,
    1000.0, 1500.0, 2000.0, 3000.0, 5000.0, 7500.0,
    10000.0,
)  # fmt: skip

# Fixed outlier-score bucket bounds. Scores are detector-specific (higher = more anomalous),
# so the bounds span a wide range on a 1-2-5 grid; 0 separates non-positive scores. Devices
# running the same bundle produce comparable histograms, which is what drift checks need.
SCORE_BUCKETS: tuple[float, ...] = (
    0.0,
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0,
    1000.0, 2000.0, 5000.0, 10000.0,
)  # fmt: skip

# Fleet and device ids, command and alert ids: safe in topics, file names and log lines.
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ACTION_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_MAX_LABELS = 4096
_MAX_LABEL_LEN = 128
_MAX_HOST_FACTS = 64
_MAX_SAMPLE = 64
_MAX_TEXT = 4096
_MAX_BUCKETS = 256
_MAX_WHERE = 200  # characters of a field path in an error

JSONScalar: TypeAlias = str | int | float | bool | None
StatusState: TypeAlias = Literal["online", "offline"]
DeployState: TypeAlias = Literal["probation", "applied", "rolled_back", "failed"]
DEPLOY_STATES: tuple[DeployState, ...] = ("probation", "applied", "rolled_back", "failed")
Severity: TypeAlias = Literal["info", "warning", "critical"]
AlertState: TypeAlias = Literal["firing", "resolved"]


# Characters no string of a message may hold: NUL and the surrogate code points (a lone
# surrogate cannot be encoded as UTF-8; Python's JSON decoder yields one for "\ud800").
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """What makes ``value`` unfit for the wire (a lone surrogate, a NUL), or None if nothing."""
    match = _BAD_TEXT.search(value)
    if match is None:
        return None
    char = match.group()
    what = "a NUL (U+0000)" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
    return f"holds {what} at character {match.start()}; strings must be valid Unicode without NUL"


def safe_text(value: str) -> str:
    """``value`` with every lone surrogate and NUL written as a backslash escape (``\\ud800``,
    ``\\x00``), so that it can be stored, logged or printed; other text is returned as is."""
    if _BAD_TEXT.search(value) is None:
        return value
    return _BAD_TEXT.sub(
        lambda m: "\\x00" if m.group() == "\x00" else f"\\u{ord(m.group()):04x}", value
    )


# --- topics ---------------------------------------------------------------------------------


class TopicParts(NamedTuple):
    """A parsed topic. ``device`` is None for the fleet-level ``alerts`` and ``rollouts``
    topics."""

    fleet: str
    device: str | None
    kind: Kind


def validate_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid fleet/device id, else raise ProtocolError naming ``what``.

    Ids are 1 to 64 characters of ``[A-Za-z0-9_.-]``, which excludes the MQTT wildcards ``+``
    and ``#``, the level separator ``/`` and the ``$`` of broker-internal topics.
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        # through _fail: ``what`` may hold the key of a message ("devices.<key>"), escaped there
        rule = "1-64 characters of A-Z a-z 0-9 _ . -"
        shown = repr(value)  # whole up to the longest id (64 characters and quotes, escapes)
        if len(shown) > 96:
            shown = shown[:93] + "..."
        raise _fail(what, f"{shown} is not a valid id ({rule})")
    return value


def topic(fleet: str, device: str | None, kind: Kind) -> str:
    """The topic a message of ``kind`` goes to: ``edgeship/{fleet}/{device}/{kind}``.

    For ``kind="alerts"`` or ``"rollouts"`` ``device`` must be None: those are fleet-level
    (``edgeship/{fleet}/{kind}``).
    """
    validate_id(fleet, "fleet")
    if kind in FLEET_KINDS:
        if device is not None:
            raise ProtocolError(f"device: {kind} are fleet-level, pass device=None", field="device")
        return f"{TOPIC_ROOT}/{fleet}/{kind}"
    if kind not in DEVICE_KINDS:
        raise ProtocolError(f"kind: {kind!r} is not one of {list(KINDS)}", field="kind")
    if device is None:
        raise ProtocolError(f"device: a {kind} topic needs a device id", field="device")
    validate_id(device, "device")
    return f"{TOPIC_ROOT}/{fleet}/{device}/{kind}"


def parse_topic(value: str) -> TopicParts:
    """Split a concrete topic into (fleet, device, kind); raise ProtocolError if it is not ours."""
    if not isinstance(value, str):
        raise ProtocolError(f"topic: expected a string, got {type(value).__name__}", field="topic")
    parts = value.split("/")
    if len(parts) < 3 or parts[0] != TOPIC_ROOT:
        raise ProtocolError(
            f"topic: {value!r} is not edgeship/{{fleet}}/{{device}}/{{kind}}", field="topic"
        )
    fleet = validate_id(parts[1], "topic.fleet")
    if len(parts) == 3:
        for fleet_kind in FLEET_KINDS:
            if parts[2] == fleet_kind:
                return TopicParts(fleet, None, fleet_kind)
        raise ProtocolError(f"topic: {value!r} has no device or kind level", field="topic")
    device = validate_id(parts[2], "topic.device")
    kind = "/".join(parts[3:])
    for known in DEVICE_KINDS:
        if kind == known:
            return TopicParts(fleet, device, known)
    raise ProtocolError(
        f"topic.kind: {kind!r} is not one of {list(DEVICE_KINDS)}", field="topic.kind"
    )


def subscription(
    fleet: str | None = None, device: str | None = None, kind: Kind | None = None
) -> str:
    """A subscription pattern; None means "any" (``+``, or ``#`` for the kind).

    ``subscription("f")`` -> ``edgeship/f/#`` (the whole fleet, alerts included);
    ``subscription("f", kind="telemetry")`` -> ``edgeship/f/+/telemetry``;
    ``subscription(kind="status")`` -> ``edgeship/+/+/status``;
    ``subscription("f", kind="alerts")`` -> ``edgeship/f/alerts`` (and ``rollouts`` alike).
    """
    fleet_level = "+" if fleet is None else validate_id(fleet, "fleet")
    if kind in FLEET_KINDS:
        if device is not None:
            raise ProtocolError(f"device: {kind} are fleet-level, pass device=None", field="device")
        return f"{TOPIC_ROOT}/{fleet_level}/{kind}"
    if kind is not None and kind not in DEVICE_KINDS:
        raise ProtocolError(f"kind: {kind!r} is not one of {list(KINDS)}", field="kind")
    if kind is None and device is None:
        return f"{TOPIC_ROOT}/{fleet_level}/#"
    device_level = "+" if device is None else validate_id(device, "device")
    return f"{TOPIC_ROOT}/{fleet_level}/{device_level}/{'#' if kind is None else kind}"


def shared_subscription(group: str, pattern: str) -> str:
    """An MQTT v5 shared subscription, ``$share/{group}/{pattern}``: brokers give each message
    to one subscriber of the group, which is how several collectors split a fleet's load."""
    validate_id(group, "group")
    return f"$share/{group}/{pattern}"


# --- validation helpers ---------------------------------------------------------------------


def _fail(where: str, problem: str) -> ProtocolError:
    # ``where`` may hold keys of the message: escaped (controls and newlines too: it names a
    # field, one line in a log, a dead letter's field and a metric's label), and shortened, so
    # a hostile key cannot make every log line and dead letter huge.
    where, problem = escape(where), safe_text(problem)
    if len(where) > _MAX_WHERE:
        where = where[: _MAX_WHERE - 3] + "..."
    return ProtocolError(f"{where}: {problem}", field=where)


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"expected an object, got {_jtype(value)}")
    return value


def _jtype(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _int(value: Any, where: str, *, lo: int = 0, hi: int = MAX_SEQ) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected an integer, got {_jtype(value)} {_short(value)}")
    if not lo <= value <= hi:
        raise _fail(where, f"{value} is outside [{lo}, {hi}]")
    return value


def _float(value: Any, where: str, *, lo: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, f"expected a number, got {_jtype(value)} {_short(value)}")
    out = float(value)
    if not math.isfinite(out):
        raise _fail(where, f"{out} is not a finite number")
    if lo is not None and out < lo:
        raise _fail(where, f"{out} is below {lo}")
    return out


def _opt_float(value: Any, where: str, *, lo: float | None = None) -> float | None:
    return None if value is None else _float(value, where, lo=lo)


def _opt_int(value: Any, where: str, *, hi: int = MAX_SEQ) -> int | None:
    return None if value is None else _int(value, where, hi=hi)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"expected true or false, got {_jtype(value)} {_short(value)}")
    return value


def _str(value: Any, where: str, *, max_len: int = _MAX_TEXT) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(where, f"expected a non-empty string, got {_jtype(value)} {_short(value)}")
    if len(value) > max_len:
        raise _fail(where, f"string of {len(value)} characters is longer than {max_len}")
    problem = text_problem(value)
    if problem is not None:
        raise _fail(where, problem)
    return value


def _opt_str(value: Any, where: str, *, max_len: int = _MAX_TEXT) -> str | None:
    return None if value is None else _str(value, where, max_len=max_len)


def _id(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"expected an id string, got {_jtype(value)} {_short(value)}")
    return validate_id(value, where)


def _choice(value: Any, where: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _fail(where, f"{_short(value)} is not one of {list(choices)}")
    return str(value)


def _list(value: Any, where: str, *, max_len: int) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise _fail(where, f"expected an array, got {_jtype(value)}")
    if len(value) > max_len:
        raise _fail(where, f"{len(value)} items, at most {max_len} allowed")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _require(obj: Mapping[str, Any], key: str, where: str) -> Any:
    """The value of a required key (which may be null); a missing key is an error."""
    if key not in obj:
        raise _fail(_join(where, key), "missing")
    return obj[key]


def _join(where: str, key: str) -> str:
    return key if not where else f"{where}.{key}"


def _check_json_value(value: Any, where: str, depth: int = 0) -> None:
    """Free-form JSON (command args and results) must itself be encodable: no NaN, no inf, no
    string (key or value) with a lone surrogate or a NUL."""
    if depth > 32:
        raise _fail(where, "nested more than 32 levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(where, f"{value} is not a finite number")
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:
            raise _fail(where, problem)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise _fail(where, f"object key {_short(k)} is not a string")
            problem = text_problem(k)
            if problem is not None:
                raise _fail(where, f"the key {_short(k)} {problem}")
            _check_json_value(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json_value(v, f"{where}[{i}]", depth + 1)
    elif not isinstance(value, str | int | float | bool) and value is not None:
        raise _fail(where, f"{type(value).__name__} is not a JSON value")


# --- message parts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """Counts of values in fixed buckets.

    ``counts`` has one more entry than ``bounds``: ``counts[i]`` counts values ``v`` with
    ``bounds[i-1] < v <= bounds[i]`` (Prometheus ``le`` semantics, not cumulative), and the last
    entry counts values above the last bound.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Histogram:
        obj = _obj(data, where)
        raw_bounds = _list(_require(obj, "bounds", where), f"{where}.bounds", max_len=_MAX_BUCKETS)
        bounds = tuple(_float(b, f"{where}.bounds[{i}]") for i, b in enumerate(raw_bounds))
        for i in range(1, len(bounds)):
            if bounds[i] <= bounds[i - 1]:
                raise _fail(f"{where}.bounds[{i}]", "bounds must be strictly increasing")
        raw_counts = _list(
            _require(obj, "counts", where), f"{where}.counts", max_len=_MAX_BUCKETS + 1
        )
        counts = tuple(_int(c, f"{where}.counts[{i}]") for i, c in enumerate(raw_counts))
        if len(counts) != len(bounds) + 1:
            raise _fail(
                f"{where}.counts",
                f"{len(counts)} counts for {len(bounds)} bounds; expected {len(bounds) + 1}",
            )
        return cls(bounds=bounds, counts=counts)


@dataclass(frozen=True)
class LatencySummary:
    """One window's inference latencies in milliseconds: fixed-bucket histogram plus exact
    percentiles of the window's raw latencies (null when the window had no inference)."""

    histogram: Histogram
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.histogram.to_dict(),
            "p50": self.p50,
            "p95": self.p95,
            "p99": self.p99,
            "max": self.max,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LatencySummary:
        obj = _obj(data, where)
        hist = Histogram.from_dict(obj, where)
        values = [
            _opt_float(_require(obj, k, where), f"{where}.{k}", lo=0.0)
            for k in ("p50", "p95", "p99", "max")
        ]
        present = [v for v in values if v is not None]
        if hist.total > 0 and len(present) != len(values):
            raise _fail(f"{where}.p50", "percentiles and max must be numbers when counts > 0")
        if hist.total == 0 and present:
            raise _fail(f"{where}.p50", "percentiles and max must be null when counts are all 0")
        if any(b < a for a, b in itertools.pairwise(present)):
            raise _fail(f"{where}.p50", "expected p50 <= p95 <= p99 <= max")
        p50, p95, p99, mx = values
        return cls(histogram=hist, p50=p50, p95=p95, p99=p99, max=mx)


# Bit positions of `vcgencmd get_throttled` (Raspberry Pi firmware documentation).
_THROTTLE_BITS: tuple[tuple[str, int], ...] = (
    ("under_voltage", 0),
    ("freq_capped", 1),
    ("throttled", 2),
    ("soft_temp_limit", 3),
    ("under_voltage_occurred", 16),
    ("freq_capped_occurred", 17),
    ("throttled_occurred", 18),
    ("soft_temp_limit_occurred", 19),
)


@dataclass(frozen=True)
class Throttled:
    """Raspberry Pi throttling state: the raw ``get_throttled`` bit mask and its flags.

    The first four flags are the state now; the ``*_occurred`` ones are sticky since boot.
    """

    raw: int

    @property
    def under_voltage(self) -> bool:
        return bool(self.raw & 1 << 0)

    @property
    def freq_capped(self) -> bool:
        return bool(self.raw & 1 << 1)

    @property
    def throttled(self) -> bool:
        return bool(self.raw & 1 << 2)

    @property
    def soft_temp_limit(self) -> bool:
        return bool(self.raw & 1 << 3)

    @property
    def under_voltage_occurred(self) -> bool:
        return bool(self.raw & 1 << 16)

    @property
    def freq_capped_occurred(self) -> bool:
        return bool(self.raw & 1 << 17)

    @property
    def throttled_occurred(self) -> bool:
        return bool(self.raw & 1 << 18)

    @property
    def soft_temp_limit_occurred(self) -> bool:
        return bool(self.raw & 1 << 19)

    @property
    def any_now(self) -> bool:
        """Whether the board is under-volted, capped, throttled or soft-limited right now."""
        return bool(self.raw & 0xF)

    def to_dict(self) -> dict[str, Any]:
        # The flags are redundant with raw; they are sent so a reader needs no bit tables.
        out: dict[str, Any] = {"raw": self.raw}
        for name, bit in _THROTTLE_BITS:
            out[name] = bool(self.raw & 1 << bit)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Throttled:
        obj = _obj(data, where)
        raw = _int(_require(obj, "raw", where), f"{where}.raw", hi=0xFFFFFFFF)
        for name, bit in _THROTTLE_BITS:
            if name in obj and _bool(obj[name], f"{where}.{name}") != bool(raw & 1 << bit):
                raise _fail(f"{where}.{name}", f"disagrees with raw {raw:#x}")
        return cls(raw=raw)


@dataclass(frozen=True)
class InputSummary:
    """A compact, privacy-friendly picture of one model input (never the whole tensor).

    Statistics are over the finite values; ``nonfinite`` counts NaN and infinite ones.
    ``sample`` holds at most 64 leading values (flattened) when the agent is configured to send it.
    """

    shape: tuple[int, ...]
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    nonfinite: int = 0
    sample: tuple[float, ...] | None = None

    @classmethod
    def of(cls, array: Any, *, sample: int = 0) -> InputSummary:
        """Summarize a numpy array (or anything ``numpy.asarray`` accepts)."""
        import numpy as np

        x = np.asarray(array, dtype=np.float64)
        flat = x.reshape(-1)
        finite = flat[np.isfinite(flat)]
        k = min(max(sample, 0), _MAX_SAMPLE, finite.size)
        if finite.size == 0:
            return cls(tuple(int(d) for d in x.shape), None, None, None, None, int(flat.size))
        return cls(
            shape=tuple(int(d) for d in x.shape),
            mean=float(finite.mean()),
            std=float(finite.std()),
            min=float(finite.min()),
            max=float(finite.max()),
            nonfinite=int(flat.size - finite.size),
            sample=tuple(float(v) for v in finite[:k]) if k else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "nonfinite": self.nonfinite,
            "sample": None if self.sample is None else list(self.sample),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> InputSummary:
        obj = _obj(data, where)
        shape_raw = _list(_require(obj, "shape", where), f"{where}.shape", max_len=16)
        shape = tuple(_int(d, f"{where}.shape[{i}]") for i, d in enumerate(shape_raw))
        sample_raw = obj.get("sample")
        sample = None
        if sample_raw is not None:
            items = _list(sample_raw, f"{where}.sample", max_len=_MAX_SAMPLE)
            sample = tuple(_float(v, f"{where}.sample[{i}]") for i, v in enumerate(items))
        return cls(
            shape=shape,
            mean=_opt_float(_require(obj, "mean", where), f"{where}.mean"),
            std=_opt_float(_require(obj, "std", where), f"{where}.std", lo=0.0),
            min=_opt_float(_require(obj, "min", where), f"{where}.min"),
            max=_opt_float(_require(obj, "max", where), f"{where}.max"),
            nonfinite=_int(obj.get("nonfinite", 0), f"{where}.nonfinite"),
            sample=sample,
        )


@dataclass(frozen=True)
class DeployEvent:
    """The outcome of a remote deploy, as ``telemetry`` and ``status`` report it.

    ``state`` is ``probation`` (the bundle is live and its first inferences are being watched),
    ``applied`` (it passed and is kept across restarts), ``rolled_back`` (it was swapped in and
    then out again: the previous bundle runs) or ``failed`` (refused before the swap: a bad
    archive, hash, signature, or a failed load or self-test). ``reason`` says why for the last
    two. ``from_version``/``to_version`` are model versions; ``ts`` when the state was reached.
    """

    id: str
    state: DeployState
    ts: float
    from_version: str | None = None
    to_version: str | None = None
    model: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "ts": self.ts,
            "model": self.model,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> DeployEvent:
        obj = _obj(data, where)
        state = _choice(_require(obj, "state", where), f"{where}.state", DEPLOY_STATES)
        return cls(
            id=_id(_require(obj, "id", where), f"{where}.id"),
            state=cast(DeployState, state),
            ts=_float(_require(obj, "ts", where), f"{where}.ts", lo=0.0),
            model=_opt_str(obj.get("model"), f"{where}.model", max_len=_MAX_LABEL_LEN),
            from_version=_opt_str(obj.get("from_version"), f"{where}.from_version", max_len=64),
            to_version=_opt_str(obj.get("to_version"), f"{where}.to_version", max_len=64),
            reason=_opt_str(obj.get("reason"), f"{where}.reason"),
        )


def _opt_deploy(value: Any, where: str) -> DeployEvent | None:
    return None if value is None else DeployEvent.from_dict(value, where)


# --- messages -------------------------------------------------------------------------------


def _envelope_from(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "device": _id(_require(obj, "device", ""), "device"),
        "boot": _id(_require(obj, "boot", ""), "boot"),
        "seq": _int(_require(obj, "seq", ""), "seq"),
        "ts": _float(_require(obj, "ts", ""), "ts", lo=0.0),
    }


def _envelope_to(
    msg: StatusMessage | TelemetryMessage | OutlierEvent | CommandReply,
) -> dict[str, Any]:
    return {
        "v": SCHEMA_VERSION,
        "kind": msg.KIND,
        "device": msg.device,
        "boot": msg.boot,
        "seq": msg.seq,
        "ts": msg.ts,
    }


@dataclass(frozen=True, kw_only=True)
class StatusMessage:
    """``status`` (retained): ``online`` on every connect; the Last Will is the ``offline`` one.

    ``host`` holds flat facts about the board (model, arch, cores, memory, OS, kernel), values
    being JSON scalars.
    """

    KIND: ClassVar[Literal["status"]] = "status"

    device: str
    boot: str
    seq: int
    ts: float
    state: StatusState
    agent_version: str
    model: str | None = None
    model_version: str | None = None
    runtime: str | None = None
    host: Mapping[str, JSONScalar] = field(default_factory=dict)
    deploy: DeployEvent | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **_envelope_to(self),
            "state": self.state,
            "agent_version": self.agent_version,
            "model": self.model,
            "model_version": self.model_version,
            "runtime": self.runtime,
            "host": dict(self.host),
            "deploy": None if self.deploy is None else self.deploy.to_dict(),
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> StatusMessage:
        host_raw = _obj(obj.get("host", {}), "host")
        if len(host_raw) > _MAX_HOST_FACTS:
            raise _fail("host", f"{len(host_raw)} facts, at most {_MAX_HOST_FACTS} allowed")
        host: dict[str, JSONScalar] = {}
        for key, value in host_raw.items():
            _str(key, "host", max_len=_MAX_LABEL_LEN)
            if isinstance(value, str):
                if len(value) > _MAX_TEXT:
                    raise _fail(f"host.{key}", f"longer than {_MAX_TEXT} characters")
                problem = text_problem(value)
                if problem is not None:
                    raise _fail(f"host.{key}", problem)
            if isinstance(value, float):
                _float(value, f"host.{key}")
            elif value is not None and not isinstance(value, str | int | bool):
                raise _fail(f"host.{key}", f"expected a JSON scalar, got {_jtype(value)}")
            host[key] = value
        state = _choice(_require(obj, "state", ""), "state", ("online", "offline"))
        return cls(
            **_envelope_from(obj),
            state=cast(StatusState, state),
            agent_version=_str(_require(obj, "agent_version", ""), "agent_version", max_len=64),
            model=_opt_str(obj.get("model"), "model", max_len=_MAX_LABEL_LEN),
            model_version=_opt_str(obj.get("model_version"), "model_version", max_len=64),
            runtime=_opt_str(obj.get("runtime"), "runtime", max_len=64),
            host=host,
            deploy=_opt_deploy(obj.get("deploy"), "deploy"),
        )


@dataclass(frozen=True, kw_only=True)
class TelemetryMessage:
    """``telemetry``: one summary per window (default 10 s).

    ``latency_ms.counts`` adds up to ``inferences``; ``errors`` counts failed inferences (not
    in the histogram). ``scores`` holds the outlier scores of the window (empty without a
    detector); ``predictions`` maps a label to how often it was predicted. Host fields are null
    where the board cannot tell. ``spool_dropped`` is the device's cumulative count of messages
    dropped from a full spool, ``drops_since_last`` the part of it since the previous telemetry.
    """

    KIND: ClassVar[Literal["telemetry"]] = "telemetry"

    device: str
    boot: str
    seq: int
    ts: float
    window_start: float
    window_s: float
    inferences: int
    errors: int
    latency_ms: LatencySummary
    outliers: int
    scores: Histogram
    predictions: Mapping[str, int]
    model: str | None = None
    model_version: str | None = None
    cpu_percent: float | None = None
    system_cpu_percent: float | None = None
    rss_bytes: int | None = None
    mem_available_bytes: int | None = None
    temperature_c: float | None = None
    throttled: Throttled | None = None
    spool_depth: int = 0
    spool_dropped: int = 0
    drops_since_last: int = 0
    deploy: DeployEvent | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **_envelope_to(self),
            "model": self.model,
            "model_version": self.model_version,
            "window_start": self.window_start,
            "window_s": self.window_s,
            "inferences": self.inferences,
            "errors": self.errors,
            "latency_ms": self.latency_ms.to_dict(),
            "outliers": self.outliers,
            "scores": self.scores.to_dict(),
            "predictions": dict(self.predictions),
            "cpu_percent": self.cpu_percent,
            "system_cpu_percent": self.system_cpu_percent,
            "rss_bytes": self.rss_bytes,
            "mem_available_bytes": self.mem_available_bytes,
            "temperature_c": self.temperature_c,
            "throttled": None if self.throttled is None else self.throttled.to_dict(),
            "spool_depth": self.spool_depth,
            "spool_dropped": self.spool_dropped,
            "drops_since_last": self.drops_since_last,
            "deploy": None if self.deploy is None else self.deploy.to_dict(),
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> TelemetryMessage:
        inferences = _int(_require(obj, "inferences", ""), "inferences")
        latency = LatencySummary.from_dict(_require(obj, "latency_ms", ""), "latency_ms")
        if latency.histogram.total != inferences:
            raise _fail(
                "latency_ms.counts",
                f"add up to {latency.histogram.total}, but inferences is {inferences}",
            )
        outliers = _int(_require(obj, "outliers", ""), "outliers")
        if outliers > inferences:
            raise _fail("outliers", f"{outliers} outliers in {inferences} inferences")
        preds_raw = _obj(_require(obj, "predictions", ""), "predictions")
        if len(preds_raw) > _MAX_LABELS:
            raise _fail("predictions", f"{len(preds_raw)} labels, at most {_MAX_LABELS} allowed")
        predictions = {
            _str(k, "predictions", max_len=_MAX_LABEL_LEN): _int(v, f"predictions.{k}")
            for k, v in preds_raw.items()
        }
        throttled_raw = obj.get("throttled")
        spool_dropped = _int(obj.get("spool_dropped", 0), "spool_dropped")
        drops = _int(obj.get("drops_since_last", 0), "drops_since_last")
        if drops > spool_dropped:
            raise _fail("drops_since_last", f"{drops} exceeds spool_dropped {spool_dropped}")
        return cls(
            **_envelope_from(obj),
            model=_opt_str(obj.get("model"), "model", max_len=_MAX_LABEL_LEN),
            model_version=_opt_str(obj.get("model_version"), "model_version", max_len=64),
            window_start=_float(_require(obj, "window_start", ""), "window_start", lo=0.0),
            window_s=_float(_require(obj, "window_s", ""), "window_s", lo=0.0),
            inferences=inferences,
            errors=_int(_require(obj, "errors", ""), "errors"),
            latency_ms=latency,
            outliers=outliers,
            scores=Histogram.from_dict(_require(obj, "scores", ""), "scores"),
            predictions=predictions,
            cpu_percent=_opt_float(obj.get("cpu_percent"), "cpu_percent", lo=0.0),
            system_cpu_percent=_opt_float(
                obj.get("system_cpu_percent"), "system_cpu_percent", lo=0.0
            ),
            rss_bytes=_opt_int(obj.get("rss_bytes"), "rss_bytes"),
            mem_available_bytes=_opt_int(obj.get("mem_available_bytes"), "mem_available_bytes"),
            temperature_c=_opt_float(obj.get("temperature_c"), "temperature_c"),
            throttled=None
            if throttled_raw is None
            else Throttled.from_dict(throttled_raw, "throttled"),
            spool_depth=_int(obj.get("spool_depth", 0), "spool_depth"),
            spool_dropped=spool_dropped,
            drops_since_last=drops,
            deploy=_opt_deploy(obj.get("deploy"), "deploy"),
        )


@dataclass(frozen=True, kw_only=True)
class OutlierEvent:
    """``outliers``: one flagged input. ``suppressed`` counts the events the device's rate limit
    held back since the previous event, so a subscriber knows how many it did not see."""

    KIND: ClassVar[Literal["outliers"]] = "outliers"

    device: str
    boot: str
    seq: int
    ts: float
    score: float
    threshold: float
    prediction: str | None
    input: InputSummary
    model: str | None = None
    model_version: str | None = None
    suppressed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            **_envelope_to(self),
            "model": self.model,
            "model_version": self.model_version,
            "score": self.score,
            "threshold": self.threshold,
            "prediction": self.prediction,
            "input": self.input.to_dict(),
            "suppressed": self.suppressed,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> OutlierEvent:
        return cls(
            **_envelope_from(obj),
            model=_opt_str(obj.get("model"), "model", max_len=_MAX_LABEL_LEN),
            model_version=_opt_str(obj.get("model_version"), "model_version", max_len=64),
            score=_float(_require(obj, "score", ""), "score"),
            threshold=_float(_require(obj, "threshold", ""), "threshold"),
            prediction=_opt_str(
                _require(obj, "prediction", ""), "prediction", max_len=_MAX_LABEL_LEN
            ),
            input=InputSummary.from_dict(_require(obj, "input", ""), "input"),
            suppressed=_int(obj.get("suppressed", 0), "suppressed"),
        )


@dataclass(frozen=True, kw_only=True)
class Command:
    """``cmd``: a request to one device, sent by an operator or collector (so no envelope).

    ``id`` is chosen by the sender and echoed in the reply. ``expires`` (unix seconds) lets a
    device that was offline ignore a stale request instead of running it late. The device
    answers every command, an unknown ``action`` included, on ``cmd/reply``.
    """

    KIND: ClassVar[Literal["cmd"]] = "cmd"

    id: str
    action: str
    ts: float
    args: Mapping[str, Any] = field(default_factory=dict)
    expires: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "kind": self.KIND,
            "ts": self.ts,
            "id": self.id,
            "action": self.action,
            "args": dict(self.args),
            "expires": self.expires,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Command:
        action = _str(_require(obj, "action", ""), "action", max_len=64)
        if not _ACTION_RE.fullmatch(action):
            raise _fail("action", f"{action!r} is not a lowercase action name")
        args = _obj(obj.get("args", {}), "args")
        _check_json_value(args, "args")
        return cls(
            id=_id(_require(obj, "id", ""), "id"),
            action=action,
            ts=_float(_require(obj, "ts", ""), "ts", lo=0.0),
            args=args,
            expires=_opt_float(obj.get("expires"), "expires", lo=0.0),
        )


@dataclass(frozen=True, kw_only=True)
class CommandReply:
    """``cmd/reply``: the device's answer to :class:`Command` ``id``.

    ``ok`` true carries ``result`` (any JSON value) and a null ``error``; ``ok`` false carries a
    non-empty ``error`` that says what went wrong.
    """

    KIND: ClassVar[Literal["cmd/reply"]] = "cmd/reply"

    device: str
    boot: str
    seq: int
    ts: float
    id: str
    ok: bool
    result: Any = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **_envelope_to(self),
            "id": self.id,
            "ok": self.ok,
            "result": self.result,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> CommandReply:
        ok = _bool(_require(obj, "ok", ""), "ok")
        error = _opt_str(obj.get("error"), "error")
        if ok and error is not None:
            raise _fail("error", "must be null when ok is true")
        if not ok and error is None:
            raise _fail("error", "a failed command must say why")
        result = obj.get("result")
        _check_json_value(result, "result")
        return cls(
            **_envelope_from(obj),
            id=_id(_require(obj, "id", ""), "id"),
            ok=ok,
            result=result,
            error=error,
        )


@dataclass(frozen=True, kw_only=True)
class Alert:
    """``edgeship/{fleet}/alerts``: raised and resolved by a collector, not by a device.

    ``device`` is the device the alert is about (null for a fleet-wide one) and ``source`` the
    collector that raised it. An alert ``id`` is stable from ``firing`` to ``resolved``.
    """

    KIND: ClassVar[Literal["alerts"]] = "alerts"

    id: str
    source: str
    ts: float
    rule: str
    severity: Severity
    state: AlertState
    summary: str
    device: str | None = None
    value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "kind": self.KIND,
            "ts": self.ts,
            "id": self.id,
            "source": self.source,
            "device": self.device,
            "rule": self.rule,
            "severity": self.severity,
            "state": self.state,
            "summary": self.summary,
            "value": self.value,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Alert:
        severity = _choice(
            _require(obj, "severity", ""), "severity", ("info", "warning", "critical")
        )
        state = _choice(_require(obj, "state", ""), "state", ("firing", "resolved"))
        device = obj.get("device")
        return cls(
            id=_id(_require(obj, "id", ""), "id"),
            source=_id(_require(obj, "source", ""), "source"),
            ts=_float(_require(obj, "ts", ""), "ts", lo=0.0),
            rule=_str(_require(obj, "rule", ""), "rule", max_len=_MAX_LABEL_LEN),
            severity=cast(Severity, severity),
            state=cast(AlertState, state),
            summary=_str(_require(obj, "summary", ""), "summary"),
            device=None if device is None else _id(device, "device"),
            value=_opt_float(obj.get("value"), "value"),
        )


RolloutState: TypeAlias = Literal["running", "halted", "aborted", "done"]
ROLLOUT_STATES: tuple[RolloutState, ...] = ("running", "halted", "aborted", "done")
RolloutDeviceState: TypeAlias = Literal[
    "pending", "deploying", "applied", "rolled_back", "failed", "reverted", "unreachable", "skipped"
]
ROLLOUT_DEVICE_STATES: tuple[RolloutDeviceState, ...] = (
    "pending",
    "deploying",
    "applied",
    "rolled_back",
    "failed",
    "reverted",
    "unreachable",
    "skipped",
)
# A rollout names every device once, in its wave and with its state: 1024 ids of 64 characters
# take about 150 KB, within the payload limit.
MAX_ROLLOUT_DEVICES = 1024
MAX_ROLLOUT_WAVES = 64


@dataclass(frozen=True)
class RolloutEvent:
    """``edgeship/{fleet}/rollouts`` (retained): the whole state of one staged rollout, sent by
    the host running it (``edgeship deploy BUNDLE --fleet F``) at every change.

    Each message is complete, so a subscriber keeps the one with the highest ``seq`` per
    ``id`` and loses nothing by missing the others. ``waves`` lists the devices of each wave
    in order; ``devices`` gives each device's state in this rollout (``pending`` before its
    wave, ``deploying``, then ``applied``, ``rolled_back`` by its own probation, ``failed``
    before the swap, ``reverted`` by the rollout after its wave failed, ``unreachable``,
    ``skipped``: offline when its wave came).
    ``wave`` is the index of the wave in progress or where the rollout stopped
    (``len(waves)`` when ``done``). ``state`` is ``running``, ``halted`` (a wave failed:
    ``reason`` names the device and the line), ``aborted`` (the operator stopped it; it can
    be resumed) or ``done``.
    """

    KIND: ClassVar[Literal["rollouts"]] = "rollouts"

    id: str
    seq: int
    ts: float
    started: float
    state: RolloutState
    deploy: str
    wave: int
    waves: tuple[tuple[str, ...], ...]
    devices: Mapping[str, RolloutDeviceState]
    model: str | None = None
    model_version: str | None = None
    soak_s: float = 0.0
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "kind": self.KIND,
            "ts": self.ts,
            "id": self.id,
            "seq": self.seq,
            "started": self.started,
            "state": self.state,
            "deploy": self.deploy,
            "model": self.model,
            "model_version": self.model_version,
            "soak_s": self.soak_s,
            "wave": self.wave,
            "waves": [list(w) for w in self.waves],
            "devices": dict(self.devices),
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> RolloutEvent:
        waves_in = _list(_require(obj, "waves", ""), "waves", max_len=MAX_ROLLOUT_WAVES)
        waves: list[tuple[str, ...]] = []
        planned: set[str] = set()
        for i, wave_in in enumerate(waves_in):
            where = f"waves[{i}]"
            ids = _list(wave_in, where, max_len=MAX_ROLLOUT_DEVICES)
            if not ids:
                raise _fail(where, "a wave names at least one device")
            wave = tuple(_id(d, f"{where}[{j}]") for j, d in enumerate(ids))
            for d in wave:
                if d in planned:
                    raise _fail(where, f"device {d!r} is in more than one wave")
                planned.add(d)
            waves.append(wave)
        if len(planned) > MAX_ROLLOUT_DEVICES:
            raise _fail("waves", f"{len(planned)} devices, over {MAX_ROLLOUT_DEVICES}")
        states_in = _obj(_require(obj, "devices", ""), "devices")
        devices: dict[str, RolloutDeviceState] = {}
        for key, value in states_in.items():
            where = _join("devices", key)
            _id(key, where)
            devices[key] = cast(RolloutDeviceState, _choice(value, where, ROLLOUT_DEVICE_STATES))
        if set(devices) != planned:
            odd = sorted(set(devices) ^ planned)[:3]
            raise _fail("devices", f"must name exactly the devices of the waves (not {odd})")
        wave_index = _int(_require(obj, "wave", ""), "wave", hi=len(waves))
        state = _choice(_require(obj, "state", ""), "state", ROLLOUT_STATES)
        return cls(
            id=_id(_require(obj, "id", ""), "id"),
            seq=_int(_require(obj, "seq", ""), "seq"),
            ts=_float(_require(obj, "ts", ""), "ts", lo=0.0),
            started=_float(_require(obj, "started", ""), "started", lo=0.0),
            state=cast(RolloutState, state),
            deploy=_id(_require(obj, "deploy", ""), "deploy"),
            wave=wave_index,
            waves=tuple(waves),
            devices=devices,
            model=_opt_str(obj.get("model"), "model", max_len=_MAX_LABEL_LEN),
            model_version=_opt_str(obj.get("model_version"), "model_version", max_len=64),
            soak_s=_float(obj.get("soak_s", 0.0), "soak_s", lo=0.0),
            reason=_opt_str(obj.get("reason"), "reason"),
        )


Message: TypeAlias = (
    StatusMessage | TelemetryMessage | OutlierEvent | Command | CommandReply | Alert | RolloutEvent
)

_BY_KIND: Mapping[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        StatusMessage,
        TelemetryMessage,
        OutlierEvent,
        Command,
        CommandReply,
        Alert,
        RolloutEvent,
    )
}


# --- encode / decode ------------------------------------------------------------------------


def message_topic(fleet: str, msg: Message) -> str:
    """The topic ``msg`` is published to in ``fleet`` (commands go to the device they name)."""
    if isinstance(msg, Alert | RolloutEvent):
        return topic(fleet, None, msg.KIND)
    if isinstance(msg, Command):
        raise ProtocolError(
            "device: a Command does not name its device; use topic(fleet, device, 'cmd')",
            field="device",
        )
    return topic(fleet, msg.device, msg.KIND)


def encode(msg: Message) -> bytes:
    """Compact UTF-8 JSON for ``msg``, validated by the same rules :func:`decode` applies.

    Raises ProtocolError (and nothing else) naming the field if ``msg`` would be rejected by a
    subscriber or cannot be written at all (NaN, an id with a wildcard, counts that do not add
    up, a string with a lone surrogate or a NUL, a value JSON has no form for, a payload over
    the size limit).
    """
    try:
        data = msg.to_dict()
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise _fail("payload", f"not encodable: {type(exc).__name__}: {exc}") from exc
    _check_texts(data)
    try:
        # A round trip through the JSON model catches tuples vs lists, NaN and non-str keys.
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        parsed = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _fail("payload", f"not encodable as JSON: {exc}") from exc
    type(msg).from_dict(parsed)
    try:
        payload = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # _check_texts rules this out; kept as the last guard
        raise _fail("payload", f"not encodable as UTF-8: {exc}") from exc
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            f"payload: {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit",
            field="payload",
        )
    return payload


def decode(topic_name: str, payload: bytes | bytearray | memoryview) -> Message:
    """Parse and validate a message received on ``topic_name``.

    Raises :class:`ProtocolError` (and nothing else) for anything that is not a valid v1
    message of the topic's kind for the topic's device. An empty payload is what a broker
    delivers when a retained message is cleared; it is rejected here too (``field="payload"``).
    """
    parts = parse_topic(topic_name)
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise _fail("payload", f"expected bytes, got {type(payload).__name__}")
    size = len(payload)
    if size == 0:
        raise _fail("payload", "empty (a cleared retained message)")
    if size > MAX_PAYLOAD_BYTES:
        raise _fail("payload", f"{size} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail("payload", f"not UTF-8: {exc}") from exc
    try:
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:
        raise _fail("payload", f"not valid JSON: {exc}") from exc
    _check_texts(data)
    obj = _obj(data, "payload")
    version = _require(obj, "v", "")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _fail("v", f"expected the integer schema version, got {_short(version)}")
    if version > SCHEMA_VERSION:
        raise _fail(
            "v",
            f"schema version {version} is newer than this decoder ({SCHEMA_VERSION}); "
            "upgrade edgeship",
        )
    if version < 1:
        raise _fail("v", f"{version} is not a schema version")
    kind = _require(obj, "kind", "")
    if kind != parts.kind:
        raise _fail("kind", f"{_short(kind)} arrived on a {parts.kind!r} topic")
    msg = _BY_KIND[parts.kind].from_dict(obj)
    msg_device = getattr(msg, "device", None)
    if parts.device is not None and msg_device is not None and msg_device != parts.device:
        raise _fail("device", f"{msg_device!r} arrived on device {parts.device!r}'s topic")
    return msg


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"payload: {name} is not valid JSON", field="payload")


def unique_keys(
    pairs: list[tuple[str, Any]], duplicate: Callable[[str], Exception]
) -> dict[str, Any]:
    """An ``object_pairs_hook`` for :func:`json.loads` that raises ``duplicate(key)`` for the
    first key an object holds twice: json.loads would silently keep the last of two equal
    keys, and two readers of the same bytes could then disagree. The agent's HTTP API reads
    its bodies with it too."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise duplicate(key)
            seen.add(key)
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return unique_keys(pairs, _duplicate_key)


def _duplicate_key(key: str) -> ProtocolError:
    problem = text_problem(key)
    if problem is not None:
        return _fail("payload", f"the key {_short(key)} {problem}")
    return _fail(key, "the key appears twice")


def _check_texts(value: Any, where: str = "") -> None:
    """Refuse a lone surrogate or a NUL in any string of ``value``, object keys included, and
    nesting deeper than :data:`MAX_DEPTH`, naming where. Iterative, so the limit is the
    contract's, not the interpreter's recursion limit (which a caller may have raised)."""
    # (value, where it is, depth, the top-level field it is under: what a depth error names)
    stack: list[tuple[Any, str, int, str]] = [(value, where, 1, where or "payload")]
    while stack:
        node, at, depth, top = stack.pop()
        if isinstance(node, str):
            problem = text_problem(node)
            if problem is not None:
                raise _fail(at or "payload", problem)
            continue
        if depth > MAX_DEPTH:
            raise _fail(top, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, Mapping):
            for key, item in node.items():
                if isinstance(key, str):
                    problem = text_problem(key)
                    if problem is not None:  # named by where it sits: the key is not a field
                        raise _fail(at or "payload", f"the key {_short(key)} {problem}")
                if isinstance(item, str | Mapping | list | tuple):
                    path = _join(at, str(key))
                    stack.append((item, path, depth + 1, path if depth == 1 else top))
        elif isinstance(node, list | tuple):
            for i, item in enumerate(node):
                if isinstance(item, str | Mapping | list | tuple):
                    stack.append((item, f"{at or 'payload'}[{i}]", depth + 1, top))
