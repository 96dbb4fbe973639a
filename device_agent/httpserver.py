"""One small HTTP/1.1 server with hard limits, for the agent's endpoint and the collector's API.

Standard library only (the agent imports it). What a client cannot do to it:

* **Hold a thread.** One thread (the one that calls :meth:`BoundedHTTPServer.serve_forever`)
  accepts connections and reads requests with a selector; a request goes to one of
  ``workers`` handler threads only once its head and its whole body have arrived. Idle and
  half-sent connections cost a socket and a buffer, never a thread.
* **Keep a connection open.** A connection must deliver a complete request within
  ``request_timeout_s`` of being accepted (or of its previous answer, for keep-alive); else it
  is answered 408 (when it had sent part of one) and closed. A reader that does not take its
  answer within ``send_timeout_s`` is dropped.
* **Exhaust sockets.** At most ``max_connections`` are open; a new one closes the oldest that
  has no request in a worker (an idle keep-alive one first, then the one waiting longest for
  its request), or is answered 503 when every open connection has a request in progress. When
  ``accept`` itself fails (no file descriptors left), accepting pauses briefly instead of
  spinning.
* **Send a large body.** ``Content-Length`` is required for POST, PUT and PATCH (411;
  chunked bodies are refused, 411) and is checked against the route's cap (``body_limit``)
  before any of the body is read (413, then the connection is closed); the bodies of all
  connections together may not pass ``max_buffered_bytes`` (503, retry). A head (request line
  and headers) larger than ``max_head_bytes`` is 431.
* **Send JSON that costs more than its size.** :func:`parse_json` (:mod:`device_agent.httpjson`,
  re-exported here) refuses deep nesting, non-finite numbers, duplicate keys, NUL, lone
  surrogates and non-UTF-8 with a :class:`RequestError` that says why.

Everything the server answers by itself is JSON, ``{"error": "..."}``, with ``Connection:
close``. Handlers subclass :class:`JSONRequestHandler` (:mod:`device_agent.httphandler`) and
implement ``do_GET`` / ``do_POST`` ...; a method without one is 405.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import io
import ipaddress
import logging
import math
import queue
import re
import selectors
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from device_agent.errors import ConfigError
from device_agent.httphandler import JSONRequestHandler, Request, error_response
from device_agent.httpjson import RequestError, dumps_json, json_too_deep, parse_json

__all__ = [
    "BoundedHTTPServer",
    "HTTPLimits",
    "JSONRequestHandler",
    "RequestError",
    "dumps_json",
    "is_loopback",
    "json_too_deep",
    "parse_json",
]

log = logging.getLogger(__name__)

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_VERSION = re.compile(r"HTTP/1\.[01]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINGER_S = 2.0  # after an error answer: read and drop what the client still sends, this long
_ACCEPT_PAUSE_S = 0.1
_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_KEEP, _LINGER, _CLOSE = "keep", "linger", "close"  # what a worker does with a connection


@dataclass(frozen=True)
class HTTPLimits:
    """What one server allows. Each limit says what happens past it (see the module doc)."""

    workers: int = 4  # threads that run handlers
    max_connections: int = 64  # open connections; past it, the oldest waiting one is closed
    request_timeout_s: float = 10.0  # to send a whole request (or, kept alive, the next one)
    send_timeout_s: float = 10.0  # for the client to take an answer
    max_head_bytes: int = 32 * 1024  # request line and headers
    max_json_depth: int = 32  # nesting of arrays and objects in a JSON body
    # Bodies being received or waiting for a worker, all connections together (each route caps
    # its own; bodies in the workers are bounded by their number): past it 503, retry shortly.
    max_buffered_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        for name in ("workers", "max_connections", "max_head_bytes", "max_json_depth",
                     "max_buffered_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"HTTP limits: {name} must be at least 1")
        for name in ("request_timeout_s", "send_timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"HTTP limits: {name} must be a positive number of seconds")
        if self.max_connections < self.workers:
            raise ConfigError("HTTP limits: max_connections must be at least workers")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the server -------------------------------------------------------------------------------


class _Conn:
    __slots__ = ("addr", "buf", "deadline", "head", "scanned", "sock")

    def __init__(self, sock: socket.socket, addr: Any, deadline: float) -> None:
        self.sock = sock
        self.addr = addr
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf already searched for the end of the head
        self.head: tuple[int, int, Request] | None = None  # (head bytes, body bytes, request)
        self.deadline = deadline


class BoundedHTTPServer:
    """A threaded HTTP/1.1 server with the limits in :class:`HTTPLimits`.

    ``handler`` is a :class:`JSONRequestHandler` subclass; ``body_limit(method, path)`` is the
    largest body a route takes, asked before any of it is read. The interface is
    ``socketserver``'s: ``serve_forever()`` on a thread, ``shutdown()``, ``server_close()``,
    ``server_address``. Raises OSError when ``address`` cannot be bound.
    """

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[JSONRequestHandler],
        *,
        limits: HTTPLimits | None = None,
        body_limit: Callable[[str, str], int] | None = None,
        name: str = "edgeship-http",
    ) -> None:
        self.limits = limits or HTTPLimits()
        self.RequestHandlerClass = handler
        self._body_limit = body_limit or (lambda method, path: 64 * 1024)
        host, port = address
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, sockaddr = infos[0]
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(sockaddr)
            self.socket.listen(128)
            self.socket.setblocking(False)
        except OSError:
            self.socket.close()
            raise
        self.server_address: tuple[Any, ...] = self.socket.getsockname()
        self._name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._waiting: OrderedDict[int, _Conn] = OrderedDict()  # by deadline (one timeout)
        self._lingering: OrderedDict[int, _Conn] = OrderedDict()
        self._busy: dict[int, _Conn] = {}
        self._returned: deque[tuple[_Conn, str]] = deque()  # from workers: keep or linger
        self._jobs: queue.SimpleQueue[tuple[_Conn, Request] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._closed = False
        self._accept_paused_until = 0.0
        self._accept_errors = 0
        self._buffered = 0  # of limits.max_buffered_bytes, reserved by Content-Length
        self._buffered_lock = threading.Lock()  # the selector thread reserves, workers release
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}-worker-{i}", daemon=True)
            for i in range(self.limits.workers)
        ]
        for worker in self._workers:
            worker.start()

    # --- public -------------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return len(self._waiting) + len(self._lingering) + len(self._busy)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and read requests until :meth:`shutdown`."""
        self._stopped.clear()
        try:
            self._selector.register(self.socket, selectors.EVENT_READ, None)
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
            while not self._stop.is_set():
                self._loop_once(poll_interval)
        finally:
            for key in list(self._selector.get_map().values()):
                self._selector.unregister(key.fileobj)
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` and wait for it to return."""
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket, every connection, and stop the workers."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        self._stopped.wait(10)
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(self.limits.send_timeout_s + 1)
        for conn in [*self._waiting.values(), *self._lingering.values(), *self._busy.values()]:
            _close(conn.sock)
        self._waiting.clear()
        self._lingering.clear()
        self._busy.clear()
        self.socket.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- the selector loop --------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    def _loop_once(self, poll_interval: float) -> None:
        now = time.monotonic()
        timeout = poll_interval
        for table in (self._waiting, self._lingering):
            if table:
                timeout = min(timeout, next(iter(table.values())).deadline - now)
        if self._accept_paused_until:
            timeout = min(timeout, self._accept_paused_until - now)
        events = self._selector.select(max(timeout, 0.0))
        for key, _ in events:
            if key.fileobj is self.socket:
                self._accept()
            elif key.fileobj is self._wake_r:
                self._drain_wake()
            else:
                conn: _Conn = key.data
                try:
                    if conn.sock.fileno() in self._lingering:
                        self._linger_read(conn)
                    else:
                        self._read(conn)
                except Exception:  # a bug here must not stop the server: drop the connection
                    log.exception("%s: reading a request failed", self._name)
                    self._drop(conn)
        self._expire(time.monotonic())

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        while self._returned:
            conn, what = self._returned.popleft()
            self._busy.pop(conn.sock.fileno(), None)
            if self._stop.is_set():
                _close(conn.sock)
                continue
            conn.sock.setblocking(False)
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            if what == _LINGER:
                self._linger(conn)
            else:
                self._wait(conn)
                self._advance(conn)  # a pipelined request may be in the buffer already

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS:
                    # No descriptor for a new connection: the listening socket stays readable,
                    # so pause accepting instead of spinning on it.
                    self._accept_errors += 1
                    if self._accept_errors in (1, 10, 100) or self._accept_errors % 1000 == 0:
                        log.warning("%s: cannot accept connections: %s (%d times)",
                                    self._name, exc.strerror, self._accept_errors)  # fmt: skip
                    self._pause_accepting()
                return
            sock.setblocking(False)
            if self.open_connections >= self.limits.max_connections and not self._evict():
                _send_now(sock, error_response(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    f"too busy: {self.limits.max_connections} connections have requests in "
                    "progress; retry shortly",
                    {"Retry-After": "1"},
                ))  # fmt: skip
                _close(sock)
                continue
            conn = _Conn(sock, addr, 0.0)
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._wait(conn)

    def _pause_accepting(self) -> None:
        self._selector.unregister(self.socket)
        self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE_S

    def _evict(self) -> bool:
        """Close the connection that has waited longest without a request in a worker, to make
        room for a new one; False when every open connection is busy."""
        for table in (self._lingering, self._waiting):
            if table:
                _fd, conn = table.popitem(last=False)
                self._forget_head(conn)
                self._selector.unregister(conn.sock)
                if table is self._waiting and conn.buf:
                    _send_now(conn.sock, error_response(
                        HTTPStatus.SERVICE_UNAVAILABLE,
                        "too many open connections: this one was closed before its request "
                        "was complete; retry",
                    ))  # fmt: skip
                _close(conn.sock)
                return True
        return False

    def _wait(self, conn: _Conn) -> None:
        """(Re)start ``conn``'s wait for a complete request."""
        conn.deadline = time.monotonic() + self.limits.request_timeout_s
        fd = conn.sock.fileno()
        self._waiting.pop(fd, None)
        self._waiting[fd] = conn

    def _expire(self, now: float) -> None:
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self.socket, selectors.EVENT_READ, None)
        while self._waiting:
            conn = next(iter(self._waiting.values()))
            if conn.deadline > now:
                break
            if conn.buf.strip():
                self._reject(conn, HTTPStatus.REQUEST_TIMEOUT,
                             f"the request was not complete within "
                             f"{self.limits.request_timeout_s:g} s")  # fmt: skip
            else:
                self._drop(conn)
        while self._lingering:
            conn = next(iter(self._lingering.values()))
            if conn.deadline > now:
                break
            self._drop(conn)

    def _forget_head(self, conn: _Conn) -> None:
        """Release what ``conn``'s parsed head reserved (its request will not be handled)."""
        if conn.head is not None:
            self._release(conn.head[1])
            conn.head = None

    def _release(self, length: int) -> None:
        if length:
            with self._buffered_lock:
                self._buffered -= length

    def _drop(self, conn: _Conn) -> None:
        self._forget_head(conn)
        fd = conn.sock.fileno()
        self._waiting.pop(fd, None)
        self._lingering.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        _close(conn.sock)

    def _reject(
        self, conn: _Conn, status: int, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer ``status`` and close, after a short linger that reads and drops what the
        client is still sending (closing with unread data would reset the connection and the
        client could lose the answer)."""
        _send_now(conn.sock, error_response(status, message, headers))
        self._waiting.pop(conn.sock.fileno(), None)
        self._linger(conn)

    def _linger(self, conn: _Conn) -> None:
        """Close ``conn`` gracefully: stop sending, then read and drop what the client still
        sends until it closes or _LINGER_S pass."""
        fd = conn.sock.fileno()
        conn.buf.clear()
        self._forget_head(conn)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn)
            return
        conn.deadline = time.monotonic() + _LINGER_S
        self._lingering[fd] = conn

    def _linger_read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if conn.buf.strip():  # the client stopped sending (or left) halfway: say so
                _send_now(conn.sock, error_response(
                    HTTPStatus.BAD_REQUEST,
                    "the connection ended before the request was complete (head, or as many "
                    "body bytes as Content-Length said)",
                ))  # fmt: skip
            self._drop(conn)
            return
        conn.buf += data
        self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """Parse what ``conn`` has buffered; dispatch a complete request to a worker."""
        limits = self.limits
        if conn.head is None:
            start = len(conn.buf) - len(conn.buf.lstrip(b"\r\n"))
            if start:  # blank lines before a request are allowed (RFC 9112 2.2)
                del conn.buf[:start]
                conn.scanned = 0
            match = _HEAD_END.search(conn.buf, max(conn.scanned - 3, 0))
            if match is None:
                conn.scanned = len(conn.buf)
                if len(conn.buf) > limits.max_head_bytes:
                    self._reject(conn, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                 f"the request line and headers exceed "
                                 f"{limits.max_head_bytes} bytes")  # fmt: skip
                return
            if match.end() > limits.max_head_bytes:
                self._reject(conn, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                             f"the request line and headers exceed {limits.max_head_bytes} "
                             "bytes")  # fmt: skip
                return
            try:
                request, length = self._parse_head(bytes(conn.buf[: match.start()]))
            except RequestError as exc:
                self._reject(conn, exc.status, str(exc))
                return
            if length:
                with self._buffered_lock:
                    busy = self._buffered + length > limits.max_buffered_bytes
                    if not busy:
                        self._buffered += length
                if busy:
                    self._reject(conn, HTTPStatus.SERVICE_UNAVAILABLE,
                                 "too busy: other requests' bodies fill this server's "
                                 f"{limits.max_buffered_bytes} bytes; retry shortly",
                                 {"Retry-After": "1"})  # fmt: skip
                    return
            head_end = match.end()
            conn.head = (head_end, length, request)
            if (
                length
                and len(conn.buf) < head_end + length
                and request.version == "HTTP/1.1"
                and request.headers.get("Expect", "").lower() == "100-continue"
            ):
                _send_now(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
        head_end, length, request = conn.head
        total = head_end + length
        if len(conn.buf) < total:
            return
        request.body = bytes(conn.buf[head_end:total])
        request.reserved = length  # released when a worker takes the request
        del conn.buf[:total]
        conn.scanned = 0
        conn.head = None
        fd = conn.sock.fileno()
        self._waiting.pop(fd, None)
        self._selector.unregister(conn.sock)
        self._busy[fd] = conn
        self._jobs.put((conn, request))

    def _parse_head(self, raw: bytes) -> tuple[Request, int]:
        first, _, rest = raw.partition(b"\n")
        line = first.rstrip(b"\r").decode("latin-1")
        words = line.split()
        if len(words) != 3 or not _VERSION.fullmatch(words[2]):
            raise RequestError(f"bad request line {line[:80]!r}: expected 'METHOD /path HTTP/1.1'")
        method, target, version = words
        if not method.isascii() or not method.isalpha() or not target.isprintable():
            raise RequestError(f"bad request line {line[:80]!r}")
        try:
            headers = http.client.parse_headers(io.BytesIO(rest + b"\r\n\r\n"))
        except http.client.HTTPException as exc:
            raise RequestError(
                f"bad headers: {exc}", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            ) from None
        if headers.get("Transfer-Encoding") is not None:
            raise RequestError(
                "chunked and other transfer encodings are not supported: send Content-Length",
                HTTPStatus.LENGTH_REQUIRED,
            )
        values = {v.strip() for v in headers.get_all("Content-Length") or ()}
        if len(values) > 1:
            raise RequestError(f"conflicting Content-Length headers {sorted(values)[:4]}")
        length = 0
        if values:
            raw_length = values.pop()
            if not raw_length.isascii() or not raw_length.isdigit() or len(raw_length) > 18:
                raise RequestError(f"Content-Length {raw_length[:40]!r} is not a byte count")
            length = int(raw_length)
        elif method in _BODY_METHODS:
            raise RequestError(
                f"{method} needs a Content-Length header", HTTPStatus.LENGTH_REQUIRED
            )
        cap = self._body_limit(method, target.partition("?")[0])
        if length > cap:
            raise RequestError(
                f"a body of {length} bytes is larger than this route takes ({cap} bytes)",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        connection = headers.get("Connection", "").lower()
        close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
        return Request(method, target, version, line, headers, b"", close), length

    # --- workers ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, request = job
            # Bodies being handled are bounded by the workers; the budget is for those waiting.
            self._release(request.reserved)
            what = _CLOSE
            try:
                what = self._handle(conn, request)
            except Exception:  # a bug in a handler: the server goes on
                log.exception("%s: %s %s failed", self._name, request.method, request.target[:200])
                what = _LINGER
            if what != _CLOSE and not self._stop.is_set():
                self._returned.append((conn, what))
                self._wake()
            else:
                self._busy.pop(conn.sock.fileno(), None)
                _close(conn.sock)

    def _handle(self, conn: _Conn, request: Request) -> str:
        """Run the handler; _KEEP the connection for the next request, _LINGER (answered,
        close gracefully) or _CLOSE (the client is gone)."""
        sock = conn.sock
        sock.settimeout(self.limits.send_timeout_s)
        handler = self.RequestHandlerClass(request, sock, conn.addr, self)
        try:
            handler.run()
        except OSError:  # the client went away or did not read its answer in time
            return _CLOSE
        except Exception:
            handler.answer_failure()
            raise
        if handler.writer.written == 0:  # a handler that answered nothing: say so, close
            log.error("%s: %s %s got no answer", self._name, request.method, request.target[:200])
            return _LINGER
        return _LINGER if handler.close_connection else _KEEP


def _send_now(sock: socket.socket, data: bytes) -> None:
    """Best effort on a non-blocking socket: small answers fit an empty send buffer."""
    with contextlib.suppress(OSError):
        sock.send(data)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
