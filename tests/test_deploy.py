"""Remote deploy end to end: a real Agent serving inferences on a thread, the shared Mosquitto,
``sdk.deploy`` on the host. A good bundle swaps in with no failed inference and survives a
restart; a damaged archive, a traversal archive, a bundle that fails its self-test and an
unsigned bundle (with trusted keys) are refused before the swap; a bundle whose inputs do not
fit the application rolls back after its first failing inference, with the callers answered by
the previous model and the rollback visible in telemetry and the retained status."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent, AgentConfig
from device_agent.contracts import messages as msg
from device_agent.contracts.bundle import MANIFEST_NAME
from device_agent.deploy import deploy_dir, unpack_archive
from device_agent.errors import BundleError, EdgeshipError
from sdk.deploy import deploy_bundle, pack_bundle
from sdk.remote import CommandClient
from tests.brokers import FleetListener
from tests.helpers import write_mlp_onnx

BROKER = "mqtt://127.0.0.1:1883"  # the shared Mosquitto: unique fleet ids, connect only
FEATURES = 16
LABELS = ["a", "b", "c", "d"]


def _bundle(
    root: Path, name: str, version: str, *, features: int, seed: int, labels: list[str] = LABELS
) -> Path:
    from sdk.artifact import read_artifact
    from sdk.package import package

    model = write_mlp_onnx(root / f"{name}.onnx", features=features, seed=seed)
    return package(
        read_artifact(model), root / name, name="mlp", version=version, labels=labels
    ).root


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deploy-bundles")
    return {
        "v1": _bundle(root, "v1", "1", features=FEATURES, seed=0),
        "v2": _bundle(root, "v2", "2", features=FEATURES, seed=1),
        # Loads and passes its self-test, but takes 8 features where the application sends 16.
        "narrow": _bundle(root, "narrow", "3-narrow", features=8, seed=2),
        "relabelled": _bundle(
            root, "relabelled", "4", features=FEATURES, seed=3, labels=["w", "x", "y", "z"]
        ),
    }


@dataclass
class _Traffic:
    """The application: predict() in a loop on its own thread, every outcome kept."""

    agent: Agent
    x: np.ndarray = field(
        default_factory=lambda: np.random.default_rng(0).random((1, FEATURES), dtype=np.float32)
    )
    outputs: list[np.ndarray] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.outputs.append(self.agent.predict({"x": self.x}).outputs[0][0].copy())
            except Exception as exc:  # every failure is a test failure, whatever its type
                self.failures.append(exc)
            time.sleep(0.002)

    def wait_count(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        target = len(self.outputs) + n
        while len(self.outputs) < target:
            assert time.monotonic() < deadline, "the application thread stalled"
            time.sleep(0.01)


@contextmanager
def _device(
    bundle: Path, state: Path, fleet: str, **config: Any
) -> Iterator[tuple[Agent, _Traffic]]:
    cfg = AgentConfig(
        device_id="pi-d",
        fleet=fleet,
        broker_url=BROKER,
        window_s=0.3,
        state_dir=state,
        deploy_probation_inferences=20,
        **config,
    )
    agent = Agent.from_bundle(bundle, cfg).start()
    traffic = _Traffic(agent)
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    try:
        assert wait_connected(agent)
        traffic.wait_count(5)
        yield agent, traffic
    finally:
        traffic.stop.set()
        thread.join(5)
        agent.close()


def wait_connected(agent: Agent, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.stats.get("connected"):
            return True
        time.sleep(0.05)
    return False


def _fleet() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _deploy_events(listener: FleetListener, state: str) -> list[msg.DeployEvent]:
    return [
        t.deploy
        for t in listener.of(msg.TelemetryMessage)
        if t.deploy is not None and t.deploy.state == state
    ]


def test_good_bundle_swaps_in_without_a_failed_inference_and_survives_a_restart(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    fleet = _fleet()
    listener = FleetListener(fleet)
    try:
        with _device(bundles["v1"], tmp_path / "state", fleet) as (agent, traffic):
            before = traffic.outputs[-1]
            # Small chunks so the archive travels in several commands.
            result = deploy_bundle(
                bundles["v2"], BROKER, fleet, "pi-d", chunk_bytes=1024, timeout_s=60
            )
            traffic.wait_count(5)
            assert result.state == "applied", result
            assert (result.from_version, result.to_version) == ("1", "2")
            assert result.chunks > 1 and result.chunks_sent == result.chunks
            assert result.inputs_changed is False
            assert agent.bundle.manifest.model.version == "2"
            assert traffic.failures == []
            # Inferences ran on both models while the deploy went on: the outputs changed.
            after = traffic.outputs[-1]
            assert not np.allclose(before, after)
            applied = listener.wait_for(lambda: _deploy_events(listener, "applied"))
            assert (applied[0].from_version, applied[0].to_version) == ("1", "2")
            listener.wait_for(
                lambda: [t for t in listener.of(msg.TelemetryMessage) if t.model_version == "2"]
            )
            status = listener.wait_for(
                lambda: [
                    s
                    for s in listener.of(msg.StatusMessage)
                    if s.model_version == "2" and s.deploy and s.deploy.state == "applied"
                ]
            )
            assert status[0].state == "online"
            pointer = json.loads((deploy_dir(agent.config) / "current.json").read_text())
            assert pointer["model_version"] == "2"
            # The same bundle again: the device says it runs it, and nothing is sent (a
            # deploy_begin for it would be refused: its id names the running bundle's folder).
            again = deploy_bundle(bundles["v2"], BROKER, fleet, "pi-d", timeout_s=60)
            assert again.state == "applied" and again.chunks_sent == 0, again
            assert agent.bundle.model_path.is_file()
            assert traffic.failures == []
        # A restart (same state_dir) runs the deployed bundle, not the one it was given.
        with _device(bundles["v1"], tmp_path / "state", fleet) as (agent, traffic):
            assert agent.bundle.manifest.model.version == "2"
            assert np.allclose(traffic.outputs[-1], after)
            assert traffic.failures == []
            deployed_model = agent.bundle.model_path
        # A deployed bundle damaged on disk is not run: the agent starts with the given one.
        deployed_model.write_bytes(deployed_model.read_bytes()[:-1] + b"x")
        with _device(bundles["v1"], tmp_path / "state", fleet) as (agent, traffic):
            assert agent.bundle.manifest.model.version == "1"
            assert np.allclose(traffic.outputs[-1], before)
    finally:
        listener.close()


def test_a_bundle_that_fails_on_the_applications_inputs_rolls_back(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    fleet = _fleet()
    listener = FleetListener(fleet)
    try:
        with _device(bundles["v1"], tmp_path / "state", fleet) as (agent, traffic):
            result = deploy_bundle(bundles["narrow"], BROKER, fleet, "pi-d", timeout_s=60)
            assert result.state == "rolled_back", result
            assert result.inputs_changed is True
            assert result.reason is not None and "shape" in result.reason
            # Every caller got an answer: the failing call was answered by the previous model.
            traffic.wait_count(20)
            assert traffic.failures == []
            assert agent.bundle.manifest.model.version == "1"
            event = listener.wait_for(lambda: _deploy_events(listener, "rolled_back"))[0]
            assert (event.from_version, event.to_version) == ("1", "3-narrow")
            assert event.reason is not None and "shape" in event.reason
            status = listener.wait_for(
                lambda: [
                    s
                    for s in listener.of(msg.StatusMessage)
                    if s.deploy and s.deploy.state == "rolled_back"
                ]
            )
            assert status[-1].model_version == "1"
            # The collector stores these messages, deploy field and all.
            from collector.ingest import DeadLetter, TelemetryRecord, ingest

            raw = listener.raw_snapshot()
            results = [ingest(topic, payload, time.time()) for topic, payload in raw]
            assert not [r for r in results if isinstance(r, DeadLetter)]
            assert any(isinstance(r, TelemetryRecord) and r.model_version == "1" for r in results)
            # Nothing points at the rolled-back bundle, and it is gone from disk.
            root = deploy_dir(agent.config)
            assert not (root / "current.json").exists()
            listener.wait_for(lambda: not (root / "bundles" / result.deploy_id).exists())
            # A second, good deploy is accepted afterwards.
            assert deploy_bundle(bundles["v2"], BROKER, fleet, "pi-d", timeout_s=60).ok
    finally:
        listener.close()


def _send_archive(
    client: CommandClient, archive: bytes, deploy_id: str, *, sha256: str | None = None
) -> msg.CommandReply:
    """begin + one chunk + commit, by hand; returns the commit's reply."""
    begin = client.call(
        "deploy_begin",
        {
            "deploy": deploy_id,
            "size": len(archive),
            "sha256": sha256 or hashlib.sha256(archive).hexdigest(),
            "chunks": 1,
            "chunk_bytes": len(archive),
        },
    )
    assert begin.ok, begin.error
    chunk = client.call(
        "deploy_chunk",
        {
            "deploy": deploy_id,
            "index": 0,
            "data": base64.b64encode(archive).decode(),
            "sha256": hashlib.sha256(archive).hexdigest(),
        },
    )
    assert chunk.ok, chunk.error
    # A chunk delivered twice is acknowledged twice and stored once.
    again = client.call("deploy_chunk", {**chunk_args(archive, deploy_id)})
    assert again.ok and again.result["received"] == 1
    return client.call("deploy_commit", {"deploy": deploy_id}, timeout_s=30)


def chunk_args(archive: bytes, deploy_id: str) -> dict[str, Any]:
    return {
        "deploy": deploy_id,
        "index": 0,
        "data": base64.b64encode(archive).decode(),
        "sha256": hashlib.sha256(archive).hexdigest(),
    }


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buf.getvalue()


def test_damaged_or_hostile_archives_and_failing_self_tests_are_refused_before_the_swap(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    fleet = _fleet()
    listener = FleetListener(fleet)
    good = pack_bundle(bundles["v2"])
    # A bundle whose manifest promises 16 features while its model takes 8: its self-test
    # inference fails on the device.
    lying = tmp_path / "lying"
    shutil.copytree(bundles["narrow"], lying)
    manifest = json.loads((lying / MANIFEST_NAME).read_text())
    manifest["io"] = json.loads((bundles["v2"] / MANIFEST_NAME).read_text())["io"]
    (lying / MANIFEST_NAME).write_text(json.dumps(manifest))
    try:
        with _device(bundles["v1"], tmp_path / "state", fleet) as (agent, traffic):
            with CommandClient(BROKER, fleet, "pi-d") as client:
                # The archive does not match the SHA-256 announced at begin.
                damaged = bytearray(good)
                damaged[len(damaged) // 2] ^= 0xFF
                reply = _send_archive(
                    client, bytes(damaged), "bad-hash", sha256=hashlib.sha256(good).hexdigest()
                )
                assert reply.ok and reply.result["state"] == "failed"
                assert "SHA-256" in reply.result["reason"]
                # A path that climbs out of the staging folder.
                evil = _tar([(tarfile.TarInfo("../../evil.txt"), b"x")])
                reply = _send_archive(client, evil, "traversal")
                assert reply.result["state"] == "failed"
                assert "not a relative path" in reply.result["reason"]
                assert not (tmp_path / "evil.txt").exists()
                # Files verified by hash, but the model cannot run what its manifest declares.
                reply = _send_archive(client, pack_bundle(lying), "self-test")
                assert reply.result["state"] == "failed"
                assert "self-test" in reply.result["reason"]
                # Ids that would name the deploy folder itself or its parent.
                for dots in (".", "..", ".hidden"):
                    for action in ("deploy_begin", "deploy_commit", "deploy_abort"):
                        refused = client.call(action, {"deploy": dots})
                        assert not refused.ok and "must not start with '.'" in (
                            refused.error or ""
                        ), (action, dots, refused)
                # Commands that make no sense are errors, not crashes.
                missing = client.call("deploy_commit", {"deploy": "nothing-here"})
                assert not missing.ok and "deploy_begin" in (missing.error or "")
                huge = client.call(
                    "deploy_begin",
                    {
                        "deploy": "huge",
                        "size": 2**40,
                        "sha256": "0" * 64,
                        "chunks": 2**23,
                        "chunk_bytes": 2**17,
                    },
                )
                assert not huge.ok and "'size'" in (huge.error or "")
                small = _tar([(tarfile.TarInfo("f"), b"abc")])
                assert client.call(
                    "deploy_begin",
                    {
                        "deploy": "garbled",
                        "size": len(small),
                        "sha256": hashlib.sha256(small).hexdigest(),
                        "chunks": 1,
                        "chunk_bytes": len(small),
                    },
                ).ok
                garbled = client.call(
                    "deploy_chunk", {**chunk_args(small, "garbled"), "sha256": "1" * 64}
                )
                assert not garbled.ok and "damaged in transit" in (garbled.error or "")
                early = client.call("deploy_commit", {"deploy": "garbled"})
                assert not early.ok and "1 of 1 chunks missing" in (early.error or "")
            events = listener.wait_for(
                lambda: [
                    s.deploy
                    for s in listener.of(msg.StatusMessage)
                    if s.deploy and s.deploy.id == "self-test"
                ]
            )
            assert events[0].state == "failed"
            traffic.wait_count(5)
            assert traffic.failures == []
            assert agent.bundle.manifest.model.version == "1"
            assert not (deploy_dir(agent.config) / "bundles").exists() or not any(
                (deploy_dir(agent.config) / "bundles").iterdir()
            )
    finally:
        listener.close()


def test_an_interrupted_upload_resumes_with_the_chunks_already_sent(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    fleet = _fleet()
    archive = pack_bundle(bundles["v2"])
    assert pack_bundle(bundles["v2"]) == archive  # the same bundle packs to the same bytes
    deploy_id = f"d{hashlib.sha256(archive).hexdigest()[:24]}"  # the id deploy_bundle uses
    size = 512
    chunks = -(-len(archive) // size)
    with _device(bundles["v1"], tmp_path / "state", fleet) as (agent, _):
        with CommandClient(BROKER, fleet, "pi-d") as client:
            begin = {
                "deploy": deploy_id,
                "size": len(archive),
                "sha256": hashlib.sha256(archive).hexdigest(),
                "chunks": chunks,
                "chunk_bytes": size,
            }
            assert client.call("deploy_begin", begin).ok
            for i in range(2):
                part = archive[i * size : (i + 1) * size]
                assert client.call(
                    "deploy_chunk",
                    {
                        "deploy": deploy_id,
                        "index": i,
                        "data": base64.b64encode(part).decode(),
                        "sha256": hashlib.sha256(part).hexdigest(),
                    },
                ).ok
            status = client.call("deploy_status", {"deploy": deploy_id}).result
            assert (status["state"], status["received"]) == ("receiving", 2)
        # The host starts over with the same bundle and chunk size: 2 chunks are not resent.
        result = deploy_bundle(bundles["v2"], BROKER, fleet, "pi-d", chunk_bytes=size, timeout_s=60)
        assert result.ok, result
        assert result.chunks_sent == chunks - 2
        assert agent.bundle.manifest.model.version == "2"


def test_unpack_refuses_links_and_oversized_archives(tmp_path: Path) -> None:
    link = tarfile.TarInfo("model.onnx")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    (tmp_path / "a.tar").write_bytes(_tar([(link, None)]))
    with pytest.raises(BundleError, match="link or special file"):
        unpack_archive(tmp_path / "a.tar", tmp_path / "a", max_bytes=1 << 20)
    big = _tar([(tarfile.TarInfo("f"), b"0" * 4096)])
    (tmp_path / "b.tar").write_bytes(big)
    with pytest.raises(BundleError, match="more than 1024 bytes"):
        unpack_archive(tmp_path / "b.tar", tmp_path / "b", max_bytes=1024)
    twice = _tar([(tarfile.TarInfo("f"), b"1"), (tarfile.TarInfo("./f"), b"2")])
    (tmp_path / "c.tar").write_bytes(twice)
    with pytest.raises(BundleError, match="appears twice"):
        unpack_archive(tmp_path / "c.tar", tmp_path / "c", max_bytes=1024)
    folders = []
    for i in range(6):
        info = tarfile.TarInfo(f"d{i}")
        info.type = tarfile.DIRTYPE
        folders.append((info, None))
    (tmp_path / "e.tar").write_bytes(_tar(folders))
    with pytest.raises(BundleError, match="more than 5 entries"):  # folders use inodes too
        unpack_archive(tmp_path / "e.tar", tmp_path / "e", max_bytes=1 << 20, max_files=5)
    (tmp_path / "d.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(BundleError, match="not a tar archive"):
        unpack_archive(tmp_path / "d.tar", tmp_path / "d", max_bytes=1 << 20)


def test_with_trusted_keys_only_a_bundle_signed_by_them_is_deployed(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    from sdk.signing import generate_signing_key, sign_bundle

    trusted = generate_signing_key(tmp_path / "keys", "fleet")
    other = generate_signing_key(tmp_path / "keys", "other")
    assert trusted.public is not None
    signed_v1 = tmp_path / "v1"
    shutil.copytree(bundles["v1"], signed_v1)
    sign_bundle(signed_v1, trusted.private)
    unsigned = bundles["v2"]
    wrongly = tmp_path / "v2-other"
    shutil.copytree(bundles["v2"], wrongly)
    sign_bundle(wrongly, other.private)
    good = tmp_path / "v2-fleet"
    shutil.copytree(bundles["v2"], good)
    sign_bundle(good, trusted.private)
    fleet = _fleet()
    keys = (str(trusted.public),)
    with _device(signed_v1, tmp_path / "state", fleet, trusted_keys=keys) as (agent, traffic):
        for bundle in (unsigned, wrongly):
            result = deploy_bundle(bundle, BROKER, fleet, "pi-d", timeout_s=60)
            assert result.state == "failed", result
            assert result.reason is not None and "sign" in result.reason
            assert agent.bundle.manifest.model.version == "1"
        result = deploy_bundle(good, BROKER, fleet, "pi-d", timeout_s=60)
        assert result.ok, result
        assert agent.bundle.manifest.model.version == "2"
        assert traffic.failures == []


def test_cli_deploy_exit_codes(bundles: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    from sdk.cli import main

    fleet = _fleet()
    with _device(bundles["v1"], tmp_path / "state", fleet) as (agent, _):
        base = ["--device", "pi-d", "--broker", BROKER, "--fleet", fleet, "--timeout", "60"]
        assert main(["deploy", str(bundles["narrow"]), *base]) == 1
        out = capsys.readouterr()
        assert "rolled back" in out.out and "reason:" in out.out
        judged = ["--probation", "inferences=30", "--probation", "max_latency_ratio=3"]
        r = tmp_path / "r.json"
        assert main(["deploy", str(bundles["v2"]), *base, *judged, "--json", str(r)]) == 0
        out = capsys.readouterr().out
        assert "applied (v1 -> v2)" in out and "reason:" in out, out
        assert json.loads(r.read_text())["state"] == "applied"
        # The device judged as asked: 30 calls, not its own default of 20.
        assert "healthy over 30 calls" in json.loads(r.read_text())["reason"]
        assert agent.bundle.manifest.model.version == "2"
    assert main(["deploy", str(tmp_path / "nope"), *base]) == 2
    assert "bundle directory not found" in capsys.readouterr().err
    for bad in ("seconds", "colour=red", "max_class_shift=2", "quiet=maybe", "inferences=nan"):
        assert main(["deploy", str(bundles["v2"]), *base, "--probation", bad]) == 2, bad
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--probation" in err, err
    assert main(["deploy", str(bundles["v2"]), *base[:2], "--broker", "http://x"]) == 2


def test_probation_inference_errors_of_the_callers_own_making_do_not_roll_back(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    fleet = _fleet()
    with _device(bundles["v1"], tmp_path / "state", fleet) as (agent, traffic):
        result = deploy_bundle(
            bundles["v2"], BROKER, fleet, "pi-d", timeout_s=60, wait_probation=False
        )
        assert result.state in ("probation", "applied")
        # Bad input fails on both models: the caller gets the error, the deploy stays.
        with pytest.raises(EdgeshipError, match="shape"):
            agent.predict({"x": np.zeros((1, 3), np.float32)})
        traffic.wait_count(25)
        assert agent.bundle.manifest.model.version == "2"
        assert traffic.failures == []


def test_the_digits_cnn_with_its_outlier_detector_deploys_and_keeps_scoring(
    digits_bundle: Path, digits_splits: Any, tmp_path: Path
) -> None:
    """The real model of the demo: a CNN whose bundle carries an outlier detector. A rebuilt
    version 2 swaps in under traffic; every call before, during and after gets scores."""
    from sdk.zoo.digits import INPUT_NAME

    v2 = tmp_path / "digits-v2"
    shutil.copytree(digits_bundle, v2)
    manifest = json.loads((v2 / MANIFEST_NAME).read_text())
    manifest["model"]["version"] = "2"  # the manifest is not hashed; no trusted keys here
    (v2 / MANIFEST_NAME).write_text(json.dumps(manifest))
    fleet = _fleet()
    cfg = AgentConfig(
        device_id="pi-d", fleet=fleet, broker_url=BROKER, window_s=0.3, state_dir=tmp_path / "s"
    )
    samples = digits_splits.x_test[:50]
    results: list[Any] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    with Agent.from_bundle(digits_bundle, cfg) as agent:

        def app() -> None:
            i = 0
            while not stop.is_set():
                try:
                    results.append(agent.predict({INPUT_NAME: samples[i % 50 : i % 50 + 1]}))
                except Exception as exc:
                    failures.append(exc)
                i += 1
                time.sleep(0.002)

        thread = threading.Thread(target=app, daemon=True)
        thread.start()
        try:
            assert wait_connected(agent)
            result = deploy_bundle(v2, BROKER, fleet, "pi-d", timeout_s=60)
            n = len(results)
            deadline = time.monotonic() + 20
            while len(results) < n + 20 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join(5)
        assert result.state == "applied", result
        assert agent.bundle.manifest.model.version == "2"
    assert failures == [], failures[:3]
    assert len(results) >= n + 20, (len(results), n)
    assert all(r.scores is not None and r.labels is not None for r in results)


def test_new_class_labels_start_a_new_window(bundles: dict[str, Path], tmp_path: Path) -> None:
    """A bundle with other class labels: the window open at the swap is closed under the old
    model, so no telemetry window names one model's predictions with the other's labels."""
    fleet = _fleet()
    listener = FleetListener(fleet)
    try:
        with _device(bundles["v1"], tmp_path / "state", fleet) as (agent, traffic):
            result = deploy_bundle(bundles["relabelled"], BROKER, fleet, "pi-d", timeout_s=60)
            assert result.ok, result
            traffic.wait_count(50)
            assert traffic.failures == []
            assert (agent.predict({"x": traffic.x}).labels or [""])[0] in {"w", "x", "y", "z"}
            listener.wait_for(
                lambda: [
                    t
                    for t in listener.of(msg.TelemetryMessage)
                    if t.model_version == "4" and t.inferences
                ]
            )
        windows = [t for t in listener.of(msg.TelemetryMessage) if t.inferences]
        old = [t for t in windows if t.model_version == "1"]
        new = [t for t in windows if t.model_version == "4"]
        assert old and new and len(old) + len(new) == len(windows)
        assert all(set(t.predictions) <= set(LABELS) for t in old)
        assert all(set(t.predictions) <= {"w", "x", "y", "z"} for t in new)
    finally:
        listener.close()


def test_edgeship_agent_run_restarts_with_the_deployed_bundle_and_says_so(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """The service on the board: deploy into a running ``edgeship-agent run`` (inputs replayed
    from a file), stop it with SIGTERM, start it again with the same ``--bundle``: it runs the
    deployed bundle, logs why, and serves it on its HTTP endpoint. Started without
    ``--bundle`` (a board provisioned only by remote deploy) it runs the deployed bundle too;
    ``check`` without BUNDLE checks that one and ``status`` shows it and the previous one.
    Once the deployed bundle no longer verifies, ``run`` without ``--bundle`` refuses to start
    with one line, and ``check`` falls back to the configured bundle as ``run`` would."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from tests.brokers import free_port

    fleet = _fleet()
    replay = tmp_path / "inputs.npz"
    np.savez(replay, x=np.random.default_rng(1).random((32, FEATURES), dtype=np.float32))
    port = free_port()
    command = [
        sys.executable, "-m", "device_agent.cli", "run", "--bundle", str(bundles["v1"]),
        "--broker", BROKER, "--fleet", fleet, "--device-id", "pi-svc",
        "--state-dir", str(tmp_path / "state"), "--http", f"127.0.0.1:{port}",
        "--replay", str(replay), "--replay-rate", "100",
    ]  # fmt: skip
    env = {**os.environ, "EDGESHIP_AGENT_DEPLOY_PROBATION_INFERENCES": "10"}

    def health() -> dict[str, Any]:
        url = f"http://127.0.0.1:{port}/v1/health"
        with urllib.request.urlopen(url, timeout=5) as response:
            return dict(json.loads(response.read()))

    def start(argv: list[str] = command) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if health().get("connected"):
                    return proc
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout
            time.sleep(0.1)

    def stop(proc: subprocess.Popen[str]) -> str:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        return out

    proc = start()
    try:
        assert health()["model_version"] == "1"
        result = deploy_bundle(bundles["v2"], BROKER, fleet, "pi-svc", timeout_s=60)
        assert result.ok, result
        assert health()["model_version"] == "2"
    finally:
        first_log = stop(proc)
    assert "deploy d" in first_log and "applied" in first_log
    proc = start()
    try:
        assert health()["model_version"] == "2"
    finally:
        second_log = stop(proc)
    assert f"deployed remotely as {result.deploy_id}" in second_log
    assert "takes precedence over the configured bundle" in second_log
    # No --bundle: the board runs what was deployed to it.
    no_bundle = [a for a in command if a != str(bundles["v1"]) and a != "--bundle"]
    proc = start(no_bundle)
    try:
        assert health()["model_version"] == "2"
    finally:
        third_log = stop(proc)
    assert "no bundle configured" in third_log
    where = ["--fleet", fleet, "--device-id", "pi-svc", "--state-dir", str(tmp_path / "state")]
    agent_cli = [sys.executable, "-m", "device_agent.cli"]

    def cli(*argv: str, bundle_env: str | None = None) -> subprocess.CompletedProcess[str]:
        env2 = dict(env)
        env2.pop("EDGESHIP_AGENT_BUNDLE", None)
        if bundle_env is not None:
            env2["EDGESHIP_AGENT_BUNDLE"] = bundle_env
        return subprocess.run(
            [*agent_cli, *argv], env=env2, capture_output=True, text=True, timeout=60
        )

    checked = cli("check", "--runs", "2", *where)
    assert checked.returncode == 0, checked.stderr
    assert "is current (it takes precedence over 'bundle')" in checked.stdout
    assert ": mlp v2 " in checked.stdout and checked.stdout.rstrip().endswith("ok")
    status = cli("status", *where)
    assert status.returncode == 0, status.stderr
    assert f"mlp v2, deploy {result.deploy_id}, applied" in status.stdout
    assert f"previous   mlp v1 ({bundles['v1']})" in status.stdout
    # The deployed bundle damaged on disk: nothing to fall back to without --bundle.
    deployed_manifest = tmp_path / "state" / f"deploy-{fleet}-pi-svc" / "bundles"
    model = next(deployed_manifest.glob("*/*.onnx"))
    model.write_bytes(model.read_bytes()[:-1] + b"x")
    refused = cli(*no_bundle[3:])
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    (error,) = [line for line in refused.stderr.splitlines() if "edgeship-agent: error" in line]
    assert error.startswith("edgeship-agent: error: the deployed bundle in ")
    assert model.name in error and "pass --bundle DIR" in error
    refused = cli("check", *where)
    assert refused.returncode == 2 and "pass --bundle" not in refused.stderr, refused.stderr
    assert refused.stderr.startswith("edgeship-agent: error: the deployed bundle in ")
    fallback = cli("check", "--runs", "2", *where, bundle_env=str(bundles["v1"]))
    assert fallback.returncode == 0, fallback.stderr
    assert "'run' falls back to the configured bundle" in fallback.stdout
    assert ": mlp v1 " in fallback.stdout


def test_edgeship_agent_run_and_check_without_a_bundle_or_a_deploy_say_what_to_do(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh board with neither --bundle nor a deployed bundle: one line, exit 2."""
    import os

    from device_agent.cli import main

    for key in [k for k in os.environ if k.startswith("EDGESHIP_AGENT_")]:
        monkeypatch.delenv(key)
    where = ["--fleet", "f", "--device-id", "d", "--state-dir", str(tmp_path)]
    assert main(["run", "--http", "off", *where]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "no bundle to run: pass --bundle DIR" in err and "edgeship deploy" in err
    assert str(tmp_path / "deploy-f-d") in err
    assert main(["check", *where]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to check: give BUNDLE" in err, err
    assert main(["status", *where]) == 0
    out = capsys.readouterr().out
    assert "current    none deployed; 'run' uses the setting bundle (None)" in out


# --- issue 11: deploy arguments, self-tests and bookkeeping -------------------------------------


def _call(agent: Agent, action: str, args: dict[str, Any]) -> Any:
    """A deploy handler called as the agent's command loop calls it."""
    command = msg.Command(id=uuid.uuid4().hex[:12], action=action, ts=time.time(), args=args)
    return agent.command_handlers[action](command)


def test_deploy_bookkeeping_is_bounded_whatever_begin_claims(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Finding 4: ``chunk_bytes: 1`` with an 8 MiB ``size`` made commit build a list of 8 Mi
    missing chunk numbers (RSS 82 -> 411 MB) before any signature check. Chunks are now at
    least MIN_CHUNK_BYTES (a one-chunk deploy excepted), at most MAX_CHUNKS, and an upload's
    bookkeeping is a bitmap: the largest one costs kilobytes."""
    import tracemalloc

    from device_agent.deploy import MAX_CHUNKS, MIN_CHUNK_BYTES, DeployError

    size = 8 * 2**20
    cfg = AgentConfig(device_id="pi-m", state_dir=tmp_path / "state")
    with Agent.from_bundle(bundles["v1"], cfg) as agent:
        begin = {"deploy": "tiny-chunks", "size": size, "sha256": "0" * 64}
        with pytest.raises(DeployError, match=f"below the minimum of {MIN_CHUNK_BYTES}"):
            _call(agent, "deploy_begin", {**begin, "chunks": size, "chunk_bytes": 1})
        with pytest.raises(DeployError, match=f"over the limit of {MAX_CHUNKS}"):
            _call(agent, "deploy_begin", {**begin, "size": size + 1, "chunks": MAX_CHUNKS + 1,
                                          "chunk_bytes": MIN_CHUNK_BYTES})  # fmt: skip
        # The most chunks a deploy may have: begin, status and a premature commit stay small.
        tracemalloc.start()
        try:
            args = {**begin, "chunks": MAX_CHUNKS, "chunk_bytes": MIN_CHUNK_BYTES}
            assert _call(agent, "deploy_begin", args)["have"] == []
            assert _call(agent, "deploy_status", {"deploy": "tiny-chunks"})["received"] == 0
            with pytest.raises(DeployError, match=f"{MAX_CHUNKS} of {MAX_CHUNKS} chunks missing"):
                _call(agent, "deploy_commit", {"deploy": "tiny-chunks"})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2**20, peak
        # A small archive still goes in one chunk of its own size.
        one = _tar([(tarfile.TarInfo("f"), b"abc")])[:300]
        args = {"deploy": "one", "size": 300, "sha256": hashlib.sha256(one).hexdigest()}
        assert _call(agent, "deploy_begin", {**args, "chunks": 1, "chunk_bytes": 300})


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"model": "\ud800"}, "'model'"),
        ({"model": "mlp\x00"}, "'model'"),
        ({"model_version": "1\n2"}, "'model_version'"),
        ({"model_version": "v" * 65}, "'model_version'"),
        ({"model": ["mlp"]}, "'model'"),
        ({"size": "1024"}, "'size'"),
        ({"size": float("nan")}, "'size'"),
        ({"chunks": 10**30}, "'chunks'"),
        ({"chunk_bytes": True}, "'chunk_bytes'"),
        ({"sha256": None}, "'sha256'"),
        ({"deploy": "\ud800"}, "deploy"),
        ({"deploy": {"a": 1}}, "deploy"),
    ],
)
def test_every_deploy_begin_argument_is_checked_at_the_door(
    bundles: dict[str, Path], tmp_path: Path, args: dict[str, Any], needle: str
) -> None:
    """Finding 3: ``"model": "\\ud800"`` was accepted and, once a commit failed, its deploy
    event could not be encoded: the events and telemetry threads died. Every argument is now
    checked for type, range and encodability before anything is written."""
    from device_agent.deploy import DeployError

    good = {"deploy": "d1", "size": 2048, "sha256": "0" * 64, "chunks": 4, "chunk_bytes": 512}
    cfg = AgentConfig(device_id="pi-m", state_dir=tmp_path / "state")
    with Agent.from_bundle(bundles["v1"], cfg) as agent:
        with pytest.raises(DeployError) as info:
            _call(agent, "deploy_begin", {**good, **args})
        assert needle in str(info.value)
        str(info.value).encode("utf-8")
        assert not (deploy_dir(agent.config) / "staging").exists()
        assert _call(agent, "deploy_begin", good)["state"] == "receiving"


def _tar_dir(root: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """Every file under ``root`` as a tar, unverified (pack_bundle refuses bad bundles)."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        entries.append((tarfile.TarInfo(path.relative_to(root).as_posix()), path.read_bytes()))
    for name, data in (extra or {}).items():
        entries.append((tarfile.TarInfo(name), data))
    return _tar(entries)


def test_a_self_test_that_raises_anything_is_a_refusal_and_the_agent_keeps_answering(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 3 (deploy side) and finding 2 (the unpacker): a manifest whose input shape is
    [1, 10**12] made the self-test raise MemoryError, which killed the command thread and left
    the unpacked folder behind; now the manifest is refused at load. A self-test that raises
    anything else (a MemoryError injected into its input generator) is a refusal with the
    reason too, and an archive with a file the manifest does not list is refused by name. Each
    time the folder is removed and the next deploy is applied."""
    huge = tmp_path / "huge"
    shutil.copytree(bundles["v2"], huge)
    manifest = json.loads((huge / MANIFEST_NAME).read_text())
    manifest["io"]["inputs"][0]["shape"] = [1, 10**12]
    (huge / MANIFEST_NAME).write_text(json.dumps(manifest))
    fleet = _fleet()
    with _device(bundles["v1"], tmp_path / "state", fleet) as (agent, traffic):
        bundles_dir = deploy_dir(agent.config) / "bundles"
        with CommandClient(BROKER, fleet, "pi-d") as client:
            assert not client.call("deploy_commit", {"deploy": "x"}, timeout_s=10).ok
            reply = _send_archive(client, _tar_dir(huge), "huge-shape")
            assert reply.ok and reply.result["state"] == "failed", reply
            assert "io.inputs[0].shape" in reply.result["reason"]
            assert not (bundles_dir / "huge-shape").exists()
            unlisted = _tar_dir(bundles["v2"], {"w.bin": b"weights the manifest does not list"})
            reply = _send_archive(client, unlisted, "unlisted")
            assert reply.result["state"] == "failed", reply
            assert "'w.bin'" in reply.result["reason"] and "not listed" in reply.result["reason"]
            assert not (bundles_dir / "unlisted").exists()
            import device_agent.benchmark as benchmark

            def out_of_memory(*args: Any, **kwargs: Any) -> Any:
                raise MemoryError("Unable to allocate 3.64 TiB")

            monkeypatch.setattr(benchmark, "sample_inputs", out_of_memory)
            reply = _send_archive(client, pack_bundle(bundles["v2"]), "oom")
            assert reply.result["state"] == "failed", reply
            assert "self-test" in reply.result["reason"]
            assert "MemoryError: Unable to allocate" in reply.result["reason"]
            assert not (bundles_dir / "oom").exists()
            monkeypatch.undo()
            status = client.call("deploy_status", {"deploy": "oom"}, timeout_s=10)
            assert status.ok and status.result["state"] == "failed"
        result = deploy_bundle(bundles["v2"], BROKER, fleet, "pi-d", timeout_s=60)
        assert result.ok, result
        assert agent.bundle.manifest.model.version == "2"
        traffic.wait_count(5)
        assert traffic.failures == []


# --- the commands' types and their documentation --------------------------------------------


def test_docs_describe_every_deploy_argument_and_result_field() -> None:
    """docs/agent.md's table of deploy actions names every argument and result field of the
    types in device_agent.contracts.commands, in the row of the action that uses it, and
    protocol.md lists every action."""
    import dataclasses
    import re

    from device_agent.contracts import commands as cmds

    repo = Path(__file__).resolve().parent.parent
    agent_md = (repo / "docs" / "agent.md").read_text()
    rows = {
        m.group(1): m.group(0) for m in re.finditer(r"^\| `(deploy_[a-z]+)` \|.*$", agent_md, re.M)
    }
    A = cmds.Action
    uses: dict[A, tuple[type, ...]] = {
        A.DEPLOY_BEGIN: (cmds.DeployBegin, cmds.ReceivingReply),
        A.DEPLOY_CHUNK: (cmds.DeployChunk, cmds.ChunkReply),
        A.DEPLOY_COMMIT: (cmds.DeployRef,),
        A.DEPLOY_STATUS: (cmds.DeployRef, cmds.DeployRecord),
        A.DEPLOY_ABORT: (cmds.DeployRef,),
        A.DEPLOY_REVERT: (cmds.DeployRevert,),
    }
    # deploy_status answers "the commit's fields plus ...": its row and the commit's together.
    rows["deploy_status"] += rows["deploy_commit"]
    for action, types in uses.items():
        row = rows[action.value]
        for kind in types:
            names = (
                [f.name for f in dataclasses.fields(kind)]
                if dataclasses.is_dataclass(kind)
                else list(kind.__annotations__)
            )
            for name in names:
                assert re.search(rf"\b{name}\b", row), f"{action.value}: {name!r} not in docs"
    for key in cmds.BenchmarkArgs.KEYS:
        assert f"| `{key}` |" in agent_md, f"benchmark argument {key!r} not in docs/agent.md"
    protocol_md = (repo / "docs" / "protocol.md").read_text()
    for action in A:
        assert f"`{action.value}`" in protocol_md, action


def test_the_host_sends_the_deploy_arguments_the_device_parses() -> None:
    """The args the host builds parse back to the same values on the device, in the order
    they had before they were types (the wire is byte-for-byte the same)."""
    from device_agent.contracts import commands as cmds

    begin = cmds.DeployBegin("d1", 1000, "a" * 64, 2, 512, "mlp", "2")
    args = begin.to_args()
    assert list(args) == [
        "deploy",
        "size",
        "sha256",
        "chunks",
        "chunk_bytes",
        "model",
        "model_version",
    ]
    assert cmds.DeployBegin.parse(args, max_bytes=10_000) == begin
    chunk = cmds.DeployChunk("d1", 1, base64.b64encode(b"x").decode(), "b" * 64)
    assert list(chunk.to_args()) == ["deploy", "index", "data", "sha256"]
    assert cmds.DeployChunk.parse(chunk.to_args(), chunks_of=lambda _: 2) == chunk
    assert cmds.DeployRef("d1").to_args() == {"deploy": "d1"}
    assert cmds.DeployRef.parse({}, required=False) == cmds.DeployRef(None)
    revert = cmds.DeployRevert("d1", "alert")
    assert revert.to_args() == {"deploy": "d1", "reason": "alert"}
    assert cmds.DeployRevert.parse(revert.to_args()) == revert
    assert cmds.DeployRevert("d1").to_args() == {"deploy": "d1"}
    with pytest.raises(cmds.DeployError, match="'deploy' is missing"):
        cmds.DeployRef.parse({})
    with pytest.raises(cmds.DeployError, match="must not start with"):
        cmds.DeployRef.parse({"deploy": ".."})
    with pytest.raises(
        cmds.DeployError, match=r"argument 'index': expected an integer in \[0, 1\]"
    ):
        cmds.DeployChunk.parse({**chunk.to_args(), "index": 2}, chunks_of=lambda _: 2)
    # benchmark: what `edgeship bench --device` sends, and the other fields only when set.
    assert cmds.BenchmarkArgs(min_runs=5, min_seconds=1).to_args() == {
        "min_runs": 5,
        "min_seconds": 1,
    }
    again = cmds.BenchmarkArgs.parse(cmds.BenchmarkArgs(warmup_runs=0, max_seconds=9).to_args())
    assert again == cmds.BenchmarkArgs(warmup_runs=0, max_seconds=9)
