"""The collector's HTTP listener: uvicorn on a thread of its own, with the API's limits.

:class:`ApiServer` binds its socket itself (so a port in use is a ConfigError at start, and
port 0 tells the port it got), runs uvicorn's h11 server on its own event loop in the thread
``edgeship-http``, and serves one ASGI app, which it rebuilds when a monitor is attached or
taken back (:meth:`ApiServer.attach_monitor`): the app is made by a factory from what it
serves, never patched.

Limits (:class:`HttpSettings`, defaults as the standard-library server had them):

* ``workers`` (8): the thread pool that runs the routes (store reads, waits for a PUBACK);
  connections themselves hold no thread, however many are open.
* ``max_connections`` (256): past it, the oldest connection that is not being answered (idle,
  or its request not yet whole) is closed to make room, with a 503 if it had sent part of a
  request; uvicorn's ``limit_concurrency`` answers 503 when every connection is busy.
* ``request_timeout_s`` (10): a request must arrive whole within it, counted from the
  connection's start or the previous answer (uvicorn has no such limit; a slow header or body
  sender would hold its connection forever). Past it: 408 and the connection is closed, or a
  quiet close if nothing was sent; uvicorn's ``timeout_keep_alive`` is the same bound.
* ``max_header_bytes`` (32 KiB): a request's head (431 past it, whether h11 saw it arrive
  in pieces or the app's guard whole); at most 100 headers.
* A client that closes its sending side after its request (``shutdown(SHUT_WR)``) still gets
  the answer; uvicorn would drop it. A request cut short that way is 400.
* ``tls_cert_file`` / ``tls_key_file``: serve HTTPS (uvicorn's ``ssl_certfile`` /
  ``ssl_keyfile``); the token then no longer crosses the network in the clear.

Not bounded any more: the time a client may take to read an answer (the old server's 60 s send
timeout); a reader that never reads holds one task, not a thread, until the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

import anyio.to_thread
import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from collector.errors import ConfigError
from device_agent.httpjson import dumps_json

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from collector.api import CollectorView
    from collector.monitor import Monitor

__all__ = ["ApiServer", "HttpSettings"]

log = logging.getLogger("collector.http")

_WHOLE = (h11.DONE, h11.MUST_CLOSE)  # their states once a request arrived whole
_LINGER_S = 2.0  # after an error answer: read and drop what the client still sends, this long


@dataclass(frozen=True)
class HttpSettings:
    """How the API listens (see the module's docstring)."""

    workers: int = 8
    max_connections: int = 256
    request_timeout_s: float = 10.0
    max_header_bytes: int = 32 * 1024
    shutdown_timeout_s: float = 5.0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 256 or not 1 <= self.max_connections <= 65536:
            raise ConfigError("http: workers must be in 1..256, max_connections in 1..65536")
        if not self.request_timeout_s > 0 or not self.shutdown_timeout_s > 0:
            raise ConfigError("http: request_timeout_s and shutdown_timeout_s must be positive")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("http: TLS needs both tls_cert_file and tls_key_file")


class _BoundedH11(H11Protocol):
    """uvicorn's h11 protocol plus the request timeout, the eviction of the oldest waiting
    connection past ``max_connections``, and answers to half-closed clients."""

    settings = HttpSettings()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._opened = time.monotonic()
        self._received = False  # any byte of the current request
        self._eof = False
        self._lingering = False
        self._timer: asyncio.TimerHandle | None = None
        self._arm()
        if len(self.connections) > self.settings.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # after an error answer: read and dropped
        self._received = True
        super().data_received(data)
        if self.conn.their_state in _WHOLE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        self._received = bool(self.conn.trailing_data[0])
        if self.conn.their_state in _WHOLE and not self._answered():
            self._disarm()  # a pipelined request, whole, is being answered
        else:
            self._arm()
        if self._eof:
            self._settle_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is stopping: a lingering connection has had its answer, close it now."""
        if self._lingering:
            self.transport.close()
            return
        try:
            super().shutdown()
        except h11.LocalProtocolError:  # h11 in a state that cannot say goodbye (a raw answer)
            self.transport.close()

    def eof_received(self) -> bool:  # type: ignore[override]
        """The client sent all it will: answer what it asked, then close."""
        self._eof = True
        if self._lingering:
            self.transport.close()
            return False
        self._settle_eof()
        return True  # keep the transport open for the answer

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request (bad framing, no Host header, a head past the limit):
        400 as JSON with a length, like every other answer, instead of uvicorn's plain text
        delimited by the close."""
        limit = self.settings.max_header_bytes
        if len(self.conn.trailing_data[0]) > limit:  # what h11 refused: a head past its limit
            self._refuse(431, f"the request's head is over {limit} bytes")
        else:
            self._refuse(
                400, "not a valid HTTP/1.1 request (its framing, or a missing Host header)"
            )

    # --- helpers ---

    def _answered(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _waiting(self) -> bool:
        """Not being answered: idle, or its request not whole yet."""
        if self.transport.is_closing():
            return False
        return (
            self._lingering
            or self._answered()
            or (self.conn.their_state not in _WHOLE and not self.cycle.response_started)
        )

    def _settle_eof(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if self.conn.their_state in _WHOLE or cycle.response_started:
                return  # its answer is on the way; on_response_complete comes back here
            self._refuse(400, "the connection was closed before the request's body arrived")
        elif self.conn.their_state not in (h11.IDLE, h11.DONE) or not self.conn.trailing_data[0]:
            self.transport.close()  # nothing (more) asked, or answered before its body came
        else:
            self._refuse(400, "the connection was closed in the middle of a request")

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.settings.request_timeout_s, self._expired)

    def _disarm(self) -> None:
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if not self._waiting():
            return
        if not self._received or (self.cycle is not None and self.cycle.response_complete):
            self.transport.close()  # idle, or answered while its body never came: no one waits
        else:
            limit = self.settings.request_timeout_s
            self._refuse(408, f"the request did not arrive whole within {limit:g} s")

    def _make_room(self) -> None:
        waiting = [c for c in self.connections if isinstance(c, _BoundedH11) and c._waiting()]
        others = [c for c in waiting if c is not self]
        if others:
            # Lingering ones first: they were answered already.
            oldest = min(others, key=lambda c: (not c._lingering, c._opened))
            if oldest._received and not oldest._lingering:
                oldest._refuse(503, "too many open connections; retry")
            oldest.transport.close()
            # Counted out now, not when the loop gets to connection_lost: limit_concurrency
            # reads this set for the request that may follow at once.
            self.connections.discard(oldest)

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with ``{"error": message}`` and close, whatever the app was doing
        with this request (it sees a disconnect)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        body = dumps_json({"error": message})
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\ncache-control: no-store\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("latin-1") + body)
        self._linger()

    def _linger(self) -> None:
        """Close our side after an error answer, but read and drop what the client still sends
        for a while: closing with unread data makes the kernel send a reset, which can destroy
        the answer before the client has read it (a client still sending a large head)."""
        self._disarm()
        if self._lingering or self._eof or not self.transport.can_write_eof():
            self.transport.close()
            return
        self._lingering = True
        self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)


class _CurrentApp:
    """The app being served; swapped whole when a monitor comes or goes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class ApiServer:
    """Serves ``factory(monitor)`` (monitor None until :meth:`attach_monitor`) on ``address``.
    Raises ConfigError if the address cannot be bound or the TLS files cannot be read."""

    def __init__(
        self,
        factory: Callable[[Monitor | None], ASGIApp],
        address: tuple[str, int],
        settings: HttpSettings = HttpSettings(),
    ) -> None:
        self._factory = factory
        self._app = _CurrentApp(factory(None))
        self.settings = settings
        protocol = type("CollectorHTTP", (_BoundedH11,), {"settings": settings})
        self._config = uvicorn.Config(
            self._app,
            interface="asgi3",
            http=protocol,
            loop="asyncio",
            lifespan="off",
            log_config=None,
            log_level="error",  # bad requests are the client's business, not the log's
            access_log=False,
            proxy_headers=False,
            server_header=False,
            headers=[("server", "edgeship-collector")],
            limit_concurrency=settings.max_connections + 1,
            timeout_keep_alive=max(1, round(settings.request_timeout_s)),
            timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
            h11_max_incomplete_event_size=settings.max_header_bytes,
            ssl_certfile=settings.tls_cert_file,
            ssl_keyfile=settings.tls_key_file,
        )
        try:
            self._config.load()  # reads the TLS files: a bad one fails here, not on a thread
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"http: cannot use the TLS certificate or key: {exc}") from exc
        self._sock = _bind(address)
        self.server_address: tuple[str, int] = self._sock.getsockname()[:2]
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @classmethod
    def for_collector(
        cls,
        collector: CollectorView,
        address: tuple[str, int],
        *,
        api_token: str | None = None,
        api_read_token: str | None = None,
        settings: HttpSettings = HttpSettings(),
    ) -> ApiServer:
        """The API of ``collector`` (and of the monitor attached later) on ``address``."""
        from collector.app import create_app

        def factory(monitor: Monitor | None) -> ASGIApp:
            return create_app(
                collector,
                monitor=monitor,
                api_token=api_token,
                api_read_token=api_read_token,
                max_header_bytes=settings.max_header_bytes,
            )

        return cls(factory, address, settings)

    @property
    def scheme(self) -> str:
        return "https" if self.settings.tls_cert_file else "http"

    @property
    def app(self) -> ASGIApp:
        """The app served now (its routes are what the OpenAPI document must list)."""
        return self._app.app

    def attach_monitor(self, monitor: Monitor | None) -> None:
        """Serve the app made with ``monitor`` from the next request on (None: without)."""
        self._app.app = self._factory(monitor)

    def start(self, timeout_s: float = 30.0) -> ApiServer:
        """Serve on a thread; returns once uvicorn listens. Raises ConfigError if it fails."""
        self._thread = threading.Thread(target=self._run, name="edgeship-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the HTTP API did not start: {self._failure or 'timed out'}")
            time.sleep(0.01)
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # start() reports it
            self._failure = exc
            log.exception("http: the server stopped")

    async def _serve(self) -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = self.settings.workers
        await self._server.serve(sockets=[self._sock])

    def stop(self) -> None:
        """Stop accepting, let the requests in progress finish (``shutdown_timeout_s``), close."""
        self._server.should_exit = True
        thread = self._thread
        if thread is not None:
            thread.join(self.settings.shutdown_timeout_s + 5.0)
            if thread.is_alive():
                self._server.force_exit = True
                thread.join(5.0)
        self._sock.close()


def _bind(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve the collector API on {host}:{port}: {exc.strerror or exc}"
        ) from exc
