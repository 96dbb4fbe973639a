"""The telemetry fast path of :func:`collector.ingest.ingest` (see its module docstring): the
reference decoder's rules checked with whole-list operations, and *only ever accepting*: None
means "let the reference decoder decide".
"""

from __future__ import annotations

import json
import math
import operator
import re
from typing import Any, NamedTuple

from collector.records import TelemetryRecord
from device_agent.contracts.messages import (
    LATENCY_BUCKETS_MS,
    MAX_PAYLOAD_BYTES,
    MAX_SEQ,
    SCHEMA_VERSION,
    SCORE_BUCKETS,
)

__all__ = ["fast_telemetry"]

# --- the telemetry fast path ----------------------------------------------------------------
#
# Every check below mirrors one in messages.py (TelemetryMessage.from_dict and the helpers it
# calls); returning None means "let the reference decoder decide". Types are compared with
# `type(x) is ...` because JSON yields exactly dict, list, str, int, float, bool and None, and
# bool must never pass for a number.

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_LABELS = 4096
_MAX_LABEL_LEN = 128
_MAX_BUCKETS = 256
_THROTTLE_BITS = {
    "under_voltage": 0,
    "freq_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
    "under_voltage_occurred": 16,
    "freq_capped_occurred": 17,
    "throttled_occurred": 18,
    "soft_temp_limit_occurred": 19,
}
_LATENCY_KEYS = ("p50", "p95", "p99", "max")
_HISTOGRAM_FIELDS = frozenset(("bounds", "counts"))
_LATENCY_FIELDS = _HISTOGRAM_FIELDS | frozenset(_LATENCY_KEYS)
_THROTTLED_FIELDS = frozenset(("raw", *_THROTTLE_BITS))
_FLOAT = {float}
_INT = {int}
_STD_LATENCY = tuple(LATENCY_BUCKETS_MS)
_STD_LATENCY_LIST = list(LATENCY_BUCKETS_MS)
_STD_SCORES = tuple(SCORE_BUCKETS)
_STD_SCORES_LIST = list(SCORE_BUCKETS)
_REQUIRED = (
    "device", "boot", "seq", "ts", "window_start", "window_s", "inferences", "errors",
    "latency_ms", "outliers", "scores", "predictions",
)  # fmt: skip
_REQUIRED_KEYS = frozenset(("v", *_REQUIRED))
_LATENCY_KEY_SET = frozenset(_LATENCY_KEYS)
_KNOWN = frozenset(
    (
        "v", "kind", *_REQUIRED, "model", "model_version", "cpu_percent", "system_cpu_percent",
        "temperature_c", "rss_bytes", "mem_available_bytes", "throttled", "spool_depth",
        "spool_dropped", "drops_since_last", "deploy",
    )
)  # fmt: skip
_KNOWN_COUNT = len(_KNOWN)


class _Unsure(Exception):
    """The fast path cannot vouch for this payload; the reference decoder decides."""


def _reject_constant(name: str) -> Any:
    raise _Unsure(name)


_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def _stdlib_loads(data: bytes | bytearray | memoryview | str) -> Any:
    return _JSON.decode(data if isinstance(data, str) else bytes(data).decode("utf-8"))


# orjson, when installed, parses a telemetry window ~7x faster than the json module. It is
# stricter in every way that matters here (NaN, Infinity, 1e999, lone surrogates and invalid
# UTF-8 are errors), and whatever it rejects goes to the reference decoder anyway; the one
# place it is looser, integers beyond 64 bits (read as floats), fails the type checks below.
try:
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - exercised where orjson is missing
    _loads = _stdlib_loads

_MAX_DEPTH = 32  # deeper payloads (only possible in unknown fields) go to the reference decoder


def fast_telemetry(
    fleet: str, device: str, data: bytes, received_at: float
) -> TelemetryRecord | None:
    if not 0 < len(data) <= MAX_PAYLOAD_BYTES:
        return None
    # A \u escape is the only way JSON text spells a NUL or a lone surrogate (which the
    # reference decoder refuses); encode() writes none for ordinary text, so a payload with
    # one is rare and is left to the reference decoder.
    if b"\\u" in data:
        return None
    try:
        obj = _loads(data)
        if type(obj) is not dict:
            return None
        record, keys = _telemetry_from(fleet, device, obj, received_at)
        # Every key in the text is followed by exactly one ':' and any other ':' sits inside a
        # string, so as many colons as keys in the parsed tree proves no key appeared twice
        # (a JSON parser silently keeps the last one; the reference decoder rejects it).
        if data.count(b":") != keys:
            return None
        return record
    except (_Unsure, ValueError, RecursionError):
        return None


def _count_keys(value: Any, depth: int = 0) -> int:
    """Keys in a JSON value, at every depth."""
    if depth > _MAX_DEPTH:
        raise _Unsure
    if type(value) is dict:
        return len(value) + sum(_count_keys(v, depth + 1) for v in value.values())
    if type(value) is list:
        return sum(_count_keys(v, depth + 1) for v in value)
    return 0


def _unknown_keys(obj: dict[str, Any], known: frozenset[str]) -> int:
    """Keys nested inside the values of ``obj``'s unknown fields (known ones are checked)."""
    extra = obj.keys() - known
    return sum(_count_keys(obj[k]) for k in extra) if extra else 0


def _telemetry_from(
    fleet: str, device: str, obj: dict[str, Any], received_at: float
) -> tuple[TelemetryRecord | None, int]:
    """(the record, how many keys the parsed payload holds at every depth); raises _Unsure.

    Checks are batched (one type/range test over every integer of the message, one over every
    non-negative number) because per-field calls cost more than the JSON parse."""
    boot, lat, scores, predictions = _envelope(obj, device)
    ints = _integers(obj, lat, scores, predictions)
    seq, inferences, errors, outliers, spool_depth, spool_dropped, drops = ints.scalars
    ts, window_start, window_s, percentiles, cpu, system_cpu = _numbers(obj, lat, inferences)
    get = obj.get
    temperature = get("temperature_c")
    if temperature is not None:
        temperature = _num(temperature)
    model = _opt_text(get("model"), _MAX_LABEL_LEN)
    model_version = _opt_text(get("model_version"), 64)
    throttled_obj = get("throttled")
    throttled = _throttled(throttled_obj)
    keys = _key_count(obj, lat, scores, predictions, throttled_obj)
    record = TelemetryRecord(
        fleet=fleet,
        device=device,
        boot=boot,
        seq=seq,
        ts=ts,
        received_at=received_at,
        window_start=window_start,
        window_s=window_s,
        model=model,
        model_version=model_version,
        inferences=inferences,
        errors=errors,
        outliers=outliers,
        p50=percentiles[0],
        p95=percentiles[1],
        p99=percentiles[2],
        max_ms=percentiles[3],
        latency_bounds=ints.lat_bounds,
        latency_counts=tuple(ints.lat_counts),
        score_bounds=ints.score_bounds,
        score_counts=tuple(ints.score_counts),
        predictions=predictions,
        cpu_percent=cpu,
        system_cpu_percent=system_cpu,
        rss_bytes=ints.rss,
        mem_available_bytes=ints.mem,
        temperature_c=temperature,
        throttled=throttled,
        spool_depth=spool_depth,
        spool_dropped=spool_dropped,
        drops_since_last=drops,
    )
    return record, keys


def _envelope(
    obj: dict[str, Any], device: str
) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(boot, latency_ms, scores, predictions) of a plain telemetry window for ``device``."""
    if obj.get("kind") != "telemetry" or not obj.keys() >= _REQUIRED_KEYS:
        raise _Unsure
    version = obj["v"]
    boot = obj["boot"]
    if type(version) is not int or version != SCHEMA_VERSION or obj["device"] != device:
        raise _Unsure
    if obj.get("deploy") is not None:  # a remote deploy's outcome: rare, the reference checks it
        raise _Unsure
    if type(boot) is not str or not _ID_RE.fullmatch(boot):
        raise _Unsure
    lat = obj["latency_ms"]
    scores = obj["scores"]
    predictions = obj["predictions"]
    if type(lat) is not dict or type(scores) is not dict or type(predictions) is not dict:
        raise _Unsure
    return boot, lat, scores, predictions


class _Integers(NamedTuple):
    scalars: list[Any]  # seq, inferences, errors, outliers, spool_depth, spool_dropped, drops
    rss: Any
    mem: Any
    lat_bounds: tuple[float, ...]
    lat_counts: list[Any]
    score_bounds: tuple[float, ...]
    score_counts: list[Any]


def _integers(
    obj: dict[str, Any], lat: dict[str, Any], scores: dict[str, Any], predictions: dict[str, Any]
) -> _Integers:
    """Every integer: envelope and counters, optional byte counts, both histograms' counts,
    the prediction counts; all must be ints in [0, MAX_SEQ], and consistent."""
    get = obj.get
    scalars = [
        obj["seq"], obj["inferences"], obj["errors"], obj["outliers"],
        get("spool_depth", 0), get("spool_dropped", 0), get("drops_since_last", 0),
    ]  # fmt: skip
    rss, mem = get("rss_bytes"), get("mem_available_bytes")
    lat_bounds, lat_counts = _bounds(lat, _STD_LATENCY_LIST, _STD_LATENCY)
    score_bounds, score_counts = _bounds(scores, _STD_SCORES_LIST, _STD_SCORES)
    if len(predictions) > _MAX_LABELS:
        raise _Unsure
    every_int = scalars + lat_counts + score_counts + list(predictions.values())
    if rss is not None:
        every_int.append(rss)
    if mem is not None:
        every_int.append(mem)
    if set(map(type, every_int)) != _INT or min(every_int) < 0 or max(every_int) > MAX_SEQ:
        raise _Unsure
    _seq, inferences, _errors, outliers, _depth, spool_dropped, drops = scalars
    if outliers > inferences or drops > spool_dropped or sum(lat_counts) != inferences:
        raise _Unsure
    if predictions:
        lengths = list(map(len, predictions))
        if min(lengths) == 0 or max(lengths) > _MAX_LABEL_LEN:
            raise _Unsure
    return _Integers(scalars, rss, mem, lat_bounds, lat_counts, score_bounds, score_counts)


_Percentiles = tuple[float | None, float | None, float | None, float | None]


def _numbers(
    obj: dict[str, Any], lat: dict[str, Any], inferences: int
) -> tuple[float, float, float, _Percentiles, Any, Any]:
    """(ts, window_start, window_s, percentiles, cpu, system_cpu): every number that must be
    finite and >= 0, checked in one pass; percentiles ordered, or all None without inferences."""
    if not lat.keys() >= _LATENCY_KEY_SET:
        raise _Unsure
    get = obj.get
    pct = [lat["p50"], lat["p95"], lat["p99"], lat["max"]]
    cpu, system_cpu = get("cpu_percent"), get("system_cpu_percent")
    numbers = [obj["ts"], obj["window_start"], obj["window_s"]]
    if inferences > 0:
        numbers += pct
    elif pct != [None, None, None, None]:
        raise _Unsure
    if cpu is not None:
        numbers.append(cpu)
    if system_cpu is not None:
        numbers.append(system_cpu)
    numbers = _nonnegative(numbers)
    ts, window_start, window_s = numbers[:3]
    percentiles: _Percentiles
    if inferences > 0:
        p50, p95, p99, max_ms = numbers[3:7]
        if not p50 <= p95 <= p99 <= max_ms:
            raise _Unsure
        percentiles = (p50, p95, p99, max_ms)
        rest = 7
    else:
        percentiles = (None, None, None, None)
        rest = 3
    if cpu is not None:
        cpu = numbers[rest]
        rest += 1
    if system_cpu is not None:
        system_cpu = numbers[rest]
    return ts, window_start, window_s, percentiles, cpu, system_cpu


def _key_count(
    obj: dict[str, Any],
    lat: dict[str, Any],
    scores: dict[str, Any],
    predictions: dict[str, Any],
    throttled_obj: Any,
) -> int:
    """Keys in the parsed payload at every depth (the caller compares it with the colons)."""
    keys = len(obj) + len(lat) + len(scores) + len(predictions)
    if len(obj) != _KNOWN_COUNT or not obj.keys() <= _KNOWN:
        keys += _unknown_keys(obj, _KNOWN)
    if len(lat) != 6:
        keys += _unknown_keys(lat, _LATENCY_FIELDS)
    if len(scores) != 2:
        keys += _unknown_keys(scores, _HISTOGRAM_FIELDS)
    if throttled_obj is not None:
        keys += len(throttled_obj) + _unknown_keys(throttled_obj, _THROTTLED_FIELDS)
    return keys


def _nonnegative(values: list[Any]) -> list[float]:
    """``values`` as floats if every one is a finite number >= 0 (bools excluded)."""
    if set(map(type, values)) == _FLOAT:
        if not all(map(math.isfinite, values)) or min(values) < 0:
            raise _Unsure
        return values
    out = [_num(v) for v in values]
    if min(out) < 0:
        raise _Unsure
    return out


def _num(value: Any) -> float:
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):
            raise _Unsure
        return float(value)
    if kind is int and -MAX_SEQ <= value <= MAX_SEQ:
        return float(value)
    raise _Unsure


def _opt_text(value: Any, max_len: int) -> str | None:
    if value is None:
        return None
    if type(value) is not str or not 0 < len(value) <= max_len:
        raise _Unsure
    return value


def _bounds(
    obj: dict[str, Any], standard: list[float], standard_tuple: tuple[float, ...]
) -> tuple[tuple[float, ...], list[Any]]:
    """(checked bounds, the counts list, for the caller's integer check) of a histogram."""
    bounds = obj.get("bounds")
    counts = obj.get("counts")
    if type(bounds) is not list or type(counts) is not list:
        raise _Unsure
    if len(bounds) > _MAX_BUCKETS or len(counts) != len(bounds) + 1:
        raise _Unsure
    # Whole-list checks (C loops): every bound a float (integer bounds are valid but rare,
    # the reference decoder handles them), finite and strictly increasing.
    if bounds and set(map(type, bounds)) != _FLOAT:
        raise _Unsure
    if bounds == standard:
        return standard_tuple, counts
    floats = tuple(bounds)
    if not all(map(math.isfinite, floats)) or not all(map(operator.lt, floats, floats[1:])):
        raise _Unsure
    return floats, counts


def _ints(values: list[Any]) -> tuple[int, ...]:
    """``values`` if every one is an integer in [0, MAX_SEQ] (``values`` is not empty)."""
    if set(map(type, values)) != _INT or min(values) < 0 or max(values) > MAX_SEQ:
        raise _Unsure
    return tuple(values)


def _throttled(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not dict:
        raise _Unsure
    raw = value.get("raw")
    if type(raw) is not int or not 0 <= raw <= 0xFFFFFFFF:
        raise _Unsure
    if raw == 0:  # the common case: every flag present must be false
        flags = [value[name] for name in _THROTTLE_BITS if name in value]
        if flags and (set(map(type, flags)) != {bool} or True in flags):
            raise _Unsure
        return raw
    for name, bit in _THROTTLE_BITS.items():
        if name in value:
            flag = value[name]
            if type(flag) is not bool or flag != bool(raw & 1 << bit):
                raise _Unsure
    return raw
