"""A TCP proxy for network-partition tests: clients connect to :attr:`TcpProxy.port`, each
connection is relayed to ``upstream``, and a test switches the link between three modes:

* ``pass``: bytes flow both ways.
* ``cut``: every open connection is reset (``SO_LINGER`` 0, so the peers see RST, not FIN),
  and new connections are accepted and reset at once, as a router that answers with RST.
* ``blackhole``: open and new connections stay open but nothing is forwarded and nothing is
  answered, as a cable pulled or a Wi-Fi link gone silent: only the peers' own timeouts
  (MQTT keep-alive, the connect timeout) can notice.

A black-holed connection stays dead after :meth:`heal` (its bytes are gone, so resuming it
would corrupt the stream); connections made after the heal pass.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from typing import Literal

Mode = Literal["pass", "cut", "blackhole"]


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.dead = False  # black-holed once: never forwards again

    def peer(self, sock: socket.socket) -> socket.socket:
        return self.upstream if sock is self.client else self.client


class TcpProxy:
    """A threaded proxy from ``127.0.0.1:<port>`` to ``(host, upstream_port)``."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._links: dict[socket.socket, _Link] = {}
        self._lock = threading.Lock()
        self._mode: Mode = "pass"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self.accepted = 0
        self.resets = 0
        self.swallowed_bytes = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def cut(self) -> None:
        """Reset every connection; reset new ones until :meth:`heal`."""
        with self._lock:
            self._mode = "cut"
            for link in {id(x): x for x in self._links.values()}.values():
                self._drop(link, reset=True)

    def blackhole(self) -> None:
        """Forward nothing from now on; answer nothing; close nothing."""
        with self._lock:
            self._mode = "blackhole"
            for link in self._links.values():
                link.dead = True

    def heal(self) -> None:
        with self._lock:
            self._mode = "pass"

    def open_links(self) -> int:
        with self._lock:
            return len({id(x) for x in self._links.values()})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for link in {id(x): x for x in self._links.values()}.values():
                self._drop(link, reset=True)
        self._sel.close()
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the loop (one thread) --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with self._lock:
                    if sock is self._listener:
                        self._accept()
                    else:
                        self._relay(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        self.accepted += 1
        if self._mode == "cut":
            self.resets += 1
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=2.0)
        except OSError:
            _reset(client)  # the upstream is down: the client sees what it would see
            return
        link = _Link(client, upstream)
        link.dead = self._mode == "blackhole"
        for s in (client, upstream):
            s.setblocking(False)
            self._links[s] = link
            self._sel.register(s, selectors.EVENT_READ, None)

    def _relay(self, sock: socket.socket) -> None:
        link = self._links.get(sock)
        if link is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(link, reset=False)
            return
        if link.dead or self._mode != "pass":
            link.dead = True
            self.swallowed_bytes += len(data)
            return
        try:
            out = link.peer(sock)
            out.setblocking(True)
            out.settimeout(2.0)
            out.sendall(data)
            out.setblocking(False)
        except OSError:
            self._drop(link, reset=True)

    def _drop(self, link: _Link, *, reset: bool) -> None:
        for s in (link.client, link.upstream):
            if self._links.pop(s, None) is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(s)
            if reset:
                self.resets += 1
                _reset(s)
            else:
                with contextlib.suppress(OSError):
                    s.close()


def wait_closed(proxy: TcpProxy, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proxy.open_links() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proxy.open_links() == 0
