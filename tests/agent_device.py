"""A real agent on a private Mosquitto, driven the way an operator drives it: commands published
on its ``cmd`` topic (well-formed or raw bytes), every message of its fleet decoded as it
arrives. Shared by tests/test_agent_commands.py and tests/test_fuzz_commands.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import Agent, AgentConfig
from device_agent.contracts import messages as msg
from tests.brokers import FleetListener, Mosquitto


class _DeviceListener(FleetListener):
    """The fleet's messages but the test's own commands (raw bytes would count as invalid)."""

    def __init__(self, fleet: str, port: int, skip_topic: str) -> None:
        self._skip_topic = skip_topic
        super().__init__(fleet, port=port)

    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        if m.topic != self._skip_topic:
            super()._on_message(client, userdata, m)


class Device:
    """One agent, a listener on its fleet and a raw publisher on its command topic."""

    def __init__(self, agent: Agent, broker: Mosquitto) -> None:
        self.agent = agent
        cfg = agent.config
        self.cmd_topic = msg.topic(cfg.fleet, cfg.device_id, "cmd")
        self.listener = _DeviceListener(cfg.fleet, broker.port, self.cmd_topic)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def close(self) -> None:
        # Disconnect first: loop_stop() then returns at once instead of after paho's 1 s tick.
        for client in (self.client, self.listener.client):
            client.disconnect()
            client.loop_stop()

    # --- sending --------------------------------------------------------------------------

    def send_raw(self, payload: bytes) -> None:
        self.client.publish(self.cmd_topic, payload, qos=1).wait_for_publish(10)

    def send(
        self,
        action: str,
        args: dict[str, Any] | None = None,
        *,
        id: str | None = None,
        expires: float | None = None,
    ) -> str:
        command_id = id or uuid.uuid4().hex[:16]
        command = msg.Command(
            id=command_id, action=action, ts=time.time(), args=args or {}, expires=expires
        )
        self.send_raw(msg.encode(command))
        return command_id

    def call(self, action: str, args: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        """Send one command and return its (single) reply."""
        return self.wait_replies(self.send(action, args), 1, timeout)[0]

    # --- receiving ------------------------------------------------------------------------

    def replies(self, command_id: str) -> list[msg.CommandReply]:
        """The replies to ``command_id`` received so far, a re-sent copy (same seq) once."""
        seen: set[tuple[str, int]] = set()
        out = []
        for r in self.listener.of(msg.CommandReply):
            if r.id == command_id and (r.boot, r.seq) not in seen:
                seen.add((r.boot, r.seq))
                out.append(r)
        return out

    def wait_replies(self, command_id: str, n: int, timeout: float = 30) -> list[msg.CommandReply]:
        self.listener.wait_for(lambda: len(self.replies(command_id)) >= n, timeout)
        return self.replies(command_id)

    def telemetry_after(self, t: float, timeout: float = 30) -> msg.TelemetryMessage:
        """A telemetry window sent after wall time ``t``."""
        found = self.listener.wait_for(
            lambda: [m for m in self.listener.of(msg.TelemetryMessage) if m.ts > t], timeout
        )
        return found[0]  # type: ignore[no-any-return]


def wait_until_serving(device: Device, timeout: float = 30) -> None:
    """Until the agent answers a ping: connected and subscribed to its command topic (a
    command published before its subscription would not reach it). Its birth comes after its
    subscription on the same connection, so the first ping after the birth is normally it."""
    boot = device.agent.boot
    device.listener.wait_for(
        lambda: any(s.boot == boot for s in device.listener.of(msg.StatusMessage)), timeout
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        command_id = device.send("ping")
        try:
            device.wait_replies(command_id, 1, timeout=1)
            return
        except AssertionError:
            continue
    raise AssertionError("the agent never answered a ping")


@contextmanager
def running_device(bundle: Path, broker: Mosquitto, state: Path, **config: Any) -> Iterator[Device]:
    cfg = AgentConfig(
        device_id="pi-c",
        fleet=f"t{uuid.uuid4().hex[:10]}",
        broker_url=broker.url,
        window_s=0.3,
        state_dir=state,
        **config,
    )
    agent = Agent.from_bundle(bundle, cfg).start()
    device = Device(agent, broker)
    try:
        wait_until_serving(device)
        yield device
    finally:
        agent.close()
        device.close()
