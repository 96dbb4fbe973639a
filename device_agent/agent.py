"""The agent: runs a verified bundle, scores every input, and reports the fleet's telemetry.

Use it from your own application on the board::

    from device_agent import Agent, AgentConfig
    config = AgentConfig(broker_url="mqtt://hub:1883", fleet="greenhouse")
    with Agent.from_bundle("/opt/edgeship/bundle", config) as agent:
        result = agent.predict({"image": frame})
        if result.is_outlier[0]: ...

The predict path is kept short: validate, run, score, count. Everything that touches the disk
or the network (telemetry windows, outlier events, command replies) runs on background threads
that take their work from a queue, so a slow SD card or a missing broker never slows inference.
Each unit of that work (a command, an outlier event, a telemetry window) fails alone: a command
is answered ``ok: false`` with the reason, a lost window is counted in the next one, and the
thread goes on; :meth:`Agent.health` names a thread that died anyway. A command id runs at most
once (:data:`REPLY_CACHE_IDS`).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from types import TracebackType
from typing import Any

import numpy as np

from device_agent._version import __version__ as AGENT_VERSION
from device_agent.bundle import Bundle, load_bundle
from device_agent.contracts import messages as msg
from device_agent.contracts.bundle import IOSpec, ModelInfo
from device_agent.detectors import ThresholdedDetector, load_detector
from device_agent.errors import ConfigError, EdgeshipError, ProtocolError
from device_agent.runtime import FeedChecker, ModelSession
from device_agent.sysinfo import SysInfo
from device_agent.telemetry import WindowAggregator

__all__ = [
    "REPLY_CACHE_BYTES",
    "REPLY_CACHE_IDS",
    "Agent",
    "AgentConfig",
    "LoadedModel",
    "Prediction",
]

log = logging.getLogger(__name__)

# At most once per command id (docs/protocol.md): the replies of the last REPLY_CACHE_IDS
# command ids, and at most REPLY_CACHE_BYTES of them (encoded), are kept in memory for this
# boot; a command whose id is among them gets that reply again instead of running again.
REPLY_CACHE_IDS = 1024
REPLY_CACHE_BYTES = 4 * 2**20

# What a unit of background work (a command, an event, a window) never swallows: the process
# is being stopped. Everything else, MemoryError and RecursionError included, fails that unit
# only, and the worker thread goes on with the next one.
_FATAL = (KeyboardInterrupt, SystemExit)


def _wire_text(text: str, limit: int = 1000) -> str:
    """``text`` made safe for any message and log line: lone surrogates and non-printable
    characters (NUL, newlines, ...) escaped, at most ``limit`` characters."""
    out = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if not out.isprintable():
        out = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in out
        )
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _describe(exc: BaseException) -> str:
    """One safe line for an exception: its message, else its type's name."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not fail the error path too
        text = ""
    return _wire_text(text or type(exc).__name__)


def _default_device_id() -> str:
    name = socket.gethostname().split(".")[0] or "device"
    cleaned = "".join(c if c.isalnum() or c in "_.-" else "-" for c in name)[:64]
    return cleaned or "device"


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "edgeship"


@dataclass(frozen=True)
class AgentConfig:
    """How the agent runs. Every field can also come from ``agent.toml`` or the environment
    (see :mod:`device_agent.config`).

    ``broker_url`` None runs without MQTT (inference and scoring only). ``window_s`` is the
    telemetry window. Outlier events are limited to ``outlier_events_per_min`` (a token bucket;
    the next event reports how many were held back). With ``trusted_keys`` (Ed25519 public key
    files) only bundles signed by one of those keys are loaded; ``model_key_file`` holds the
    AES-256 key of encrypted models (see ``docs/security.md``). A bundle deployed over MQTT
    (:mod:`device_agent.deploy`) is confirmed by its first ``deploy_probation_inferences``
    successful inferences (0: at once) and may be at most ``deploy_max_bytes``.
    """

    device_id: str = field(default_factory=_default_device_id)
    fleet: str = "default"
    broker_url: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    mqtt_protocol: str = "auto"
    state_dir: Path | str = field(default_factory=_default_state_dir)
    spool_max_bytes: int = 32 * 2**20
    window_s: float = 10.0
    threads: int | None = None
    providers: tuple[str, ...] | None = None
    outlier_events_per_min: float = 60.0
    input_sample_values: int = 0
    sysinfo_root: str = "/"
    trusted_keys: tuple[str, ...] = ()
    model_key_file: str | None = None
    deploy_probation_inferences: int = 20
    deploy_max_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        # Accept a str for convenience; the field is always a Path afterwards.
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser())
        for value, what in ((self.device_id, "device_id"), (self.fleet, "fleet")):
            try:
                msg.validate_id(value, what)
            except ProtocolError as exc:
                raise ConfigError(str(exc)) from exc
        if self.window_s <= 0:
            raise ConfigError(f"window_s must be positive, got {self.window_s}")
        if self.spool_max_bytes < 64 * 1024:
            raise ConfigError(
                f"spool_max_bytes must be at least 64 KiB, got {self.spool_max_bytes}"
            )
        if self.outlier_events_per_min < 0:
            raise ConfigError("outlier_events_per_min must not be negative")
        if self.deploy_probation_inferences < 0:
            raise ConfigError("deploy_probation_inferences must not be negative")
        if self.deploy_max_bytes < 1024:
            raise ConfigError(
                f"deploy_max_bytes must be at least 1 KiB, got {self.deploy_max_bytes}"
            )


# The is_outlier array of a batch of one, shared by every such result (read-only).
_FLAGGED = np.ones(1, dtype=bool)
_NOT_FLAGGED = np.zeros(1, dtype=bool)
_FLAGGED.flags.writeable = _NOT_FLAGGED.flags.writeable = False


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 0.3 us more per call
class Prediction:
    """The result of one :meth:`Agent.predict` call (a batch of ``n`` samples).

    ``scores`` and ``is_outlier`` have one entry per sample (``scores`` is None without a
    detector, and ``is_outlier`` then all False). ``labels`` holds the predicted class label
    per sample when output 0 is a classifier's (batch, classes) output. For a batch of one,
    ``is_outlier`` is a shared read-only array (copy it to change it).
    """

    outputs: list[np.ndarray]
    scores: np.ndarray | None
    is_outlier: np.ndarray
    labels: list[str] | None
    latency_s: float

    @property
    def score(self) -> float | None:
        """The first sample's score (the common batch-of-one case)."""
        return None if self.scores is None else float(self.scores[0])


class LoadedModel:
    """One verified bundle ready to run: its session, input checker, detector and labels.

    :meth:`Agent.predict` reads the agent's current ``LoadedModel`` once per call, so a remote
    deploy swaps models by replacing that one reference: calls in flight finish on the model
    they started with, and no call ever sees the new session with the old detector. ``trial``
    is set while a newly deployed bundle is on probation (see :mod:`device_agent.deploy`).
    """

    __slots__ = (
        "bundle",
        "check",
        "detector",
        "labels",
        "run",
        "run_lock",
        "score_in_graph",
        "session",
        "threshold",
        "trial",
    )

    def __init__(self, bundle: Bundle, session: ModelSession) -> None:
        self.bundle = bundle
        self.session = session
        m = bundle.manifest
        self.check = FeedChecker(m.io)
        self.labels = _classifier_labels(m.io)
        self.detector: ThresholdedDetector | None = None
        if m.detector is not None:
            det = load_detector(m.detector, bundle.path_of(m.detector.params_file))
            self.detector = ThresholdedDetector(det, m.detector.threshold)
        self.threshold = math.inf if self.detector is None else self.detector.threshold
        # A bundle whose model computes the detector's score itself (detector.graph_output):
        # one run gives the outputs and, last, the score; numpy scoring is the fallback.
        graph_output = None if m.detector is None else m.detector.graph_output
        self.score_in_graph = graph_output is not None and graph_output in getattr(
            session, "hidden_outputs", ()
        )
        runner = getattr(session, "runner", None)  # ONNX Runtime: skips a second name check
        self.run: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]] = (
            session.run if runner is None else runner(hidden=self.score_in_graph)
        )
        # LiteRT interpreters are not safe to call from two threads; ORT sessions are.
        self.run_lock: threading.Lock | None = (
            threading.Lock() if session.runtime == "litert" else None
        )
        self.trial: Any = None

    @classmethod
    def open(cls, bundle: Bundle, config: AgentConfig) -> LoadedModel:
        """Open ``bundle``'s model with the runtime its manifest names."""
        session = bundle.open_model(
            model_key_file=config.model_key_file,
            threads=config.threads,
            providers=config.providers,
        )
        return cls(bundle, session)

    @property
    def io(self) -> IOSpec:
        return self.bundle.manifest.io

    @property
    def model(self) -> ModelInfo:
        return self.bundle.manifest.model


def _classifier_labels(io: IOSpec) -> tuple[str, ...] | None:
    out = io.outputs[0]
    if len(out.shape) != 2 or not isinstance(out.shape[1], int) or out.shape[1] < 2:
        return None
    if out.labels is not None and len(out.labels) == out.shape[1]:
        return tuple(out.labels)
    return tuple(str(i) for i in range(out.shape[1]))


class _TokenBucket:
    def __init__(self, per_min: float, clock: Callable[[], float]) -> None:
        self._rate = per_min / 60.0
        self._cap = max(1.0, per_min / 6.0)  # bursts of up to 10 s worth
        self._tokens = self._cap
        self._clock = clock
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._cap, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass
class _Reply:
    """The reply to one command id: ``ok`` None while the command waits in the queue or runs
    (``started`` once it runs); ``repeats`` counts the deliveries of the same id that arrived
    meanwhile (each is answered once it is done)."""

    ok: bool | None = None
    result: Any = None
    error: str | None = None
    size: int = 0
    repeats: int = 0
    started: bool = False


class Agent:
    """Inference with outlier scores and telemetry for one bundle. Thread-safe.

    Create it with :meth:`from_bundle`; :meth:`start` begins telemetry (and MQTT when a broker
    is configured); :meth:`close` flushes and stops. It is a context manager that does both.
    """

    def __init__(
        self,
        bundle: Bundle,
        session: ModelSession,
        config: AgentConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.boot = uuid.uuid4().hex[:16]
        self._clock = clock
        self._loaded = LoadedModel(bundle, session)
        self._aggregator = WindowAggregator(labels=self._loaded.labels or ())
        self._sys = SysInfo(config.sysinfo_root)
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1000)
        self._bucket = _TokenBucket(config.outlier_events_per_min, time.monotonic)
        self._suppressed = 0
        self._stop = threading.Event()
        self._window_lock = threading.Lock()
        self._deploy_event: msg.DeployEvent | None = None  # for the next telemetry window
        self._threads: list[threading.Thread] = []
        self._workers: dict[str, threading.Thread] = {}
        self._worker_deaths: dict[str, str] = {}
        # Units of background work that failed (each logged; the thread went on).
        self._unit_errors = {"commands": 0, "events": 0, "windows": 0, "replies": 0}
        self._replies: OrderedDict[str, _Reply] = OrderedDict()
        self._replies_bytes = 0
        self._replies_lock = threading.Lock()
        self._publisher: Any = None
        self._spool: Any = None
        self._drops_mark = 0
        self._started = False
        self._closed = False
        self.last_window: dict[str, Any] | None = None
        self.command_handlers: dict[str, Callable[[msg.Command], Any]] = {
            "ping": lambda cmd: {"pong": True, "boot": self.boot},
            "benchmark": self._cmd_benchmark,
        }
        from device_agent.deploy import Deployer

        self.deployer = Deployer(self)
        self.command_handlers.update(self.deployer.handlers())

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_bundle(cls, path: str | Path | None, config: AgentConfig | None = None) -> Agent:
        """Verify the bundle at ``path`` (its signature when ``trusted_keys`` are configured,
        every file's SHA-256), load its model (decrypted in memory if encrypted) and detector.

        A bundle deployed to this device over MQTT (and kept after its probation) takes
        precedence over ``path``: see :func:`device_agent.deploy.deployed_bundle`. With
        ``path`` None only the deployed bundle can run: :class:`ConfigError` when there is none
        or it cannot run.
        """
        from device_agent.deploy import deploy_dir, deployed_bundle

        cfg = config or AgentConfig()
        try:
            deployed = deployed_bundle(cfg, fallback=path is not None)
        except ConfigError as exc:  # only without path: nothing to fall back to
            raise ConfigError(
                f"{exc}; pass --bundle DIR (or set bundle in agent.toml) to run another, or "
                "deploy one again"
            ) from exc
        if deployed is not None:
            try:
                opened = deployed.open_model(
                    model_key_file=cfg.model_key_file, threads=cfg.threads, providers=cfg.providers
                )
                return cls(deployed, opened, cfg)
            except EdgeshipError as exc:  # e.g. its model key is gone: the given bundle runs
                if path is None:
                    raise ConfigError(
                        f"the deployed bundle {deployed.root} cannot run: {exc}; pass --bundle "
                        "DIR (or set bundle in agent.toml) to run another"
                    ) from exc
                log.error(
                    "the deployed bundle %s cannot run: %s; using %s", deployed.root, exc, path
                )
        if path is None:
            raise ConfigError(
                "no bundle to run: pass --bundle DIR (or set bundle in agent.toml), or deploy "
                f"one with 'edgeship deploy' (none in {deploy_dir(cfg)})"
            )
        bundle = load_bundle(path, trusted_keys=cfg.trusted_keys)
        session = bundle.open_model(
            model_key_file=cfg.model_key_file, threads=cfg.threads, providers=cfg.providers
        )
        return cls(bundle, session, cfg)

    @property
    def bundle(self) -> Bundle:
        """The bundle running now (it changes when a remote deploy swaps one in)."""
        return self._loaded.bundle

    @property
    def session(self) -> ModelSession:
        """The runtime session of :attr:`bundle`."""
        return self._loaded.session

    def _swap_model(self, new: LoadedModel) -> LoadedModel:
        """Make ``new`` the model every following :meth:`predict` uses; return the old one.

        One reference assignment: calls in flight finish on the model they started with. When
        the classes' labels differ, the window is closed first so no window names one model's
        predictions with the other's labels.
        """
        old = self._loaded
        if new.labels != old.labels:
            with self._window_lock:
                lost = False
                if self._started:
                    try:
                        self._emit_window()
                    except _FATAL:
                        raise
                    except BaseException as exc:  # a full disk: the swap must happen anyway
                        lost = True
                        self._unit_errors["windows"] += 1
                        log.error("telemetry window not published: %s", _describe(exc))
                self._aggregator = WindowAggregator(labels=new.labels or ())
                if lost:  # counted in the new model's first window, as _window_loop does
                    self._aggregator.record_error()
        self._loaded = new
        return old

    # --- inference ------------------------------------------------------------------------

    def predict(self, inputs: Mapping[str, Any]) -> Prediction:
        """Run the model on ``inputs`` (input name -> array with a batch axis) and score them.

        Raises :class:`InputError` for inputs that do not fit the model; the error is counted
        in telemetry and the agent keeps running.
        """
        if self._closed:
            raise EdgeshipError("the agent is closed")
        loaded = self._loaded
        try:
            return self._predict_on(loaded, inputs)
        except EdgeshipError as exc:
            if loaded.trial is None:
                raise
            # A deployed bundle on probation failed: the deployer answers with the previous
            # model when it can, and rolls back if that one succeeds where the new one failed.
            return self.deployer.trial_failed(loaded, inputs, exc)

    def _predict_on(self, loaded: LoadedModel, inputs: Mapping[str, Any]) -> Prediction:
        # The hot path: every line here costs on each call (about 0.1 us per attribute or
        # numpy scalar operation), so the common case avoids loops, copies and numpy calls.
        try:
            feed = loaded.check(inputs)
            start = perf_counter()
            if loaded.run_lock is None:
                outputs = loaded.run(feed)
            else:
                with loaded.run_lock:
                    outputs = loaded.run(feed)
            if loaded.score_in_graph:
                scores: np.ndarray | None = outputs.pop()
            elif loaded.detector is None:
                scores = None
            else:
                scores = loaded.detector.score(feed, outputs)
            latency = perf_counter() - start
        except EdgeshipError:
            self._aggregator.record_error()
            raise
        trial = loaded.trial  # read once: another thread may end the probation meanwhile
        if trial is not None:
            trial.passed()
        first = outputs[0]
        labels_of = loaded.labels
        classes = first.argmax(axis=1) if labels_of is not None and first.ndim == 2 else None
        record = self._aggregator.record
        if scores is not None and scores.shape[0] == 1:
            # A batch of one, the common case: scalar work, no loop, one small array.
            score = float(scores[0])
            outlier = score > loaded.threshold
            flags = _FLAGGED if outlier else _NOT_FLAGGED
            if classes is None or labels_of is None:
                record(latency, None, score, outlier)
                labels = None
            else:
                cls = int(classes[0])
                record(latency, cls, score, outlier)
                labels = [labels_of[cls]]
        else:
            if scores is None:
                flags = np.zeros(first.shape[0] if first.ndim else 1, dtype=bool)
            else:
                flags = scores > loaded.threshold
            outlier = bool(flags.any())
            class_list = None if classes is None else classes.tolist()
            score_list = None if scores is None else scores.tolist()
            for i, flag in enumerate(flags.tolist()):
                record(
                    latency,
                    None if class_list is None else class_list[i],
                    None if score_list is None else score_list[i],
                    flag,
                )
            labels = (
                None
                if class_list is None or labels_of is None
                else [labels_of[c] for c in class_list]
            )
        if outlier and self._started:
            self._queue_outliers(loaded, feed, scores, flags, classes)
        return Prediction(outputs, scores, flags, labels, latency)

    def _queue_outliers(
        self,
        loaded: LoadedModel,
        feed: Mapping[str, np.ndarray],
        scores: np.ndarray | None,
        flags: np.ndarray,
        classes: np.ndarray | None,
    ) -> None:
        assert scores is not None and loaded.detector is not None
        first_input = loaded.io.inputs[0].name
        labels_of = loaded.labels
        model = loaded.model
        threshold = loaded.detector.threshold
        for i in np.flatnonzero(flags):
            if not self._bucket.take():
                self._suppressed += 1
                continue
            label = None
            if classes is not None and labels_of is not None:
                label = labels_of[int(classes[i])]
            sample = feed[first_input][i].copy()
            item = (float(scores[i]), label, sample, self._clock(), model, threshold)
            try:
                self._events.put_nowait(("outlier", item))
            except queue.Full:
                self._suppressed += 1

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Agent:
        """Start telemetry windows, and MQTT publishing when a broker is configured."""
        if self._started:
            return self
        self._started = True
        cfg = self.config
        if cfg.broker_url is not None:
            self._start_mqtt()
        for name, target in (("telemetry", self._window_loop), ("events", self._event_loop)):
            self._spawn(name, target)
        return self

    def _spawn(self, name: str, loop: Callable[[], None]) -> None:
        """Run ``loop`` on a daemon thread whose death is recorded for :meth:`health`."""

        def run() -> None:
            try:
                loop()
            except BaseException as exc:
                self._worker_deaths[name] = f"{type(exc).__name__}: {_describe(exc)}"
                log.critical(
                    "the agent's %s worker died (%s); %s stop until the agent is restarted",
                    name,
                    self._worker_deaths[name],
                    _WORKER_DUTIES.get(name, "its duties"),
                )
                raise
            if not self._stop.is_set():
                self._worker_deaths[name] = "returned before the agent was closed"
                log.critical("the agent's %s worker stopped unexpectedly", name)

        t = threading.Thread(target=run, name=f"edgeship-{name}", daemon=True)
        self._workers[name] = t
        self._threads.append(t)
        t.start()

    def _start_mqtt(self) -> None:
        from device_agent.mqtt import BrokerConfig, Publisher
        from device_agent.spool import Spool

        cfg = self.config
        assert cfg.broker_url is not None
        broker = BrokerConfig.from_url(
            cfg.broker_url,
            username=cfg.username,
            password=cfg.password,
            ca_file=cfg.ca_file,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            protocol=cfg.mqtt_protocol,
        )
        state = Path(cfg.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self._spool = Spool(
            state / f"spool-{cfg.fleet}-{cfg.device_id}.db", max_bytes=cfg.spool_max_bytes
        )
        self._drops_mark = self._spool.dropped_total
        self._publisher = Publisher(
            broker,
            self._spool,
            fleet=cfg.fleet,
            device=cfg.device_id,
            boot=self.boot,
            birth=lambda seq: self._status_payload(seq, "online"),
            will=lambda seq: self._status_payload(seq, "offline"),
            on_command=self._on_command,
            on_command_overflow=self._on_command_overflow,
        )
        self._publisher.start()

    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Publish the last window, flush what the broker will take, and stop."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return
        self._stop.set()
        for t in self._threads:
            t.join(timeout=max(1.0, flush_timeout_s))
        try:
            with self._window_lock:
                self._emit_window()
        except _FATAL:
            raise
        except BaseException as exc:  # close must still flush and close the spool
            self._unit_errors["windows"] += 1
            log.error("the last telemetry window was not published: %s", _describe(exc))
        self._drain_events()
        if self._publisher is not None:
            self._publisher.close(flush_timeout_s=flush_timeout_s)
        if self._spool is not None:
            self._spool.close()

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        """Whether the agent still does all its work: ``ok`` is false once it is closed or a
        worker thread has died (``dead_workers`` names each, with why). ``workers`` gives each
        thread's state (``running``, ``stopped`` after close, ``dead``, ``not started``);
        ``worker_errors`` counts units of work that failed and were skipped (a command answered
        ``ok: false`` by an unexpected exception, an event, a window, a reply not spooled)."""
        workers: dict[str, str] = {}
        for name in ("telemetry", "events"):
            t = self._workers.get(name)
            if t is None:
                workers[name] = "not started"
            elif t.is_alive():
                workers[name] = "running"
            else:
                workers[name] = "dead" if name in self._worker_deaths else "stopped"
        deaths = dict(self._worker_deaths)
        if self._publisher is not None:
            for name, (state, why) in self._publisher.workers().items():
                workers[name] = state
                if state == "dead":
                    deaths[name] = why or "stopped unexpectedly"
        dead = {name: deaths.get(name, "stopped") for name, s in workers.items() if s == "dead"}
        return {
            "ok": not dead and not self._closed,
            "workers": workers,
            "dead_workers": dead,
            "worker_errors": dict(self._unit_errors),
        }

    @property
    def stats(self) -> dict[str, Any]:
        """Publisher and spool figures and :meth:`health`, for ``/v1/health`` and tests."""
        out: dict[str, Any] = {
            "boot": self.boot,
            "suppressed_outlier_events": self._suppressed,
            "last_window": self.last_window,
            **self.health(),
        }
        if self._publisher is not None:
            out["mqtt"] = dict(self._publisher.stats)
            out["connected"] = bool(self._publisher.connected)
        if self._spool is not None:
            out["spool_depth"] = self._spool.depth()
            out["spool_dropped"] = self._spool.dropped_total
        return out

    # --- background work ------------------------------------------------------------------

    def _window_loop(self) -> None:
        while not self._stop.wait(self.config.window_s):
            self._window_once()

    def _window_once(self) -> None:
        """One telemetry window; a window that cannot be built or published (a full disk, a
        field that does not encode, a bug) is counted as an error in the next one."""
        try:
            with self._window_lock:
                self._emit_window()
        except _FATAL:
            raise
        except BaseException as exc:
            self._unit_errors["windows"] += 1
            self._aggregator.record_error()
            if isinstance(exc, EdgeshipError):
                log.error("telemetry window not published: %s", _describe(exc))
            else:
                log.exception("telemetry window not published: %s", _describe(exc))

    def _emit_window(self) -> None:
        """Close the window and publish it (the caller holds ``_window_lock``). If it cannot be
        published, its errors and the deploy event it carried go to the next window."""
        fields = self._aggregator.close_window(self._clock())
        deploy, self._deploy_event = self._deploy_event, None
        try:
            self._publish_window(fields, deploy)
        except BaseException:
            self._aggregator.record_error(fields["errors"])
            if self._deploy_event is None:
                self._deploy_event = deploy
            raise

    def _publish_window(self, fields: Any, deploy: msg.DeployEvent | None) -> None:
        model = self._loaded.model
        host = self._sys.sample()
        self.last_window = {
            "window_start": fields["window_start"],
            "window_s": fields["window_s"],
            "inferences": fields["inferences"],
            "errors": fields["errors"],
            "outliers": fields["outliers"],
            "latency_ms": fields["latency_ms"].to_dict(),
            "predictions": dict(fields["predictions"]),
        }
        if self._publisher is None:
            log.info(
                "window: %d inferences, %d errors, %d outliers",
                fields["inferences"],
                fields["errors"],
                fields["outliers"],
            )
            return
        spool = self._spool
        dropped = spool.dropped_total
        since = spool.drops_since(self._drops_mark)
        self._drops_mark = dropped
        # Read before publish(): the payload builder runs under the spool's (non-reentrant)
        # lock, so it must not call back into the spool. The depth excludes this message.
        depth = spool.depth()

        def telemetry(seq: int, event: msg.DeployEvent | None) -> bytes:
            return msg.encode(
                msg.TelemetryMessage(
                    device=self.config.device_id,
                    boot=self.boot,
                    seq=seq,
                    ts=self._clock(),
                    model=model.name,
                    model_version=model.version,
                    **fields,
                    cpu_percent=host.cpu_percent,
                    system_cpu_percent=host.system_cpu_percent,
                    rss_bytes=host.rss_bytes,
                    mem_available_bytes=host.mem_available_bytes,
                    temperature_c=host.temperature_c,
                    throttled=host.throttled,
                    spool_depth=depth,
                    spool_dropped=dropped,
                    drops_since_last=since,
                    deploy=event,
                )
            )

        def payload(seq: int) -> bytes:
            return _without_bad_deploy(lambda event: telemetry(seq, event), deploy, "telemetry")

        try:
            self._publisher.publish("telemetry", payload)
        except BaseException:
            # The window is lost (a full disk): the drops it was to report carry over to the
            # next window (so do its errors, see _emit_window); _window_once adds one error.
            self._drops_mark -= since
            raise

    def _event_loop(self) -> None:
        while not self._stop.is_set():
            try:
                kind, item = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            self._handle_event(kind, item)
            del item  # a finished command's arguments (a deploy chunk) are not kept alive

    def _drain_events(self) -> None:
        while True:
            try:
                kind, item = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle_event(kind, item)

    def _handle_event(self, kind: str, item: Any) -> None:
        """One unit of the events thread's work. Whatever it raises (MemoryError included,
        KeyboardInterrupt and SystemExit excepted) fails this unit only: it is counted and
        logged, and the thread goes on with the next one."""
        try:
            if kind == "outlier":
                self._publish_outlier(*item)
            elif kind == "command":
                self._run_command(item)
            elif kind == "call":
                item()
        except _FATAL:
            raise
        except BaseException as exc:
            self._unit_errors["commands" if kind == "command" else "events"] += 1
            if isinstance(exc, EdgeshipError):
                log.error("%s not handled: %s", kind, _describe(exc))
            else:
                log.exception("%s not handled: %s", kind, _describe(exc))

    def _publish_outlier(
        self,
        score: float,
        label: str | None,
        sample: np.ndarray,
        ts: float,
        model: ModelInfo,
        threshold: float,
    ) -> None:
        if self._publisher is None:
            return
        suppressed, self._suppressed = self._suppressed, 0
        try:
            self._publish_outlier_event(score, label, sample, ts, model, threshold, suppressed)
        except BaseException:
            # This event is lost: the next one reports it as held back, with the others.
            self._suppressed += suppressed + 1
            raise

    def _publish_outlier_event(
        self,
        score: float,
        label: str | None,
        sample: np.ndarray,
        ts: float,
        model: ModelInfo,
        threshold: float,
        suppressed: int,
    ) -> None:
        assert self._publisher is not None
        summary = msg.InputSummary.of(sample, sample=self.config.input_sample_values)

        def payload(seq: int) -> bytes:
            return msg.encode(
                msg.OutlierEvent(
                    device=self.config.device_id,
                    boot=self.boot,
                    seq=seq,
                    ts=ts,
                    score=score,
                    threshold=threshold,
                    prediction=label,
                    input=summary,
                    model=model.name,
                    model_version=model.version,
                    suppressed=suppressed,
                )
            )

        self._publisher.publish("outliers", payload)

    def _publish_status(self) -> None:
        """Publish the retained ``online`` status again (the model changed)."""
        if self._publisher is not None and not self._closed:
            self._publisher.publish("status", lambda seq: self._status_payload(seq, "online"))

    def _run_soon(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the events thread (disk and network work off the caller's thread).
        Where it runs at once instead, a failure is contained the same way."""
        if not self._started or self._closed:
            self._handle_event("call", work)
            return
        try:
            self._events.put_nowait(("call", work))
        except queue.Full:
            log.error("the agent's work queue is full; running deploy work inline")
            self._handle_event("call", work)

    def _status_payload(self, seq: int, state: str) -> bytes:
        loaded = self._loaded
        session = loaded.session

        def status(event: msg.DeployEvent | None) -> bytes:
            return msg.encode(
                msg.StatusMessage(
                    device=self.config.device_id,
                    boot=self.boot,
                    seq=seq,
                    ts=self._clock(),
                    state="online" if state == "online" else "offline",
                    agent_version=AGENT_VERSION,
                    model=loaded.model.name,
                    model_version=loaded.model.version,
                    runtime=f"{session.runtime} {session.runtime_version}",
                    host=self._sys.host_facts(),
                    deploy=event,
                )
            )

        # The birth and the will are built from this too: a deploy event that does not encode
        # must not keep the device from ever saying it is online.
        return _without_bad_deploy(status, self.deployer.last_event, "status")

    # --- commands -------------------------------------------------------------------------

    def _on_command(self, command: msg.Command) -> None:
        """Queue ``command`` for the events thread (called on the MQTT command worker). An id
        that is queued, running or answered already is not queued again (:meth:`_repeat`)."""
        key = command.id
        with self._replies_lock:
            known, again = self._repeat(key)
            if not known:
                # Known from now on: a repeat that arrives while this one waits is not queued.
                self._replies[key] = _Reply()
        if known:
            if again is not None:
                self._send_reply(key, again)
            return
        try:
            self._events.put_nowait(("command", command))
        except queue.Full:
            repeats = 0
            with self._replies_lock:
                entry = self._replies.get(key)
                if entry is not None and entry.ok is None and not entry.started:
                    del self._replies[key]  # never ran: the same id may be sent again
                    repeats = entry.repeats
            for _ in range(1 + repeats):
                self._refuse_command(
                    command, f"the agent's work queue is full ({self._events.qsize()} waiting)"
                )

    def _on_command_overflow(self, command: msg.Command) -> None:
        """A command the MQTT layer has no room for (called on its network thread, so it must
        not block): a repeat of a known id is answered as any repeat is, others are refused."""
        with self._replies_lock:
            known, again = self._repeat(command.id)
        if again is not None:
            self._send_reply(command.id, again)
        if not known:
            self._refuse_command(command, "too many commands wait for the agent")

    def _repeat(self, key: str) -> tuple[bool, _Reply | None]:
        """Whether ``key`` is a known id (called under ``_replies_lock``), and the reply to send
        again when it is done. A repeat of one that waits or runs is counted instead: it is
        answered when that one is done."""
        entry = self._replies.get(key)
        if entry is None:
            return False, None
        self._replies.move_to_end(key)
        if entry.ok is None:
            entry.repeats += 1
            log.info("command %s arrived again before it was done; answered when done", key)
            return True, None
        log.info("command %s arrived again; sending its reply again, not running it", key)
        return True, entry

    def _refuse_command(self, command: msg.Command, why: str) -> None:
        """Answer ``command`` ``ok: false`` without running it (and without keeping the reply:
        the same id sent again later runs)."""
        log.error("command %s dropped: %s", command.id, why)
        self._send_reply(command.id, _Reply(ok=False, error=f"not run: {why}; send it again later"))

    def _run_command(self, command: msg.Command) -> None:
        """Run one command and reply, at most once per id: a delivery of an id whose reply is
        kept (:data:`REPLY_CACHE_IDS`) gets that reply again without running anything, and one
        that arrives while the same id waits or runs is answered when it is done."""
        key = command.id
        with self._replies_lock:
            entry: _Reply | None = self._replies.get(key)
            again = None
            if entry is None:  # not queued by _on_command (an id forgotten meanwhile)
                entry = self._replies[key] = _Reply()
            elif entry.started or entry.ok is not None:
                _, again = self._repeat(key)
                entry = None
            else:
                self._replies.move_to_end(key)
            if entry is not None:
                entry.started = True
        if entry is None:
            if again is not None:
                self._send_reply(key, again)
            return
        ok, result, error = self._execute(command)
        ok, result, error, size = self._checked_reply(command, ok, result, error)
        with self._replies_lock:
            entry.ok, entry.result, entry.error, entry.size = ok, result, error, size
            sends, entry.repeats = 1 + entry.repeats, 0
            if self._replies.get(key) is entry:
                self._replies_bytes += size
            self._evict_replies()
        for _ in range(sends):
            self._send_reply(key, entry)

    def _execute(self, command: msg.Command) -> tuple[bool, Any, str | None]:
        """Run ``command``'s handler: (ok, result, error). Never raises but to stop the
        process: any failure of the handler is this command's ``ok: false``."""
        action = _wire_text(str(command.action), 64)
        try:
            now = self._clock()
            handler = self.command_handlers.get(command.action)
            if command.expires is not None and command.expires < now:
                return (
                    False,
                    None,
                    f"command expired {now - command.expires:.0f} s before it arrived",
                )
            if handler is None:
                known = sorted(self.command_handlers)
                return False, None, f"unknown action {action!r}; known: {known}"
            return True, handler(command), None
        except _FATAL:
            raise
        except EdgeshipError as exc:
            return False, None, _describe(exc)
        except MemoryError as exc:
            self._unit_errors["commands"] += 1
            log.exception("command %s (%s) ran out of memory", command.id, action)
            return (
                False,
                None,
                f"{action}: out of memory ({_describe(exc)}); the agent keeps running",
            )
        except BaseException as exc:
            self._unit_errors["commands"] += 1
            log.exception("command %s (%s) failed unexpectedly", command.id, action)
            return (
                False,
                None,
                f"{action} failed inside the agent: {type(exc).__name__}: {_describe(exc)} "
                "(a bug; the agent keeps running)",
            )

    def _reply_payload(
        self, command_id: str, seq: int, ok: bool, result: Any, error: str | None
    ) -> bytes:
        return msg.encode(
            msg.CommandReply(
                device=self.config.device_id,
                boot=self.boot,
                seq=seq,
                ts=self._clock(),
                id=command_id,
                ok=ok,
                result=result if ok else None,
                error=None if ok else (error or "failed"),
            )
        )

    def _checked_reply(
        self, command: msg.Command, ok: bool, result: Any, error: str | None
    ) -> tuple[bool, Any, str | None, int]:
        """The reply as it will be sent, and its size: as given if it encodes, else
        ``ok: false`` saying why (a result that is not JSON or too large, a bad string)."""
        if not ok:
            error = _wire_text(error or "failed")
        try:
            return ok, result, error, len(self._reply_payload(command.id, 0, ok, result, error))
        except _FATAL:
            raise
        except BaseException as exc:
            action = _wire_text(str(command.action), 64)
            why = _describe(exc)
            log.error("command %s (%s): the reply does not encode: %s", command.id, action, why)
            error = (
                f"{action} ran, but its result cannot be sent: {why}"
                if ok
                else f"{action} failed, and its reason cannot be sent: {why}"
            )
        try:
            return False, None, error, len(self._reply_payload(command.id, 0, False, None, error))
        except _FATAL:
            raise
        except BaseException:
            return False, None, "the reply could not be encoded", 256

    def _evict_replies(self) -> None:
        """Forget the oldest finished replies beyond the cache's bounds (under its lock)."""
        replies = self._replies
        while len(replies) > REPLY_CACHE_IDS or self._replies_bytes > REPLY_CACHE_BYTES:
            for key, entry in replies.items():
                if entry.ok is not None:
                    del replies[key]
                    self._replies_bytes -= entry.size
                    break
            else:
                return

    def _send_reply(self, command_id: str, reply: _Reply) -> None:
        """Spool ``reply`` on ``cmd/reply``; a reply that cannot be spooled is counted and
        logged (a repeat of the command sends it again)."""
        publisher = self._publisher
        if publisher is None:
            log.warning("command %s: no broker configured to reply to", command_id)
            return
        ok = bool(reply.ok)

        def payload(seq: int) -> bytes:
            try:
                return self._reply_payload(command_id, seq, ok, reply.result, reply.error)
            except _FATAL:
                raise
            except BaseException:
                return self._reply_payload(
                    command_id, seq, False, None, "the reply could not be encoded"
                )

        try:
            publisher.reply(payload)
        except _FATAL:
            raise
        except BaseException as exc:
            self._unit_errors["replies"] += 1
            log.error("the reply to command %s was not sent: %s", command_id, _describe(exc))

    def _cmd_benchmark(self, command: msg.Command) -> dict[str, Any]:
        from device_agent.benchmark import BenchmarkArgs, run_benchmark

        if not isinstance(command.args, Mapping):
            raise ConfigError("benchmark: args must be an object")
        args = BenchmarkArgs.parse(command.args)
        loaded = self._loaded
        return run_benchmark(
            loaded.session,
            loaded.io,
            min_runs=args.min_runs,
            min_seconds=args.min_seconds,
            warmup_runs=args.warmup_runs,
            max_seconds=args.max_seconds,
            lock=loaded.run_lock,
            model_path=loaded.bundle.model_path,
            stop=self._stop,
        )


_WORKER_DUTIES = {
    "telemetry": "telemetry windows",
    "events": "commands, outlier events and deploy work",
}


def _without_bad_deploy(
    build: Callable[[msg.DeployEvent | None], bytes], event: msg.DeployEvent | None, what: str
) -> bytes:
    """``build(event)``, or ``build(None)`` when the deploy event is what does not encode: the
    message still goes out, without a deploy field that no subscriber could read."""
    try:
        return build(event)
    except _FATAL:
        raise
    except BaseException as exc:
        if event is None:
            raise
        payload = build(None)
        log.error(
            "%s sent without its deploy event, which does not encode: %s", what, _describe(exc)
        )
        return payload
