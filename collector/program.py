"""The collector as one program: the composition root that builds its parts from one config.

::

    ProgramConfig ──► Collector (MQTT subscriber ─► commit pipeline ─► store; HTTP API)
                  └─► Monitor  (alerts, drift, /metrics and the dashboard, on the same API)

Every entry point (``edgeship collect``, ``edgeship-collector``, a test, a container's
``python -m``) goes through :func:`run_program`, so the order the parts start and stop in, and
what the monitor is given of the collector, are decided once, here, and not in a command line.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from collector.errors import CollectorError
from collector.service import Collector, CollectorConfig, CollectorStats

if TYPE_CHECKING:
    from collector.drift import ReferenceSet
    from collector.monitor import Monitor, MonitorConfig

__all__ = ["Program", "ProgramConfig", "run_collector", "run_program"]


@dataclass(frozen=True)
class ProgramConfig:
    """The whole program's settings. ``monitor`` None runs no monitor (``--no-monitor``: no
    alerts, drift, /metrics or dashboard). ``references``, when given, are the drift references
    already loaded (a bad one is bad input before anything connects); None loads
    ``monitor.references``."""

    collector: CollectorConfig
    monitor: MonitorConfig | None = None
    references: ReferenceSet | None = None


class Program:
    """The collector and its monitor, started and stopped together: the monitor starts once
    the collector's store, API and first connection are up, and stops before the collector."""

    def __init__(self, config: ProgramConfig) -> None:
        self.config = config
        self.collector = Collector(config.collector)
        self.monitor: Monitor | None = None

    def start(self) -> Program:
        """Start the collector, then the monitor; on an error whatever started is stopped."""
        try:
            self.collector.start()
            if self.config.monitor is not None:
                from collector.monitor import Monitor

                self.monitor = Monitor.for_collector(
                    self.collector, self.config.monitor, references=self.config.references
                ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the monitor, then commit, acknowledge and stop the collector."""
        monitor, self.monitor = self.monitor, None
        try:
            if monitor is not None:
                monitor.stop()
        finally:
            self.collector.stop()

    def __enter__(self) -> Program:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> str:
        """One line for the operator: what is collected from where into what, and the URLs
        the program serves."""
        cfg = self.config.collector
        api = "off"
        if cfg.http_address is not None:
            host, port = self.collector.http_address_bound()
            base = f"{'https' if cfg.http_tls_cert_file else 'http'}://{host}:{port}"
            api = f"{base}/api/health"
            api += " (commands: token set)" if cfg.api_token else " (read-only: no API token)"
            api += " (reads: token set)" if cfg.api_read_token else ""
            if self.config.monitor is not None:
                api += f", dashboard {base}/, metrics {base}/metrics"
        return (
            f"collecting {cfg.topic_filter} from {cfg.broker.display()} as "
            f"{cfg.session_id} into {self.collector.state.store.url}; API {api}"
        )


def run_program(
    config: ProgramConfig,
    *,
    stop: threading.Event | None = None,
    on_started: Callable[[Program], None] | None = None,
) -> CollectorStats:
    """Run until SIGTERM/SIGINT (or ``stop`` is set, or a fatal error); returns the counters.

    Raises the fatal error (a CollectorError) if one stopped the collector.
    """
    stop_event = stop or threading.Event()
    program = Program(config)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def handle(signum: int, frame: FrameType | None) -> None:
            stop_event.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handle)
    try:
        program.start()
        if on_started is not None:
            on_started(program)
        while not stop_event.wait(0.2):
            if program.collector.wait(0):
                break
    finally:
        program.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)
    failure = program.collector.failure
    if failure is not None:
        if isinstance(failure, CollectorError):
            raise failure
        raise CollectorError(f"collector failed: {type(failure).__name__}: {failure}") from failure
    return program.collector.stats


def run_collector(
    config: CollectorConfig,
    *,
    stop: threading.Event | None = None,
    on_started: Callable[[Collector], None] | None = None,
) -> CollectorStats:
    """Run until SIGTERM/SIGINT (or ``stop`` is set, or a fatal error); returns the counters.

    Raises the fatal error (a CollectorError) if one stopped the collector. The collector alone,
    without a monitor: :func:`run_program` runs the whole program.
    """
    started = None if on_started is None else (lambda program: on_started(program.collector))
    return run_program(ProgramConfig(config), stop=stop, on_started=started)
