"""Command intake: messages on the device's ``cmd`` topic, decoded and handed to a worker.

Decoding runs on the network thread; the agent's handler runs on a worker thread, one command
at a time, so a slow command cannot stall keep-alives. A malformed or retained command is
counted and logged, never run; a flood beyond the queue is dropped, counted and handed to the
overflow handler to be answered. Nothing here may drop the connection: the broker would deliver
the same command again after the reconnect, forever.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable

import paho.mqtt.client as paho

from device_agent.contracts.messages import Command, decode
from device_agent.errors import ProtocolError
from device_agent.mqtt.stats import LinkStats

__all__ = ["COMMAND_QUEUE", "CommandIntake"]

# One logger for the whole link, as before it was split into modules.
log = logging.getLogger("device_agent.mqtt")

# Commands waiting for the worker; a flood beyond this is dropped and counted.
COMMAND_QUEUE = 256


class CommandIntake:
    """Commands for ``topic``, from the network thread (:meth:`received`) to ``handler`` (on
    the thread that runs :meth:`serve`). ``overflow`` answers a command the queue had no room
    for; it runs on the network thread and must not block."""

    def __init__(
        self,
        topic: str,
        handler: Callable[[Command], None],
        overflow: Callable[[Command], None] | None,
        stats: LinkStats,
    ) -> None:
        self.topic = topic
        self._handler = handler
        self._overflow = overflow
        self._stats = stats
        self._queue: queue.Queue[Command | None] = queue.Queue(maxsize=COMMAND_QUEUE)

    def received(self, message: paho.MQTTMessage) -> None:
        """A message from the broker (network thread): queue it if it is a command to run."""
        if message.topic != self.topic:
            log.debug("mqtt: ignored a message on %s", message.topic)
            return
        if message.retain:
            # A retained command would run again on every reconnect; the contract forbids it.
            self._stats.count("invalid_commands")
            log.warning("mqtt: ignored a retained command on %s", message.topic)
            return
        try:
            msg = decode(message.topic, message.payload)
        except ProtocolError as exc:
            self._stats.count("invalid_commands")
            log.warning("mqtt: ignored a malformed command (%s): %s", exc.field, exc)
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # the decoder's bug must not drop the connection
            self._stats.count("invalid_commands")
            log.exception("mqtt: ignored a command that failed to decode: %r", exc)
            return
        if not isinstance(msg, Command):  # decode() checks the kind against the topic
            self._stats.count("invalid_commands")
            log.warning("mqtt: ignored a %s message on the command topic", type(msg).__name__)
            return
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            self._overflowed(msg)
            return
        self._stats.count("commands")

    def _overflowed(self, msg: Command) -> None:
        self._stats.count("dropped_commands")
        log.error(
            "mqtt: command %s dropped: %d commands are already waiting", msg.id, COMMAND_QUEUE
        )
        with self._queue.mutex:  # a repeat of a waiting id: that one's reply answers it
            waiting = any(c is not None and c.id == msg.id for c in self._queue.queue)
        if self._overflow is not None and not waiting:
            try:
                self._overflow(msg)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # must not drop the connection either (see above)
                self._stats.count("command_errors")
                log.exception("mqtt: the overflow handler of command %s failed", msg.id)

    def serve(self) -> None:
        """The worker's loop: run queued commands until :meth:`stop`."""
        while True:
            cmd = self._queue.get()
            if cmd is None:
                return
            try:
                self._handler(cmd)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # the agent's handler: count and log, keep serving commands
                self._stats.count("command_errors")
                log.exception("mqtt: the handler of command %s (%s) failed", cmd.id, cmd.action)

    def stop(self, timeout_s: float) -> bool:
        """Ask the worker to stop after the queued commands; False when the queue stayed full
        for ``timeout_s`` (a stuck handler)."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return False
        return True
