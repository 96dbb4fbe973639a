"""The fleet's MQTT security, against a real Mosquitto with TLS and the documented ACL.

The broker runs ``examples/raspberry_pi/mosquitto/acl`` itself (not a copy), behind a TLS
listener whose CA, server and client certificates :mod:`tests.pki` makes for each run. Two
ways to say who a client is, each a parametrized broker:

* ``password``: a password per user (``mosquitto_passwd``), sent inside TLS;
* ``certificate``: ``require_certificate`` + ``use_identity_as_username``: the client
  certificate's CN is the user name (whatever the CONNECT packet says).

What the tests prove, with real clients (paho, the agent's :class:`Publisher`, a real
:class:`Agent`):

* a device publishes its own status / telemetry / outliers / replies, and nothing under another
  device's topics or on any ``cmd`` topic: MQTT 5 clients get "not authorized" (135) in the
  PUBACK, and the collector user never receives the refused messages (a sentinel published
  after them arrives first, so the negative is not a timing guess);
* a device subscribed to ``edgeship/+/B/cmd`` or ``edgeship/#`` receives its own commands and
  none of another device's commands or data, while that device receives its own;
* a client without credentials (no password / no client certificate), with a wrong password
  or a certificate from another CA, a client trusting another CA, and a plaintext client on
  the TLS port are all refused;
* a real agent with ``broker_url = mqtts://...`` and its device id as user name reports
  telemetry the collector user receives, and answers an operator's command.

docs/security.md says what the ACL guarantees, from these tests.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import Agent, AgentConfig
from device_agent.contracts import messages as msg
from tests.brokers import AckClient, Mosquitto, wait_for
from tests.pki import CertificateAuthority, Issued

ROOT = Path(__file__).resolve().parents[1]
ACL = ROOT / "examples" / "raspberry_pi" / "mosquitto" / "acl"
FLEET = "f"
A, B = "dev-a", "dev-b"
USERS = (A, B, "collector", "operator")
NOT_AUTHORIZED = 135  # MQTT 5 reason code, in PUBACK and CONNACK
BAD_CREDENTIALS = 134  # MQTT 5 CONNACK "bad user name or password"
MODES = ("password", "certificate")


def password_of(user: str) -> str:
    return f"pw-{user}-{user[::-1]}"


@dataclass
class Pki:
    ca: CertificateAuthority
    server: Issued
    clients: dict[str, Issued]
    other_ca: CertificateAuthority
    rogue: Issued  # CN=dev-a, signed by other_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(root / "ca")
    other = CertificateAuthority.create(root / "other", common_name="another CA")
    return Pki(
        ca=ca,
        server=ca.issue_server(),
        clients={user: ca.issue_client(user) for user in USERS},
        other_ca=other,
        rogue=other.issue_client(A, name="rogue"),
    )


@dataclass
class Fleet:
    """A TLS Mosquitto with the example ACL, and how each user logs in to it."""

    mode: str
    broker: Mosquitto
    pki: Pki

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.broker.port}"

    def credentials(self, user: str) -> dict[str, Any]:
        """The agent's / BrokerConfig's settings for ``user``."""
        if self.mode == "password":
            return {
                "username": user,
                "password": password_of(user),
                "ca_file": str(self.pki.ca.cert),
            }
        issued = self.pki.clients[user]
        return {
            "ca_file": str(self.pki.ca.cert),
            "cert_file": str(issued.cert),
            "key_file": str(issued.key),
        }

    def client(
        self, user: str, *, protocol: int = mqtt.MQTTv5, username: str | None = None
    ) -> Client:
        """A connected client logged in as ``user`` (``username`` overrides the name in CONNECT)."""
        c = Client(protocol)
        if self.mode == "password":
            c.client.username_pw_set(username or user, password_of(user))
            c.client.tls_set(ca_certs=str(self.pki.ca.cert))
        else:
            if username is not None:
                c.client.username_pw_set(username, "ignored")
            issued = self.pki.clients[user]
            c.client.tls_set(
                ca_certs=str(self.pki.ca.cert), certfile=str(issued.cert), keyfile=str(issued.key)
            )
        c.connect(self.broker.port)
        return c


@contextlib.contextmanager
def tls_broker(mode: str, pki: Pki, work: Path, acl: Path) -> Iterator[Fleet]:
    """A Mosquitto with a TLS listener, ``acl`` and the ``mode``'s way to log in."""
    work.mkdir(parents=True, exist_ok=True)
    passwd = work / "passwd"
    passwd.touch(mode=0o600)
    # In the certificate mode the password file holds only a user nobody uses: the CN decides,
    # and the file keeps allow_anonymous false (as in edgeship.conf).
    for user in USERS if mode == "password" else ("unused",):
        subprocess.run(
            ["mosquitto_passwd", "-b", str(passwd), user, password_of(user)],
            check=True,
            capture_output=True,
        )
    conf = [
        f"cafile {pki.ca.cert}",
        f"certfile {pki.server.cert}",
        f"keyfile {pki.server.key}",
        "tls_version tlsv1.2",
        f"acl_file {acl}",
    ]
    if mode == "certificate":
        conf += ["require_certificate true", "use_identity_as_username true"]
    broker = Mosquitto(work, persistence=False, extra_conf="\n".join(conf), password_file=passwd)
    with broker:
        yield Fleet(mode, broker, pki)


@pytest.fixture(scope="module", params=MODES)
def fleet(
    request: pytest.FixtureRequest, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """The example ACL as it is."""
    mode: str = request.param
    with tls_broker(mode, pki, tmp_path_factory.mktemp(f"broker-{mode}"), ACL) as fleet:
        yield fleet


class Client(AckClient):
    """A paho client that records CONNACK, PUBACK and SUBACK reason codes and messages."""

    def __init__(self, protocol: int = mqtt.MQTTv5) -> None:
        self.protocol = protocol
        super().__init__(
            mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=f"t-{uuid.uuid4().hex[:10]}",
                protocol=protocol,
            )
        )
        self.connack: int | None = None
        self.closed = threading.Event()
        self.connected = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.closed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = rc.value
        self.connected.set()

    def _on_message(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((m.topic, bytes(m.payload)))

    def connect(self, port: int) -> None:
        self.client.connect("localhost", port, 10)
        self.client.loop_start()
        assert self.connected.wait(10), "no CONNACK"
        assert self.connack == 0, f"refused: {self.connack}"

    def received(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def wait_payload(self, payload: bytes, timeout: float = 10) -> bool:
        return wait_for(lambda: any(p == payload for _, p in self.received()), timeout)


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def t(device: str, kind: msg.Kind) -> str:
    return msg.topic(FLEET, device, kind)


def sentinel() -> bytes:
    return f'{{"sentinel": "{uuid.uuid4().hex}"}}'.encode()


# --- publishing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["v5", "v3.1.1"])
def test_a_device_publishes_only_under_its_own_topics(
    fleet: Fleet, clients: list[Client], protocol: int
) -> None:
    collector = fleet.client("collector")
    clients.append(collector)
    assert collector.subscribe("edgeship/#") == 1
    device = fleet.client(A, protocol=protocol)
    clients.append(device)

    own = {t(A, kind) for kind in ("status", "telemetry", "outliers", "cmd/reply")}
    refused = {t(B, kind) for kind in ("status", "telemetry", "outliers", "cmd/reply", "cmd")}
    refused |= {t(A, "cmd"), msg.topic(FLEET, None, "alerts"), f"edgeship/other/{B}/telemetry"}
    refused.add(msg.topic(FLEET, None, "rollouts"))  # a device cannot fake a rollout's state
    for topic in sorted(own):
        assert device.publish(topic) < 128, topic
    for topic in sorted(refused):
        code = device.publish(topic)
        # MQTT 5 says why; 3.1.1 has no reason codes: Mosquitto acknowledges and drops.
        assert code == (NOT_AUTHORIZED if protocol == mqtt.MQTTv5 else 0), topic
    last = sentinel()
    assert device.publish(t(A, "status"), last) < 128
    assert collector.wait_payload(last), "the collector did not receive the device's sentinel"
    topics = {topic for topic, _ in collector.received()}
    assert topics == own, f"delivered though refused: {sorted(topics - own)}"


def test_the_user_name_in_connect_does_not_choose_the_identity(
    fleet: Fleet, clients: list[Client]
) -> None:
    """Password mode: B's name with A's password is refused. Certificate mode: the CN decides,
    so A's certificate with user name B in CONNECT is still A, and cannot publish as B."""
    if fleet.mode == "password":
        outcome = attempt(fleet, user=B, password=password_of(A))
        assert outcome == ("connack", BAD_CREDENTIALS) or outcome == ("connack", NOT_AUTHORIZED)
        return
    collector = fleet.client("collector")
    clients.append(collector)
    assert collector.subscribe("edgeship/#") == 1
    impostor = fleet.client(A, username=B)
    clients.append(impostor)
    assert impostor.publish(t(B, "telemetry")) == NOT_AUTHORIZED
    last = sentinel()
    assert impostor.publish(t(A, "telemetry"), last) < 128  # it is A
    assert collector.wait_payload(last)
    assert {topic for topic, _ in collector.received()} == {t(A, "telemetry")}


# --- reading ------------------------------------------------------------------------------------


def test_a_device_reads_only_its_own_commands(fleet: Fleet, clients: list[Client]) -> None:
    a, b, operator, collector = (fleet.client(u) for u in (A, B, "operator", "collector"))
    clients += [a, b, operator, collector]
    # Mosquitto grants every subscription and checks read access per delivered message.
    for pattern in (f"edgeship/+/{B}/cmd", f"edgeship/{FLEET}/{B}/#", "edgeship/#"):
        assert a.subscribe(pattern) == 1, pattern
    assert b.subscribe(t(B, "cmd")) == 1
    assert collector.subscribe("edgeship/#") == 1

    # B's data, through the broker before the operator's sentinel (the collector has it).
    data = sentinel()
    assert b.publish(t(B, "telemetry"), data) < 128
    assert collector.wait_payload(data)

    for_b = msg.encode(msg.Command(id="for-b", action="ping", ts=time.time()))
    assert operator.publish(t(B, "cmd"), for_b) < 128
    for_a = msg.encode(msg.Command(id="for-a", action="ping", ts=time.time()))
    assert operator.publish(t(A, "cmd"), for_a) < 128  # after B's, from the same client
    assert b.wait_payload(for_b), "B did not receive its own command"
    assert a.wait_payload(for_a), "A did not receive its own command"
    assert {topic for topic, _ in a.received()} == {t(A, "cmd")}
    assert for_b not in {p for _, p in a.received()}
    assert {topic for topic, _ in b.received()} == {t(B, "cmd")}
    assert for_a not in {p for _, p in b.received()}

    # A cannot command B (nor itself); B receives only the operator's next command.
    assert a.publish(t(B, "cmd"), b'{"forged": true}') == NOT_AUTHORIZED
    assert a.publish(t(A, "cmd"), b'{"forged": true}') == NOT_AUTHORIZED
    after = msg.encode(msg.Command(id="after", action="ping", ts=time.time()))
    assert operator.publish(t(B, "cmd"), after) < 128
    assert b.wait_payload(after)
    assert b'{"forged": true}' not in {p for _, p in b.received() + a.received()}

    # The collector reads everything but commands nobody; the operator writes no device data.
    assert collector.publish(t(B, "cmd")) == NOT_AUTHORIZED
    assert operator.publish(t(B, "telemetry")) == NOT_AUTHORIZED
    # A rollout (edgeship deploy --fleet) publishes its state; the collector does not.
    assert operator.publish(msg.topic(FLEET, None, "rollouts")) < 128
    assert collector.publish(msg.topic(FLEET, None, "rollouts")) == NOT_AUTHORIZED


# --- who may connect ----------------------------------------------------------------------------


def attempt(
    fleet: Fleet,
    *,
    user: str | None = None,
    password: str | None = None,
    ca: Path | bool | None = True,
    cert: Issued | None = None,
) -> tuple[str, Any]:
    """One connection attempt: ("connack", code), ("tls", error) or ("closed", None)."""
    c = Client()
    if user is not None:
        c.client.username_pw_set(user, password)
    if ca is not False:
        ca_file = fleet.pki.ca.cert if ca is True else ca
        c.client.tls_set(
            ca_certs=str(ca_file),
            certfile=str(cert.cert) if cert else None,
            keyfile=str(cert.key) if cert else None,
        )
    try:
        c.client.connect("localhost", fleet.broker.port, 10)
    except ssl.SSLError as exc:
        return "tls", exc
    c.client.loop_start()
    try:
        wait_for(lambda: c.connected.is_set() or c.closed.is_set(), 10)
    finally:
        c.client.loop_stop()
        c.client.disconnect()
    if c.connack is not None:
        return "connack", c.connack
    return "closed", None


def test_clients_without_valid_credentials_are_refused(fleet: Fleet) -> None:
    if fleet.mode == "password":
        assert attempt(fleet) == ("connack", NOT_AUTHORIZED)  # no user name: anonymous
        assert attempt(fleet, user=A)[0] == "connack"  # no password
        assert attempt(fleet, user=A)[1] in (BAD_CREDENTIALS, NOT_AUTHORIZED)
        assert attempt(fleet, user=A, password="wrong")[1] in (BAD_CREDENTIALS, NOT_AUTHORIZED)
        assert attempt(fleet, user="mallory", password="x")[1] in (BAD_CREDENTIALS, NOT_AUTHORIZED)
        # The right password for a device works: the refusals above are about the credentials.
        assert attempt(fleet, user=A, password=password_of(A)) == ("connack", 0)
    else:
        # No client certificate, or one from another CA: the TLS handshake fails (TLS 1.2:
        # inside connect(); a broker allowing TLS 1.3 would close right after it instead).
        for cert in (None, fleet.pki.rogue):
            outcome = attempt(fleet, user=A, password=password_of(A), cert=cert)
            assert outcome[0] in ("tls", "closed"), outcome
        assert attempt(fleet, cert=fleet.pki.clients[A]) == ("connack", 0)

    # Trusting another CA: the broker's certificate fails verification, nothing is sent.
    kind, error = attempt(fleet, user=A, password=password_of(A), ca=fleet.pki.other_ca.cert,
                          cert=fleet.pki.clients[A])  # fmt: skip
    assert kind == "tls" and "certificate verify failed" in str(error), error
    # Plaintext MQTT on the TLS port: the broker closes without a CONNACK.
    assert attempt(fleet, user=A, password=password_of(A), ca=False) == ("closed", None)


def test_the_agents_publisher_is_refused_with_a_wrong_ca(fleet: Fleet, tmp_path: Path) -> None:
    from device_agent.mqtt import BrokerConfig, Publisher
    from device_agent.spool import Spool

    settings = {**fleet.credentials(A), "ca_file": str(fleet.pki.other_ca.cert)}
    spool = Spool(tmp_path / "spool.db")
    publisher = Publisher(
        BrokerConfig.from_url(fleet.url, **settings),
        spool,
        fleet=FLEET,
        device=A,
        boot="b" * 16,
        birth=lambda seq: b"{}",  # never sent: the connection fails first
        will=lambda seq: b"{}",
        backoff_min_s=0.1,
        backoff_max_s=0.5,
    )
    publisher.start()
    try:
        assert wait_for(lambda: publisher.stats["connect_attempts"] >= 2, 10), publisher.stats
        assert not publisher.connected
        assert "certificate verify failed" in str(publisher.stats["last_error"])
    finally:
        publisher.close(flush_timeout_s=0.5)
        spool.close()


# --- the real agent -----------------------------------------------------------------------------


def test_agent_over_mqtts_as_its_device_id(
    fleet: Fleet, clients: list[Client], digits_bundle: Path, digits_splits: Any, tmp_path: Path
) -> None:
    collector = fleet.client("collector")
    operator = fleet.client("operator")
    clients += [collector, operator]
    assert collector.subscribe("edgeship/#") == 1
    config = AgentConfig(
        device_id=A,
        fleet=FLEET,
        broker_url=fleet.url,
        window_s=0.3,
        state_dir=tmp_path / "state",
        **fleet.credentials(A),
    )
    digits = digits_splits.x_test[:10]
    with Agent.from_bundle(digits_bundle, config) as agent:
        assert wait_for(lambda: agent.stats["mqtt"]["connected"], 15), agent.stats["mqtt"]
        for i in range(len(digits)):
            agent.predict({"image": np.ascontiguousarray(digits[i : i + 1])})

        def inferences() -> int:
            return sum(
                m.inferences
                for topic, payload in collector.received()
                if topic == t(A, "telemetry")
                for m in [msg.decode(topic, payload)]
                if isinstance(m, msg.TelemetryMessage)
            )

        assert wait_for(lambda: inferences() >= len(digits), 15), collector.received()
        command = msg.Command(id=f"c-{uuid.uuid4().hex[:8]}", action="ping", ts=time.time())
        assert operator.publish(t(A, "cmd"), msg.encode(command)) < 128

        def reply() -> msg.CommandReply | None:
            for topic, payload in collector.received():
                if topic == t(A, "cmd/reply"):
                    m = msg.decode(topic, payload)
                    if isinstance(m, msg.CommandReply) and m.id == command.id:
                        return m
            return None

        assert wait_for(reply, 15), collector.received()
        answer = reply()
        assert answer is not None and answer.ok and answer.result["pong"] is True
        assert agent.stats["mqtt"]["refused"] == 0  # the ACL let every message of the agent through
    assert inferences() == len(digits)
    assert {topic.split("/")[2] for topic, _ in collector.received()} == {A}


# --- the collector service as the collector user ------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_collector_service_over_mqtts_stores_and_commands_with_the_acls_opt_in_line(
    pki: Pki, digits_bundle: Path, tmp_path: Path, mode: str
) -> None:
    """``edgeship collect`` logs in as ``collector`` over TLS (password in the URL, or its
    client certificate), stores what the agent reports, and with the ACL's commented
    ``topic write edgeship/+/+/cmd`` line enabled sends the agent a command through its API."""
    from collector.service import Collector, CollectorConfig

    text = ACL.read_text()
    line = "#topic write edgeship/+/+/cmd"
    assert line in text, "the ACL lost its opt-in line for the collector's commands"
    acl = tmp_path / "acl"
    acl.write_text(text.replace(line, line[1:]))
    token = "api-" + uuid.uuid4().hex
    with tls_broker(mode, pki, tmp_path / "broker", acl) as fleet:
        creds = fleet.credentials("collector")
        url = f"mqtts://localhost:{fleet.broker.port}"
        if mode == "password":
            url = f"mqtts://collector:{creds.pop('password')}@localhost:{fleet.broker.port}"
            creds.pop("username")
        config = CollectorConfig(
            url, fleet=FLEET, store_url=f"sqlite:///{tmp_path / 'fleet.db'}", http="127.0.0.1:0",
            worker="thread", client_id="collector-1", api_token=token, **creds,
        )  # fmt: skip
        agent_config = AgentConfig(
            device_id=A, fleet=FLEET, broker_url=fleet.url, window_s=0.3,
            state_dir=tmp_path / "state", **fleet.credentials(A),
        )  # fmt: skip
        with Collector(config) as collector, Agent.from_bundle(digits_bundle, agent_config):
            assert wait_for(lambda: collector.stats.subscribed, 10), collector.health()
            assert wait_for(lambda: collector.state.device(A) is not None, 15), collector.health()
            host, port = collector.http_address_bound()
            request = urllib.request.Request(
                f"http://{host}:{port}/api/devices/{A}/commands",
                data=b'{"action": "ping"}',
                method="POST",
                headers={"Authorization": f"Bearer {token}"},
            )
            with urllib.request.urlopen(request, timeout=20) as resp:
                assert resp.status == 202
                sent = json.loads(resp.read())

            def state() -> str:
                url = f"http://{host}:{port}{sent['reply_url']}"
                with urllib.request.urlopen(url, timeout=10) as resp:
                    return str(json.loads(resp.read())["state"])

            assert wait_for(lambda: state() == "replied", 15), state()
            assert collector.stats.dead_letters == 0
