"""The collector's HTTP application: one FastAPI app built from what it serves.

:func:`create_app` takes the collector (:class:`collector.api.CollectorView`), an optional
monitor and the API token, and nothing else: there is no route table filled from elsewhere.
Without a monitor the app serves the JSON API only (``/api/...``); with one, also the dashboard,
``/metrics``, ``/api/alerts`` and ``/api/drift`` (:mod:`collector.web`). The OpenAPI document
is at ``/openapi.json`` and its pages at ``/docs``.

In front of the routes, :class:`RequestGuard` (plain ASGI, so it runs before any body is read)
keeps the rules the API had on the standard library's server:

* headers past 100 or :data:`MAX_HEADER_BYTES` (32 KiB) in all are 431;
* a request line naming another HTTP version than 1.0 or 1.1 is 400;
* methods other than GET and POST are 405 with ``Allow: GET, POST``;
* a body needs a ``Content-Length`` (411; chunked bodies are 411 too) of at most
  :data:`collector.api.MAX_BODY_BYTES` (413), refused before any of it is read;
* every POST needs the API token (403 when none is configured, 401 when missing or wrong),
  before its route is looked up, so an unknown route answers 401 to a stranger too;
* with a read token, every GET but :data:`OPEN_READS` (``/api/health``, for liveness probes)
  needs it or the API token, as ``Authorization: Bearer <token>`` or as the password of HTTP
  Basic (any user name: so a browser can open the dashboard), compared in constant time; a
  missing or wrong one is 401 with both challenges, before its route is looked up;
* a trailing slash is ignored (``/api/devices/`` is ``/api/devices``);
* every answer says ``Cache-Control: no-store`` (the fleet's state of the moment).

Errors are ``{"error": "..."}`` with the status the old server gave: a bad query parameter is
400 (not FastAPI's 422), an unknown route 404 naming the routes there are, a store or broker
failure 503. Connection-level limits (timeouts, connections, TLS) are the server's:
:mod:`collector.http_server`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from collector.api import (
    MAX_BODY_BYTES,
    ApiError,
    CollectorView,
    check_api_token,
    check_bearer,
)
from collector.api_routes import api_router, json_response
from collector.docs_page import DOCS, serve_docs, swagger_assets
from device_agent.contracts.text import escape
from device_agent.errors import EdgeshipError

if TYPE_CHECKING:
    from collector.monitor import Monitor

__all__ = ["MAX_HEADERS", "MAX_HEADER_BYTES", "OPEN_READS", "RequestGuard", "create_app"]

log = logging.getLogger("collector.api")

_ALLOWED = ("GET", "POST")
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADERS = 100  # as http.client and the old server
OPEN_READS = frozenset({"/api/health"})  # open even with a read token: liveness probes
_GET_ROUTES = "try /api/health, /api/devices, /api/devices/{id}, /api/dead-letters, /api/rollouts"


def create_app(
    collector: CollectorView,
    *,
    monitor: Monitor | None = None,
    api_token: str | None = None,
    api_read_token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> FastAPI:
    """The app serving ``collector`` (and ``monitor``'s routes when given). ``api_token`` None
    turns the state-changing routes off (403); ``api_read_token`` guards the reads (None: open).
    Raises ConfigError for a token too weak."""
    for token, name in ((api_token, "api_token"), (api_read_token, "api_read_token")):
        if token is not None:
            check_api_token(token, name)
    assets = swagger_assets()
    app = FastAPI(
        title="edgeship collector",
        summary="The fleet's state, alerts, drift and metrics; commands to devices.",
        version="1",
        docs_url=None if assets is not None else DOCS,
        redoc_url=None,
    )
    if assets is not None:
        serve_docs(app, assets)  # Swagger UI from a wheel: /docs works without the internet
    app.include_router(api_router(collector))
    if monitor is not None:
        from collector.web import monitor_router

        app.include_router(monitor_router(monitor))
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EdgeshipError, _edgeship_error)
    app.add_middleware(
        RequestGuard,
        api_token=api_token,
        api_read_token=api_read_token,
        max_body_bytes=max_body_bytes,
        max_header_bytes=max_header_bytes,
    )
    return app


class RequestGuard:
    """Methods, body framing and size, the API token and trailing slashes, checked on the
    request's head before anything else runs (see the module's docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_token: str | None,
        api_read_token: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ) -> None:
        self.app = app
        self.api_token = api_token
        # Who may read: the read token, and the API token's holder too (it may do more).
        self.read_tokens = tuple(t for t in (api_read_token, api_token) if t is not None)
        self.reads_guarded = api_read_token is not None
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_uncached(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_uncached)
            return
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
        await self.app(scope, receive, send_uncached)

    def _refusal(self, scope: Scope) -> Response | None:
        method = scope["method"]
        version = scope.get("http_version", "1.1")
        if version not in ("1.0", "1.1"):  # h11 parses "HTTP/2.0" as if it were 1.1
            return json_response(400, {"error": f"HTTP/{version}: this server speaks HTTP/1.1"})
        if method == "HEAD":  # an answer to HEAD has no body (h11 drops it): say so honestly
            return Response(status_code=405, headers={"Allow": "GET, POST"})
        if method not in _ALLOWED:
            return json_response(
                405,
                {"error": f"{method} is not supported: reads are GET, commands are POST"},
                {"Allow": "GET, POST"},
            )
        raw = scope["headers"]
        size = sum(len(k) + len(v) + 4 for k, v in raw)
        if size > self.max_header_bytes or len(raw) > MAX_HEADERS:
            # h11 bounds only a head that arrives in pieces; one sent whole is counted here
            return json_response(
                431,
                {"error": f"the request's headers are too large ({len(raw)} headers, {size} "
                          f"bytes; at most {MAX_HEADERS}, {self.max_header_bytes} bytes)"},
            )  # fmt: skip
        headers = _headers(raw)
        if "transfer-encoding" in headers:
            return json_response(
                411,
                {"error": "chunked and other transfer encodings are not supported: send "
                          "Content-Length"},
            )  # fmt: skip
        length = headers.get("content-length")
        if length is None and method == "POST":
            return json_response(411, {"error": f"{method} needs a Content-Length header"})
        if length is not None and int(length) > self.max_body_bytes:
            # h11 let through only digits: int() cannot fail.
            return json_response(
                413,
                {"error": f"a body of {int(length)} bytes is larger than this route takes "
                          f"({self.max_body_bytes} bytes)"},
            )  # fmt: skip
        if method == "POST":
            problem = check_bearer(self.api_token, headers.get("authorization", ""))
            if problem is not None:
                return _unauthorized(scope, *problem)
        open_read = (scope["path"].rstrip("/") or "/") in OPEN_READS
        authorization = headers.get("authorization", "")
        if (
            self.reads_guarded
            and not open_read
            and not read_allowed(self.read_tokens, authorization)
        ):
            return _unauthorized_read(scope)
        return None


def read_allowed(tokens: Sequence[str], authorization: str) -> bool:
    """Whether ``authorization`` carries one of ``tokens``: ``Bearer <token>``, or HTTP Basic
    with the token as the password (any user name). Every token is compared, in constant time.
    """
    scheme, _, given = authorization.strip().partition(" ")
    given = given.strip()
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(given, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
            return False
    elif scheme.lower() != "bearer":
        return False
    offered = given.encode("utf-8", "surrogateescape")
    matches = [hmac.compare_digest(offered, token.encode()) for token in tokens]
    return any(matches)


def _headers(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}


def _unauthorized(scope: Scope, status: int, problem: str) -> Response:
    if status == 403:
        return json_response(403, {"error": problem})
    client = scope.get("client") or ("?", 0)
    log.warning(
        "API %s %s from %s: %s", escape(scope["method"]), escape(scope["path"]), client[0], problem
    )
    return json_response(
        401,
        {"error": f"{problem}: send 'Authorization: Bearer <token>' (the collector's "
                  "--api-token-file)"},
        {"WWW-Authenticate": 'Bearer realm="edgeship-collector"'},
    )  # fmt: skip


def _unauthorized_read(scope: Scope) -> Response:
    client = scope.get("client") or ("?", 0)
    log.warning("API GET %s from %s: no or wrong read token", escape(scope["path"]), client[0])
    response = json_response(
        401,
        {"error": "this collector's reads need its read token: send 'Authorization: Bearer "
                  "<token>' (the collector's --api-read-token-file), or give it as the "
                  "password when the browser asks"},
    )  # fmt: skip
    # Both challenges: scripts send Bearer, a browser answers the Basic one by asking.
    for scheme in ("Basic", "Bearer"):
        challenge = f'{scheme} realm="edgeship-collector"'
        response.raw_headers.append((b"www-authenticate", challenge.encode()))
    return response


# --- error answers ------------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)  # registered for ApiError only
    return json_response(exc.status, {"error": exc.message}, exc.headers)


async def _edgeship_error(request: Request, exc: Exception) -> Response:
    log.warning("API %s %s failed: %s", escape(request.method), escape(request.url.path), exc)
    return json_response(503, {"error": str(exc)})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing's answers: an unknown path, or a path that has no POST, is 404 with the routes
    worth trying (as before); anything else keeps its status."""
    assert isinstance(exc, StarletteHTTPException)
    path = request.url.path
    if exc.status_code == 404 or (exc.status_code == 405 and request.method == "POST"):
        if request.method == "POST":
            message = f"no route POST {path}; try /api/devices/{{id}}/commands"
        else:
            message = f"no route {path}; {_GET_ROUTES}"
        return json_response(404, {"error": message})
    return json_response(exc.status_code, {"error": str(exc.detail)}, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """A query or path parameter FastAPI refused: 400 naming it, ``?series=abc: expected an
    integer`` or ``?series=20000: expected 0..10000``."""
    assert isinstance(exc, RequestValidationError)
    errors: Sequence[dict[str, Any]] = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ())]
    name = loc[-1] if loc else "?"
    given = request.query_params.get(name)
    where = f"?{name}={given!r}" if given is not None else name
    kind = str(first.get("type", ""))
    ctx = first.get("ctx") or {}
    if kind == "int_parsing":
        expected = "an integer"
    elif kind in ("greater_than_equal", "less_than_equal"):
        where = f"?{name}={given}"
        expected = _range(request, name) or str(first.get("msg", ""))
    elif kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "")
    else:
        expected = str(first.get("msg", "a valid value"))
    return json_response(400, {"error": f"{where}: expected {expected}"})


def _range(request: Request, name: str) -> str | None:
    """``lo..hi`` of the query parameter ``name`` of the route that refused it."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    for param in getattr(dependant, "query_params", ()):
        if param.name != name:
            continue
        bounds = {type(m).__name__: m for m in param.field_info.metadata}
        lo, hi = bounds.get("Ge"), bounds.get("Le")
        if lo is not None and hi is not None:
            return f"{lo.ge}..{hi.le}"
    return None
