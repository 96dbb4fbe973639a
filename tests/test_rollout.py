"""Staged rollout to a fleet (issue 14, acceptance 2): twenty real agents (ONNX Runtime
sessions, MQTT clients, deploy and probation) on the shared Mosquitto, an application calling
every one of them the whole time, and ``sdk.rollout`` on the host.

A bad bundle stops after the canary wave, with the canary rolled back by its own probation and
no other device touched; a good bundle, aborted after its second wave, resumes where it stopped
and reaches all twenty without a failed call; a bundle that passes probation but draws a
collector alert during the soak has its wave reverted (``deploy_revert``) and the rollout
halts. The retained ``rollouts`` message follows every step."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import Agent, AgentConfig
from device_agent.contracts import messages as msg
from device_agent.contracts.commands import ProbationArgs
from device_agent.errors import ConfigError
from sdk.rollout import plan_waves, request_abort, run_rollout
from tests.brokers import FleetListener
from tests.test_deploy import FEATURES, _bundle, wait_connected

BROKER = "mqtt://127.0.0.1:1883"  # the shared Mosquitto: a unique fleet id, connect only
DEVICES = [f"pi-{i:02d}" for i in range(20)]
PROBATION = ProbationArgs(inferences=20)  # min_calls 10 + 3 warm-up: latency is judged too


@dataclass
class _Fleet:
    """Twenty agents and one application thread calling each of them in turn."""

    fleet: str
    agents: dict[str, Agent]
    failures: list[tuple[str, BaseException]] = field(default_factory=list)
    calls: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        x = np.random.default_rng(0).random((1, FEATURES), dtype=np.float32)
        while not self.stop.is_set():
            for name, agent in self.agents.items():
                try:
                    agent.predict({"x": x})
                    self.calls += 1
                except Exception as exc:  # every failure is a test failure, whatever its type
                    self.failures.append((name, exc))
            time.sleep(0.002)

    def versions(self) -> dict[str, str]:
        return {d: a.bundle.manifest.model.version for d, a in self.agents.items()}

    def deploys_seen(self) -> dict[str, Any]:
        """Each device's last deploy as its agent reports it (None: never asked to deploy)."""
        return {d: a.deployer.last_event for d, a in self.agents.items()}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rollout-bundles")
    return {
        "v1": _bundle(root, "v1", "1", features=FEATURES, seed=0),
        "v2": _bundle(root, "v2", "2", features=FEATURES, seed=1),
        "v3": _bundle(root, "v3", "3", features=FEATURES, seed=4),
        # Loads and passes its self-test, but takes 8 features where the application sends 16:
        # its first probation inference fails and the device rolls it back.
        "narrow": _bundle(root, "narrow", "9-narrow", features=8, seed=2),
    }


@pytest.fixture(scope="module")
def fleet(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Fleet]:
    name = f"t{uuid.uuid4().hex[:10]}"
    root = tmp_path_factory.mktemp("rollout-agents")
    agents: dict[str, Agent] = {}
    try:
        for device in DEVICES:
            cfg = AgentConfig(
                device_id=device,
                fleet=name,
                broker_url=BROKER,
                window_s=1.0,
                state_dir=root / device,
            )
            agents[device] = Agent.from_bundle(bundles["v1"], cfg).start()
        for agent in agents.values():
            assert wait_connected(agent, 30)
        f = _Fleet(name, agents)
        thread = threading.Thread(target=f.run, daemon=True)
        thread.start()
        yield f
        f.stop.set()
        thread.join(10)
    finally:
        for agent in agents.values():
            agent.close()
        _clear_retained(name)


def _clear_retained(fleet: str) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    topics = [msg.topic(fleet, None, "rollouts")]
    topics += [msg.topic(fleet, d, "status") for d in DEVICES]
    for t in topics:
        client.publish(t, b"", qos=1, retain=True).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def _retained_rollout(fleet: str) -> msg.RolloutEvent:
    listener = FleetListener(fleet)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = [m for m in listener.messages if isinstance(m, msg.RolloutEvent)]
            if events:
                return events[-1]
            time.sleep(0.05)
    finally:
        listener.close()
    raise AssertionError("no retained rollouts message")


def test_plan_waves_counts_shares_and_lists() -> None:
    devices = [f"d{i:02d}" for i in range(20)]
    waves = plan_waves(["1", "10%", "50%", "100%"], devices)
    assert [len(w) for w in waves] == [1, 1, 8, 10]
    assert sorted(d for w in waves for d in w) == devices
    waves = plan_waves(["d07,d03", "25%", "100%"], devices)
    assert waves[0] == ["d07", "d03"] and [len(w) for w in waves] == [2, 3, 15]
    assert plan_waves(["1", "1", "100%"], devices[:3]) == [["d00"], ["d01", "d02"]]
    assert plan_waves(["50%"], devices[:3]) == [["d00", "d01"]]  # the rest: in no wave
    # A share counts the listed devices of earlier waves too.
    assert [len(w) for w in plan_waves(["d07", "25%", "100%"], devices)] == [1, 4, 15]
    assert len(plan_waves(["d00,d01,d02,d03,d04", "50%"], devices[:10])) == 1
    for bad, words in [
        (["0"], "at least 1"),
        (["0%"], "(0, 100]"),
        (["101%"], "(0, 100]"),
        (["x%"], "N%"),
        (["d99"], "not an online device"),
        (["d01", "d01,d02"], "two waves"),
        ([" "], "empty wave"),
        (["\u00b2"], "not an online device"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("]", r"\]")):
            plan_waves(bad, devices)


def test_a_bad_bundle_stops_after_the_canary_and_touches_no_other_device(
    fleet: _Fleet, bundles: dict[str, Path], tmp_path: Path
) -> None:
    lines: list[str] = []
    result = run_rollout(
        bundles["narrow"],
        BROKER,
        fleet.fleet,
        soak_s=0.5,
        probation=PROBATION,
        timeout_s=60,
        state_dir=tmp_path,
        report=lines.append,
    )
    assert result.state == "halted", lines
    canary = result.waves[0]
    assert canary == ["pi-00"] and [len(w) for w in result.waves] == [1, 1, 8, 10]
    assert result.devices["pi-00"] == "rolled_back"
    assert "wave 1/4 failed: pi-00 rolled back" in (result.reason or "")
    assert all(s == "pending" for d, s in result.devices.items() if d != "pi-00")
    # The canary ran the bad bundle and went back; nobody else was even sent it.
    seen = fleet.deploys_seen()
    assert seen["pi-00"] is not None and seen["pi-00"].state == "rolled_back"
    assert [d for d, e in seen.items() if e is not None] == ["pi-00"]
    assert set(fleet.versions().values()) == {"1"}
    assert fleet.failures == []
    retained = _retained_rollout(fleet.fleet)
    assert retained.state == "halted" and retained.devices["pi-00"] == "rolled_back"
    assert retained.deploy == json.loads(result.state_file.read_text())["deploy"]
    # A halted rollout is not run again by accident.
    with pytest.raises(ConfigError, match="--restart"):
        run_rollout(bundles["narrow"], BROKER, fleet.fleet, state_dir=tmp_path)
    # Planned anew, it halts again; its messages count on from the last one, so a subscriber
    # keeping the highest seq per rollout takes them as the newest.
    old_seq = json.loads(result.state_file.read_text())["seq"]
    again = run_rollout(
        bundles["narrow"], BROKER, fleet.fleet, soak_s=0, probation=PROBATION, timeout_s=60,
        state_dir=tmp_path, restart=True,
    )  # fmt: skip
    assert again.state == "halted" and again.devices["pi-00"] == "rolled_back"
    assert _retained_rollout(fleet.fleet).seq > old_seq
    assert set(fleet.versions().values()) == {"1"}


def test_a_good_bundle_aborted_after_two_waves_resumes_and_reaches_all_twenty(
    fleet: _Fleet, bundles: dict[str, Path], tmp_path: Path
) -> None:
    stop = threading.Event()
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        if line.startswith("wave 3/4:"):  # the operator stops it as the third wave starts
            stop.set()

    first = run_rollout(
        bundles["v2"],
        BROKER,
        fleet.fleet,
        soak_s=0.3,
        probation=PROBATION,
        timeout_s=60,
        state_dir=tmp_path,
        report=report,
        stop=stop,
    )
    assert first.state == "aborted", lines
    done_first = {d for d, s in first.devices.items() if s == "applied"}
    assert done_first == {"pi-00", "pi-01"}, first.devices
    assert {d for d, v in fleet.versions().items() if v == "2"} == done_first
    assert _retained_rollout(fleet.fleet).state == "aborted"
    calls_before = fleet.calls

    again = run_rollout(
        bundles["v2"],
        BROKER,
        fleet.fleet,
        soak_s=0.3,
        probation=PROBATION,
        timeout_s=60,
        state_dir=tmp_path,
        report=lines.append,
    )
    assert again.state == "done", lines
    assert any("resuming at wave 3 of 4" in line for line in lines)
    assert set(again.devices.values()) == {"applied"} and len(again.devices) == 20
    assert set(fleet.versions().values()) == {"2"}
    # The two devices of the first run were not sent the bundle again.
    assert not any(
        line.startswith(("  pi-00", "  pi-01"))
        for line in lines[lines.index(next(line for line in lines if "resuming" in line)) :]
    )
    assert fleet.failures == [] and fleet.calls > calls_before
    retained = _retained_rollout(fleet.fleet)
    assert retained.state == "done" and retained.wave == 4
    # Done is done: running it again sends nothing.
    third = run_rollout(bundles["v2"], BROKER, fleet.fleet, state_dir=tmp_path)
    assert third.state == "done"


def test_an_alert_during_the_soak_reverts_the_wave_and_halts(
    fleet: _Fleet, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """The collector's alert is published as a collector publishes it (the contract's Alert on
    edgeship/{fleet}/alerts): the rollout only reads the topic."""
    assert set(fleet.versions().values()) == {"2"}, "runs after the good rollout"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        if line.startswith("wave 1/2: all applied; soaking"):
            alert = msg.Alert(
                id=f"a-{uuid.uuid4().hex[:8]}",
                source="collector-1",
                ts=time.time(),
                rule="outlier_rate",
                severity="warning",
                state="firing",
                summary="pi-05 outlier rate 31% over 10%",
                device="pi-05",
                value=0.31,
            )
            topic = msg.topic(fleet.fleet, None, "alerts")
            client.publish(topic, msg.encode(alert), qos=1).wait_for_publish(5)

    try:
        result = run_rollout(
            bundles["v3"],
            BROKER,
            fleet.fleet,
            waves=["pi-05,pi-06", "100%"],
            soak_s=30,
            probation=PROBATION,
            timeout_s=60,
            state_dir=tmp_path,
            report=report,
        )
    finally:
        client.loop_stop()
        client.disconnect()
    assert result.state == "halted", lines
    assert "'outlier_rate' on pi-05" in (result.reason or "")
    assert result.devices["pi-05"] == result.devices["pi-06"] == "reverted"
    assert result.reasons["pi-05"].startswith("reverted to v2")
    versions = fleet.versions()
    assert set(versions.values()) == {"2"}, versions
    assert fleet.failures == []
    assert _retained_rollout(fleet.fleet).state == "halted"


def test_request_abort_needs_a_rollout(bundles: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no rollout"):
        request_abort("nofleet", bundles["v1"], tmp_path)


def test_cli_rollout_exit_codes_and_a_retry_after_a_revert(
    fleet: _Fleet, bundles: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    """After the reverted v3 rollout (the alert was a false alarm), the operator rolls v3 out
    again from the CLI: the two devices that reverted it take it again, everyone ends on v3."""
    from sdk.cli import main

    state = ["--state-dir", str(tmp_path)]
    base = ["--broker", BROKER, "--soak", "0", "--timeout", "60", *state]
    empty = f"t{uuid.uuid4().hex[:10]}"
    assert main(["deploy", str(bundles["v3"]), "--fleet", empty, *base]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no device of fleet" in err, err
    assert main(["deploy", str(bundles["v3"]), "--fleet", fleet.fleet, "--abort", *base]) == 2
    assert "no rollout" in capsys.readouterr().err
    assert main(["deploy", str(bundles["v3"]), "--fleet", fleet.fleet, *base, "--wave", "x%"]) == 2
    assert "--wave 'x%'" in capsys.readouterr().err
    out_json = tmp_path / "rollout.json"
    args = ["--fleet", fleet.fleet, "--wave", "2", "--wave", "100%", "--json", str(out_json)]
    assert main(["deploy", str(bundles["v3"]), *args, *base, "--probation", "inferences=10"]) == 0
    out = capsys.readouterr().out
    assert "done (20 applied)" in out, out
    report = json.loads(out_json.read_text())
    assert report["state"] == "done" and report["counts"] == {"applied": 20}
    assert set(fleet.versions().values()) == {"3"}
    assert fleet.failures == []


def test_one_process_per_rollout_and_an_unusable_state_dir_is_bad_input(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    import fcntl

    from sdk.deploy import deploy_id_of, pack_bundle
    from sdk.rollout import _rollout_id

    rid = _rollout_id("somefleet", deploy_id_of(pack_bundle(bundles["v1"])))
    with open(tmp_path / f"{rid}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another edgeship process"):
            run_rollout(bundles["v1"], BROKER, "somefleet", state_dir=tmp_path)
    (tmp_path / f"{rid}.json").write_text("{not json")
    with pytest.raises(ConfigError, match="--restart"):
        run_rollout(bundles["v1"], BROKER, "somefleet", state_dir=tmp_path)
    with pytest.raises(ConfigError, match="--state-dir"):
        run_rollout(bundles["v1"], BROKER, "somefleet", state_dir=Path("/proc/no/such"))


def test_a_deploy_replaced_since_is_sent_again_not_taken_for_the_running_one(
    fleet: _Fleet, bundles: dict[str, Path]
) -> None:
    """pi-00 applied v2 in the good rollout and runs v3 now: asked about v2's deploy it says
    superseded, and deploy_bundle sends v2 again."""
    from sdk.deploy import deploy_bundle

    assert fleet.versions()["pi-00"] == "3"
    back = deploy_bundle(bundles["v2"], BROKER, fleet.fleet, "pi-00", timeout_s=60)
    assert back.state == "applied" and back.chunks_sent == back.chunks > 0, back
    assert fleet.versions()["pi-00"] == "2"
    forth = deploy_bundle(bundles["v3"], BROKER, fleet.fleet, "pi-00", timeout_s=60)
    assert forth.state == "applied" and forth.chunks_sent > 0, forth
    assert set(fleet.versions().values()) == {"3"} and fleet.failures == []


def test_a_wave_without_a_verdict_in_time_is_taken_back_too(
    fleet: _Fleet, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """A device still on probation when the deploy's time is up fails its wave, and the halt
    takes the bundle back from it (it would otherwise apply it later on its own)."""
    endless = ProbationArgs(inferences=1_000_000, seconds=60)
    result = run_rollout(
        bundles["v2"], BROKER, fleet.fleet, waves=["pi-10", "100%"], soak_s=0,
        probation=endless, timeout_s=3, state_dir=tmp_path,
    )  # fmt: skip
    assert result.state == "halted"
    assert "no verdict" in (result.reason or "")
    assert result.devices["pi-10"] == "reverted", result.reasons
    assert fleet.deploys_seen()["pi-10"].state == "rolled_back"
    assert set(fleet.versions().values()) == {"3"} and fleet.failures == []


def test_an_alert_on_an_earlier_waves_device_takes_the_bundle_back_from_it_too(
    fleet: _Fleet, bundles: dict[str, Path], tmp_path: Path
) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", 1883)
    client.loop_start()

    def report(line: str) -> None:
        if line.startswith("wave 2/2: all applied; soaking"):
            alert = msg.Alert(
                id=f"a-{uuid.uuid4().hex[:8]}", source="collector-1", ts=time.time(),
                rule="p95_latency", severity="critical", state="firing",
                summary="pi-11 p95 " + "x" * 4000, device="pi-11", value=9.0,
            )  # fmt: skip
            topic = msg.topic(fleet.fleet, None, "alerts")
            client.publish(topic, msg.encode(alert), qos=1).wait_for_publish(5)

    try:
        result = run_rollout(
            bundles["v2"], BROKER, fleet.fleet, waves=["pi-11", "pi-12"], soak_s=30,
            probation=PROBATION, timeout_s=60, state_dir=tmp_path, report=report,
        )  # fmt: skip
    finally:
        client.loop_stop()
        client.disconnect()
    assert result.state == "halted"
    assert result.devices["pi-11"] == result.devices["pi-12"] == "reverted"
    assert set(fleet.versions().values()) == {"3"} and fleet.failures == []
    # The long summary is cut to fit: the retained message says halted, as the file does.
    retained = _retained_rollout(fleet.fleet)
    assert retained.state == "halted" and retained.id == result.id


def test_a_state_file_that_does_not_add_up_is_refused_naming_restart(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    from sdk.deploy import deploy_id_of, pack_bundle
    from sdk.rollout import _rollout_id

    deploy = deploy_id_of(pack_bundle(bundles["v1"]))
    rid = _rollout_id("somefleet", deploy)
    good: dict[str, Any] = {
        "version": 1, "id": rid, "fleet": "somefleet", "bundle": "b", "deploy": deploy,
        "model": "mlp", "model_version": "1", "started": 1.0, "seq": 3, "state": "aborted",
        "wave": 1, "waves": [["a"], ["b"]], "devices": {"a": "applied", "b": "pending"},
        "reasons": {}, "soak_s": 1.0, "reason": None,
    }  # fmt: skip
    bad = [
        {"wave": "0"},
        {"seq": "x"},
        {"devices": []},
        {"reasons": None},
        {"waves": "abc"},
        {"wave": 2},  # past the last wave, a device pending
        {"devices": {"a": "exploded", "b": "pending"}},
        {"state": "bogus"},
        {"soak_s": float("nan")},
        {"deploy": "d" + "0" * 24},
    ]
    for change in bad:
        (tmp_path / f"{rid}.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ConfigError, match="--restart"):
            run_rollout(bundles["v1"], BROKER, "somefleet", state_dir=tmp_path)
    for soak, timeout in ((float("nan"), 1.0), (float("inf"), 1.0), (1.0, float("nan"))):
        with pytest.raises(ConfigError, match="finite"):
            run_rollout(
                bundles["v1"], BROKER, "somefleet", soak_s=soak, timeout_s=timeout,
                state_dir=tmp_path,
            )  # fmt: skip
    (tmp_path / f"{rid}.json").write_text(json.dumps(good))
    with pytest.raises(ConfigError, match="not running now"):
        request_abort("somefleet", bundles["v1"], tmp_path)
