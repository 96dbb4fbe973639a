"""The connection state machine: connect, MQTT 5 -> 3.1.1 fallback, reconnect, close.

:class:`Connection` owns the paho client and nothing else; what happens on a connection (drain
the spool, register the will, spool the birth, take commands) is its :class:`Session`'s work.

* **One thread owns the paho client.** paho's ``Client`` is not safe for writes from two
  threads, so the thread that runs :meth:`Connection.run` (the socket loop) is also the one
  that publishes, through the session; other threads only call :meth:`Connection.wake`.
* **Own reconnect loop.** A fresh paho client per attempt, capped exponential backoff with full
  jitter (:class:`Backoff`), no paho auto-reconnect.
* **MQTT 5 first, 3.1.1 fallback.** With ``protocol="auto"`` a broker that refuses v5 (CONNACK
  "unsupported protocol version"), closes the connection, or never answers the v5 CONNECT
  within ``connect_timeout_s`` is tried again at once with 3.1.1; once a 3.1.1 connection
  succeeds the connection keeps using 3.1.1.
* **Close.** After :meth:`Connection.request_close` a connected link flushes (the session says
  when everything is acknowledged) for up to the flush timeout, then disconnects cleanly, or
  so that the broker publishes the will if the flush did not finish.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.contracts.messages import QOS, RETAIN
from device_agent.errors import ConfigError
from device_agent.mqtt.config import BrokerConfig
from device_agent.mqtt.stats import LinkStats

__all__ = ["Backoff", "Connection", "Session"]

# One logger for the whole link, as before it was split into modules.
log = logging.getLogger("device_agent.mqtt")

# MQTT 5 reason code 0x84 (paho also maps a 3.1.1-style CONNACK return code 1 to it).
_UNSUPPORTED_PROTOCOL = 0x84
# A connection that lasted this long resets the backoff; shorter ones (a broker that accepts
# and drops at once, two agents fighting over one client id) keep backing off.
_STABLE_S = 10.0
# Longest select() wait: paho's keep-alive bookkeeping (loop_misc) wants a call about every second.
_TICK_S = 1.0
# paho's Properties.__init__ is unannotated; a typed name for it keeps strict mypy checking
# the call sites.
_new_properties: Callable[[int], Properties] = Properties


class Backoff:
    """Capped exponential backoff with full jitter.

    The n-th consecutive delay (n from 0) is uniform in ``[0, min(max_s, min_s * 2**n)]``:
    full jitter spreads a fleet that lost its broker at the same moment, so it does not come
    back as one synchronized wave. :meth:`reset` after a connection that held.
    """

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not 0 < min_s <= max_s:
            raise ConfigError(
                f"backoff: need 0 < backoff_min_s <= backoff_max_s, got {min_s} and {max_s}"
            )
        self.min_s = float(min_s)
        self.max_s = float(max_s)
        self._rng = rng if rng is not None else random.Random()
        self.attempts = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # min() before the power keeps 2**n from growing without bound during a long outage.
        return min(self.max_s, self.min_s * 2.0 ** min(self.attempts, 64))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0


class Session(Protocol):
    """The work a connection carries; every method runs on the network thread."""

    def will(self) -> tuple[str, bytes] | None:
        """The Last Will (topic, payload) to register on the next connection, if any."""

    def accepted(self, client: paho.Client) -> None:
        """The broker accepted the connection (subscribe, spool the birth)."""

    def woken(self) -> None:
        """Another thread called :meth:`Connection.wake` (new messages may be spooled)."""

    def pump(self, client: paho.Client) -> None:
        """Send what is due on the connected ``client``."""

    def acked(self, mid: int, reason_code: ReasonCode) -> None:
        """The broker acknowledged (or refused) the publish ``mid``."""

    def received(self, message: paho.MQTTMessage) -> None:
        """A message arrived on a subscription."""

    def closing(self) -> None:
        """Close was requested while connected: queue what must go out before disconnecting."""

    def flushed(self) -> bool:
        """Everything queued was acknowledged: a clean disconnect loses nothing."""

    def backlog(self) -> int:
        """How many messages are left unsent (for the log when a flush times out)."""

    def ended(self, accepted: bool) -> None:
        """The connection is gone; ``accepted``: the broker had accepted it (and its will)."""

    def stopped(self) -> None:
        """:meth:`Connection.run` is returning after close."""


@dataclass
class _Attempt:
    """What one connection attempt came to."""

    accepted: bool = False  # the broker sent a successful CONNACK
    protocol_refused: bool = False  # v5 refused, dropped or unanswered after the TCP connect
    lasted_s: float = 0.0


class Connection:
    """One broker link for the life of the agent, reconnecting until :meth:`request_close`.

    ``subscribe_to`` is subscribed on every accepted connection (the device's commands);
    ``clock`` (monotonic seconds) is injectable for tests, as is the backoff's random source.
    """

    def __init__(
        self,
        config: BrokerConfig,
        session: Session,
        stats: LinkStats,
        *,
        client_id: str,
        max_inflight: int,
        subscribe_to: str | None,
        backoff: Backoff,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._session = session
        self._stats = stats
        self._client_id = client_id
        self._max_inflight = max_inflight
        self._subscribe_to = subscribe_to
        self._backoff = backoff
        self._clock = clock
        self._ssl: ssl.SSLContext | None = config.ssl_context()
        self._closing = threading.Event()
        self._flush_timeout_s = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

        # Owned by the network thread.
        self._client: paho.Client | None = None
        self._connected = False
        self._protocol_in_use: str | None = None
        self._sticky_311 = False
        self._ever_connected = False
        self._attempt_protocol: Literal["5", "3.1.1"] = "5"
        self._connack_reason: ReasonCode | None = None
        self._accepted_at: float | None = None  # clock() at this connection's CONNACK
        self._last_connect_failure: str | None = None  # since the last accepted connection

    @property
    def connected(self) -> bool:
        """Whether a connection is up and accepted by the broker."""
        return self._connected

    @property
    def protocol_in_use(self) -> str | None:
        """``"5"`` or ``"3.1.1"``: the protocol of the current or last accepted connection."""
        return self._protocol_in_use

    def wake(self) -> None:
        """Wake the network thread (any thread)."""
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the socket buffer is full of wake-ups already: the thread will wake
        except OSError as exc:
            if exc.errno != errno.EBADF:  # closed by close(): nothing left to wake
                raise

    def request_close(self, flush_timeout_s: float) -> None:
        """Make :meth:`run` flush for up to ``flush_timeout_s``, disconnect and return."""
        self._flush_timeout_s = flush_timeout_s
        self._closing.set()
        self.wake()

    def close_sockets(self) -> None:
        """Release the wake-up sockets, once :meth:`run` has returned (or never ran)."""
        self._wake_r.close()
        self._wake_w.close()

    # --- the reconnect loop ---------------------------------------------------------------

    def run(self) -> None:
        """Connect, serve, reconnect with backoff, until :meth:`request_close`."""
        while not self._closing.is_set():
            try:
                attempt = self._attempt(self._protocol_to_try())
                if (
                    attempt.protocol_refused
                    and self.config.protocol == "auto"
                    and not self._sticky_311
                    and not self._closing.is_set()
                ):
                    log.info("mqtt: the broker did not accept MQTT 5; trying MQTT 3.1.1")
                    attempt = self._attempt("3.1.1")
                    if attempt.accepted:
                        self._sticky_311 = True
            except Exception as exc:  # a bug or a spool failure: never let the thread die
                self._stats.count("errors")
                self._stats.set_error(f"internal error: {exc!r}")
                log.exception("mqtt: connection attempt failed unexpectedly")
                self._abandon_client()
                attempt = _Attempt()
            if self._closing.is_set():
                break
            if attempt.accepted and attempt.lasted_s >= _STABLE_S:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            log.debug("mqtt: reconnecting in %.2f s", delay)
            self._wait(delay)
        self._session.stopped()

    def _protocol_to_try(self) -> Literal["5", "3.1.1"]:
        if self.config.protocol == "3.1.1" or self._sticky_311:
            return "3.1.1"
        return "5"

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early for close() (publish() wake-ups are drained)."""
        deadline = time.monotonic() + seconds
        while not self._closing.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readable, _, _ = select.select([self._wake_r], [], [], min(left, _TICK_S))
            if readable:
                self._drain_wake()

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # drained: nothing more to read
            while self._wake_r.recv(4096):
                pass

    # --- one connection -------------------------------------------------------------------

    def _new_client(self, protocol: Literal["5", "3.1.1"]) -> paho.Client:
        cfg = self.config
        v5 = protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else False,
            reconnect_on_failure=False,
        )
        client.enable_logger(logging.getLogger("device_agent.mqtt.paho"))
        client.connect_timeout = cfg.connect_timeout_s
        client.max_inflight_messages_set(self._max_inflight)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if self._ssl is not None:
            client.tls_set_context(self._ssl)
            client.tls_insecure_set(cfg.tls_insecure)
        will = self._session.will()
        if will is not None:
            client.will_set(will[0], will[1], qos=QOS["status"], retain=RETAIN["status"])
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _attempt(self, protocol: Literal["5", "3.1.1"]) -> _Attempt:
        """One connection, from TCP connect to its end."""
        self._stats.count("connect_attempts")
        cfg = self.config
        client = self._new_client(protocol)
        self._client = client
        self._connected = False
        self._attempt_protocol = protocol
        self._connack_reason = None
        self._accepted_at = None
        try:
            if protocol == "5":
                props = _new_properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = cfg.session_expiry_s
                client.connect(
                    cfg.host, cfg.port, cfg.keepalive_s, clean_start=False, properties=props
                )
            else:
                client.connect(cfg.host, cfg.port, cfg.keepalive_s)
        except OSError as exc:  # refused, unreachable, DNS, timeout, TLS handshake
            self._client = None
            self._connect_failed(f"connect to {cfg.host}:{cfg.port} failed: {_describe(exc)}")
            return _Attempt()
        return self._serve(client, protocol)

    def _serve(self, client: paho.Client, protocol: Literal["5", "3.1.1"]) -> _Attempt:
        """Run the socket loop of one connection until it ends."""
        attempt = _Attempt()
        connack_deadline = self._clock() + self.config.connect_timeout_s
        close_deadline: float | None = None
        try:
            while True:
                sock = client.socket()
                if sock is None:
                    break  # paho closed it (connection lost, refused, or our DISCONNECT sent)
                if self._accepted_at is None:
                    if self._connack_reason is not None:
                        break  # refused; paho closes the socket on its own, make sure
                    if self._closing.is_set():
                        break
                    if self._clock() >= connack_deadline:
                        self._connect_failed(
                            f"no CONNACK within {self.config.connect_timeout_s:g} s "
                            f"(MQTT {protocol})"
                        )
                        attempt.protocol_refused = protocol == "5"
                        break
                elif self._closing.is_set():
                    if close_deadline is None:
                        close_deadline = self._clock() + self._flush_timeout_s
                        self._session.closing()
                    if self._closed_after_flush(client, close_deadline):
                        break
                if not self._loop_once(client, sock):
                    break
                if self._connected:
                    self._session.pump(client)
        finally:
            self._judge(attempt, protocol)
            self._end_connection(client, attempt.accepted)
        return attempt

    def _closed_after_flush(self, client: paho.Client, deadline: float) -> bool:
        """Close requested: disconnect cleanly once flushed, or with the will at the deadline."""
        if self._session.flushed():
            self._disconnect(client, with_will=False)
            return True
        if self._clock() >= deadline:
            log.warning(
                "mqtt: close: %d messages not acknowledged in %.1f s; they stay "
                "in the spool, the broker publishes the offline status",
                self._session.backlog(),
                self._flush_timeout_s,
            )
            self._disconnect(client, with_will=True)
            return True
        return False

    def _judge(self, attempt: _Attempt, protocol: Literal["5", "3.1.1"]) -> None:
        """Fill in what the attempt came to, once its connection ended."""
        if self._accepted_at is not None:
            attempt.accepted = True
            attempt.lasted_s = self._clock() - self._accepted_at
        elif (
            protocol == "5"
            and self._connack_reason is not None
            and self._connack_reason.value == _UNSUPPORTED_PROTOCOL
        ):
            attempt.protocol_refused = True
        elif protocol == "5" and self._connack_reason is None and not self._closing.is_set():
            # The TCP connect worked but the v5 CONNECT was dropped: a 3.1.1-only broker.
            attempt.protocol_refused = True

    def _loop_once(self, client: paho.Client, sock: Any) -> bool:
        """One select() round; False when the connection ended."""
        # TLS may hold decrypted bytes that select() cannot see.
        pending = sock.pending() if hasattr(sock, "pending") else 0
        wlist = [sock] if client.want_write() else []
        try:
            readable, writable, _ = select.select(
                [sock, self._wake_r], wlist, [], 0.0 if pending else _TICK_S
            )
        except (OSError, ValueError) as exc:  # the socket was closed under us
            log.debug("mqtt: select failed: %s", exc)
            return False
        if self._wake_r in readable:
            self._drain_wake()
            self._session.woken()
        if (sock in readable or pending) and (
            client.loop_read() != paho.MQTT_ERR_SUCCESS or client.socket() is None
        ):
            return False
        if sock in writable and client.loop_write() != paho.MQTT_ERR_SUCCESS:
            return False
        return client.loop_misc() == paho.MQTT_ERR_SUCCESS

    def _disconnect(self, client: paho.Client, *, with_will: bool) -> None:
        """End the connection: cleanly (the broker discards the will) or so the will is sent."""
        if with_will and self._protocol_in_use == "5":
            client.disconnect(
                reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
            )
        elif with_will:
            sock = client.socket()
            if sock is not None:
                sock.close()  # MQTT 3.1.1 has no "disconnect with will": drop the connection
            return
        else:
            client.disconnect()
        # The DISCONNECT may sit behind a partial write; give it a moment to go out.
        deadline = time.monotonic() + 1.0
        while client.want_write() and time.monotonic() < deadline:
            sock = client.socket()
            if sock is None:
                break
            try:
                select.select([], [sock], [], 0.1)
            except (OSError, ValueError):
                break
            if client.loop_write() != paho.MQTT_ERR_SUCCESS:
                break

    def _end_connection(self, client: paho.Client, accepted: bool) -> None:
        self._connected = False
        sock = client.socket()
        if sock is not None:
            sock.close()
        self._client = None
        self._session.ended(accepted)

    def _abandon_client(self) -> None:
        client = self._client
        if client is not None:
            self._end_connection(client, self._connected)

    def _connect_failed(self, text: str) -> None:
        """Record why a connect failed; log it once, not on every retry of a long outage."""
        repeated = text == self._last_connect_failure
        self._last_connect_failure = text
        self._stats.set_error(text)
        log.log(logging.DEBUG if repeated else logging.WARNING, "mqtt: %s", text)

    # --- paho callbacks (network thread) --------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        self._connack_reason = reason_code
        if reason_code.is_failure:
            hint = ""
            if reason_code.value in (4, 5, 134, 135):  # bad user name or password; not authorized
                hint = (
                    " (check username and password, or cert_file and key_file, in agent.toml or "
                    "EDGESHIP_AGENT_USERNAME / EDGESHIP_AGENT_PASSWORD; retrying)"
                )
            self._connect_failed(f"broker refused the connection: {reason_code}{hint}")
            return
        protocol = self._attempt_protocol
        self._accepted_at = self._clock()
        self._last_connect_failure = None
        self._connected = True
        self._protocol_in_use = protocol
        if self._ever_connected:
            self._stats.count("reconnects")
        self._ever_connected = True
        log.info(
            "mqtt: connected to %s:%d with MQTT %s (session present: %s)",
            self.config.host,
            self.config.port,
            protocol,
            flags.session_present,
        )
        if self._subscribe_to is not None:
            client.subscribe(self._subscribe_to, qos=QOS["cmd"])
        self._session.accepted(client)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        was_connected = self._connected
        self._connected = False
        if self._connack_reason is not None and self._connack_reason.is_failure:
            return  # refused: _on_connect said why; paho's "protocol error" would hide it
        if reason_code.is_failure or flags.is_disconnect_packet_from_server:
            self._stats.set_error(f"connection lost: {reason_code}")
            if was_connected:
                log.warning("mqtt: %s", self._stats.last_error)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        if client is not self._client:
            return
        self._session.acked(mid, reason_code)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code_list: list[ReasonCode],
        properties: Properties,
    ) -> None:
        for rc in reason_code_list:
            if rc.is_failure:
                self._stats.count("errors")
                self._stats.set_error(f"broker refused the command subscription: {rc}")
                log.error("mqtt: %s; commands will not arrive", self._stats.last_error)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._session.received(message)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, socket.timeout | TimeoutError):
        return f"timed out ({text})"
    return text
