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
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from collector.api import SentCommand
from collector.errors import BrokerError, CollectorError, ConfigError, StoreError
from collector.ingest import DeadLetter, Ignored, Record, dead_letter, ingest
from collector.state import FleetState, StateConfig
from collector.store import InsertResult, RecordError, Store, open_store, redact_url
from device_agent.contracts.messages import (
    Command,
    encode,
    safe_text,
    shared_subscription,
    subscription,
    validate_id,
)
from device_agent.contracts.messages import topic as message_topic
from device_agent.errors import ProtocolError
from device_agent.httpserver import is_loopback

__all__ = [
    "BatchOutcome",
    "BrokerAddress",
    "Collector",
    "CollectorConfig",
    "CollectorStats",
    "parse_broker_url",
    "parse_http_address",
    "process_batch",
    "run_collector",
]

log = logging.getLogger("collector")

Delivery = tuple[str, bytes, float]  # (topic, payload, received_at): what the worker gets

# A store call (one batch: insert, or the splits of a refused one) that lasts this long is a
# problem in /api/health: a database link that went silent (a partition, a dropped route) gives
# no error for as long as the kernel keeps retransmitting, and the batch waits all that time.
COMMIT_STALL_S = 60.0

# dead_by_field counts at most this many field names; the rest are counted as OTHER_DEAD_FIELD
# (a field can be a key of the message, which its sender picks).
MAX_DEAD_FIELDS = 100
OTHER_DEAD_FIELD = "(other)"

# paho's Properties.__init__ is unannotated; a typed name keeps strict mypy checking the call.
_new_properties: Callable[[int], Properties] = Properties

_PROTOCOL_NAMES = {MQTTProtocolVersion.MQTTv5: "5", MQTTProtocolVersion.MQTTv311: "3.1.1"}
_UNSUPPORTED_PROTOCOL = 132  # CONNACK "Unsupported protocol version" (3.1.1 return code 1)
_FATAL_CONNACK = {134: "bad user name or password", 135: "not authorized"}
_PUBACK_REASONS = {
    128: "unspecified error",
    131: "implementation specific error",
    135: "not authorized",
    144: "topic name invalid",
    151: "quota exceeded",
}


# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is: ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def display(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:1883]``, ``mqtts://host[:8883]``, with optional ``user:password@``;
    a bare ``host[:port]`` means ``mqtt://``. Raises ConfigError."""
    text = url.strip()
    if "://" not in text:
        text = "mqtt://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {redact_url(url)!r}: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"broker URL {redact_url(url)!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"broker URL {redact_url(url)!r} has no host")
    tls = parts.scheme in ("mqtts", "ssl")
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password else None,
    )


def parse_http_address(value: str | None) -> tuple[str, int] | None:
    """``127.0.0.1:9108``, ``:9108`` or ``9108`` (bound to 127.0.0.1), ``0.0.0.0:9108`` to
    listen on every interface; ``off`` or empty disables the API. Raises ConfigError."""
    if value is None or value.strip().lower() in ("", "off", "none"):
        return None
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--http {value!r}: expected HOST:PORT, e.g. 127.0.0.1:9108") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--http {value!r}: port {port} is not in 0..65535")
    return host, port


def _default_client_id(fleet: str | None) -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:32] or "host"
    return f"edgeship-collector-{fleet or 'all'}-{host}"[:64]


@dataclass(frozen=True)
class CollectorConfig:
    """How a collector runs. Only ``broker_url`` is required.

    ``fleet`` None collects every fleet (``edgeship/+/#``). ``client_id`` names the broker
    session, so it must stay the same across restarts (default: derived from the fleet and the
    host name) and differ between collectors sharing a fleet through ``share_group``.
    ``stale_windows``: a device is stale when no telemetry arrived for that many of its windows.
    ``worker``: ``process`` (decode and store in ``workers`` child processes, each with its own
    batches and database connection; the default) or ``thread`` (one, in this process).
    ``ca_file`` verifies an ``mqtts://`` broker against a private CA; ``cert_file`` and
    ``key_file`` present a client certificate (a broker with ``use_identity_as_username``
    takes its CN as the user name).
    ``api_token`` enables the API's state-changing routes (sending commands), for requests
    with ``Authorization: Bearer <api_token>``; None leaves the API read-only.
    """

    broker_url: str
    fleet: str | None = None
    store_url: str = "sqlite:///fleet.db"
    http: str | None = "127.0.0.1:9108"
    client_id: str | None = None
    share_group: str | None = None
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86400
    receive_maximum: int = 10_000
    batch_max: int = 2_000
    batch_interval_s: float = 0.05
    worker: Literal["process", "thread"] = "process"
    workers: int = 2
    stale_windows: float = 3.0
    default_window_s: float = 10.0
    lookback_s: float = 300.0
    ca_file: str | None = None
    connect_timeout_s: float = 10.0
    api_token: str | None = field(default=None, repr=False)
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        self.broker  # noqa: B018 - parse now: a bad URL is a ConfigError at construction
        self.http_address  # noqa: B018
        for value, what in ((self.fleet, "fleet"), (self.share_group, "share_group")):
            if value is not None:
                try:
                    validate_id(value, what)
                except ProtocolError as exc:
                    raise ConfigError(str(exc)) from exc
        if self.client_id is not None and not 0 < len(self.client_id) <= 128:
            raise ConfigError("client_id must be 1 to 128 characters")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"protocol {self.protocol!r}: use auto, 5 or 3.1.1")
        if self.worker not in ("process", "thread"):
            raise ConfigError(f"worker {self.worker!r}: use process or thread")
        if not 1 <= self.workers <= 64:
            raise ConfigError("workers must be in 1..64")
        if not 1 <= self.receive_maximum <= 65535:
            raise ConfigError("receive_maximum must be in 1..65535 (an MQTT v5 limit)")
        if not 1 <= self.batch_max <= 100_000:
            raise ConfigError("batch_max must be in 1..100000")
        if not 0 < self.batch_interval_s <= 60:
            raise ConfigError("batch_interval_s must be in (0, 60]")
        if self.stale_windows <= 0 or self.default_window_s <= 0 or self.lookback_s <= 0:
            raise ConfigError("stale_windows, default_window_s and lookback_s must be positive")
        if not 5 <= self.keepalive_s <= 65535:
            raise ConfigError("keepalive_s must be in 5..65535")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ConfigError("session_expiry_s must be in 0..4294967295")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("key_file given without cert_file (the client certificate)")
        for path, what in ((self.ca_file, "ca_file"), (self.cert_file, "cert_file"),
                           (self.key_file, "key_file")):  # fmt: skip
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{what} {path}: no such file")
        if self.api_token is not None:
            from collector.api import check_api_token

            check_api_token(self.api_token)

    @property
    def broker(self) -> BrokerAddress:
        return parse_broker_url(self.broker_url)

    @property
    def http_address(self) -> tuple[str, int] | None:
        return parse_http_address(self.http)

    @property
    def session_id(self) -> str:
        return self.client_id or _default_client_id(self.fleet)

    @property
    def topic_filter(self) -> str:
        pattern = subscription(self.fleet)
        return (
            pattern if self.share_group is None else shared_subscription(self.share_group, pattern)
        )

    @property
    def state_config(self) -> StateConfig:
        return StateConfig(
            stale_windows=self.stale_windows,
            default_window_s=self.default_window_s,
            lookback_s=self.lookback_s,
        )


# --- one batch: ingest + store (runs in the worker) -----------------------------------------


@dataclass(frozen=True)
class BatchOutcome:
    """What happened to one batch: the store's counts, plus what ingest set aside.
    ``dead_samples`` holds (topic, field, error) of up to 20 dead letters, for the log.
    ``splits``: how many smaller batches were tried because the store refused one (0 when the
    batch went in whole); ``refused``: records the store refused alone, now dead letters."""

    stored: InsertResult
    ignored: int
    dead_by_field: dict[str, int]
    dead_samples: tuple[tuple[str, str, str], ...]
    ignored_by_reason: dict[str, int] = field(default_factory=dict)
    splits: int = 0
    refused: int = 0


# One delivery and what ingest made of it: the delivery is kept to dead-letter the record.
_Entry = tuple[Delivery, Record | DeadLetter]


def process_batch(
    store: Store,
    deliveries: list[Delivery],
    fleet: str | None = None,
    note: Callable[[str], None] | None = None,
) -> BatchOutcome:
    """Validate every delivery and store the batch in one transaction.

    If the store refuses the batch for a value in it (:class:`RecordError`, or an error that
    is not a :class:`StoreError`), the batch is split until the refused record is alone; that
    one becomes a dead letter (``field="store"``), everything else is stored once. ``note``
    hears, once, that a batch is being split and why. Raises StoreError when the store cannot
    write at all: then nothing of the batch is acknowledged and it is tried again whole.
    """
    entries: list[_Entry] = []
    ignored: dict[str, int] = {}
    for delivery in deliveries:
        result = ingest(*delivery, fleet=fleet)
        if isinstance(result, Ignored):
            ignored[result.reason] = ignored.get(result.reason, 0) + 1
        else:
            entries.append((delivery, result))
    splitter = _Splitter(store, note)
    stored, dead = splitter.store(entries)
    by_field: dict[str, int] = {}
    for d in dead:
        by_field[d.field] = by_field.get(d.field, 0) + 1
    samples = tuple((d.topic, d.field, d.error) for d in dead[:20])
    return BatchOutcome(
        stored, sum(ignored.values()), by_field, samples, ignored, splitter.splits,
        splitter.refused,
    )  # fmt: skip


class _Splitter:
    """Stores entries in one transaction, or splits them (see :func:`process_batch`)."""

    def __init__(self, store: Store, note: Callable[[str], None] | None) -> None:
        self._store = store
        self._note = note
        self.splits = 0
        self.refused = 0

    def store(self, entries: list[_Entry]) -> tuple[InsertResult, list[DeadLetter]]:
        """(what the store did, the dead letters stored or already there)."""
        records = [e for _, e in entries if not isinstance(e, DeadLetter)]
        dead = [e for _, e in entries if isinstance(e, DeadLetter)]
        try:
            return self._store.insert_batch(records, dead), dead
        except RecordError as exc:
            error = str(exc)
        except StoreError:
            raise
        except Exception as exc:  # an error tied to a record, not to the database's state
            error = safe_text(f"{type(exc).__name__}: {exc}")
        if len(entries) == 1:
            (topic, payload, received_at), _ = entries[0]
            refused = dead_letter(
                topic, payload, received_at, "store", f"the store refused it: {error}"
            )
            self.refused += 1
            return self._store.insert_batch([], [refused]), [refused]
        if self.splits == 0 and self._note is not None:
            self._note(f"the store refused a batch of {len(entries)} messages ({error}); "
                       "splitting it to find the refused one")  # fmt: skip
        self.splits += 2
        half = len(entries) // 2
        first, first_dead = self.store(entries[:half])
        second, second_dead = self.store(entries[half:])
        return first + second, first_dead + second_dead


class _Sink(Protocol):
    def process(self, deliveries: list[Delivery], note: Callable[[str], None]) -> BatchOutcome:
        """Ingest and store one batch; ``note`` hears what the collector's health must show
        while the call lasts (a batch being split)."""
        ...

    def exit_code(self) -> int | None:
        """The worker's exit status if it has exited, else None."""
        ...

    def close(self) -> None: ...


class _InlineSink:
    def __init__(self, store_url: str, fleet: str | None) -> None:
        self._store = open_store(store_url, migrate=False)
        self._fleet = fleet

    def process(self, deliveries: list[Delivery], note: Callable[[str], None]) -> BatchOutcome:
        return process_batch(self._store, deliveries, self._fleet, note)

    def exit_code(self) -> int | None:
        return None

    def close(self) -> None:
        self._store.close()


def _worker_main(conn: Any, store_url: str, fleet: str | None) -> None:
    """The worker process: batches in, outcomes out, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM are the parent's
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        store = open_store(store_url, migrate=False)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    try:
        while True:
            try:
                deliveries = conn.recv()
            except (EOFError, OSError):
                break  # the collector is gone (stopped or killed): nothing to acknowledge
            if deliveries is None:
                break
            try:
                outcome = process_batch(
                    store, deliveries, fleet, lambda text: conn.send(("note", text))
                )
                conn.send(("ok", outcome))
            except StoreError as exc:
                conn.send(("store", str(exc)))
            except Exception:
                conn.send(("bug", traceback.format_exc()))
    except (BrokenPipeError, EOFError, OSError):
        pass
    finally:
        store.close()


class _ProcessSink:
    """The worker as ``python -m collector.service --worker``: a plain child process (not
    multiprocessing's spawn, which would re-import the caller's ``__main__``), talking over a
    socketpair with multiprocessing's framing. Closing our end, or dying, stops it."""

    def __init__(self, store_url: str, fleet: str | None) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "collector.service", "--worker",
                 str(theirs.fileno()), store_url, fleet or ""],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError as exc:
            ours.close()
            raise CollectorError(f"cannot start the collector worker: {exc}") from exc
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        kind, detail = self._receive(timeout=120.0)
        if kind != "ready":
            self.close()
            raise StoreError(f"collector worker could not open the store: {detail}")

    def _receive(self, timeout: float | None = None) -> tuple[str, Any]:
        try:
            if timeout is not None and not self._conn.poll(timeout):
                raise CollectorError(f"collector worker did not answer in {timeout:.0f} s")
            reply: tuple[str, Any] = self._conn.recv()
            return reply
        except (EOFError, OSError) as exc:
            raise CollectorError(
                f"collector worker process exited (code {self._proc.poll()})"
            ) from exc

    def process(self, deliveries: list[Delivery], note: Callable[[str], None]) -> BatchOutcome:
        try:
            self._conn.send(deliveries)
        except OSError as exc:
            raise CollectorError("collector worker process is gone") from exc
        kind, detail = self._receive()
        while kind == "note":
            note(str(detail))
            kind, detail = self._receive()
        if kind == "ok":
            outcome: BatchOutcome = detail
            return outcome
        if kind == "store":
            raise StoreError(str(detail))
        raise CollectorError(f"collector worker failed:\n{detail}")

    def exit_code(self) -> int | None:
        return self._proc.poll()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._conn.close()


def _worker_entry(argv: list[str]) -> int:
    fd, store_url, fleet = int(argv[0]), argv[1], argv[2] or None
    _worker_main(Connection(fd), store_url, fleet)
    return 0


# --- the collector --------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectorStats:
    """Counters since start. ``received`` counts committed deliveries (duplicates and dead
    letters included); ``stored`` the new messages; ``uncommitted`` deliveries not committed
    (and so not acknowledged) yet, ``pending`` the part of them no worker has taken yet;
    ``redelivered`` deliveries the broker flagged as re-sent (after a reconnect or a crash)."""

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

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class _Pending(NamedTuple):
    """One delivery waiting for its commit (a tuple: the receive path makes one a message)."""

    topic: str
    payload: bytes
    received_at: float
    mid: int
    qos: int
    generation: int


class Collector:
    """The collector service. ``start()`` returns once the store is open and the first broker
    connection is up (or still being retried in the background); ``stop()`` commits and
    acknowledges what was received, then disconnects (the broker keeps the session).

    ::

        with Collector(CollectorConfig("mqtt://localhost", fleet="greenhouse")) as c:
            print(c.state.snapshot().to_dict())
    """

    def __init__(self, config: CollectorConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._broker = config.broker
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._uncommitted = 0  # guarded by _cond, like _pending
        self._redelivered = 0
        self._ack_lock = threading.Lock()
        self._generation = 0
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._failed: BaseException | None = None
        self._client: mqtt.Client | None = None
        self._sinks: list[_Sink | None] = []
        self._reader: Store | None = None
        self._schema_version: int | None = None
        self._state: FleetState | None = None
        self._http: Any = None
        self._threads: list[threading.Thread] = []
        self._dead_log = _RateLimitedLog(10, 60.0)
        self._counters: dict[str, Any] = {
            "started_at": clock(),
            "first_received_at": None,
            "connected": False,
            "protocol": None,
            "connects": 0,
            "received": 0,
            "stored": 0,
            "duplicates": 0,
            "dead_letters": 0,
            "ignored": 0,
            "batches": 0,
            "acked": 0,
            "redelivered": 0,
            "store_errors": 0,
            "last_commit_at": None,
            "last_error": None,
        }
        self._dead_by_field: dict[str, int] = {}
        self._ignored_by_reason: dict[str, int] = {}
        # committer index -> (since, why) while its batch cannot be committed; guarded by _lock
        self._trouble: dict[int, tuple[float, str]] = {}
        # committer index -> (since, messages) while a store call is in progress; guarded by
        # _lock. A call that does not return (a PostgreSQL link that went silent: no error ever
        # comes) is a problem once it has lasted commit_stall_s.
        self._committing: dict[int, tuple[float, int]] = {}
        self.commit_stall_s = COMMIT_STALL_S
        self._lock = threading.Lock()
        # Commands sent through the API: PUBACK reason codes by packet id, and the newest
        # commands by id (for GET /api/devices/{device}/commands/{id}).
        self._pubacks: dict[int, int] = {}
        self._abandoned: set[int] = set()
        self._pub_cond = threading.Condition()
        self._sent: collections.OrderedDict[str, SentCommand] = collections.OrderedDict()

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
        n = cfg.workers if cfg.worker == "process" else 1
        for _ in range(n):
            self._sinks.append(self._make_sink())
        for i in range(n):
            committer = threading.Thread(
                target=self._commit_loop, args=(i,), name=f"edgeship-commit-{i}", daemon=True
            )
            committer.start()
            self._threads.append(committer)
        address = cfg.http_address
        if address is not None:
            from collector.api import make_api_server

            self._http = make_api_server(
                self._state, self.health, address, api_token=cfg.api_token, commander=self
            )
            t = threading.Thread(target=self._http.serve_forever, name="edgeship-http", daemon=True)
            t.start()
            self._threads.append(t)
            log.info("JSON API on http://%s:%d/api/health", *self.http_address_bound())
            if not is_loopback(address[0]) and cfg.api_token is None:
                log.warning(
                    "the JSON API listens on %s without an API token: whoever reaches it reads "
                    "the fleet's state (commands stay disabled); bind 127.0.0.1 or set "
                    "--api-token-file", address[0],
                )  # fmt: skip
        self._connect_first()

    def _make_sink(self) -> _Sink:
        if self.config.worker == "process":
            return _ProcessSink(self.config.store_url, self.config.fleet)
        return _InlineSink(self.config.store_url, self.config.fleet)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Commit and acknowledge what arrived, disconnect, and stop every thread."""
        if self._stopping.is_set():
            self._stopped.wait(timeout_s)
            return
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            if t.name.startswith("edgeship-commit"):
                t.join(timeout_s)
        client = self._client
        if client is not None:
            client.disconnect()
            client.loop_stop()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for sink in self._sinks:
            if sink is not None:
                sink.close()
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

    def http_address_bound(self) -> tuple[str, int]:
        """The API's bound (host, port): useful with port 0."""
        if self._http is None:
            raise CollectorError("the JSON API is off")
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    @property
    def stats(self) -> CollectorStats:
        with self._lock:
            counters = dict(self._counters)
            by_field = dict(self._dead_by_field)
            by_reason = dict(self._ignored_by_reason)
        with self._cond:
            pending = len(self._pending)
            uncommitted = self._uncommitted
        return CollectorStats(
            **counters,
            pending=pending,
            uncommitted=uncommitted,
            dead_by_field=by_field,
            ignored_by_reason=by_reason,
        )

    def health(self) -> dict[str, Any]:
        """What ``/api/health`` returns: ``ok`` is False, and ``problems`` says why, while the
        collector is disconnected, stopping or stopped by a failure, while a batch cannot be
        committed (the store cannot write it, its worker failed, or it is being split because
        the store refused a message in it) and while a worker process is down."""
        stats = self.stats
        problems = self.problems(stats)
        return {
            "ok": not problems,
            "problems": problems,
            "broker": self._broker.display(),
            "client_id": self.config.session_id,
            "subscription": self.config.topic_filter,
            "store": self._reader.url if self._reader is not None else None,
            "schema_version": self._schema_version,
            "collector": stats.to_dict(),
            "failure": None if self._failed is None else str(self._failed),
        }

    def problems(self, stats: CollectorStats | None = None) -> list[str]:
        """Why the collector is not healthy now, one line each; empty when it is."""
        stats = stats or self.stats
        out: list[str] = []
        if self._failed is not None:
            out.append(f"stopped by a failure: {_brief(self._failed)}")
        elif self._stopping.is_set():
            out.append("stopping")
        if not stats.connected:
            out.append(f"not connected to the broker {self._broker.display()}")
        now = self._clock()
        with self._lock:
            trouble = sorted(self._trouble.items())
            committing = sorted(self._committing.items())
        for index, (since, why) in trouble:
            out.append(f"committer {index}: {why} (for {max(0.0, now - since):.0f} s)")
        for index, (since, n) in committing:
            if now - since >= self.commit_stall_s and index not in dict(trouble):
                out.append(
                    f"committer {index}: a batch of {n} messages has been committing for "
                    f"{now - since:.0f} s; the store does not answer"
                )
        for index, sink in enumerate(list(self._sinks)):
            code = None if sink is None else sink.exit_code()
            if code is not None:
                out.append(
                    f"worker {index} exited with code {code}; a new one starts with the next batch"
                )
        return out

    def _fail(self, exc: BaseException) -> None:
        log.error("collector stopping: %s", exc)
        self._failed = exc
        threading.Thread(target=self.stop, name="edgeship-stop", daemon=True).start()

    # --- MQTT ---

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
        b = self._broker
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

    def _connect_first(self) -> None:
        """Connect once (falling back from v5 to 3.1.1); later reconnects are paho's.

        If the broker is unreachable the attempts continue on a background thread, so the
        collector (and its API) run and report ``connected: false`` meanwhile.
        """
        attempt = self._connect_attempt()
        if attempt is None:
            t = threading.Thread(target=self._connect_retry, name="edgeship-connect", daemon=True)
            t.start()
            self._threads.append(t)

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
            try:
                if protocol == MQTTProtocolVersion.MQTTv5:
                    props = _new_properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = cfg.session_expiry_s
                    props.ReceiveMaximum = cfg.receive_maximum
                    client.connect(
                        self._broker.host, self._broker.port, cfg.keepalive_s,
                        clean_start=False, properties=props,
                    )  # fmt: skip
                else:
                    client.connect(self._broker.host, self._broker.port, cfg.keepalive_s)
            except (OSError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                log.warning("broker %s: cannot connect: %s", self._broker.display(), last)
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
                    self._counters["protocol"] = _PROTOCOL_NAMES[protocol]
                return client
            _abandon(client)
            if rc.value in _FATAL_CONNACK:
                raise BrokerError(
                    f"broker {self._broker.display()} refused the collector: "
                    f"{_FATAL_CONNACK[rc.value]} (check the user name and password in --broker)"
                )
            last = str(rc)
            if rc.value == _UNSUPPORTED_PROTOCOL:
                log.info("broker refused MQTT v5; trying 3.1.1")
                continue
            log.warning("broker %s refused the connection: %s", self._broker.display(), rc)
            return None
        log.warning("broker %s: %s", self._broker.display(), last)
        return None

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            log.warning("broker refused the reconnect: %s", rc)
            return
        with self._lock:
            self._counters["connected"] = True
            self._counters["connects"] += 1
        session = getattr(flags, "session_present", None)
        log.info(
            "connected to %s as %s (session present: %s); subscribing to %s",
            self._broker.display(), self.config.session_id, session, self.config.topic_filter,
        )  # fmt: skip
        if client.protocol == MQTTProtocolVersion.MQTTv5:
            # Retained status only for a new subscription: a resumed session already has it.
            options = SubscribeOptions(
                qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
            )
            client.subscribe(self.config.topic_filter, options=options)
        elif not session:
            client.subscribe(self.config.topic_filter, qos=1)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        for code in codes:
            if code.is_failure:
                self._note_error(f"subscription to {self.config.topic_filter} refused: {code}")
                log.error("broker refused the subscription %s: %s", self.config.topic_filter, code)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        # Acks for deliveries of the lost connection must not go out on the next one: the
        # broker redelivers those messages (same packet id) and they are acknowledged then.
        with self._ack_lock:
            self._generation += 1
        with self._lock:
            self._counters["connected"] = False
        if not self._stopping.is_set():
            log.warning("disconnected from the broker (%s); paho reconnects", rc)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any
    ) -> None:
        with self._pub_cond:
            if mid in self._abandoned:
                self._abandoned.discard(mid)
                return
            self._pubacks[mid] = int(rc.value)
            self._pub_cond.notify_all()

    # --- commands (the API's POST /api/devices/{device}/commands) ---

    def send_command(
        self, fleet: str, device: str, command: Command, timeout_s: float = 10.0
    ) -> SentCommand:
        """Publish ``command`` to ``edgeship/{fleet}/{device}/cmd`` at QoS 1 and wait for the
        broker's PUBACK. Raises BrokerError when not connected, when the broker refuses it
        (MQTT 5 reason code; the collector's user lacks write access to the topic) or when no
        PUBACK comes in ``timeout_s``."""
        client = self._client
        cmd_topic = message_topic(fleet, device, "cmd")
        if client is None or not self.stats.connected:
            raise BrokerError(f"not connected to {self._broker.display()}: command not sent")
        # Not under _pub_cond: paho calls on_publish holding its own message lock, which
        # publish() takes too. A PUBACK that beats us to the wait below is kept by mid.
        info = client.publish(cmd_topic, encode(command), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"cannot publish to {cmd_topic}: {mqtt.error_string(info.rc)}")
        deadline = time.monotonic() + timeout_s
        with self._pub_cond:
            self._abandoned.discard(info.mid)  # a mid number reused long after a timeout
            while info.mid not in self._pubacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abandoned.add(info.mid)  # its late PUBACK must not answer another
                    raise BrokerError(
                        f"the broker did not acknowledge the command in {timeout_s:.0f} s"
                    )
                self._pub_cond.wait(left)
            code = self._pubacks.pop(info.mid)
        if code >= 128:
            reason = _PUBACK_REASONS.get(code, f"reason code {code}")
            raise BrokerError(
                f"the broker refused the command on {cmd_topic}: {reason}; the collector's MQTT "
                "user needs write access to edgeship/+/+/cmd (docs/security.md)"
            )
        sent = SentCommand(fleet, device, cmd_topic, command, self._clock())
        with self._lock:
            self._sent[command.id] = sent
            while len(self._sent) > 1000:
                self._sent.popitem(last=False)
        return sent

    def sent_command(self, command_id: str) -> SentCommand | None:
        with self._lock:
            return self._sent.get(command_id)

    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        if self._stopping.is_set():
            return  # not acknowledged: the broker re-sends it to the session next time
        try:
            topic = m.topic
        except UnicodeDecodeError:
            topic = repr(m._topic)  # not UTF-8: a dead letter, named as best we can
        payload = m.payload if isinstance(m.payload, bytes) else bytes(m.payload)
        item = _Pending(topic, payload, self._clock(), m.mid, m.qos, self._generation)
        with self._cond:
            self._pending.append(item)
            self._uncommitted += 1
            self._redelivered += m.dup
            n = len(self._pending)
            if n == 1 or n >= self.config.batch_max:
                self._cond.notify()

    # --- batching ---

    def _take_batch(self) -> list[_Pending]:
        cfg = self.config
        with self._cond:
            while not self._pending and not self._stopping.is_set():
                self._cond.wait(0.5)
            if not self._stopping.is_set():
                deadline = time.monotonic() + cfg.batch_interval_s
                while len(self._pending) < cfg.batch_max:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stopping.is_set():
                        break
                    self._cond.wait(left)
            batch = self._pending[: cfg.batch_max]
            del self._pending[: cfg.batch_max]
            return batch

    def _commit_loop(self, index: int) -> None:
        backoff = 0.5
        while True:
            batch = self._take_batch()
            if not batch:
                if self._stopping.is_set():
                    return
                continue
            deliveries = [p[:3] for p in batch]
            while True:
                try:
                    with self._lock:
                        self._committing[index] = (self._clock(), len(deliveries))
                    try:
                        outcome = self._process(index, deliveries)
                    finally:
                        with self._lock:
                            self._committing.pop(index, None)
                    backoff = 0.5
                    break
                except StoreError as exc:
                    self._note_error(str(exc), store=True)
                    self._set_trouble(
                        index, f"a batch of {len(batch)} messages is not stored (retried every "
                        f"{backoff:g} s or more): {_brief(exc)}",
                    )  # fmt: skip
                    log.error("batch of %d not stored (will retry): %s", len(batch), exc)
                except CollectorError as exc:
                    self._note_error(str(exc))
                    self._set_trouble(
                        index, f"worker failed on a batch of {len(batch)} messages, starting a "
                        f"new one: {_brief(exc)}",
                    )  # fmt: skip
                    log.error("%s; starting a new worker", exc)
                    self._restart_sink(index)
                except Exception as exc:  # a bug: stop rather than ack what was not stored
                    self._fail(exc)
                    return
                if self._stopping.wait(backoff):
                    return  # stopping with the store down: leave the batch un-acknowledged
                backoff = min(backoff * 2, 30.0)
            self._ack(batch)
            self._account(len(batch), outcome, batch[0].received_at)
            self._set_trouble(index, None)

    def _process(self, index: int, deliveries: list[Delivery]) -> BatchOutcome:
        sink = self._sinks[index]
        if sink is None:
            sink = self._sinks[index] = self._make_sink()
        return sink.process(deliveries, lambda text: self._set_trouble(index, text))

    def _set_trouble(self, index: int, why: str | None) -> None:
        """Record why committer ``index`` cannot commit its batch now (None: it committed)."""
        with self._lock:
            if why is None:
                self._trouble.pop(index, None)
            else:
                since = self._trouble.get(index, (self._clock(), ""))[0]
                self._trouble[index] = (since, why)

    def _restart_sink(self, index: int) -> None:
        sink, self._sinks[index] = self._sinks[index], None
        if sink is not None:
            try:
                sink.close()
            except Exception:  # the old worker is already broken; a new one replaces it
                log.debug("closing the old worker failed", exc_info=True)

    def _ack(self, batch: list[_Pending]) -> None:
        client = self._client
        if client is None:
            return
        acked = 0
        with self._ack_lock:
            generation = self._generation
            for p in batch:
                if p.qos > 0 and p.generation == generation:
                    client.ack(p.mid, p.qos)
                    acked += 1
        with self._lock:
            self._counters["acked"] += acked

    def _account(self, n: int, outcome: BatchOutcome, first_received: float) -> None:
        stored = outcome.stored
        with self._cond:
            self._uncommitted -= n
            redelivered = self._redelivered
        with self._lock:
            c = self._counters
            c["received"] += n
            c["redelivered"] = redelivered
            if c["first_received_at"] is None:
                c["first_received_at"] = first_received
            c["stored"] += stored.new
            c["duplicates"] += stored.duplicates
            c["dead_letters"] += stored.dead_letters
            c["ignored"] += outcome.ignored
            c["batches"] += 1
            c["last_commit_at"] = self._clock()
            for name, count in outcome.dead_by_field.items():
                # A field can name a key of the message (a key given twice, a bad label): the
                # sender picks it, so past MAX_DEAD_FIELDS names the rest count as one.
                if name not in self._dead_by_field and len(self._dead_by_field) >= MAX_DEAD_FIELDS:
                    name = OTHER_DEAD_FIELD
                self._dead_by_field[name] = self._dead_by_field.get(name, 0) + count
            for reason, count in outcome.ignored_by_reason.items():
                self._ignored_by_reason[reason] = self._ignored_by_reason.get(reason, 0) + count
        if outcome.splits:
            log.warning(
                "the store refused a batch of %d messages: split into %d smaller ones; %d "
                "message(s) it refused alone kept as dead letters (field 'store'), the rest "
                "stored", n, outcome.splits, outcome.refused,
            )  # fmt: skip
        for topic, fld, error in outcome.dead_samples:
            self._dead_log.warning("dead letter on %r (%s): %s", topic[:200], fld, error[:300])
        hidden = stored.dead_letters - len(outcome.dead_samples)
        if hidden > 0:
            self._dead_log.skipped(hidden)
        if self._state is not None:
            self._state.invalidate()

    def _note_error(self, message: str, *, store: bool = False) -> None:
        with self._lock:
            self._counters["last_error"] = message
            if store:
                self._counters["store_errors"] += 1


def _brief(exc: BaseException) -> str:
    """The last line of an error's message (a worker's traceback ends with the error itself),
    escaped and at most 300 characters, for ``/api/health``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = safe_text(lines[-1] if lines else type(exc).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


def _abandon(client: mqtt.Client) -> None:
    """Stop a client whose first connect failed, and close its socket."""
    client.loop_stop()
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


class _RateLimitedLog:
    """At most ``limit`` dead-letter lines per ``period_s``; then one line saying how many
    more there were, so a flood of garbage cannot flood the log."""

    def __init__(self, limit: int, period_s: float) -> None:
        self._limit = limit
        self._period = period_s
        self._window_start = time.monotonic()
        self._lines = 0
        self._skipped = 0

    def _roll(self) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._period:
            if self._skipped:
                log.warning(
                    "%d more dead letters in the last %.0f s (see the dead_letters table)",
                    self._skipped, self._period,
                )  # fmt: skip
            self._window_start, self._lines, self._skipped = now, 0, 0

    def warning(self, fmt: str, *args: Any) -> None:
        self._roll()
        if self._lines < self._limit:
            self._lines += 1
            log.warning(fmt, *args)
        else:
            self._skipped += 1

    def skipped(self, n: int) -> None:
        self._roll()
        self._skipped += n


# --- running as a service -------------------------------------------------------------------


def run_collector(
    config: CollectorConfig,
    *,
    stop: threading.Event | None = None,
    on_started: Callable[[Collector], None] | None = None,
) -> CollectorStats:
    """Run until SIGTERM/SIGINT (or ``stop`` is set, or a fatal error); returns the counters.

    Raises the fatal error (a CollectorError) if one stopped the collector. The collector alone,
    without a monitor: :func:`collector.program.run_program` runs the whole program.
    """
    from collector.program import ProgramConfig, run_program

    started = None if on_started is None else (lambda program: on_started(program.collector))
    return run_program(ProgramConfig(config), stop=stop, on_started=started)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        # Through the package, not __main__: the outcomes' classes must pickle under their
        # real module name for the parent to read them.
        from collector import service

        sys.exit(service._worker_entry(sys.argv[2:]))
    sys.exit("usage: python -m collector.service --worker FD STORE_URL FLEET (internal)")
