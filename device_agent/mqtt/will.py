"""The Last Will's sequence number: reserved once per accepted connection, sent at least once.

See "Will sequence numbers" in :mod:`device_agent.mqtt`: the prepared will (topic and payload)
is kept in ``<spool>.will`` (fsynced), put into the spool when a connection that registered it
ends, and recovered from the file after a crash. Used on the network thread only (and by
``start()`` before that thread runs).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from device_agent.contracts.messages import QOS, RETAIN
from device_agent.errors import EdgeshipError
from device_agent.mqtt.stats import LinkStats
from device_agent.spool import Spool

__all__ = ["PreparedWill", "WillKeeper"]

# One logger for the whole link, as before it was split into modules.
log = logging.getLogger("device_agent.mqtt")


@dataclass
class PreparedWill:
    seq: int
    topic: str
    payload: bytes | None  # None while the will builder failed; the number stays reserved


class WillKeeper:
    """The will for the next connection, and its copy in the spool once a connection ends.

    ``build(seq)`` is the agent's ``offline`` status builder.
    """

    def __init__(
        self, spool: Spool, status_topic: str, build: Callable[[int], bytes], stats: LinkStats
    ) -> None:
        self._spool = spool
        self._topic = status_topic
        self._build = build
        self._stats = stats
        self._will: PreparedWill | None = None
        self._file = Path(f"{spool.path}.will")

    def prepare(self) -> PreparedWill | None:
        """The will for the next connection: the pending one, or a newly numbered one."""
        will = self._will
        if will is None:
            seq = self._spool.next_seq()
            will = self._will = PreparedWill(seq, self._topic, None)
        if will.payload is None:
            try:
                payload = bytes(self._build(will.seq))
            except Exception:  # the agent's builder: connect without a will, retry next time
                self._stats.count("errors")
                log.exception("mqtt: building the offline status (seq %d) failed", will.seq)
                return will
            will.payload = payload
            self._write_file(will, payload)
        return will

    def retire(self) -> None:
        """Put the prepared will into the spool (sent like any message) and forget it."""
        will = self._will
        if will is None:
            return
        if will.payload is None:
            try:
                will.payload = bytes(self._build(will.seq))
            except Exception:
                self._stats.count("errors")
                log.exception("mqtt: building the offline status (seq %d) failed", will.seq)
                self._will = None
                return
        self._spool.put(will.topic, will.payload, qos=QOS["status"], retain=RETAIN["status"])
        self._will = None
        self._remove_file()

    def retire_logged(self, when: str = "") -> None:
        """:meth:`retire`, with a spool failure counted and logged instead of raised."""
        try:
            self.retire()
        except EdgeshipError as exc:
            self._stats.count("errors")
            log.error("mqtt: could not spool the offline status%s: %s", when, exc)

    def recover_file(self) -> None:
        """A will left by a process that did not stop cleanly: send it (see module docstring)."""
        try:
            text = self._file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            self._stats.count("errors")
            log.error("mqtt: cannot read %s: %s", self._file, exc)
            return
        try:
            data = json.loads(text)
            will_topic = str(data["topic"])
            payload = base64.b64decode(data["payload"], validate=True)
        except (ValueError, KeyError, TypeError) as exc:
            self._stats.count("errors")
            log.error("mqtt: %s is unreadable (%s); removing it", self._file, exc)
        else:
            self._spool.put(will_topic, payload, qos=QOS["status"], retain=RETAIN["status"])
            log.info(
                "mqtt: spooled the offline status (seq %s) of the previous run", data.get("seq")
            )
        self._remove_file()

    def _write_file(self, will: PreparedWill, payload: bytes) -> None:
        data = json.dumps(
            {"seq": will.seq, "topic": will.topic, "payload": base64.b64encode(payload).decode()}
        )
        tmp = self._file.with_name(self._file.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._file)
            _fsync_dir(self._file.parent)
        except OSError as exc:
            self._stats.count("errors")
            log.error(
                "mqtt: cannot write %s (%s); a crash now would leave a seq gap", self._file, exc
            )

    def _remove_file(self) -> None:
        try:
            self._file.unlink(missing_ok=True)
        except OSError as exc:
            self._stats.count("errors")
            log.error("mqtt: cannot remove %s: %s", self._file, exc)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        log.debug("mqtt: cannot open %s to fsync it: %s", path, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.debug("mqtt: fsync of %s failed: %s", path, exc)
    finally:
        os.close(fd)
