"""The device's MQTT link: broker settings, and the publisher that drains the spool to a broker.

:class:`BrokerConfig` is the validated broker setting (URL, credentials, TLS files, protocol).
:class:`Publisher` owns the connection for the life of the agent:

* **Spool first.** :meth:`Publisher.publish` only writes to the :class:`~device_agent.spool.Spool`
  (which numbers the message) and wakes the network thread. That thread replays the spool in
  order, keeps at most ``max_inflight`` QoS 1 publishes unacknowledged, and deletes a message
  from the spool when its PUBACK arrives. After a reconnect everything still in the spool is
  sent again from the oldest, so a message may arrive twice (subscribers dedupe on
  ``(device, boot, seq)``) but is never lost, and an outage's backlog drains at the pace of the
  acknowledgements, never as a flood.
* **One thread owns the paho client.** paho's ``Client`` is not safe for writes from two
  threads (a partial socket write from one thread can interleave with another's packet), so
  the thread that runs the socket loop is also the one that publishes; other threads only
  write to the spool and poke a wake-up socket.
* **Own reconnect loop.** A fresh paho client per connection attempt, capped exponential
  backoff with full jitter (:class:`Backoff`, injectable random source), no paho auto-reconnect.
  ``start()`` never waits for the broker: an agent that boots without network keeps spooling.
* **MQTT 5 first, 3.1.1 fallback.** With ``protocol="auto"`` a broker that refuses v5 (CONNACK
  "unsupported protocol version"), closes the connection, or never answers the v5 CONNECT
  (amqtt does that) within ``connect_timeout_s`` is tried again at once with 3.1.1; once a
  3.1.1 connection succeeds the publisher keeps using 3.1.1.
* **Birth and Last Will.** Every connection registers a retained QoS 1 ``offline`` status as
  its will and, once accepted, spools a retained ``online`` birth. See "Will sequence numbers".
* **Commands** on ``edgeship/{fleet}/{device}/cmd`` (QoS 1, persistent session so commands sent
  while the device was offline are delivered when it returns) are decoded on the network
  thread and handed to ``on_command`` on a worker thread, so a slow command cannot stall
  keep-alives. Malformed or retained commands are counted and logged, never run.

Will sequence numbers
---------------------
A will's ``seq`` is taken from the spool's counter like any other message's, but whether the
broker ever publishes it is unknown: a broker restart loses it, a clean disconnect discards it.
A number that is reserved and never sent would be a gap the collector cannot tell from a lost
message, so the publisher makes sure each will number is sent at least once:

* The number is reserved lazily and kept across failed attempts: only a connection the broker
  accepted can have published it, so an hour of refused connects uses one number, not 120.
* The prepared will (topic and payload) is written to ``<spool>.will`` (fsynced) when it is
  reserved. When a connection that registered it ends without a clean close, the publisher
  puts that same message into the spool: if the broker published it, the copy is a duplicate
  (same ``device, boot, seq``); if not, it fills the gap. The file covers a crash: the next
  start spools a will it finds there the same way.
* On :meth:`Publisher.close` the agent publishes the prepared message itself, after the
  backlog, and disconnects cleanly only once the broker acknowledged it; if the flush times
  out it disconnects so that the broker publishes the will (MQTT 5 reason code 4; under 3.1.1
  it drops the socket), and the spooled copy goes out on the next start.

So the offline status may arrive twice, or late (after a reconnect, behind newer messages), but
its number is not a gap. A gap of one remains possible only if the process dies between
reserving a number and writing ``<spool>.will``, or if ``<spool>.will`` cannot be written.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import queue
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.contracts.broker import BrokerUrl, redact
from device_agent.contracts.messages import QOS, RETAIN, Command, decode, topic, validate_id
from device_agent.errors import ConfigError, EdgeshipError, ProtocolError
from device_agent.spool import Spool

__all__ = ["PUBLISHED_KINDS", "Backoff", "BrokerConfig", "Protocol", "Publisher"]

log = logging.getLogger(__name__)

Protocol = Literal["auto", "5", "3.1.1"]
PublishedKind = Literal["status", "telemetry", "outliers", "cmd/reply"]
# What a device may publish; "cmd" flows the other way and "alerts" belong to collectors.
PUBLISHED_KINDS: tuple[PublishedKind, ...] = ("status", "telemetry", "outliers", "cmd/reply")

# MQTT 5 reason code 0x84 (paho also maps a 3.1.1-style CONNACK return code 1 to it).
_UNSUPPORTED_PROTOCOL = 0x84
# A connection that lasted this long resets the backoff; shorter ones (a broker that accepts
# and drops at once, two agents fighting over one client id) keep backing off.
_STABLE_S = 10.0
# Commands waiting for the worker; a flood beyond this is dropped and counted.
_COMMAND_QUEUE = 256
# Longest select() wait: paho's keep-alive bookkeeping (loop_misc) wants a call about every second.
_TICK_S = 1.0
# paho's Properties.__init__ is unannotated; a typed name for it keeps strict mypy checking
# the call sites.
_new_properties: Callable[[int], Properties] = Properties


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how the agent connects. Construction validates and raises ConfigError.

    ``url`` follows :mod:`device_agent.contracts.broker`'s grammar: ``mqtt://host[:port]``
    (plain TCP, port 1883) or ``mqtts://host[:port]`` (TLS, port 8883); credentials may also be
    given in it (``mqtt://user:pass@host``). With TLS the
    broker certificate is verified against ``ca_file`` (the system's CAs when None);
    ``cert_file``/``key_file`` present a client certificate; ``tls_insecure`` skips the
    hostname check (not the chain check), as ``mosquitto_pub --insecure`` does.

    ``protocol``: ``"auto"`` tries MQTT 5 and falls back to 3.1.1 when refused. ``keepalive_s``
    also bounds how long a dead connection goes unnoticed (1.5 times it). ``connect_timeout_s``
    bounds the TCP/TLS connect and the wait for CONNACK. ``session_expiry_s`` is how long the
    broker keeps the device's session (its command subscription and commands sent while it
    was offline) after a disconnect; under 3.1.1 the broker's own setting applies.
    ``client_id`` defaults to ``edgeship-{fleet}-{device}``.
    """

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    protocol: Protocol = "auto"
    keepalive_s: int = 30
    client_id: str | None = None
    connect_timeout_s: float = 10.0
    session_expiry_s: int = 86_400
    # Parsed from url in __post_init__.
    host: str = field(init=False, default="")
    port: int = field(init=False, default=0)
    tls: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        parsed = BrokerUrl.parse(self.url)
        if parsed.username is not None:
            if self.username is not None or self.password is not None:
                raise ConfigError(
                    f"broker URL {redact(self.url)}: credentials are given both in the URL "
                    "and as username/password; keep one"
                )
            object.__setattr__(self, "username", parsed.username)
            object.__setattr__(self, "password", parsed.password)
        object.__setattr__(self, "host", parsed.host)
        object.__setattr__(self, "port", parsed.port)
        object.__setattr__(self, "tls", parsed.tls)
        self._validate()

    def _validate(self) -> None:
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(
                f"mqtt protocol: {self.protocol!r} is not one of 'auto', '5', '3.1.1'"
            )
        if isinstance(self.keepalive_s, bool) or not isinstance(self.keepalive_s, int):
            raise ConfigError(f"mqtt keepalive_s: {self.keepalive_s!r} is not an integer")
        if not 5 <= self.keepalive_s <= 65535:
            raise ConfigError(
                f"mqtt keepalive_s: {self.keepalive_s} is outside 5..65535 seconds "
                "(0 would let a dead connection go unnoticed, so the Last Will would never fire)"
            )
        if not (isinstance(self.connect_timeout_s, int | float) and self.connect_timeout_s > 0):
            raise ConfigError(
                f"mqtt connect_timeout_s: {self.connect_timeout_s!r} must be a positive number"
            )
        if isinstance(self.session_expiry_s, bool) or not isinstance(self.session_expiry_s, int):
            raise ConfigError(f"mqtt session_expiry_s: {self.session_expiry_s!r} is not an integer")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ConfigError(f"mqtt session_expiry_s: {self.session_expiry_s} is out of range")
        if self.password is not None and self.username is None:
            raise ConfigError("mqtt password: MQTT needs a username with a password")
        if self.username is not None and not self.username:
            raise ConfigError("mqtt username: must not be empty (use None for no username)")
        if self.client_id is not None and (not self.client_id or "\0" in self.client_id):
            raise ConfigError(f"mqtt client_id: {self.client_id!r} must be a non-empty string")
        tls_files = {
            "ca_file": self.ca_file,
            "cert_file": self.cert_file,
            "key_file": self.key_file,
        }
        if not self.tls:
            given = [name for name, value in tls_files.items() if value is not None]
            if self.tls_insecure:
                given.append("tls_insecure")
            if given:
                raise ConfigError(
                    f"broker URL {redact(self.url)}: {', '.join(given)} given for a plain "
                    "mqtt:// connection; use mqtts:// for TLS"
                )
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("mqtt key_file: given without cert_file (the client certificate)")
        for name, value in tls_files.items():
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"mqtt {name}: {value} is not a readable file")

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> BrokerConfig:
        """``BrokerConfig(url=url, **kw)``: the usual way to build one from a setting string."""
        unknown = set(kw) - {
            f for f in cls.__dataclass_fields__ if f not in ("host", "port", "tls")
        }
        if "url" in kw or unknown:
            raise ConfigError(f"BrokerConfig.from_url: unexpected options {sorted(unknown)}")
        return cls(url=url, **kw)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for mqtts:// (None for mqtt://); ConfigError if a file is unusable."""
        if not self.tls:
            return None
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
            if self.cert_file is not None:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"mqtt TLS files: cannot load them: {exc}") from exc
        ctx.check_hostname = not self.tls_insecure
        return ctx


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


@dataclass
class _PreparedWill:
    seq: int
    topic: str
    payload: bytes | None  # None while the will builder failed; the number stays reserved


@dataclass
class _Attempt:
    """What one connection attempt came to."""

    accepted: bool = False  # the broker sent a successful CONNACK
    protocol_refused: bool = False  # v5 refused, dropped or unanswered after the TCP connect
    lasted_s: float = 0.0


class Publisher:
    """Publishes the spool's messages to one broker and receives the device's commands.

    ``birth(seq)``/``will(seq)`` build the ``online``/``offline``
    :class:`~device_agent.contracts.messages.StatusMessage` payload for a sequence number.
    ``on_command`` runs on a worker thread, one command at a time; a command that arrives while
    that thread's queue is full is counted and handed to ``on_command_overflow`` (on the network
    thread: it must not block) to be answered, unless the same id already waits. ``clock``
    (monotonic seconds) and ``rng`` (the backoff's jitter) are injectable for tests.

    The publisher does not close the spool; the caller closes it after :meth:`close`.
    """

    def __init__(
        self,
        config: BrokerConfig,
        spool: Spool,
        *,
        fleet: str,
        device: str,
        boot: str,
        birth: Callable[[int], bytes],
        will: Callable[[int], bytes],
        on_command: Callable[[Command], None] | None = None,
        on_command_overflow: Callable[[Command], None] | None = None,
        max_inflight: int = 20,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        try:
            validate_id(fleet, "fleet")
            validate_id(device, "device")
            validate_id(boot, "boot")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from exc
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int):
            raise ConfigError(f"max_inflight: {max_inflight!r} is not an integer")
        if not 1 <= max_inflight <= 65535:
            raise ConfigError(f"max_inflight: {max_inflight} is outside 1..65535")
        self.config = config
        self._spool = spool
        self._birth, self._will_builder, self._on_command = birth, will, on_command
        self._on_command_overflow = on_command_overflow
        self._max_inflight = max_inflight
        self._backoff = Backoff(backoff_min_s, backoff_max_s, rng)
        self._clock = clock
        self._ssl = config.ssl_context()
        self._client_id = config.client_id or f"edgeship-{fleet}-{device}"
        # kind -> (topic, qos, retain)
        self._routes: dict[str, tuple[str, int, bool]] = {
            k: (topic(fleet, device, k), QOS[k], RETAIN[k]) for k in PUBLISHED_KINDS
        }
        self._status_topic = self._routes["status"][0]
        self._cmd_topic = topic(fleet, device, "cmd")
        self._will_file = Path(f"{spool.path}.will")

        # Set by any thread.
        self._lock = threading.Lock()  # guards _stats
        self._stats: dict[str, Any] = {
            "sent": 0,  # publishes handed to the broker connection (re-sends included)
            "acked": 0,  # PUBACKs that removed a message from the spool
            "refused": 0,  # PUBACKs with an MQTT 5 failure code (the message stays spooled)
            "reconnects": 0,  # accepted connections after the first
            "connect_attempts": 0,
            "last_error": None,
            "commands": 0,
            "invalid_commands": 0,
            "dropped_commands": 0,
            "command_errors": 0,
            "errors": 0,  # failures of our own machinery (spool, callbacks, will file)
        }
        self._closing = threading.Event()
        self._flush_timeout_s = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._started = False
        self._closed = False
        self._net_thread: threading.Thread | None = None
        self._cmd_thread: threading.Thread | None = None
        self._deaths: dict[str, str] = {}  # thread name -> why it died
        self._commands: queue.Queue[Command | None] = queue.Queue(maxsize=_COMMAND_QUEUE)

        # Owned by the network thread.
        self._client: paho.Client | None = None
        self._connected = False
        self._protocol_in_use: str | None = None
        self._sticky_311 = False
        self._ever_connected = False
        self._will: _PreparedWill | None = None
        self._attempt_protocol: Literal["5", "3.1.1"] = "5"
        self._connack_reason: ReasonCode | None = None
        self._accepted_at: float | None = None  # clock() at this connection's CONNACK
        self._last_connect_failure: str | None = None  # since the last accepted connection
        self._inflight: dict[int, int] = {}  # paho mid -> spool item id
        self._last_sent_id = 0  # highest spool id handed to this connection
        self._acked_ids: list[int] = []  # acknowledged, not yet removed from the spool
        self._need_peek = True

    # --- public API -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection is up and accepted by the broker."""
        return self._connected

    @property
    def protocol_in_use(self) -> str | None:
        """``"5"`` or ``"3.1.1"``: the protocol of the current or last accepted connection."""
        return self._protocol_in_use

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see ``_stats`` in ``__init__``), ``inflight`` (QoS 1
        publishes awaiting their PUBACK), ``connected`` and ``protocol``."""
        with self._lock:
            out = dict(self._stats)
        out["inflight"] = len(self._inflight)
        out["connected"] = self._connected
        out["protocol"] = self._protocol_in_use
        return out

    def start(self) -> None:
        """Start the background threads and return at once; the broker may be unreachable."""
        if self._closed:
            raise EdgeshipError("mqtt publisher: start() after close()")
        if self._started:
            return
        self._started = True
        self._recover_will_file()
        if self._on_command is not None:
            self._cmd_thread = threading.Thread(
                target=self._watched("mqtt-commands", self._command_loop),
                name="edgeship-mqtt-commands",
                daemon=True,
            )
            self._cmd_thread.start()
        self._net_thread = threading.Thread(
            target=self._watched("mqtt-network", self._run), name="edgeship-mqtt", daemon=True
        )
        self._net_thread.start()

    def workers(self) -> dict[str, tuple[str, str | None]]:
        """Each background thread's state: ``running``, ``stopped`` (after close), ``dead``
        (with why) or ``not started``."""
        out: dict[str, tuple[str, str | None]] = {}
        for name, thread in (
            ("mqtt-network", self._net_thread),
            ("mqtt-commands", self._cmd_thread),
        ):
            if thread is None:
                if name == "mqtt-network" or self._on_command is not None:
                    out[name] = ("not started", None)
            elif thread.is_alive():
                out[name] = ("running", None)
            elif name in self._deaths:
                out[name] = ("dead", self._deaths[name])
            else:
                out[name] = ("stopped", None)
        return out

    def _watched(self, name: str, loop: Callable[[], None]) -> Callable[[], None]:
        """``loop`` with its death recorded for :meth:`workers` and logged."""

        def run() -> None:
            try:
                loop()
            except BaseException as exc:
                self._deaths[name] = f"{type(exc).__name__}: {exc}"[:500]
                log.critical("mqtt: the %s thread died: %s", name, self._deaths[name])
                raise
            if not self._closed:
                self._deaths[name] = "returned before close()"
                log.critical("mqtt: the %s thread stopped before close()", name)

        return run

    def publish(self, kind: str, make_payload: Callable[[int], bytes]) -> int:
        """Spool a message of ``kind`` built by ``make_payload(seq)`` and return its seq.

        Durable when this returns; it is sent when a connection is up. Raises ProtocolError for
        a kind a device does not publish, and what the spool raises (ConfigError for a payload
        larger than the whole spool, EdgeshipError for a disk failure).
        """
        route = self._routes.get(kind)
        if route is None:
            raise ProtocolError(
                f"kind: a device publishes {list(PUBLISHED_KINDS)}, not {kind!r}", field="kind"
            )
        if self._closed:
            raise EdgeshipError("mqtt publisher is closed; publish() before close()")
        seq, _ = self._spool.put_message(route[0], make_payload, qos=route[1], retain=route[2])
        self._wake()
        return seq

    def reply(self, payload_for_seq: Callable[[int], bytes]) -> int:
        """Spool a ``cmd/reply``; returns its seq."""
        return self.publish("cmd/reply", payload_for_seq)

    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Stop: flush, publish the offline status, disconnect.

        If connected, waits up to ``flush_timeout_s`` for the spool's backlog and then the
        prepared offline status (the will's ``seq``) to be acknowledged, and disconnects
        cleanly. If that does not finish in time, or no connection is up, what is left stays in
        the spool for the next start, the offline status included. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        if not self._started:
            self._close_sockets()
            return
        self._flush_timeout_s = max(0.0, float(flush_timeout_s))
        self._closing.set()
        self._wake()
        net = self._net_thread
        if net is not None:
            net.join(self._flush_timeout_s + self.config.connect_timeout_s + 5.0)
            if net.is_alive():
                log.error("mqtt: the network thread did not stop in time; leaving it behind")
        if self._cmd_thread is not None:
            try:
                self._commands.put(None, timeout=1.0)
            except queue.Full:
                log.error("mqtt: the command worker is stuck; leaving it behind")
            else:
                self._cmd_thread.join(timeout=max(1.0, self._flush_timeout_s))
        self._close_sockets()

    # --- network thread -------------------------------------------------------------------

    def _run(self) -> None:
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
                self._count("errors")
                self._set_error(f"internal error: {exc!r}")
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
        try:
            self._retire_will()
        except EdgeshipError as exc:
            self._count("errors")
            log.error("mqtt: could not spool the offline status at close: %s", exc)

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

    def _attempt(self, protocol: Literal["5", "3.1.1"]) -> _Attempt:
        """One connection, from TCP connect to its end."""
        self._count("connect_attempts")
        cfg = self.config
        v5 = protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else False,
            reconnect_on_failure=False,
        )
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.connect_timeout = cfg.connect_timeout_s
        client.max_inflight_messages_set(self._max_inflight)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if self._ssl is not None:
            client.tls_set_context(self._ssl)
            client.tls_insecure_set(cfg.tls_insecure)
        will = self._prepare_will()
        if will is not None and will.payload is not None:
            client.will_set(will.topic, will.payload, qos=QOS["status"], retain=RETAIN["status"])
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        self._connected = False
        self._attempt_protocol = protocol
        self._connack_reason = None
        self._accepted_at = None
        try:
            if v5:
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
                        self._spool_will_for_close()
                    self._apply_acks()
                    if self._spool.depth() == 0 and not self._inflight:
                        self._disconnect(client, with_will=False)
                        break
                    if self._clock() >= close_deadline:
                        log.warning(
                            "mqtt: close: %d messages not acknowledged in %.1f s; they stay "
                            "in the spool, the broker publishes the offline status",
                            self._spool.depth(),
                            self._flush_timeout_s,
                        )
                        self._disconnect(client, with_will=True)
                        break
                if not self._loop_once(client, sock):
                    break
                if self._connected:
                    self._pump(client)
        finally:
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
            self._end_connection(client, attempt.accepted)
        return attempt

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
            self._need_peek = True
        if (sock in readable or pending) and (
            client.loop_read() != paho.MQTT_ERR_SUCCESS or client.socket() is None
        ):
            return False
        if sock in writable and client.loop_write() != paho.MQTT_ERR_SUCCESS:
            return False
        return client.loop_misc() == paho.MQTT_ERR_SUCCESS

    def _pump(self, client: paho.Client) -> None:
        """Remove acknowledged messages, then send the next ones up to the in-flight bound."""
        self._apply_acks()
        room = self._max_inflight - len(self._inflight)
        if room <= 0 or not self._need_peek:
            return
        try:
            items = self._spool.peek(room, after=self._last_sent_id)
        except EdgeshipError as exc:
            self._count("errors")
            self._set_error(f"spool: {exc}")
            log.error("mqtt: cannot read the spool: %s", exc)
            return
        if len(items) < room:
            self._need_peek = False  # drained; a publish() or an ack wakes us again
        for item in items:
            try:
                info = client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
            except ValueError as exc:  # paho's own checks (topic, size): no broker will take it
                self._count("errors")
                log.error(
                    "mqtt: spool item %d can never be published (%s); dropping it", item.id, exc
                )
                self._last_sent_id = item.id
                self._acked_ids.append(item.id)
                continue
            if info.rc == paho.MQTT_ERR_NO_CONN or info.rc == paho.MQTT_ERR_CONN_LOST:
                self._need_peek = True
                return
            if info.rc != paho.MQTT_ERR_SUCCESS:
                self._count("errors")
                log.error(
                    "mqtt: spool item %d not published: %s; it is retried after a reconnect",
                    item.id,
                    paho.error_string(info.rc),
                )
                self._last_sent_id = item.id
                continue
            self._last_sent_id = item.id
            self._count("sent")
            if item.qos == 0:
                self._acked_ids.append(item.id)  # QoS 0 has no PUBACK: written is all we get
            else:
                self._inflight[info.mid] = item.id

    def _apply_acks(self) -> None:
        if not self._acked_ids:
            return
        ids, self._acked_ids = self._acked_ids, []
        try:
            self._spool.ack_many(ids)
        except EdgeshipError as exc:
            # They stay in the spool and are sent again after a reconnect: a duplicate, not a loss.
            self._count("errors")
            log.error(
                "mqtt: cannot remove %d acknowledged messages from the spool: %s", len(ids), exc
            )

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
        self._inflight.clear()
        self._last_sent_id = 0
        self._need_peek = True
        self._apply_acks()
        if accepted:
            # The broker had this will: it may or may not have published it. Send it ourselves
            # too (see the module docstring) and reserve a new number for the next connection.
            try:
                self._retire_will()
            except EdgeshipError as exc:
                self._count("errors")
                log.error("mqtt: could not spool the offline status: %s", exc)

    def _abandon_client(self) -> None:
        client = self._client
        if client is not None:
            self._end_connection(client, self._connected)

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
        if reason_code.is_failure:
            self._connack_reason = reason_code
            hint = ""
            if reason_code.value in (4, 5, 134, 135):  # bad user name or password; not authorized
                hint = (
                    " (check username and password, or cert_file and key_file, in agent.toml or "
                    "EDGESHIP_AGENT_USERNAME / EDGESHIP_AGENT_PASSWORD; retrying)"
                )
            self._connect_failed(f"broker refused the connection: {reason_code}{hint}")
            return
        self._connack_reason = reason_code
        protocol = self._attempt_protocol
        self._accepted_at = self._clock()
        self._last_connect_failure = None
        self._connected = True
        self._protocol_in_use = protocol
        if self._ever_connected:
            self._count("reconnects")
        self._ever_connected = True
        log.info(
            "mqtt: connected to %s:%d with MQTT %s (session present: %s)",
            self.config.host,
            self.config.port,
            protocol,
            flags.session_present,
        )
        if self._on_command is not None:
            client.subscribe(self._cmd_topic, qos=QOS["cmd"])
        try:
            self._spool.put_message(
                self._status_topic, self._birth, qos=QOS["status"], retain=RETAIN["status"]
            )
        except Exception as exc:  # the agent's builder or the spool: count, log, stay connected
            self._count("errors")
            log.exception("mqtt: the online status could not be spooled: %s", exc)
        self._need_peek = True

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
            self._set_error(f"connection lost: {reason_code}")
            if was_connected:
                log.warning("mqtt: %s", self._stats["last_error"])

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
        item_id = self._inflight.pop(mid, None)
        if item_id is None:
            return  # a QoS 0 write, already accounted for in _pump
        self._need_peek = True
        if reason_code.is_failure:
            # The broker refused it (not authorized, quota): keep it spooled for the next
            # connection rather than lose it; the spool's bound limits what piles up.
            self._count("refused")
            self._set_error(f"broker refused a message: {reason_code}")
            log.warning("mqtt: broker refused spool item %d: %s", item_id, reason_code)
            return
        self._acked_ids.append(item_id)
        self._count("acked")

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
                self._count("errors")
                self._set_error(f"broker refused the command subscription: {rc}")
                log.error("mqtt: %s; commands will not arrive", self._stats["last_error"])

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.topic != self._cmd_topic:
            log.debug("mqtt: ignored a message on %s", message.topic)
            return
        if message.retain:
            # A retained command would run again on every reconnect; the contract forbids it.
            self._count("invalid_commands")
            log.warning("mqtt: ignored a retained command on %s", message.topic)
            return
        try:
            msg = decode(message.topic, message.payload)
        except ProtocolError as exc:
            self._count("invalid_commands")
            log.warning("mqtt: ignored a malformed command (%s): %s", exc.field, exc)
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # the decoder's bug must not drop the connection (the
            # broker would deliver the same command again after the reconnect, forever)
            self._count("invalid_commands")
            log.exception("mqtt: ignored a command that failed to decode: %r", exc)
            return
        if not isinstance(msg, Command):  # decode() checks the kind against the topic
            self._count("invalid_commands")
            log.warning("mqtt: ignored a %s message on the command topic", type(msg).__name__)
            return
        try:
            self._commands.put_nowait(msg)
        except queue.Full:
            self._count("dropped_commands")
            log.error(
                "mqtt: command %s dropped: %d commands are already waiting", msg.id, _COMMAND_QUEUE
            )
            with self._commands.mutex:  # a repeat of a waiting id: that one's reply answers it
                waiting = any(c is not None and c.id == msg.id for c in self._commands.queue)
            overflow = self._on_command_overflow
            if overflow is not None and not waiting:
                try:
                    overflow(msg)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException:  # must not drop the connection either (see above)
                    self._count("command_errors")
                    log.exception("mqtt: the overflow handler of command %s failed", msg.id)
            return
        self._count("commands")

    # --- command worker -------------------------------------------------------------------

    def _command_loop(self) -> None:
        handler = self._on_command
        while True:
            cmd = self._commands.get()
            if cmd is None or handler is None:
                return
            try:
                handler(cmd)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # the agent's handler: count and log, keep serving commands
                self._count("command_errors")
                log.exception("mqtt: the handler of command %s (%s) failed", cmd.id, cmd.action)

    # --- the will -------------------------------------------------------------------------

    def _prepare_will(self) -> _PreparedWill | None:
        """The will for the next connection: the pending one, or a newly numbered one."""
        will = self._will
        if will is None:
            seq = self._spool.next_seq()
            will = self._will = _PreparedWill(seq, self._status_topic, None)
        if will.payload is None:
            try:
                payload = bytes(self._will_builder(will.seq))
            except Exception:  # the agent's builder: connect without a will, retry next time
                self._count("errors")
                log.exception("mqtt: building the offline status (seq %d) failed", will.seq)
                return will
            will.payload = payload
            self._write_will_file(will, payload)
        return will

    def _spool_will_for_close(self) -> None:
        """close(): queue the prepared offline status behind the backlog."""
        try:
            self._retire_will()
        except EdgeshipError as exc:
            self._count("errors")
            log.error("mqtt: could not spool the offline status: %s", exc)
        self._need_peek = True

    def _retire_will(self) -> None:
        """Put the prepared will into the spool (sent like any message) and forget it."""
        will = self._will
        if will is None:
            return
        if will.payload is None:
            try:
                will.payload = bytes(self._will_builder(will.seq))
            except Exception:
                self._count("errors")
                log.exception("mqtt: building the offline status (seq %d) failed", will.seq)
                self._will = None
                return
        self._spool.put(will.topic, will.payload, qos=QOS["status"], retain=RETAIN["status"])
        self._will = None
        self._remove_will_file()

    def _write_will_file(self, will: _PreparedWill, payload: bytes) -> None:
        data = json.dumps(
            {"seq": will.seq, "topic": will.topic, "payload": base64.b64encode(payload).decode()}
        )
        tmp = self._will_file.with_name(self._will_file.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._will_file)
            _fsync_dir(self._will_file.parent)
        except OSError as exc:
            self._count("errors")
            log.error(
                "mqtt: cannot write %s (%s); a crash now would leave a seq gap",
                self._will_file,
                exc,
            )

    def _remove_will_file(self) -> None:
        try:
            self._will_file.unlink(missing_ok=True)
        except OSError as exc:
            self._count("errors")
            log.error("mqtt: cannot remove %s: %s", self._will_file, exc)

    def _recover_will_file(self) -> None:
        """A will left by a process that did not stop cleanly: send it (see module docstring)."""
        try:
            text = self._will_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            self._count("errors")
            log.error("mqtt: cannot read %s: %s", self._will_file, exc)
            return
        try:
            data = json.loads(text)
            will_topic = str(data["topic"])
            payload = base64.b64decode(data["payload"], validate=True)
        except (ValueError, KeyError, TypeError) as exc:
            self._count("errors")
            log.error("mqtt: %s is unreadable (%s); removing it", self._will_file, exc)
        else:
            self._spool.put(will_topic, payload, qos=QOS["status"], retain=RETAIN["status"])
            log.info(
                "mqtt: spooled the offline status (seq %s) of the previous run", data.get("seq")
            )
        self._remove_will_file()

    # --- small helpers --------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the socket buffer is full of wake-ups already: the thread will wake
        except OSError as exc:
            if exc.errno != errno.EBADF:  # closed by close(): nothing left to wake
                raise

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # drained: nothing more to read
            while self._wake_r.recv(4096):
                pass

    def _close_sockets(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _connect_failed(self, text: str) -> None:
        """Record why a connect failed; log it once, not on every retry of a long outage."""
        repeated = text == self._last_connect_failure
        self._last_connect_failure = text
        self._set_error(text)
        log.log(logging.DEBUG if repeated else logging.WARNING, "mqtt: %s", text)

    def _set_error(self, text: str) -> None:
        with self._lock:
            self._stats["last_error"] = text


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, socket.timeout | TimeoutError):
        return f"timed out ({text})"
    return text


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        log.debug("mqtt: cannot open %s to fsync it: %s", path, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.debug("mqtt: fsync of %s failed: %s", path, exc)
    finally:
        os.close(fd)
