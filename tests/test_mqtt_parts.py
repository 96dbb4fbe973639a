"""The work around the MQTT connection, without a broker: the outbox and the will keeper on a
real spool, with a stand-in for paho's client (test_mqtt.py runs the whole link against real
brokers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.mqtt.outbox import Outbox
from device_agent.mqtt.stats import LinkStats
from device_agent.mqtt.will import WillKeeper
from device_agent.spool import Spool


@dataclass
class _Info:
    rc: int
    mid: int


@dataclass
class _Client:
    """What Outbox uses of paho's Client: publish() returning (rc, mid)."""

    rc: int = paho.MQTT_ERR_SUCCESS
    sent: list[tuple[str, bytes, int]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> _Info:
        if topic.startswith("bad"):
            raise ValueError("paho refuses this topic")
        self.sent.append((topic, payload, qos))
        return _Info(self.rc, len(self.sent))


def _spool(tmp_path: Path) -> Spool:
    boot = tmp_path / "boot_id"
    boot.write_text("11111111-2222-3333-4444-555555555555\n")
    return Spool(tmp_path / "spool.db", 1 << 20, boot_id_path=boot)


_OK = ReasonCode(PacketTypes.PUBACK, "Success")
_REFUSED = ReasonCode(PacketTypes.PUBACK, "Not authorized")


def test_outbox_keeps_the_inflight_bound_and_removes_only_what_was_acked(tmp_path: Path) -> None:
    stats = LinkStats()
    with _spool(tmp_path) as spool:
        for i in range(5):
            spool.put(f"t/{i}", b"x", qos=1)
        outbox, client = Outbox(spool, stats, max_inflight=2), _Client()
        outbox.pump(client)  # type: ignore[arg-type]
        assert [t for t, _, _ in client.sent] == ["t/0", "t/1"] and outbox.inflight == 2
        outbox.pump(client)  # type: ignore[arg-type]
        assert len(client.sent) == 2  # no room until an ack
        outbox.acked(1, _OK)
        outbox.acked(2, _REFUSED)  # out of flight, but kept in the spool for the next connection
        outbox.pump(client)  # type: ignore[arg-type]
        assert [t for t, _, _ in client.sent][2:] == ["t/2", "t/3"]
        assert spool.depth() == 4 and not outbox.flushed()
        snapshot = stats.snapshot()
        assert (snapshot["sent"], snapshot["acked"], snapshot["refused"]) == (4, 1, 1)
        outbox.reset()  # the connection ended: the refused one and t/2 go again, oldest first
        client.sent.clear()
        outbox.pump(client)  # type: ignore[arg-type]
        assert [t for t, _, _ in client.sent] == ["t/1", "t/2"]


def test_outbox_drops_what_paho_can_never_send_and_acks_qos0_on_write(tmp_path: Path) -> None:
    stats = LinkStats()
    with _spool(tmp_path) as spool:
        spool.put("bad/topic", b"x", qos=1)
        spool.put("t/0", b"x", qos=0)
        outbox, client = Outbox(spool, stats, max_inflight=5), _Client()
        outbox.pump(client)  # type: ignore[arg-type]
        assert outbox.flushed() and stats.snapshot()["errors"] == 1
        assert client.sent == [("t/0", b"x", 0)]


def test_outbox_stops_at_a_lost_connection_and_resends_later(tmp_path: Path) -> None:
    with _spool(tmp_path) as spool:
        spool.put("t/0", b"x", qos=1)
        outbox, client = Outbox(spool, LinkStats(), max_inflight=5), _Client(paho.MQTT_ERR_NO_CONN)
        outbox.pump(client)  # type: ignore[arg-type]
        assert outbox.inflight == 0 and spool.depth() == 1


def test_the_will_keeps_its_number_until_a_connection_retires_it(tmp_path: Path) -> None:
    built: list[int] = []

    def build(seq: int) -> bytes:
        built.append(seq)
        return f"offline {seq}".encode()

    with _spool(tmp_path) as spool:
        keeper = WillKeeper(spool, "edgeship/f/d/status", build, LinkStats())
        will_file = Path(f"{spool.path}.will")
        first = keeper.prepare()
        again = keeper.prepare()  # refused connects: the same number, built once
        assert first is again and first is not None and built == [first.seq]
        assert will_file.exists()
        keeper.retire()  # a connection that was accepted ended: the will goes into the spool
        assert not will_file.exists()
        items = spool.peek(10)
        assert [(i.topic, i.payload) for i in items] == [
            ("edgeship/f/d/status", f"offline {first.seq}".encode())
        ]
        nxt = keeper.prepare()
        assert nxt is not None and nxt.seq > first.seq


def test_a_will_left_by_a_crash_is_spooled_on_the_next_start(tmp_path: Path) -> None:
    with _spool(tmp_path) as spool:
        WillKeeper(spool, "edgeship/f/d/status", lambda s: b"off", LinkStats()).prepare()
        assert spool.depth() == 0
        # The process dies here; the next one finds the file.
        fresh = WillKeeper(spool, "edgeship/f/d/status", lambda s: b"new", LinkStats())
        fresh.recover_file()
        assert [i.payload for i in spool.peek(10)] == [b"off"]
        assert not Path(f"{spool.path}.will").exists()
