"""A fleet of simulated devices: one MQTT connection per device, each with its Last Will, a
birth message, and valid telemetry windows with per-device sequence numbers.

For benchmarks, tests and demos of the collector without boards (the command is
:mod:`collector.simulate`)::

    python -m collector.simulate --broker mqtt://localhost --fleet demo --devices 20 \\
        --period 1 --duration 60 --report published.json

Every payload is a valid v1 message (one template per device is checked with
:func:`~device_agent.contracts.messages.encode`; windows then vary only the envelope, the
window times and histograms drawn from fixed, valid variants), so the collector must store
every one of them. :attr:`SimulatedFleet.published` records what the broker acknowledged, per
device, which is what a test compares the store with.

One process holds at most :data:`MAX_DEVICES_PER_PROCESS` devices: paho-mqtt waits on each
connection with ``select()``, which cannot watch a file descriptor above 1023 (``FD_SETSIZE``),
and every device takes three (its socket and the two ends of its loop's wake-up pair). A larger
fleet is refused before anything connects; run several processes with distinct ``--prefix``.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from collector.errors import BrokerError, ConfigError
from device_agent.contracts.broker import BrokerUrl
from device_agent.contracts.messages import (
    LATENCY_BUCKETS_MS,
    SCORE_BUCKETS,
    Histogram,
    LatencySummary,
    StatusMessage,
    TelemetryMessage,
    Throttled,
    encode,
    topic,
)

__all__ = [
    "FDS_PER_DEVICE",
    "FD_SETSIZE",
    "MAX_DEVICES_PER_PROCESS",
    "SimConfig",
    "SimulatedFleet",
]

FD_SETSIZE = 1024  # select() watches file descriptors 0..1023 only
FDS_PER_DEVICE = 3  # the MQTT socket and paho's wake-up socket pair (loop_start)
#: devices one process can hold, leaving 64 descriptors to the interpreter, logs, a broker...
MAX_DEVICES_PER_PROCESS = (FD_SETSIZE - 64) // FDS_PER_DEVICE


def _split_hint(devices: int) -> str:
    processes = -(-devices // MAX_DEVICES_PER_PROCESS)
    return (
        f"run {processes} processes of at most {MAX_DEVICES_PER_PROCESS} devices each, with "
        "distinct --prefix (e.g. --prefix a --devices 250 and --prefix b --devices 250)"
    )


def _raise_nofile_limit(devices: int) -> None:
    """Raise the soft RLIMIT_NOFILE (256 on macOS) towards what ``devices`` need, up to
    FD_SETSIZE: descriptors above it are of no use to select()."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(FD_SETSIZE, 64 + FDS_PER_DEVICE * devices)
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _next_fd() -> int:
    """The descriptor the next socket gets (the lowest free one)."""
    with socket.socket() as probe:
        return probe.fileno()


@dataclass(frozen=True)
class SimConfig:
    """``devices`` devices named ``{prefix}-0000``...; ``keepalive_s`` sets how long the
    broker waits before publishing a silent device's Last Will (1.5 x keepalive)."""

    broker_url: str
    fleet: str = "sim"
    devices: int = 10
    prefix: str = "sim"
    period_s: float = 1.0
    window_s: float | None = None  # default: period_s
    keepalive_s: int = 10
    seed: int = 0
    start_seq: int = 0


@dataclass
class _Device:
    name: str
    boot: str
    client: mqtt.Client
    seq: int
    index: int = 0
    will_seq: int = -1
    templates: list[dict[str, Any]] = field(default_factory=list)
    connected: threading.Event = field(default_factory=threading.Event)
    infos: list[tuple[int, mqtt.MQTTMessageInfo]] = field(default_factory=list)


class SimulatedFleet:
    """``connect()``, then ``publish_round()`` per window (or ``run()``), then ``close()``."""

    def __init__(self, config: SimConfig) -> None:
        if config.devices < 1:
            raise ConfigError(f"devices must be at least 1, got {config.devices}")
        if config.devices > MAX_DEVICES_PER_PROCESS:
            raise ConfigError(
                f"{config.devices} simulated devices do not fit in one process: paho-mqtt's "
                f"select() cannot watch file descriptors above {FD_SETSIZE - 1} and each device "
                f"takes {FDS_PER_DEVICE}; {_split_hint(config.devices)}"
            )
        self.config = config
        self._broker = BrokerUrl.parse(config.broker_url)
        self._rng = random.Random(config.seed)
        self._variants = [self._variant() for _ in range(16)]
        self._devices: list[_Device] = []
        self._lock = threading.Lock()

    # --- payloads ---

    def _variant(self) -> dict[str, Any]:
        """The parts of a window that vary: latency and score histograms, predictions."""
        rng = self._rng
        n = rng.randint(20, 200)
        lat = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        for _ in range(n):
            lat[min(int(rng.gauss(10, 2)), len(lat) - 1)] += 1
        values = sorted(
            LATENCY_BUCKETS_MS[max(i - 1, 0)] for i, c in enumerate(lat) for _ in range(c)
        )
        p = [values[int(q * (n - 1))] for q in (0.5, 0.95, 0.99)]
        scores = [0] * (len(SCORE_BUCKETS) + 1)
        outliers = rng.randint(0, n // 20)
        scores[6] += n - outliers
        scores[12] += outliers
        return {
            "inferences": n,
            "outliers": outliers,
            "latency_ms": LatencySummary(
                Histogram(LATENCY_BUCKETS_MS, tuple(lat)), p[0], p[1], p[2], values[-1]
            ),
            "scores": Histogram(SCORE_BUCKETS, tuple(scores)),
            "predictions": {"cat": n // 2, "dog": n - n // 2},
        }

    def _template(self, d: _Device, variant: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        window = self.config.window_s or self.config.period_s
        msg = TelemetryMessage(
            device=d.name,
            boot=d.boot,
            seq=0,
            ts=now,
            window_start=now - window,
            window_s=window,
            errors=0,
            model="sim-model",
            model_version="1",
            cpu_percent=12.5,
            system_cpu_percent=30.0,
            rss_bytes=48 * 2**20,
            mem_available_bytes=2**30,
            temperature_c=50.0 + self._rng.random() * 10,
            throttled=Throttled(0),
            **variant,
        )
        data: dict[str, Any] = json.loads(encode(msg))  # validated once per template
        return data

    def telemetry_payload(self, d: _Device, seq: int) -> bytes:
        if not d.templates:
            d.templates = [self._template(d, v) for v in self._variants]
        now = time.time()
        window = self.config.window_s or self.config.period_s
        body = dict(d.templates[(seq + d.index) % len(d.templates)])
        body.update(seq=seq, ts=now, window_start=max(now - window, 0.0))
        return json.dumps(body, separators=(",", ":")).encode()

    def _status(self, d: _Device, seq: int, state: str) -> bytes:
        return encode(
            StatusMessage(
                device=d.name,
                boot=d.boot,
                seq=seq,
                ts=time.time(),
                state="online" if state == "online" else "offline",
                agent_version="sim",
                model="sim-model",
                model_version="1",
                runtime="onnxruntime",
                host={"model": "simulated", "arch": "aarch64", "cores": 4},
            )
        )

    # --- lifecycle ---

    def connect(self, timeout_s: float = 30.0) -> SimulatedFleet:
        """Connect every device (will registered, birth published)."""
        cfg = self.config
        _raise_nofile_limit(cfg.devices)
        for i in range(cfg.devices):
            name = f"{cfg.prefix}-{i:04d}"
            if _next_fd() + FDS_PER_DEVICE > FD_SETSIZE:  # descriptors this process holds already
                self.close(goodbye=False)
                raise ConfigError(
                    f"simulated device {name}: its sockets would get file descriptors above "
                    f"{FD_SETSIZE - 1}, which paho-mqtt's select() cannot watch ({i} devices "
                    "connected in this process, which holds other descriptors too); run fewer "
                    "devices per process"
                )
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=f"{cfg.fleet}-{name}-{uuid.uuid4().hex[:6]}",
                protocol=MQTTProtocolVersion.MQTTv311,
            )
            d = _Device(name, uuid.uuid4().hex[:12], client, cfg.start_seq, index=i)
            if self._broker.username is not None:
                client.username_pw_set(self._broker.username, self._broker.password)
            if self._broker.tls:
                client.tls_set()
            client.max_queued_messages_set(0)
            client.reconnect_delay_set(1, 5)
            d.will_seq = self._take(d)
            client.will_set(
                topic(cfg.fleet, name, "status"), self._status(d, d.will_seq, "offline"), 1, True
            )
            client.on_connect = self._on_connect_for(d)
            self._devices.append(d)
            try:
                client.connect(self._broker.host, self._broker.port, cfg.keepalive_s)
            except OSError as exc:
                raise BrokerError(f"simulated device {name}: cannot connect: {exc}") from exc
            client.loop_start()
        deadline = time.monotonic() + timeout_s
        for d in self._devices:
            if not d.connected.wait(max(0.0, deadline - time.monotonic())):
                raise BrokerError(f"simulated device {d.name}: no CONNACK in {timeout_s} s")
        return self

    def _on_connect_for(self, d: _Device) -> Any:
        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            if rc.is_failure:
                return
            seq = self._take(d)
            info = c.publish(topic(self.config.fleet, d.name, "status"),
                             self._status(d, seq, "online"), qos=1, retain=True)  # fmt: skip
            d.infos.append((seq, info))
            d.connected.set()

        return on_connect

    def _take(self, d: _Device) -> int:
        with self._lock:
            seq = d.seq
            d.seq += 1
            return seq

    @property
    def devices(self) -> list[str]:
        return [d.name for d in self._devices]

    def publish_round(self, names: Sequence[str] | None = None) -> int:
        """One telemetry window from every device (or from ``names``); returns how many."""
        sent = 0
        for d in self._devices:
            if names is not None and d.name not in names:
                continue
            seq = self._take(d)
            info = d.client.publish(
                topic(self.config.fleet, d.name, "telemetry"),
                self.telemetry_payload(d, seq),
                qos=1,
            )
            d.infos.append((seq, info))
            sent += 1
        return sent

    def run(self, duration_s: float, stop: threading.Event | None = None) -> int:
        """A window from every device each ``period_s`` for ``duration_s``; rounds published."""
        stop = stop or threading.Event()
        rounds = 0
        start = time.monotonic()
        while time.monotonic() - start < duration_s and not stop.is_set():
            self.publish_round()
            rounds += 1
            next_at = start + rounds * self.config.period_s
            stop.wait(max(0.0, next_at - time.monotonic()))
        return rounds

    def wait_acked(self, timeout_s: float = 60.0) -> bool:
        """Wait until the broker acknowledged every message published so far."""
        deadline = time.monotonic() + timeout_s
        for d in self._devices:
            for _, info in d.infos:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if not info.is_published():
                    try:
                        info.wait_for_publish(left)
                    except (RuntimeError, ValueError):
                        return False
                    if not info.is_published():
                        return False
        return True

    @property
    def published(self) -> dict[str, dict[str, Any]]:
        """Per device: boot and the seqs the broker acknowledged (status and telemetry)."""
        out: dict[str, dict[str, Any]] = {}
        for d in self._devices:
            seqs = sorted(seq for seq, info in d.infos if info.is_published())
            out[d.name] = {"boot": d.boot, "seqs": seqs, "will_seq": d.will_seq}
        return out

    def close(self, *, goodbye: bool = True) -> None:
        """Disconnect every device; ``goodbye`` publishes the prepared offline status first
        (as the agent does), so the will's number is used exactly once."""
        for d in self._devices:
            if goodbye:
                info = d.client.publish(
                    topic(self.config.fleet, d.name, "status"),
                    self._status(d, d.will_seq, "offline"),
                    qos=1,
                    retain=True,
                )
                d.infos.append((d.will_seq, info))
        if goodbye:
            self.wait_acked(30.0)
        for d in self._devices:
            d.client.disconnect()
            d.client.loop_stop()

    def freeze(self, names: Sequence[str]) -> None:
        """Stop these devices' network loops with their sockets open: no pings, no FIN, as
        when a board's network goes away. The broker publishes the will after 1.5 keepalives."""
        for d in self._devices:
            if d.name in names:
                d.client.loop_stop()

    def drop(self, names: Sequence[str]) -> None:
        """Cut these devices' connections without a DISCONNECT: the broker publishes their
        Last Will (a crash or power cut, as the broker sees it)."""
        for d in self._devices:
            if d.name in names:
                d.client.loop_stop()
                sock = d.client.socket()
                if sock is not None:
                    sock.close()
