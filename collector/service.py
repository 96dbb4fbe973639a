"""``edgeship collect``: subscribe to a fleet, validate, store, and serve the fleet's state.

Data path, and why it is shaped this way::

    broker ──► paho network thread ──► pending list ──► committer thread ──► worker ──► store
                (on_message: append)                    (batch every       (ingest +
                       ▲                                 batch_interval_s   insert_batch,
                       └──────── PUBACK ◄─────────────── or batch_max)      one transaction)

* **Acks after commit.** paho would acknowledge a QoS 1 message as soon as it arrives; a
  collector killed between that and its database commit would lose the message. The client runs
  with ``manual_ack=True`` and the committer acknowledges a batch only after the transaction that
  stored it, so the broker redelivers everything un-acknowledged to the persistent session when
  the collector comes back (a store error likewise leaves the batch un-acked, and it is retried).
* **No message can hold a batch.** A batch the store refuses for a value in it
  (:class:`~collector.store.RecordError`, or any error that is not the database's state) is
  split in halves, and the halves again, until the refused record is alone: it is kept as a dead
  letter (``field="store"``) and every other message of the batch is stored once. Only a store
  that cannot write at all (down, locked, full) makes a batch wait and be retried whole; while
  one does, or a worker is down, ``/api/health`` says ``ok: false`` with the reason. Before
  this, one bad message pinned its committer thread in an endless retry, and with as many bad
  batches as committers (``workers``, 2 by default) nothing more was stored; its un-acknowledged
  deliveries also came back first after a restart, so the restart was poisoned again.
* **A persistent session.** A fixed client id, MQTT v5 ``clean_start=False`` with a session
  expiry (3.1.1: ``clean_session=False``): the broker queues what arrives while the collector is
  down. MQTT v5 is tried first, then 3.1.1 if the broker refuses the protocol version.
* **Flow control.** With manual acks the broker stops sending once ``receive_maximum`` (v5
  CONNECT property; for 3.1.1 the broker's ``max_inflight_messages``) messages are
  unacknowledged; that bounds the collector's memory and is why a batch is flushed at
  ``batch_max`` messages or ``batch_interval_s`` after its first message, whichever comes first.
* **Decode and store in worker processes** (``worker="process"``, ``workers=2`` by default):
  paho's receive loop is pure Python and needs most of a core at high rates; validation and SQL
  need more again, so each committer thread hands its batch to its own child process (its own
  database connection; SQLite serializes the commits, PostgreSQL runs them side by side) and
  receiving, decoding and storing overlap on several cores. A worker exits when its parent
  does (its pipe closes). ``worker="thread"`` does the work in the one committer thread.
* **Duplicates** are dropped by the store (unique key + ON CONFLICT DO NOTHING), never by this
  process, so several collectors sharing a fleet through ``$share/{group}/...`` stay correct.

The HTTP JSON API (:mod:`collector.api`) and the fleet state (:mod:`collector.state`)
run in this process and read the store through their own connection.

:class:`Collector` composes the parts, each in its own module: the broker session
(:mod:`collector.session`), the commit pipeline (:mod:`collector.pipeline`) with its workers
(:mod:`collector.worker`), commands to devices (:mod:`collector.commands`), and the HTTP API.
Its config is :mod:`collector.config`; :mod:`collector.program` adds the monitor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from collector.api import SentCommand
from collector.commands import Commander
from collector.config import CollectorConfig, parse_http_address
from collector.errors import CollectorError
from collector.pipeline import CommitPipeline, Pending, brief
from collector.session import MqttSession
from collector.state import FleetState
from collector.store import Store, open_store
from collector.worker import BatchOutcome, process_batch
from device_agent.contracts.messages import Command
from device_agent.httpserver import is_loopback

if TYPE_CHECKING:
    from collector.http_server import ApiServer
    from collector.leader import Leadership

__all__ = [
    "BatchOutcome",
    "Collector",
    "CollectorConfig",
    "CollectorStats",
    "parse_http_address",
    "process_batch",
]

log = logging.getLogger("collector")


@dataclass(frozen=True)
class CollectorStats:
    """Counters since start. ``received`` counts committed deliveries (duplicates and dead
    letters included); ``stored`` the new messages; ``uncommitted`` deliveries not committed
    (and so not acknowledged) yet, ``pending`` the part of them no worker has taken yet;
    ``redelivered`` deliveries the broker flagged as re-sent (after a reconnect or a crash);
    ``subscribed`` whether the broker has granted the fleet's subscription on the current
    connection (``connected`` alone does not mean messages flow yet)."""

    started_at: float
    first_received_at: float | None
    connected: bool
    protocol: str | None
    connects: int
    received: int
    stored: int
    duplicates: int
    dead_letters: int
    ignored: int
    batches: int
    acked: int
    redelivered: int
    pending: int
    uncommitted: int
    store_errors: int
    last_commit_at: float | None
    last_error: str | None
    dead_by_field: dict[str, int]
    ignored_by_reason: dict[str, int] = field(default_factory=dict)
    subscribed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Collector:
    """The collector service. ``start()`` returns once the store is open and the first broker
    connection is up with its subscription granted (or still being retried in the
    background); ``stop()`` commits and
    acknowledges what was received, then disconnects (the broker keeps the session).

    ::

        with Collector(CollectorConfig("mqtt://localhost", fleet="greenhouse")) as c:
            print(c.state.snapshot().to_dict())
    """

    def __init__(self, config: CollectorConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._started_at = clock()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._failed: BaseException | None = None
        self._reader: Store | None = None
        self._schema_version: int | None = None
        self._state: FleetState | None = None
        self._http: ApiServer | None = None
        self._leadership: Leadership | None = None
        self._threads: list[threading.Thread] = []
        self.session = MqttSession(
            config,
            stopping=self._stopping,
            on_message=self._on_message,
            on_publish=self._on_publish,
            note_error=self._note_error,
            fail=self._fail,
        )
        self.pipeline = CommitPipeline(
            config,
            clock=clock,
            stopping=self._stopping,
            ack=lambda batch: self.session.ack((p.mid, p.qos, p.generation) for p in batch),
            committed=self._committed,
            fail=self._fail,
        )
        self.commander = Commander(
            lambda: self.session.client,
            lambda: self.session.status()[0],
            config.broker.display(),
            clock,
        )

    # --- lifecycle ---

    def start(self) -> Collector:
        """Open the store, start the workers and the API, connect. On an error (a bad store,
        a port in use, credentials the broker refuses) whatever started is stopped again."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        reader = open_store(cfg.store_url)  # creates or migrates the schema: fail fast here
        self._reader = reader
        # Read once: /api/health must answer without the database (down, or a silent link).
        self._schema_version = reader.schema_version()
        self._state = FleetState(
            reader, fleet=cfg.fleet, config=cfg.state_config, clock=self._clock
        )
        self.pipeline.start()
        address = cfg.http_address
        if address is not None:
            from collector.http_server import ApiServer, HttpSettings

            settings = HttpSettings(
                tls_cert_file=cfg.http_tls_cert_file, tls_key_file=cfg.http_tls_key_file
            )
            self._http = ApiServer.for_collector(
                self,
                address,
                api_token=cfg.api_token,
                api_read_token=cfg.api_read_token,
                settings=settings,
            ).start()
            log.info(
                "JSON API on %s://%s:%d/api/health", self._http.scheme, *self.http_address_bound()
            )
            if not is_loopback(address[0]) and cfg.api_token is None and cfg.api_read_token is None:
                log.warning(
                    "the JSON API listens on %s without an API token: whoever reaches it reads "
                    "the fleet's state (commands stay disabled); bind 127.0.0.1 or set "
                    "--api-read-token-file and --api-token-file", address[0],
                )  # fmt: skip
        self.session.connect()
        # Return once messages flow: a fresh session receives nothing published before the
        # broker grants its subscription (SUBACK), and a caller's first message must not be
        # lost to that (the API above answers meanwhile, saying subscribed: false).
        if self.session.status()[0] and not self.session.wait_subscribed(cfg.connect_timeout_s):
            log.warning(
                "the broker has not granted the subscription to %s within %.0f s",
                cfg.topic_filter,
                cfg.connect_timeout_s,
            )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Commit and acknowledge what arrived, disconnect, and stop every thread."""
        if self._stopping.is_set():
            self._stopped.wait(timeout_s)
            return
        self._stopping.set()
        self.pipeline.stop(timeout_s)
        self.session.disconnect()
        if self._http is not None:
            self._http.stop()
        self.pipeline.close()
        if self._reader is not None:
            self._reader.close()
        self._stopped.set()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the collector stops (by stop() or a fatal error); True if it did."""
        return self._stopped.wait(timeout_s)

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped the collector, if one did."""
        return self._failed

    @property
    def state(self) -> FleetState:
        if self._state is None:
            raise CollectorError("the collector is not started")
        return self._state

    @property
    def http_server(self) -> ApiServer | None:
        """The HTTP API's server (None while it is off); a monitor attaches itself to it."""
        return self._http

    def attach_leadership(self, leadership: Leadership | None) -> None:
        """Show the monitor's leadership of the fleet on /api/health (None: no monitor)."""
        self._leadership = leadership

    def http_address_bound(self) -> tuple[str, int]:
        """The API's bound (host, port): useful with port 0."""
        if self._http is None:
            raise CollectorError("the JSON API is off")
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    @property
    def commit_stall_s(self) -> float:
        """How long a store call may last before /api/health lists it as a problem."""
        return self.pipeline.commit_stall_s

    @commit_stall_s.setter
    def commit_stall_s(self, value: float) -> None:
        self.pipeline.commit_stall_s = value

    @property
    def stats(self) -> CollectorStats:
        connected, connects, protocol = self.session.status()
        return CollectorStats(
            started_at=self._started_at,
            connected=connected,
            protocol=protocol,
            connects=connects,
            subscribed=self.session.subscribed(),
            **self.pipeline.counters(),
        )

    def health(self) -> dict[str, Any]:
        """What ``/api/health`` returns: ``ok`` is False, and ``problems`` says why, while the
        collector is disconnected, stopping or stopped by a failure, while a batch cannot be
        committed (the store cannot write it, its worker failed, or it is being split because
        the store refused a message in it) and while a worker process is down. ``leader`` is
        the monitor's leadership of the fleet (:mod:`collector.leader`; None without a
        monitor); a collector that does not lead is healthy."""
        stats = self.stats
        problems = self.problems(stats)
        return {
            "ok": not problems,
            "problems": problems,
            "broker": self.session.broker.display(),
            "client_id": self.config.session_id,
            "subscription": self.config.topic_filter,
            "store": self._reader.url if self._reader is not None else None,
            "schema_version": self._schema_version,
            "collector": stats.to_dict(),
            "failure": None if self._failed is None else str(self._failed),
            "leader": None if self._leadership is None else self._leadership.to_dict(),
        }

    def problems(self, stats: CollectorStats | None = None) -> list[str]:
        """Why the collector is not healthy now, one line each; empty when it is."""
        stats = stats or self.stats
        out: list[str] = []
        if self._failed is not None:
            out.append(f"stopped by a failure: {brief(self._failed)}")
        elif self._stopping.is_set():
            out.append("stopping")
        if not stats.connected:
            out.append(f"not connected to the broker {self.session.broker.display()}")
        out.extend(self.pipeline.problems())
        return out

    def _fail(self, exc: BaseException) -> None:
        log.error("collector stopping: %s", exc)
        self._failed = exc
        threading.Thread(target=self.stop, name="edgeship-stop", daemon=True).start()

    # --- the parts' hooks ---

    def _on_message(self, m: mqtt.MQTTMessage, generation: int) -> None:
        if self._stopping.is_set():
            return  # not acknowledged: the broker re-sends it to the session next time
        try:
            topic = m.topic
        except UnicodeDecodeError:
            topic = repr(m._topic)  # not UTF-8: a dead letter, named as best we can
        payload = m.payload if isinstance(m.payload, bytes) else bytes(m.payload)
        self.pipeline.offer(
            Pending(topic, payload, self._clock(), m.mid, m.qos, generation), bool(m.dup)
        )

    def _on_publish(self, mid: int, code: int) -> None:
        self.commander.puback(mid, code)

    def _note_error(self, message: str) -> None:
        self.pipeline.note_error(message)

    def _committed(self) -> None:
        if self._state is not None:
            self._state.invalidate()

    # --- commands (the API's POST /api/devices/{device}/commands) ---

    def send_command(
        self, fleet: str, device: str, command: Command, timeout_s: float = 10.0
    ) -> SentCommand:
        """See :meth:`collector.commands.Commander.send_command`."""
        return self.commander.send_command(fleet, device, command, timeout_s)

    def sent_command(self, command_id: str) -> SentCommand | None:
        return self.commander.sent_command(command_id)
