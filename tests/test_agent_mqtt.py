"""The agent end to end over a real Mosquitto: birth, telemetry, outlier events, a remote
benchmark command, the offline status at close, and no heavy module loaded on the way."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from device_agent import Agent, AgentConfig
from device_agent.contracts import messages as msg
from sdk.remote import remote_benchmark
from tests.brokers import FleetListener

BROKER = "mqtt://127.0.0.1:1883"  # the shared Mosquitto: read and publish only


def test_agent_reports_over_mqtt(digits_bundle: Path, digits_splits: Any, tmp_path: Path) -> None:
    fleet = f"t{uuid.uuid4().hex[:10]}"
    listener = FleetListener(fleet)
    config = AgentConfig(
        device_id="pi-a", fleet=fleet, broker_url=BROKER, window_s=0.5, state_dir=tmp_path / "state"
    )
    clean = digits_splits.x_test[:30]
    noise = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    try:
        with Agent.from_bundle(digits_bundle, config) as agent:
            listener.wait_for(lambda: listener.of(msg.StatusMessage))
            for i in range(len(clean)):
                agent.predict({"image": clean[i : i + 1]})
            for i in range(len(noise)):
                agent.predict({"image": noise[i : i + 1]})
            report = remote_benchmark(BROKER, fleet, "pi-a", min_runs=50, min_seconds=0.2)
            listener.wait_for(
                lambda: sum(t.inferences for t in listener.of(msg.TelemetryMessage)) >= 35
            )
        listener.wait_for(lambda: any(s.state == "offline" for s in listener.of(msg.StatusMessage)))
    finally:
        listener.close()
    status = listener.of(msg.StatusMessage)
    assert status[0].state == "online" and status[0].model == "digits-cnn"
    assert status[0].runtime.startswith("onnxruntime") and status[0].host["cores"]
    telemetry = listener.of(msg.TelemetryMessage)
    assert sum(t.inferences for t in telemetry) == 35  # predict() calls only, not the benchmark
    assert sum(t.errors for t in telemetry) == 0
    assert all(t.latency_ms.histogram.total == t.inferences for t in telemetry)
    events = listener.of(msg.OutlierEvent)
    assert len(events) >= 5 and all(e.score > e.threshold for e in events)
    assert sum(t.outliers for t in telemetry) == len(events)
    seqs = sorted(m.seq for m in listener.messages if hasattr(m, "seq"))
    assert len(seqs) == len(set(seqs)), "a sequence number was used twice"
    assert report["latency_ms"]["p50"] > 0 and report["measured_on"].startswith("device:")
    assert report["runs"] >= 50 and listener.invalid == []


def test_agent_end_to_end_keeps_heavy_modules_out(digits_bundle: Path, tmp_path: Path) -> None:
    """Acceptance: running the agent (ONNX Runtime bundle, MQTT telemetry) imports neither
    torch, the SDK, onnx nor sklearn."""
    fleet = f"t{uuid.uuid4().hex[:10]}"
    script = f"""
import sys, time, numpy as np
from device_agent import Agent, AgentConfig
cfg = AgentConfig(device_id="pi-light", fleet="{fleet}", broker_url="{BROKER}", window_s=0.3,
                  state_dir={str(tmp_path / "state")!r})
with Agent.from_bundle({str(digits_bundle)!r}, cfg) as agent:
    for _ in range(20):
        agent.predict({{"image": np.random.default_rng(0).random((1, 1, 8, 8), np.float32)}})
    deadline = time.monotonic() + 30  # polled: a busy machine may take long to send
    while agent.stats["mqtt"]["acked"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = agent.stats["mqtt"]["acked"]
heavy = [m for m in ("torch", "sdk", "onnx", "sklearn", "tensorflow") if m in sys.modules]
print("acked", sent, "heavy", heavy)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    acked = int(out.stdout.split()[1])
    assert acked >= 2, out.stdout  # the birth and at least one telemetry window went out
    assert out.stdout.strip().endswith("heavy []"), out.stdout
