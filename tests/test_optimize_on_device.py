"""``optimize --device`` (issue 16): every candidate timed on real agents over the shared
Mosquitto while they keep serving an application, the choice made from the devices' figures,
the work split between two devices of one board, and a device lost mid-search.

The two agents run on this machine (their "board" is this host), so their figures are not a
board's; the flow is what is tested. Two agents timing at once on two cores disturb each
other: no figure is asserted."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent, AgentConfig
from sdk.optimize import OptimizeConfig, optimize
from sdk.optimize.on_device import DeviceBenchReport, Job, OnDevice, time_on_devices
from sdk.remote_bench import benchmark_candidate
from tests.test_deploy import wait_connected

BROKER = "mqtt://127.0.0.1:1883"  # the shared Mosquitto: a unique fleet id, connect only


@dataclass
class _Boards:
    fleet: str
    agents: dict[str, Agent]
    feed: dict[str, np.ndarray]
    failures: list[BaseException] = field(default_factory=list)
    calls: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    gone: set[str] = field(default_factory=set)  # boards taken away on purpose

    def run(self) -> None:
        while not self.stop.is_set():
            for name, agent in list(self.agents.items()):
                if name in self.gone:
                    continue
                try:
                    agent.predict(self.feed)
                    self.calls += 1
                except Exception as exc:  # every failure is a test failure, whatever its type
                    if name not in self.gone:
                        self.failures.append(exc)
            time.sleep(0.005)


@pytest.fixture
def boards(digits_bundle: Path, digits_splits: Any, tmp_path: Path) -> Iterator[_Boards]:
    from sdk.zoo.digits import INPUT_NAME

    fleet = f"t{uuid.uuid4().hex[:10]}"
    agents: dict[str, Agent] = {}
    try:
        for device in ("board-a", "board-b"):
            cfg = AgentConfig(
                device_id=device, fleet=fleet, broker_url=BROKER, window_s=1.0,
                state_dir=tmp_path / device,
            )  # fmt: skip
            agents[device] = Agent.from_bundle(digits_bundle, cfg).start()
        for agent in agents.values():
            assert wait_connected(agent, 30)
        b = _Boards(fleet, agents, {INPUT_NAME: digits_splits.x_test[:1]})
        thread = threading.Thread(target=b.run, daemon=True)
        thread.start()
        yield b
        b.stop.set()
        thread.join(10)
    finally:
        for agent in agents.values():
            agent.close()


def _search(
    boards: _Boards, model: Any, npz: dict[str, Path], tmp_path: Path, **device: Any
) -> Any:
    """A short optimize search (one static recipe) timed on both boards."""
    from sdk.budget import parse_budget

    target = OnDevice(
        broker_url=BROKER, devices=("board-a", "board-b"), fleet=boards.fleet, min_runs=20,
        **device,
    )  # fmt: skip
    config = OptimizeConfig(
        budget=parse_budget("drop<=2%"), min_runs=20, min_seconds=0.2, confirm_rounds=1,
        static_methods=("minmax",), per_tensor_variant=False, try_accuracy_aware=False,
        detector=None, on_device=target,
    )  # fmt: skip
    return optimize(
        model.path, calibration=npz["calibration"], eval_data=npz["eval"],
        out=tmp_path / "bundle", config=config,
    )  # fmt: skip


def test_optimize_times_every_candidate_on_the_devices_and_chooses_from_their_figures(
    boards: _Boards, digits_onnx: Any, digits_npz: dict[str, Path], tmp_path: Path
) -> None:

    report = _search(boards, digits_onnx, digits_npz, tmp_path, min_seconds=0.2)
    data = report.to_dict()
    devices = data["devices"]
    (board,) = devices["boards"]  # both agents run on this host: one board model
    timed = [c for c in report.candidates if board in c.device_benches]
    assert len(timed) >= 2
    # Each candidate timed once, the work split between the two devices.
    assert sum(devices["counts"].values()) == len(timed)
    assert set(devices["counts"]) == {"board-a", "board-b"}, devices["counts"]
    assert devices["lost"] == {}
    for c in timed:
        bench = c.device_benches[board]
        assert isinstance(bench, DeviceBenchReport) and bench.device in ("board-a", "board-b")
        assert c.host_bench is not None and c.host_bench is not bench
        assert bench.measured_on.startswith(f"device {bench.device}:")
        assert bench.application is not None
    chosen = report.chosen_candidate
    assert isinstance(chosen.bench, DeviceBenchReport)  # the choice used the devices' figures
    assert data["measured_on"].startswith("device ")
    entry = next(c for c in data["candidates"] if c["name"] == chosen.name)
    assert entry["host_benchmark"]["measured_on"].startswith("host:")
    assert entry["device_benchmarks"][board]["device"] in ("board-a", "board-b")
    assert devices["choices"][board]["chosen"] == report.chosen
    assert "on the host: p50" in report.summary()
    # What the application on each device saw while it timed candidates: real calls, none failed.
    for device, app in devices["application"].items():
        assert app["calls"] > 0 and app["failed"] == 0, (device, app)
    assert "the application on board-a while it timed" in report.summary()
    # Every candidate that was made is either timed on the board or says why not.
    for c in report.candidates:
        if c.host_bench is not None and board not in c.device_benches:
            assert c.device_note, c.name
    # The application kept being served, and nothing is left on the boards.
    assert boards.failures == [] and boards.calls > 0
    for agent in boards.agents.values():
        assert agent.candidates._complete_ones() == []


def test_a_device_lost_mid_search_leaves_its_work_to_the_other(
    boards: _Boards, digits_onnx: Any, tmp_path: Path
) -> None:
    """board-b's agent is closed (as a board that loses power) once it has timed one
    candidate: its next job goes to board-a, which times everything; nothing is missing."""
    from sdk.bench import BenchConfig, benchmark

    host = benchmark(digits_onnx, BenchConfig(min_runs=5, min_seconds=0.0))
    paths = []
    for i in range(4):  # four different files (content-addressed: the same bytes are one)
        p = tmp_path / f"cand{i}.onnx"
        data = digits_onnx.path.read_bytes()
        p.write_bytes(data)
        import onnx

        m = onnx.load(str(p))
        m.doc_string = f"candidate {i}"
        onnx.save(m, str(p))
        paths.append(p)
    jobs = [Job(f"c{i}", p, host) for i, p in enumerate(paths)]
    done_on_b: list[str] = []
    started_on_a: list[str] = []
    b_timed_one = threading.Event()

    def measure(*args: Any, **kwargs: Any) -> dict[str, Any]:
        device = args[2]
        if device == "board-a":
            started_on_a.append(str(args[3]))
            if len(started_on_a) > 1:  # board-b gets a second job, whatever the speeds
                assert b_timed_one.wait(120)
        if device == "board-b" and done_on_b:
            boards.gone.add("board-b")
            boards.agents["board-b"].close()  # the board goes away mid-search
        rep = benchmark_candidate(*args, **{**kwargs, "timeout_s": 20})
        if device == "board-b":
            done_on_b.append(str(args[3]))
            b_timed_one.set()
        return rep

    target = OnDevice(
        broker_url=BROKER, devices=("board-a", "board-b"), fleet=boards.fleet,
        min_runs=10, min_seconds=0.5,
    )  # fmt: skip
    run = time_on_devices(
        jobs, target, boards={"this host": ["board-a", "board-b"]}, measure=measure
    )
    assert len(done_on_b) == 1
    assert set(run.reports["this host"]) == {"c0", "c1", "c2", "c3"}
    assert run.missing["this host"] == {}
    assert list(run.lost) == ["board-b"]
    assert len(run.timed_by["board-a"]) == 3 and len(run.timed_by["board-b"]) == 1
    assert boards.failures == []


def test_cli_device_options_are_checked_before_the_search(tmp_path: Path, capsys: Any) -> None:
    from sdk.cli import main
    from tests.helpers import write_mlp_onnx

    model = write_mlp_onnx(tmp_path / "m.onnx", features=8, seed=0)
    base = ["optimize", str(model), "-o", str(tmp_path / "out")]
    fleet = f"t{uuid.uuid4().hex[:10]}"
    cases = [
        (["--device", "pi-07"], "--device needs --broker"),
        (["--device", "pi-07", "--broker", BROKER, "--fleet", fleet], "not online"),
        (["--device", "a", "--device", "a", "--broker", BROKER], "named twice"),
        (["--device", "a", "--broker", "http://x"], "scheme"),
        (["--device", "a", "--broker", BROKER, "--device-runs", "0"], "--device-runs"),
        (["--device", "a", "--broker", BROKER, "--device-timeout", "5"], "--device-timeout"),
        (["--device", "a", "--broker", BROKER, "--json", "."], "--json"),
    ]
    for extra, words in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err, (extra, err)
    assert not (tmp_path / "out").exists()  # nothing was searched nor bundled
    assert not (tmp_path / "out-candidates").exists()


def test_a_whole_search_completes_on_one_device_when_the_other_dies_mid_search(
    boards: _Boards, digits_onnx: Any, digits_npz: dict[str, Path], tmp_path: Path
) -> None:
    """As board-b finishes receiving its first candidate of the search (after the fp32 probe
    both get before it), its agent is closed (the board loses power mid-search): the search
    goes on, board-a times the rest, the choice is made."""

    b = boards.agents["board-b"]

    import hashlib

    from device_agent.contracts.commands import candidate_id

    # fp32 goes to both before the search (the probe); any other is a search's candidate.
    probe = candidate_id(hashlib.sha256(digits_onnx.path.read_bytes()).hexdigest())

    def kill_b_after_its_first_candidate() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not [
            i for _, i in b.candidates._complete_ones() if i != probe
        ]:
            time.sleep(0.05)
        boards.gone.add("board-b")
        b.close()

    killer = threading.Thread(target=kill_b_after_its_first_candidate, daemon=True)
    killer.start()
    report = _search(boards, digits_onnx, digits_npz, tmp_path, min_seconds=0.5, timeout_s=30)
    killer.join(5)
    devices = report.to_dict()["devices"]
    assert list(devices["lost"]) == ["board-b"], devices
    (board,) = devices["boards"]
    sent = [c for c in report.candidates if c.host_bench is not None and c.device_note is None]
    assert sent and all(board in c.device_benches for c in sent), [
        (c.name, c.device_note) for c in report.candidates
    ]
    assert devices["missing"][board] == {}
    assert devices["counts"].get("board-b", 0) <= 1 <= devices["counts"]["board-a"]
    assert isinstance(report.chosen_candidate.bench, DeviceBenchReport)
    assert "board-b was lost mid-search" in report.summary()
    assert boards.failures == []


def test_a_device_report_is_checked_and_labelled_as_the_devices(
    digits_onnx: Any, tmp_path: Path
) -> None:
    """What a device answers is not trusted (no finite p95: refused), and what it does not
    say is not taken from the host (target, generated inputs, warm-up); the report's JSON is
    strict (an unmeasured figure is null, never NaN)."""
    import json

    from device_agent.errors import EdgeshipError
    from sdk.bench import BenchConfig, benchmark
    from sdk.cli.common import write_json
    from sdk.optimize.on_device import device_report

    host = benchmark(digits_onnx, BenchConfig(min_runs=5, min_seconds=0.0))
    lat = {"p50": 1.0, "p90": 1.5, "p95": 2.0, "p99": 3.0, "max": 4.0}
    good = {"latency_ms": lat, "runtime": "onnxruntime", "runtime_version": "1.2", "runs": 7,
            "device": {"board": "Pi", "cpu": "Cortex-A72", "arch": "aarch64", "cores": 4,
                       "agent_version": "0.1.0"}}  # fmt: skip
    rep = device_report(host, good, "pi-07", "Raspberry Pi 4")
    assert rep.target == "device pi-07 (Raspberry Pi 4)" and rep.inputs_generated
    assert rep.warmup_mean_ms is None and rep.runs == 7
    assert rep.measured_on.startswith("device pi-07: Raspberry Pi 4 (aarch64 Cortex-A72, 4")
    out = tmp_path / "r.json"
    write_json(out, rep.to_dict())
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["init_ms"] is None
    for bad in (
        {**good, "latency_ms": {**lat, "p95": float("nan")}},
        {**good, "latency_ms": {**lat, "p95": "2"}},
        {**good, "latency_ms": None},
        {k: v for k, v in good.items() if k != "latency_ms"},
    ):
        with pytest.raises(EdgeshipError, match="finite"):
            device_report(host, bad, "pi-07", "Raspberry Pi 4")


def test_the_queue_survives_any_answer_and_board_folders_never_collide(
    digits_onnx: Any, tmp_path: Path
) -> None:
    """A reply that cannot be read (a TypeError, an int too large for a float, latencies out
    of order) is the job's failure on that device, never a stuck queue; board folders stay
    apart even when two board names make the same slug."""
    from sdk.bench import BenchConfig, benchmark
    from sdk.optimize.device_choice import _board_dirs

    host = benchmark(digits_onnx, BenchConfig(min_runs=5, min_seconds=0.0))
    lat = {"p50": 1.0, "p90": 1.5, "p95": 2.0, "p99": 3.0, "max": 4.0}
    replies = iter(
        [
            TypeError("'int' object is not iterable"),
            {"latency_ms": {**lat, "p95": 10**400}, "runs": 5},
            {"latency_ms": {**lat, "p50": 9.0}, "runs": 5},
            {"latency_ms": lat, "runs": 5},
        ]
    )
    lock = threading.Lock()

    def measure(*args: Any, **kwargs: Any) -> dict[str, Any]:
        with lock:
            reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    jobs = [Job(f"c{i}", digits_onnx.path, host) for i in range(4)]
    target = OnDevice(broker_url=BROKER, devices=("a", "b"), fleet="nofleet")
    run = time_on_devices(jobs, target, boards={"B": ["a", "b"]}, measure=measure)
    assert len(run.reports["B"]) == 1 and len(run.missing["B"]) == 3, run.missing
    assert run.lost == {}  # they answered: refusals of a job, not lost devices
    reasons = " | ".join(run.missing["B"].values())
    assert "cannot be read" in reasons and "finite" in reasons and "out of order" in reasons

    dirs = _board_dirs(tmp_path / "out", ["First", "Pi 4", "pi-4", "Candidates"])
    assert dirs["First"] == tmp_path / "out"
    names = [d.name for d in dirs.values()]
    assert len(set(names)) == 4 and "out-candidates" not in names, names


class _RefusingBoard:
    """A device that takes every candidate and cannot time any (its runtime fails on each):
    a scripted MQTT client answering the agent's commands as the contract says."""

    def __init__(self, fleet: str, device: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from device_agent.contracts import messages as msg

        self.msg, self.fleet, self.device, self.seq = msg, fleet, device, 0
        self.asked: list[str] = []
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            msg.topic(fleet, device, "cmd"), qos=1
        )
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        self.client.on_message = self._on_command
        self.client.connect("127.0.0.1", 1883)
        self.client.loop_start()
        assert ready.wait(10)
        status = msg.StatusMessage(
            device=device, boot="b1", seq=self._next(), ts=time.time(), state="online",
            agent_version="0.1.0", host={"model": "Refusing Board", "arch": "aarch64"},
        )  # fmt: skip
        topic = msg.topic(fleet, device, "status")
        self.client.publish(topic, msg.encode(status), qos=1, retain=True).wait_for_publish(5)

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _on_command(self, client: Any, userdata: Any, m: Any) -> None:
        msg = self.msg
        command = msg.decode(m.topic, m.payload)
        assert isinstance(command, msg.Command)
        self.asked.append(command.action)
        ok, result, error = True, {"pong": True}, None
        if command.action == "candidate_begin":
            result = {"have": [], "state": "receiving"}
        elif command.action in ("candidate_chunk", "candidate_remove"):
            result = {}
        elif command.action == "benchmark":
            ok, result, error = False, None, "the runtime failed on this model: out of memory"
        reply = msg.CommandReply(
            device=self.device, boot="b1", seq=self._next(), ts=time.time(), id=command.id,
            ok=ok, result=result, error=error,
        )  # fmt: skip
        client.publish(msg.topic(self.fleet, self.device, "cmd/reply"), msg.encode(reply), qos=1)

    def close(self) -> None:
        topic = self.msg.topic(self.fleet, self.device, "status")
        self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        self.client.loop_stop()
        self.client.disconnect()


def test_a_board_that_times_nothing_gets_no_choice_and_the_run_says_so(
    digits_onnx: Any, digits_npz: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    """fp32 failing on the device is no reason to refuse the run (it may be why one
    quantizes); when every candidate fails there, the choice comes from the host's figures, a
    note says so, and the command exits 1 naming the board."""
    from sdk.cli import main

    fleet = f"t{uuid.uuid4().hex[:10]}"
    board = _RefusingBoard(fleet, "refuser")
    try:
        rc = main(
            [
                "optimize", str(digits_onnx.path), "--calibration", str(digits_npz["calibration"]),
                "--eval", str(digits_npz["eval"]), "-o", str(tmp_path / "out"),
                "--budget", "drop<=2%", "--methods", "minmax", "--runs", "20", "--seconds", "0.2",
                "--detector", "none", "--device", "refuser", "--broker", BROKER,
                "--fleet", fleet, "--device-runs", "5", "--device-seconds", "0",
                "--json", str(tmp_path / "r.json"),
            ]
        )  # fmt: skip
    finally:
        board.close()
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    assert "no choice for Refusing Board" in captured.err
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["devices"]["unchosen"]["Refusing Board"]
    assert any("could not time the fp32 model" in n for n in report["notes"])
    assert any("chosen from the host's figures instead" in n for n in report["notes"])
    assert (tmp_path / "out" / "manifest.json").is_file()  # the host's choice, bundled
    assert "benchmark" in board.asked and "candidate_remove" in board.asked


def test_a_device_saying_it_shuts_down_is_lost_even_while_it_still_answers_pings(
    digits_onnx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent closed while it times a candidate answers "shutting down" and may still
    answer a ping for a moment: its job goes to the other device, not into the failures (seen
    in a parallel test run, where the ping came before the agent had gone)."""
    from device_agent.contracts.commands import SHUTTING_DOWN
    from sdk.bench import BenchConfig, benchmark
    from sdk.remote_bench import CandidateRefused

    host = benchmark(digits_onnx, BenchConfig(min_runs=5, min_seconds=0.0))
    lat = {"p50": 1.0, "p90": 1.5, "p95": 2.0, "p99": 3.0, "max": 4.0}
    said: list[str] = []

    def measure(*args: Any, **kwargs: Any) -> dict[str, Any]:
        device = args[2]
        said.append(device)
        if device == "a":
            raise CandidateRefused(f"benchmark stopped after 3 timed run(s): {SHUTTING_DOWN}")
        return {"latency_ms": lat, "runs": 5}

    from sdk.optimize import on_device

    # the moment between its answer and its going: it still answers a ping
    monkeypatch.setattr(on_device, "device_alive", lambda target, device: True)
    jobs = [Job(f"c{i}", digits_onnx.path, host) for i in range(3)]
    target = OnDevice(broker_url=BROKER, devices=("a", "b"), fleet="nofleet")
    run = time_on_devices(jobs, target, boards={"B": ["a", "b"]}, measure=measure)
    assert set(run.reports["B"]) == {"c0", "c1", "c2"} and run.missing["B"] == {}
    assert list(run.lost) == ["a"] and SHUTTING_DOWN in run.lost["a"]
    assert said.count("a") == 1 and sorted(run.timed_by["b"]) == ["c0", "c1", "c2"]
