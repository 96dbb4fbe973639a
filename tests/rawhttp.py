"""HTTP/1.1 over a bare socket, for tests that send what urllib will not (half a request, a
wrong Content-Length, pipelined requests) and read exactly what the server wrote back."""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body as strict JSON: NaN or Infinity in it fail the test."""

        def refuse(name: str) -> Any:
            raise AssertionError(f"the server wrote {name}, which is not JSON: {self.body[:200]!r}")

        return json.loads(self.body, parse_constant=refuse)


def request(
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """One request's bytes; Content-Length is added for a body unless ``headers`` has one."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    given = {k.lower() for k in headers or {}}
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None and "content-length" not in given:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def parse_responses(data: bytes) -> tuple[list[Response], bytes]:
    """The complete responses at the start of ``data``, and what is left."""
    out = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return out, data
        head = data[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(data) < end + 4 + length:
            return out, data
        body = data[end + 4 : end + 4 + length]
        data = data[end + 4 + length :]
        if status != 100:  # an interim "100 Continue"
            out.append(Response(status, headers, body))


def exchange(
    port: int, data: bytes, *, expect: int = 1, timeout: float = 30.0, host: str = "127.0.0.1"
) -> list[Response]:
    """Send ``data`` on a new connection and read until ``expect`` responses arrived or the
    server closed the connection (then fewer come back)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        # The server may answer and close before taking everything: read its answer then.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        return read_responses(sock, expect)


def read_responses(sock: socket.socket, expect: int = 1) -> list[Response]:
    buf = b""
    responses: list[Response] = []
    while len(responses) < expect:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        buf += chunk
        done, buf = parse_responses(buf)
        responses.extend(done)
    return responses


def closed_by_server(sock: socket.socket) -> tuple[bool, bytes]:
    """(True, what it wrote last) once the server closed ``sock``; False if the socket's
    timeout passed first."""
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except ConnectionResetError:
        return True, got
    except TimeoutError:
        return False, got
