"""Fuzzing the two HTTP servers (the agent's endpoint, the collector's API) over real sockets.

Random methods, paths, headers and bodies (non-UTF-8 bytes, escaped lone surrogates, NUL,
NaN / Infinity, huge numbers, deep nesting, duplicate keys, a wrong or missing
Content-Length), some left half-sent and open, interleaved with good requests. Invariants:

* every good request is answered exactly once, correctly: a good predict returns the model's
  own prediction for that input; a good command is 202 and the broker delivers it once; a
  good read of a rollout (``/api/rollouts/...``) answers the state the collector stored;
* every bad request gets only 4xx answers (or 2xx when it happened to be valid), never a 5xx
  and never a reset without an answer; answers are strict JSON;
* the server keeps serving, with a bounded number of threads.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from collector.service import Collector, CollectorConfig
from device_agent import Agent, AgentConfig
from device_agent.contracts.messages import RolloutEvent, encode, message_topic
from device_agent.httpserver import HTTPLimits
from device_agent.service import make_http_server
from tests.brokers import Mosquitto, wait_for
from tests.collector_helpers import Publisher
from tests.rawhttp import Response, parse_responses, request
from tests.test_collector_api_auth import Spy

TOKEN = "fuzz-" + "t" * 27
FLEET = "fz"

# --- what a bad request is made of ---------------------------------------------------------------

_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW"])
_PATH_CHARS = st.characters(
    codec="latin-1", exclude_categories=("Zs", "Zl", "Zp", "Cc"), exclude_characters="\x85"
)


def _paths(known: list[str]) -> st.SearchStrategy[str]:
    random_path = st.text(_PATH_CHARS, max_size=40).map(lambda t: "/" + t)
    suffixed = st.tuples(st.sampled_from(known), st.text(_PATH_CHARS, max_size=12)).map(
        lambda p: p[0] + p[1]
    )
    return st.one_of(st.sampled_from(known), suffixed, random_path)


_HEADER_NAMES = st.sampled_from(
    ["Content-Type", "Accept", "X-Junk", "Connection", "Expect", "Transfer-Encoding",
     "Authorization", "Content-Length", "Host", "Cookie"]
)  # fmt: skip
_HEADER_VALUES = st.one_of(
    st.sampled_from(["application/json", "close", "keep-alive", "100-continue", "chunked", "-1",
                     "0", "99999999999999999999", "Bearer x", "", " 5 "]),
    st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=30),
)  # fmt: skip

_JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),  # json.dumps escapes lone surrogates as \udxxx
    st.sampled_from(["\x00", "\ud800", "a\udfffb", "\U0001f600"]),
)
_CLEAN_JSON = st.recursive(
    st.one_of(st.none(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
                      max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=10,
)  # fmt: skip
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def _nasty_json(draw: st.DrawFn, wrap: Any) -> bytes:
    """A body that is JSON or nearly: random values, NaN, huge numbers, deep nesting,
    duplicate keys, escaped surrogates and NUL, non-UTF-8 bytes, a flipped byte."""
    kind = draw(st.integers(0, 8))
    if kind == 0:
        return json.dumps(wrap(draw(_JSON))).encode()
    if kind == 8:  # valid JSON, finite, no NUL or surrogates: may be a valid request
        return json.dumps(wrap(draw(_CLEAN_JSON))).encode()
    if kind == 1:
        depth = draw(st.sampled_from([31, 33, 200, 5_000, 60_000]))
        return json.dumps(wrap("@")).encode().replace(b'"@"', b"[" * depth + b"]" * depth)
    if kind == 2:
        number = draw(st.sampled_from(["NaN", "-Infinity", "1e400", "1" * 5000, "-0", "1e-400"]))
        return json.dumps(wrap([[[["@"]]]])).encode().replace(b'"@"', number.encode())
    if kind == 3:
        text = json.dumps(wrap(draw(_JSON)))
        return (text[:-1] + ', "inputs": 1}').encode() if text.startswith("{") else text.encode()
    if kind == 4:
        return (
            json.dumps(wrap("@"))
            .encode()
            .replace(
                b'"@"', draw(st.sampled_from([b'"\\ud800"', b'"\\u0000"', b'"\\udc00\\ud800"']))
            )
        )
    if kind == 5:
        return draw(st.binary(max_size=200))
    if kind == 6:
        good = bytearray(json.dumps(wrap([[[[0.5] * 8] * 8]])).encode())
        i = draw(st.integers(0, len(good) - 1))
        good[i] = draw(st.integers(0, 255))
        return bytes(good)
    return b"\xc3\x28" + json.dumps(wrap(1)).encode()  # invalid UTF-8


@st.composite
def _bad_request(
    draw: st.DrawFn, known: list[str], post: str, wrap: Any, token: str | None
) -> bytes:
    """Half the time a well-framed POST to a real route (with the token, if any) whose body is
    the bad part; else anything: random method, path, headers, framing."""
    framed = draw(st.booleans())
    body = draw(_nasty_json(wrap) if framed else st.one_of(st.none(), _nasty_json(wrap)))
    if framed:
        method, path, headers = "POST", post, []
        if token is not None:
            headers.append(("Authorization", f"Bearer {token}"))
        length_kind = "right"
    else:
        method, path = draw(_METHODS), draw(_paths(known))
        headers = draw(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=4))
        if token is not None and draw(st.booleans()):
            headers.append(("Authorization", f"Bearer {token}"))
        length_kind = draw(st.sampled_from(["right", "right", "short", "long", "huge", "none"]))
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None and not any(n == "Content-Length" for n, _ in headers):
        size = {"right": len(body), "short": max(len(body) - 3, 0), "long": len(body) + 7,
                "huge": 10**9}  # fmt: skip
        if length_kind in size:
            lines.append(f"Content-Length: {size[length_kind]}")
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass")
    return head + (body or b"")


def _exchange_all(port: int, data: bytes, *, hold: bool = False) -> tuple[list[Response], Any]:
    """Send ``data``, close our sending side, and read every answer until the server closes.
    With ``hold``, leave the connection open half-sent instead (returned for closing later)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    if hold:
        sock.sendall(data[: max(len(data) // 2, 1)])
        return [], sock
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # answered and closed before it took everything: its answer is still readable
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError as exc:
        if not got:
            raise AssertionError(f"reset without an answer to {data[:120]!r}") from exc
    finally:
        sock.close()
    responses, rest = parse_responses(got)
    assert rest == b"", (data[:120], got[:300])
    return responses, None


def _check_bad(responses: list[Response], data: bytes) -> None:
    assert responses, f"no answer to {data[:200]!r}"
    for answer in responses:
        event(f"bad request answered {answer.status}")  # --hypothesis-show-statistics
        assert answer.status < 500, (data[:200], answer)
        if answer.headers.get("content-type", "").startswith("application/json"):
            answer.json()  # strict: NaN or Infinity fail


def _good_one(port: int, data: bytes) -> Response:
    responses, _ = _exchange_all(port, data)
    assert len(responses) == 1, (data[:200], responses)  # answered exactly once
    return responses[0]


# --- the agent's endpoint -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_server(
    digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Agent, int]]:
    state = tmp_path_factory.mktemp("fuzz-agent") / "state"
    config = AgentConfig(device_id="pi-fuzz", fleet="lab", state_dir=state, window_s=3600)
    with Agent.from_bundle(digits_bundle, config) as agent:
        # A short request timeout: requests fuzzed with too long a Content-Length and left
        # open would otherwise wait out the default 10 s before their 408.
        limits = HTTPLimits(workers=4, max_connections=64, request_timeout_s=2.0)
        server = make_http_server(agent, ("127.0.0.1", 0), limits=limits)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield agent, int(server.server_address[1])
        finally:
            server.shutdown()
            server.server_close()
            thread.join(30)


_HELD: list[socket.socket] = []


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz_agent_http(agent_server: tuple[Agent, int], digits_splits: Any, data: Any) -> None:
    agent, port = agent_server
    threads_before = threading.active_count()
    wrap = draw_wrap(data)
    for _ in range(data.draw(st.integers(1, 3), label="bad requests")):
        bad = data.draw(
            _bad_request(["/v1/predict", "/v1/health"], "/v1/predict", wrap, None), label="bad"
        )
        if data.draw(st.integers(0, 9), label="hold") == 0:
            _HELD.append(_exchange_all(port, bad, hold=True)[1])
        else:
            _check_bad(_exchange_all(port, bad)[0], bad)
        # A good request between the bad ones: the model's own answer, exactly once.
        i = data.draw(st.integers(0, len(digits_splits.x_test) - 1), label="sample")
        x = digits_splits.x_test[i : i + 1]
        expected = agent.predict({"image": x})
        body = json.dumps({"inputs": {"image": x.tolist()}}).encode()
        answer = _good_one(port, request("POST", "/v1/predict", body))
        assert answer.status == 200, answer
        got = answer.json()
        assert got["labels"] == expected.labels
        np.testing.assert_allclose(got["outputs"]["logits"], expected.outputs[0], rtol=1e-4)
    health = _good_one(port, request("GET", "/v1/health"))
    assert health.status == 200 and health.json()["ok"]
    assert threading.active_count() <= threads_before
    while len(_HELD) > 20:
        _HELD.pop(0).close()


def draw_wrap(data: Any) -> Any:
    """How a fuzzed JSON value is placed in the body: as the input, as the inputs, or bare."""
    return data.draw(
        st.sampled_from(
            [
                lambda v: {"inputs": {"image": v}},
                lambda v: {"inputs": v},
                lambda v: v,
                lambda v: {"inputs": {"image": v, "other": v}},
            ]
        ),
        label="wrap",
    )


# --- the collector's API ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collector_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Spy]]:
    tmp = tmp_path_factory.mktemp("fuzz-collector")
    with Mosquitto(tmp / "broker", persistence=False) as broker:
        config = CollectorConfig(
            broker.url, fleet=FLEET, store_url=f"sqlite:///{tmp / 'fleet.db'}",
            http="127.0.0.1:0", client_id=f"fz-{uuid.uuid4().hex[:8]}", worker="thread",
            api_token=TOKEN,
        )  # fmt: skip
        collector = Collector(config).start()
        spy = Spy(broker.port)
        pub = Publisher(broker.port, FLEET)
        try:
            assert wait_for(lambda: collector.stats.subscribed, 10), collector.health()
            # A stored rollout, so /api/rollouts/{fleet}/{id} has something to answer with.
            pub.client.publish(message_topic(FLEET, ROLLOUT), encode(ROLLOUT), qos=1,
                               retain=True).wait_for_publish(10)  # fmt: skip
            assert wait_for(lambda: collector.stats.stored == 1, 10), collector.health()
            yield collector.http_address_bound()[1], spy
        finally:
            pub.close()
            spy.close()
            collector.stop()


_SENT: list[str] = []
ROLLOUT = RolloutEvent(
    id="r-1", seq=7, ts=1.8e9, started=1.8e9, state="running", deploy="d0123", wave=0,
    waves=(("d1",), ("d2", "d3")), devices={"d1": "applied", "d2": "pending", "d3": "pending"},
)  # fmt: skip


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz_collector_http(collector_rig: tuple[int, Spy], data: Any) -> None:
    port, spy = collector_rig
    known = ["/api/health", "/api/devices", "/api/devices/d1", "/api/dead-letters",
             "/api/devices/d1/commands", "/api/devices/d1/commands/x", "/api/rollouts",
             f"/api/rollouts/{FLEET}/r-1", "/api/rollouts?limit=5&fleet="]  # fmt: skip
    wrap = data.draw(
        st.sampled_from(
            [lambda v: {"action": "ping", "fleet": FLEET, "args": {"v": v}},
             lambda v: {"action": v}, lambda v: v,
             lambda v: {"action": "ping", "fleet": FLEET, "expires_in_s": v}]
        ),
        label="wrap",
    )  # fmt: skip
    for _ in range(data.draw(st.integers(1, 3), label="bad requests")):
        bad = data.draw(_bad_request(known, "/api/devices/d1/commands", wrap, TOKEN), label="bad")
        if data.draw(st.integers(0, 9), label="hold") == 0:
            _HELD.append(_exchange_all(port, bad, hold=True)[1])
            continue
        responses, _ = _exchange_all(port, bad)
        _check_bad(responses, bad)
        # A bad request that happened to be a valid command was sent: it counts, once.
        _SENT.extend(r.json()["id"] for r in responses if r.status == 202)
        if any(r.status == 202 for r in responses):
            event("a fuzzed request was a valid command")
        # A good command between the bad ones: 202 once, delivered once (checked below).
        device = f"d{data.draw(st.integers(0, 3), label='device')}"
        body = json.dumps({"action": "ping", "fleet": FLEET}).encode()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        answer = _good_one(port, request("POST", f"/api/devices/{device}/commands", body, auth))
        assert answer.status == 202, answer
        _SENT.append(answer.json()["id"])
        # A good read of the stored rollout: answered once, with what the broker delivered.
        read = _good_one(port, request("GET", f"/api/rollouts/{FLEET}/r-1"))
        assert read.status == 200 and read.json()["seq"] == 7, read
        assert read.json()["devices"] == dict(ROLLOUT.devices)
    health = _good_one(port, request("GET", "/api/health"))
    assert health.status == 200 and health.json()["ok"]
    assert wait_for(lambda: set(_SENT) <= set(spy.ids()), 20), set(_SENT) - set(spy.ids())
    assert sorted(spy.ids()) == sorted(_SENT)  # each exactly once, nothing else
    while len(_HELD) > 20:
        _HELD.pop(0).close()


@pytest.fixture(scope="module", autouse=True)
def _close_held() -> Iterator[None]:
    yield
    while _HELD:
        _HELD.pop().close()
