"""The README's main job, shortened: `edgeship demo --duration 30` on a machine with no broker
configured (it starts the embedded one)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
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


# --- the demo's processes end with it -------------------------------------------------------


class _Demo:
    """``edgeship demo`` in its own process, its output read line by line as it comes."""

    def __init__(self, work: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdk.cli", "demo", "--duration", "600", "--workdir",
             str(work), "--http", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._reader.join(10)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running: not gone, and not a zombie (a reparented one may wait a while for
    its new parent to reap it; it runs no more code)."""
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def _fleet_running(demo: _Demo, work: Path, agents: int = 3) -> list[psutil.Process]:
    """Wait until every agent replays (its log has lines); the demo's descendants then."""

    def replaying() -> bool:
        logs = [work / "agents" / f"pi-{i}" / "replay.jsonl" for i in range(1, agents + 1)]
        return "[5/5] running" in demo.output and all(
            f.is_file() and f.stat().st_size > 0 for f in logs
        )

    deadline = time.monotonic() + 600
    while not replaying():
        assert demo.proc.poll() is None, _why(demo, work, "ended before its fleet was running")
        assert time.monotonic() < deadline, _why(demo, work, "fleet was not running in 600 s")
        time.sleep(0.2)
    children = psutil.Process(demo.proc.pid).children(recursive=True)
    commands = [" ".join(p.cmdline()) for p in children]
    # the embedded broker, the collector (and its store worker), three agents
    assert sum("sdk.broker" in c for c in commands) == 1, commands
    assert sum("sdk.cli collect" in c for c in commands) == 1, commands
    assert sum("device_agent.cli run" in c for c in commands) == agents, commands
    return children


def _why(demo: _Demo, work: Path, what: str) -> str:
    """A failure message: the demo's output and the end of its collector's and broker's logs
    (the demo says "see its log" when the collector does not start)."""
    logs = [work / "collector.log", work / "broker.log"]
    tails = [f"--- {f.name}:\n{f.read_text(errors='replace')[-2000:]}" for f in logs if f.is_file()]
    return "\n".join([f"the demo {what}; its output:", demo.output[-4000:], *tails])


def _gone_within(procs: list[psutil.Process], seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [" ".join(p.cmdline()) for p in _alive(procs)]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_demo_stops_its_fleet_on_sigterm_and_its_fleet_dies_with_it_on_sigkill(
    tmp_path: Path,
) -> None:
    """`kill -TERM <demo>` left the broker, the collector and three agents running (replaying
    at full speed) as orphans: SIGTERM and SIGHUP now stop them as Ctrl-C does; and when the
    demo is killed outright, the kernel sends each of them SIGTERM (PR_SET_PDEATHSIG)."""
    work = tmp_path / "demo"
    started: list[psutil.Process] = []
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):  # the second run reuses the trained model
            demo = _Demo(work)
            try:
                children = _fleet_running(demo, work)
                started += children
                demo.proc.send_signal(sig)
                code = demo.proc.wait(120)
                assert _gone_within(children, 5) == [], f"orphans left running after {sig.name}"
                assert code in (1, 130), demo.output[-4000:]
                stopping = f"interrupted by {sig.name}: stopping the fleet"
                assert stopping in demo.output, demo.output[-4000:]
                assert "Traceback" not in demo.output, demo.output[-4000:]
            finally:
                demo.close()
        # SIGKILL runs no code in the demo at all: the kernel stops its children.
        demo = _Demo(work)
        try:
            children = _fleet_running(demo, work)
            started += children
            demo.proc.kill()
            demo.proc.wait(30)
            assert _gone_within(children, 60) == [], "orphans left running after SIGKILL"
        finally:
            demo.close()
    finally:
        for p in _alive(started):  # what a failing run left behind
            p.kill()
