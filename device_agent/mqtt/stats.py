"""The link's counters, shared by the connection, the outbox, the will and the command intake.

They are written from the network thread, the command worker and the caller's threads, and read
as one snapshot by the agent's health and telemetry, so they sit behind one lock.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["LinkStats"]


class LinkStats:
    """Counters by name (see ``__init__``) and the last error, as text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {
            "sent": 0,  # publishes handed to the broker connection (re-sends included)
            "acked": 0,  # PUBACKs that removed a message from the spool
            "refused": 0,  # PUBACKs with an MQTT 5 failure code (the message stays spooled)
            "reconnects": 0,  # accepted connections after the first
            "connect_attempts": 0,
            "last_error": None,
            "commands": 0,
            "invalid_commands": 0,
            "dropped_commands": 0,
            "command_errors": 0,
            "errors": 0,  # failures of our own machinery (spool, callbacks, will file)
        }

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._values[key] += n

    def set_error(self, text: str) -> None:
        with self._lock:
            self._values["last_error"] = text

    @property
    def last_error(self) -> str | None:
        with self._lock:
            error: str | None = self._values["last_error"]
            return error

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)
