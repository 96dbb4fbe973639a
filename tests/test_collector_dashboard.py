"""The dashboard, /metrics and the Grafana dashboard against a real test fleet: a real
Mosquitto, a real collector with its monitor, headless Chromium (Debian's ``chromium``, installed
by the ``chromium`` fixture when it is missing and we are root, as on CI).

Acceptance: the dashboard renders the fleet in a browser (every device row, after the page's
script ran; a screenshot is kept in tests/artifacts/), a device page draws its charts, and
every metric the Grafana dashboard's queries name is exported by /metrics."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collector.monitor import Monitor, MonitorConfig
from collector.service import Collector, CollectorConfig
from device_agent.contracts.messages import DeployEvent
from tests.brokers import ROOT, Mosquitto, wait_for
from tests.browser import browse, keep
from tests.collector_helpers import UNIFORM, Publisher, status, window

FLEET = "greenhouse"
GRAFANA = ROOT / "examples" / "grafana" / "edgeship-fleet.json"
SHIFTED = (0.3, 0.3) + (0.05,) * 8
# device -> what it does: a healthy one, a slow one with many outliers, a hot throttled one,
# one that goes offline, one whose predictions shift.
DEVICES = ("pi-kitchen", "pi-garage", "pi-porch", "pi-attic", "pi-shed")


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A collector and monitor watching five devices that published 16 windows each."""
    tmp = tmp_path_factory.mktemp("dashboard")
    with Mosquitto(tmp / "mosquitto") as broker:
        config = CollectorConfig(
            broker_url=broker.url,
            fleet=FLEET,
            store_url=f"sqlite:///{tmp}/fleet.db",
            http="127.0.0.1:0",
            client_id=f"dash-{uuid.uuid4().hex[:8]}",
            batch_interval_s=0.02,
            worker="thread",
            # Stale after an hour of 10 s windows, not 30 s: the module runs Chromium several
            # times and waits for alerts, and its "4 online, 0 stale" must not depend on how
            # fast a busy machine gets through that.
            stale_windows=360.0,
        )
        collector = Collector(config).start()
        monitor = Monitor.for_collector(collector, MonitorConfig(interval_s=0.2)).start()
        pub = Publisher(broker.port, FLEET)
        rng = np.random.default_rng(3)
        try:
            # pi-garage's last remote deploy rolled back: its row carries a badge.
            rolled_back = DeployEvent(
                id="dep-garage", state="rolled_back", ts=time.time(), model="digits-cnn",
                from_version="1", to_version="2", reason="self-test failed",
            )  # fmt: skip
            pub.send(*(status(d, 0) for d in DEVICES if d != "pi-garage"))
            pub.send(dataclasses.replace(status("pi-garage", 0), deploy=rolled_back))
            for i in range(1, 17):
                wave = 1 + 0.3 * math.sin(i / 2.5)
                pub.send(
                    window("pi-kitchen", i, rng=rng, median_ms=6 * wave),
                    window("pi-garage", i, rng=rng, median_ms=24 * wave,
                           outlier_share=0.09 + 0.03 * (i % 3)),
                    window("pi-porch", i, rng=rng, median_ms=9 * wave, temperature=82.5 + i / 10,
                           throttled=0x50005 if i > 8 else 0),
                    window("pi-attic", i, rng=rng, median_ms=11 * wave, temperature=48.0),
                    window("pi-shed", i, rng=rng, median_ms=7 * wave,
                           probs=SHIFTED if i > 12 else UNIFORM),
                )  # fmt: skip
                time.sleep(0.25)
            pub.send(status("pi-attic", 17, "offline"))
            expected = {
                ("pi-attic", "offline"),
                ("pi-garage", "outlier_rate"),
                ("pi-porch", "throttled"),
                ("pi-shed", "drift"),
            }
            assert wait_for(
                lambda: expected <= {(a.device, a.rule) for a in monitor.engine.firing()}, 20
            ), [(a.device, a.rule) for a in monitor.engine.firing()]
            host, port = collector.http_address_bound()
            yield {"url": f"http://{host}:{port}", "monitor": monitor, "collector": collector}
        finally:
            pub.close()
            monitor.stop()
            collector.stop()


def test_dashboard_renders_the_fleet_in_a_browser(
    chromium: str, fleet: dict[str, Any], tmp_path: Path
) -> None:
    url = fleet["url"]
    dom = browse(chromium, url + "/")
    # The script ran: it replaced the server's "rendered by the collector" with its own time.
    assert re.search(r'id="updated"[^>]*>updated \d\d:\d\d:\d\d<', dom), dom[:2000]
    rows = dict(re.findall(r'<tr data-device="([^"]+)" data-fleet="greenhouse">(.*?)</tr>', dom))
    assert set(rows) == set(DEVICES)
    assert 'class="state offline"' in rows["pi-attic"] and "offline" in rows["pi-attic"]
    assert 'class="state online"' in rows["pi-kitchen"]
    assert "digits-cnn@1" in rows["pi-kitchen"]
    assert "throttled" in rows["pi-porch"] and "outlier_rate" in rows["pi-garage"]
    assert "drift" in rows["pi-shed"] and "psi significant" in rows["pi-shed"]
    assert 'class="deploy rolled_back"' in rows["pi-garage"] and "rolled back" in rows["pi-garage"]
    assert "self-test failed" in rows["pi-garage"]  # the reason, in the badge's tooltip
    assert "digits-cnn@1" in rows["pi-garage"] and "deploy " not in rows["pi-kitchen"]
    assert "5 devices: 4 online, 0 stale, 1 offline" in dom
    shot = tmp_path / "dashboard.png"
    browse(chromium, url + "/", screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"\nscreenshot: {keep(shot, 'dashboard.png')}")


def test_device_page_draws_latency_and_outlier_charts(
    chromium: str, fleet: dict[str, Any], tmp_path: Path
) -> None:
    url = f"{fleet['url']}/devices/pi-garage?fleet={FLEET}"
    dom = browse(chromium, url)
    charts = dict(re.findall(r'<div class="chart" id="([a-z-]+)">(.*?)</div>', dom, re.S))
    assert set(charts) == {"latency-chart", "outlier-chart"}
    for name, series in (
        ("latency-chart", ("p50", "p95", "max")),
        ("outlier-chart", ("outlier rate",)),
    ):
        svg = charts[name]
        assert svg.startswith("<svg"), svg[:200]
        for s in series:
            path = re.search(rf'd="([^"]+)"[^>]*data-series="{s}"', svg)
            assert path is not None, (name, s)
            assert path.group(1).count("L") >= 10  # a line through the 16 windows
    assert "outlier_rate" in dom  # its firing alert is listed
    shot = tmp_path / "device.png"
    browse(chromium, url, screenshot=shot)
    assert shot.stat().st_size > 20_000
    print(f"\nscreenshot: {keep(shot, 'dashboard-device.png')}")
    status, _, _ = get(f"{fleet['url']}/")
    assert status == 200
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(f"{fleet['url']}/devices/no-such-device")
    assert missing.value.code == 404


def test_metrics_parse_and_the_grafana_dashboard_uses_only_exported_names(
    fleet: dict[str, Any],
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    status, content_type, body = get(fleet["url"] + "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {s.name for f in families.values() for s in f.samples}
    # The latency histogram: cumulative buckets with le in seconds, +Inf equal to the count.
    hist = families["edgeship_device_inference_latency_seconds"]
    assert hist.type == "histogram"
    for device in DEVICES:
        mine = [s for s in hist.samples if s.labels["device"] == device]
        buckets = [(float(s.labels["le"]), s.value) for s in mine if s.name.endswith("_bucket")]
        assert [b for b, _ in buckets] == sorted(b for b, _ in buckets)
        assert all(a <= b for (_, a), (_, b) in itertools.pairwise(buckets))
        count = next(s.value for s in mine if s.name.endswith("_count"))
        assert buckets[-1] == (math.inf, count) and count == 16 * 100
        assert 0.001 in [b for b, _ in buckets]  # 1 ms is le="0.001"
    up = {s.labels["device"]: s.value for s in families["edgeship_device_up"].samples}
    assert up == {d: (0.0 if d == "pi-attic" else 1.0) for d in DEVICES}
    drift = [
        s for s in families["edgeship_device_drift_psi"].samples if s.labels["device"] == "pi-shed"
    ]
    assert max(s.value for s in drift) >= 0.25

    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    assert dashboard["panels"] and {"list"} <= set(dashboard["templating"])
    queries = []
    for panel in dashboard["panels"]:
        assert {"id", "type", "title", "gridPos", "targets", "datasource"} <= set(panel), panel
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        for target in panel["targets"]:
            assert target["refId"] and target["expr"]
            queries.append(target["expr"])
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    names = {n for q in queries for n in re.findall(r"\bedgeship_[a-z0-9_]+\b", q)}
    assert len(names) >= 12
    # A family with no series yet (no rollout in this fleet) is still declared (HELP, TYPE).
    missing = sorted(names - samples - set(families))
    assert not missing, f"the Grafana dashboard queries metrics /metrics does not export: {missing}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "devices up",
        "p95",
        "outlier rate",
        "temperature",
        "drift",
        "alerts firing",
        "ingest",
    ):
        assert topic in titles


def test_json_api_additions(fleet: dict[str, Any]) -> None:
    base = fleet["url"]
    _, _, body = get(base + "/api/alerts")
    alerts = json.loads(body)
    assert {(a["device"], a["rule"]) for a in alerts["firing"]} >= {("pi-attic", "offline")}
    _, _, body = get(base + "/api/alerts?state=resolved&limit=5")
    assert all(a["state"] == "resolved" for a in json.loads(body)["recent"])
    _, _, body = get(base + "/api/drift")
    drift = json.loads(body)
    assert drift["config"]["significant"] == 0.25
    levels = {d["device"]: d["level"] for d in drift["devices"]}
    assert levels["pi-shed"] == "significant" and levels["pi-kitchen"] == "ok"
    with pytest.raises(urllib.error.HTTPError) as bad:
        get(base + "/api/alerts?state=pending")
    assert bad.value.code == 400
    _, content_type, js = get(base + "/static/dashboard.js")
    assert content_type.startswith("text/javascript") and b"http" not in js.replace(
        b"http://www.w3.org/2000/svg", b""
    )


def test_fleet_status_and_watch_in_the_terminal(fleet: dict[str, Any], capsys: Any) -> None:
    from sdk.cli import main

    assert main(["fleet", "status", "--collector", fleet["url"]]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    assert out.startswith("greenhouse: 5 devices, 4 online, 0 stale, 1 offline;")
    assert lines["DEVICE"].split()[:4] == ["DEVICE", "STATE", "MODEL", "P95"]
    assert set(lines) == {"DEVICE", *DEVICES}
    assert "offline" in lines["pi-attic"] and lines["pi-attic"].rstrip().endswith("offline")
    assert "digits-cnn@1" in lines["pi-kitchen"] and lines["pi-kitchen"].rstrip().endswith("-")
    assert "throttled" in lines["pi-porch"] and "drift" in lines["pi-shed"]
    assert (
        main(["fleet", "watch", "--collector", fleet["url"], "--interval", "0.05", "--count", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("greenhouse: 5 devices") == 2 and "Ctrl-C to stop" in out
    assert main(["fleet", "status", "--collector", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the collector API" in capsys.readouterr().err
