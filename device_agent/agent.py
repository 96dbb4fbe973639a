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
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from device_agent._version import __version__ as AGENT_VERSION
from device_agent.agent_config import AgentConfig
from device_agent.benchmark_command import run_benchmark_command
from device_agent.bundle import Bundle
from device_agent.candidates import CandidateStore
from device_agent.command_runner import (
    FATAL,
    REPLY_CACHE_BYTES,
    REPLY_CACHE_IDS,
    CommandRunner,
    describe,
)
from device_agent.contracts import messages as msg
from device_agent.contracts.commands import Action, PingReply
from device_agent.deploy import Deployer
from device_agent.deploy_files import bundle_to_run
from device_agent.errors import EdgeshipError
from device_agent.outlier_events import OutlierEvents
from device_agent.runtime import ModelSession
from device_agent.slot import LoadedModel, ModelSlot, Prediction
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


class Agent:
    """Inference with outlier scores and telemetry for one bundle. Thread-safe.

    Create it with :meth:`from_bundle`; :meth:`start` begins telemetry (and MQTT when a broker
    is configured); :meth:`close` flushes and stops. It is a context manager that does both.

    Its parts, each in its own module: :attr:`slot` (the model that runs, its swap and its
    predict), :attr:`commands` (``cmd``, at most once per id), :attr:`outliers` (outlier
    events) and :attr:`deployer` (remote deploy, which shares :attr:`slot`). The agent owns
    the threads, the telemetry windows and the MQTT session that serve them.
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
        self.slot = ModelSlot(LoadedModel(bundle, session))
        self.slot.on_relabel = self._relabel
        self._sys = SysInfo(config.sysinfo_root)
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1000)
        self._stop = threading.Event()
        self._window_lock = threading.Lock()
        self._deploy_event: msg.DeployEvent | None = None  # for the next telemetry window
        self._threads: list[threading.Thread] = []
        self._workers: dict[str, threading.Thread] = {}
        self._worker_deaths: dict[str, str] = {}
        # Units of background work that failed (each logged; the thread went on).
        self._unit_errors = {"commands": 0, "events": 0, "windows": 0, "replies": 0}
        self._publisher: Any = None
        self._spool: Any = None
        self._drops_mark = 0
        self._started = False
        self._closed = False
        self.last_window: dict[str, Any] | None = None
        self.command_handlers: dict[str, Callable[[msg.Command], Any]] = {
            Action.PING.value: self._cmd_ping,
            Action.BENCHMARK.value: self._cmd_benchmark,
        }
        self.commands = CommandRunner(
            device=config.device_id,
            boot=self.boot,
            clock=clock,
            handlers=self.command_handlers,
            enqueue=self._enqueue_command,
            errors=self._unit_errors,
        )
        self.outliers = OutlierEvents(
            device=config.device_id,
            boot=self.boot,
            per_min=config.outlier_events_per_min,
            sample_values=config.input_sample_values,
            clock=clock,
            put=lambda item: self._events.put_nowait(item),
        )
        self.deployer = Deployer(
            config, self.slot, run_soon=self._run_soon, announce=self._announce_deploy
        )
        self.command_handlers.update(self.deployer.handlers())
        self.candidates = CandidateStore(config, clock=clock)
        self.command_handlers.update(self.candidates.handlers())

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_bundle(cls, path: str | Path | None, config: AgentConfig | None = None) -> Agent:
        """Verify the bundle at ``path`` (its signature when ``trusted_keys`` are configured,
        every file's SHA-256), load its model (decrypted in memory if encrypted) and detector.

        A bundle deployed to this device over MQTT (and kept after its probation) takes
        precedence over ``path``: see :func:`device_agent.deploy_files.deployed_bundle`. With
        ``path`` None only the deployed bundle can run: :class:`ConfigError` when there is none
        or it cannot run.
        """
        cfg = config or AgentConfig()
        return bundle_to_run(path, cfg, lambda bundle, session: cls(bundle, session, cfg))

    @property
    def bundle(self) -> Bundle:
        """The bundle running now (it changes when a remote deploy swaps one in)."""
        return self.slot.loaded.bundle

    @property
    def session(self) -> ModelSession:
        """The runtime session of :attr:`bundle`."""
        return self.slot.loaded.session

    def _relabel(self, new: LoadedModel) -> None:
        """Before the slot swaps in a model with other class labels: close the window (so no
        window names one model's predictions with the other's labels) and start one with the
        new labels. A window that cannot be published does not stop the swap."""
        with self._window_lock:
            lost = False
            if self._started:
                try:
                    self._emit_window()
                except FATAL:
                    raise
                except BaseException as exc:  # a full disk: the swap must happen anyway
                    lost = True
                    self._unit_errors["windows"] += 1
                    log.error("telemetry window not published: %s", describe(exc))
            self.slot.aggregator = WindowAggregator(labels=new.labels or ())
            if lost:  # counted in the new model's first window, as _window_loop does
                self.slot.aggregator.record_error()

    # --- inference ------------------------------------------------------------------------

    def predict(self, inputs: Mapping[str, Any]) -> Prediction:
        """Run the model on ``inputs`` (input name -> array with a batch axis) and score them.

        Raises :class:`InputError` for inputs that do not fit the model; the error is counted
        in telemetry and the agent keeps running.
        """
        if self._closed:
            raise EdgeshipError("the agent is closed")
        return self.slot.predict(inputs)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Agent:
        """Start telemetry windows, and MQTT publishing when a broker is configured."""
        if self._started:
            return self
        self._started = True
        self.slot.on_outliers = self.outliers.queue
        # Candidates sent to an agent that has since restarted are not wanted any more.
        self.candidates.clear()
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
                self._worker_deaths[name] = f"{type(exc).__name__}: {describe(exc)}"
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
        self.commands.publisher = self.outliers.publisher = self._publisher
        self._publisher.start()

    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Publish the last window, flush what the broker will take, and stop. A deploy on
        probation is stopped without a verdict (a restart runs the bundle before it)."""
        if self._closed:
            return
        # First, while deploy work still goes to the events thread (drained below): a
        # probation's verdict after close would run inline and write current.json.
        self.deployer.close()
        self._closed = True
        if not self._started:
            return
        self._stop.set()
        for t in self._threads:
            t.join(timeout=max(1.0, flush_timeout_s))
        try:
            with self._window_lock:
                self._emit_window()
        except FATAL:
            raise
        except BaseException as exc:  # close must still flush and close the spool
            self._unit_errors["windows"] += 1
            log.error("the last telemetry window was not published: %s", describe(exc))
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
            "suppressed_outlier_events": self.outliers.suppressed,
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
        except FATAL:
            raise
        except BaseException as exc:
            self._unit_errors["windows"] += 1
            self.slot.aggregator.record_error()
            if isinstance(exc, EdgeshipError):
                log.error("telemetry window not published: %s", describe(exc))
            else:
                log.exception("telemetry window not published: %s", describe(exc))

    def _emit_window(self) -> None:
        """Close the window and publish it (the caller holds ``_window_lock``). If it cannot be
        published, its errors and the deploy event it carried go to the next window."""
        fields = self.slot.aggregator.close_window(self._clock())
        deploy, self._deploy_event = self._deploy_event, None
        try:
            self._publish_window(fields, deploy)
        except BaseException:
            self.slot.aggregator.record_error(fields["errors"])
            if self._deploy_event is None:
                self._deploy_event = deploy
            raise

    def _publish_window(self, fields: Any, deploy: msg.DeployEvent | None) -> None:
        model = self.slot.loaded.model
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
                self.outliers.publish(*item)
            elif kind == "command":
                self.commands.run(item)
            elif kind == "call":
                item()
        except FATAL:
            raise
        except BaseException as exc:
            self._unit_errors["commands" if kind == "command" else "events"] += 1
            if isinstance(exc, EdgeshipError):
                log.error("%s not handled: %s", kind, describe(exc))
            else:
                log.exception("%s not handled: %s", kind, describe(exc))

    def _announce_deploy(self, event: msg.DeployEvent) -> None:
        """A deploy changed state: the next telemetry window carries ``event``, and a new
        retained status names the model that runs now."""
        with self._window_lock:  # the window being emitted takes it under this lock
            self._deploy_event = event
        self._run_soon(self._publish_status)

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
        loaded = self.slot.loaded
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
        """A command from the MQTT layer (on its command worker): see :class:`CommandRunner`."""
        self.commands.on_command(command)

    def _on_command_overflow(self, command: msg.Command) -> None:
        """A command the MQTT layer has no room for (on its network thread; must not block)."""
        self.commands.on_overflow(command)

    def _enqueue_command(self, command: msg.Command) -> str | None:
        """Hand ``command`` to the events thread; None, or why not (the queue is full)."""
        try:
            self._events.put_nowait(("command", command))
        except queue.Full:
            return f"the agent's work queue is full ({self._events.qsize()} waiting)"
        return None

    def _cmd_ping(self, command: msg.Command) -> PingReply:
        return {"pong": True, "boot": self.boot}

    def _cmd_benchmark(self, command: msg.Command) -> dict[str, Any]:
        """``benchmark``: see :mod:`device_agent.benchmark_command`."""
        return run_benchmark_command(
            command,
            slot=self.slot,
            candidates=self.candidates,
            sysinfo=self._sys,
            config=self.config,
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
    except FATAL:
        raise
    except BaseException as exc:
        if event is None:
            raise
        payload = build(None)
        log.error(
            "%s sent without its deploy event, which does not encode: %s", what, describe(exc)
        )
        return payload
