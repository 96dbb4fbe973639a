"""The simulated fleet's per-process limit: paho-mqtt's select() cannot watch a file descriptor
above 1023, so collector.simulate refuses a fleet that would need one, with a line saying
to run several processes, instead of failing inside paho's network threads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from collector.errors import ConfigError
from collector.simulate import (
    FD_SETSIZE,
    FDS_PER_DEVICE,
    MAX_DEVICES_PER_PROCESS,
    SimConfig,
    SimulatedFleet,
)
from tests.brokers import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "mqtt://127.0.0.1:1"  # the refusals below come before any connection


def _simulate(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector.simulate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_fleet_larger_than_one_process_holds_is_refused_with_how_to_split() -> None:
    with pytest.raises(ConfigError, match=r"run 2 processes .*--prefix"):
        SimulatedFleet(SimConfig(UNREACHABLE, devices=MAX_DEVICES_PER_PROCESS + 1))
    with pytest.raises(ConfigError, match="at least 1"):
        SimulatedFleet(SimConfig(UNREACHABLE, devices=0))

    done = _simulate("--broker", UNREACHABLE, "--devices", "500")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "run 2 processes" in lines[0], done.stderr


def test_a_process_already_holding_descriptors_is_refused_before_select_would_fail() -> None:
    held: list[socket.socket] = []
    try:
        while True:  # fill the descriptors below FD_SETSIZE, leaving fewer than one device needs
            probe = socket.socket()
            if probe.fileno() + FDS_PER_DEVICE > FD_SETSIZE:
                probe.close()
                break
            held.append(probe)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ConfigError, match=r"above 1023.*0 devices connected"):
            SimulatedFleet(SimConfig(UNREACHABLE, devices=2)).connect()
        assert len(os.listdir("/proc/self/fd")) == before  # nothing left open
    finally:
        for s in held:
            s.close()


def test_one_process_holds_its_maximum(tmp_path: Path) -> None:
    """MAX_DEVICES_PER_PROCESS devices connect and every window is acknowledged: the cap is
    not below what works (with two descriptors per device assumed, it would be 480 and paho's
    select() would fail)."""
    with Mosquitto(tmp_path / "broker", persistence=False) as broker:
        report = tmp_path / "published.json"
        done = _simulate(
            "--broker", broker.url, "--fleet", "limits", "--devices",
            str(MAX_DEVICES_PER_PROCESS), "--period", "0.5", "--duration", "1",
            "--report", str(report),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        summary = json.loads(report.read_text())
        assert summary["acked_all"] is True
        assert len(summary["devices"]) == MAX_DEVICES_PER_PROCESS
