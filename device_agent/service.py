"""``edgeship-agent run``: the agent as a long-running service on the board.

It loads and verifies the bundle, starts telemetry (and MQTT when a broker is set), serves a
local JSON inference endpoint for other processes on the board, optionally replays inputs from
an ``.npz`` file, and stops cleanly on SIGTERM or Ctrl-C: the last window is published and the
spool flushed as far as the broker allows (whatever is left stays on disk for next time).

HTTP API (127.0.0.1 by default; documented in docs/agent.md):

* ``POST /v1/predict`` with ``{"inputs": {"<input name>": <nested list, batch first>}}`` →
  ``{"outputs": {...}, "scores": [...], "is_outlier": [...], "labels": [...], "latency_ms": x}``
* ``GET /v1/health`` → model, versions, publisher and spool figures

The server is :class:`device_agent.httpserver.BoundedHTTPServer` with :data:`HTTP_LIMITS`
(timeouts, 4 workers, 64 connections) and a predict body cap from the model's input spec
(:func:`predict_body_limit`); binding beyond 127.0.0.1 logs a warning.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from http import HTTPStatus
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from device_agent.agent import Agent, AgentConfig
from device_agent.config import RunConfig
from device_agent.contracts.bundle import IOSpec, TensorSpec
from device_agent.errors import ConfigError, EdgeshipError, InputError
from device_agent.httpserver import (
    BoundedHTTPServer,
    HTTPLimits,
    JSONRequestHandler,
    RequestError,
    is_loopback,
    parse_json,
)

__all__ = [
    "HTTP_LIMITS",
    "MAX_BODY_BYTES",
    "make_http_server",
    "predict_body_limit",
    "replay_inputs",
    "run_service",
]

log = logging.getLogger(__name__)

# The body cap of POST /v1/predict, from the model's input spec (docs/agent.md, "Limits"):
#   min(MAX_BODY_BYTES, BODY_OVERHEAD + NUMBER_BYTES * sum over inputs of prod(dims))
# where a symbolic first (batch) dimension counts MAX_BATCH rows and any other symbolic
# dimension SYMBOLIC_DIM. NUMBER_BYTES is one number as JSON text with its separator and a
# pretty-printer's indentation ("-1.2345678901234567e-05, " is 25 bytes; json.dumps(indent=4)
# four levels deep adds 17 more).
MAX_BODY_BYTES = 16 * 2**20
BODY_OVERHEAD = 64 * 1024
NUMBER_BYTES = 48
MAX_BATCH = 64
SYMBOLIC_DIM = 1024
OTHER_BODY_BYTES = 64 * 1024  # any other route (bodies are ignored there)
HTTP_LIMITS = HTTPLimits(workers=4, max_connections=64, request_timeout_s=10.0)


def predict_body_limit(io: IOSpec) -> int:
    """The largest ``POST /v1/predict`` body the endpoint reads for a model with ``io``."""
    elements = 0
    for spec in io.inputs:
        count = 1
        for axis, dim in enumerate(spec.shape):
            count *= dim if isinstance(dim, int) else MAX_BATCH if axis == 0 else SYMBOLIC_DIM
        elements += count
    return min(MAX_BODY_BYTES, BODY_OVERHEAD + NUMBER_BYTES * elements)


def _as_input(name: str, value: Any, spec: TensorSpec) -> np.ndarray:
    """A JSON value as the array the model's input ``spec`` takes: whole numbers are welcome
    for float inputs (JavaScript writes 1.0 as 1); values beyond the dtype's range are 422."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged lists and the like
        raise RequestError(f"input {name!r}: cannot be read as an array ({exc})", 422) from None
    kind = arr.dtype.kind
    if kind not in "biuf":  # strings, null, objects, integers beyond 64 bits
        raise RequestError(
            f"input {name!r}: expected a nested list of numbers ({spec.dtype}, shape "
            f"{list(spec.shape)})",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    want = np.dtype(spec.dtype)
    if want.kind == "f" and kind in "iuf" and arr.dtype != want:
        with np.errstate(over="ignore"):
            arr = arr.astype(want)
        if not np.isfinite(arr).all():
            raise RequestError(
                f"input {name!r}: a value is beyond {spec.dtype}'s range",
                HTTPStatus.UNPROCESSABLE_ENTITY,
            )
    elif want.kind in "iu" and kind in "iu" and arr.dtype != want:
        info = np.iinfo(want)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise RequestError(
                f"input {name!r}: a value is outside {spec.dtype}'s range {info.min}..{info.max}",
                HTTPStatus.UNPROCESSABLE_ENTITY,
            )
        arr = arr.astype(want)
    return arr


def _feed(body: Any, io: IOSpec) -> dict[str, Any]:
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, dict):
        raise RequestError('expected {"inputs": {"<input name>": <nested list, batch first>}}')
    specs = {spec.name: spec for spec in io.inputs}
    # An unknown name stays as it is: the agent's check names what the model takes (422).
    return {
        name: value if name not in specs else _as_input(name, value, specs[name])
        for name, value in inputs.items()
    }


class _Handler(JSONRequestHandler):
    agent: Agent  # set on the subclass made for each server
    server_version = "edgeship-agent"

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/health":
            m = self.agent.bundle.manifest.model
            stats = self.agent.stats  # "ok" is false once a worker thread died (Agent.health)
            self.send_json(
                HTTPStatus.OK if stats["ok"] else HTTPStatus.SERVICE_UNAVAILABLE,
                {
                    "model": m.name,
                    "model_version": m.version,
                    "runtime": f"{self.agent.session.runtime} {self.agent.session.runtime_version}",
                    "inputs": [t.to_dict() for t in self.agent.bundle.manifest.io.inputs],
                    **stats,
                },
            )
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": _ROUTES})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/predict":
            self.send_json(HTTPStatus.NOT_FOUND, {"error": _ROUTES})
            return
        try:
            body = parse_json(
                self.body,
                max_depth=HTTP_LIMITS.max_json_depth,
                non_finite_status=HTTPStatus.UNPROCESSABLE_ENTITY,
            )
            feed = _feed(body, self.agent.bundle.manifest.io)
        except RequestError as exc:
            self.send_json(exc.status, {"error": str(exc)})
            return
        try:
            result = self.agent.predict(feed)
        except InputError as exc:
            self.send_json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(exc)})
            return
        except EdgeshipError as exc:
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)})
            return
        names = self.agent.bundle.manifest.io.output_names
        self.send_json(  # a non-finite output or score is written as null (dumps_json)
            HTTPStatus.OK,
            {
                "outputs": {n: o.tolist() for n, o in zip(names, result.outputs, strict=False)},
                "scores": None if result.scores is None else result.scores.tolist(),
                "is_outlier": result.is_outlier.tolist(),
                "labels": result.labels,
                "latency_ms": result.latency_s * 1000,
            },
        )


_ROUTES = "unknown path; try POST /v1/predict or GET /v1/health"


def make_http_server(
    agent: Agent, address: tuple[str, int], *, limits: HTTPLimits = HTTP_LIMITS
) -> BoundedHTTPServer:
    """An HTTP server bound to ``address`` that serves ``agent`` (not yet serving: call
    ``serve_forever`` on a thread). Logs a warning for an address beyond this machine."""
    handler = type("AgentHandler", (_Handler,), {"agent": agent})

    def body_limit(method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") == "/v1/predict":
            return predict_body_limit(agent.bundle.manifest.io)
        return OTHER_BODY_BYTES

    try:
        server = BoundedHTTPServer(
            address, handler, limits=limits, body_limit=body_limit, name="edgeship-http"
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot serve HTTP on {address[0]}:{address[1]}: {exc.strerror or exc}"
        ) from exc
    if not is_loopback(address[0]):
        log.warning(
            "the inference endpoint listens on %s, not 127.0.0.1: any machine that reaches "
            "port %d can run the model and read the agent's health, without a password; bind "
            "127.0.0.1 (--http 127.0.0.1:%d) unless other machines must use it",
            address[0] or "every address",
            server.server_address[1],
            server.server_address[1],
        )
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
