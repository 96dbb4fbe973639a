"""Requests as the bounded server hands them to handlers, and the handlers' base class.

:class:`~device_agent.httpserver.BoundedHTTPServer` reads a whole request (head and body) on
its selector thread, checks it against its limits, and only then gives it to a worker as a
:class:`Request`, run by a :class:`JSONRequestHandler` subclass. Everything the server answers
by itself is :func:`error_response`'s JSON, ``{"error": "..."}``, with ``Connection: close``.
Standard library only.
"""

from __future__ import annotations

import email.message
import io
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from device_agent.httpjson import dumps_json

if TYPE_CHECKING:
    from device_agent.httpserver import BoundedHTTPServer

__all__ = ["JSONRequestHandler", "Request", "SocketWriter", "error_response"]

# The server's logger: a handler's lines belong with the server's.
log = logging.getLogger("device_agent.httpserver")


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> bytes:
    phrase = HTTPStatus(status).phrase
    body = dumps_json({"error": message})
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Request:
    method: str
    target: str
    version: str
    line: str
    headers: email.message.Message
    body: bytes
    close: bool
    reserved: int = 0  # bytes of max_buffered_bytes this request holds until a worker takes it


class SocketWriter(io.BufferedIOBase):
    """``wfile`` for a handler: writes go straight to the socket (its timeout bounds them)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._sock.sendall(view)
        self.written += view.nbytes
        return view.nbytes


class JSONRequestHandler(BaseHTTPRequestHandler):
    """Base of the servers' handlers: one complete request, already read and checked.

    ``rfile`` holds exactly the body; ``headers``, ``command``, ``path`` are set as
    :class:`~http.server.BaseHTTPRequestHandler` sets them. Subclasses answer with
    :meth:`send_json` / :meth:`send_bytes`.
    """

    protocol_version = "HTTP/1.1"
    server_version = "edgeship"

    def __init__(
        self,
        request: Request,
        sock: socket.socket,
        client_address: Any,
        server: BoundedHTTPServer,
    ) -> None:
        # Deliberately not BaseRequestHandler.__init__: that reads the request from the socket.
        self.server = server  # type: ignore[assignment]
        self.request = sock
        self.connection = sock
        self.client_address = client_address
        self.command = request.method
        self.path = request.target
        self.request_version = request.version
        self.requestline = request.line
        self.raw_requestline = request.line.encode("latin-1")
        self.headers = request.headers
        self.close_connection = request.close
        self.body = request.body  # the whole body (empty for none); rfile reads the same
        self.rfile = io.BytesIO(request.body)
        self.writer = SocketWriter(sock)
        self.wfile = self.writer

    def run(self) -> None:
        handler = getattr(self, "do_" + self.command, None)
        if handler is None:
            allowed = sorted(n[3:] for n in dir(self) if n.startswith("do_"))
            self.close_connection = True
            self.send_json(
                HTTPStatus.METHOD_NOT_ALLOWED,
                {"error": f"{self.command[:20]!r} is not supported here; use {', '.join(allowed)}"},
                {"Allow": ", ".join(allowed)},
            )
        else:
            handler()

    def answer_failure(self) -> None:
        """After the handler raised: answer 500 if it wrote nothing yet (else the answer is
        already cut short), dropping any headers it had queued."""
        if self.writer.written == 0:
            self.close_connection = True
            self._headers_buffer: list[bytes] = []
            self.send_json(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": "the server failed on this request; see its log"},
            )

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)

    def send_bytes(
        self,
        status: int,
        content_type: str,
        data: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_json(
        self,
        status: int,
        body: Any,
        headers: Mapping[str, str] | None = None,
        default: Callable[[Any], Any] | None = None,
    ) -> None:
        self.send_bytes(status, "application/json", dumps_json(body, default), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        self.send_json(code, {"error": message or HTTPStatus(code).phrase})
