"""``--json`` for scripts (issue 14, item 5): ``edgeship fleet status``, ``edgeship targets``,
``edgeship-agent check`` and ``edgeship-agent status`` print one JSON object on stdout and
nothing else; errors stay one line on stderr with the same exit codes; ``--version`` of both
programs prints the package version.

Every command runs in its own process. ``fleet status`` reads a real collector (with its
monitor) fed by a private Mosquitto, a real agent that ran a known number of inferences and a
device whose model name is ESC sequences and whose window is throttled and full of outliers;
``check`` runs on real (signed, encrypted) bundles; ``status`` reads the state a real deploy
left. The JSON is parsed strictly (NaN or Infinity would fail) and compared with what the
system holds: the collector's own API, the manifest, the files on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent, AgentConfig
from device_agent.contracts.commands import DeployRevert
from tests.brokers import Mosquitto, free_port, wait_for
from tests.collector_helpers import Publisher, status, window
from tests.helpers import write_mlp_onnx

FLEET = "jsonfleet"
AGENT = "pi-a"
EVIL = "pi-evil"
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x9b1m\r\npi-ok online\u202eevil"
INFERENCES = 37  # what the real agent runs, exactly
# Keys whose values do not move while nothing new happens on the devices.
STABLE = ("fleet", "device", "status", "boot", "agent_version", "model", "model_version",
          "runtime", "host", "latency_ms", "inferences", "errors", "outliers", "outlier_rate",
          "temperature_c", "throttled", "deploy")  # fmt: skip


def strict_json(text: str | bytes) -> Any:
    """``json.loads`` refusing NaN, Infinity and -Infinity, which are not JSON."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, timeout=180, env=env)


def edgeship(*args: str) -> subprocess.CompletedProcess[bytes]:
    return _run("sdk.cli", *args)


def agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return _run("device_agent.cli", *args, env=env)


def one_object(done: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """The command's stdout: exactly one JSON object on one line, in ASCII (control characters
    and non-ASCII text escaped by the JSON encoder), and the exit code 0."""
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(b"\n") and done.stdout.count(b"\n") == 1, done.stdout[:500]
    done.stdout.decode("ascii")
    found = strict_json(done.stdout)
    assert isinstance(found, dict)
    return found


def one_line_error(done: subprocess.CompletedProcess[bytes], code: int, needle: str) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stdout == b""
    err = done.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err and needle in err, err


def _mlp_bundle(root: Path, name: str, version: str, seed: int = 0) -> Path:
    from sdk.artifact import read_artifact
    from sdk.package import package

    model = write_mlp_onnx(root / f"{name}-{version}.onnx", seed=seed)
    return package(
        read_artifact(model), root / f"{name}-{version}", name=name, version=version
    ).root


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("json-bundles")
    return {
        "v1": _mlp_bundle(root, "mlp", "1"),
        "v2": _mlp_bundle(root, "mlp", "2", seed=1),
        "v3": _mlp_bundle(root, "mlp", "3", seed=2),
    }


# --- --version ------------------------------------------------------------------------------


def test_both_programs_print_the_package_version() -> None:
    version = importlib.metadata.version("edgeship")
    for prog, done in (
        ("edgeship", edgeship("--version")),
        ("edgeship-agent", agent_cli("--version")),
    ):
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode() == f"{prog} {version}\n"


# --- edgeship targets --json ------------------------------------------------------------------


def test_targets_json_lists_every_profile_with_its_raw_fields() -> None:
    from sdk.targets import PROFILES, host_profile

    found = one_object(edgeship("targets", "--json"))
    assert list(found) == ["targets"]
    expected = [host_profile(), *PROFILES.values()]
    assert [t["name"] for t in found["targets"]] == [t.name for t in expected]
    for shown, profile in zip(found["targets"], expected, strict=True):
        assert shown == {
            **dataclasses.asdict(profile),
            "isa": list(profile.isa),
            "runtimes": list(profile.runtimes),
            "threads_on_host": profile.threads_on_host(),
        }
    # the table shows the same profiles
    table = edgeship("targets").stdout.decode()
    assert all(f"{t.memory_mb:>7}MB" in table for t in expected)


# --- edgeship-agent check --json -----------------------------------------------------------------


def test_check_json_reports_what_the_bundle_holds(bundles: dict[str, Path], tmp_path: Path) -> None:
    from device_agent.signing import fingerprint, load_public_key
    from sdk.signing import encrypt_bundle, generate_model_key, generate_signing_key, sign_bundle

    bundle = Path(shutil.copytree(bundles["v1"], tmp_path / "bundle"))
    model_key = generate_model_key(tmp_path / "keys", "fleet")
    signing = generate_signing_key(tmp_path / "keys", "release")
    assert signing.public is not None
    encrypt_bundle(bundle, model_key.private)
    sign_bundle(bundle, signing.private)
    manifest = json.loads((bundle / "manifest.json").read_text())
    found = one_object(
        agent_cli("check", str(bundle), "--runs", "3", "--json", "--trusted-key",
                  str(signing.public), "--model-key", str(model_key.private))
    )  # fmt: skip
    assert found["ok"] is True and found["source"] == "argument" and found["deployed_error"] is None
    assert found["bundle"] == {
        "path": str(bundle), "model": "mlp", "version": "1",
        "precision": manifest["model"]["precision"], "recipe": manifest["model"]["recipe"],
        "runtime": manifest["model"]["runtime"], "created": manifest["created"],
    }  # fmt: skip
    key_id = fingerprint(load_public_key(signing.public))
    assert found["signature"]["signed"] is True and found["signature"]["problem"] is None
    assert found["signature"]["signers"] == [key_id] == found["signature"]["verified_by"]
    assert found["verified"]["files"] == len(manifest["files"])
    assert found["decrypted"] == {
        "file": "model.onnx.enc", "algorithm": manifest["model"]["encryption"]["algorithm"],
        "key_id": model_key.key_id,
    }  # fmt: skip
    import onnxruntime

    assert found["runtime"]["name"] == "onnxruntime"
    assert found["runtime"]["version"] == onnxruntime.__version__
    inference = found["inference"]
    assert inference["runs"] == 3
    assert inference["outputs"] == [{"name": "logits", "shape": [1, 4]}]
    assert 0 < inference["min_ms"] <= inference["median_ms"] <= inference["max_ms"]
    assert all(
        isinstance(v, float) and v > 0
        for v in (found["verified"]["ms"], found["runtime"]["session_ms"], inference["first_ms"])
    )
    cores = len(os.sched_getaffinity(0))
    assert found["host"]["cores"] == cores and found["host"]["numpy"] == np.__version__
    assert found["host"]["python"] == ".".join(map(str, sys.version_info[:3]))

    # the lines say the same
    lines = agent_cli("check", str(bundle), "--runs", "1", "--trusted-key", str(signing.public),
                      "--model-key", str(model_key.private)).stdout.decode()  # fmt: skip
    assert f"bundle     {bundle}: mlp v1 " in lines and "decrypted  model.onnx.enc" in lines
    assert lines.endswith("ok\n") and not lines.lstrip().startswith("{")


def test_check_json_errors_are_one_line_on_stderr_with_the_same_codes(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    damaged = Path(shutil.copytree(bundles["v1"], tmp_path / "damaged"))
    model = damaged / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"x")
    for extra in ((), ("--json",)):
        one_line_error(agent_cli("check", str(damaged), *extra), 2, "model.onnx")
    one_line_error(agent_cli("check", str(bundles["v1"]), "--runs", "0", "--json"), 2, "--runs")
    empty = ["--state-dir", str(tmp_path / "state"), "--fleet", "f", "--device-id", "d"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_AGENT_")}
    one_line_error(agent_cli("check", *empty, "--json", env=env), 2, "nothing to check")


# --- edgeship-agent status --json (and check --json without BUNDLE) after a real deploy --------


@contextlib.contextmanager
def _serving(bundle: Path, broker: str, fleet: str, device: str, state: Path) -> Iterator[None]:
    """A real agent on ``bundle``, connected, with an application calling it the whole time
    (probation needs calls: 5 confirm a deploy)."""
    config = AgentConfig(
        device_id=device, fleet=fleet, broker_url=broker, window_s=0.3, state_dir=state,
        deploy_probation_inferences=5,
    )  # fmt: skip
    stop = threading.Event()
    with Agent.from_bundle(bundle, config) as agent:
        x = np.zeros((1, 16), dtype=np.float32)

        def traffic() -> None:
            while not stop.is_set():
                agent.predict({"x": x})
                stop.wait(0.01)

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: agent.stats["mqtt"]["connected"], 15)
            yield
        finally:
            stop.set()
            thread.join(10)


def test_status_json_after_a_real_deploy(bundles: dict[str, Path], tmp_path: Path) -> None:
    from sdk.deploy import deploy_bundle
    from sdk.remote import CommandClient

    state = tmp_path / "state"
    fleet = f"st{uuid.uuid4().hex[:8]}"
    where = ["--state-dir", str(state), "--fleet", fleet, "--device-id", "pi-d"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_AGENT_")}
    env["EDGESHIP_AGENT_BUNDLE"] = str(bundles["v1"])
    before = one_object(agent_cli("status", *where, "--json", env=env))
    assert before == {
        "dir": str(state / f"deploy-{fleet}-pi-d"), "current": None, "error": None,
        "setting_bundle": str(bundles["v1"]), "previous": None, "uploads": [], "unapplied": [],
    }  # fmt: skip

    with Mosquitto(tmp_path / "broker", persistence=False) as broker:
        with _serving(bundles["v1"], broker.url, fleet, "pi-d", state):
            result = deploy_bundle(bundles["v2"], broker.url, fleet, "pi-d", timeout_s=120)
        # Another device goes v1 -> v2 -> v3, and v3 is taken back by deploy_revert: current.json
        # names v2 again, with previous null, and v3's folder is left unapplied.
        with _serving(bundles["v1"], broker.url, fleet, "pi-r", state):
            back = [
                deploy_bundle(bundles[v], broker.url, fleet, "pi-r", timeout_s=120).deploy_id
                for v in ("v2", "v3")
            ]
            with CommandClient(broker.url, fleet, "pi-r") as client:
                reverted = client.call(
                    "deploy_revert", DeployRevert(back[1], "status test").to_args(), timeout_s=60
                )
    assert result.state == "applied", result
    assert reverted.ok and reverted.result["state"] == "rolled_back", reverted

    found = one_object(agent_cli("status", *where, "--json", env=env))
    pointer = json.loads((state / f"deploy-{fleet}-pi-d" / "current.json").read_text())
    assert found["current"] == pointer and found["error"] is None
    assert (pointer["model"], pointer["model_version"], pointer["deploy"]) == (
        "mlp", "2", result.deploy_id,
    )  # fmt: skip
    assert found["previous"] == {"path": str(bundles["v1"]), "model": "mlp", "version": "1"}
    assert found["uploads"] == [] and found["unapplied"] == []
    assert found["setting_bundle"] == str(bundles["v1"])
    # the lines say the same
    lines = agent_cli("status", *where, env=env).stdout.decode()
    assert f"mlp v2, deploy {result.deploy_id}, applied" in lines
    assert f"previous   mlp v1 ({bundles['v1']})" in lines

    # check without BUNDLE checks the deployed bundle, as 'run' would start with it
    checked = one_object(agent_cli("check", *where, "--runs", "1", "--json", env=env))
    assert checked["source"] == "deployed" and checked["deployed_error"] is None
    assert checked["bundle"]["version"] == "2"
    assert checked["bundle"]["path"] == str(state / f"deploy-{fleet}-pi-d" / pointer["bundle"])

    # a damaged deployed bundle: check says why and checks the setting bundle instead
    deployed_model = next((state / f"deploy-{fleet}-pi-d" / "bundles").glob("*/model.onnx"))
    deployed_model.write_bytes(deployed_model.read_bytes()[:-1] + b"x")
    fallback = one_object(agent_cli("check", *where, "--runs", "1", "--json", env=env))
    assert fallback["source"] == "setting" and fallback["bundle"]["version"] == "1"
    assert "model.onnx" in fallback["deployed_error"]

    # an unreadable current.json: status names the error, current is null
    (state / f"deploy-{fleet}-pi-d" / "current.json").write_text("{")
    broken = one_object(agent_cli("status", *where, "--json", env=env))
    assert broken["current"] is None and broken["previous"] is None
    assert "current.json is unreadable" in broken["error"]

    # after a deploy_revert to a deployed bundle: no previous is known, the reverted one is left
    where_r = ["--state-dir", str(state), "--fleet", fleet, "--device-id", "pi-r"]
    after = one_object(agent_cli("status", *where_r, "--json", env=env))
    assert (after["current"]["deploy"], after["current"]["model_version"]) == (back[0], "2")
    assert after["current"]["previous"] is None and after["previous"] is None
    assert after["unapplied"] == [back[1]]
    lines = agent_cli("status", *where_r, env=env).stdout.decode()
    assert f"mlp v2, deploy {back[0]}, running again since " in lines
    assert "previous   none known (a deploy_revert went back to this bundle;" in lines
    assert "unreadable manifest" not in lines
    unapplied = f"unapplied  bundles/{back[1]} (on probation now; else left by a restart"
    assert f"{unapplied} during one or taken back by deploy_revert, and deleted by" in lines


# --- edgeship fleet status --json ---------------------------------------------------------------


@dataclasses.dataclass
class Rig:
    url: str


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=20) as resp:
        return strict_json(resp.read())


def _firing(url: str) -> set[tuple[str, str]]:
    return {(a["device"], a["rule"]) for a in _get(url + "/api/alerts")["firing"]}


@pytest.fixture(scope="module")
def rig(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    from collector.monitor import Monitor, MonitorConfig
    from collector.service import Collector, CollectorConfig

    tmp = tmp_path_factory.mktemp("json-fleet")
    with Mosquitto(tmp / "broker", persistence=False) as broker:
        collector = Collector(
            CollectorConfig(
                broker_url=broker.url, fleet=FLEET, store_url=f"sqlite:///{tmp}/fleet.db",
                http="127.0.0.1:0", client_id=f"json-{uuid.uuid4().hex[:8]}",
                batch_interval_s=0.02, worker="thread",
            )
        ).start()  # fmt: skip
        monitor = Monitor.for_collector(
            collector, MonitorConfig(interval_s=0.2, alerts_db=str(tmp / "alerts.db"))
        ).start()
        host, port = collector.http_address_bound()
        url = f"http://{host}:{port}"
        publisher = Publisher(broker.port, FLEET)
        # 2 s windows: the agent goes stale only after 6 s without one, however busy the machine.
        config = AgentConfig(
            device_id=AGENT, fleet=FLEET, broker_url=broker.url, window_s=2.0,
            state_dir=tmp / "state",
        )  # fmt: skip
        try:
            with Agent.from_bundle(bundles["v1"], config) as agent:
                assert wait_for(lambda: agent.stats["mqtt"]["connected"], 15)
                x = np.random.default_rng(0).random((1, 16), dtype=np.float32)
                for _ in range(INFERENCES):
                    agent.predict({"x": x})
                # A device whose model name and version are ESC sequences, throttled now
                # (under-voltage and throttling), a quarter of its 200 inferences outliers.
                rng = np.random.default_rng(1)
                publisher.send(status(EVIL, 1, model=HOSTILE, version=HOSTILE))
                publisher.send(window(EVIL, 2, rng=rng, n=200, outlier_share=0.25,
                                      model=HOSTILE, version=HOSTILE, temperature=71.5,
                                      throttled=0x5, window_s=600.0))  # fmt: skip

                def devices() -> dict[str, Any]:
                    return {d["device"]: d for d in _get(url + "/api/devices")["devices"]}

                assert wait_for(
                    lambda: (
                        devices().get(AGENT, {}).get("inferences") == INFERENCES
                        and EVIL in devices()
                    ),
                    30,
                ), devices()
                assert wait_for(
                    lambda: {(EVIL, "throttled"), (EVIL, "outlier_rate")} <= _firing(url), 30
                ), _get(url + "/api/alerts")
                yield Rig(url)
        finally:
            publisher.close()
            monitor.stop()
            collector.stop()


def _observe(url: str) -> tuple[dict[str, Any], set[tuple[str, str]]]:
    devices = {
        d["device"]: {k: d[k] for k in STABLE} for d in _get(url + "/api/devices")["devices"]
    }
    return devices, _firing(url)


def test_fleet_status_json_is_the_collectors_devices_with_their_alerts(rig: Rig) -> None:
    # The command runs between two reads of the collector's API; on a busy machine an alert or
    # a status could change meanwhile, so it runs again (up to 5 times) until both reads agree.
    for _ in range(5):
        api_before, firing_before = _observe(rig.url)
        done = edgeship("fleet", "status", "--collector", rig.url, "--json")
        if _observe(rig.url) == (api_before, firing_before):
            break
    else:
        raise AssertionError("the fleet kept changing: nothing to compare with")
    found = one_object(done)
    assert b"\x1b" not in done.stdout and b"\r" not in done.stdout and done.stderr == b""
    api_full = {d["device"]: d for d in _get(rig.url + "/api/devices")["devices"]}

    assert list(found) == ["collector", "at", "fleet", "summary", "devices", "alerts"]
    assert found["collector"] == rig.url and found["fleet"] == FLEET
    assert isinstance(found["at"], float)
    shown = {d["device"]: d for d in found["devices"]}
    assert set(shown) == {AGENT, EVIL} == set(api_before)
    for name, device in shown.items():
        # every field the collector's API gives, raw, plus the rules firing for the device
        assert set(device) == set(api_full[name]) | {"alerts"}
        for key in STABLE:
            assert device[key] == api_before[name][key], (name, key)
        assert set(device["alerts"]) == {r for d, r in firing_before if d == name}

    agent = shown[AGENT]
    assert agent["inferences"] == INFERENCES and agent["errors"] == 0
    assert (agent["model"], agent["model_version"], agent["status"]) == ("mlp", "1", "online")
    assert isinstance(agent["latency_ms"]["p95"], float) and agent["latency_ms"]["p95"] > 0
    assert agent["alerts"] == []
    evil = shown[EVIL]
    assert evil["model"] == HOSTILE and evil["model_version"] == HOSTILE  # the device's own text
    assert evil["temperature_c"] == 71.5 and evil["outlier_rate"] == 0.25
    assert (evil["inferences"], evil["outliers"]) == (200, 50)
    assert evil["throttled"]["raw"] == 5 and evil["throttled"]["under_voltage"] is True
    assert {"throttled", "outlier_rate"} <= set(evil["alerts"])

    assert found["summary"] == {
        "devices": 2, "online": 2, "stale": 0, "offline": 0, "unknown": 0,
        "alerts_firing": len(found["alerts"]),
    }  # fmt: skip
    assert {(a["device"], a["rule"]) for a in found["alerts"]} == firing_before
    assert all(a["fleet"] == FLEET for a in found["alerts"])

    # the table shows the same fleet
    table = edgeship("fleet", "status", "--collector", rig.url).stdout.decode()
    assert table.startswith(f"{FLEET}: 2 devices, 2 online") and "\\x1b]0;pwned" in table


def test_fleet_status_json_for_another_fleet_is_empty(rig: Rig) -> None:
    found = one_object(
        edgeship("fleet", "status", "--collector", rig.url, "--fleet", "none", "--json")
    )
    assert found["devices"] == [] and found["alerts"] == [] and found["fleet"] == "none"
    assert found["summary"] == {
        "devices": 0,
        "online": 0,
        "stale": 0,
        "offline": 0,
        "unknown": 0,
        "alerts_firing": 0,
    }


def test_fleet_status_json_errors_are_one_line_exit_2() -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    one_line_error(edgeship("fleet", "status", "--collector", nobody, "--json"), 2,
                   "cannot reach the collector API")  # fmt: skip
    one_line_error(edgeship("fleet", "status", "--collector", "ftp://x", "--json"), 2,
                   "expected the collector API's address")  # fmt: skip


class _OddCollector(BaseHTTPRequestHandler):
    """A collector without its monitor (no /api/alerts) whose numbers are not finite: what a
    broken or foreign server could answer; the CLI must still write JSON."""

    BODY = (
        b'{"at": 1.5, "fleet": "f", "devices": [{"fleet": "f", "device": "d", "status": "online",'
        b' "latency_ms": {"p50": NaN, "p95": Infinity, "p99": -Infinity, "inferences": 0},'
        b' "outlier_rate": NaN, "temperature_c": null, "model": "m", "last_seen": 1.0}]}'
    )

    def do_GET(self) -> None:
        found = self.path == "/api/devices"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        body = self.BODY if found else b'{"error": "not found"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_fleet_status_json_writes_null_for_non_finite_numbers_and_no_monitor() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OddCollector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        found = one_object(edgeship("fleet", "status", "--collector", url, "--json"))
    finally:
        server.shutdown()
        server.server_close()
    (device,) = found["devices"]
    assert device["latency_ms"] == {"p50": None, "p95": None, "p99": None, "inferences": 0}
    assert device["outlier_rate"] is None and device["alerts"] is None
    assert found["alerts"] is None and found["summary"]["alerts_firing"] is None
    assert found["summary"]["online"] == 1 and found["at"] == 1.5
