"""The MQTT wire contract: topics, round-trips, strict rejection by field, and the docs example."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.contracts.messages import (
    LATENCY_BUCKETS_MS,
    MAX_PAYLOAD_BYTES,
    MAX_ROLLOUT_DEVICES,
    MAX_SEQ,
    SCORE_BUCKETS,
    Alert,
    Command,
    CommandReply,
    DeployEvent,
    Histogram,
    InputSummary,
    LatencySummary,
    Message,
    OutlierEvent,
    RolloutEvent,
    StatusMessage,
    TelemetryMessage,
    Throttled,
    TopicParts,
    decode,
    encode,
    message_topic,
    parse_topic,
    shared_subscription,
    subscription,
    topic,
)
from device_agent.errors import EdgeshipError, ProtocolError

REPO = Path(__file__).resolve().parent.parent
ENV: dict[str, Any] = {
    "device": "pi-kitchen-01",
    "boot": "4f1c2a9e",
    "seq": 41,
    "ts": 1764201600.25,
}


def _latency(counts_at: dict[int, int], p: tuple[float, ...] | None) -> LatencySummary:
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for i, c in counts_at.items():
        counts[i] = c
    hist = Histogram(LATENCY_BUCKETS_MS, tuple(counts))
    if p is None:
        return LatencySummary(hist, None, None, None, None)
    return LatencySummary(hist, *p)


def _scores(counts_at: dict[int, int]) -> Histogram:
    counts = [0] * (len(SCORE_BUCKETS) + 1)
    for i, c in counts_at.items():
        counts[i] = c
    return Histogram(SCORE_BUCKETS, tuple(counts))


def _telemetry(**over: Any) -> TelemetryMessage:
    fields: dict[str, Any] = dict(
        **ENV,
        model="digits",
        model_version="3",
        window_start=1764201590.0,
        window_s=10.0,
        inferences=120,
        errors=1,
        latency_ms=_latency({9: 100, 10: 19, 13: 1}, (1.31, 1.9, 1.97, 6.2)),
        outliers=2,
        scores=_scores({10: 100, 11: 18, 12: 2}),
        predictions={"3": 70, "7": 50},
        cpu_percent=23.5,
        system_cpu_percent=12.25,
        rss_bytes=98_000_000,
        mem_available_bytes=3_300_000_000,
        temperature_c=47.712,
        throttled=Throttled(0x50005),
        spool_depth=3,
        spool_dropped=10,
        drops_since_last=2,
    )
    fields.update(over)
    return TelemetryMessage(**fields)


def _samples() -> dict[str, Message]:
    return {
        "status": StatusMessage(
            **ENV,
            state="online",
            agent_version="0.1.0",
            model="digits",
            model_version="3",
            runtime="onnxruntime",
            host={"model": "Raspberry Pi 4 Model B Rev 1.1", "cores": 4, "kernel": None},
        ),
        "telemetry": _telemetry(),
        "outliers": OutlierEvent(
            **ENV,
            score=12.5,
            threshold=3.5,
            prediction="7",
            input=InputSummary.of(np.arange(64, dtype=np.float32).reshape(1, 8, 8), sample=4),
            model="digits",
            model_version="3",
            suppressed=4,
        ),
        "cmd": Command(id="c-17", action="benchmark", ts=1764201600.0, args={"runs": 50}),
        "cmd/reply": CommandReply(**ENV, id="c-17", ok=True, result={"p95_ms": 1.9}),
        "alerts": Alert(
            id="a-1",
            source="collector-1",
            ts=1764201600.0,
            rule="p95_latency",
            severity="warning",
            state="firing",
            summary="pi-kitchen-01 p95 1.9 ms over budget 1.5 ms",
            device="pi-kitchen-01",
            value=1.9,
        ),
        "rollouts": RolloutEvent(
            id="r-home-d1f2",
            seq=3,
            ts=1764201600.0,
            started=1764201500.0,
            state="halted",
            deploy="d0123456789abcdef01234567",
            wave=0,
            waves=(("pi-kitchen-01",), ("pi-hall-02", "pi-attic-03")),
            devices={
                "pi-kitchen-01": "rolled_back",
                "pi-hall-02": "pending",
                "pi-attic-03": "pending",
            },
            model="digits",
            model_version="4",
            soak_s=60.0,
            reason="pi-kitchen-01 rolled back (class '3' predicted for 100% of 10 samples)",
        ),
    }


def _topic_for(kind: str) -> str:
    if kind in ("alerts", "rollouts"):
        return f"edgeship/home/{kind}"
    return f"edgeship/home/pi-kitchen-01/{kind}"


# --- topics ---------------------------------------------------------------------------------


def test_topics_round_trip() -> None:
    for kind in ("status", "telemetry", "outliers", "cmd", "cmd/reply"):
        t = topic("home", "pi-kitchen-01", kind)
        assert t == f"edgeship/home/pi-kitchen-01/{kind}"
        assert parse_topic(t) == TopicParts("home", "pi-kitchen-01", kind)
    assert topic("home", None, "alerts") == "edgeship/home/alerts"
    assert parse_topic("edgeship/home/alerts") == TopicParts("home", None, "alerts")
    assert topic("home", None, "rollouts") == "edgeship/home/rollouts"
    assert parse_topic("edgeship/home/rollouts") == TopicParts("home", None, "rollouts")
    assert subscription("home", kind="rollouts") == "edgeship/home/rollouts"


@pytest.mark.parametrize(
    "bad", ["", "+", "#", "a/b", "a+b", "$SYS", "x" * 65, "pi 4", "caf\u00e9", "a\x00"]
)
def test_ids_with_wildcards_or_odd_characters_are_refused(bad: str) -> None:
    with pytest.raises(ProtocolError) as info:
        topic("home", bad, "status")
    assert info.value.field == "device"
    with pytest.raises(ProtocolError):
        topic(bad, "pi", "status")


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("edgeship/home", "topic"),
        ("other/home/pi/status", "topic"),
        ("edgeship/home/pi/metrics", "topic.kind"),
        ("edgeship/home/pi/cmd/other", "topic.kind"),
        ("edgeship/ho+me/pi/status", "topic.fleet"),
        ("edgeship/home/#/status", "topic.device"),
        ("edgeship/home/pi", "topic"),
        ("edgeship/home/pi/status/", "topic.kind"),
    ],
)
def test_parse_topic_rejects_foreign_topics(value: str, field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_topic(value)
    assert info.value.field == field


def test_subscription_patterns() -> None:
    assert subscription("home") == "edgeship/home/#"
    assert subscription() == "edgeship/+/#"
    assert subscription("home", kind="telemetry") == "edgeship/home/+/telemetry"
    assert subscription("home", "pi") == "edgeship/home/pi/#"
    assert subscription("home", "pi", "cmd") == "edgeship/home/pi/cmd"
    assert subscription(kind="status") == "edgeship/+/+/status"
    assert subscription("home", kind="alerts") == "edgeship/home/alerts"
    assert shared_subscription("collectors", subscription("home")) == (
        "$share/collectors/edgeship/home/#"
    )
    with pytest.raises(ProtocolError):
        subscription("home", "pi", "alerts")


def test_message_topic() -> None:
    samples = _samples()
    assert message_topic("home", samples["telemetry"]) == _topic_for("telemetry")
    assert message_topic("home", samples["alerts"]) == "edgeship/home/alerts"
    with pytest.raises(ProtocolError):
        message_topic("home", samples["cmd"])


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["status", "telemetry", "outliers", "cmd", "cmd/reply", "alerts", "rollouts"]
)
def test_round_trip_is_lossless(kind: str) -> None:
    msg = _samples()[kind]
    payload = encode(msg)
    assert b", " not in payload and b": " not in payload  # compact
    again = decode(_topic_for(kind), payload)
    assert again == msg
    assert encode(again) == payload
    data = json.loads(payload)
    assert data["v"] == 1 and data["kind"] == kind


def test_telemetry_wire_shape() -> None:
    data = json.loads(encode(_telemetry()))
    assert data["latency_ms"]["bounds"] == list(LATENCY_BUCKETS_MS)
    assert len(data["latency_ms"]["counts"]) == len(LATENCY_BUCKETS_MS) + 1
    assert data["throttled"] == {
        "raw": 0x50005,
        "under_voltage": True,
        "freq_capped": False,
        "throttled": True,
        "soft_temp_limit": False,
        "under_voltage_occurred": True,
        "freq_capped_occurred": False,
        "throttled_occurred": True,
        "soft_temp_limit_occurred": False,
    }
    assert list(data)[:6] == ["v", "kind", "device", "boot", "seq", "ts"]


def test_empty_window_and_nulls_round_trip() -> None:
    msg = _telemetry(
        inferences=0,
        errors=0,
        outliers=0,
        latency_ms=_latency({}, None),
        scores=_scores({}),
        predictions={},
        cpu_percent=None,
        rss_bytes=None,
        temperature_c=None,
        throttled=None,
        model=None,
        model_version=None,
    )
    assert decode(_topic_for("telemetry"), encode(msg)) == msg


def test_failed_reply_and_offline_status_round_trip() -> None:
    reply = CommandReply(**ENV, id="c-9", ok=False, error="unknown action 'reboot'")
    assert decode(_topic_for("cmd/reply"), encode(reply)) == reply
    will = StatusMessage(**ENV, state="offline", agent_version="0.1.0")
    assert decode(_topic_for("status"), encode(will)) == will


def test_deploy_outcome_round_trips_in_telemetry_and_status() -> None:
    event = DeployEvent(
        id="d5c1f0e9a2b3",
        state="rolled_back",
        ts=1764201601.5,
        model="digits",
        from_version="3",
        to_version="4",
        reason="inference failed on the new bundle: input 'image': shape (1, 1, 8, 8) ...",
    )
    telemetry = _telemetry(deploy=event)
    assert decode(_topic_for("telemetry"), encode(telemetry)) == telemetry
    status = StatusMessage(**ENV, state="online", agent_version="0.1.0", deploy=event)
    assert decode(_topic_for("status"), encode(status)) == status
    # Optional: a message without it (an older agent's) decodes with deploy None.
    data = json.loads(encode(_telemetry()))
    assert data["deploy"] is None
    del data["deploy"]
    assert decode(_topic_for("telemetry"), json.dumps(data).encode()).deploy is None


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"id": "d1", "state": "done", "ts": 1.0}, "deploy.state"),
        ({"id": "d 1", "state": "applied", "ts": 1.0}, "deploy.id"),
        ({"id": "d1", "state": "applied"}, "deploy.ts"),
        ({"id": "d1", "state": "failed", "ts": 1.0, "reason": ""}, "deploy.reason"),
        ("applied", "deploy"),
    ],
)
def test_a_malformed_deploy_outcome_is_rejected_by_name(value: Any, field: str) -> None:
    for kind in ("telemetry", "status"):
        with pytest.raises(ProtocolError) as info:
            decode(_topic_for(kind), _mutate(kind, ["deploy"], value))
        assert info.value.field == field, str(info.value)


def test_unknown_fields_are_ignored() -> None:
    data = json.loads(encode(_samples()["status"]))
    data["added_in_a_later_minor_version"] = {"x": 1}
    msg = decode(_topic_for("status"), json.dumps(data).encode())
    assert msg == _samples()["status"]


def test_input_summary_handles_nonfinite_values() -> None:
    s = InputSummary.of(np.array([1.0, np.nan, 3.0, np.inf]), sample=8)
    assert (s.mean, s.min, s.max, s.nonfinite, s.sample) == (2.0, 1.0, 3.0, 2, (1.0, 3.0))
    empty = InputSummary.of(np.array([np.nan]))
    assert empty.mean is None and empty.nonfinite == 1
    event = OutlierEvent(**ENV, score=9.0, threshold=3.0, prediction=None, input=empty)
    assert decode(_topic_for("outliers"), encode(event)) == event


# --- rejection ------------------------------------------------------------------------------


def _mutate(kind: str, path: list[Any], value: Any) -> bytes:
    data = json.loads(encode(_samples()[kind]))
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("kind", "path", "value", "field"),
    [
        ("telemetry", ["v"], 2, "v"),
        ("telemetry", ["v"], "1", "v"),
        ("telemetry", ["v"], 0, "v"),
        ("telemetry", ["v"], KeyError, "v"),
        ("telemetry", ["kind"], "status", "kind"),
        ("telemetry", ["device"], "pi-other", "device"),
        ("telemetry", ["device"], "pi/x", "device"),
        ("telemetry", ["boot"], "", "boot"),
        ("telemetry", ["seq"], -1, "seq"),
        ("telemetry", ["seq"], 1.0, "seq"),
        ("telemetry", ["seq"], True, "seq"),
        ("telemetry", ["seq"], MAX_SEQ + 1, "seq"),
        ("telemetry", ["seq"], KeyError, "seq"),
        ("telemetry", ["ts"], "now", "ts"),
        ("telemetry", ["ts"], -5, "ts"),
        ("telemetry", ["inferences"], 121, "latency_ms.counts"),
        ("telemetry", ["latency_ms", "counts"], [1, 2], "latency_ms.counts"),
        ("telemetry", ["latency_ms", "counts", 9], -1, "latency_ms.counts[9]"),
        ("telemetry", ["latency_ms", "bounds", 3], 0.01, "latency_ms.bounds[3]"),
        ("telemetry", ["latency_ms", "p50"], 5.0, "latency_ms.p50"),
        ("telemetry", ["latency_ms", "p99"], None, "latency_ms.p50"),
        ("telemetry", ["latency_ms", "max"], KeyError, "latency_ms.max"),
        ("telemetry", ["outliers"], 500, "outliers"),
        ("telemetry", ["scores"], [], "scores"),
        ("telemetry", ["predictions", "3"], -1, "predictions.3"),
        ("telemetry", ["predictions", "3"], 1.5, "predictions.3"),
        ("telemetry", ["cpu_percent"], "high", "cpu_percent"),
        ("telemetry", ["rss_bytes"], 1.5, "rss_bytes"),
        ("telemetry", ["throttled", "throttled"], False, "throttled.throttled"),
        ("telemetry", ["throttled", "raw"], -1, "throttled.raw"),
        ("telemetry", ["drops_since_last"], 11, "drops_since_last"),
        ("status", ["state"], "sleeping", "state"),
        ("status", ["host"], {"nested": {"a": 1}}, "host.nested"),
        ("status", ["agent_version"], None, "agent_version"),
        ("outliers", ["score"], None, "score"),
        ("outliers", ["input", "std"], -1.0, "input.std"),
        ("outliers", ["input", "sample"], [0.0] * 65, "input.sample"),
        ("cmd", ["action"], "Reboot", "action"),
        ("cmd", ["id"], "a b", "id"),
        ("cmd", ["args"], [1, 2], "args"),
        ("cmd/reply", ["error"], "but ok", "error"),
        ("cmd/reply", ["ok"], "yes", "ok"),
        ("alerts", ["severity"], "fatal", "severity"),
        ("alerts", ["source"], KeyError, "source"),
    ],
)
def test_decode_rejects_bad_fields_by_name(
    kind: str, path: list[Any], value: Any, field: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(_topic_for(kind), _mutate(kind, path, value))
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(field)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"", "payload"),
        (b"\xff\xfe{}", "payload"),
        (b"{not json", "payload"),
        (b"[1, 2]", "payload"),
        (b"null", "payload"),
        (b'{"v": NaN}', "payload"),
        (b'{"v": 1, "kind": "status", "v": 1}', "v"),
        (b"[" * 100_000, "payload"),
        (b" " * (MAX_PAYLOAD_BYTES + 1), "payload"),
    ],
)
def test_decode_rejects_bad_payloads(payload: bytes, field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(_topic_for("status"), payload)
    assert info.value.field == field


def test_decode_rejects_nan_and_infinity_spelled_in_json() -> None:
    good = encode(_telemetry()).decode()
    for spelled in ("NaN", "Infinity", "-Infinity", "1e999"):
        bad = re.sub(r'"temperature_c":[0-9.]+', f'"temperature_c":{spelled}', good)
        assert bad != good
        with pytest.raises(ProtocolError):
            decode(_topic_for("telemetry"), bad.encode())


def test_encode_refuses_what_decode_would_reject() -> None:
    with pytest.raises(ProtocolError) as info:
        encode(_telemetry(cpu_percent=float("nan")))
    assert "payload" in info.value.field or info.value.field == "cpu_percent"
    with pytest.raises(ProtocolError) as info:
        encode(_telemetry(device="pi+1"))
    assert info.value.field == "device"
    with pytest.raises(ProtocolError) as info:
        encode(_telemetry(inferences=1))
    assert info.value.field == "latency_ms.counts"
    huge = Command(id="c", action="x", ts=0.0, args={"blob": "a" * MAX_PAYLOAD_BYTES})
    with pytest.raises(ProtocolError) as info:
        encode(huge)
    assert info.value.field == "payload"
    assert issubclass(ProtocolError, EdgeshipError)


# --- strings: no lone surrogate, no NUL, anywhere (issue 11, findings 1 and 3) ----------------


def _assert_safe(err: ProtocolError) -> None:
    """An error about unsafe text is itself safe text: storable, printable."""
    for text in (str(err), err.field):
        text.encode("utf-8")  # no lone surrogate
        assert "\x00" not in text


@pytest.mark.parametrize(
    ("kind", "path", "value", "field"),
    [
        ("telemetry", ["model"], "digits\ud800", "model"),
        ("telemetry", ["model"], "dig\x00its", "model"),
        ("telemetry", ["model_version"], "\udfff", "model_version"),
        ("telemetry", ["predictions", "3\ud800"], 1, "predictions"),
        ("telemetry", ["extra"], ["ok", "\udc80"], "extra[1]"),
        ("telemetry", ["latency_ms", "k\x00"], 1, "latency_ms"),
        ("status", ["agent_version"], "0.1\udc00", "agent_version"),
        ("status", ["host", "model"], "Pi\x00", "host.model"),
        ("status", ["host", "k\ud800"], 1, "host"),
        ("outliers", ["prediction"], "\ud800", "prediction"),
        ("cmd", ["args", "path"], "/tmp/\x00", "args.path"),
        ("cmd", ["args", "k\udc80"], 1, "args"),
        ("cmd", ["args", "list"], [1, ["\ud834"]], "args.list[1][0]"),
        ("cmd/reply", ["result", "nested"], {"deep": "\ud800"}, "result.nested.deep"),
        ("cmd/reply", ["error"], "oops\x00", "error"),
        ("alerts", ["summary"], "s\x00", "summary"),
        ("telemetry", ["k\ud800"], "v", "payload"),
    ],
)
def test_decode_refuses_lone_surrogates_and_nul_in_any_string_or_key(
    kind: str, path: list[Any], value: Any, field: str
) -> None:
    payload = _mutate(kind, path, value)  # json.dumps writes them as \u escapes
    with pytest.raises(ProtocolError) as info:
        decode(_topic_for(kind), payload)
    assert info.value.field == field, str(info.value)
    _assert_safe(info.value)
    assert "surrogate" in str(info.value) or "NUL" in str(info.value)


def _nested(depth: int) -> dict[str, Any]:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return {"deep": value}


def test_the_issues_payload_is_refused_with_safe_text() -> None:
    payload = b'{"\\ud800":1,"\\ud800":2}'  # the mosquitto_pub -m of issue 11, finding 1
    with pytest.raises(ProtocolError) as info:
        decode("edgeship/farm/bad/telemetry", payload)
    assert info.value.field == "payload" and "\\ud800" in str(info.value)
    _assert_safe(info.value)


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (_telemetry(model="digits\ud800"), "model"),
        (_telemetry(predictions={"3\udc00": 70, "7": 50}), "predictions"),
        (dataclasses.replace(_samples()["status"], agent_version="0.1\x00"), "agent_version"),  # type: ignore[type-var]
        (dataclasses.replace(_samples()["status"], host={"k": "v\ud800"}), "host.k"),  # type: ignore[type-var]
        (Command(id="c", action="x", ts=0.0, args={"k": "\ud800"}), "args.k"),
        (Command(id="c", action="x", ts=0.0, args={"\udc00": 1}), "args"),
        (Command(id="c", action="x", ts=0.0, args={"x": float("inf")}), None),
        (Command(id="c", action="x", ts=0.0, args={"x": np.float32(1.5)}), "payload"),
        (Command(id="c", action="x", ts=0.0, args={"x": object()}), None),
        (Command(id="c", action="x", ts=0.0, args=_nested(5000)), None),
        (dataclasses.replace(_samples()["alerts"], summary="s\x00"), "summary"),  # type: ignore[type-var]
        (CommandReply(**ENV, id="c-1", ok=False, error="\ud800"), "error"),
        (CommandReply(**ENV, id="c-1", ok=True, result=[float("nan")]), None),
    ],
)
def test_encode_raises_protocol_error_for_what_it_cannot_encode(
    msg: Message, field: str | None
) -> None:
    with pytest.raises(ProtocolError) as info:
        encode(msg)
    if field is not None:
        assert info.value.field == field, str(info.value)
    _assert_safe(info.value)


_ENCODED_FOR_WILD = {kind: encode(msg) for kind, msg in _samples().items()}
_BAD_CHAR = st.characters(categories=["Cs"]) | st.just("\x00")
_WILD_TEXT = st.text(alphabet=st.characters() | _BAD_CHAR, max_size=12)
_UNSAFE_TEXT = st.builds(lambda a, c, b: a + c + b, _WILD_TEXT, _BAD_CHAR, _WILD_TEXT)
_WILD_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _WILD_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_WILD_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)
_STRING_FIELDS = {
    "telemetry": ("model", "model_version"),
    "status": ("agent_version", "model", "runtime"),
    "outliers": ("prediction", "model"),
    "cmd/reply": ("error",),
    "alerts": ("summary", "rule"),
}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(_STRING_FIELDS)), st.data())
def test_encode_only_raises_protocol_error_and_what_it_encodes_decodes_equal(
    kind: str, data: st.DataObject
) -> None:
    """Any text (lone surrogates and NUL included) or float in a message's fields, any JSON in
    a command's args: encode either refuses it with ProtocolError or writes a payload that
    decodes to the same message."""
    sample = _samples()[kind]
    name = data.draw(st.sampled_from(_STRING_FIELDS[kind]))
    text = data.draw(_WILD_TEXT | _UNSAFE_TEXT)
    changes: dict[str, Any] = {name: text}
    if kind == "cmd/reply":
        changes["ok"] = False
    msg = dataclasses.replace(sample, **changes)  # type: ignore[type-var]
    for candidate in (
        msg,
        Command(id="c-1", action="x", ts=1.0, args={"a": data.draw(_WILD_JSON)}),
    ):
        try:
            payload = encode(candidate)
        except ProtocolError as exc:
            _assert_safe(exc)
            continue
        assert decode(_topic_for(candidate.KIND), payload) == candidate
    unsafe = dataclasses.replace(sample, **{**changes, name: data.draw(_UNSAFE_TEXT)})  # type: ignore[type-var]
    with pytest.raises(ProtocolError):
        encode(unsafe)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_ENCODED_FOR_WILD)), st.data())
def test_decode_wild_strings_only_raises_protocol_error_with_safe_text(
    kind: str, data: st.DataObject
) -> None:
    """Keys and values with lone surrogates and NUL spliced anywhere into a valid message:
    decode refuses them with a ProtocolError whose text is safe, or returns a message whose
    every string is safe (so encode takes it back)."""
    obj = json.loads(_ENCODED_FOR_WILD[kind])
    node = obj
    while isinstance(node, dict) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node)))
        if not isinstance(node[key], dict):
            break
        node = node[key]
    if data.draw(st.booleans()):
        node[data.draw(_WILD_TEXT | _UNSAFE_TEXT)] = data.draw(_WILD_JSON)
    else:
        key = data.draw(st.sampled_from(sorted(node) or ["x"]))
        node[key] = data.draw(_WILD_JSON | _UNSAFE_TEXT)
    payload = json.dumps(obj).encode()  # ensure_ascii: surrogates and NUL as \u escapes
    try:
        msg = decode(_topic_for(kind), payload)
    except ProtocolError as exc:
        _assert_safe(exc)
        return
    assert decode(_topic_for(kind), encode(msg)) == msg


def _rollout_dict(**changes: Any) -> dict[str, Any]:
    obj = json.loads(encode(_samples()["rollouts"]))
    obj.update(changes)
    return obj


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"waves": [["a"], ["a"]], "devices": {"a": "pending"}}, "waves[1]"),
        ({"waves": [[]], "devices": {}}, "waves[0]"),
        ({"devices": {"pi-kitchen-01": "applied"}}, "devices"),
        ({"devices": {"pi-kitchen-01": "lost", "pi-hall-02": "pending"}}, "devices"),
        ({"wave": 3}, "wave"),
        ({"state": "paused"}, "state"),
        ({"waves": [["bad/id"]], "devices": {"bad/id": "pending"}}, "waves[0][0]"),
        ({"deploy": "d+"}, "deploy"),
    ],
)
def test_rollout_event_rejects_an_inconsistent_plan(changes: dict[str, Any], field: str) -> None:
    payload = json.dumps(_rollout_dict(**changes)).encode()
    with pytest.raises(ProtocolError) as info:
        decode("edgeship/home/rollouts", payload)
    assert info.value.field is not None and info.value.field.startswith(field.split(".")[0])


def test_rollout_event_of_the_largest_fleet_fits_one_payload() -> None:
    ids = [f"device-{i:04d}-" + "x" * 52 for i in range(MAX_ROLLOUT_DEVICES)]
    event = dataclasses.replace(
        _samples()["rollouts"],  # type: ignore[type-var]
        waves=(tuple(ids[:1]), tuple(ids[1:])),
        devices=dict.fromkeys(ids, "unreachable"),
    )
    assert len(encode(event)) <= MAX_PAYLOAD_BYTES
    assert decode("edgeship/home/rollouts", encode(event)) == event


# --- property tests: decode raises ProtocolError and nothing else -----------------------------

_TOPICS = st.sampled_from([_topic_for(k) for k in _samples()])
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)


def _decode_or_protocol_error(topic_name: str, payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(topic_name, payload)


@settings(max_examples=300, deadline=None)
@given(_TOPICS, st.binary(max_size=512))
def test_decode_random_bytes_only_raises_protocol_error(topic_name: str, payload: bytes) -> None:
    _decode_or_protocol_error(topic_name, payload)


@settings(max_examples=120, deadline=None)
@given(_TOPICS, _json)
def test_decode_random_json_only_raises_protocol_error(topic_name: str, value: Any) -> None:
    _decode_or_protocol_error(topic_name, json.dumps(value).encode())


_ENCODED = {kind: encode(msg) for kind, msg in _samples().items()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_ENCODED)), st.data())
def test_decode_mutated_messages_only_raises_protocol_error(kind: str, data: st.DataObject) -> None:
    obj = json.loads(_ENCODED[kind])
    # Replace or add one field, possibly nested one level, with arbitrary JSON.
    key = data.draw(st.sampled_from([*obj, "extra"]))
    if isinstance(obj.get(key), dict) and obj[key] and data.draw(st.booleans()):
        inner = data.draw(st.sampled_from(sorted(obj[key])))
        obj[key][inner] = data.draw(_json)
    else:
        obj[key] = data.draw(_json)
    payload = json.dumps(obj).encode()
    try:
        msg = decode(_topic_for(kind), payload)
    except ProtocolError:
        return
    # Whatever decode accepts, encode accepts too, and the result is stable.
    assert decode(_topic_for(kind), encode(msg)) == msg


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_parse_topic_random_text_only_raises_protocol_error(value: str) -> None:
    with contextlib.suppress(ProtocolError):
        parse_topic(value)


# --- the docs example, against the shared Mosquitto -----------------------------------------

BROKER = ("127.0.0.1", 1883)


def _broker_up() -> bool:
    try:
        with socket.create_connection(BROKER, timeout=0.5):
            return True
    except OSError:
        return False


def _default_sigint() -> None:
    """In the child, before exec: Ctrl-C as a terminal delivers it. An ignored or blocked
    SIGINT survives exec, and a Python started with SIGINT ignored never raises
    KeyboardInterrupt, so whatever the test process inherited must not reach the example."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _docs_example() -> str:
    text = (REPO / "docs" / "protocol.md").read_text()
    match = re.search(r"<!-- example: subscriber -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/protocol.md lost its subscriber example"
    return match.group(1)


class _LineReader:
    """The lines a process prints, read by a thread as they come.

    A thread blocked in ``readline()`` sees every line; ``select()`` on the pipe (what this
    was) does not see lines a previous ``readline()`` already pulled into the text wrapper's
    buffer, so when two lines arrived together the second waited there unseen until the
    timeout (the docs example failed that way on a loaded machine, and printed everything
    when run by hand)."""

    def __init__(self, stream: Any) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def until(self, pattern: str, timeout: float) -> list[str]:
        """Lines printed until one matches ``pattern`` (that one included)."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout} s; got {lines}"
                ) from None
            if line is None:
                raise AssertionError(f"the process ended before {pattern!r}; got {lines}")
            lines.append(line)
            if re.search(pattern, line):
                return lines

    def rest(self, timeout: float) -> list[str]:
        """Every line until the process closes its output."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while (line := self._lines.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
            lines.append(line)
        return lines


def test_the_line_reader_sees_lines_that_arrive_together() -> None:
    code = "import sys, time; print('first'); print('second'); sys.stdout.flush(); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        reader = _LineReader(proc.stdout)
        assert reader.until("first", 10) == ["first"]
        # Already in the reader's buffer with "first": select() would never report it.
        assert reader.until("second", 5) == ["second"]
    finally:
        proc.kill()
        proc.wait()


def test_docs_subscriber_example_reads_a_fleet(tmp_path: Path) -> None:
    if not _broker_up():
        pytest.skip("no MQTT broker on 127.0.0.1:1883")
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    fleet = f"test-{uuid.uuid4().hex[:12]}"
    script = tmp_path / "subscriber.py"
    script.write_text(_docs_example())
    env = dict(
        os.environ,
        EDGESHIP_BROKER=BROKER[0],
        EDGESHIP_PORT=str(BROKER[1]),
        EDGESHIP_FLEET=fleet,
        # A backstop only: the test stops it with SIGINT once it has seen everything. (8 s here
        # ran out on a loaded machine before the subscriber had printed all it received.)
        EDGESHIP_SECONDS="60",
    )
    samples = _samples()
    seq = ENV["seq"]
    status = encode(samples["status"])
    status_topic = topic(fleet, ENV["device"], "status")
    telemetry_topic = topic(fleet, ENV["device"], "telemetry")

    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect(*BROKER)
    pub.loop_start()
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, preexec_fn=_default_sigint,
    )  # fmt: skip
    reader = _LineReader(proc.stdout)
    try:
        # The retained status reaches the subscriber whenever it subscribes.
        pub.publish(status_topic, status, qos=1, retain=True).wait_for_publish(5)
        lines = reader.until(r"subscribed to", 30)
        for n in (seq + 1, seq + 1, seq + 4):  # a duplicate, then two numbers skipped
            pub.publish(telemetry_topic, encode(_telemetry(seq=n)), qos=1).wait_for_publish(5)
        lines += reader.until(rf"telemetry seq={seq + 4}:", 30)
        proc.send_signal(signal.SIGINT)  # the example stops on Ctrl-C and prints its summary
        proc.wait(timeout=30)
        lines += reader.rest(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # Leave nothing retained on the shared broker.
        pub.publish(status_topic, b"", qos=1, retain=True).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
    output = "\n".join(lines)
    assert f"{ENV['device']} status seq={seq}: online agent=0.1.0 model=digits" in output
    assert output.count(f"telemetry seq={seq + 1}: 120 inferences, p95=1.9 ms, 2 outliers") == 1
    assert f"telemetry seq={seq + 4}:" in output
    assert f"{ENV['device']}: 2 missing" in output


def test_docs_describe_every_field() -> None:
    """docs/protocol.md is the contract for third parties: every wire field is in a table."""
    text = (REPO / "docs" / "protocol.md").read_text()

    def keys(value: Any) -> set[str]:
        out: set[str] = set()
        if isinstance(value, dict):
            for k, v in value.items():
                out.add(k)
                if k not in ("host", "predictions", "args", "result", "devices"):  # free-form maps
                    out |= keys(v)
        return out

    for kind, encoded in _ENCODED.items():
        for key in keys(json.loads(encoded)):
            assert f"`{key}`" in text, f"docs/protocol.md does not describe {kind} field {key!r}"
