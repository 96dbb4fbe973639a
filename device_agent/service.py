"""``edgeship-agent run``: the agent as a long-running service on the board.

It loads and verifies the bundle, starts telemetry (and MQTT when a broker is set), serves a
local JSON inference endpoint for other processes on the board, optionally replays inputs from
an ``.npz`` file, and stops cleanly on SIGTERM or Ctrl-C: the last window is published and the
spool flushed as far as the broker allows (whatever is left stays on disk for next time).

HTTP API (127.0.0.1 by default; documented in docs/agent.md):

* ``POST /v1/predict`` with ``{"inputs": {"<input name>": <nested list, batch first>}}`` →
  ``{"outputs": {...}, "scores": [...], "is_outlier": [...], "labels": [...], "latency_ms": x}``
* ``GET /v1/health`` → model, versions, publisher and spool figures
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from device_agent.agent import Agent, AgentConfig
from device_agent.config import RunConfig
from device_agent.errors import ConfigError, EdgeshipError, InputError

__all__ = ["MAX_BODY_BYTES", "make_http_server", "replay_inputs", "run_service"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20


class _Handler(BaseHTTPRequestHandler):
    agent: Agent  # set on the subclass made for each server
    server_version = "edgeship-agent"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/health":
            m = self.agent.bundle.manifest.model
            self._send(
                HTTPStatus.OK,
                {
                    "ok": True,
                    "model": m.name,
                    "model_version": m.version,
                    "runtime": f"{self.agent.session.runtime} {self.agent.session.runtime_version}",
                    "inputs": [t.to_dict() for t in self.agent.bundle.manifest.io.inputs],
                    **self.agent.stats,
                },
            )
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": "unknown path; try POST /v1/predict"})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/predict":
            self._send(HTTPStatus.NOT_FOUND, {"error": "unknown path; try POST /v1/predict"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            self._send(
                HTTPStatus.BAD_REQUEST,
                {"error": f"send a JSON body of 1 byte to {MAX_BODY_BYTES} bytes"},
            )
            return
        try:
            body = json.loads(self.rfile.read(length))
            inputs = body["inputs"]
            if not isinstance(inputs, dict):
                raise TypeError("'inputs' must be an object of input name to array")
            feed = {str(k): np.asarray(v) for k, v in inputs.items()}
        except (ValueError, KeyError, TypeError) as exc:
            self._send(
                HTTPStatus.BAD_REQUEST,
                {"error": f'expected {{"inputs": {{name: nested list}}}}: {exc}'},
            )
            return
        try:
            result = self.agent.predict(feed)
        except InputError as exc:
            self._send(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(exc)})
            return
        except EdgeshipError as exc:
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)})
            return
        names = self.agent.bundle.manifest.io.output_names
        self._send(
            HTTPStatus.OK,
            {
                "outputs": {n: o.tolist() for n, o in zip(names, result.outputs, strict=False)},
                "scores": None if result.scores is None else result.scores.tolist(),
                "is_outlier": result.is_outlier.tolist(),
                "labels": result.labels,
                "latency_ms": result.latency_s * 1000,
            },
        )


class _Server(ThreadingHTTPServer):
    # http.server listens with a backlog of 5: a burst of clients (a dashboard's parallel
    # fetches, scripts sending commands) overflowed it and waited for TCP retransmits or timed
    # out (100 parallel GETs against a busy accept loop: 34 timeouts at 5, 0 at 128).
    request_queue_size = 128
    daemon_threads = True


def make_http_server(agent: Agent, address: tuple[str, int]) -> ThreadingHTTPServer:
    """A threaded HTTP server bound to ``address`` that serves ``agent``."""
    handler = type("AgentHandler", (_Handler,), {"agent": agent})
    try:
        server = _Server(address, handler)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve HTTP on {address[0]}:{address[1]}: {exc.strerror}"
        ) from exc
    server.daemon_threads = True
    return server


def replay_inputs(path: Path, agent: Agent) -> list[dict[str, np.ndarray]]:
    """Samples from an ``.npz`` keyed by input name (``labels`` and other keys are ignored)."""
    names = agent.bundle.manifest.io.input_names
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [n for n in names if n not in npz.files]
            if missing:
                raise ConfigError(
                    f"replay file {path.name} lacks inputs {missing}; it has {npz.files}"
                )
            arrays = {n: npz[n] for n in names}
    except FileNotFoundError as exc:
        raise ConfigError(f"replay file not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read replay file {path}: {exc}") from exc
    count = len(next(iter(arrays.values())))
    return [{n: a[i : i + 1] for n, a in arrays.items()} for i in range(count)]


def run_service(agent_config: AgentConfig, run: RunConfig) -> int:
    """Run until SIGTERM/SIGINT (or the end of a finite replay). Returns the exit code.

    Without ``run.bundle`` the bundle a remote deploy made current runs (ConfigError when there
    is none, or it no longer verifies)."""
    address = run.http_address()
    agent = Agent.from_bundle(run.bundle, agent_config)
    samples = None if run.replay is None else replay_inputs(run.replay, agent)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    server = None
    try:
        agent.start()
        m = agent.bundle.manifest.model
        where = agent_config.broker_url or "no broker (telemetry stays local)"
        log.info(
            "running %s v%s (%s) as %s/%s, telemetry to %s",
            m.name,
            m.version,
            agent.bundle.signature.describe(),
            agent_config.fleet,
            agent_config.device_id,
            where,
        )
        if address is not None:
            server = make_http_server(agent, address)
            threading.Thread(target=server.serve_forever, name="edgeship-http", daemon=True).start()
            log.info("inference endpoint on http://%s:%d/v1/predict", *server.server_address[:2])
        if samples is not None:
            _replay(agent, samples, run, stop)
            if run.replay_loops:
                stop.set()
        stop.wait()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        agent.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _replay(
    agent: Agent, samples: list[dict[str, np.ndarray]], run: RunConfig, stop: threading.Event
) -> None:
    period = 0.0 if run.replay_rate <= 0 else 1.0 / run.replay_rate
    loops = 0
    next_at = time.monotonic()
    log_file = None if run.replay_log is None else open(run.replay_log, "a", encoding="utf-8")  # noqa: SIM115
    try:
        while not stop.is_set():
            for index, sample in enumerate(samples):
                if stop.is_set():
                    return
                try:
                    result = agent.predict(sample)
                except InputError as exc:  # counted in telemetry by predict; keep going
                    log.warning("replayed input rejected: %s", exc)
                    continue
                if log_file is not None:
                    log_file.write(
                        json.dumps(
                            {
                                "loop": loops,
                                "index": index,
                                "score": result.score,
                                "outlier": bool(result.is_outlier[0]),
                                "label": None if result.labels is None else result.labels[0],
                            }
                        )
                        + "\n"
                    )
                    log_file.flush()
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    stop.wait(delay)
                else:
                    next_at = time.monotonic()
            loops += 1
            if run.replay_loops and loops >= run.replay_loops:
                return
    finally:
        if log_file is not None:
            log_file.close()
