"""One MQTT connection watching a fleet: the retained ``status`` of every device (which are
online, and what board each runs on), the collectors' ``alerts`` as they arrive, and a way to
publish the fleet-level retained ``rollouts`` state. Used by the staged rollout
(:mod:`sdk.rollout`) and by ``optimize --device`` (:mod:`sdk.optimize.on_device`)."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from device_agent.contracts import messages as msg
from device_agent.contracts.broker import BrokerUrl
from sdk.remote import connect

__all__ = ["GATING_SEVERITIES", "FleetWatch"]

# Alerts of these severities on a device running a new bundle fail its rollout wave.
GATING_SEVERITIES = ("warning", "critical")


class FleetWatch:
    """One MQTT connection for the rollout: the fleet's retained statuses, the collectors'
    alerts (kept with the time they arrived) and the rollout's own retained messages."""

    def __init__(self, broker_url: str, fleet: str, **auth: Any) -> None:
        self.fleet = fleet
        self._lock = threading.Lock()
        self.statuses: dict[str, msg.StatusMessage] = {}
        self.alerts: list[tuple[float, msg.Alert]] = []
        self._last_status = time.monotonic()
        self._client = connect(
            BrokerUrl.parse(broker_url),
            [msg.subscription(fleet, kind="status"), msg.subscription(fleet, kind="alerts")],
            self._on_message,
            what="the fleet's status and alerts",
            **auth,
        )
        self._topic = msg.topic(fleet, None, "rollouts")

    def _on_message(self, decoded: msg.Message) -> None:
        with self._lock:
            if isinstance(decoded, msg.StatusMessage):
                self.statuses[decoded.device] = decoded
                self._last_status = time.monotonic()
            elif isinstance(decoded, msg.Alert):
                self.alerts.append((time.time(), decoded))

    def online(self, settle_s: float) -> tuple[list[str], list[str]]:
        """The devices whose retained status says online, and the others, once no new status
        came for ``settle_s`` (retained messages arrive in a burst after subscribing)."""
        deadline = time.monotonic() + 10 * settle_s
        while time.monotonic() < deadline:
            with self._lock:
                quiet = time.monotonic() - self._last_status
            if quiet >= settle_s:
                break
            time.sleep(min(0.05, settle_s))
        with self._lock:
            on = sorted(d for d, s in self.statuses.items() if s.state == "online")
            off = sorted(d for d, s in self.statuses.items() if s.state != "online")
        return on, off

    def gating_alert(self, since: dict[str, float]) -> msg.Alert | None:
        """The first firing warning/critical alert about a device of ``since`` (device ->
        when it started receiving the bundle) that arrived after that time."""
        with self._lock:
            for arrived, alert in self.alerts:
                start = since.get(alert.device or "")
                if (
                    start is not None
                    and arrived >= start
                    and alert.state == "firing"
                    and alert.severity in GATING_SEVERITIES
                ):
                    return alert
        return None

    def publish(self, event: msg.RolloutEvent) -> None:
        info = self._client.publish(self._topic, msg.encode(event), qos=1, retain=True)
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(5)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
