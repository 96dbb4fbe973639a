"""The README's main job, shortened: `edgeship demo --duration 30` on a machine with no broker
configured (it starts the embedded one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.bundle import load_bundle
from sdk.demo import DEMO_KEY_NAME, demo_signing_key


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
    # The bundle is signed by the demo's key, and the agents ran it checked against that key.
    key_id = summary["signing_key"]
    assert f"signed the bundle with Ed25519 key {key_id}" in out.stdout
    bundle = load_bundle(work / "bundle", trusted_keys=[work / "keys" / f"{DEMO_KEY_NAME}.pub.pem"])
    assert bundle.signature.verified_by == (key_id,)
    for device in devices:
        log = (work / "agents" / device / "agent.log").read_text()
        assert f"signed by {key_id}, verified against trusted_keys" in log, log[-2000:]


def test_demo_key_is_reused_on_a_rerun(tmp_path: Path) -> None:
    private, public, key_id = demo_signing_key(tmp_path)
    assert private.stat().st_mode & 0o077 == 0
    public.unlink()  # a lost public file is rewritten from the private key
    assert demo_signing_key(tmp_path) == (private, public, key_id)
    assert public.is_file()
