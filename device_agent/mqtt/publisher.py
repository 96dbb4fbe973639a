"""The publisher: the agent's one object for the MQTT link, composed of its parts.

:class:`Publisher` builds the messages' routes and spools them (:meth:`Publisher.publish`),
runs the :class:`~device_agent.mqtt.connection.Connection` on a network thread and the
:class:`~device_agent.mqtt.commands.CommandIntake` on a worker thread, and gives the connection
its work: the :class:`~device_agent.mqtt.outbox.Outbox` (spool draining), the
:class:`~device_agent.mqtt.will.WillKeeper` (the Last Will) and the ``online`` birth.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.contracts.messages import QOS, RETAIN, Command, topic, validate_id
from device_agent.errors import ConfigError, EdgeshipError, ProtocolError
from device_agent.mqtt.commands import CommandIntake
from device_agent.mqtt.config import BrokerConfig
from device_agent.mqtt.connection import Backoff, Connection
from device_agent.mqtt.outbox import Outbox
from device_agent.mqtt.stats import LinkStats
from device_agent.mqtt.will import WillKeeper
from device_agent.spool import Spool

__all__ = ["PUBLISHED_KINDS", "Publisher"]

# One logger for the whole link, as before it was split into modules.
log = logging.getLogger("device_agent.mqtt")

PublishedKind = Literal["status", "telemetry", "outliers", "cmd/reply"]
# What a device may publish; "cmd" flows the other way and "alerts" belong to collectors.
PUBLISHED_KINDS: tuple[PublishedKind, ...] = ("status", "telemetry", "outliers", "cmd/reply")


class _LinkWork:
    """What the connection carries (its :class:`~device_agent.mqtt.connection.Session`): the
    spool drained by the outbox, the will, the birth, and commands to the intake."""

    def __init__(
        self,
        spool: Spool,
        stats: LinkStats,
        outbox: Outbox,
        will: WillKeeper,
        birth: Callable[[int], bytes],
        status_topic: str,
        intake: CommandIntake | None,
    ) -> None:
        self._spool = spool
        self._stats = stats
        self.outbox = outbox
        self.will_keeper = will
        self._birth = birth
        self._status_topic = status_topic
        self._intake = intake

    def will(self) -> tuple[str, bytes] | None:
        prepared = self.will_keeper.prepare()
        if prepared is None or prepared.payload is None:
            return None
        return prepared.topic, prepared.payload

    def accepted(self, client: paho.Client) -> None:
        try:
            self._spool.put_message(
                self._status_topic, self._birth, qos=QOS["status"], retain=RETAIN["status"]
            )
        except Exception as exc:  # the agent's builder or the spool: count, log, stay connected
            self._stats.count("errors")
            log.exception("mqtt: the online status could not be spooled: %s", exc)
        self.outbox.poke()

    def woken(self) -> None:
        self.outbox.poke()

    def pump(self, client: paho.Client) -> None:
        self.outbox.pump(client)

    def acked(self, mid: int, reason_code: ReasonCode) -> None:
        self.outbox.acked(mid, reason_code)

    def received(self, message: paho.MQTTMessage) -> None:
        if self._intake is not None:
            self._intake.received(message)
        else:
            log.debug("mqtt: ignored a message on %s", message.topic)

    def closing(self) -> None:
        self.will_keeper.retire_logged()  # the offline status, queued behind the backlog
        self.outbox.poke()

    def flushed(self) -> bool:
        return self.outbox.flushed()

    def backlog(self) -> int:
        return self.outbox.backlog()

    def ended(self, accepted: bool) -> None:
        self.outbox.reset()
        if accepted:
            # The broker had this will: it may or may not have published it. Send it ourselves
            # too (see the package docstring) and reserve a new number for the next connection.
            self.will_keeper.retire_logged()

    def stopped(self) -> None:
        self.will_keeper.retire_logged(" at close")


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
        self._stats = LinkStats()
        # kind -> (topic, qos, retain)
        self._routes: dict[str, tuple[str, int, bool]] = {
            k: (topic(fleet, device, k), QOS[k], RETAIN[k]) for k in PUBLISHED_KINDS
        }
        status_topic = self._routes["status"][0]
        cmd_topic = topic(fleet, device, "cmd")
        self._intake = (
            None
            if on_command is None
            else CommandIntake(cmd_topic, on_command, on_command_overflow, self._stats)
        )
        self._work = _LinkWork(
            spool,
            self._stats,
            Outbox(spool, self._stats, max_inflight),
            WillKeeper(spool, status_topic, will, self._stats),
            birth,
            status_topic,
            self._intake,
        )
        self._connection = Connection(
            config,
            self._work,
            self._stats,
            client_id=config.client_id or f"edgeship-{fleet}-{device}",
            max_inflight=max_inflight,
            subscribe_to=None if on_command is None else cmd_topic,
            backoff=Backoff(backoff_min_s, backoff_max_s, rng),
            clock=clock,
        )
        self._started = False
        self._closed = False
        self._net_thread: threading.Thread | None = None
        self._cmd_thread: threading.Thread | None = None
        self._deaths: dict[str, str] = {}  # thread name -> why it died

    @property
    def connected(self) -> bool:
        """Whether a connection is up and accepted by the broker."""
        return self._connection.connected

    @property
    def protocol_in_use(self) -> str | None:
        """``"5"`` or ``"3.1.1"``: the protocol of the current or last accepted connection."""
        return self._connection.protocol_in_use

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see :class:`~device_agent.mqtt.stats.LinkStats`),
        ``inflight`` (QoS 1 publishes awaiting their PUBACK), ``connected`` and ``protocol``."""
        out = self._stats.snapshot()
        out["inflight"] = self._work.outbox.inflight
        out["connected"] = self._connection.connected
        out["protocol"] = self._connection.protocol_in_use
        return out

    def start(self) -> None:
        """Start the background threads and return at once; the broker may be unreachable."""
        if self._closed:
            raise EdgeshipError("mqtt publisher: start() after close()")
        if self._started:
            return
        self._started = True
        self._work.will_keeper.recover_file()
        if self._intake is not None:
            self._cmd_thread = threading.Thread(
                target=self._watched("mqtt-commands", self._intake.serve),
                name="edgeship-mqtt-commands",
                daemon=True,
            )
            self._cmd_thread.start()
        self._net_thread = threading.Thread(
            target=self._watched("mqtt-network", self._connection.run),
            name="edgeship-mqtt",
            daemon=True,
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
                if name == "mqtt-network" or self._intake is not None:
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
        self._connection.wake()
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
            self._connection.close_sockets()
            return
        flush_s = max(0.0, float(flush_timeout_s))
        self._connection.request_close(flush_s)
        net = self._net_thread
        if net is not None:
            net.join(flush_s + self.config.connect_timeout_s + 5.0)
            if net.is_alive():
                log.error("mqtt: the network thread did not stop in time; leaving it behind")
        if self._cmd_thread is not None and self._intake is not None:
            if not self._intake.stop(timeout_s=1.0):
                log.error("mqtt: the command worker is stuck; leaving it behind")
            else:
                self._cmd_thread.join(timeout=max(1.0, flush_s))
        self._connection.close_sockets()
