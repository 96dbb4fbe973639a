"""/metrics: the exposition parses, the histogram is Prometheus-shaped, label values are
escaped, device series expire, counters count what the collector received since it started."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.metrics import escape_label
from collector.monitor import MonitorConfig
from tests.collector_helpers import Fleet

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


def test_escape_label() -> None:
    assert escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


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


@pytest.mark.parametrize("value", [0.0, 1.5, 1e-5, 123456789.0])
def test_values_round_trip(value: float, tmp_path: Path) -> None:
    from collector.metrics import _format_value

    assert float(_format_value(value)) == value
