"""device_agent.mqtt against real brokers: a private Mosquitto per test, amqtt for the fallback.

No mock of paho or of a broker: every test publishes through a real connection and reads the
result with a plain paho subscriber (tests/brokers.py).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.contracts import messages as msg
from device_agent.errors import ConfigError, ProtocolError
from device_agent.mqtt import Backoff, BrokerConfig, Publisher
from device_agent.spool import Spool
from device_agent.telemetry import WindowAggregator
from tests.brokers import (
    MOSQUITTO,
    Amqtt,
    Collector,
    Mosquitto,
    delivery_report,
    producer_process,
    wait_for,
)

pytestmark = pytest.mark.skipif(shutil.which(MOSQUITTO) is None, reason="needs mosquitto")

FLEET = "test"
DEVICE = "dev1"


def status_builder(boot: str, state: Literal["online", "offline"]) -> Callable[[int], bytes]:
    def build(seq: int) -> bytes:
        return msg.encode(
            msg.StatusMessage(
                device=DEVICE,
                boot=boot,
                seq=seq,
                ts=time.time(),
                state=state,
                agent_version="test",
            )
        )

    return build


def telemetry_builder(boot: str, n: int = 3) -> Callable[[int], bytes]:
    agg = WindowAggregator(labels=("a", "b"), seed=0)
    for i in range(n):
        agg.record(0.001 * (i + 1), i % 2, score=0.1 * i)
    fields = agg.close_window()

    def build(seq: int) -> bytes:
        return msg.encode(
            msg.TelemetryMessage(device=DEVICE, boot=boot, seq=seq, ts=time.time(), **fields)
        )

    return build


class Rig:
    """A spool and a publisher for DEVICE; closes both."""

    def __init__(self, tmp_path: Path, url: str, spool: Path | None = None, **kw: Any) -> None:
        self.boot = uuid.uuid4().hex[:12]
        self.spool = Spool(spool or tmp_path / f"spool-{self.boot}.db")
        config_kw = kw.pop("config", {})
        self.config = BrokerConfig.from_url(url, **config_kw)
        kw.setdefault("backoff_min_s", 0.05)
        kw.setdefault("backoff_max_s", 0.5)
        self.pub = Publisher(
            self.config,
            self.spool,
            fleet=FLEET,
            device=DEVICE,
            boot=self.boot,
            birth=status_builder(self.boot, "online"),
            will=status_builder(self.boot, "offline"),
            **kw,
        )

    def close(self, flush_timeout_s: float = 5.0) -> None:
        self.pub.close(flush_timeout_s)
        self.spool.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close(flush_timeout_s=1.0)


def new_rig(rigs: list[Rig], tmp_path: Path, url: str, **kw: Any) -> Rig:
    rig = Rig(tmp_path, url, **kw)
    rigs.append(rig)
    return rig


def statuses(col: Collector) -> list[tuple[msg.StatusMessage, bool]]:
    return [(m, r.retain) for r, m in col.decoded() if isinstance(m, msg.StatusMessage)]


# --- publish, birth, will --------------------------------------------------------------------


def test_publishes_in_order_with_retained_birth_and_offline_on_close(
    broker: Mosquitto, tmp_path: Path
) -> None:
    col = Collector(broker.port, f"edgeship/{FLEET}/#").start()
    rig = Rig(tmp_path, broker.url)
    t0 = time.monotonic()
    rig.pub.start()
    # Waiting for the broker could take up to connect_timeout_s (10 s); the bound is half of
    # that, so a busy machine does not fail it while a blocking start() still would.
    assert time.monotonic() - t0 < 5.0, "start() must not wait for the broker"
    assert wait_for(lambda: rig.pub.connected, 10)
    assert rig.pub.protocol_in_use == "5"

    tele = telemetry_builder(rig.boot)
    seqs = [rig.pub.publish("telemetry", tele) for _ in range(5)]
    reply_seq = rig.pub.reply(
        lambda seq: msg.encode(
            msg.CommandReply(
                device=DEVICE, boot=rig.boot, seq=seq, ts=time.time(), id="c1", ok=True, result=1
            )
        )
    )
    assert seqs == sorted(seqs) and reply_seq > seqs[-1]
    assert col.wait(lambda ms: len(ms) >= 7, 10), col.snapshot()

    got = [m for _, m in col.decoded()]
    assert [m.seq for m in got if isinstance(m, msg.TelemetryMessage)] == seqs
    reply = next(m for m in got if isinstance(m, msg.CommandReply))
    assert (reply.seq, reply.id, reply.ok) == (reply_seq, "c1", True)
    birth = next(m for m in got if isinstance(m, msg.StatusMessage))
    assert (birth.state, birth.boot) == ("online", rig.boot)
    assert wait_for(lambda: rig.spool.depth() == 0, 5)
    stats = rig.pub.stats
    assert stats["acked"] >= 7 and stats["inflight"] == 0 and stats["errors"] == 0

    # A subscriber that comes later learns the state from the retained birth.
    with Collector(broker.port, msg.topic(FLEET, DEVICE, "status"), persistent=False) as late:
        assert late.wait(lambda ms: ms, 5)
        (status, retained), *_ = statuses(late)
        assert retained and status.state == "online" and status.seq == birth.seq

    rig.close()
    assert col.wait(lambda ms: len(ms) >= 8, 10)
    offline = [s for s, _ in statuses(col) if s.state == "offline"]
    assert len(offline) == 1
    # The will's number was reserved at connect, before the birth; close() used it exactly once.
    assert offline[0].seq == birth.seq - 1
    report = delivery_report([m for _, m in col.decoded()], DEVICE)
    print("clean close:", report.line())
    assert report.missing == [] and report.duplicates == 0
    with Collector(broker.port, msg.topic(FLEET, DEVICE, "status"), persistent=False) as late:
        assert late.wait(lambda ms: ms, 5)
        assert statuses(late)[0][0].state == "offline"
    col.stop()


def test_will_is_published_when_the_agent_is_killed_and_resent_by_the_next_run(
    broker: Mosquitto, tmp_path: Path
) -> None:
    col = Collector(broker.port, f"edgeship/{FLEET}/#").start()
    spool = tmp_path / "spool.db"
    with producer_process(spool, broker.url, period_s=0.2) as p:
        assert col.wait(lambda ms: len(ms) >= 3, 20), p.stderr
        first_boot = p.events("started")[0]["boot"]
        p.kill()
    # The broker publishes the will as soon as it sees the TCP connection die.
    assert col.wait(lambda _: any(s.state == "offline" for s, _ in statuses(col)), 10), statuses(
        col
    )
    (online, _), (offline, _) = statuses(col)[0], statuses(col)[-1]
    assert (online.state, offline.state) == ("online", "offline")
    assert offline.boot == online.boot == first_boot
    assert offline.seq == online.seq - 1  # reserved at connect, before the birth
    # It was also kept on disk, so the next run sends it again whatever the broker did.
    assert Path(f"{spool}.will").exists()

    with producer_process(spool, broker.url, period_s=0.2) as p2:
        assert wait_for(lambda: len(p2.windows()) >= 3, 20), p2.stderr
        p2.terminate()
    assert not Path(f"{spool}.will").exists()
    assert col.wait(
        lambda _: (
            [s.state for s, _ in statuses(col)][-1:] == ["offline"]
            and len([s for s, _ in statuses(col) if s.state == "offline"]) >= 3
        ),
        15,
    )
    report = delivery_report([m for _, m in col.decoded()], DEVICE)
    print("kill + restart:", report.line())
    assert report.missing == []
    # The killed run's will arrived twice (the broker's and the re-sent copy): a duplicate.
    keys = [(s.boot, s.seq) for s, _ in statuses(col) if s.state == "offline"]
    assert keys.count((first_boot, offline.seq)) == 2
    col.stop()


# --- protocol fallback -----------------------------------------------------------------------


def test_falls_back_to_mqtt_311_when_the_broker_refuses_v5(tmp_path: Path, rigs: list[Rig]) -> None:
    with Amqtt(tmp_path) as amqtt:
        col = Collector(
            amqtt.port, f"edgeship/{FLEET}/#", protocol=mqtt.MQTTv311, persistent=False
        ).start()
        rig = new_rig(rigs, tmp_path, amqtt.url, config={"connect_timeout_s": 1.0})
        rig.pub.start()
        # amqtt never answers a v5 CONNECT: after connect_timeout_s the publisher tries 3.1.1.
        assert wait_for(lambda: rig.pub.connected, 15), rig.pub.stats
        assert rig.pub.protocol_in_use == "3.1.1"
        assert rig.pub.stats["connect_attempts"] >= 2  # v5 (no answer), then 3.1.1
        seqs = [rig.pub.publish("telemetry", telemetry_builder(rig.boot)) for _ in range(3)]
        assert col.wait(
            lambda _: [m.seq for _, m in col.decoded() if m.KIND == "telemetry"] == seqs, 10
        ), col.snapshot()
        assert any(isinstance(m, msg.StatusMessage) for _, m in col.decoded())

        # Forcing v5 on a 3.1.1-only broker never connects, and says why.
        strict = new_rig(
            rigs, tmp_path, amqtt.url, config={"protocol": "5", "connect_timeout_s": 0.5}
        )
        strict.pub.start()
        assert wait_for(lambda: strict.pub.stats["connect_attempts"] >= 2, 10)
        assert not strict.pub.connected
        assert "no CONNACK" in strict.pub.stats["last_error"]
        col.stop()


def test_protocol_311_connects_to_mosquitto_directly(
    broker: Mosquitto, rigs: list[Rig], tmp_path: Path
) -> None:
    rig = new_rig(rigs, tmp_path, broker.url, config={"protocol": "3.1.1"})
    rig.pub.start()
    assert wait_for(lambda: rig.pub.connected, 10)
    assert rig.pub.protocol_in_use == "3.1.1" and rig.pub.stats["connect_attempts"] == 1


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kw", "match"),
    [
        ("", {}, "empty"),
        ("http://broker:1883", {}, "scheme 'http' is not mqtt or mqtts"),
        ("mqtt://", {}, "no host"),
        ("mqtt://broker:99999", {}, "out of range"),
        ("mqtt://broker:port", {}, "port 'port' is not a number"),
        ("mqtt://broker:0", {}, "port 0"),
        ("mqtt://broker/fleet", {}, "unexpected path"),
        ("mqtt://broker?x=1", {}, "unexpected path"),
        ("mqtt://broker", {"ca_file": "/etc/hostname"}, "use mqtts://"),
        ("mqtt://broker", {"tls_insecure": True}, "use mqtts://"),
        ("mqtts://broker", {"ca_file": "/nonexistent/ca.pem"}, "not a readable file"),
        ("mqtts://broker", {"key_file": "/etc/hostname"}, "without cert_file"),
        ("mqtt://broker", {"protocol": "4"}, "'auto', '5', '3.1.1'"),
        ("mqtt://broker", {"keepalive_s": 0}, "keepalive_s"),
        ("mqtt://broker", {"password": "x"}, "needs a username"),
        ("mqtt://u:p@broker", {"username": "v"}, "both in the URL"),
        ("mqtt://broker", {"connect_timeout_s": 0}, "connect_timeout_s"),
        ("mqtt://broker", {"bogus": 1}, "unexpected options"),
    ],
)
def test_bad_broker_settings_raise_config_error(url: str, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BrokerConfig.from_url(url, **kw)


def test_broker_urls_parse() -> None:
    c = BrokerConfig.from_url("mqtt://hub")
    assert (c.host, c.port, c.tls) == ("hub", 1883, False)
    c = BrokerConfig.from_url("mqtts://hub.example.com")
    assert (c.host, c.port, c.tls) == ("hub.example.com", 8883, True)
    c = BrokerConfig.from_url("MQTT://user:p%40ss@[::1]:1884/")
    assert (c.host, c.port, c.username, c.password) == ("::1", 1884, "user", "p@ss")
    assert "p@ss" not in repr(c)
    with pytest.raises(ConfigError, match="not a readable file") as err:
        BrokerConfig.from_url("mqtts://u:secret@hub", ca_file="/nonexistent")
    assert "secret" not in str(err.value)


def test_publisher_rejects_bad_ids_and_kinds(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        common: dict[str, Any] = {
            "boot": "b1",
            "birth": status_builder("b1", "online"),
            "will": status_builder("b1", "offline"),
        }
        with pytest.raises(ConfigError, match="device"):
            Publisher(BrokerConfig(), spool, fleet="f", device="a/+", **common)
        with pytest.raises(ConfigError, match="max_inflight"):
            Publisher(BrokerConfig(), spool, fleet="f", device="d", max_inflight=0, **common)
        pub = Publisher(BrokerConfig(), spool, fleet="f", device="d", **common)
        with pytest.raises(ProtocolError, match="cmd"):
            pub.publish("cmd", lambda seq: b"{}")
        assert spool.depth() == 0
        pub.close()


# --- outage at start, bounded in-flight ------------------------------------------------------


def test_unreachable_broker_at_start_spools_then_drains_in_order(
    tmp_path: Path, rigs: list[Rig]
) -> None:
    broker = Mosquitto(tmp_path / "broker")
    # Register the subscriber's persistent session, then take the broker away.
    with broker, Collector(broker.port, f"edgeship/{FLEET}/#", client_id="col"):
        pass

    rig = new_rig(rigs, tmp_path, broker.url)
    t0 = time.monotonic()
    rig.pub.start()
    assert time.monotonic() - t0 < 5.0  # a start() that waited would take connect_timeout_s
    # The first attempt reserved the will's number (0); later ones reuse it.
    assert wait_for(lambda: rig.pub.stats["connect_attempts"] >= 2, 5)
    tele = telemetry_builder(rig.boot)
    seqs = []
    for i in range(10):
        seqs.append(rig.pub.publish("telemetry", tele))
        assert rig.spool.depth() == i + 1
    assert wait_for(lambda: rig.pub.stats["connect_attempts"] >= 5, 5)
    assert not rig.pub.connected
    assert "refused" in rig.pub.stats["last_error"]
    assert seqs == list(range(1, 11))
    assert rig.pub.publish("telemetry", tele) == 11  # no attempt took a number since
    seqs.append(11)

    with broker:
        assert wait_for(lambda: rig.pub.connected, 10), rig.pub.stats
        with Collector(broker.port, f"edgeship/{FLEET}/#", client_id="col") as col:
            assert col.wait(lambda _: len(col.seqs("telemetry")) >= 11, 10), col.seqs()
            assert col.seqs("telemetry") == seqs
            assert wait_for(lambda: rig.spool.depth() == 0, 5)
            rig.close()
            assert col.wait(lambda _: [s.state for s, _ in statuses(col)][-1:] == ["offline"], 10)
            report = delivery_report([m for _, m in col.decoded()], DEVICE)
            print("start without broker:", report.line())
            assert report.missing == [] and report.duplicates == 0


def test_close_without_a_broker_keeps_the_offline_status_for_the_next_run(
    tmp_path: Path, rigs: list[Rig]
) -> None:
    broker = Mosquitto(tmp_path / "broker")
    with broker, Collector(broker.port, f"edgeship/{FLEET}/#", client_id="col"):
        pass  # the subscriber's session, for later
    spool_path = tmp_path / "spool.db"
    first = Rig(tmp_path, broker.url, spool_path, backoff_max_s=0.2)
    first.pub.start()
    seqs = [first.pub.publish("telemetry", telemetry_builder(first.boot)) for _ in range(2)]
    assert wait_for(lambda: first.pub.stats["connect_attempts"] >= 2, 5)
    t0 = time.monotonic()
    first.close(flush_timeout_s=60.0)
    # A close that waited for the flush would take 60 s; 20 s leaves a busy machine room.
    assert time.monotonic() - t0 < 20.0, "no connection: nothing to wait for"
    assert not Path(f"{spool_path}.will").exists()

    with broker, Collector(broker.port, f"edgeship/{FLEET}/#", client_id="col") as col:
        second = Rig(tmp_path, broker.url, spool_path)
        rigs.append(second)
        second.pub.start()
        assert col.wait(lambda _: len(statuses(col)) >= 2, 10), col.snapshot()
        (offline, _), (online, _) = statuses(col)[:2]
        assert (offline.state, offline.boot) == ("offline", first.boot)
        assert (online.state, online.boot) == ("online", second.boot)
        assert col.seqs("telemetry") == seqs
        assert offline.seq < seqs[0] and online.seq == seqs[-1] + 2  # +1 is the new will


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_close_that_cannot_flush_lets_the_broker_publish_the_will(
    broker: Mosquitto, tmp_path: Path, rigs: list[Rig], protocol: str
) -> None:
    col = Collector(broker.port, f"edgeship/{FLEET}/#").start()
    rig = new_rig(rigs, tmp_path, broker.url, config={"protocol": protocol})
    rig.pub.start()
    assert wait_for(lambda: rig.pub.connected and rig.spool.depth() == 0, 10)
    broker.pause()
    try:
        rig.pub.publish("telemetry", telemetry_builder(rig.boot))
        t0 = time.monotonic()
        rig.pub.close(flush_timeout_s=1.0)
        # The flush timeout (1 s) bounds it; a close that waited on the paused broker would
        # only give up after the join's backstop (1 + connect_timeout_s 10 + 5 s).
        assert time.monotonic() - t0 < 10.0
        # Unsent: the telemetry and the offline status wait in the spool for the next run.
        assert rig.spool.depth() == 2
    finally:
        broker.resume()
    # The connection ended without a clean DISCONNECT, so the broker publishes the will.
    assert col.wait(lambda _: any(s.state == "offline" for s, _ in statuses(col)), 10)
    col.stop()


def test_inflight_is_bounded_while_the_broker_does_not_ack(
    broker: Mosquitto, tmp_path: Path, rigs: list[Rig]
) -> None:
    col = Collector(broker.port, f"edgeship/{FLEET}/#").start()
    rig = new_rig(rigs, tmp_path, broker.url, max_inflight=4)
    rig.pub.start()
    assert wait_for(lambda: rig.pub.connected and rig.spool.depth() == 0, 10)
    sent_before = rig.pub.stats["sent"]
    broker.pause()  # SIGSTOP: the socket still takes bytes, nothing is acknowledged
    try:
        tele = telemetry_builder(rig.boot)
        seqs = [rig.pub.publish("telemetry", tele) for _ in range(30)]
        assert wait_for(lambda: rig.pub.stats["sent"] - sent_before >= 4, 5)
        time.sleep(0.5)
        stats = rig.pub.stats
        assert stats["inflight"] == 4 and stats["sent"] - sent_before == 4, stats
        assert rig.spool.depth() == 30
    finally:
        broker.resume()
    assert wait_for(lambda: rig.spool.depth() == 0, 10), rig.pub.stats
    assert col.wait(lambda _: len(col.seqs("telemetry")) >= 30, 10)
    assert col.seqs("telemetry") == seqs
    col.stop()


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    top = Backoff(0.5, 30.0, Top())
    assert [top.next_delay() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    top.reset()
    assert top.next_delay() == 0.5

    rng = Backoff(0.5, 30.0, random.Random(7))
    delays = [rng.next_delay() for _ in range(200)]
    assert all(0 <= d <= min(30.0, 0.5 * 2**i) for i, d in enumerate(delays))
    assert max(delays[10:]) > 20 and min(delays[10:]) < 5  # jitter spans the whole range
    with pytest.raises(ConfigError):
        Backoff(0, 1)


# --- commands --------------------------------------------------------------------------------


def test_commands_reach_the_handler_on_a_worker_and_bad_ones_are_counted(
    broker: Mosquitto, tmp_path: Path, rigs: list[Rig]
) -> None:
    cmd_topic = msg.topic(FLEET, DEVICE, "cmd")
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="operator")
    sender.connect("127.0.0.1", broker.port)
    sender.loop_start()

    def send(payload: bytes, retain: bool = False) -> None:
        sender.publish(cmd_topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def command(cid: str, action: str = "ping") -> bytes:
        return msg.encode(msg.Command(id=cid, action=action, ts=time.time(), args={"n": 1}))

    # A retained command waiting on the broker must not run when the device subscribes.
    send(command("stale"), retain=True)

    got: list[tuple[msg.Command, str]] = []
    arrived = threading.Event()

    def on_command(cmd: msg.Command) -> None:
        if cmd.action == "boom":
            raise RuntimeError("handler bug")
        got.append((cmd, threading.current_thread().name))
        arrived.set()

    rig = new_rig(rigs, tmp_path, broker.url, on_command=on_command)
    rig.pub.start()
    assert wait_for(lambda: rig.pub.connected, 10)
    # The subscription is made right after CONNACK; ping until the first command gets through.
    assert wait_for(lambda: send(command(f"p{time.monotonic_ns()}")) or arrived.is_set(), 10)
    send(b"", retain=True)  # clear the retained one

    got.clear()
    send(b"not json")
    send(telemetry_builder("x")(1))  # a telemetry payload on the cmd topic: wrong kind
    send(json.dumps({"v": 1, "kind": "cmd", "ts": 1, "id": "x", "action": "RUN!"}).encode())
    send(command("c-boom", "boom"))
    send(command("c1"))
    assert wait_for(lambda: any(c.id == "c1" for c, _ in got), 10)
    stats = rig.pub.stats
    # the stale retained one, the cleared (empty) retained message, and the three malformed
    assert stats["invalid_commands"] == 5, stats
    assert stats["command_errors"] == 1
    cmd, thread = got[-1]
    assert (cmd.id, cmd.action, dict(cmd.args)) == ("c1", "ping", {"n": 1})
    assert thread == "edgeship-mqtt-commands"
    assert all(c.id != "stale" for c, _ in got)
    assert rig.pub.connected
    sender.loop_stop()
    sender.disconnect()


# --- TLS and authentication ------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca_and_server_cert(d: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", f"{name}.crt", "-CAkey", f"{name}.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext",
             cwd=d)  # fmt: skip
    return d / f"{name}.crt", d / "server.crt", d / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_tls_and_password(tmp_path: Path, rigs: list[Rig]) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path / "pki")
    other_ca, _, _ = make_ca_and_server_cert(tmp_path / "other", "other")
    passwd = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), "agent", "s3cret"],
        check=True,
        capture_output=True,
    )
    tls_conf = f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    with Mosquitto(tmp_path / "broker", extra_conf=tls_conf, password_file=passwd) as b:
        url = f"mqtts://localhost:{b.port}"
        good = new_rig(
            rigs,
            tmp_path,
            url,
            config={"ca_file": str(ca), "username": "agent", "password": "s3cret"},
        )
        wrong_pw = new_rig(
            rigs,
            tmp_path,
            url,
            config={"ca_file": str(ca), "username": "agent", "password": "nope"},
        )
        wrong_ca = new_rig(
            rigs,
            tmp_path,
            url,
            config={"ca_file": str(other_ca), "username": "agent", "password": "s3cret"},
        )
        for rig in (good, wrong_pw, wrong_ca):
            rig.pub.start()
        assert wait_for(lambda: good.pub.connected and good.spool.depth() == 0, 10)
        good.pub.publish("telemetry", telemetry_builder(good.boot))
        assert wait_for(lambda: good.spool.depth() == 0, 5)
        assert wait_for(lambda: wrong_pw.pub.stats["connect_attempts"] >= 2, 10)
        assert wait_for(lambda: wrong_ca.pub.stats["connect_attempts"] >= 2, 10)
        assert not wrong_pw.pub.connected and not wrong_ca.pub.connected
        assert "refused" in wrong_pw.pub.stats["last_error"].lower()
        assert "check username and password" in wrong_pw.pub.stats["last_error"]
        assert "certificate verify failed" in wrong_ca.pub.stats["last_error"]

    with pytest.raises(ConfigError, match="TLS files"):
        Rig(tmp_path, "mqtts://localhost:1", config={"ca_file": str(passwd)})
