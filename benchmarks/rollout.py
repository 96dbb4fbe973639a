"""Staged fleet rollout, measured with the fleet as it really runs (issue 14, acceptance 2):
every device is an ``edgeship-agent run`` process of its own, and the rollout is the real
``edgeship deploy BUNDLE --fleet F`` command.

``--devices`` agents (20 by default) start on a fresh fleet id on ``--broker`` (the shared
Mosquitto by default; only a unique fleet's topics are used), each with its own state dir and
inference endpoint, serving a small linear model (v1, 16 features). An application calls every
endpoint over HTTP (``POST /v1/predict``, ``--rate`` calls a second per device, inputs varying)
for the whole run, so each probation has inferences; a call that does not answer 200 with the
model's output is a failed call. A listener subscribed to ``edgeship/{fleet}/#`` keeps every
message, commands to the devices included. Then ``edgeship deploy`` (a subprocess, its output
read line by line and its ``--json`` parsed) runs with the default waves (one canary, then
10%, 50%, 100%), ``--probation inferences=N`` and ``--soak``:

(a) a bad bundle (its model takes 8 features where the application sends 16: it loads and
passes its self-test, then its first call on probation fails) must halt after the canary wave,
the canary rolled back by its own probation, and no device outside that wave touched: no
command on any other device's ``cmd`` topic, no deploy event in any other device's status or
telemetry, every device answering v1 on its endpoint and in its retained status.

(b) a good bundle (v2: v1's weights slightly changed) is aborted as its third wave starts
(SIGINT to the command when it prints ``wave 3/4:``, as Ctrl-C does, or ``edgeship deploy ...
--abort`` from another process with ``--abort-by command``), then the same command is run
again: it must resume at wave 3, reach every device (v2 on every endpoint and retained
status), and send no command to the devices that already applied it in the first run.

Printed per wave: devices, seconds from the wave's start to its last device verdict, the soak
as measured; per run: the exit code, state, wall time, the application's calls, failed calls,
p50 and max latency; in total: wall time, failed application calls and the retained rollouts
message's state after each run (read with a fresh subscription). Exits 1 unless every expected
outcome happened and no application call failed. The agents are stopped (SIGTERM) and the
fleet's retained messages cleared (``status`` of every device, ``rollouts``) at the end,
whatever happened.

    python benchmarks/rollout.py [--broker mqtt://127.0.0.1:1883] [--devices 20] [--soak 5]
        [--probation 20] [--rate 10] [--abort-by sigint|command] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_agent.contracts import messages as msg  # noqa: E402
from device_agent.contracts.broker import BrokerUrl  # noqa: E402
from device_agent.errors import ProtocolError  # noqa: E402

FEATURES = 16


# --- bundles ----------------------------------------------------------------------------------


def _linear_bundle(root: Path, name: str, version: str, w: np.ndarray) -> Path:
    """A bundle whose model is ``logits = x @ w`` (x: [batch, features], 10 classes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdk.artifact import read_artifact
    from sdk.package import package

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = root / f"{name}.onnx"
    onnx.save(model, str(path))
    return package(read_artifact(path), root / name, name="linear", version=version).root


def _bundles(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (FEATURES, 10))
    return {
        "v1": _linear_bundle(root, "v1", "1", w),
        # the same classes for nearly every input: healthy by every probation line
        "v2": _linear_bundle(root, "v2", "2", w + rng.normal(0, 0.01, w.shape)),
        # takes 8 features where the application sends 16: its first call fails
        "bad": _linear_bundle(root, "bad", "3-bad", rng.normal(0, 1, (8, 10))),
    }


# --- the MQTT listener --------------------------------------------------------------------------


def _mqtt_client(broker: BrokerUrl, name: str) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311, clean_session=True
    )
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set()
    return client


class _Listener:
    """Every message on ``edgeship/{fleet}/#``, with the time it arrived."""

    def __init__(self, broker: BrokerUrl, fleet: str) -> None:
        self.fleet = fleet
        self.messages: list[tuple[float, str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = _mqtt_client(broker, f"bench-listen-{uuid.uuid4().hex[:8]}")
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"edgeship/{fleet}/#", 1)
        self._client.on_subscribe = lambda *a: subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        if not subscribed.wait(30):
            raise SystemExit(f"no subscription on {broker.display()} within 30 s")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append((time.monotonic(), message.topic, bytes(message.payload)))

    def between(self, start: float, end: float) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for at, t, p in self.messages if start <= at < end]

    def statuses(self) -> dict[str, msg.StatusMessage]:
        """The latest status of each device."""
        out: dict[str, msg.StatusMessage] = {}
        for topic, payload in self.between(0, float("inf")):
            decoded = _decode(topic, payload)
            if isinstance(decoded, msg.StatusMessage):
                out[decoded.device] = decoded
        return out

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _decode(topic: str, payload: bytes) -> msg.Message | None:
    try:
        return msg.decode(topic, payload)
    except ProtocolError:
        return None


def _device_of(topic: str) -> tuple[str | None, str]:
    try:
        parts = msg.parse_topic(topic)
    except ProtocolError:
        return None, ""
    return parts.device, parts.kind


def _commands(messages: list[tuple[str, bytes]]) -> dict[str, list[str]]:
    """device -> the actions sent to it on its ``cmd`` topic."""
    out: dict[str, list[str]] = {}
    for topic, payload in messages:
        device, kind = _device_of(topic)
        decoded = _decode(topic, payload) if kind == "cmd" else None
        if device is not None and isinstance(decoded, msg.Command):
            out.setdefault(device, []).append(decoded.action)
    return out


def _deploy_events(messages: list[tuple[str, bytes]], deploy: str) -> dict[str, set[str]]:
    """device -> the states of deploy ``deploy`` its status and telemetry reported."""
    out: dict[str, set[str]] = {}
    for topic, payload in messages:
        decoded = _decode(topic, payload)
        event = getattr(decoded, "deploy", None)
        if isinstance(event, msg.DeployEvent) and event.id == deploy:
            out.setdefault(str(getattr(decoded, "device", "")), set()).add(event.state)
    return out


def _retained(broker: BrokerUrl, fleet: str, wait_s: float = 3.0) -> list[msg.Message]:
    """The fleet's retained messages, read with a fresh subscription."""
    found: list[msg.Message] = []
    client = _mqtt_client(broker, f"bench-retained-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(
        [(msg.subscription(fleet, kind="status"), 1), (msg.topic(fleet, None, "rollouts"), 1)]
    )

    def on_message(c: Any, u: Any, message: Any) -> None:
        decoded = _decode(message.topic, bytes(message.payload)) if message.retain else None
        if decoded is not None:
            found.append(decoded)

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    time.sleep(wait_s)
    client.loop_stop()
    client.disconnect()
    return found


def _clear_retained(broker: BrokerUrl, fleet: str, devices: list[str]) -> None:
    client = _mqtt_client(broker, f"bench-clear-{uuid.uuid4().hex[:8]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    topics = [msg.topic(fleet, None, "rollouts")] + [msg.topic(fleet, d, "status") for d in devices]
    for topic in topics:
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


# --- the agents and the application -------------------------------------------------------------


def _program(name: str, module: str) -> list[str]:
    """The installed console script (``edgeship``, ``edgeship-agent``) beside this Python."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Device:
    name: str
    state_dir: Path
    log: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self, bundle: Path, broker: str, fleet: str, env: dict[str, str]) -> None:
        self.port = _free_port()
        argv = [
            *_program("edgeship-agent", "device_agent.cli"), "run", "--bundle", str(bundle),
            "--broker", broker, "--fleet", fleet, "--device-id", self.name,
            "--state-dir", str(self.state_dir), "--http", f"127.0.0.1:{self.port}",
            "--window", "1", "--threads", "1", "--log-level", "warning",
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def health(self) -> dict[str, Any] | None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", "/v1/health")
            answer = conn.getresponse()
            body = answer.read()
            conn.close()
            return dict(json.loads(body)) if answer.status == 200 else None
        except (OSError, ValueError):
            return None

    def log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _start_fleet(
    devices: list[_Device], bundle: Path, broker: str, fleet: str, timeout_s: float
) -> float:
    """Start every agent and wait until each endpoint answers connected; a process that dies
    at start (its port taken meanwhile) is started again on another port, twice at most.
    Returns the seconds it took."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_AGENT_")}
    start = time.monotonic()
    tries = dict.fromkeys((d.name for d in devices), 1)
    for device in devices:
        device.start(bundle, broker, fleet, env)
    waiting = list(devices)
    deadline = start + timeout_s
    while waiting:
        for device in list(waiting):
            assert device.proc is not None
            if device.proc.poll() is not None:
                if tries[device.name] >= 3:
                    raise SystemExit(f"{device.name} exited at start:\n{device.log_tail()}")
                tries[device.name] += 1
                device.start(bundle, broker, fleet, env)
                continue
            health = device.health()
            if health is not None and health.get("connected"):
                waiting.remove(device)
        if time.monotonic() > deadline:
            names = ", ".join(d.name for d in waiting)
            raise SystemExit(f"not connected within {timeout_s:g} s: {names}")
        time.sleep(0.2)
    return time.monotonic() - start


def _stop_fleet(devices: list[_Device]) -> None:
    for device in devices:
        if device.proc is not None and device.proc.poll() is None:
            device.proc.send_signal(signal.SIGTERM)
    for device in devices:
        if device.proc is None:
            continue
        try:
            device.proc.wait(30)
        except subprocess.TimeoutExpired:
            device.proc.kill()
            device.proc.wait(10)


@dataclass
class _App:
    """The application: threads calling every device's endpoint ``rate`` times a second."""

    devices: list[_Device]
    rate: float
    threads: int = 4
    calls: list[tuple[float, str, float, bool]] = field(default_factory=list)  # t, dev, s, ok
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        rng = np.random.default_rng(1)
        rows = rng.normal(0, 1, (64, FEATURES)).astype(np.float32)
        bodies = [json.dumps({"inputs": {"x": [r.tolist()]}}).encode() for r in rows]
        for i in range(self.threads):
            mine = self.devices[i :: self.threads]
            worker = threading.Thread(target=self._run, args=(mine, bodies), daemon=True)
            worker.start()
            self._workers.append(worker)

    def _run(self, devices: list[_Device], bodies: list[bytes]) -> None:
        conns: dict[str, http.client.HTTPConnection] = {}
        period = 1.0 / self.rate
        i = 0
        while not self.stop.is_set():
            started = time.monotonic()
            for device in devices:
                body = bodies[i % len(bodies)]
                i += 1
                t0 = time.monotonic()
                ok, why = self._call(conns, device, body)
                self.calls.append((t0, device.name, time.monotonic() - t0, ok))
                if not ok and len(self.errors) < 20:
                    self.errors.append(f"{device.name}: {why}")
            self.stop.wait(max(0.0, period - (time.monotonic() - started)))
        for conn in conns.values():
            conn.close()

    @staticmethod
    def _call(
        conns: dict[str, http.client.HTTPConnection], device: _Device, body: bytes
    ) -> tuple[bool, str]:
        conn = conns.get(device.name)
        if conn is None:
            conn = conns[device.name] = http.client.HTTPConnection(
                "127.0.0.1", device.port, timeout=10
            )
        try:
            conn.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
            answer = conn.getresponse()
            data = answer.read()
            if answer.status != 200:
                return False, f"HTTP {answer.status}: {data[:200]!r}"
            logits = json.loads(data)["outputs"]["logits"]
            if len(logits) != 1 or len(logits[0]) != 10:
                return False, f"unexpected outputs {data[:200]!r}"
            return True, ""
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as exc:
            conn.close()
            conns.pop(device.name, None)
            return False, f"{type(exc).__name__}: {exc}"

    def window(self, start: float, end: float) -> dict[str, Any]:
        calls = [c for c in list(self.calls) if start <= c[0] < end]
        lat = sorted(c[2] * 1000 for c in calls)
        return {
            "calls": len(calls),
            "failed": sum(1 for c in calls if not c[3]),
            "devices_called": len({c[1] for c in calls}),
            "p50_ms": statistics.median(lat) if lat else None,
            "max_ms": max(lat) if lat else None,
        }

    def close(self) -> None:
        self.stop.set()
        for worker in self._workers:
            worker.join(15)


# --- the rollout command ----------------------------------------------------------------------


@dataclass
class _Run:
    """One ``edgeship deploy --fleet`` run: its exit code, its lines with the time each was
    read, its ``--json`` result, when it started and ended (monotonic)."""

    argv: list[str]
    code: int
    lines: list[tuple[float, str]]
    result: dict[str, Any]
    start: float
    end: float


def _deploy(
    argv: list[str],
    json_out: Path,
    on_line: Callable[[str, subprocess.Popen[str]], None] | None = None,
    timeout_s: float = 900,
) -> _Run:
    json_out.unlink(missing_ok=True)
    command = [*argv, "--json", str(json_out)]
    start = time.monotonic()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    killer = threading.Timer(timeout_s, proc.kill)
    killer.start()
    try:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            lines.append((time.monotonic(), line))
            print(f"    | {line}", flush=True)
            if on_line is not None:
                on_line(line, proc)
        code = proc.wait()
    finally:
        killer.cancel()
    end = time.monotonic()
    result = json.loads(json_out.read_text()) if json_out.is_file() else {}
    return _Run(command, code, lines, result, start, end)


def _waves(run: _Run, label: str) -> list[dict[str, Any]]:
    """Per wave this run worked on: devices sent the bundle, seconds from the wave's start line
    to its last device's verdict line, and the soak as measured (from 'soaking' to the next
    wave, or to the end of the rollout)."""
    waves = run.result.get("waves") or []
    rows: list[dict[str, Any]] = []
    starts = [
        (i, t) for t, line in run.lines for i in range(len(waves))
        if line.startswith(f"wave {i + 1}/{len(waves)}: ") and "all applied" not in line
    ]  # fmt: skip
    for n, (i, t0) in enumerate(starts):
        t_next = starts[n + 1][1] if n + 1 < len(starts) else run.end
        prefix = f"wave {i + 1}/{len(waves)}"
        mine = [(t, line) for t, line in run.lines if t0 <= t <= t_next]
        verdicts = [
            t for t, line in mine if any(line.startswith(f"  {d}: ") for d in waves[i])
            and "reverted" not in line
        ]  # fmt: skip
        soaking = [t for t, line in mine if line.startswith(f"{prefix}: all applied; soaking")]
        soak = None
        if soaking:  # until the next line that is not this wave's: the next wave, done, ...
            later = [t for t, line in mine if t > soaking[0] and not line.startswith("  ")]
            soak = (later[0] if later else t_next) - soaking[0]
        rows.append(
            {
                "run": label,
                "wave": f"{i + 1}/{len(waves)}",
                "devices": len(waves[i]),
                "deployed": len(verdicts),
                "last_verdict_s": (max(verdicts) - t0) if verdicts else None,
                "soak_s": soak,
            }
        )
    return rows


def _rollout_state(broker: BrokerUrl, fleet: str) -> msg.RolloutEvent | None:
    events = [m for m in _retained(broker, fleet) if isinstance(m, msg.RolloutEvent)]
    return events[-1] if events else None


# --- main -----------------------------------------------------------------------------------


@dataclass
class _Bench:
    broker_url: str
    broker: BrokerUrl
    fleet: str
    devices: list[_Device]
    bundles: dict[str, Path]
    app: _App
    listener: _Listener
    args: argparse.Namespace
    root: Path
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        print(f"  {'ok ' if ok else 'FAILED'} {what}", flush=True)
        if not ok:
            self.failures.append(what)

    def deploy_argv(self, bundle: str) -> list[str]:
        return [
            *_program("edgeship", "sdk.cli"), "deploy", str(self.bundles[bundle]),
            "--fleet", self.fleet, "--broker", self.broker_url,
            "--probation", f"inferences={self.args.probation}", "--soak", f"{self.args.soak:g}",
            "--timeout", "120", "--state-dir", str(self.root / "rollouts"),
        ]  # fmt: skip

    def versions(self) -> tuple[dict[str, str | None], dict[str, str | None]]:
        """Each device's model version: from its endpoint, and from its retained status."""
        served = {d.name: (d.health() or {}).get("model_version") for d in self.devices}
        retained = {
            m.device: m.model_version
            for m in _retained(self.broker, self.fleet)
            if isinstance(m, msg.StatusMessage)
        }
        return served, retained

    def bad_bundle(self) -> dict[str, Any]:
        print("\n(a) a bad bundle: must halt after the canary, touching no other device")
        run = _deploy(self.deploy_argv("bad"), self.root / "bad.json")
        res = run.result
        seen = self.listener.between(run.start, time.monotonic() + 1)
        waves = res.get("waves") or [[]]
        canary = waves[0]
        others = [d.name for d in self.devices if d.name not in canary]
        commands = _commands(seen)
        events = _deploy_events(seen, self._deploy_id(run))
        served, retained = self.versions()
        state = _rollout_state(self.broker, self.fleet)
        self.check(run.code == 1 and res.get("state") == "halted", f"exit 1, halted ({run.code})")
        self.check(
            len(canary) == 1 and res["devices"].get(canary[0]) == "rolled_back",
            f"canary {canary} rolled back by its probation: {res.get('reasons', {})}",
        )
        self.check(
            all(res["devices"].get(d) == "pending" for d in others),
            f"the {len(others)} other devices pending in the rollout's result",
        )
        self.check(
            not any(commands.get(d) for d in others),
            f"no command to any other device on MQTT (sent: {_summary(commands)})",
        )
        self.check(
            set(events) == set(canary) and "rolled_back" in events.get(canary[0], set()),
            f"deploy events of the bad bundle from the canary only, rolled_back among them "
            f"({', '.join(f'{d}: {sorted(s)}' for d, s in sorted(events.items()))})",
        )
        self.check(
            set(served.values()) == {"1"} and set(retained.values()) == {"1"}
            and len(retained) == len(self.devices),
            "every device serves v1 and its retained status says v1",
        )  # fmt: skip
        self.check(state is not None and state.state == "halted", "retained rollout: halted")
        return self._summary_row("a", run, state)

    def good_bundle(self) -> dict[str, Any]:
        print(f"\n(b) a good bundle, aborted ({self.args.abort_by}) as wave 3 starts, resumed")
        argv = self.deploy_argv("v2")
        asked: list[float] = []

        def on_line(line: str, proc: subprocess.Popen[str]) -> None:
            if line.startswith("wave 3/") and "all applied" not in line and not asked:
                asked.append(time.monotonic())
                if self.args.abort_by == "sigint":  # what Ctrl-C sends
                    proc.send_signal(signal.SIGINT)
                else:  # another terminal; on a thread, so the lines keep their times
                    abort = [*argv, "--abort"]
                    threading.Thread(
                        target=subprocess.run, args=(abort,), kwargs={"capture_output": True}
                    ).start()

        first = _deploy(argv, self.root / "good-1.json", on_line)
        first_state = _rollout_state(self.broker, self.fleet)
        on_v2 = sorted(d for d, s in first.result.get("devices", {}).items() if s == "applied")
        waves = first.result.get("waves") or []
        early = [d for w in waves[:2] for d in w]
        self.check(
            first.code == 1 and first.result.get("state") == "aborted",
            f"first run: exit 1, aborted ({first.code}, {first.result.get('reason')})",
        )
        self.check(
            set(early) <= set(on_v2),
            f"waves 1-2 applied before the abort; {len(on_v2)} devices on v2 ({on_v2})",
        )
        self.check(
            first_state is not None and first_state.state == "aborted", "retained rollout: aborted"
        )
        print("  resuming with the same command")
        again = _deploy(argv, self.root / "good-2.json")
        commands = _commands(self.listener.between(again.start, again.end))
        served, retained = self.versions()
        state = _rollout_state(self.broker, self.fleet)
        devices = again.result.get("devices", {})
        self.check(
            again.code == 0 and again.result.get("state") == "done",
            f"second run: exit 0, done ({again.code}, {again.result.get('reason')})",
        )
        self.check(
            any(f"resuming at wave 3 of {len(waves)}" in line for _, line in again.lines),
            "it said it resumed at wave 3",
        )
        self.check(
            len(devices) == len(self.devices) and set(devices.values()) == {"applied"},
            f"every device applied it ({again.result.get('counts')})",
        )
        self.check(
            set(served.values()) == {"2"} and set(retained.values()) == {"2"}
            and len(retained) == len(self.devices),
            "every device serves v2 and its retained status says v2",
        )  # fmt: skip
        rest = sorted(set(devices) - set(on_v2))
        self.check(
            not any(commands.get(d) for d in on_v2)
            and bool(rest)
            and all(commands.get(d) for d in rest),
            f"the resumed run sent no command to the {len(on_v2)} devices already on v2, and "
            f"commands to each of the {len(rest)} others ({_summary(commands)})",
        )
        self.check(
            state is not None and state.state == "done" and state.wave == len(waves),
            "retained rollout: done",
        )
        row = self._summary_row("b", again, state)
        row["first"] = self._summary_row("b-first", first, first_state)
        row["first"]["abort_to_exit_s"] = (first.end - asked[0]) if asked else None
        row["resumed_sent_to_applied"] = sum(len(commands.get(d, [])) for d in on_v2)
        return row

    def _deploy_id(self, run: _Run) -> str:
        path = run.result.get("state_file")
        return str(json.loads(Path(path).read_text())["deploy"]) if path else ""

    def _summary_row(self, label: str, run: _Run, state: msg.RolloutEvent | None) -> dict[str, Any]:
        return {
            "run": label,
            "code": run.code,
            "state": run.result.get("state"),
            "reason": run.result.get("reason"),
            "counts": run.result.get("counts"),
            "wall_s": run.end - run.start,
            "retained_state": None if state is None else state.state,
            "waves": _waves(run, label),
            "app": self.app.window(run.start, run.end),
        }


def _summary(commands: dict[str, list[str]]) -> str:
    if not commands:
        return "none"
    return ", ".join(f"{d}: {len(a)}" for d, a in sorted(commands.items()))


def _describe() -> str | None:
    """``git describe --always --dirty`` of the code measured, when it is a checkout."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def _print_run(row: dict[str, Any]) -> None:
    app = row["app"]
    p50 = "-" if app["p50_ms"] is None else f"{app['p50_ms']:.1f}"
    top = "-" if app["max_ms"] is None else f"{app['max_ms']:.0f}"
    print(
        f"  run {row['run']:<8} exit {row['code']} {row['state']:<8} {row['wall_s']:6.1f} s"
        f" | app: {app['calls']} calls to {app['devices_called']} devices, {app['failed']} "
        f"failed, p50 {p50} ms, max {top} ms | retained rollouts: {row['retained_state']}"
    )
    if row.get("abort_to_exit_s") is not None:
        print(f"    the command exited {row['abort_to_exit_s']:.1f} s after the abort was asked")
    for w in row["waves"]:
        verdict = "-" if w["last_verdict_s"] is None else f"{w['last_verdict_s']:.1f} s"
        soak = "-" if w["soak_s"] is None else f"{w['soak_s']:.1f} s"
        print(
            f"    wave {w['wave']}: {w['devices']:>2} devices, {w['deployed']:>2} deployed this "
            f"run, last verdict after {verdict}, soak {soak}"
        )


@contextlib.contextmanager
def _fleet(args: argparse.Namespace, root: Path) -> Iterator[_Bench]:
    broker = BrokerUrl.parse(args.broker)
    fleet = f"bench{uuid.uuid4().hex[:8]}"
    bundles = _bundles(root)
    devices = [
        _Device(f"pi-{i:02d}", root / "agents" / f"pi-{i:02d}", root / f"pi-{i:02d}.log")
        for i in range(args.devices)
    ]
    listener = _Listener(broker, fleet)
    app = _App(devices, args.rate)
    try:
        print(f"fleet {fleet} on {broker.display()}: starting {args.devices} agents", flush=True)
        took = _start_fleet(devices, bundles["v1"], args.broker, fleet, args.start_timeout)
        deadline = time.monotonic() + 30
        while len(listener.statuses()) < len(devices) and time.monotonic() < deadline:
            time.sleep(0.2)
        online = sum(1 for s in listener.statuses().values() if s.state == "online")
        print(f"  {len(devices)} agents serving, {online} online on MQTT after {took:.1f} s")
        app.start()
        time.sleep(2.0)
        yield _Bench(args.broker, broker, fleet, devices, bundles, app, listener, args, root)
    finally:
        app.close()
        _stop_fleet(devices)
        _clear_retained(broker, fleet, [d.name for d in devices])
        listener.close()
        left = [m for m in _retained(broker, fleet, 1.0)]
        print(f"cleaned up: agents stopped, {len(left)} retained messages left on {fleet}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--soak", type=float, default=5.0, help="seconds each wave soaks")
    parser.add_argument("--probation", type=int, default=20, help="probation inferences")
    parser.add_argument("--rate", type=float, default=10.0, help="calls a second per device")
    parser.add_argument("--abort-by", choices=["sigint", "command"], default="sigint")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.devices < 4:
        parser.error("--devices must be at least 4 (four waves)")

    t0 = time.monotonic()
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    calls: dict[str, Any] = {}
    app_errors: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, _fleet(args, Path(tmp)) as bench:
        try:
            rows.append(bench.bad_bundle())
            rows.append(bench.good_bundle())
        finally:
            time.sleep(1.0)
            calls = bench.app.window(0, time.monotonic())
            app_errors = list(bench.app.errors)
            failures = bench.failures
    wall = time.monotonic() - t0
    load_after = os.getloadavg()

    print("\nper run and wave (seconds from the wave's start line to its last device verdict):")
    for row in rows:
        if "first" in row:
            _print_run(row["first"])
        _print_run(row)
    print(
        f"total: {wall:.1f} s wall; application: {calls['calls']} calls, {calls['failed']} "
        f"failed (target 0); retained rollouts after each run: "
        + ", ".join(
            f"{r['run']} {r['retained_state']}" for x in rows for r in [x.get("first"), x] if r
        )
    )
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min)")
    for error in app_errors:
        print(f"  failed call: {error}")
    if failures:
        print(f"expected outcomes missed: {len(failures)}: {failures}")
    if args.json is not None:
        report = {
            "broker": args.broker, "devices": args.devices, "soak_s": args.soak,
            "probation_inferences": args.probation, "rate_per_device": args.rate,
            "abort_by": args.abort_by, "wall_s": wall, "app": calls, "app_errors": app_errors,
            "runs": rows, "failures": failures, "load_before": load_before,
            "load_after": load_after, "code": _describe(),
        }  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if not failures and calls.get("failed") == 0 and rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
