"""The agent's command path and worker threads (issue 11, findings 3 and 6), against a real agent
on a private Mosquitto.

* A command that fails in any way (a bad argument, MemoryError in a deploy's self-test, a deploy
  event that does not encode, a handler that raises anything) is answered ``ok: false`` with the
  reason, and the agent keeps serving: later commands are answered, telemetry windows and
  outlier events keep coming.
* ``benchmark`` takes integers for its counts and numbers for its seconds, each within a
  documented range, and ``max_seconds`` bounds its wall time.
* Each command id runs at most once: a repeat gets the same reply again.
* A worker thread that dies is reported by ``Agent.health()`` and ``/v1/health``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import device_agent.command_runner as command_runner_module
import device_agent.mqtt.commands as mqtt_commands_module
from device_agent import Agent, AgentConfig
from device_agent.benchmark import MAX_RUNS, MAX_SECONDS, MAX_WARMUP_RUNS, BenchmarkArgs, time_runs
from device_agent.contracts import messages as msg
from device_agent.errors import ConfigError, InputError
from tests.agent_device import Device, running_device, wait_until_serving
from tests.brokers import FleetListener, Mosquitto, wait_for
from tests.helpers import write_mlp_onnx

FEATURES = 16


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path_factory.mktemp("mosquitto"), persistence=False) as b:
        yield b


def _mlp_bundle(root: Path, version: str) -> Path:
    from sdk.artifact import read_artifact
    from sdk.package import package

    model = write_mlp_onnx(root / f"mlp-{version}.onnx", features=FEATURES, seed=0)
    return package(
        read_artifact(model),
        root / f"mlp-{version}",
        name="mlp",
        version=version,
        labels=list("abcd"),
    ).root


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _mlp_bundle(tmp_path_factory.mktemp("bundles"), "1")


@pytest.fixture
def device(mlp_bundle: Path, broker: Mosquitto, tmp_path: Path) -> Iterator[Device]:
    with running_device(mlp_bundle, broker, tmp_path / "state") as d:
        yield d


def _x() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).random((1, FEATURES), dtype=np.float32)}


def assert_serving(device: Device) -> None:
    """Commands answered, predict works, a new telemetry window arrives, every worker lives."""
    t = time.time()
    pong = device.call("ping")
    assert pong.ok and pong.result["pong"] is True
    assert device.agent.predict(_x()).outputs[0].shape == (1, 4)
    device.telemetry_after(t)
    health = device.agent.health()
    assert health["ok"], health
    assert set(health["workers"].values()) == {"running"}, health


# --- finding 3: one bad command no longer kills the command thread ---------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"min_runs": "x"}, "'min_runs': expected an integer in [1, 100000], got the string 'x'"),
        ({"min_runs": "nan"}, "'min_runs': expected an integer"),
        ({"min_seconds": "nan"}, "'min_seconds': expected a number of seconds in [0, 600]"),
        ({"warmup_runs": 1e9}, "'warmup_runs': expected an integer in [0, 10000], got the number"),
        ({"min_runs": True}, "'min_runs': expected an integer in [1, 100000], got true"),
        ({"min_runs": 200.0}, "'min_runs': expected an integer"),
        ({"min_runs": 10**30}, "'min_runs': an integer of 100 bits is outside [1, 100000]"),
        ({"min_runs": 0}, "'min_runs': 0 is outside [1, 100000]"),
        ({"warmup_runs": -1}, "'warmup_runs': -1 is outside [0, 10000]"),
        ({"min_seconds": 601}, "'min_seconds': 601 is outside [0, 600]"),
        ({"max_seconds": 0}, "'max_seconds': 0 is outside (0, 600]"),
        (
            {"max_seconds": None},
            "'max_seconds': expected a number of seconds in (0, 600], got null",
        ),
        ({"min_seconds": 5, "max_seconds": 1}, "min_seconds (5) is more than max_seconds (1)"),
        ({"min_run": 5}, "unknown argument 'min_run'; known: min_runs, min_seconds"),
    ],
)
def test_benchmark_arguments_are_checked_and_named(args: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        BenchmarkArgs.parse(args)
    assert named in str(info.value)


def test_bad_benchmark_arguments_are_answered_and_the_agent_keeps_serving(device: Device) -> None:
    """The issue's triggers: on 4044b2d ``"min_runs": "x"`` and ``"min_seconds": "nan"`` raised
    ValueError, which killed the events thread (no reply, then no reply to anything), and
    ``"warmup_runs": 1e9`` ran a billion warm-up inferences."""
    for args in (
        {"min_runs": "x"},
        {"min_runs": "nan"},
        {"min_seconds": "nan"},
        {"warmup_runs": 1e9},
        {"min_runs": 10**30},
        {"max_seconds": "forever"},
    ):
        reply = device.call("benchmark", args)
        assert not reply.ok and reply.error.startswith("benchmark"), (args, reply)
        assert next(iter(args)) in reply.error
    good = device.call("benchmark", {"min_runs": 5, "min_seconds": 0, "warmup_runs": 1})
    assert good.ok, good.error
    assert good.result["runs"] >= 5 and good.result["warmup_runs"] == 1
    assert good.result["capped"] is False and good.result["max_seconds"] == MAX_SECONDS
    assert_serving(device)


def test_max_seconds_bounds_the_whole_benchmark() -> None:
    """Each run takes at least 20 ms, so 0.1 s holds at most a handful of the 100000 asked."""
    timing = time_runs(
        lambda: time.sleep(0.02),
        warmup_runs=MAX_WARMUP_RUNS,
        min_runs=MAX_RUNS,
        min_seconds=0,
        max_seconds=0.1,
    )
    assert timing.capped
    assert len(timing.warmup_ns) + len(timing.latencies_ns) < 20
    assert len(timing.latencies_ns) >= 1  # a summary needs one timed run


def test_sigterm_during_a_long_benchmark_answers_it_and_exits_cleanly(
    mlp_bundle: Path, broker: Mosquitto, tmp_path: Path
) -> None:
    """``edgeship-agent run`` stopped while a 60 s benchmark runs: the benchmark ends between two
    runs, is answered ``ok: false`` saying why, and the process exits 0 at once. On the code
    before this test the events thread went on benchmarking after close() gave up waiting for
    it, the reply was lost, and ONNX Runtime aborted in the interpreter's shutdown (exit 134,
    'terminate called without an active exception')."""
    fleet = f"t{uuid.uuid4().hex[:10]}"
    argv = ["run", "--bundle", str(mlp_bundle), "--broker", broker.url, "--fleet", fleet]
    argv += ["--device-id", "pi-s", "--http", "off", "--state-dir", str(tmp_path / "state")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The agent's log, read as it comes: the test waits for the benchmark to have started.
    err_lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    listener = FleetListener(fleet, port=broker.port)
    sender = mqtt.Client(CallbackAPIVersion.VERSION2)
    sender.connect("127.0.0.1", broker.port)
    sender.loop_start()
    cmd_topic = msg.topic(fleet, "pi-s", "cmd")

    def send(command_id: str, action: str, args: dict[str, Any]) -> None:
        command = msg.Command(id=command_id, action=action, ts=time.time(), args=args)
        sender.publish(cmd_topic, msg.encode(command), qos=1).wait_for_publish(10)

    def replies(command_id: str) -> list[msg.CommandReply]:
        return [r for r in listener.of(msg.CommandReply) if r.id == command_id]

    try:
        listener.wait_for(lambda: listener.of(msg.StatusMessage), 60)
        pings = iter(range(1000))

        def answers_a_ping() -> bool:
            command_id = f"p{next(pings)}"
            send(command_id, "ping", {})
            return wait_for(lambda: replies(command_id), 1)

        assert wait_for(answers_a_ping, 60)  # serving: subscribed to its commands
        send("long", "benchmark", {"min_runs": 1, "min_seconds": 60, "max_seconds": 60})
        # SIGTERM once the benchmark runs, however long a busy machine takes to start it.
        assert wait_for(lambda: any("command long (benchmark) started" in x for x in err_lines),
                        60), "".join(err_lines)  # fmt: skip
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=50)
        reader.join(10)
        err = "".join(err_lines)
        assert time.monotonic() - started < 50  # not after the benchmark's 60 s
        assert proc.returncode == 0, err
        (reply,) = listener.wait_for(lambda: replies("long"), 10)
        assert not reply.ok and "the agent is shutting down" in reply.error, reply
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sender.disconnect()
        sender.loop_stop()
        listener.client.disconnect()
        listener.client.loop_stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize(
    "exc", [MemoryError("no room"), RecursionError("deep"), KeyError("k"), BaseException("odd")]
)
def test_a_handler_that_raises_anything_is_answered_ok_false(
    device: Device, exc: BaseException
) -> None:
    """MemoryError, RecursionError, any Exception, even a bare BaseException: the command is
    answered with the reason and counted; on 4044b2d anything but an EdgeshipError killed the
    events thread."""

    def explode(command: msg.Command) -> Any:
        raise exc

    device.agent.command_handlers["explode"] = explode
    reply = device.call("explode")
    assert not reply.ok
    assert type(exc).__name__ in reply.error or "out of memory" in reply.error
    assert device.agent.health()["worker_errors"]["commands"] == 1
    assert_serving(device)


def test_a_result_that_does_not_encode_is_answered_ok_false(device: Device) -> None:
    device.agent.command_handlers["nan"] = lambda command: {"value": float("nan")}
    device.agent.command_handlers["surrogate"] = lambda command: {"value": "\ud800"}
    for action in ("nan", "surrogate"):
        reply = device.call(action)
        assert not reply.ok and reply.error.startswith(
            f"{action} ran, but its result cannot be sent"
        )
    assert device.listener.invalid == []
    assert_serving(device)


def _tampered_archive(root: Path) -> bytes:
    """The MLP bundle with input shape [1, 10**12] in its manifest, packed by hand (pack_bundle
    would check the manifest first). On 4044b2d it loaded, and its deploy self-test asked numpy
    for a 3.6 TiB array: MemoryError at once."""
    import io
    import tarfile

    bundle = _mlp_bundle(root, "2")
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["io"]["inputs"][0]["shape"] = [1, 10**12]
    manifest_path.write_text(json.dumps(manifest))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
            tar.add(path, arcname=path.relative_to(bundle).as_posix())
    return buf.getvalue()


def _upload(device: Device, archive: bytes, deploy_id: str, **extra: Any) -> msg.CommandReply:
    """deploy_begin, one chunk, deploy_commit; returns the commit's reply."""
    import base64

    sha = hashlib.sha256(archive).hexdigest()
    begin = device.call(
        "deploy_begin",
        {
            "deploy": deploy_id,
            "size": len(archive),
            "sha256": sha,
            "chunks": 1,
            "chunk_bytes": len(archive),
            **extra,
        },
    )
    assert begin.ok, begin.error
    chunk = device.call(
        "deploy_chunk",
        {
            "deploy": deploy_id,
            "index": 0,
            "data": base64.b64encode(archive).decode(),
            "sha256": sha,
        },
    )
    assert chunk.ok, chunk.error
    reply: msg.CommandReply = device.call("deploy_commit", {"deploy": deploy_id})
    return reply


def test_a_deploy_whose_self_test_runs_out_of_memory_is_refused_and_the_agent_serves(
    device: Device, tmp_path: Path
) -> None:
    """On 4044b2d the self-test's MemoryError escaped the commit and killed the events thread:
    no reply to the commit nor to anything after it."""
    reply = _upload(device, _tampered_archive(tmp_path), "huge-shape")
    # Refused before the swap: ok false (contained here), or a "failed" record (the manifest's
    # shape refused when the bundle loads, or the deployer's own refusal of a self-test that
    # raised).
    assert not reply.ok or reply.result["state"] == "failed", reply
    assert device.agent.bundle.manifest.model.version == "1"
    assert_serving(device)


def test_a_deploy_event_that_does_not_encode_kills_neither_thread(device: Device) -> None:
    """The issue's trigger: ``deploy_begin`` with ``"model": "\\ud800"``, then a commit that
    fails. On 4044b2d the "failed" deploy event made every telemetry window and the status
    raise UnicodeEncodeError, which killed both the telemetry and the events threads. Sent
    into the agent's command path directly (the wire decoder may refuse the string first)."""
    agent = device.agent
    archive = b"not a tar archive"
    sha = hashlib.sha256(archive).hexdigest()
    import base64

    def command(action: str, args: dict[str, Any]) -> str:
        command_id = f"{action}-{time.monotonic_ns()}"
        agent._on_command(msg.Command(id=command_id, action=action, ts=time.time(), args=args))
        return command_id

    begin = command(
        "deploy_begin",
        {
            "deploy": "bad-model",
            "size": len(archive),
            "sha256": sha,
            "chunks": 1,
            "chunk_bytes": len(archive),
            "model": "\ud800",
        },
    )
    chunk = command(
        "deploy_chunk",
        {
            "deploy": "bad-model",
            "index": 0,
            "data": base64.b64encode(archive).decode(),
            "sha256": sha,
        },
    )
    commit = command("deploy_commit", {"deploy": "bad-model"})
    for command_id in (begin, chunk, commit):
        assert len(device.wait_replies(command_id, 1)) == 1
    t = time.time()
    device.telemetry_after(t)
    device.telemetry_after(time.time())
    assert device.listener.invalid == []
    assert_serving(device)


def test_a_window_that_cannot_be_built_is_an_error_in_the_next_one(device: Device) -> None:
    """On 4044b2d anything but an EdgeshipError while building a window (here the host sample
    raises) ended the telemetry thread: no window after it."""
    agent = device.agent
    real_sample = agent._sys.sample
    calls = []

    def failing_once() -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("sensor gone")
        return real_sample()

    agent._sys.sample = failing_once  # type: ignore[method-assign]
    agent.predict(_x())
    with pytest.raises(InputError):
        agent.predict({"x": np.zeros((1, 3), np.float32)})  # one inference error, counted

    def errors() -> int:
        return sum(t.errors for t in device.listener.of(msg.TelemetryMessage))

    # The lost window's own inference error, and one error for the window itself, in the
    # windows that follow (whichever window the inference error fell in).
    device.listener.wait_for(lambda: errors() >= 2)
    device.telemetry_after(time.time())
    assert errors() == 2
    assert len(calls) > 1 and agent.health()["worker_errors"]["windows"] == 1
    assert_serving(device)


# --- finding 6: at most once per command id ---------------------------------------------------


def test_each_command_id_runs_at_most_once(device: Device) -> None:
    """A repeat of an id that ran gets the same reply again, without running again; a repeat
    that arrives while the same id runs is answered once it is done. On 4044b2d every delivery
    ran the command again."""
    agent = device.agent
    runs: list[str] = []
    release = threading.Event()

    def slow(command: msg.Command) -> dict[str, Any]:
        runs.append(command.id)
        assert release.wait(30)
        return {"run": len(runs)}

    agent.command_handlers["slow"] = slow
    device.send("slow", id="once-1")
    device.listener.wait_for(lambda: runs)  # running now
    device.send("slow", id="once-1")
    device.send("slow", id="once-1")
    release.set()
    replies = device.wait_replies("once-1", 3)
    device.send("slow", id="once-1")
    replies = device.wait_replies("once-1", 4)
    assert runs == ["once-1"]
    assert {(r.ok, json.dumps(r.result), r.error) for r in replies} == {(True, '{"run": 1}', None)}
    assert len({r.seq for r in replies}) == 4  # four messages, one answer
    # A repeat with another action is still that id's reply: ids are used once.
    other = device.send("ping", id="once-1")
    assert device.wait_replies(other, 5)[-1].result == {"run": 1}
    # A failed command is not run again either.
    device.send("no_such_action", id="once-2")
    device.send("no_such_action", id="once-2")
    failed = device.wait_replies("once-2", 2)
    assert [r.ok for r in failed] == [False, False] and failed[0].error == failed[1].error
    assert_serving(device)


def test_the_reply_cache_is_bounded(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the last REPLY_CACHE_IDS ids are kept: an id older than that runs again."""
    monkeypatch.setattr(command_runner_module, "REPLY_CACHE_IDS", 4)
    agent = device.agent
    runs: list[str] = []
    agent.command_handlers["count"] = lambda command: runs.append(command.id) or len(runs)
    for i in range(6):
        device.send("count", id=f"bound-{i}")
    device.wait_replies("bound-5", 1)
    device.send("count", id="bound-5")  # kept: not run again
    device.wait_replies("bound-5", 2)
    device.send("count", id="bound-0")  # forgotten: runs again
    device.wait_replies("bound-0", 2)
    assert runs == [f"bound-{i}" for i in range(6)] + ["bound-0"]
    assert len(agent.commands) <= 4


def test_a_command_flood_is_answered_and_a_waiting_id_is_not_refused(
    mlp_bundle: Path, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both queues full (the MQTT layer's and the agent's, shrunk here to 2 and 3): a new id is
    answered ``not run`` at once, and runs when sent again; a repeat of an id that waits in
    either queue is not refused (it runs once, later, and that answers it). On 4044b2d a
    command the MQTT queue had no room for got no reply at all, and a repeat of an id waiting
    in the agent's queue was answered ``not run`` although it ran later."""
    monkeypatch.setattr(mqtt_commands_module, "COMMAND_QUEUE", 2)
    cfg = AgentConfig(
        device_id="pi-f",
        fleet=f"t{uuid.uuid4().hex[:10]}",
        broker_url=broker.url,
        window_s=0.3,
        state_dir=tmp_path / "state",
    )
    agent = Agent.from_bundle(mlp_bundle, cfg)
    agent._events = queue.Queue(maxsize=3)
    # A slow MQTT command worker (a slow disk under the spool): it waits on "stuck".
    worker_free, events_free, worker_stuck = threading.Event(), threading.Event(), threading.Event()
    handed = agent._on_command

    def slow_worker(command: msg.Command) -> None:
        if command.id == "stuck":
            worker_stuck.set()
            assert worker_free.wait(30)
        handed(command)

    agent._on_command = slow_worker  # type: ignore[method-assign]
    runs: list[str] = []

    def hold(command: msg.Command) -> str:
        runs.append(command.id)
        assert events_free.wait(30)
        return command.id

    agent.command_handlers["hold"] = hold
    agent.command_handlers["note"] = lambda command: runs.append(command.id) or command.id
    agent.start()
    device = Device(agent, broker)
    try:
        wait_until_serving(device)

        def refused(command_id: str) -> None:
            (reply,) = device.wait_replies(command_id, 1, timeout=10)
            assert not reply.ok and reply.error.startswith("not run:"), reply

        # The agent's queue: "h" runs and holds the events thread, "a0", "a1", "a3" wait.
        device.send("hold", id="h")
        device.listener.wait_for(lambda: runs == ["h"])
        # One at a time: sent together, they can outrun the MQTT layer's queue of 2 on a busy
        # machine (a parallel test run) and be answered "not run" there instead.
        for waiting, command_id in enumerate(("a0", "a1", "a3"), start=1):
            device.send("note", id=command_id)
            device.listener.wait_for(lambda n=waiting: agent._events.qsize() == n)
        assert agent._events.full()
        device.send("note", id="a0")  # waits already: answered when it has run
        device.send("note", id="a2")
        refused("a2")
        # The MQTT layer's queue: "stuck" holds its worker, "m0" and "m1" wait.
        publisher = agent._publisher
        device.send("note", id="stuck")
        device.listener.wait_for(worker_stuck.is_set)
        device.send("note", id="m0")
        device.send("note", id="m1")
        device.listener.wait_for(lambda: publisher._intake._queue.full())
        device.send("note", id="m2")
        refused("m2")
        device.send("note", id="m0")  # waits already: not refused
        device.listener.wait_for(lambda: publisher.stats["dropped_commands"] == 2)
        events_free.set()
        device.wait_replies("a3", 1)
        worker_free.set()  # the agent's queue is empty: "stuck", "m0" and "m1" fit in it
        for command_id in ("h", "a1", "a3", "stuck", "m0", "m1"):
            (reply,) = device.wait_replies(command_id, 1)
            assert reply.ok and reply.result == command_id
        device.send("note", id="a2")  # refused, never ran: runs now
        device.send("note", id="m2")
        assert [r.ok for r in device.wait_replies("a0", 2)] == [True, True]
        assert [r.ok for r in device.wait_replies("a2", 2)] == [False, True]
        assert [r.ok for r in device.wait_replies("m2", 2)] == [False, True]
        assert sorted(runs) == sorted(["h", "a0", "a1", "a2", "a3", "stuck", "m0", "m1", "m2"])
        time.sleep(0.5)  # no late, extra reply to anything
        assert len(device.replies("a0")) == 2 and len(device.replies("m0")) == 1
        assert_serving(device)
    finally:
        worker_free.set()
        events_free.set()
        agent.close()
        device.close()


# --- health -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_names_a_dead_worker(device: Device, caplog: pytest.LogCaptureFixture) -> None:
    """Only SystemExit or KeyboardInterrupt can end a worker now; health says which died, and
    the log says so at CRITICAL. On 4044b2d nothing reported a dead thread."""
    from device_agent.service import make_http_server

    agent = device.agent
    server = make_http_server(agent, ("127.0.0.1", 0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/health"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert json.loads(answer.read())["ok"] is True

        def stop() -> None:
            raise SystemExit("stopped by the test")

        with caplog.at_level(logging.CRITICAL, logger="device_agent.agent"):
            agent._run_soon(stop)
            device.listener.wait_for(lambda: not agent.health()["ok"], 10)
        health = agent.health()
        assert health["workers"]["events"] == "dead"
        assert health["workers"]["telemetry"] == "running"
        assert health["dead_workers"] == {"events": "SystemExit: stopped by the test"}
        assert "the agent's events worker died (SystemExit: stopped by the test)" in caplog.text
        with pytest.raises(urllib.error.HTTPError) as answered:
            urllib.request.urlopen(url, timeout=10)
        assert answered.value.code == 503
        body = json.loads(answered.value.read())
        assert body["ok"] is False and body["dead_workers"] == health["dead_workers"]
    finally:
        server.shutdown()
        server.server_close()
