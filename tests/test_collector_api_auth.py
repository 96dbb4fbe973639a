"""The collector API's token: reads are open, sending a command to a device needs the token.

A real collector service, a private Mosquitto and a real agent (the digits bundle) that answers
the commands. A spy subscribed to every ``cmd`` topic proves that a refused request published
nothing: each test ends with an accepted command, and the spy must see exactly that one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector.api import TOKEN_ENV, load_api_token
from collector.errors import ConfigError
from collector.service import Collector, CollectorConfig, parse_http_address
from device_agent import Agent, AgentConfig
from device_agent.contracts import messages as msg
from sdk.cli import build_parser
from tests.brokers import ROOT, Mosquitto, wait_for
from tests.rawhttp import exchange, request

FLEET = "f"
DEVICE = "pi-1"
TOKEN = "t0ken-" + "x" * 26
ACL = ROOT / "examples" / "raspberry_pi" / "mosquitto" / "acl"


def call(
    url: str,
    method: str = "GET",
    body: Any = None,
    *,
    token: str | None = None,
    authorization: str | None = None,
) -> tuple[int, dict[str, Any], Message]:
    """(status, JSON body, headers) of one request; 4xx/5xx are answers, not exceptions.
    Header names are case-insensitive (RFC 9110), as the server may write them in lower case."""
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if authorization is not None:
        headers["Authorization"] = authorization
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


class Spy:
    """A paho subscriber on every device's ``cmd`` topic: what the broker delivered."""

    def __init__(self, port: int) -> None:
        self.commands: list[tuple[str, msg.Command]] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("edgeship/+/+/cmd", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        decoded = msg.decode(m.topic, m.payload)
        assert isinstance(decoded, msg.Command)
        with self._lock:
            self.commands.append((m.topic, decoded))

    def ids(self) -> list[str]:
        with self._lock:
            return [c.id for _, c in self.commands]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Rig:
    broker: Mosquitto
    collector: Collector
    agent: Agent
    spy: Spy

    @property
    def api(self) -> str:
        host, port = self.collector.http_address_bound()
        return f"http://{host}:{port}"

    def commands_url(self, device: str = DEVICE) -> str:
        return f"{self.api}/api/devices/{device}/commands"

    def sentinel(self) -> str:
        """Send an accepted command; once the spy has it, anything refused before would have
        been delivered before it (one publisher, one subscriber: in order)."""
        status, body, _ = call(self.commands_url(), "POST", {"action": "ping"}, token=TOKEN)
        assert status == 202, body
        assert wait_for(lambda: body["id"] in self.spy.ids(), 10), self.spy.ids()
        return str(body["id"])


def _collector(url: str, tmp: Path, **kw: Any) -> Collector:
    config = CollectorConfig(
        url,
        fleet=FLEET,
        store_url=f"sqlite:///{tmp / f'fleet-{uuid.uuid4().hex[:6]}.db'}",
        http="127.0.0.1:0",
        client_id=f"c-{uuid.uuid4().hex[:8]}",
        worker="thread",
        **kw,
    )
    collector = Collector(config).start()
    assert wait_for(lambda: collector.stats.subscribed, 10), collector.health()
    return collector


@pytest.fixture(scope="module")
def rig(digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("api-auth")
    with Mosquitto(tmp / "broker", persistence=False) as broker:
        collector = _collector(broker.url, tmp, api_token=TOKEN)
        spy = Spy(broker.port)
        config = AgentConfig(
            device_id=DEVICE, fleet=FLEET, broker_url=broker.url, window_s=0.5,
            state_dir=tmp / "state",
        )  # fmt: skip
        try:
            with Agent.from_bundle(digits_bundle, config) as agent:
                assert wait_for(lambda: agent.stats["mqtt"]["connected"], 15)
                # The device is in the store (its birth) before the tests address it.
                assert wait_for(lambda: collector.state.device(DEVICE) is not None, 15)
                yield Rig(broker, collector, agent, spy)
        finally:
            spy.close()
            collector.stop()


def test_a_post_without_the_right_token_is_401_and_publishes_nothing(rig: Rig) -> None:
    before = len(rig.spy.ids())
    ping = {"action": "ping"}
    for auth in (None, f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}"):
        status, body, headers = call(rig.commands_url(), "POST", ping, authorization=auth)
        assert status == 401, (auth, body)
        assert headers["WWW-Authenticate"].startswith("Bearer"), headers
        assert "Authorization: Bearer" in body["error"]
    # Even a request that would be refused anyway (bad body, unknown route) says 401 first.
    assert call(rig.commands_url(), "POST", b"not json")[0] == 401
    assert call(f"{rig.api}/api/nothing", "POST", ping)[0] == 401
    last = rig.sentinel()
    assert rig.spy.ids()[before:] == [last]


def test_the_right_token_sends_the_command_and_its_reply_is_retrievable(rig: Rig) -> None:
    status, sent, headers = call(
        rig.commands_url(), "POST", {"action": "ping", "expires_in_s": 60}, token=TOKEN
    )
    assert status == 202, sent
    assert sent["state"] == "pending" and sent["topic"] == msg.topic(FLEET, DEVICE, "cmd")
    assert headers["Location"] == sent["reply_url"]
    assert wait_for(lambda: sent["id"] in rig.spy.ids(), 10)
    delivered = next(c for _, c in rig.spy.commands if c.id == sent["id"])
    assert delivered.action == "ping" and delivered.expires == pytest.approx(
        delivered.ts + 60, abs=1e-3
    )

    def answered() -> dict[str, Any] | None:
        status, body, _ = call(rig.api + sent["reply_url"])  # no token: a read
        assert status == 200, body
        return body if body["state"] == "replied" else None

    assert wait_for(answered, 15, interval=0.2), call(rig.api + sent["reply_url"])
    reply = answered()
    assert reply is not None
    assert reply["reply"]["ok"] is True and reply["reply"]["error"] is None
    assert reply["reply"]["result"] == {"pong": True, "boot": rig.agent.boot}
    assert reply["sent"]["action"] == "ping"

    # An action the agent does not know: accepted by the API, answered by the device.
    status, unknown, _ = call(rig.commands_url(), "POST", {"action": "reboot"}, token=TOKEN)
    assert status == 202, unknown

    def failed() -> dict[str, Any] | None:
        body = call(rig.api + unknown["reply_url"])[1]
        return body if body["state"] == "replied" else None

    assert wait_for(failed, 15, interval=0.2)
    answer = failed()
    assert answer is not None and answer["reply"]["ok"] is False
    assert "unknown action 'reboot'" in answer["reply"]["error"]
    # The reply is also among the device's events.
    events = call(f"{rig.api}/api/devices/{DEVICE}?events=50")[1]["events"]
    assert any(e["kind"] == "cmd/reply" and e["message"]["id"] == sent["id"] for e in events)


def test_reads_need_no_token(rig: Rig) -> None:
    for path in ("/api/health", "/api/devices", f"/api/devices/{DEVICE}", "/api/dead-letters"):
        status, body, _ = call(rig.api + path)
        assert status == 200, (path, body)
    assert call(f"{rig.api}/api/devices/{DEVICE}/commands/nope")[0] == 404


def test_bad_commands_are_400_and_publish_nothing(rig: Rig) -> None:
    before = len(rig.spy.ids())
    for body in (
        b"{not json",
        b"[1, 2]",
        {"action": "Ping!"},
        {},
        {"action": "ping", "args": [1]},
        {"action": "ping", "expires_in_s": -1},
        {"action": "ping", "colour": "red"},
        {"action": "ping", "fleet": "other"},  # this collector collects fleet f only
        {"action": "ping", "id": "has space"},
    ):
        status, answer, _ = call(rig.commands_url(), "POST", body, token=TOKEN)
        assert status == 400, (body, answer)
        assert answer["error"], body
    assert call(rig.commands_url("bad+id"), "POST", {"action": "ping"}, token=TOKEN)[0] == 400
    status, first, _ = call(rig.commands_url(), "POST", {"action": "ping", "id": "fixed-1"},
                            token=TOKEN)  # fmt: skip
    assert status == 202, first
    again = call(rig.commands_url(), "POST", {"action": "ping", "id": "fixed-1"}, token=TOKEN)
    assert again[0] == 400 and "used already" in again[1]["error"]
    for method in ("PUT", "DELETE", "PATCH"):
        status, _, headers = call(rig.commands_url(), method, {"action": "ping"}, token=TOKEN)
        assert status == 405 and headers["Allow"] == "GET, POST"
    last = rig.sentinel()
    assert rig.spy.ids()[before:] == ["fixed-1", last]


def test_without_a_configured_token_commands_are_disabled(rig: Rig, tmp_path: Path) -> None:
    before = len(rig.spy.ids())
    collector = _collector(rig.broker.url, tmp_path)
    try:
        host, port = collector.http_address_bound()
        url = f"http://{host}:{port}/api/devices/{DEVICE}/commands"
        for token in (None, TOKEN, "anything-at-all-long-enough"):
            status, body, _ = call(url, "POST", {"action": "ping"}, token=token)
            assert status == 403, body
            assert "--api-token-file" in body["error"] and TOKEN_ENV in body["error"]
        assert call(f"http://{host}:{port}/api/health")[0] == 200
    finally:
        collector.stop()
    last = rig.sentinel()
    assert rig.spy.ids()[before:] == [last]


def test_a_collector_the_broker_acl_forbids_commands_gets_a_502(tmp_path: Path) -> None:
    """With the example ACL, the ``collector`` user may not write ``cmd`` topics: the API says
    so (MQTT 5 PUBACK "not authorized") instead of pretending the command was sent."""
    passwd = tmp_path / "passwd"
    passwd.touch(mode=0o600)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "collector", "pw-collector"],
                   check=True, capture_output=True)  # fmt: skip
    with Mosquitto(tmp_path / "broker", persistence=False, password_file=passwd,
                   extra_conf=f"acl_file {ACL}") as broker:  # fmt: skip
        url = f"mqtt://collector:pw-collector@127.0.0.1:{broker.port}"
        collector = _collector(url, tmp_path, api_token=TOKEN)
        try:
            host, port = collector.http_address_bound()
            api = f"http://{host}:{port}/api/devices/{DEVICE}/commands"
            status, body, _ = call(api, "POST", {"action": "ping"}, token=TOKEN)
        finally:
            collector.stop()
    assert status == 502, body
    assert "not authorized" in body["error"] and "edgeship/+/+/cmd" in body["error"]


# --- binding and the token's sources ------------------------------------------------------------


def test_the_api_binds_loopback_by_default() -> None:
    assert CollectorConfig("mqtt://127.0.0.1").http_address == ("127.0.0.1", 9108)
    assert parse_http_address(":9200") == ("127.0.0.1", 9200)
    assert parse_http_address("9200") == ("127.0.0.1", 9200)
    args = build_parser().parse_args(["collect", "--broker", "mqtt://127.0.0.1"])
    assert parse_http_address(args.http) == ("127.0.0.1", 9108)
    assert args.api_token is None and args.api_token_file is None


def test_a_non_loopback_bind_without_a_token_warns(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for token, warned in ((None, True), (TOKEN, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="collector"):
            config = CollectorConfig(
                rig.broker.url, fleet=FLEET, store_url=f"sqlite:///{tmp_path / 'w.db'}",
                http="0.0.0.0:0", worker="thread", client_id=f"w-{uuid.uuid4().hex[:6]}",
                api_token=token,
            )  # fmt: skip
            with Collector(config) as collector:
                assert collector.http_address_bound()[0] == "0.0.0.0"
        lines = [r.getMessage() for r in caplog.records if "without an API token" in r.getMessage()]
        assert bool(lines) is warned, caplog.text


def test_the_token_comes_from_a_file_the_environment_or_the_option(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert load_api_token(token_file=path, environ={}) == TOKEN
    assert load_api_token(environ={TOKEN_ENV: TOKEN}) == TOKEN
    assert load_api_token(TOKEN, environ={TOKEN_ENV: "ignored-because-given"}) == TOKEN
    assert load_api_token(environ={}) is None
    with pytest.raises(ConfigError, match="give one of them"):
        load_api_token(TOKEN, path, environ={})
    with pytest.raises(ConfigError, match="cannot read it"):
        load_api_token(token_file=tmp_path / "missing", environ={})
    for bad, why in (
        ("short", "at least 16"),
        ("has a space in it, long enough", "at least 16"),
        ("", "is empty"),
        ("two\nlines of token text", "more than one line"),
        ("t\u00f6ken-t\u00f6ken-t\u00f6ken", "printable ASCII"),  # a header is latin-1
    ):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=why):
            load_api_token(token_file=path, environ={})
    with pytest.raises(ConfigError, match="at least 16"):
        CollectorConfig("mqtt://127.0.0.1", api_token="short")


def test_a_token_file_others_can_read_is_accepted_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    for mode, warned in ((0o644, True), (0o640, True), (0o600, False)):
        path.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING):  # one reader of secret files, any logger
            assert load_api_token(token_file=path, environ={}) == TOKEN
        lines = [r.getMessage() for r in caplog.records if "chmod 600" in r.getMessage()]
        assert bool(lines) is warned, (oct(mode), caplog.text)


def test_the_cli_says_one_line_for_a_bad_token(tmp_path: Path) -> None:
    env = {**os.environ, TOKEN_ENV: "short"}
    proc = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "collect", "--broker", "mqtt://127.0.0.1:1",
         "--store", f"sqlite:///{tmp_path / 'x.db'}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "EDGESHIP_API_TOKEN: the API token must be at least 16" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    help_text = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "collect", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "--api-token-file" in help_text and TOKEN_ENV in help_text


def test_concurrent_commands_are_all_sent_once(rig: Rig) -> None:
    """Requests on parallel HTTP threads publish while PUBACKs of the others come in."""
    before = len(rig.spy.ids())
    answers: list[tuple[int, dict[str, Any], Message]] = []
    lock = threading.Lock()

    def post() -> None:
        answer = call(rig.commands_url(), "POST", {"action": "ping"}, token=TOKEN)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=post) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 24 and all(a[0] == 202 for a in answers), answers
    ids = {a[1]["id"] for a in answers}
    assert len(ids) == 24
    assert wait_for(lambda: ids <= set(rig.spy.ids()), 15)
    assert sorted(rig.spy.ids()[before:]) == sorted(ids)


def test_edgeship_fleet_command_sends_and_prints_the_reply(rig: Rig, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # as a user keeps it: a file others can read is used with a warning

    def fleet_command(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sdk.cli", "fleet", "command", "--collector", rig.api, *args],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
            env={k: v for k, v in os.environ.items() if k != TOKEN_ENV} | env,
        )  # fmt: skip

    ok = fleet_command(DEVICE, "ping", "--token-file", str(token_file))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout) == {"pong": True, "boot": rig.agent.boot}
    via_env = fleet_command(DEVICE, "ping", **{TOKEN_ENV: TOKEN})
    assert via_env.returncode == 0, via_env.stderr
    failed = fleet_command(DEVICE, "reboot", "--token-file", str(token_file))
    assert failed.returncode == 1 and "failed: unknown action 'reboot'" in failed.stdout

    before = len(rig.spy.ids())
    token_file.write_text("wrong-" + TOKEN)
    refused = fleet_command(DEVICE, "ping", "--token-file", str(token_file))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "refused the command (401): wrong API token" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    missing = fleet_command(DEVICE, "ping")
    assert missing.returncode == 2 and "no API token" in missing.stderr
    bad_args = fleet_command(DEVICE, "ping", "--args", "[1]", **{TOKEN_ENV: TOKEN})
    assert bad_args.returncode == 2 and "expected a JSON object" in bad_args.stderr
    last = rig.sentinel()
    assert rig.spy.ids()[before:] == [last]


def test_deep_non_finite_and_oversized_bodies_are_refused_and_publish_nothing(rig: Rig) -> None:
    """Deeply nested JSON used to drop the connection with no answer (RecursionError in the
    handler); NaN and duplicate keys were taken as they came. Now each is 400, a body over
    the cap is 413 before it is sent, and none of them publishes anything."""
    before = len(rig.spy.ids())

    def deep(n: int) -> bytes:
        return b'{"action": "ping", "args": {"x": ' + b"[" * n + b"]" * n + b"}}"

    # 100,000 levels take 200 kB: past the 64 KiB cap, refused before reading.
    status, answer, _ = call(rig.commands_url(), "POST", deep(100_000), token=TOKEN)
    assert status == 413, answer
    for body, needle in (
        (deep(30_000), "nests deeper than"),
        (b'{"action": "ping", "args": {"x": NaN}}', "NaN"),
        (b'{"action": "ping", "args": {"x": 1e400}}', "too large"),
        (b'{"action": "ping", "expires_in_s": Infinity}', "Infinity"),
        (b'{"action": "ping", "action": "benchmark"}', "appears twice"),
        (b'{"action": "ping", "args": {"x": "\\udc00"}}', "surrogate"),
        (b'{"action": "ping", "args": {"x": "a\\u0000b"}}', "NUL"),
        (b'{"action": "ping"}\xff', "UTF-8"),
    ):
        status, answer, _ = call(rig.commands_url(), "POST", body, token=TOKEN)
        assert status == 400, (body[:60], answer)
        assert needle in answer["error"], (body[:60], answer)
    path = f"/api/devices/{DEVICE}/commands"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    port = int(rig.api.rsplit(":", 1)[1])
    for head, want in (
        (request("POST", path, headers={**auth, "Content-Length": str(16 * 2**20)}), 413),
        (request("POST", path, headers=auth), 411),
    ):
        [answer] = exchange(port, head, timeout=30)
        assert answer.status == want, answer
    last = rig.sentinel()
    assert rig.spy.ids()[before:] == [last]


def test_half_sent_and_idle_connections_hold_no_thread_and_reads_still_answer(rig: Rig) -> None:
    """The API used ThreadingHTTPServer too: a thread per connection, no timeout. Now 300
    connections (half of them half-sent requests, past the 256-connection cap) hold no thread,
    reads and commands are still answered, and a refused command publishes nothing."""
    before_ids = len(rig.spy.ids())
    port = int(rig.api.rsplit(":", 1)[1])
    assert call(f"{rig.api}/api/health")[0] == 200
    threads = threading.active_count()
    socks = []
    try:
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(sock)
            if i % 2:
                sock.sendall(b"POST /api/devices/pi-1/commands HTTP/1.1\r\nContent-Length: 99\r\n")
        assert threading.active_count() <= threads, (threads, threading.active_count())
        assert call(f"{rig.api}/api/health")[0] == 200
        last = rig.sentinel()
    finally:
        for sock in socks:
            sock.close()
    assert rig.spy.ids()[before_ids:] == [last]
