"""The agent's local endpoint under abuse: timeouts, bounded threads and connections, a body cap
from the model's input size, and JSON it must refuse (issue 11, findings 5 and 9).

A real digits bundle behind the real server (``device_agent.service.make_http_server``), spoken
to over bare sockets (half-sent requests, wrong lengths) and urllib. Nothing here asserts a
duration: waits are generous backstops, the assertions are about what the server answered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent, AgentConfig
from device_agent.config import RunConfig
from device_agent.httpserver import BoundedHTTPServer, HTTPLimits, json_too_deep, parse_json
from device_agent.service import HTTP_LIMITS, make_http_server, predict_body_limit
from tests.brokers import ROOT
from tests.rawhttp import closed_by_server, exchange, read_responses, request


class Served:
    def __init__(self, agent: Agent, server: BoundedHTTPServer) -> None:
        self.agent = agent
        self.server = server
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _serve(agent: Agent, **kw: Any) -> tuple[BoundedHTTPServer, threading.Thread]:
    server = make_http_server(agent, ("127.0.0.1", 0), **kw)
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    return server, thread


def _stop(server: BoundedHTTPServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(30)


@pytest.fixture(scope="module")
def agent(digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    state = tmp_path_factory.mktemp("http-limits") / "state"
    config = AgentConfig(device_id="pi-http", fleet="lab", state_dir=state, window_s=3600)
    with Agent.from_bundle(digits_bundle, config) as agent:
        yield agent


@pytest.fixture(scope="module")
def served(agent: Agent) -> Iterator[Served]:
    server, thread = _serve(agent)
    try:
        yield Served(agent, server)
    finally:
        _stop(server, thread)


def post(url: str, body: bytes, timeout: float = 30) -> tuple[int, Any]:
    """(status, strict-JSON body) of a POST; an answer with NaN in it fails the test."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})

    def refuse(name: str) -> Any:
        raise AssertionError(f"the server wrote {name}, which is not JSON")

    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read(), parse_constant=refuse)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read(), parse_constant=refuse)


def health(url: str, timeout: float = 30) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/v1/health", timeout=timeout) as resp:
        assert resp.status == 200
        return dict(json.loads(resp.read()))


def predict_body(x: Any, **kw: Any) -> bytes:
    return json.dumps({"inputs": {"image": x}}, **kw).encode()


# --- finding 9: what /v1/predict accepts -------------------------------------------------------


def test_whole_numbers_are_accepted_for_a_float_input(served: Served, digits_splits: Any) -> None:
    """JavaScript's JSON.stringify writes 1.0 as 1: a float model must take it."""
    ints = np.rint(digits_splits.x_test[:3]).astype(int)
    assert ints.dtype.kind == "i"
    status, answer = post(f"{served.url}/v1/predict", predict_body(ints.tolist()))
    assert status == 200, answer
    expected = served.agent.predict({"image": ints.astype(np.float32)})
    np.testing.assert_allclose(answer["outputs"]["logits"], expected.outputs[0], rtol=1e-5)
    assert answer["labels"] == expected.labels
    # Mixed whole and fractional numbers, as a browser sends them, too.
    mixed = digits_splits.x_test[:1].tolist()
    mixed[0][0][0] = [0, 1, 0.5, 1, 0, 0, 1, 0]
    assert post(f"{served.url}/v1/predict", predict_body(mixed))[0] == 200


@pytest.mark.parametrize(
    "number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1e39", "3.5e38"]
)
def test_non_finite_inputs_are_422_and_never_echoed(
    served: Served, digits_splits: Any, number: str
) -> None:
    """NaN and Infinity are not JSON; numbers past float64 (1e400) or float32 (1e39) would
    reach the model as inf. All are 422, and the answer itself is strict JSON."""
    text = json.dumps({"inputs": {"image": digits_splits.x_test[:1].tolist()}})
    text = text.replace("0.0", number, 1)
    assert number in text
    status, answer = post(f"{served.url}/v1/predict", text.encode())
    assert status == 422, answer
    assert re.search("finite|range|too large", answer["error"]), answer


def test_deep_json_is_400_and_the_connection_is_answered(served: Served) -> None:
    """100,000 nested arrays used to raise RecursionError in the handler thread: the client
    got no answer at all."""
    deep = b'{"inputs": {"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    assert len(deep) < predict_body_limit(served.agent.bundle.manifest.io)
    status, answer = post(f"{served.url}/v1/predict", deep)
    assert status == 400, answer
    assert "nests deeper than" in answer["error"]
    health(served.url)


def test_bad_json_bodies_are_4xx_with_a_reason(served: Served, digits_splits: Any) -> None:
    good = digits_splits.x_test[:1].tolist()
    cases = {
        b"{not json": 400,
        b"\xff\xfe{}": 400,  # not UTF-8
        b'{"inputs": {"image": [1]}, "inputs": {}}': 400,  # a duplicate key
        b'{"inputs": {"\\ud800": [1]}}': 400,  # a lone surrogate
        b'{"inputs": {"ima\\u0000ge": [1]}}': 400,  # NUL
        b'{"inputs": [1, 2]}': 400,
        b"[]": 400,
        b'{"inputs": {"image": "abc"}}': 422,
        b'{"inputs": {"image": [[1], [1, 2]]}}': 422,  # ragged
        b'{"inputs": {"image": [' + b"9" * 5000 + b"]}}": 400,  # past Python's int digits
        b'{"inputs": {"image": [' + b"9" * 40 + b"]}}": 422,  # past int64
        b'{"inputs": {"image": [[[[true]]]]}}': 422,
        b'{"inputs": {"pixels": [1]}}': 422,
        predict_body(good).replace(b"]]]]", b"]]]") + b"]": 400,  # unbalanced
    }
    for body, want in cases.items():
        status, answer = post(f"{served.url}/v1/predict", body)
        assert status == want, (body[:60], answer)
        assert answer["error"], body[:60]
    assert post(f"{served.url}/v1/predict", predict_body(good))[0] == 200


def test_parse_json_limits() -> None:
    assert not json_too_deep(b'[[["]]]]]]]]]]"]]]', 3)  # brackets in strings do not count
    assert not json_too_deep(b'{"a": "\\\\", "b": [["\\"["]]}', 3)
    assert json_too_deep(b"[[[[]]]]", 3) and not json_too_deep(b"[[[]]]", 3)
    assert json_too_deep(b"]][[", 10)
    assert parse_json(b'{"a": [1, 2.5, "\\ud83d\\ude00"]}', max_depth=3) == {
        "a": [1, 2.5, "\U0001f600"]
    }


# --- finding 5: body cap from the model ---------------------------------------------------------


def test_the_body_cap_follows_the_model_and_allows_a_pretty_printed_batch(
    served: Served, digits_splits: Any
) -> None:
    io = served.agent.bundle.manifest.io
    cap = predict_body_limit(io)
    # (batch, 1, 8, 8) with a symbolic batch: 64 rows of 64 numbers, 48 bytes each, + 64 KiB.
    assert cap == 64 * 1024 + 48 * 64 * 64, cap
    rows = digits_splits.x_test[:64]
    pretty = predict_body(rows.tolist(), indent=4)
    assert len(pretty) < cap
    status, answer = post(f"{served.url}/v1/predict", pretty)
    assert status == 200, answer
    assert len(answer["labels"]) == 64


def test_a_body_over_the_cap_is_413_before_it_is_sent(served: Served) -> None:
    """The old endpoint read up to 16 MiB into memory whatever the model (RSS 77 -> 459 MB).
    Only the head is sent here: an answer proves the server did not wait for the body."""
    cap = predict_body_limit(served.agent.bundle.manifest.io)
    for length in (16 * 2**20, cap + 1):
        head = request("POST", "/v1/predict", headers={"Content-Length": str(length)})
        [answer] = exchange(served.port, head, timeout=30)
        assert answer.status == 413, answer
        assert f"({cap} bytes)" in answer.json()["error"]
        assert answer.headers["connection"] == "close"
    # urllib sends the whole body before reading: it still gets the 413, not a reset.
    status, answer = post(f"{served.url}/v1/predict", b"[" + b"0," * (cap // 2) + b"0]")
    assert status == 413, answer
    health(served.url)


def test_framing_errors_are_4xx(served: Served) -> None:
    cases = [
        (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n\r\n", 411),  # no Content-Length
        (
            b"POST /v1/predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            411,
        ),
        (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
        (b"POST /v1/predict HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n", 400),
        (b"GET /v1/health\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /v1/health HTTP/2.0\r\n\r\n", 400),
        (b"\x00\x01\x02 / HTTP/1.1\r\n\r\n", 400),
        (b"BREW /v1/health HTTP/1.1\r\n\r\n", 405),
        (b"GET /v1/health HTTP/1.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n", 431),
        (b"GET /v1/health HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
        (b"GET /nothing HTTP/1.1\r\n\r\n", 404),
    ]
    for data, want in cases:
        answers = exchange(served.port, data, timeout=30)
        assert [a.status for a in answers] == [want], (data[:60], answers)
        assert answers[0].json()["error"]
    health(served.url)


def test_keep_alive_and_pipelined_requests_are_answered_in_order(
    served: Served, digits_splits: Any
) -> None:
    body = predict_body(digits_splits.x_test[:1].tolist())
    data = (
        request("GET", "/v1/health")
        + request("POST", "/v1/predict", body)
        + request("POST", "/v1/predict", b"{bad")
    )
    answers = exchange(served.port, data, expect=3, timeout=30)
    assert [a.status for a in answers] == [200, 200, 400], answers
    assert answers[1].json()["labels"] == [str(int(digits_splits.y_test[0]))]
    # Expect: 100-continue (curl's habit for larger bodies) gets its interim answer.
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        expect = {"Content-Length": str(len(body)), "Expect": "100-continue"}
        sock.sendall(request("POST", "/v1/predict", headers=expect))
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        [answer] = read_responses(sock)
        assert answer.status == 200


# --- finding 5: threads, connections and timeouts ----------------------------------------------


def _threads() -> int:
    return threading.active_count()


def test_half_sent_requests_hold_no_thread_and_health_still_answers(served: Served) -> None:
    """Each half-sent request used to hold a thread of its own (800 of them: 808 threads)."""
    health(served.url)
    before = _threads()
    socks = []
    try:
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=30)
            socks.append(sock)
            if i % 2:
                sock.sendall(b'POST /v1/predict HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{"in')
            else:
                sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost:")
        assert health(served.url)["ok"]
        assert _threads() <= before, (before, _threads())
        assert served.server.open_connections <= HTTP_LIMITS.max_connections
    finally:
        for sock in socks:
            sock.close()
    assert health(served.url)["ok"]


def test_a_request_not_sent_in_time_is_408_and_closed(agent: Agent) -> None:
    """Slowloris: a request that does not arrive whole within request_timeout_s is dropped
    (a short timeout here; the endpoint's default is HTTP_LIMITS.request_timeout_s)."""
    limits = HTTPLimits(workers=2, max_connections=8, request_timeout_s=0.5)
    server, thread = _serve(agent, limits=limits)
    port = int(server.server_address[1])
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as slow,
            socket.create_connection(("127.0.0.1", port), timeout=30) as idle,
        ):
            slow.sendall(b"POST /v1/predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            closed, answer = closed_by_server(slow)
            assert closed and answer.startswith(b"HTTP/1.1 408 "), answer
            closed, answer = closed_by_server(idle)
            assert closed and answer == b""  # nothing asked, nothing answered
        # The server goes on.
        assert health(f"http://127.0.0.1:{port}")["ok"]
    finally:
        _stop(server, thread)


def test_beyond_the_connection_cap_the_oldest_waiting_one_makes_room(agent: Agent) -> None:
    limits = HTTPLimits(workers=1, max_connections=4, request_timeout_s=60)
    server, thread = _serve(agent, limits=limits)
    port = int(server.server_address[1])
    try:

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=30)

        idle = [connect() for _ in range(4)]
        half = connect()  # the 5th: idle[0] is closed to make room
        half.sendall(b"GET /v1/health HTTP/1.1\r\n")
        more = [connect() for _ in range(4)]  # close idle[1:], then the half-sent one
        for sock in idle:
            assert closed_by_server(sock) == (True, b"")
        # Told why (503) if the server had read the start of its request; else closed quietly.
        closed, answer = closed_by_server(half)
        assert closed and (answer == b"" or answer.startswith(b"HTTP/1.1 503 ")), answer
        assert health(f"http://127.0.0.1:{port}")["ok"]  # closes more[0]
        assert closed_by_server(more[0]) == (True, b"")
        assert server.open_connections <= 4
        for sock in [*idle, half, *more]:
            sock.close()
    finally:
        _stop(server, thread)


def test_bodies_of_all_connections_together_are_bounded(agent: Agent, digits_splits: Any) -> None:
    """Each connection's body is capped, and so is their sum (max_buffered_bytes): many slow
    senders of large bodies cannot add up. Past it: 503, and what was reserved comes back."""
    body = predict_body(digits_splits.x_test[:1].tolist())
    body += b" " * (1200 - len(body))
    limits = HTTPLimits(workers=2, max_connections=8, max_buffered_bytes=2000)
    server, thread = _serve(agent, limits=limits)
    port = int(server.server_address[1])
    expect = {"Content-Length": str(len(body)), "Expect": "100-continue"}
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as first:
            first.sendall(request("POST", "/v1/predict", headers=expect))
            # "100 Continue": the head was read, and its 1200 bytes reserved.
            assert first.recv(64).startswith(b"HTTP/1.1 100 Continue")
            [busy] = exchange(port, request("POST", "/v1/predict", body), timeout=30)
            assert busy.status == 503 and busy.headers["retry-after"] == "1", busy
            assert "retry" in busy.json()["error"]
            first.sendall(body)
            [answer] = read_responses(first)
            assert answer.status == 200, answer
        for _ in range(3):  # released after each: one at a time always fits
            [answer] = exchange(port, request("POST", "/v1/predict", body), timeout=30)
            assert answer.status == 200, answer
    finally:
        _stop(server, thread)


def test_many_half_sent_and_idle_connections_to_the_service(
    digits_bundle: Path, digits_splits: Any, tmp_path: Path
) -> None:
    """The issue's figures against ``edgeship-agent run`` with the usual 1024 descriptors:
    800 half-sent requests gave the agent 808 threads, and 1,100 idle connections made
    /v1/health unreachable (accept failed with EMFILE and the accept loop spun at 100% CPU)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.fail(f"this test opens {need} sockets; the hard descriptor limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import resource, runpy, sys\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))\n"
        "sys.argv = ['edgeship-agent'] + sys.argv[1:]\n"
        "runpy.run_module('device_agent.cli', run_name='__main__')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "run", "--bundle", str(digits_bundle),
         "--http", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state"),
         "--device-id", "pi-flood"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def threads() -> int:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]

    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health(url, timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the agent did not start"
                time.sleep(0.2)
        before = threads()
        for _ in range(800):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b'POST /v1/predict HTTP/1.1\r\nContent-Length: 5000\r\n\r\n{"inputs":')
            socks.append(sock)
        # The agent's own threads may come and go (window publishing); 808 would be the old bound.
        assert threads() <= before + 4, (before, threads())
        for _ in range(1100):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        assert health(url, timeout=30)["ok"]
        body = predict_body(digits_splits.x_test[:1].tolist())
        status, answer = post(f"{url}/v1/predict", body)
        assert status == 200 and answer["labels"] == [str(int(digits_splits.y_test[0]))]
        assert threads() <= before + 4, (before, threads())
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


# --- binding ----------------------------------------------------------------------------------


def test_the_endpoint_binds_loopback_and_warns_beyond_it(
    agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    assert RunConfig().http_address() == ("127.0.0.1", 8765)
    assert RunConfig(http=":8765").http_address() == ("127.0.0.1", 8765)
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="device_agent"):
            server = make_http_server(agent, (host, 0))
            server.server_close()
        lines = [r.getMessage() for r in caplog.records if "not 127.0.0.1" in r.getMessage()]
        assert bool(lines) is warned, caplog.text


# --- the collector's API: uvicorn with the same limits -----------------------------------------
#
# The collector's API left BoundedHTTPServer for uvicorn (issue 12); these tests hold it to the
# limits the old server had. A real collector (Mosquitto, SQLite) with its API off, and an
# ApiServer over it with short limits, so that a timeout takes half a second.


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from collector.service import Collector, CollectorConfig
    from tests.brokers import Mosquitto, wait_for

    tmp = tmp_path_factory.mktemp("collector-http")
    with Mosquitto(tmp / "broker", persistence=False) as broker:
        config = CollectorConfig(
            broker.url, fleet="lab", store_url=f"sqlite:///{tmp / 'fleet.db'}", http=None,
            client_id=f"limits-{os.getpid()}", worker="thread",
        )  # fmt: skip
        with Collector(config) as c:
            assert wait_for(lambda: c.stats.subscribed, 10), c.health()
            yield c


API_TOKEN = "limits-" + "k" * 20
TOKEN = {"Authorization": f"Bearer {API_TOKEN}"}


@contextlib.contextmanager
def api_server(collector: Any, **settings: Any) -> Iterator[int]:
    """The collector's API on a free port with ``settings`` (HttpSettings); yields the port."""
    from collector.http_server import ApiServer, HttpSettings

    server = ApiServer.for_collector(
        collector, ("127.0.0.1", 0), api_token=API_TOKEN,
        settings=HttpSettings(**settings),
    ).start()  # fmt: skip
    try:
        yield server.server_address[1]
    finally:
        server.stop()


def api_health(port: int, scheme: str = "http", context: Any = None) -> int:
    url = f"{scheme}://127.0.0.1:{port}/api/health"
    with urllib.request.urlopen(url, timeout=30, context=context) as resp:
        json.loads(resp.read())
        return int(resp.status)


def test_collector_a_slow_sender_is_408_within_the_bound_and_others_are_served(
    collector: Any,
) -> None:
    """uvicorn alone never times out a request that is still arriving (a slow header or body
    sender holds its connection for ever); the API's protocol gives it request_timeout_s from
    the connection's start, however it trickles, then 408 and a close. Meanwhile other
    clients are answered."""
    with api_server(collector, request_timeout_s=1.0) as port:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as head,
            socket.create_connection(("127.0.0.1", port), timeout=30) as body,
            socket.create_connection(("127.0.0.1", port), timeout=30) as idle,
        ):
            started = time.monotonic()
            head.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            body.sendall(
                request(
                    "POST", "/api/devices/d/commands", headers={**TOKEN, "Content-Length": "100"}
                )
            )
            for _ in range(4):  # bytes keep coming, the deadline does not move
                head.sendall(b"a")
                body.sendall(b" ")
                assert api_health(port) == 200  # the server goes on serving others
                time.sleep(0.1)
            for sock in (head, body):
                closed, answer = closed_by_server(sock)
                assert closed and answer.startswith(b"HTTP/1.1 408 "), answer
                assert b"did not arrive whole within 1 s" in answer
            closed, answer = closed_by_server(idle)
            assert closed and answer == b""  # nothing asked, nothing answered
            # Generous backstop (a loaded CI machine); the bound is 1 s, not 5.
            assert time.monotonic() - started < 5
        assert api_health(port) == 200


def test_collector_past_the_connection_cap_the_oldest_waiting_one_makes_room(
    collector: Any,
) -> None:
    with api_server(collector, max_connections=4, request_timeout_s=60) as port:

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=30)

        idle = [connect() for _ in range(4)]
        half = connect()  # the 5th: idle[0] is closed to make room
        half.sendall(b"GET /api/health HTTP/1.1\r\n")
        time.sleep(0.2)  # let the server take it in before the next ones push it out
        more = [connect() for _ in range(4)]  # close idle[1:], then the half-sent one
        for sock in idle:
            assert closed_by_server(sock) == (True, b"")
        closed, answer = closed_by_server(half)  # it had sent part of a request: told why
        assert closed and answer.startswith(b"HTTP/1.1 503 "), answer
        assert api_health(port) == 200  # closes more[0]
        assert closed_by_server(more[0]) == (True, b"")
        for sock in [*idle, half, *more]:
            sock.close()


def test_collector_half_closed_clients_get_their_answer(collector: Any) -> None:
    """A client that shuts its sending side after the request (as the fuzzers do) is answered;
    uvicorn alone closes on that EOF and the answer is lost. A request cut short is 400."""
    with api_server(collector) as port:
        for data, want in (
            (request("GET", "/api/health"), [200]),
            (request("GET", "/api/health") + request("GET", "/nothing"), [200, 404]),
            (request("POST", "/api/devices/d/commands",
                     headers={**TOKEN, "Content-Length": "50"}) + b"{", [400]),
            (b"GET /api/health HTTP/1.1\r\nHost: x\r\n", [400]),  # its head never ended
            (b"", []),
        ):  # fmt: skip
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                answers = read_responses(sock, expect=3)
            assert [a.status for a in answers] == want, (data[:60], answers)
            for answer in answers:
                assert answer.json()


def test_collector_framing_errors_are_4xx_with_json(collector: Any) -> None:
    """The old server's answers to bad framing, now from h11 (400) and the app's guard (405,
    411, 431), with a JSON reason and a Content-Length like every other answer. New: an
    HTTP/1.1 request without a Host header is 400 (RFC 9112; h11 enforces it)."""
    token = TOKEN
    cases = [
        (request("POST", "/api/devices/d/commands", headers=token), 411),
        (request("POST", "/api/devices/d/commands",
                 headers={**token, "Transfer-Encoding": "chunked"}) + b"2\r\n{}\r\n0\r\n\r\n", 411),
        (b"POST /api/devices/d/commands HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
         b"Content-Length: 3\r\n\r\n{}", 400),
        (b"POST /api/devices/d/commands HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /api/health HTTP/2.0\r\nHost: x\r\n\r\n", 400),
        (b"\x00\x01\x02 / HTTP/1.1\r\n\r\n", 400),
        (b"GET /api/health HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 needs a Host header
        (request("BREW", "/api/health"), 405),
        (request("GET", "/api/health", headers={"X": "a" * 40_000}), 431),
        (b"GET /api/health HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
        (request("GET", "/nothing"), 404),
    ]  # fmt: skip
    with api_server(collector) as port:
        for data, want in cases:
            answers = exchange(port, data, timeout=30)
            assert [a.status for a in answers] == [want], (data[:60], answers)
            assert answers[0].json()["error"]
            assert answers[0].headers["cache-control"] == "no-store"  # as every answer
        assert api_health(port) == 200


def test_collector_api_over_tls(collector: Any, tmp_path: Path) -> None:
    """tls_cert_file / tls_key_file serve HTTPS (the token no longer crosses in the clear);
    an unreadable certificate is a ConfigError at start, not a dead thread."""
    import ssl

    from collector.errors import ConfigError
    from collector.http_server import ApiServer, HttpSettings
    from tests.pki import CertificateAuthority

    ca = CertificateAuthority.create(tmp_path / "pki")
    server = ca.issue_server("collector")
    with api_server(
        collector, tls_cert_file=str(server.cert), tls_key_file=str(server.key)
    ) as port:
        context = ssl.create_default_context(cafile=str(ca.cert))
        assert api_health(port, "https", context) == 200
        with pytest.raises(OSError):  # plain HTTP is not spoken there (no answer, or a reset)
            api_health(port)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="TLS"):
        ApiServer.for_collector(
            collector,
            ("127.0.0.1", 0),
            settings=HttpSettings(tls_cert_file=str(bad), tls_key_file=str(bad)),
        )


def test_a_handler_that_fails_before_answering_gets_a_500_and_the_server_goes_on() -> None:
    """A bug in a handler is answered 500 (headers it had queued are dropped) and logged; the
    worker and the server keep serving."""
    from device_agent.httphandler import JSONRequestHandler

    class Failing(JSONRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/fail":
                self.send_response(200)
                self.send_header("X-Half", "queued")  # queued, never sent
                raise RuntimeError("a bug in a handler")
            self.send_json(200, {"ok": True})

    server = BoundedHTTPServer(("127.0.0.1", 0), Failing, limits=HTTPLimits(workers=1))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        (failed,) = exchange(port, request("GET", "/fail"))
        assert failed.status == 500
        assert json.loads(failed.body) == {
            "error": "the server failed on this request; see its log"
        }
        assert "x-half" not in {k.lower() for k in failed.headers}
        (ok,) = exchange(port, request("GET", "/ok"))
        assert (ok.status, json.loads(ok.body)) == (200, {"ok": True})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
