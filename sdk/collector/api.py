"""The collector's read-only JSON API, on the standard library's ``http.server``.

Routes (all GET; documented with examples in ``docs/collector.md``):

* ``/api/health``: the collector's connection, counters (received, stored, duplicates, dead
  letters by field...) and store; HTTP 503 while it is not connected or has failed.
* ``/api/devices``: the fleet snapshot: per-device state (online / offline / stale / unknown
  with the reason), last seen, model and version, latency percentiles from the summed
  histograms, outlier rate, temperature and throttling, spool drops, gaps; plus fleet totals.
* ``/api/devices/{device}``: one device with its newest telemetry windows (``?series=N``, default
  120, at most 10000) and its newest status / outlier / reply events (``?events=N``);
  ``?fleet=NAME`` when a collector of several fleets holds the same device id twice.
* ``/api/dead-letters``: the newest rejected messages (``?limit=N``, default 50) with the field
  and reason, and a payload preview.

Other parts of the collector add routes with :func:`mount` (:mod:`sdk.collector.monitor`:
``/metrics``, ``/api/alerts``, ``/api/drift`` and the dashboard at ``/``).

It binds 127.0.0.1 unless told otherwise: the API has no authentication, so exposing it is a
decision for a reverse proxy, not a default.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse
import weakref
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from device_agent.errors import EdgeshipError
from sdk.collector.errors import ConfigError
from sdk.collector.state import FleetState

__all__ = ["Route", "make_api_server", "mount"]

log = logging.getLogger("sdk.collector.api")

_MAX_SERIES = 10_000

# A mounted route gets the path and the query; it answers (status, content type, body), or
# None for a path that is not its own.
Route = Callable[[str, dict[str, str]], "tuple[int, str, bytes] | None"]
_ROUTES: weakref.WeakKeyDictionary[FleetState, list[Route]] = weakref.WeakKeyDictionary()


def mount(state: FleetState, route: Route) -> None:
    """Serve ``route`` on the API servers of ``state``, tried after the built-in routes."""
    _ROUTES.setdefault(state, []).append(route)


class _Handler(BaseHTTPRequestHandler):
    state: FleetState
    health: Callable[[], dict[str, Any]]
    server_version = "edgeship-collector"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body, default=_jsonable, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path.rstrip("/")
        query = dict(urllib.parse.parse_qsl(url.query))
        try:
            if path == "/api/health":
                health = self.health()
                self._send(
                    HTTPStatus.OK if health["ok"] else HTTPStatus.SERVICE_UNAVAILABLE, health
                )
            elif path == "/api/devices":
                self._send(HTTPStatus.OK, self.state.snapshot().to_dict())
            elif path.startswith("/api/devices/"):
                self._device(urllib.parse.unquote(path[len("/api/devices/") :]), query)
            elif path == "/api/dead-letters":
                self._dead_letters(query)
            elif self._mounted(url.path, query):
                pass
            else:
                self._send(
                    HTTPStatus.NOT_FOUND,
                    {"error": f"no route {url.path}; try /api/health, /api/devices, "
                              "/api/devices/{id}, /api/dead-letters"},
                )  # fmt: skip
        except _BadRequest as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except EdgeshipError as exc:
            log.warning("API %s failed: %s", url.path, exc)
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})

    def _mounted(self, path: str, query: dict[str, str]) -> bool:
        for route in _ROUTES.get(self.state, ()):
            answer = route(path, query)
            if answer is not None:
                status, content_type, body = answer
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)
                return True
        return False

    def _device(self, device: str, query: dict[str, str]) -> None:
        series = _int_arg(query, "series", 120, 0, _MAX_SERIES)
        events = _int_arg(query, "events", 20, 0, 1000)
        try:
            detail = self.state.device(
                device, fleet=query.get("fleet"), series=series, events=events
            )
        except LookupError as exc:
            raise _BadRequest(str(exc)) from None
        if detail is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no device {device!r} in the store"})
        else:
            self._send(HTTPStatus.OK, detail.to_dict())

    def _dead_letters(self, query: dict[str, str]) -> None:
        limit = _int_arg(query, "limit", 50, 1, 1000)
        store = self.state.store
        rows = store.dead_letters(limit)
        self._send(
            HTTPStatus.OK,
            {
                "counts": store.dead_letter_counts(),
                "newest": [
                    {
                        "id": r.id,
                        "received_at": r.received_at,
                        "topic": r.topic,
                        "size": r.size,
                        "field": r.field,
                        "error": r.error,
                        "payload_preview": r.payload[:256].decode("utf-8", "replace"),
                    }
                    for r in rows
                ],
            },
        )

    def do_POST(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "the collector API is read-only"})

    do_PUT = do_DELETE = do_PATCH = do_POST


class _BadRequest(Exception):
    pass


def _int_arg(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"?{name}={raw!r}: expected an integer") from None
    if not lo <= value <= hi:
        raise _BadRequest(f"?{name}={value}: expected {lo}..{hi}")
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def make_api_server(
    state: FleetState, health: Callable[[], dict[str, Any]], address: tuple[str, int]
) -> ThreadingHTTPServer:
    """A threaded HTTP server for the API on ``address`` (not yet serving: call
    ``serve_forever`` on a thread). Raises ConfigError if the address cannot be bound."""
    handler = type(
        "CollectorAPIHandler", (_Handler,), {"state": state, "health": staticmethod(health)}
    )
    try:
        server = ThreadingHTTPServer(address, handler)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve the collector API on {address[0]}:{address[1]}: {exc.strerror}"
        ) from exc
    server.daemon_threads = True
    return server
