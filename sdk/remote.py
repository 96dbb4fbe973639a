"""Asking a device something over MQTT: send a ``cmd``, wait for its ``cmd/reply``.

``edgeship bench --device pi-07 --broker mqtt://hub:1883`` uses :func:`remote_benchmark` to
time the device's bundle on the real board; the reply has the same fields as a host
benchmark report, with ``measured_on`` naming the device.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from device_agent.contracts import messages as msg
from device_agent.errors import ConfigError, EdgeshipError, ProtocolError

__all__ = ["RemoteError", "remote_benchmark", "send_command"]


class RemoteError(EdgeshipError):
    """The device did not answer in time, or answered with an error."""


@dataclass(frozen=True)
class _Broker:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def _parse_url(url: str) -> _Broker:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r}: bad port") from exc
    return _Broker(parts.hostname, port, tls, parts.username, parts.password)


def send_command(
    broker_url: str,
    fleet: str,
    device: str,
    action: str,
    args: dict[str, Any] | None = None,
    *,
    timeout_s: float = 60.0,
    username: str | None = None,
    password: str | None = None,
) -> Any:
    """Send ``action`` to ``device`` and return the reply's ``result``.

    Raises :class:`RemoteError` when no reply comes within ``timeout_s`` (the device is offline
    or too busy) or when the device reports failure.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    broker = _parse_url(broker_url)
    for value, what in ((fleet, "fleet"), (device, "device")):
        try:
            msg.validate_id(value, what)
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from exc
    command = msg.Command(
        id=uuid.uuid4().hex[:16],
        action=action,
        ts=time.time(),
        args=args or {},
        expires=time.time() + timeout_s,
    )
    reply_topic = msg.topic(fleet, device, "cmd/reply")
    done = threading.Event()
    subscribed = threading.Event()
    answer: list[msg.CommandReply] = []

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(reply_topic, qos=1)

    def on_subscribe(client: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
        subscribed.set()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        try:
            decoded = msg.decode(message.topic, message.payload)
        except ProtocolError:
            return
        if isinstance(decoded, msg.CommandReply) and decoded.id == command.id:
            answer.append(decoded)
            done.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"edgeship-cli-{command.id}",
        protocol=mqtt.MQTTv311,
    )
    if broker.tls:
        client.tls_set()
    user = username or broker.username
    if user:
        client.username_pw_set(user, password or broker.password)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        raise RemoteError(f"cannot reach the broker at {broker.host}:{broker.port}: {exc}") from exc
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise RemoteError(
                f"the broker at {broker.host}:{broker.port} did not accept the "
                "subscription to the device's replies"
            )
        client.publish(msg.topic(fleet, device, "cmd"), msg.encode(command), qos=1)
        if not done.wait(timeout_s):
            raise RemoteError(
                f"device {device!r} in fleet {fleet!r} did not answer {action!r} within "
                f"{timeout_s:g} s (is its agent running and connected?)"
            )
    finally:
        client.loop_stop()
        client.disconnect()
    reply = answer[0]
    if not reply.ok:
        raise RemoteError(f"device {device!r} could not {action}: {reply.error}")
    return reply.result


def remote_benchmark(
    broker_url: str,
    fleet: str,
    device: str,
    *,
    min_runs: int = 200,
    min_seconds: float = 3.0,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Benchmark the device's loaded bundle on the device itself; returns the report dict."""
    wait = timeout_s if timeout_s is not None else max(60.0, min_seconds * 4 + 30)
    result = send_command(
        broker_url,
        fleet,
        device,
        "benchmark",
        {"min_runs": min_runs, "min_seconds": min_seconds},
        timeout_s=wait,
    )
    if not isinstance(result, dict) or "latency_ms" not in result:
        raise RemoteError(f"device {device!r} answered the benchmark with something else")
    return result
