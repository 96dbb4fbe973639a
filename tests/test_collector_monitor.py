"""The monitor beside a real collector: a real Mosquitto, real SQLite, alerts published over
MQTT. Acceptance: a device whose prediction distribution shifts raises a drift alert within 3
windows; an unshifted device over >= 100 windows raises none (both counted and printed)."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from collector.monitor import Monitor, MonitorConfig
from collector.service import Collector, CollectorConfig
from device_agent.contracts.messages import Alert, decode, subscription
from tests.brokers import Mosquitto, wait_for
from tests.collector_helpers import (
    LABELS,
    UNIFORM,
    Publisher,
    gamma_score_counts,
    reference_doc,
    status,
    window,
    write_json,
)

FLEET = "farm"
SHIFTED = (0.3, 0.3) + (0.05,) * 8  # two classes take 60% of the predictions (PSI 0.72)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mosquitto") as b:
        yield b


class AlertListener:
    """Subscribes to edgeship/{fleet}/alerts and decodes what arrives with the contract."""

    def __init__(self, port: int) -> None:
        self.alerts: list[Alert] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"alerts-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            subscription(FLEET, kind="alerts"), qos=1
        )
        self.client.on_subscribe = lambda c, u, mid, rc, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, m: mqtt.MQTTMessage) -> None:
        msg = decode(m.topic, m.payload)
        assert isinstance(msg, Alert) and not m.retain
        self.alerts.append(msg)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_collector(broker: Mosquitto, tmp_path: Path, **monitor: Any) -> tuple[Collector, Monitor]:
    config = CollectorConfig(
        broker_url=broker.url,
        fleet=FLEET,
        store_url=f"sqlite:///{tmp_path}/fleet.db",
        http="127.0.0.1:0",
        client_id=f"test-{uuid.uuid4().hex[:8]}",
        batch_interval_s=0.02,
        worker="thread",
    )
    collector = Collector(config).start()
    mon = Monitor.for_collector(collector, MonitorConfig(interval_s=0.05, **monitor)).start()
    return collector, mon


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("basis", ["reference", "baseline"])
def test_drift_alert_within_three_windows_and_no_false_alarm(
    broker: Mosquitto, tmp_path: Path, basis: str
) -> None:
    rng = np.random.default_rng(42)
    refs: tuple[str, ...] = ()
    if basis == "reference":
        ref = write_json(
            tmp_path / "reference.json",
            reference_doc(dict(zip(LABELS, UNIFORM, strict=True)), gamma_score_counts(rng)),
        )
        refs = (f"digits-cnn@1={ref}",)
    collector, monitor = start_collector(broker, tmp_path, references=refs)
    listener = AlertListener(broker.port)
    pub = Publisher(broker.port, FLEET)
    windows, shift_at = 120, 20
    detected_after: int | None = None
    try:
        pub.send(status("steady", 0), status("shifty", 0))
        for i in range(1, windows + 1):
            shifted = i > shift_at
            pub.send(
                window("steady", i, rng=rng),
                window("shifty", i, rng=rng, probs=SHIFTED if shifted else UNIFORM),
            )
            # One window at a time: wait until the monitor has read and judged this one.
            assert wait_for(
                lambda i=i: (
                    monitor.windows_seen(FLEET, "steady") == i
                    and monitor.windows_seen(FLEET, "shifty") == i
                    and monitor.ticks > 0
                ),
                10,
            ), (i, monitor.windows_seen(FLEET, "steady"), monitor.last_error)
            before = monitor.ticks
            assert wait_for(lambda b=before: monitor.ticks > b, 10)
            firing = {(a.device, a.rule) for a in monitor.engine.firing()}
            if ("shifty", "drift") in firing and detected_after is None:
                assert shifted, f"drift alert before the shift, at window {i}"
                detected_after = i - shift_at
        false_alarms = [a for a in monitor.alert_store.recent(1000) if a.device == "steady"]
        assert wait_for(lambda: any(a.rule == "drift" for a in listener.alerts), 10)
        drift = get(f"http://{':'.join(map(str, collector.http_address_bound()))}/api/drift")
    finally:
        pub.close()
        listener.close()
        monitor.stop()
        collector.stop()
    print(
        f"\ndrift ({basis}): shifted device alerted after {detected_after} windows; "
        f"unshifted device: {len(false_alarms)} alerts over {windows} windows"
    )
    assert detected_after is not None and detected_after <= 3
    assert false_alarms == []
    sent = [a for a in listener.alerts if a.rule == "drift"]
    assert [(a.device, a.state) for a in sent] == [("shifty", "firing")]
    assert sent[0].source.startswith("test-") and sent[0].value is not None
    by_device = {d["device"]: d for d in drift["devices"]}
    assert by_device["shifty"]["level"] == "significant"
    assert by_device["steady"]["level"] == "ok" and by_device["steady"]["basis"] == basis


def test_edgeship_collect_runs_the_monitor(broker: Mosquitto, tmp_path: Path) -> None:
    """The CLI: --reference and --alerts are read before connecting (a bad one is exit 2),
    the monitor serves /metrics and /api/drift on the collector's port, SIGTERM stops both."""
    import os
    import signal
    import subprocess
    import sys

    from tests.brokers import ROOT, free_port

    rng = np.random.default_rng(1)
    ref = write_json(
        tmp_path / "reference.json",
        reference_doc(dict(zip(LABELS, UNIFORM, strict=True)), gamma_score_counts(rng)),
    )
    alerts = ROOT / "examples" / "collector" / "alerts.toml"
    port = free_port()
    cmd = [
        sys.executable, "-m", "sdk.cli", "collect", "--broker", broker.url, "--fleet", FLEET,
        "--store", f"sqlite:///{tmp_path}/fleet.db", "--http", f"127.0.0.1:{port}",
        "--workers", "1", "--client-id", f"cli-{uuid.uuid4().hex[:6]}",
        "--reference", f"digits-cnn@1={ref}", "--alerts", str(alerts),
    ]  # fmt: skip
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "missing.toml")], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "alerts file not found" in bad.stderr
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pub = Publisher(broker.port, FLEET)
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return bool(get(base + "/api/drift")["references"])
            except OSError:
                return False

        assert wait_for(up, 30), proc.stderr.read() if proc.poll() is not None else "no API"
        pub.send(status("pi-1", 0), *(window("pi-1", i, rng=rng) for i in range(1, 5)))
        assert wait_for(lambda: b"edgeship_device_inferences_total{" in urllib.request.urlopen(
            base + "/metrics", timeout=5).read(), 30)  # fmt: skip
        drift = get(base + "/api/drift")
        assert drift["references"][0]["model"] == "digits-cnn"
        assert wait_for(lambda: get(base + "/api/drift")["devices"][0]["basis"] == "reference", 10)
    finally:
        pub.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"dashboard http://127.0.0.1:{port}/" in out and "stopped:" in out


def _served(app: Any) -> tuple[set[tuple[str, str]], set[str]]:
    """((path, method) of every API route, paths of the other routes) of a FastAPI app; a
    ``{name:path}`` parameter is written ``{name}``, as OpenAPI writes it."""
    from fastapi.routing import APIRoute

    api, other = set(), set()
    routes = list(app.routes)
    while routes:
        route = routes.pop()
        included = getattr(route, "original_router", None)  # FastAPI >= 0.13x keeps routers
        if included is not None:
            routes.extend(included.routes)
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        if isinstance(route, APIRoute):
            api |= {(path, m) for m in route.methods}
        else:
            other.add(path)
    return api, other


def test_the_openapi_document_lists_every_route_the_app_serves(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """With and without the monitor: every route served is in /openapi.json (method by
    method), nothing else is, /docs is the Swagger page, and the monitor's routes come and go
    with it (the app is rebuilt from what it serves, not patched)."""
    collector, monitor = start_collector(broker, tmp_path)
    base = f"http://{':'.join(map(str, collector.http_address_bound()))}"
    stopped = False
    server = collector.http_server
    assert server is not None
    try:
        seen: dict[bool, set[tuple[str, str]]] = {}
        for with_monitor in (True, False):
            if not with_monitor:
                monitor.stop()
                stopped = True
            api, other = _served(server.app)
            doc = get(base + "/openapi.json")
            documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
            assert documented == api, documented ^ api
            assert other == {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/docs/assets"}
            seen[with_monitor] = documented
        assert {p for p, _ in seen[True] - seen[False]} == {
            "/", "/index.html", "/devices/{device}", "/metrics", "/api/alerts", "/api/drift",
            "/static/{name}",
        }  # fmt: skip
        assert ("/api/devices/{device}/commands", "POST") in seen[False]
        with urllib.request.urlopen(base + "/docs", timeout=10) as resp:
            page = resp.read().decode()
            assert resp.status == 200 and "swagger" in page.lower()
        # Swagger UI comes from the collector itself, not a CDN: /docs works offline.
        assets = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
        for asset in assets:
            with urllib.request.urlopen(base + asset, timeout=10) as resp:
                assert resp.status == 200 and len(resp.read()) > 500, asset
        try:
            urllib.request.urlopen(base + "/metrics", timeout=10)
            raise AssertionError("/metrics is served without a monitor")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    finally:
        if not stopped:
            monitor.stop()
        collector.stop()
