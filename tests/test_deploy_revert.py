"""``deploy_revert`` end to end: a real Agent serving inferences on a thread the whole time, the
shared Mosquitto, commands sent as an operator (or a fleet rollout) sends them.

A deploy that was applied and later proved bad is taken back: the bundle before it runs again
with no failed inference, the device reports ``rolled_back`` in its reply, status, telemetry
and retained status, and a restarted agent runs the previous bundle too. The same works after
an agent restart (only ``current.json`` knows the deploy), on probation (as ``deploy_abort``),
twice (the same record), and is refused for a deploy the device does not run or when the
previous bundle cannot run (the current bundle keeps running)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent import Agent
from device_agent.contracts import messages as msg
from device_agent.contracts.commands import (
    MAX_REASON_LEN,
    DeployError,
    DeployRevert,
    ProbationArgs,
    has_bad_text,
)
from device_agent.deploy import deploy_dir, deploy_state
from sdk.deploy import deploy_bundle
from sdk.remote import CommandClient
from tests.brokers import FleetListener
from tests.test_deploy import BROKER, FEATURES, _bundle, _deploy_events, _device, _fleet


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("revert-bundles")
    return {v: _bundle(root, f"v{v}", v, features=FEATURES, seed=int(v)) for v in "123"}


@pytest.fixture
def fleet_messages() -> Iterator[tuple[str, FleetListener]]:
    """A fleet of its own on the shared Mosquitto, and every message of it."""
    name = _fleet()
    listener = FleetListener(name)
    try:
        yield name, listener
    finally:
        listener.close()


def _call(fleet: str, action: str, args: dict[str, Any]) -> msg.CommandReply:
    with CommandClient(BROKER, fleet, "pi-d") as client:
        return client.call(action, args, timeout_s=30)


def _revert(fleet: str, deploy_id: str, reason: str | None = None) -> msg.CommandReply:
    return _call(fleet, "deploy_revert", DeployRevert(deploy_id, reason).to_args())


def _pointer(agent: Agent) -> dict[str, Any] | None:
    path = deploy_dir(agent.config) / "current.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_revert_of_an_applied_deploy_runs_the_previous_bundle_again(
    bundles: dict[str, Path], tmp_path: Path, fleet_messages: tuple[str, FleetListener]
) -> None:
    (fleet, listener), state = fleet_messages, tmp_path / "state"
    with _device(bundles["1"], state, fleet) as (agent, traffic):
        v1_out = traffic.outputs[-1]
        v2 = deploy_bundle(bundles["2"], BROKER, fleet, "pi-d", timeout_s=60)
        assert v2.state == "applied", v2
        assert _pointer(agent) is not None
        traffic.wait_count(5)
        assert not np.allclose(traffic.outputs[-1], v1_out)
        # Unknown ids are refused, saying what runs; nothing changes.
        unknown = _revert(fleet, "never-deployed")
        assert not unknown.ok
        assert f"running: mlp@2 from deploy {v2.deploy_id}" in (unknown.error or ""), unknown
        assert agent.bundle.manifest.model.version == "2"
        bad = _call(fleet, "deploy_revert", {"deploy": v2.deploy_id, "reason": "a\nb"})
        assert not bad.ok and "'reason'" in (bad.error or ""), bad
        assert agent.bundle.manifest.model.version == "2"

        reply = _revert(fleet, v2.deploy_id, "alert outlier_rate during the soak")
        assert reply.ok, reply.error
        rec = reply.result
        assert rec["state"] == "rolled_back", rec
        assert rec["reason"] == "reverted by the operator: alert outlier_rate during the soak"
        assert (rec["from_version"], rec["to_version"]) == ("1", "2")
        assert agent.bundle.manifest.model.version == "1"
        traffic.wait_count(5)
        assert np.allclose(traffic.outputs[-1], v1_out)
        # The previous bundle was the one the agent was given: a restart must run that one.
        assert _pointer(agent) is None
        # The reverted bundle's folder is no longer protected: the next deploy prunes it.
        assert deploy_state(agent.config)["unapplied"] == [v2.deploy_id]
        # A repeat (a rollout resumed, a QoS 1 redelivery under a new id) gets the same record.
        again = _revert(fleet, v2.deploy_id, "another reason")
        assert again.ok and again.result == rec, again
        status = _call(fleet, "deploy_status", {"deploy": v2.deploy_id})
        assert status.ok and status.result["state"] == "rolled_back", status
        assert status.result["model_version"] == "1"

        event = listener.wait_for(lambda: _deploy_events(listener, "rolled_back"))[0]
        assert (event.id, event.from_version, event.to_version) == (v2.deploy_id, "1", "2")
        assert event.reason == rec["reason"]
        retained = listener.wait_for(
            lambda: [
                s
                for s in listener.of(msg.StatusMessage)
                if s.deploy and s.deploy.state == "rolled_back"
            ]
        )
        assert retained[-1].model_version == "1"
        listener.wait_for(
            lambda: [t for t in listener.of(msg.TelemetryMessage) if t.model_version == "1"]
        )
        v3 = deploy_bundle(bundles["3"], BROKER, fleet, "pi-d", timeout_s=60)
        assert v3.state == "applied", v3
        assert not (deploy_dir(agent.config) / "bundles" / v2.deploy_id).exists()
        assert traffic.failures == []
    # A restart runs v3, the deploy applied after the revert.
    with _device(bundles["1"], state, fleet) as (agent, traffic):
        assert agent.bundle.manifest.model.version == "3"


def test_revert_after_a_restart_goes_back_to_the_deployed_bundle_before_it(
    bundles: dict[str, Path], tmp_path: Path, fleet_messages: tuple[str, FleetListener]
) -> None:
    (fleet, listener), state = fleet_messages, tmp_path / "state"
    with _device(bundles["1"], state, fleet) as (agent, traffic):
        v2 = deploy_bundle(bundles["2"], BROKER, fleet, "pi-d", timeout_s=60)
        v3 = deploy_bundle(bundles["3"], BROKER, fleet, "pi-d", timeout_s=60)
        assert (v2.state, v3.state) == ("applied", "applied"), (v2, v3)
        traffic.wait_count(5)
        v2_model = deploy_dir(agent.config) / "bundles" / v2.deploy_id / "model.onnx"
        assert v2_model.is_file()
    # The restarted agent runs v3; only current.json knows its deploy.
    with _device(bundles["1"], state, fleet) as (agent, traffic):
        assert agent.bundle.manifest.model.version == "3"
        v3_out = traffic.outputs[-1]
        status = _call(fleet, "deploy_status", {"deploy": v3.deploy_id})
        assert status.ok, status.error
        assert status.result["state"] == "applied" and status.result["to_version"] == "3"
        assert not _call(fleet, "deploy_status", {"deploy": v2.deploy_id}).ok
        # The previous bundle cannot run (damaged on disk): refused, v3 keeps running.
        good = v2_model.read_bytes()
        v2_model.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        refused = _revert(fleet, v3.deploy_id)
        assert not refused.ok
        assert "previous bundle" in (refused.error or "") and "cannot run" in (refused.error or "")
        assert "mlp v3 keeps running" in (refused.error or "")
        assert agent.bundle.manifest.model.version == "3"
        assert (_pointer(agent) or {}).get("deploy") == v3.deploy_id
        v2_model.write_bytes(good)

        reply = _revert(fleet, v3.deploy_id, "rollout wave 2 failed")
        assert reply.ok and reply.result["state"] == "rolled_back", reply
        assert (reply.result["from_version"], reply.result["to_version"]) == ("2", "3")
        assert agent.bundle.manifest.model.version == "2"
        traffic.wait_count(5)
        assert not np.allclose(traffic.outputs[-1], v3_out)
        pointer = _pointer(agent)
        assert pointer is not None
        assert (pointer["deploy"], pointer["bundle"]) == (v2.deploy_id, f"bundles/{v2.deploy_id}")
        assert pointer["model_version"] == "2"
        status = _call(fleet, "deploy_status", {"deploy": v2.deploy_id})
        assert status.ok and status.result["state"] == "applied", status
        event = listener.wait_for(lambda: _deploy_events(listener, "rolled_back"))[0]
        assert (event.id, event.from_version, event.to_version) == (v3.deploy_id, "2", "3")
        assert traffic.failures == []
    # A restart runs v2, named by the rewritten current.json.
    with _device(bundles["1"], state, fleet) as (agent, traffic):
        assert agent.bundle.manifest.model.version == "2"
        # The bundle before v2 is not known any more: refused, v2 keeps running.
        refused = _revert(fleet, v2.deploy_id)
        assert not refused.ok and "names no previous bundle" in (refused.error or ""), refused
        assert agent.bundle.manifest.model.version == "2"
        assert traffic.failures == []


def test_revert_during_probation_rolls_back_at_once(
    bundles: dict[str, Path], tmp_path: Path, fleet_messages: tuple[str, FleetListener]
) -> None:
    fleet, listener = fleet_messages
    with _device(bundles["1"], tmp_path / "state", fleet) as (agent, traffic):
        v1_out = traffic.outputs[-1]
        result = deploy_bundle(
            bundles["2"],
            BROKER,
            fleet,
            "pi-d",
            timeout_s=60,
            wait_probation=False,
            probation=ProbationArgs(seconds=600.0),
        )
        assert result.state == "probation", result
        assert agent.bundle.manifest.model.version == "2"
        reply = _revert(fleet, result.deploy_id, "canary alert")
        assert reply.ok and reply.result["state"] == "rolled_back", reply
        assert reply.result["reason"] == "reverted by the operator during probation: canary alert"
        assert agent.bundle.manifest.model.version == "1"
        traffic.wait_count(5)
        assert np.allclose(traffic.outputs[-1], v1_out)
        assert _pointer(agent) is None
        listener.wait_for(
            lambda: not (deploy_dir(agent.config) / "bundles" / result.deploy_id).exists()
        )
        event = listener.wait_for(lambda: _deploy_events(listener, "rolled_back"))[0]
        assert event.reason == reply.result["reason"]
        again = _revert(fleet, result.deploy_id)
        assert again.ok and again.result == reply.result, again
        assert traffic.failures == []


_JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["d1", "\ud800", "a\x00b", "\x1b[31m", "x" * MAX_REASON_LEN, "y" * 1001]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["deploy", "reason", "other"]), _JSONISH, max_size=3),
    st.one_of(st.none(), st.text(max_size=MAX_REASON_LEN + 5)),
)
def test_fuzz_deploy_revert_arguments_are_parsed_or_refused_by_name(
    args: dict[str, Any], reason: str | None
) -> None:
    """Any arguments a deploy_revert can carry (a reason of any text, type or length) are a
    DeployRevert whose reason is 1 to MAX_REASON_LEN printable characters and that round-trips,
    or a DeployError naming the argument: never another exception."""
    for candidate in (args, {**args, "reason": reason}):
        try:
            parsed = DeployRevert.parse(candidate)
        except DeployError as exc:
            assert "deploy" in str(exc) or "'reason'" in str(exc), exc
            str(exc).encode("utf-8")
            continue
        if parsed.reason is not None:
            assert 0 < len(parsed.reason) <= MAX_REASON_LEN
            assert not has_bad_text(parsed.reason)
        assert DeployRevert.parse(parsed.to_args()) == parsed
