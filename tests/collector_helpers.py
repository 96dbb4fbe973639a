"""Helpers for the collector's monitor tests: valid telemetry windows built from chosen
distributions, a fake clock, a store fed through the real ingest path, and a publisher that
sends windows over MQTT one at a time."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

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

if TYPE_CHECKING:
    from collector.monitor import MonitorConfig
    from device_agent.contracts.messages import Alert

LABELS = tuple(str(i) for i in range(10))
UNIFORM = tuple([0.1] * 10)


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def latency_counts(
    rng: np.random.Generator, n: int, median_ms: float
) -> tuple[list[int], list[float]]:
    """n latencies around median_ms (lognormal), binned on the protocol's buckets."""
    values = rng.lognormal(np.log(median_ms), 0.25, n)
    counts = np.bincount(
        np.searchsorted(LATENCY_BUCKETS_MS, values, side="left"),
        minlength=len(LATENCY_BUCKETS_MS) + 1,
    )
    return [int(c) for c in counts], sorted(float(v) for v in values)


def window(
    device: str,
    seq: int,
    *,
    rng: np.random.Generator,
    n: int = 100,
    probs: Sequence[float] = UNIFORM,
    labels: Sequence[str] = LABELS,
    score_shift: float = 0.0,
    outlier_share: float = 0.0,
    median_ms: float = 8.0,
    boot: str = "boot0",
    ts: float | None = None,
    model: str = "digits-cnn",
    version: str = "1",
    temperature: float | None = 55.0,
    throttled: int | None = 0,
    window_s: float = 10.0,
    drops: int = 0,
    dropped: int = 0,
) -> TelemetryMessage:
    """One valid telemetry window: predictions drawn from ``probs``, scores from a gamma
    distribution (shifted by ``score_shift``), ``outlier_share`` of them above 5."""
    now = time.time() if ts is None else ts
    preds = rng.multinomial(n, np.asarray(probs) / np.sum(probs))
    outliers = round(n * outlier_share)
    scores = np.concatenate(
        [rng.gamma(2.0, 0.5, n - outliers) + score_shift, 5.5 + rng.random(outliers)]
    )
    score_counts = np.bincount(
        np.searchsorted(SCORE_BUCKETS, scores, side="left"), minlength=len(SCORE_BUCKETS) + 1
    )
    lat, values = latency_counts(rng, n, median_ms)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return TelemetryMessage(
        device=device,
        boot=boot,
        seq=seq,
        ts=now,
        window_start=max(0.0, now - window_s),
        window_s=window_s,
        inferences=n,
        errors=0,
        latency_ms=LatencySummary(
            Histogram(LATENCY_BUCKETS_MS, tuple(lat)), pick(0.5), pick(0.95), pick(0.99), values[-1]
        ),
        outliers=outliers,
        scores=Histogram(SCORE_BUCKETS, tuple(int(c) for c in score_counts)),
        predictions={label: int(c) for label, c in zip(labels, preds, strict=True) if c},
        model=model,
        model_version=version,
        cpu_percent=20.0,
        system_cpu_percent=30.0,
        rss_bytes=50 * 2**20,
        mem_available_bytes=2**30,
        temperature_c=temperature,
        throttled=None if throttled is None else Throttled(throttled),
        spool_depth=0,
        spool_dropped=dropped,
        drops_since_last=drops,
    )


def status(
    device: str,
    seq: int,
    state: str = "online",
    *,
    boot: str = "boot0",
    model: str = "digits-cnn",
    version: str = "1",
    ts: float | None = None,
) -> StatusMessage:
    return StatusMessage(
        device=device, boot=boot, seq=seq, ts=time.time() if ts is None else ts,
        state="online" if state == "online" else "offline", agent_version="test",
        model=model, model_version=version, runtime="onnxruntime",
        host={"model": "Raspberry Pi 4 Model B Rev 1.4", "arch": "aarch64", "cores": 4},
    )  # fmt: skip


def store_messages(store: Any, fleet: str, messages: Sequence[Any], received_at: float) -> None:
    """Store ``messages`` through the collector's real ingest path."""
    from collector.ingest import DeadLetter, Ignored, ingest

    records = []
    for m in messages:
        result = ingest(topic(fleet, m.device, m.KIND), encode(m), received_at, fleet=fleet)
        assert not isinstance(result, DeadLetter | Ignored), result
        records.append(result)
    store.insert_batch(records)


def reference_doc(
    probs: Mapping[str, float], score_counts: Sequence[int], samples: int = 5000
) -> dict[str, Any]:
    """A reference.json document with these prediction shares and score counts."""
    return {
        "format": "edgeship.reference",
        "version": 1,
        "created": "",
        "model": "digits-cnn",
        "model_version": "1",
        "dataset": "test",
        "samples": samples,
        "predictions": dict(probs),
        "prediction_counts": {k: round(v * samples) for k, v in probs.items()},
        "scores": {
            "detector": "test",
            "threshold": 5.0,
            "bounds": list(SCORE_BUCKETS),
            "counts": list(score_counts),
            "quantiles": {},
            "outlier_rate": 0.0,
        },
    }


def gamma_score_counts(rng: np.random.Generator, n: int = 20000) -> list[int]:
    s = rng.gamma(2.0, 0.5, n)
    c = np.bincount(
        np.searchsorted(SCORE_BUCKETS, s, side="left"), minlength=len(SCORE_BUCKETS) + 1
    )
    return [int(v) for v in c]


class Publisher:
    """Publishes messages for several devices over one MQTT connection, each acknowledged
    (QoS 1) before :meth:`send` returns."""

    def __init__(self, broker_port: int, fleet: str) -> None:
        self.fleet = fleet
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-pub-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: connected.set()
        self.client.connect("127.0.0.1", broker_port, 30)
        self.client.loop_start()
        if not connected.wait(10):
            raise RuntimeError("test publisher: no CONNACK")

    def send(self, *messages: Any, retain_status: bool = True) -> None:
        infos = []
        for m in messages:
            retain = retain_status and m.KIND == "status"
            infos.append(
                self.client.publish(
                    topic(self.fleet, m.device, m.KIND), encode(m), qos=1, retain=retain
                )
            )
        for info in infos:
            info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


FLEET = "farm"


class Fleet:
    """A store, its fleet state and a monitor, all on one fake clock; ``sent`` collects the
    published alerts."""

    def __init__(self, tmp: Path, config: MonitorConfig | None = None, **kw: Any) -> None:
        from collector.monitor import Monitor, MonitorConfig
        from collector.state import FleetState, StateConfig
        from collector.store import open_store

        self.clock = FakeClock()
        self.store = open_store(f"sqlite:///{tmp}/fleet.db")
        self.state = FleetState(
            self.store, fleet=FLEET, config=StateConfig(cache_s=0.0), clock=self.clock
        )
        self.sent: list[tuple[str, Alert]] = []
        self.config = config or MonitorConfig(alerts_db=str(tmp / "alerts.db"))
        self.monitor = Monitor(
            self.state, self.store, self.config, clock=self.clock,
            publish=lambda fleet, alert: self.sent.append((fleet, alert)), **kw,
        )  # fmt: skip
        self.rng = np.random.default_rng(0)
        self.seq: dict[str, int] = {}

    def next_seq(self, device: str) -> int:
        self.seq[device] = self.seq.get(device, -1) + 1
        return self.seq[device]

    def online(self, device: str) -> None:
        store_messages(
            self.store,
            FLEET,
            [status(device, self.next_seq(device), ts=self.clock())],
            self.clock(),
        )

    def offline(self, device: str) -> None:
        store_messages(
            self.store,
            FLEET,
            [status(device, self.next_seq(device), "offline", ts=self.clock())],
            self.clock(),
        )

    def telemetry(self, device: str, **kw: Any) -> None:
        m = window(device, self.next_seq(device), rng=self.rng, ts=self.clock(), **kw)
        store_messages(self.store, FLEET, [m], self.clock())

    def tick(self, advance: float = 10.0) -> list[tuple[str, str | None, str]]:
        """Advance the clock, evaluate; the (state, device, rule) of alerts sent this tick."""
        self.clock.advance(advance)
        before = len(self.sent)
        self.state.invalidate()
        self.monitor.tick()
        return [(a.state, a.device, a.rule) for _, a in self.sent[before:]]

    def close(self) -> None:
        self.monitor.stop()
        self.store.close()


def write_json(path: Path, data: Any) -> Path:
    import json

    path.write_text(json.dumps(data))
    return path
