"""The README's main job, shortened: `edgeship demo --duration 30` on a machine with no broker
configured (it starts the embedded one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_fleet_catches_corrupted_inputs(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdk.cli",
            "demo",
            "--duration",
            "30",
            "--workdir",
            str(work),
            "--http",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Traceback" not in out.stderr
    summary = json.loads((work / "demo-summary.json").read_text())
    print(
        json.dumps(
            {k: summary[k] for k in ("total", "caught_rate", "false_alarm_rate", "devices_online")},
            indent=1,
        )
    )
    assert summary["devices_online"] == 3
    assert summary["total"]["injected"] >= 50 and summary["total"]["clean"] >= 200
    assert summary["caught_rate"] >= 0.90
    assert summary["false_alarm_rate"] <= 0.05
    devices = {d["device"]: d for d in summary["fleet"]["devices"]}
    assert set(devices) == {"pi-1", "pi-2", "pi-3"}
    assert all(d["status"] == "online" and d["inferences"] > 0 for d in devices.values())
    assert "outliers: caught" in out.stdout and "dashboard" in out.stdout
