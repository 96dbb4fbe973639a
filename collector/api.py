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

* ``/api/devices/{device}/commands/{id}``: a command sent through this API and the device's
  reply (from the store), ``state`` pending / replied / expired.

Other parts of the collector add routes with :func:`mount` (:mod:`collector.monitor`:
``/metrics``, ``/api/alerts``, ``/api/drift`` and the dashboard at ``/``).

State-changing routes (POST) need the API token, ``Authorization: Bearer <token>``:

* ``POST /api/devices/{device}/commands`` with ``{"action": "ping", "args": {}}``: the collector
  publishes a ``cmd`` (:class:`device_agent.contracts.messages.Command`) to the device over its
  own MQTT connection and answers 202 with the command's id once the broker acknowledged it.

Without a configured token (``--api-token-file``, ``EDGESHIP_API_TOKEN``) those routes answer
403 and say how to enable them; with one, a missing or wrong token is 401. Reads stay open. The
API binds 127.0.0.1 unless told otherwise; on another address without a token the collector
logs a warning (anyone who reaches the port reads the fleet's state). The token travels in the
clear over plain HTTP: beyond the local machine, put a TLS reverse proxy in front.

The server is :class:`device_agent.httpserver.BoundedHTTPServer` with :data:`HTTP_LIMITS`: a
request must arrive whole within 10 s (408) and its answer be taken within 60 s, bodies need a
Content-Length of at most :data:`MAX_BODY_BYTES` (411 / 413, refused before reading), 8 worker
threads, 256 open connections, and JSON bodies nested at most 32 deep, finite numbers only, no
duplicate keys, NUL or lone surrogates (400).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
import time
import urllib.parse
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

from collector.errors import BrokerError, ConfigError
from collector.state import FleetState
from device_agent.contracts import messages as msg
from device_agent.errors import EdgeshipError, ProtocolError
from device_agent.httpserver import (
    BoundedHTTPServer,
    HTTPLimits,
    JSONRequestHandler,
    RequestError,
    parse_json,
)

__all__ = [
    "HTTP_LIMITS",
    "MAX_BODY_BYTES",
    "TOKEN_ENV",
    "Commander",
    "Route",
    "SentCommand",
    "load_api_token",
    "make_api_server",
    "mount",
]

log = logging.getLogger("collector.api")

_MAX_SERIES = 10_000
MAX_BODY_BYTES = 64 * 1024  # any request's body; a command is a few hundred bytes
# Dashboards poll every 2 s and scripts send commands: more workers and connections than the
# agent's endpoint; a minute to take an answer, since a device's series (up to 10,000 windows,
# megabytes) may cross a slow link (the limits are described in device_agent.httpserver and
# docs/collector.md).
HTTP_LIMITS = HTTPLimits(
    workers=8, max_connections=256, request_timeout_s=10.0, send_timeout_s=60.0
)
TOKEN_ENV = "EDGESHIP_API_TOKEN"
_MIN_TOKEN = 16
_ENABLE = (
    "state-changing requests are disabled: start edgeship collect with --api-token-file FILE "
    f"(or {TOKEN_ENV}) and send 'Authorization: Bearer <token>'"
)
_COMMANDS_RE = re.compile(r"/api/devices/([^/]+)/commands")
_COMMAND_RE = re.compile(r"/api/devices/([^/]+)/commands/([^/]+)")

# A mounted route gets the path and the query; it answers (status, content type, body), or
# None for a path that is not its own.
Route = Callable[[str, dict[str, str]], "tuple[int, str, bytes] | None"]
_ROUTES: weakref.WeakKeyDictionary[FleetState, list[Route]] = weakref.WeakKeyDictionary()


def mount(state: FleetState, route: Route) -> None:
    """Serve ``route`` on the API servers of ``state``, tried after the built-in routes."""
    _ROUTES.setdefault(state, []).append(route)


@dataclass(frozen=True)
class SentCommand:
    """A command this collector published, as ``GET .../commands/{id}`` shows it."""

    fleet: str
    device: str
    topic: str
    command: msg.Command
    sent_at: float

    def to_dict(self) -> dict[str, Any]:
        c = self.command
        return {
            "action": c.action,
            "args": dict(c.args),
            "topic": self.topic,
            "sent_at": self.sent_at,
            "expires": c.expires,
        }


class Commander(Protocol):
    """What the API needs to send commands (:class:`collector.service.Collector`)."""

    def send_command(self, fleet: str, device: str, command: msg.Command) -> SentCommand:
        """Publish ``command`` at QoS 1 and wait for the broker's PUBACK; raises BrokerError
        when not connected, refused (MQTT 5 reason code) or not acknowledged in time."""
        ...

    def sent_command(self, command_id: str) -> SentCommand | None:
        """A command sent since start (the newest 1000 are kept), or None."""
        ...


def load_api_token(
    token: str | None = None,
    token_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The API token from ``--api-token``, ``--api-token-file`` or ``EDGESHIP_API_TOKEN`` (in
    that order; naming both options is an error), or None. Raises ConfigError."""
    env = os.environ if environ is None else environ
    if token is not None and token_file is not None:
        raise ConfigError("--api-token and --api-token-file: give one of them")
    where = "--api-token"
    if token_file is not None:
        where = f"--api-token-file {token_file}"
        try:
            token = Path(token_file).read_text().strip()
            mode = Path(token_file).stat().st_mode
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from exc
        if os.name == "posix" and mode & 0o077:
            log.warning(
                "%s is readable by group or others (mode %04o): anyone who reads it can command "
                "every device; restrict it with: chmod 600 %s",
                where,
                mode & 0o777,
                token_file,
            )
    elif token is None:
        token = env.get(TOKEN_ENV) or None
        where = TOKEN_ENV
    if token is None:
        return None
    check_api_token(token, where)
    return token


def check_api_token(token: str, where: str = "api_token") -> None:
    """Raise ConfigError unless ``token`` is at least 16 printable characters, no spaces."""
    if len(token) < _MIN_TOKEN or not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigError(
            f"{where}: the API token must be at least {_MIN_TOKEN} printable characters "
            "without spaces; make one with: python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'"
        )


class _Handler(JSONRequestHandler):
    state: FleetState
    health: Callable[[], dict[str, Any]]
    api_token: str | None = None
    commander: Commander | None = None
    server_version = "edgeship-collector"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def _send(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        self.send_json(status, body, headers, default=_jsonable)

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
            elif match := _COMMAND_RE.fullmatch(path):
                device, command_id = (urllib.parse.unquote(g) for g in match.groups())
                self._get_command(device, command_id, query)
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
                self.send_bytes(status, content_type, body)
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

    # --- state-changing requests ---

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path.rstrip("/")
        query = dict(urllib.parse.parse_qsl(url.query))
        # The server took the body only after checking Content-Length against MAX_BODY_BYTES
        # (411 without one, 413 beyond it: see make_api_server).
        body = self.body
        if not self._authorized():
            return
        try:
            if match := _COMMANDS_RE.fullmatch(path):
                self._post_command(urllib.parse.unquote(match.group(1)), body, query)
            else:
                self._send(
                    HTTPStatus.NOT_FOUND,
                    {"error": f"no route POST {url.path}; try /api/devices/{{id}}/commands"},
                )
        except _BadRequest as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except EdgeshipError as exc:
            log.warning("API POST %s failed: %s", url.path, exc)
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})

    def do_PUT(self) -> None:
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            {"error": f"{self.command} is not supported: reads are GET, commands are POST"},
            {"Allow": "GET, POST"},
        )

    do_DELETE = do_PATCH = do_PUT

    def _authorized(self) -> bool:
        """True for a request that carries the API token; else answer 403 (no token configured:
        state-changing routes are off) or 401 (token missing or wrong)."""
        token = self.api_token
        if token is None:
            self._send(HTTPStatus.FORBIDDEN, {"error": _ENABLE})
            return False
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return True
        problem = "wrong API token" if scheme.lower() == "bearer" else "no API token"
        log.warning("API %s %s from %s: %s", self.command, self.path, self.client_address[0],
                    problem)  # fmt: skip
        self._send(
            HTTPStatus.UNAUTHORIZED,
            {"error": f"{problem}: send 'Authorization: Bearer <token>' (the collector's "
                      "--api-token-file)"},
            {"WWW-Authenticate": 'Bearer realm="edgeship-collector"'},
        )  # fmt: skip
        return False

    def _fleet_of(self, device: str, fleet: str | None) -> str | None:
        """The fleet to address ``device`` in: the one named, the collector's, or the only one
        the store knows the device in (None: the device is unknown, nothing sent)."""
        own = self.state.fleet
        if fleet is not None:
            try:
                msg.validate_id(fleet, "fleet")
            except ProtocolError as exc:
                raise _BadRequest(str(exc)) from None
            if own is not None and fleet != own:
                raise _BadRequest(f"this collector collects fleet {own!r}, not {fleet!r}")
            return fleet
        if own is not None:
            return own
        fleets = sorted({r.fleet for r in self.state.store.devices(None) if r.device == device})
        if len(fleets) > 1:
            raise _BadRequest(f"device {device!r} exists in fleets {fleets}; name one (fleet)")
        return fleets[0] if fleets else None

    def _post_command(self, device: str, body: bytes, query: dict[str, str]) -> None:
        commander = self.commander
        if commander is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "this API cannot send commands"})
            return
        try:
            msg.validate_id(device, "device")
            request = parse_json(body or b"{}", max_depth=HTTP_LIMITS.max_json_depth)
        except (ProtocolError, RequestError) as exc:
            raise _BadRequest(str(exc)) from None
        if not isinstance(request, dict):
            raise _BadRequest('the body must be a JSON object, e.g. {"action": "ping"}')
        unknown = sorted(set(request) - {"action", "args", "id", "expires_in_s", "fleet"})
        if unknown:
            raise _BadRequest(
                f"unknown field(s) {unknown}; expected action, args, id, expires_in_s, fleet"
            )
        fleet = self._fleet_of(device, request.get("fleet") or query.get("fleet"))
        if fleet is None:
            self._send(
                HTTPStatus.NOT_FOUND,
                {"error": f"no device {device!r} in the store; name its fleet (\"fleet\": ...) "
                          "to command a device the collector has not heard from"},
            )  # fmt: skip
            return
        now = time.time()
        expires_in = request.get("expires_in_s", 300)
        if expires_in is not None and (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or not 0 < expires_in <= 30 * 86400
        ):
            raise _BadRequest("expires_in_s must be a number of seconds in (0, 2592000] or null")
        try:
            command = msg.Command.from_dict(
                {
                    "id": request.get("id") or uuid.uuid4().hex[:16],
                    "action": request.get("action"),
                    "ts": now,
                    "args": request.get("args", {}),
                    "expires": None if expires_in is None else now + expires_in,
                }
            )
        except ProtocolError as exc:
            raise _BadRequest(f"not a valid command: {exc}") from None
        if commander.sent_command(command.id) is not None:
            raise _BadRequest(f"command id {command.id!r} was used already; leave id out")
        try:
            sent = commander.send_command(fleet, device, command)
        except BrokerError as exc:
            self._send(HTTPStatus.BAD_GATEWAY, {"error": str(exc)})
            return
        log.info("API: sent %s %r to %s/%s", command.id, command.action, fleet, device)
        reply_url = f"/api/devices/{urllib.parse.quote(device)}/commands/{command.id}?fleet={fleet}"
        self._send(
            HTTPStatus.ACCEPTED,
            {"id": command.id, "fleet": fleet, "device": device, **sent.to_dict(),
             "state": "pending", "reply_url": reply_url},
            {"Location": reply_url},
        )  # fmt: skip

    def _get_command(self, device: str, command_id: str, query: dict[str, str]) -> None:
        """``GET /api/devices/{device}/commands/{id}``: what was sent and the device's reply."""
        sent = self.commander.sent_command(command_id) if self.commander else None
        if sent is not None and sent.device != device:
            sent = None
        fleet = query.get("fleet") or (sent.fleet if sent else None)
        try:
            fleet = self._fleet_of(device, fleet)
        except _BadRequest:
            if sent is None:
                raise
        reply = None
        if fleet is not None:
            for event in self.state.store.events(fleet, device, "cmd/reply", limit=1000):
                if event.body.get("id") == command_id:
                    reply = event
                    break
        if sent is None and reply is None:
            self._send(
                HTTPStatus.NOT_FOUND,
                {"error": f"no command {command_id!r} sent to {device!r} by this collector, "
                          "and no reply to it in the store"},
            )  # fmt: skip
            return
        if reply is not None:
            state = "replied"
        elif (
            sent is not None
            and sent.command.expires is not None
            and (time.time() > sent.command.expires)
        ):
            state = "expired"
        else:
            state = "pending"
        self._send(
            HTTPStatus.OK,
            {
                "id": command_id,
                "fleet": fleet,
                "device": device,
                "state": state,
                "sent": sent.to_dict() if sent else None,
                "reply": None
                if reply is None
                else {
                    "ok": reply.body.get("ok"),
                    "result": reply.body.get("result"),
                    "error": reply.body.get("error"),
                    "ts": reply.ts,
                    "received_at": reply.received_at,
                    "boot": reply.boot,
                    "seq": reply.seq,
                },
            },
        )


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
    state: FleetState,
    health: Callable[[], dict[str, Any]],
    address: tuple[str, int],
    *,
    api_token: str | None = None,
    commander: Commander | None = None,
    limits: HTTPLimits = HTTP_LIMITS,
) -> BoundedHTTPServer:
    """An HTTP server for the API on ``address`` (not yet serving: call ``serve_forever`` on a
    thread), with ``limits`` (timeouts, workers, connections) and bodies of at most
    MAX_BODY_BYTES. ``api_token`` None turns the state-changing routes off; ``commander``
    sends the commands. Raises ConfigError if the address cannot be bound."""
    if api_token is not None:
        check_api_token(api_token)
    handler = type(
        "CollectorAPIHandler",
        (_Handler,),
        {
            "state": state,
            "health": staticmethod(health),
            "api_token": api_token,
            "commander": commander,
        },
    )
    try:
        return BoundedHTTPServer(
            address,
            handler,
            limits=limits,
            body_limit=lambda method, path: MAX_BODY_BYTES,
            name="edgeship-http",
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot serve the collector API on {address[0]}:{address[1]}: {exc.strerror or exc}"
        ) from exc
