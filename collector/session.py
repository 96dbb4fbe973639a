"""The collector's broker session: connect (MQTT v5, falling back to 3.1.1), subscribe, and
keep the connection state that acknowledgements depend on.

* **A persistent session.** A fixed client id, MQTT v5 ``clean_start=False`` with a session
  expiry (3.1.1: ``clean_session=False``): the broker queues what arrives while the collector
  is down. paho reconnects after the first connection; while the first cannot be made, a
  background thread retries, so the collector (and its API) run meanwhile.
* **Acks belong to a connection.** Every delivery is tagged with the connection's generation;
  :meth:`MqttSession.ack` acknowledges only those of the current one, because the broker
  redelivers the un-acknowledged messages of a lost connection (same packet id) on the next.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from collector.config import CollectorConfig
from collector.errors import BrokerError

__all__ = ["MqttSession"]

log = logging.getLogger("collector")

# paho's Properties.__init__ is unannotated; a typed name keeps strict mypy checking the call.
_new_properties: Callable[[int], Properties] = Properties

_PROTOCOL_NAMES = {MQTTProtocolVersion.MQTTv5: "5", MQTTProtocolVersion.MQTTv311: "3.1.1"}
_UNSUPPORTED_PROTOCOL = 132  # CONNACK "Unsupported protocol version" (3.1.1 return code 1)
_FATAL_CONNACK = {134: "bad user name or password", 135: "not authorized"}


class MqttSession:
    """One collector's connection to the broker. ``on_message(message, generation)`` hears
    every delivery with its connection's generation, ``on_publish(mid, reason_code)`` every
    PUBACK, ``note_error`` a refused subscription, ``fail`` a broker that refuses the
    collector's credentials while retrying in the background."""

    def __init__(
        self,
        config: CollectorConfig,
        *,
        stopping: threading.Event,
        on_message: Callable[[mqtt.MQTTMessage, int], None],
        on_publish: Callable[[int, int], None],
        note_error: Callable[[str], None],
        fail: Callable[[BaseException], None],
    ) -> None:
        self.config = config
        self.broker = config.broker
        self._stopping = stopping
        self._deliver = on_message
        self._puback = on_publish
        self._note_error = note_error
        self._fail = fail
        self._client: mqtt.Client | None = None
        self._ack_lock = threading.Lock()
        self._generation = 0
        self._lock = threading.Lock()
        self._connected = False
        self._subscribed = False
        self._granted = threading.Event()  # set while _subscribed: what start() waits for
        self._connects = 0
        self._protocol: str | None = None

    @property
    def client(self) -> mqtt.Client | None:
        """The connected paho client, None before the first connection."""
        return self._client

    def status(self) -> tuple[bool, int, str | None]:
        """(connected now, connections so far, protocol: "5", "3.1.1" or None)."""
        with self._lock:
            return self._connected, self._connects, self._protocol

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the broker to grant the subscription; whether it has."""
        return self._granted.wait(timeout_s)

    def subscribed(self) -> bool:
        """Whether the broker has granted the fleet's subscription on this connection (a
        SUBACK without a failure code, or a resumed 3.1.1 session that keeps it): until then
        nothing the fleet publishes reaches this collector."""
        with self._lock:
            return self._subscribed

    def connect(self) -> None:
        """Connect once (falling back from v5 to 3.1.1); later reconnects are paho's.

        If the broker is unreachable the attempts continue on a background thread, so the
        collector (and its API) run and report ``connected: false`` meanwhile.
        """
        attempt = self._connect_attempt()
        if attempt is None:
            t = threading.Thread(target=self._connect_retry, name="edgeship-connect", daemon=True)
            t.start()

    def disconnect(self) -> None:
        """Disconnect cleanly (the broker keeps the session) and stop paho's loop."""
        client = self._client
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def ack(self, deliveries: Iterable[tuple[int, int, int]]) -> int:
        """Acknowledge ``(mid, qos, generation)`` deliveries of the current connection; returns
        how many were acknowledged (QoS 0 needs none, an older connection's are redelivered)."""
        client = self._client
        if client is None:
            return 0
        acked = 0
        with self._ack_lock:
            generation = self._generation
            for mid, qos, gen in deliveries:
                if qos > 0 and gen == generation:
                    client.ack(mid, qos)
                    acked += 1
        return acked

    def _protocols(self) -> list[MQTTProtocolVersion]:
        v5, v311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
        chosen = self.config.protocol
        if chosen == "5":
            return [v5]
        if chosen == "3.1.1":
            return [v311]
        return [v5, v311]

    def _make_client(self, protocol: MQTTProtocolVersion) -> mqtt.Client:
        cfg = self.config
        v5 = protocol == MQTTProtocolVersion.MQTTv5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.session_id,
            protocol=protocol,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        b = self.broker
        if b.username is not None:
            client.username_pw_set(b.username, b.password)
        if b.tls:
            client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    def _connect_retry(self) -> None:
        delay = 0.5
        while not self._stopping.wait(delay):
            try:
                if self._connect_attempt() is not None:
                    return
            except BrokerError as exc:
                self._fail(exc)
                return
            delay = min(delay * 2, 30.0)

    def _start_connect(self, client: mqtt.Client, protocol: MQTTProtocolVersion) -> str | None:
        """Send CONNECT; None when sent, else why it could not be."""
        cfg = self.config
        try:
            if protocol == MQTTProtocolVersion.MQTTv5:
                props = _new_properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = cfg.session_expiry_s
                props.ReceiveMaximum = cfg.receive_maximum
                client.connect(
                    self.broker.host, self.broker.port, cfg.keepalive_s,
                    clean_start=False, properties=props,
                )  # fmt: skip
            else:
                client.connect(self.broker.host, self.broker.port, cfg.keepalive_s)
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _connect_attempt(self) -> mqtt.Client | None:
        cfg = self.config
        last = "no attempt"
        for protocol in self._protocols():
            client = self._make_client(protocol)
            outcome: dict[str, Any] = {}
            done = threading.Event()

            def first(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any, *, _o: Any = outcome,
                      _d: threading.Event = done) -> None:  # fmt: skip
                _o.setdefault("rc", rc)
                _d.set()
                if not rc.is_failure:
                    self._on_connect(c, u, f, rc, p)

            def lost(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any, *, _o: Any = outcome,
                     _d: threading.Event = done) -> None:  # fmt: skip
                _o.setdefault("rc", None)  # closed before a CONNACK: try the next protocol
                _d.set()
                self._on_disconnect(c, u, f, rc, p)

            client.on_connect = first
            client.on_disconnect = lost
            error = self._start_connect(client, protocol)
            if error is not None:
                log.warning("broker %s: cannot connect: %s", self.broker.display(), error)
                return None
            client.loop_start()
            # A 3.1.1-only broker may neither answer nor close a v5 CONNECT that carries
            # properties (amqtt waits for more bytes): in auto mode, do not wait long for it.
            falling_back = protocol == MQTTProtocolVersion.MQTTv5 and cfg.protocol == "auto"
            done.wait(min(cfg.connect_timeout_s, 5.0) if falling_back else cfg.connect_timeout_s)
            rc = outcome.get("rc")
            if rc is None:  # no CONNACK: some brokers just close a v5 connection
                _abandon(client)
                last = "the broker closed the connection without a CONNACK"
                continue
            if not rc.is_failure:
                client.on_connect = self._on_connect
                client.on_disconnect = self._on_disconnect
                self._client = client
                with self._lock:
                    self._protocol = _PROTOCOL_NAMES[protocol]
                return client
            _abandon(client)
            if rc.value in _FATAL_CONNACK:
                raise BrokerError(
                    f"broker {self.broker.display()} refused the collector: "
                    f"{_FATAL_CONNACK[rc.value]} (check the user name and password in --broker)"
                )
            last = str(rc)
            if rc.value == _UNSUPPORTED_PROTOCOL:
                log.info("broker refused MQTT v5; trying 3.1.1")
                continue
            log.warning("broker %s refused the connection: %s", self.broker.display(), rc)
            return None
        log.warning("broker %s: %s", self.broker.display(), last)
        return None

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            log.warning("broker refused the reconnect: %s", rc)
            return
        with self._lock:
            self._connected = True
            self._connects += 1
        session = getattr(flags, "session_present", None)
        log.info(
            "connected to %s as %s (session present: %s); subscribing to %s",
            self.broker.display(), self.config.session_id, session, self.config.topic_filter,
        )  # fmt: skip
        if client.protocol == MQTTProtocolVersion.MQTTv5:
            # Retained status only for a new subscription: a resumed session already has it.
            options = SubscribeOptions(
                qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
            )
            client.subscribe(self.config.topic_filter, options=options)
        elif not session:
            client.subscribe(self.config.topic_filter, qos=1)
        else:  # a resumed 3.1.1 session: the broker kept the subscription
            with self._lock:
                self._subscribed = True
                self._granted.set()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        refused = [code for code in codes if code.is_failure]
        for code in refused:
            self._note_error(f"subscription to {self.config.topic_filter} refused: {code}")
            log.error("broker refused the subscription %s: %s", self.config.topic_filter, code)
        with self._lock:
            self._subscribed = not refused
            if refused:
                self._granted.clear()
            else:
                self._granted.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        # Acks for deliveries of the lost connection must not go out on the next one: the
        # broker redelivers those messages (same packet id) and they are acknowledged then.
        with self._ack_lock:
            self._generation += 1
        with self._lock:
            self._connected = False
            self._subscribed = False
            self._granted.clear()
        if not self._stopping.is_set():
            log.warning("disconnected from the broker (%s); paho reconnects", rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        self._deliver(m, self._generation)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any
    ) -> None:
        self._puback(mid, int(rc.value))


def _abandon(client: mqtt.Client) -> None:
    """Stop a client whose first connect failed, and close its socket."""
    client.loop_stop()
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
