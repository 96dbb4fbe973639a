"""/metrics: the exposition parses, the histogram is Prometheus-shaped, label values are
escaped, device series expire, counters count what the collector received since it started, and
a real collector's scrape passes Prometheus's own linter (``promtool check metrics``)."""

from __future__ import annotations

import itertools
import math
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from collector.metrics import CONTENT_TYPE
from collector.monitor import Monitor, MonitorConfig
from collector.service import Collector, CollectorConfig
from tests.brokers import ROOT, Mosquitto, wait_for
from tests.collector_helpers import FLEET, Fleet, Publisher, status, window
from tests.script_modules import load_script

MODEL = 'odd"model\\name'


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_exposition_histogram_counters_and_expiry(tmp_path: Path) -> None:
    f = Fleet(tmp_path, MonitorConfig(alerts_db=":memory:", expire_after_s=600.0))
    try:
        f.online("pi-1")
        for _ in range(3):
            f.telemetry("pi-1", n=50, median_ms=3.0, outlier_share=0.2, model=MODEL)
            f.telemetry("pi-2", n=10, median_ms=40.0, temperature=61.5)
            f.tick(10)
        text = f.monitor.metrics_text()
        fams = families(text)
        for name in fams:
            assert name.startswith("edgeship_"), name
        hist = fams["edgeship_device_inference_latency_seconds"]
        by_device: dict[str, list[tuple[float, float]]] = {}
        for s in hist.samples:  # type: ignore[attr-defined]
            if s.name.endswith("_bucket"):
                by_device.setdefault(s.labels["device"], []).append(
                    (float(s.labels["le"]), s.value)
                )
        assert set(by_device) == {"pi-1", "pi-2"}
        for device, n in (("pi-1", 150), ("pi-2", 30)):
            buckets = by_device[device]
            assert buckets[-1] == (math.inf, n)
            assert all(b[1] <= c[1] for b, c in itertools.pairwise(buckets))
            assert len(buckets) == 34  # 33 protocol bounds + Inf
        # 40 ms latencies: nothing at or below le=0.02 s, everything by le=0.1 s.
        le = dict(by_device["pi-2"])
        assert le[0.02] == 0 and le[0.1] == 30
        sums = {s.labels["device"]: s.value for s in hist.samples if s.name.endswith("_sum")}  # type: ignore[attr-defined]
        assert 30 * 0.025 < sums["pi-2"] < 30 * 0.06  # estimated from bucket midpoints
        samples = {
            (s.name, s.labels.get("device")): s.value
            for fam in fams.values()
            for s in fam.samples  # type: ignore[attr-defined]
        }
        assert samples[("edgeship_device_inferences_total", "pi-1")] == 150
        assert samples[("edgeship_device_outliers_total", "pi-1")] == 30
        assert samples[("edgeship_device_temperature_celsius", "pi-2")] == 61.5
        assert samples[("edgeship_device_up", "pi-1")] == 1
        assert 'model="odd\\"model\\\\name"' in text  # escaped in the text...
        models = {s.labels["model"] for s in fams["edgeship_device_up"].samples}  # type: ignore[attr-defined]
        assert models == {MODEL, "digits-cnn"}  # ...and read back unescaped by the parser
        # Silent for longer than expire_after_s: the devices' series are gone.
        f.tick(700)
        fams = families(f.monitor.metrics_text())
        assert not list(fams["edgeship_device_up"].samples)  # type: ignore[attr-defined]
        assert not list(fams["edgeship_device_inference_latency_seconds"].samples)  # type: ignore[attr-defined]
    finally:
        f.close()


def test_alerts_firing_gauge(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    try:
        f.online("pi-1")
        f.telemetry("pi-1")
        f.offline("pi-1")
        f.tick(1)
        fams = families(f.monitor.metrics_text())
        firing = {
            (s.labels["rule"], s.labels["severity"]): s.value
            for s in fams["edgeship_alerts_firing"].samples  # type: ignore[attr-defined]
        }
        assert firing[("offline", "critical")] == 1
        assert firing[("drift", "none")] == 0  # every rule has a series, so a panel can sum
    finally:
        f.close()


@pytest.mark.parametrize("value", [0.0, 1.5, 1e-5, 123456789.0, -12.25])
def test_values_round_trip(value: float, tmp_path: Path) -> None:
    """A gauge's value comes back exact through the library's writer and parser."""
    f = Fleet(tmp_path, MonitorConfig(alerts_db=":memory:"))
    try:
        f.online("pi-1")
        f.telemetry("pi-1", temperature=value)
        f.tick(1)
        fams = families(f.monitor.metrics_text())
        [sample] = fams["edgeship_device_temperature_celsius"].samples  # type: ignore[attr-defined]
        assert sample.value == value
    finally:
        f.close()


def test_the_registry_is_the_monitors_own(tmp_path: Path) -> None:
    """Two monitors in one process do not collide, and the library's default registry (which
    a host application may expose) holds none of the fleet's series."""
    a, b = Fleet(tmp_path / "a"), Fleet(tmp_path / "b")
    try:
        a.online("pi-a")
        a.telemetry("pi-a")
        a.tick(1)
        b.tick(1)
        assert a.monitor.registry is not b.monitor.registry
        assert "pi-a" in a.monitor.metrics_text() and "pi-a" not in b.monitor.metrics_text()
        assert not [m for m in REGISTRY.collect() if m.name.startswith("edgeship_")]
    finally:
        a.close()
        b.close()


def _promtool() -> str:
    """Debian's promtool: installed (apt-get install -y prometheus), or unpacked under .cache/
    by scripts/board_envs.py without installing anything; the test skips only where neither
    is possible (no apt-get, no network), with the reason."""
    path = shutil.which("promtool")
    if path is not None:
        return path
    board_envs = load_script("board_envs", ROOT / "scripts" / "board_envs.py")
    try:
        return str(board_envs.promtool())
    except board_envs.SetupError as exc:
        pytest.skip(f"promtool is absent (Debian: apt-get install -y prometheus): {exc}")


def test_a_real_scrape_passes_promtool(tmp_path: Path) -> None:
    """A collector and its monitor over a real Mosquitto, two devices, a firing alert and a
    dead letter: ``GET /metrics`` parses and ``promtool check metrics`` finds nothing."""
    promtool = _promtool()
    (tmp_path / "broker").mkdir()
    with Mosquitto(tmp_path / "broker", persistence=False) as broker:
        config = CollectorConfig(
            broker.url, fleet=FLEET, store_url=f"sqlite:///{tmp_path / 'fleet.db'}",
            http="127.0.0.1:0", client_id=f"m-{uuid.uuid4().hex[:8]}", worker="thread",
            batch_interval_s=0.02,
        )  # fmt: skip
        rng = np.random.default_rng(1)
        with Collector(config) as collector:
            monitor = Monitor.for_collector(collector, MonitorConfig(interval_s=0.05)).start()
            pub = Publisher(broker.port, FLEET)
            try:
                pub.send(status("pi-1", 0), status("pi-2", 0))
                pub.send(*(window(d, i, rng=rng) for i in (1, 2, 3) for d in ("pi-1", "pi-2")))
                pub.send(status("pi-2", 4, "offline"))  # fires the offline alert
                pub.client.publish(
                    f"edgeship/{FLEET}/pi-1/telemetry", b"{", qos=1
                ).wait_for_publish(5)
                assert wait_for(lambda: monitor.windows_seen(FLEET, "pi-2") == 3, 15)
                assert wait_for(lambda: monitor.engine.firing(), 15)
                assert wait_for(lambda: collector.stats.dead_letters == 1, 15)
                host, port = collector.http_address_bound()
                with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
                    assert r.headers["Content-Type"] == CONTENT_TYPE
                    text = r.read().decode()
            finally:
                pub.close()
                monitor.stop()
    fams = families(text)
    assert fams["edgeship_collector_dead_letters"].samples[0].value == 1  # type: ignore[attr-defined]
    assert {s.labels["device"] for s in fams["edgeship_device_up"].samples} == {"pi-1", "pi-2"}  # type: ignore[attr-defined]
    firing = {s.labels["rule"]: s.value for s in fams["edgeship_alerts_firing"].samples}  # type: ignore[attr-defined]
    assert firing["offline"] == 1
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
