"""An embedded MQTT broker for demos and laptops: amqtt (pure Python, MQTT 3.1.1) in a child
process on 127.0.0.1, so ``edgeship demo`` needs no Mosquitto installed.

The broker process gets SIGTERM when the process that started it dies, even of SIGKILL (on
Linux, when started from the main thread: :mod:`sdk.children`).

It is a real broker, but not one for a fleet: no persistence across restarts, one process,
MQTT 3.1.1 only (edgeship's clients fall back from MQTT 5 automatically). Production fleets
use Mosquitto or EMQX (see ``examples/mosquitto/``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from device_agent.errors import ConfigError

__all__ = ["EmbeddedBroker", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """Start with :meth:`start` (or ``with EmbeddedBroker() as broker``); ``broker.url`` is the
    address to give agents and collectors."""

    def __init__(
        self, port: int | None = None, *, host: str = "127.0.0.1", log_file: Path | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        try:
            import amqtt  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "the embedded broker needs amqtt: pip install 'edgeship[sdk]', or pass "
                "--broker mqtt://HOST:PORT to use your own broker"
            ) from exc
        from sdk.children import die_with_parent

        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "sdk.broker", self.host, str(self.port)],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            # A broker left behind by a killed parent would hold its port and serve no one.
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ConfigError(
                    f"the embedded MQTT broker exited at start (port {self.port} taken?)"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ConfigError(f"the embedded MQTT broker did not listen on {self.url} in time")

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _serve(host: str, port: int) -> None:
    import asyncio
    import logging

    from amqtt.broker import Broker

    logging.basicConfig(level=logging.WARNING)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        broker = Broker(config)
        await broker.start()
        try:
            await asyncio.Event().wait()
        finally:
            await broker.shutdown()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
