"""Asking a device something over MQTT: send a ``cmd``, wait for its ``cmd/reply``.

``edgeship bench --device pi-07 --broker mqtt://hub:1883`` uses :func:`remote_benchmark` to
time the device's bundle on the real board; the reply has the same fields as a host
benchmark report, with ``measured_on`` naming the device.
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from device_agent.contracts import messages as msg
from device_agent.contracts.broker import BrokerUrl
from device_agent.contracts.commands import Action, BenchmarkArgs
from device_agent.errors import ConfigError, EdgeshipError, ProtocolError

__all__ = [
    "BrokerUnavailableError",
    "CommandClient",
    "RemoteError",
    "connect",
    "remote_benchmark",
    "send_command",
]


class RemoteError(EdgeshipError):
    """The device did not answer in time, or answered with an error."""


class BrokerUnavailableError(RemoteError):
    """The broker cannot be reached or refused this client (address, credentials, TLS): nothing
    was sent to the device. The CLI treats it as bad input (exit 2)."""


class CommandClient:
    """One MQTT connection to the broker for a series of commands to one device.

    ``call`` sends a command and waits for its reply; the connection and the subscription to
    the device's ``cmd/reply`` are made once (a deploy sends hundreds of chunk commands).
    Use it as a context manager.
    """

    def __init__(
        self,
        broker_url: str,
        fleet: str,
        device: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
    ) -> None:

        self.broker = BrokerUrl.parse(broker_url)
        for value, what in ((fleet, "fleet"), (device, "device")):
            try:
                msg.validate_id(value, what)
            except ProtocolError as exc:
                raise ConfigError(str(exc)) from exc
        self.fleet, self.device = fleet, device
        self._cmd_topic = msg.topic(fleet, device, "cmd")
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[msg.CommandReply]]] = {}

        def on_message(decoded: msg.Message) -> None:
            if isinstance(decoded, msg.CommandReply):
                with self._lock:
                    waiter = self._waiting.get(decoded.id)
                if waiter is not None and not waiter[0].is_set():
                    waiter[1].append(decoded)
                    waiter[0].set()

        self._client = connect(
            self.broker,
            [msg.topic(fleet, device, "cmd/reply")],
            on_message,
            username=username,
            password=password,
            ca_file=ca_file,
            what="the device's replies",
        )

    def call(
        self, action: Action | str, args: dict[str, Any] | None = None, *, timeout_s: float = 60.0
    ) -> msg.CommandReply:
        """Send ``action`` (an :class:`Action`, or the name of one an agent of another version
        knows) and return the device's reply (``ok`` true or false).

        Raises :class:`RemoteError` when no reply comes within ``timeout_s``.
        """
        name = action.value if isinstance(action, Action) else action
        command = msg.Command(
            id=uuid.uuid4().hex[:16],
            action=name,
            ts=time.time(),
            args=args or {},
            expires=time.time() + timeout_s,
        )
        done = threading.Event()
        answer: list[msg.CommandReply] = []
        with self._lock:
            self._waiting[command.id] = (done, answer)
        try:
            self._client.publish(self._cmd_topic, msg.encode(command), qos=1)
            if not done.wait(timeout_s):
                raise RemoteError(
                    f"device {self.device!r} in fleet {self.fleet!r} did not answer {name!r} "
                    f"within {timeout_s:.3g} s (is its agent running and connected?)"
                )
        finally:
            with self._lock:
                del self._waiting[command.id]
        return answer[0]

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def __enter__(self) -> CommandClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    broker: BrokerUrl,
    topics: list[str],
    on_message: Callable[[msg.Message], None],
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    what: str = "its topics",
) -> Any:
    """A connected paho client (its network loop on its own thread) subscribed to ``topics``
    at QoS 1; ``on_message`` gets every message that decodes (others are dropped). Returns
    once the broker has acknowledged the subscriptions, so nothing sent after is missed.

    Raises :class:`BrokerUnavailableError` when the broker cannot be reached or refuses the
    client (address, credentials, TLS, ACL), ConfigError for a CA file that does not load.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    subscribed = threading.Event()
    refused: list[str] = []

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
            subscribed.set()
        else:
            client.subscribe([(t, 1) for t in topics])

    def on_subscribe(client: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
        subscribed.set()

    def on_raw(client: Any, userdata: Any, message: Any) -> None:
        try:
            decoded = msg.decode(message.topic, message.payload)
        except ProtocolError:
            return
        on_message(decoded)

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"edgeship-cli-{uuid.uuid4().hex[:16]}",
        protocol=mqtt.MQTTv311,
    )
    if broker.tls:
        try:
            client.tls_set(ca_certs=ca_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"--ca-file {ca_file}: cannot load it as a CA certificate (PEM): {exc}"
            ) from exc
    user = username or broker.username
    if user:
        client.username_pw_set(user, password or broker.password)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_raw
    where = f"{broker.host}:{broker.port}"
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        hint = (
            "give the CA that signed the broker's certificate with --ca-file"
            if isinstance(exc, ssl.SSLError)
            else "check --broker; is it running?"
        )
        raise BrokerUnavailableError(f"cannot reach the broker at {where}: {exc} ({hint})") from exc
    client.loop_start()
    if not subscribed.wait(10) or refused:
        client.loop_stop()
        client.disconnect()
        if refused:
            raise BrokerUnavailableError(
                f"the broker at {where} refused the connection: {refused[0]} (check the "
                "user name in mqtt://USER@host, the password (--broker-password-file, "
                "EDGESHIP_BROKER_PASSWORD or mqtt://USER:PASSWORD@host) and the broker's ACL)"
            )
        raise BrokerUnavailableError(
            f"the broker at {where} did not accept the subscription to {what}"
        )
    return client


def send_command(
    broker_url: str,
    fleet: str,
    device: str,
    action: Action | str,
    args: dict[str, Any] | None = None,
    *,
    timeout_s: float = 60.0,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
) -> Any:
    """Send ``action`` to ``device`` and return the reply's ``result``.

    Raises :class:`RemoteError` when no reply comes within ``timeout_s`` (the device is offline
    or too busy) or when the device reports failure.
    """
    with CommandClient(
        broker_url, fleet, device, username=username, password=password, ca_file=ca_file
    ) as client:
        reply = client.call(action, args, timeout_s=timeout_s)
    if not reply.ok:
        name = action.value if isinstance(action, Action) else action
        raise RemoteError(f"device {device!r} could not {name}: {reply.error}")
    return reply.result


def remote_benchmark(
    broker_url: str,
    fleet: str,
    device: str,
    *,
    min_runs: int = 200,
    min_seconds: float = 3.0,
    timeout_s: float | None = None,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
) -> dict[str, Any]:
    """Benchmark the device's loaded bundle on the device itself; returns the report dict.
    ``username``/``password`` override the URL's (keep a password out of the URL: see
    :mod:`device_agent.contracts.broker_password`)."""
    wait = timeout_s if timeout_s is not None else max(60.0, min_seconds * 4 + 30)
    result = send_command(
        broker_url,
        fleet,
        device,
        Action.BENCHMARK,
        BenchmarkArgs(min_runs=min_runs, min_seconds=min_seconds).to_args(),
        timeout_s=wait,
        username=username,
        password=password,
        ca_file=ca_file,
    )
    if not isinstance(result, dict) or "latency_ms" not in result:
        raise RemoteError(f"device {device!r} answered the benchmark with something else")
    return result
