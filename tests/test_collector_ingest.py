"""collector.ingest: every (topic, payload) becomes a record, an ignored message or a dead
letter, never an exception; the telemetry fast path agrees with the reference decoder."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from collector.fast_telemetry import fast_telemetry
from collector.ingest import (
    DEAD_LETTER_MAX_BYTES,
    DeadLetter,
    EventRecord,
    Ignored,
    RolloutRecord,
    TelemetryRecord,
    ingest,
    telemetry_record,
)
from device_agent.contracts.messages import (
    LATENCY_BUCKETS_MS,
    MAX_PAYLOAD_BYTES,
    SCORE_BUCKETS,
    Alert,
    Command,
    CommandReply,
    Histogram,
    InputSummary,
    LatencySummary,
    OutlierEvent,
    RolloutEvent,
    StatusMessage,
    TelemetryMessage,
    Throttled,
    decode,
    encode,
    safe_text,
    topic,
)
from device_agent.errors import ProtocolError
from tests.poison import storable

FLEET = "greenhouse"
DEVICE = "pi-07"
NOW = 1_790_000_000.0


def telemetry(seq: int = 5, **over: Any) -> TelemetryMessage:
    lat = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    lat[9], lat[10], lat[12] = 30, 60, 10
    scores = [0] * (len(SCORE_BUCKETS) + 1)
    scores[5], scores[11] = 95, 5
    fields: dict[str, Any] = dict(
        device=DEVICE,
        boot="b00t",
        seq=seq,
        ts=NOW,
        window_start=NOW - 10,
        window_s=10.0,
        inferences=100,
        errors=1,
        latency_ms=LatencySummary(Histogram(LATENCY_BUCKETS_MS, tuple(lat)), 1.2, 2.9, 4.8, 5.0),
        outliers=5,
        scores=Histogram(SCORE_BUCKETS, tuple(scores)),
        predictions={"cat": 60, "dog": 40},
        model="digits",
        model_version="3",
        cpu_percent=25.0,
        system_cpu_percent=40.0,
        rss_bytes=50_000_000,
        mem_available_bytes=2_000_000_000,
        temperature_c=61.5,
        throttled=Throttled(0x50005),
        spool_depth=2,
        spool_dropped=7,
        drops_since_last=3,
    )
    fields.update(over)
    return TelemetryMessage(**fields)


def status(state: str = "online", seq: int = 1) -> StatusMessage:
    return StatusMessage(
        device=DEVICE, boot="b00t", seq=seq, ts=NOW, state=state, agent_version="0.1.0",  # type: ignore[arg-type]
        model="digits", model_version="3", runtime="onnxruntime", host={"arch": "aarch64"},
    )  # fmt: skip


def outlier(seq: int = 9) -> OutlierEvent:
    return OutlierEvent(
        device=DEVICE, boot="b00t", seq=seq, ts=NOW, score=7.5, threshold=2.0, prediction="cat",
        input=InputSummary((1, 8, 8), 0.5, 0.2, 0.0, 1.0), model="digits", model_version="3",
    )  # fmt: skip


def rollout(seq: int = 4, **over: Any) -> RolloutEvent:
    fields: dict[str, Any] = dict(
        id="r-1", seq=seq, ts=NOW + seq, started=NOW, state="halted", deploy="d0123456789abc",
        wave=1, waves=(("pi-01",), ("pi-02", DEVICE)),
        devices={"pi-01": "applied", "pi-02": "rolled_back", DEVICE: "reverted"},
        model="digits", model_version="4", soak_s=30.0, reason="pi-02 rolled back",
    )  # fmt: skip
    fields.update(over)
    return RolloutEvent(**fields)


def t(kind: str, device: str | None = DEVICE, fleet: str = FLEET) -> str:
    return topic(fleet, device, kind)  # type: ignore[arg-type]


# --- records -----------------------------------------------------------------------------------


def test_telemetry_becomes_a_record_with_every_column() -> None:
    msg = telemetry()
    rec = ingest(t("telemetry"), encode(msg), NOW + 1)
    assert isinstance(rec, TelemetryRecord)
    assert rec == telemetry_record(FLEET, msg, NOW + 1)
    assert rec.key == (FLEET, DEVICE, "b00t", 5)
    assert (rec.p95, rec.max_ms, rec.throttled, rec.drops_since_last) == (2.9, 5.0, 0x50005, 3)
    assert rec.latency_bounds == tuple(LATENCY_BUCKETS_MS) and sum(rec.latency_counts) == 100
    assert rec.predictions == {"cat": 60, "dog": 40} and rec.received_at == NOW + 1


@pytest.mark.parametrize(
    ("kind", "msg"),
    [
        ("status", status()),
        ("outliers", outlier()),
        ("cmd/reply", CommandReply(device=DEVICE, boot="b", seq=3, ts=NOW, id="c1", ok=True)),
    ],
)
def test_events_keep_their_json_and_message(kind: str, msg: Any) -> None:
    payload = encode(msg)
    rec = ingest(t(kind), payload, NOW)
    assert isinstance(rec, EventRecord)
    assert (rec.kind, rec.seq, rec.message) == (kind, msg.seq, msg)
    assert json.loads(rec.body) == json.loads(payload)


def test_commands_alerts_and_cleared_status_are_ignored() -> None:
    cmd = Command(id="c1", action="ping", ts=NOW)
    alert = Alert(id="a1", source="col", ts=NOW, rule="offline", severity="warning",
                  state="firing", summary="pi-07 offline")  # fmt: skip
    assert isinstance(ingest(t("cmd"), encode(cmd), NOW), Ignored)
    assert isinstance(ingest(t("alerts", None), encode(alert), NOW), Ignored)
    cleared = ingest(t("status"), b"", NOW)
    assert isinstance(cleared, Ignored) and "cleared" in cleared.reason


# --- dead letters ------------------------------------------------------------------------------


def _dead(topic_name: str, payload: bytes, fleet: str | None = None) -> DeadLetter:
    out = ingest(topic_name, payload, NOW, fleet=fleet)
    assert isinstance(out, DeadLetter), out
    assert out.topic == topic_name and out.size == len(payload) and out.received_at == NOW
    return out


def test_malformed_input_becomes_dead_letters_naming_the_field() -> None:
    good = json.loads(encode(telemetry()))
    v2 = dict(good, v=2)
    wrong_type = dict(good, inferences="100")
    float_seq = dict(good, seq=5.0)
    assert _dead(t("telemetry"), b"not json at all").field == "payload"
    assert _dead(t("telemetry"), b"\xff\xfe garbage").field == "payload"
    assert _dead(t("telemetry"), json.dumps(v2).encode()).field == "v"
    assert _dead(t("telemetry"), json.dumps(wrong_type).encode()).field == "inferences"
    assert _dead(t("telemetry"), json.dumps(float_seq).encode()).field == "seq"
    assert _dead(t("telemetry"), b"[1, 2, 3]").field == "payload"
    assert _dead("edgeship/greenhouse/pi-07/bogus", b"{}").field == "topic.kind"
    assert _dead("sensors/kitchen/temp", b"21.5").field == "topic"
    assert _dead("edgeship/green house/pi/status", b"{}").field == "topic.fleet"
    assert _dead(t("status"), encode(telemetry())).field == "kind"  # kind disagrees with topic
    other = topic(FLEET, "pi-08", "telemetry")
    assert _dead(other, encode(telemetry())).field == "device"  # device disagrees with topic
    assert _dead(t("telemetry"), encode(telemetry()), fleet="orchard").field == "topic.fleet"
    nan = encode(telemetry()).replace(b'"temperature_c":61.5', b'"temperature_c":NaN')
    assert _dead(t("telemetry"), nan).field == "payload"
    dup = encode(telemetry()).replace(b'"errors":1', b'"errors":1,"errors":2')
    assert _dead(t("telemetry"), dup).field == "errors"


def test_a_megabyte_payload_is_a_dead_letter_with_a_truncated_copy() -> None:
    payload = b'{"v":1,' + b" " * (1 << 20) + b"}"
    dead = _dead(t("telemetry"), payload)
    assert dead.field == "payload" and f"{MAX_PAYLOAD_BYTES}" in dead.error
    assert dead.size == len(payload) and len(dead.payload) == DEAD_LETTER_MAX_BYTES


def test_a_decoder_bug_becomes_a_dead_letter_not_a_crash() -> None:
    # A 400-digit integer is valid JSON; the reference decoder's float() of it overflows.
    huge = encode(status()).replace(f'"ts":{NOW}'.encode(), b'"ts":' + b"9" * 400)
    dead = _dead(t("status"), huge)
    assert dead.field in ("decoder", "ts"), dead
    for kind, msg in (("telemetry", telemetry()), ("outliers", outlier())):
        huge = encode(msg).replace(f'"ts":{NOW}'.encode(), b'"ts":' + b"9" * 400)
        assert isinstance(ingest(t(kind), huge, NOW), DeadLetter)


@pytest.mark.parametrize(
    ("kind", "payload", "field"),
    [
        # The fast path (orjson) accepted a NUL; the reference decoder accepted both.
        ("telemetry", encode(telemetry(model="digits")).replace(b"digits", b"dig\\u0000its"),
         "model"),
        ("telemetry", encode(telemetry(model="digits")).replace(b"digits", b"\\ud800"), "model"),
        ("telemetry", encode(telemetry()).replace(b'"cat":60', b'"c\\u0000t":60'),
         "predictions"),
        ("telemetry", encode(telemetry()).replace(b'"v":1', b'"v":1,"x":["\\udfff"]'), "x[0]"),
        ("status", encode(status()).replace(b'"0.1.0"', b'"0.1\\udc00"'), "agent_version"),
        ("outliers", encode(outlier()).replace(b'"v":1', b'"v":1,"\\u0000":1'), "payload"),
        ("telemetry", b'{"\\ud800":1,"\\ud800":2}', "payload"),  # issue 11, finding 1
    ],
)  # fmt: skip
def test_nul_and_lone_surrogates_are_dead_letters_with_safe_text(
    kind: str, payload: bytes, field: str
) -> None:
    dead = _dead(t(kind), payload)
    assert dead.field == field, dead
    assert storable(dead.field) and storable(dead.error) and storable(dead.topic)
    assert dead.payload == payload  # the bytes are kept as they came
    digest = hashlib.sha256(t(kind).encode() + b"\x00" + payload).hexdigest()
    assert dead.digest == digest


def test_a_topic_that_is_not_valid_text_is_escaped_in_its_dead_letter() -> None:
    for name in ("edgeship/farm/pi-\ud800/telemetry", "edgeship/farm/pi\x00/status"):
        dead = ingest(name, b"{}", NOW)
        assert isinstance(dead, DeadLetter) and dead.field == "topic.device", dead
        assert (
            storable(dead.topic)
            and storable(dead.error)
            and dead.topic.startswith("edgeship/farm/pi")
        )


# --- the fast path agrees with the reference decoder --------------------------------------------


def _reference(topic_name: str, payload: bytes) -> TelemetryRecord | None:
    """The record the reference decoder makes of ``payload``, or None if it rejects it."""
    try:
        msg = decode(topic_name, payload)
    except ProtocolError:
        return None
    except Exception:  # the reference decoder's own bugs (e.g. OverflowError) reject too
        return None
    assert isinstance(msg, TelemetryMessage)
    return telemetry_record(FLEET, msg, NOW)


def _fast(payload: bytes) -> TelemetryRecord | None:
    return fast_telemetry(FLEET, DEVICE, payload, NOW)


def _check_agreement(payload: bytes) -> None:
    fast = _fast(payload)
    if fast is not None:
        assert _reference(t("telemetry"), payload) == fast, payload[:300]
    result = ingest(t("telemetry"), payload, NOW)
    reference = _reference(t("telemetry"), payload)
    if reference is None:
        assert isinstance(result, DeadLetter)
    else:
        assert result == reference


def _idle_latency() -> LatencySummary:
    empty = (0,) * (len(LATENCY_BUCKETS_MS) + 1)
    return LatencySummary(Histogram(LATENCY_BUCKETS_MS, empty), None, None, None, None)


def test_the_fast_path_takes_ordinary_windows() -> None:
    idle = telemetry(
        inferences=0, outliers=0, errors=0, latency_ms=_idle_latency(), throttled=None,
        cpu_percent=None, model=None, predictions={},
    )  # fmt: skip
    for msg in (telemetry(), idle):
        payload = encode(msg)
        assert _fast(payload) == telemetry_record(FLEET, msg, NOW)


# Text with lone surrogates and NUL too (json.dumps writes them as \u escapes).
_TEXT_CHARS = st.characters() | st.characters(categories=["Cs"]) | st.just("\x00")
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(_TEXT_CHARS, max_size=8),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(_TEXT_CHARS, max_size=5), inner)
    ),
    max_leaves=6,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: dict[str, Any], rng: random.Random, value: Any, how: int) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    path = rng.choice(_paths(doc)[1:])
    parent: Any = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if how == 0:
        parent[last] = value  # any JSON value where a field was
    elif how == 1 and isinstance(parent, dict):
        del parent[last]
    elif how == 2 and isinstance(parent, dict):
        parent[f"x{rng.randint(0, 9)}"] = value  # an unknown field
    elif isinstance(parent[last], int | float) and not isinstance(parent[last], bool):
        parent[last] = rng.choice([-1, 0, 2**53, 2**53 - 1, 1e308, -0.0, 0.5, parent[last] * 3])
    else:
        parent[last] = value
    return doc


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=_VALUES,
    how=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
    variant=st.integers(0, 3),
)
def test_fast_path_never_accepts_what_the_reference_rejects(
    value: Any, how: int, seed: int, variant: int
) -> None:
    base = [
        telemetry(),
        telemetry(throttled=None, predictions={"a:b": 1, "c": 99}),
        telemetry(temperature_c=None, spool_dropped=0, drops_since_last=0),
        telemetry(inferences=0, outliers=0, latency_ms=_idle_latency()),
    ][variant]
    doc = _mutate(json.loads(encode(base)), random.Random(seed), value, how)
    _check_agreement(json.dumps(doc, separators=(",", ":")).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400))
def test_fast_path_agrees_on_damaged_bytes(noise: bytes, at: int) -> None:
    payload = bytearray(encode(telemetry()))
    at = min(at, len(payload))
    _check_agreement(bytes(payload[:at] + noise + payload[at + len(noise) :]))


def test_duplicate_keys_anywhere_go_to_the_reference_decoder() -> None:
    payload = encode(telemetry())
    for old, new in [
        (b'"p95":2.9', b'"p95":2.9,"p95":2.9'),
        (b'"raw":327685', b'"raw":327685,"raw":327685'),
        (b'"cat":60', b'"cat":60,"cat":60'),
        (b'"v":1', b'"v":1,"extra":{"a":1,"a":2}'),
    ]:
        bad = payload.replace(old, new, 1)
        assert bad != payload
        assert _fast(bad) is None
        assert isinstance(ingest(t("telemetry"), bad, NOW), DeadLetter)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_VALUES, how=st.integers(0, 3), seed=st.integers(0, 2**32 - 1))
# a device key "\n": validate_id named the field "devices.\n" unescaped (a CI run found it)
@example(value={"\n": None}, how=0, seed=2050)
def test_a_mutated_rollout_is_kept_as_decoded_or_dead_lettered(
    value: Any, how: int, seed: int
) -> None:
    """Whatever reaches the rollouts topic is what the reference decoder makes of it: the
    decoded rollout, or a dead letter naming the field it names."""
    doc = _mutate(json.loads(encode(rollout())), random.Random(seed), value, how)
    payload = json.dumps(doc, separators=(",", ":")).encode("utf-8", "surrogatepass")
    topic_name = t("rollouts", None)
    out = ingest(topic_name, payload, NOW, fleet=FLEET)
    try:
        expected = decode(topic_name, payload)
    except ProtocolError as exc:
        assert isinstance(out, DeadLetter), out
        assert out.field == safe_text(exc.field), (out, exc.field)
        assert storable(out.field) and storable(out.error) and "\n" not in out.field
        return
    assert isinstance(out, RolloutRecord), out
    assert (out.fleet, out.message) == (FLEET, expected)


# --- thousands of random payloads through the ingest path ---------------------------------------

_TOPICS = st.one_of(
    st.sampled_from([t(k) for k in ("status", "telemetry", "outliers", "cmd", "cmd/reply")]),
    st.just(t("alerts", None)),
    st.just(t("rollouts", None)),
    st.just(f"edgeship/{FLEET}/{DEVICE}/rollouts"),
    st.text(_TEXT_CHARS, max_size=40),
    st.builds(
        "edgeship/{}/{}/telemetry".format,
        st.text(_TEXT_CHARS, max_size=10),
        st.text(_TEXT_CHARS, max_size=10),
    ),
)
_PAYLOADS = st.one_of(
    st.binary(max_size=200),
    _VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(["v", "kind", "device", "boot", "seq", "ts", "state", "inferences",
                         "id", "started", "deploy", "wave", "waves", "devices"]),
        _VALUES, max_size=8,
    ).map(lambda d: json.dumps(d).encode()),
)  # fmt: skip


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TOPICS, _PAYLOADS)
# Found in a fresh-clone run: a key "\n" made a dead letter's field a bare newline.
@example(t("alerts", None), b'{"\\n":{"\\u0000":null}}')
@example(t("rollouts", None), encode(rollout()))
def test_random_input_never_raises(topic_name: str, payload: bytes) -> None:
    out = ingest(topic_name, payload, NOW, fleet=FLEET)
    assert isinstance(out, TelemetryRecord | EventRecord | RolloutRecord | DeadLetter | Ignored)
    if isinstance(out, DeadLetter):
        assert out.field and out.error and "\n" not in out.field
        assert len(out.payload) <= DEAD_LETTER_MAX_BYTES
        assert storable(out.topic) and storable(out.field) and storable(out.error), out
    elif isinstance(out, TelemetryRecord | EventRecord | RolloutRecord):  # kept: safe text
        assert storable(json.dumps(dataclasses.asdict(out), ensure_ascii=False, default=str))
