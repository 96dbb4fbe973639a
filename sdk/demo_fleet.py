"""``edgeship demo``'s fleet: the host demo's signed bundle run by several agents that report
to a collector through a broker, and what the fleet saw.

The agents replay held-out digits with a share of corrupted inputs (:func:`make_replay`) and
log each input's outlier verdict, so the demo can say how many corrupted inputs were caught and
how many clean ones were flagged. Every process the demo starts is stopped with it
(:class:`_Fleet`), whether it ends, fails, or is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np

from sdk.demo import demo_signing_key, run_host_demo

if TYPE_CHECKING:
    from sdk.broker import EmbeddedBroker

__all__ = ["CORRUPTIONS", "DemoError", "make_replay", "run_fleet_demo"]

FLEET = "demo"
DETECTION_KEYS = ("injected", "caught", "clean", "false_alarms")

CORRUPTIONS = ("noise", "inverted", "random")


def make_replay(
    x: np.ndarray, *, seed: int, corrupt_share: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits with a share replaced by corrupted inputs; returns (inputs, is_corrupt).

    Corruptions cycle through Gaussian noise (sigma 0.5, clipped to [0, 1]), inverted images
    and uniformly random pixels.
    """
    rng = np.random.default_rng(seed)
    images = x[rng.permutation(len(x))].copy()
    corrupt = np.zeros(len(images), dtype=bool)
    picks = rng.choice(len(images), size=round(corrupt_share * len(images)), replace=False)
    for k, i in enumerate(picks):
        kind = CORRUPTIONS[k % len(CORRUPTIONS)]
        if kind == "noise":
            images[i] = np.clip(images[i] + rng.normal(0.0, 0.5, images[i].shape), 0.0, 1.0)
        elif kind == "inverted":
            images[i] = 1.0 - images[i]
        else:
            images[i] = rng.random(images[i].shape)
        corrupt[i] = True
    return images.astype(np.float32), corrupt


def _get_json(url: str, timeout: float = 3.0) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait_api(url: str, proc: Any, timeout_s: float = 180.0) -> None:
    import urllib.error

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the collector exited at start (code {proc.returncode}); see its log")
        try:
            _get_json(url)
            return
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.3)
    raise DemoError(f"the collector's API did not answer at {url} within {timeout_s:g} s")


class DemoError(Exception):
    """The demo could not set up one of its processes."""


def _fleet_table(snapshot: dict[str, Any]) -> str:
    from sdk.terminal import printable

    rows = [
        f"  {'device':<8}{'state':<9}{'model':<16}{'p95 ms':>8}{'inferences':>11}"
        f"{'outlier rate':>13}{'gaps':>6}"
    ]
    for d in snapshot.get("devices", []):
        lat = d.get("latency_ms") or d.get("latency") or {}
        p95 = lat.get("p95")
        rate = d.get("outlier_rate")
        gaps = d.get("gaps", {})
        missing = gaps.get("missing", 0) if isinstance(gaps, dict) else gaps
        # What the agents reported, through the collector: escaped for the terminal.
        model = printable(f"{d.get('model') or '?'} v{d.get('model_version') or '?'}")
        device, status = printable(d.get("device", "?")), printable(d.get("status", "?"))
        rows.append(
            f"  {device:<8}{status:<9}{model:<16}"
            f"{'-' if p95 is None else f'{p95:.3f}':>8}{d.get('inferences', 0):>11}"
            f"{'-' if rate is None else f'{rate:.1%}':>13}{missing:>6}"
        )
    return "\n".join(rows)


def _detection(log_path: Path, corrupt: np.ndarray) -> dict[str, int]:
    counts = {"injected": 0, "caught": 0, "clean": 0, "false_alarms": 0}
    if not log_path.is_file():
        return counts
    for line in log_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short when the agent stopped
        if row["index"] >= len(corrupt):
            continue
        if corrupt[row["index"]]:
            counts["injected"] += 1
            counts["caught"] += int(row["outlier"])
        else:
            counts["clean"] += 1
            counts["false_alarms"] += int(row["outlier"])
    return counts


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the demo the way Ctrl-C (SIGINT) does: a KeyboardInterrupt, so
    the same code stops every process the demo started. ``timeout``, ``kill`` and service
    managers send SIGTERM, a closed terminal SIGHUP; neither reaches the children, which run
    in sessions of their own. The first one interrupts; later ones are ignored, so that they
    do not cut the cleanup short (a SIGKILL still ends it, and the children then get SIGTERM
    from the kernel: :mod:`sdk.children`). Only in the main thread, where Python runs signal
    handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if caught:
            return
        caught.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    stops = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, interrupt) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class _Fleet:
    """The processes the demo started (the collector first, then the agents) and the embedded
    broker, if any: whatever happens, :meth:`stop_all` stops every one of them."""

    workdir: Path
    env: dict[str, str]
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    broker: EmbeddedBroker | None = None

    def start(self, name: str, argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        """Start ``python argv...`` in a session of its own, output to ``log_path``; it gets
        SIGTERM from the kernel if the demo dies without stopping it (:mod:`sdk.children`)."""
        from sdk.children import die_with_parent

        with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [sys.executable, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self.procs.append((name, proc))
        return proc

    def check_running(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                raise DemoError(
                    f"{name} exited early (code {p.returncode}); see {self.workdir} for its log"
                )

    def stop_agents(self) -> None:
        """SIGTERM to every agent, then wait for each (30 s, then SIGKILL): they flush their
        last telemetry and replay logs while the collector still listens."""
        import signal

        for _name, p in self.procs[1:]:
            p.send_signal(signal.SIGTERM)
        for _name, p in self.procs[1:]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    def stop_all(self) -> None:
        """Stop whatever still runs, the last started first, then the embedded broker."""
        import signal

        for _name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
        if self.broker is not None:
            self.broker.stop()


def run_fleet_demo(
    workdir: Path,
    *,
    target: str = "rpi4",
    budget: str = "",
    duration_s: float = 60.0,
    agents: int = 3,
    broker_url: str | None = None,
    http: str = "127.0.0.1:9108",
    rate: float = 20.0,
    keep_running: bool = False,
) -> int:
    """The whole story: optimize and bundle, then run a fleet of agents that report to a
    collector through a broker, and show what the fleet saw.

    SIGTERM and SIGHUP stop it as Ctrl-C does, stopping every process it started; those
    processes also get SIGTERM from the kernel if the demo dies without stopping them (killed
    outright, on Linux: :mod:`sdk.children`)."""
    with _stop_signals_interrupt():
        return _run_fleet_demo(
            workdir,
            target=target,
            budget=budget,
            duration_s=duration_s,
            agents=agents,
            broker_url=broker_url,
            http=http,
            rate=rate,
            keep_running=keep_running,
        )


def _run_fleet_demo(
    workdir: Path,
    *,
    target: str,
    budget: str,
    duration_s: float,
    agents: int,
    broker_url: str | None,
    http: str,
    rate: float,
    keep_running: bool,
) -> int:
    workdir = workdir.resolve()
    print("[1/5] model: train, optimize for the board, bundle, sign", flush=True)
    code = run_host_demo(workdir, target=target, budget=budget)
    bundle = workdir / "bundle"
    if not (bundle / "manifest.json").is_file():
        print("the bundle was not written; stopping", flush=True)
        return 1
    _, public_key, key_id = demo_signing_key(workdir)
    fleet = _Fleet(workdir, {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        broker_url, protocol = _start_broker(fleet, broker_url)
        api = _start_collector(fleet, broker_url, protocol, http)
        print(
            f"[4/5] fleet: {agents} agents replaying held-out digits, 20% of them corrupted "
            f"({', '.join(CORRUPTIONS)}); they only accept bundles signed by {key_id}",
            flush=True,
        )
        truths = _start_agents(fleet, bundle, broker_url, public_key, agents=agents, rate=rate)
        snapshot, interrupted = _watch(fleet, api, duration_s)
        fleet.stop_agents()
        online, caught, false_rate = _report(
            workdir,
            snapshot,
            truths,
            api=api,
            extra={"optimize_exit_code": code, "signing_key": key_id, "interrupted": interrupted},
        )
        if keep_running and not interrupted:
            print(f"dashboard: {api}/ (collector and broker keep running; Ctrl-C to stop)")
            with contextlib.suppress(KeyboardInterrupt):
                fleet.procs[0][1].wait()
        else:
            print(
                f"dashboard was served at {api}/ (rerun with --keep-running to browse it "
                "after the run)"
            )
        ok = online == agents and caught >= 0.9 and false_rate <= 0.05
        return 0 if ok and not interrupted else 1
    except DemoError as exc:
        print(f"edgeship demo: {exc}", flush=True)
        return 1
    finally:
        fleet.stop_all()


def _start_broker(fleet: _Fleet, broker_url: str | None) -> tuple[str, str]:
    """The broker's URL and the MQTT protocol the collector should speak to it: an embedded
    broker unless ``broker_url`` names one."""
    if broker_url is not None:
        print(f"[2/5] broker: using {broker_url}", flush=True)
        return broker_url, "auto"
    from sdk.broker import EmbeddedBroker

    print("[2/5] broker: starting an embedded MQTT broker (amqtt, MQTT 3.1.1)", flush=True)
    fleet.broker = EmbeddedBroker(log_file=fleet.workdir / "broker.log").start(timeout_s=120)
    # amqtt speaks 3.1.1 only: say so, rather than have every client wait out a v5
    # connect attempt before falling back.
    fleet.env["EDGESHIP_AGENT_MQTT_PROTOCOL"] = "3.1.1"
    return fleet.broker.url, "3.1.1"


def _http_address(http: str) -> tuple[str, str]:
    """``--http``'s host and port, or a free port when that one is taken (or 0)."""
    from sdk.broker import free_port

    host, _, port = http.rpartition(":")
    host = host or "127.0.0.1"
    try:
        if not port.isdigit() or int(port) == 0:
            raise OSError("pick a free port")
        with socket.socket() as s:
            s.bind((host, int(port)))
    except OSError:  # taken (or 0): any free port will do for a demo
        port = str(free_port(host))
    return host, port


def _start_collector(fleet: _Fleet, broker_url: str, protocol: str, http: str) -> str:
    """Start ``edgeship collect`` on a fresh SQLite store; returns its API's base URL once it
    answers."""
    host, port = _http_address(http)
    api = f"http://{host}:{port}"
    db = fleet.workdir / "fleet.db"
    for stale in fleet.workdir.glob("fleet.db*"):
        stale.unlink()
    print(f"[3/5] collector: SQLite {db}, dashboard and API on {api}/", flush=True)
    argv = ["-m", "sdk.cli", "collect", "--broker", broker_url, "--fleet", FLEET]
    argv += ["--store", f"sqlite:///{db}", "--http", f"{host}:{port}"]
    argv += ["--client-id", "edgeship-demo-collector", "--protocol", protocol]
    proc = fleet.start("collector", argv, fleet.workdir / "collector.log")
    _wait_api(f"{api}/api/health", proc)
    return api


def _start_agents(
    fleet: _Fleet, bundle: Path, broker_url: str, public_key: Path, *, agents: int, rate: float
) -> dict[str, np.ndarray]:
    """Start ``agents`` agents, each replaying its own mix of digits; returns which of each
    device's inputs were corrupted."""
    import shutil

    from sdk.zoo.digits import INPUT_NAME, load_digits_splits

    splits = load_digits_splits(0)
    truths: dict[str, np.ndarray] = {}
    agent_root = fleet.workdir / "agents"
    shutil.rmtree(agent_root, ignore_errors=True)
    for i in range(1, agents + 1):
        device = f"pi-{i}"
        home = agent_root / device
        home.mkdir(parents=True)
        images, corrupt = make_replay(splits.x_test, seed=i)
        replay_file = home / "replay.npz"
        arrays: dict[str, Any] = {INPUT_NAME: images}
        np.savez(replay_file, **arrays)
        truths[device] = corrupt
        argv = ["-m", "device_agent.cli", "run", "--bundle", str(bundle), "--broker", broker_url]
        argv += ["--fleet", FLEET, "--device-id", device, "--replay", str(replay_file)]
        argv += ["--replay-rate", str(rate), "--window", "2", "--http", "off"]
        argv += ["--state-dir", str(home / "state"), "--trusted-key", str(public_key)]
        argv += ["--replay-log", str(home / "replay.jsonl")]
        # info: the start line says whose signature was verified
        argv += ["--log-level", "info"]
        fleet.start(device, argv, home / "agent.log")
    return truths


def _watch(fleet: _Fleet, api: str, duration_s: float) -> tuple[dict[str, Any], bool]:
    """Print the fleet's summary every 5 s for ``duration_s``; returns the collector's last
    view of the devices, taken while every agent still runs, and whether it was interrupted."""
    print(f"[5/5] running for {duration_s:g} s (Ctrl-C to stop early); watch {api}/", flush=True)
    start = time.monotonic()
    snapshot: dict[str, Any] = {}
    interrupted = False
    try:
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= duration_s:
                break
            time.sleep(min(5.0, duration_s - elapsed))
            fleet.check_running()
            try:
                snapshot = _get_json(f"{api}/api/devices")
            except OSError:
                continue
            s = snapshot.get("summary", {})
            print(
                f"  {time.monotonic() - start:5.0f} s: {s.get('online', 0)} online, "
                f"{s.get('inferences', 0)} inferences, {s.get('outliers', 0)} outliers, "
                f"{s.get('missing', 0)} messages missing",
                flush=True,
            )
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (named)
        interrupted = True
        by = f" by {exc}" if str(exc) else ""
        print(f"\ninterrupted{by}: stopping the fleet", flush=True)
    # The snapshot taken while every agent still runs is the fleet table to show.
    with contextlib.suppress(OSError):
        snapshot = _get_json(f"{api}/api/devices")
    return snapshot, interrupted


def _report(
    workdir: Path,
    snapshot: dict[str, Any],
    truths: dict[str, np.ndarray],
    *,
    api: str,
    extra: dict[str, Any],
) -> tuple[int, float, float]:
    """Print the fleet table and the outlier detection against the truth, and write
    ``demo-summary.json``; returns (devices online, caught rate, false-alarm rate)."""
    agent_root = workdir / "agents"
    detection = {d: _detection(agent_root / d / "replay.jsonl", t) for d, t in truths.items()}
    total = {k: sum(v[k] for v in detection.values()) for k in DETECTION_KEYS}
    caught = total["caught"] / total["injected"] if total["injected"] else 0.0
    false_rate = total["false_alarms"] / total["clean"] if total["clean"] else 0.0
    online = sum(1 for d in snapshot.get("devices", []) if d.get("status") == "online")
    print("\nfleet (from the collector's API, while the agents ran):")
    print(_fleet_table(snapshot))
    print(
        f"\noutliers: caught {total['caught']} of {total['injected']} injected corrupted "
        f"inputs ({caught:.1%}); flagged {total['false_alarms']} of {total['clean']} clean "
        f"ones ({false_rate:.1%})"
    )
    summary = {
        "devices_online": online,
        "devices": len(truths),
        "detection": detection,
        "total": total,
        "caught_rate": caught,
        "false_alarm_rate": false_rate,
        "fleet": snapshot,
        "dashboard": f"{api}/",
        **extra,
    }
    (workdir / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"summary: {workdir / 'demo-summary.json'}")
    return online, caught, false_rate
