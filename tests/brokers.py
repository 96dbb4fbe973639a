"""Test helpers for the MQTT tests: private brokers, a collecting subscriber, a stand-in agent.

* :class:`Mosquitto`: a test-owned ``mosquitto -c <conf>`` on a free port (persistence in the
  test's directory, anonymous access unless a password file is given) that a test can stop,
  kill and restart on the same port. The shared broker on 127.0.0.1:1883 is never touched.
* :class:`Amqtt`: an embedded amqtt broker (MQTT 3.1.1 only) in a subprocess, for the
  protocol fallback.
* :class:`Collector`: a plain paho subscriber with a persistent session that records every
  message it receives, and :func:`delivery_report` for duplicates and gaps.
* :class:`FleetListener`: every message of one fleet, decoded, with waits on what arrived.
* :class:`AckClient`: a paho client recording its PUBACK and SUBACK reason codes (ACL tests).
* ``python -m tests.brokers produce ...``: a stand-in for the agent (Spool + Publisher +
  WindowAggregator) that publishes one telemetry window per period and prints one JSON line per
  window, for the outage tests that SIGKILL it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from device_agent.contracts import messages as msg
from device_agent.errors import ProtocolError

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- brokers ----------------------------------------------------------------------------------


class Mosquitto:
    """A private Mosquitto on ``port`` with its config, data and log under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        persistence: bool = True,
        extra_conf: str = "",
        password_file: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            # As root Mosquitto would switch to the "mosquitto" user, which cannot write here.
            f"user {getpass.getuser()}",
            "allow_anonymous false" if password_file else "allow_anonymous true",
            f"password_file {password_file}" if password_file else "",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            # No limit on what waits for a persistent subscriber during an outage.
            "max_queued_messages 0",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            extra_conf,
        ]
        self.conf.write_text("\n".join(line for line in lines if line) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        if self.proc is not None and self.proc.poll() is None:
            return self
        proc = self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if not wait_for(lambda: port_open(self.port) or proc.poll() is not None, timeout):
            raise RuntimeError(f"mosquitto did not open port {self.port} in {timeout} s")
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"mosquitto exited with {proc.returncode}: {err}{self.log_text()}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Mosquitto saves its persistence database and closes every connection."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        self._signal(signal.SIGKILL, timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        if proc.stderr:
            proc.stderr.close()
        wait_for(lambda: not port_open(self.port), 5.0)

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its sockets but answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.resume()
        self.stop()


_AMQTT_SCRIPT = """
import asyncio, logging, sys
from amqtt.broker import Broker
logging.basicConfig(level=logging.WARNING)
port = int(sys.argv[1])
config = {
    "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
}
async def main():
    broker = Broker(config)
    await broker.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


class Amqtt:
    """An amqtt broker (MQTT 3.1.1 only) in a subprocess on a free port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log = Path(workdir) / "amqtt.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def __enter__(self) -> Amqtt:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _AMQTT_SCRIPT, str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if not wait_for(lambda: port_open(self.port), 30.0):
            self.__exit__()
            raise RuntimeError(f"amqtt did not start: {self.log.read_text(errors='replace')}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# --- the subscriber ---------------------------------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    t: float  # time.monotonic() at arrival

    @property
    def data(self) -> dict[str, Any]:
        return dict(json.loads(self.payload))


class Collector:
    """A plain paho subscriber recording everything on ``pattern``.

    With ``persistent=True`` (default) it keeps a broker session (MQTT 5 clean_start=False and
    a session expiry, or 3.1.1 clean_session=False), so a broker with persistence on queues what
    arrives while the collector is disconnected, across a broker restart too. paho's own
    automatic reconnect brings it back after an outage.
    """

    def __init__(
        self,
        port: int,
        pattern: str,
        *,
        client_id: str | None = None,
        protocol: int = mqtt.MQTTv5,
        persistent: bool = True,
    ) -> None:
        self.port = port
        self.pattern = pattern
        self.protocol = protocol
        self.persistent = persistent
        self.client_id = client_id or f"collector-{random.getrandbits(32):08x}"
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        v5 = protocol == mqtt.MQTTv5
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            clean_session=None if v5 else not persistent,
        )
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            return
        if self.protocol == mqtt.MQTTv5:
            # Retained messages only for a new subscription: a persistent session that
            # reconnects gets what was queued for it, not the retained status once more.
            client.subscribe(self.pattern, options=SubscribeOptions(qos=1, retainHandling=1))
        else:
            client.subscribe(self.pattern, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(
                Received(m.topic, bytes(m.payload), bool(m.retain), time.monotonic())
            )

    def start(self, timeout: float = 10.0) -> Collector:
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if self.persistent else 0
            self.client.connect(
                "127.0.0.1", self.port, 10, clean_start=not self.persistent, properties=props
            )
        else:
            self.client.connect("127.0.0.1", self.port, 10)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            raise RuntimeError("collector: no SUBACK")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def decoded(self) -> list[tuple[Received, msg.Message]]:
        """Every non-empty message, decoded with the contract's strict decoder."""
        return [(r, msg.decode(r.topic, r.payload)) for r in self.snapshot() if r.payload]

    def seqs(self, kind: str | None = None) -> list[int]:
        """Envelope seqs in arrival order (duplicates included)."""
        out = []
        for _, m in self.decoded():
            if kind is not None and kind != m.KIND:
                continue
            seq = getattr(m, "seq", None)
            if seq is not None:
                out.append(int(seq))
        return out

    def wait(self, predicate: Callable[[list[Received]], Any], timeout: float) -> bool:
        return wait_for(lambda: predicate(self.snapshot()), timeout)


class FleetListener:
    """Every message of one fleet on a broker (the shared Mosquitto unless told), decoded with
    the contract's strict decoder as it arrives. What does not decode is kept in ``invalid``
    (the error's text) rather than taken for a message; ``raw`` keeps (topic, payload) of each
    decoded one, for feeding the collector's ingest."""

    def __init__(self, fleet: str, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.messages: list[msg.Message] = []
        self.raw: list[tuple[str, bytes]] = []
        self.invalid: list[str] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(msg.subscription(fleet), qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        assert ready.wait(10), "listener: no SUBACK"

    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        if not m.payload:
            return
        try:
            decoded = msg.decode(m.topic, m.payload)
        except ProtocolError as exc:
            with self._lock:
                self.invalid.append(str(exc))
            return
        with self._lock:
            self.messages.append(decoded)
            self.raw.append((m.topic, bytes(m.payload)))

    def of(self, kind: type) -> list[Any]:
        with self._lock:
            return [m for m in self.messages if isinstance(m, kind)]

    def raw_snapshot(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.raw)

    def wait_for(self, cond: Callable[[], Any], timeout: float = 20) -> Any:
        """Poll ``cond`` until it is truthy and return what it returned; AssertionError naming
        the kinds received so far if ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = cond()
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"timed out; got {[type(m).__name__ for m in self.messages]}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class AckClient:
    """A paho client, built by the caller (protocol, credentials, TLS), that records the reason
    codes of its PUBACKs and SUBACKs: what a broker's ACL said to each publish and subscribe."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.acks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        client.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc.value)
        client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.__setitem__(
            mid, [r.value for r in rcs]
        )

    def publish(self, topic: str, payload: bytes = b"{}") -> int:
        """Publish at QoS 1; the PUBACK's reason code (always 0 under MQTT 3.1.1)."""
        info = self.client.publish(topic, payload, qos=1)
        assert wait_for(lambda: info.mid in self.acks, 10), f"no PUBACK for {topic}"
        return self.acks[info.mid]

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1; the SUBACK's reason code (128 or more: refused)."""
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        assert wait_for(lambda: mid in self.subacks, 10), f"no SUBACK for {topic}"
        return self.subacks[mid][0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class DeliveryReport:
    """What a collector saw of one device, after dedupe by (device, boot, seq)."""

    received: int  # messages with an envelope, duplicates included
    unique: int
    duplicates: int
    first_seq: int | None
    last_seq: int | None
    missing: list[int] = field(default_factory=list)  # numbers between first and last never seen

    def line(self) -> str:
        return (
            f"received={self.received} unique={self.unique} duplicates={self.duplicates} "
            f"seq {self.first_seq}..{self.last_seq} gaps={len(self.missing)}"
        )


def delivery_report(messages: list[msg.Message], device: str) -> DeliveryReport:
    keys: set[tuple[str, str, int]] = set()
    seqs: set[int] = set()
    received = 0
    for m in messages:
        if isinstance(m, msg.Command | msg.Alert) or m.device != device:
            continue
        received += 1
        keys.add((device, m.boot, m.seq))
        seqs.add(m.seq)
    first, last = (min(seqs), max(seqs)) if seqs else (None, None)
    missing = [] if first is None or last is None else sorted(set(range(first, last + 1)) - seqs)
    return DeliveryReport(received, len(keys), received - len(keys), first, last, missing)


# --- the stand-in agent -----------------------------------------------------------------------


@contextlib.contextmanager
def producer_process(
    spool: Path,
    url: str,
    *,
    device: str = "dev1",
    fleet: str = "test",
    period_s: float = 0.5,
    max_bytes: int = 32 * 1024 * 1024,
    backoff_max_s: float = 2.0,
    extra: tuple[str, ...] = (),
) -> Iterator[Producer]:
    """Run ``python -m tests.brokers produce`` and read its JSON lines on a thread."""
    cmd = [
        sys.executable, "-m", "tests.brokers", "produce",
        "--spool", str(spool), "--url", url, "--fleet", fleet, "--device", device,
        "--period", str(period_s), "--max-bytes", str(max_bytes),
        "--backoff-max", str(backoff_max_s), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    producer = Producer(proc)
    try:
        yield producer
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        producer.join()


class Producer:
    """The stand-in agent's process and the lines it printed so far."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            rec = json.loads(line)
            rec["t_recv"] = time.monotonic()
            with self._lock:
                self.lines.append(rec)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.stderr.append(line)

    def events(self, event: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.lines if r["event"] == event]

    def windows(self) -> list[dict[str, Any]]:
        return self.events("window")

    def terminate(self, timeout: float = 20.0) -> dict[str, Any]:
        """SIGTERM (the producer closes its publisher cleanly); its final stats line."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        self.join()
        closed = self.events("closed")
        if not closed:
            raise RuntimeError(f"producer did not close cleanly: {''.join(self.stderr)[-3000:]}")
        return closed[-1]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.join()

    def join(self) -> None:
        for t in self._threads:
            t.join(5)


def fill_disk_at(limit: int) -> None:
    """A full disk for this process: files it writes cannot grow past ``limit`` bytes
    (RLIMIT_FSIZE with SIGXFSZ ignored, so writes fail with EFBIG as they would with ENOSPC);
    SIGUSR1 lifts the limit (space freed)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    def lift(*_: Any) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))

    signal.signal(signal.SIGUSR1, lift)


def _produce(argv: list[str]) -> int:
    """The stand-in agent: one telemetry window every ``--period`` seconds until SIGTERM."""
    import uuid

    from device_agent.errors import EdgeshipError
    from device_agent.mqtt import BrokerConfig, Publisher
    from device_agent.spool import Spool
    from device_agent.telemetry import WindowAggregator

    p = argparse.ArgumentParser(prog="tests.brokers produce")
    p.add_argument("--spool", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--fleet", default="test")
    p.add_argument("--device", default="dev1")
    p.add_argument("--period", type=float, default=0.5)
    p.add_argument("--max-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--backoff-max", type=float, default=2.0)
    p.add_argument("--protocol", default="auto")
    p.add_argument("--connect-timeout", type=float, default=5.0)
    p.add_argument("--keepalive", type=int, default=5)
    p.add_argument(
        "--fsize-limit",
        type=int,
        help="a full disk: files this process writes stop growing at this many bytes "
        "(RLIMIT_FSIZE, SIGXFSZ ignored, so writes fail with EFBIG); SIGUSR1 lifts it",
    )
    p.add_argument(
        "--clock-file",
        help="a wall-clock step: on SIGUSR2, time.time() moves by the seconds in this file",
    )
    args = p.parse_args(argv)
    if args.fsize_limit is not None:
        fill_disk_at(args.fsize_limit)
    if args.clock_file is not None:
        real_time, offset = time.time, [0.0]
        clock_file = Path(args.clock_file)

        def step(*_: Any) -> None:
            offset[0] = float(clock_file.read_text())

        signal.signal(signal.SIGUSR2, step)
        time.time = lambda: real_time() + offset[0]

    def emit(event: str, **data: Any) -> None:
        print(json.dumps({"event": event, "t": time.time(), **data}), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    boot = uuid.uuid4().hex[:16]
    spool = Spool(args.spool, max_bytes=args.max_bytes)

    def status(state: str) -> Callable[[int], bytes]:
        def build(seq: int) -> bytes:
            return msg.encode(
                msg.StatusMessage(
                    device=args.device,
                    boot=boot,
                    seq=seq,
                    ts=time.time(),
                    state=state,
                    agent_version="test",
                    model=None,
                    model_version=None,
                    runtime=None,
                    host={},
                )
            )

        return build

    publisher = Publisher(
        BrokerConfig.from_url(
            args.url,
            protocol=args.protocol,
            keepalive_s=args.keepalive,
            connect_timeout_s=args.connect_timeout,
        ),
        spool,
        fleet=args.fleet,
        device=args.device,
        boot=boot,
        birth=status("online"),
        will=status("offline"),
        backoff_min_s=0.1,
        backoff_max_s=args.backoff_max,
    )
    emit("started", boot=boot, pid=os.getpid(), depth=spool.depth(), dropped=spool.dropped_total)
    publisher.start()
    agg = WindowAggregator(labels=("a", "b"), seed=0)
    rng = random.Random(0)
    mark = spool.dropped_total
    # A fixed rate (next_at += period), as an agent's windows are: one window's work, or a
    # busy machine, does not push every later window back.
    next_at = time.monotonic() + args.period
    while not stop.wait(max(0.0, next_at - time.monotonic())):
        next_at += args.period
        for _ in range(rng.randint(1, 20)):
            agg.record(rng.uniform(0.001, 0.05), rng.randint(0, 1), score=rng.random())
        fields = agg.close_window()
        dropped = spool.dropped_total
        since, mark = dropped - mark, dropped
        depth = spool.depth()  # read before put_message: its builder runs under the spool's lock

        payload = functools.partial(
            _telemetry_payload, args.device, boot, fields, depth, dropped, since
        )

        try:
            seq = publisher.publish("telemetry", payload)
        except EdgeshipError as exc:  # as the agent does: count it, keep going
            agg.record_error(fields["errors"] + 1)  # the lost window's errors, and itself
            mark = dropped - since  # these drops were not reported: the next window does
            emit(
                "window_failed", error=str(exc), depth=spool.depth(), connected=publisher.connected
            )
            continue
        emit(
            "window",
            seq=seq,
            depth=spool.depth(),
            dropped=spool.dropped_total,
            drops_since_last=since,
            connected=publisher.connected,
        )
    publisher.close(flush_timeout_s=10.0)
    emit("closed", depth=spool.depth(), dropped=spool.dropped_total, stats=publisher.stats)
    spool.close()
    return 0


def _telemetry_payload(
    device: str, boot: str, fields: Any, depth: int, dropped: int, since: int, seq: int
) -> bytes:
    return msg.encode(
        msg.TelemetryMessage(
            device=device,
            boot=boot,
            seq=seq,
            ts=time.time(),
            **fields,
            spool_depth=depth,
            spool_dropped=dropped,
            drops_since_last=since,
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "produce":
        sys.exit(_produce(sys.argv[2:]))
    sys.exit("usage: python -m tests.brokers produce --spool PATH --url URL [...]")
