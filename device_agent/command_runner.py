"""Commands on the agent: each id runs at most once, and every delivery gets a reply.

:class:`CommandRunner` is the agent's side of ``cmd`` and ``cmd/reply`` (docs/protocol.md):
it queues a command for the agent's events thread, runs its handler there, keeps the replies
of the last :data:`REPLY_CACHE_IDS` ids (at most :data:`REPLY_CACHE_BYTES`) to answer a repeat
without running it again, and turns any failure of a handler into that command's
``ok: false``. What the commands do is elsewhere (the agent's handlers, the deployer's).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device_agent.contracts import messages as msg
from device_agent.contracts.text import escape
from device_agent.errors import EdgeshipError

__all__ = [
    "FATAL",
    "REPLY_CACHE_BYTES",
    "REPLY_CACHE_IDS",
    "CommandRunner",
    "describe",
    "wire_text",
]

log = logging.getLogger(__name__)

# At most once per command id (docs/protocol.md): the replies of the last REPLY_CACHE_IDS
# command ids, and at most REPLY_CACHE_BYTES of them (encoded), are kept in memory for this
# boot; a command whose id is among them gets that reply again instead of running again.
REPLY_CACHE_IDS = 1024
REPLY_CACHE_BYTES = 4 * 2**20

# What a unit of background work (a command, an event, a window) never swallows: the process
# is being stopped. Everything else, MemoryError and RecursionError included, fails that unit
# only, and the worker thread goes on with the next one.
FATAL = (KeyboardInterrupt, SystemExit)


def wire_text(text: str, limit: int = 1000) -> str:
    """``text`` made safe for any message and log line: lone surrogates, controls (NUL,
    newlines, ...) and bidi controls escaped (:func:`device_agent.contracts.text.escape`), at
    most ``limit`` characters."""
    return escape(text, limit=limit)


def describe(exc: BaseException) -> str:
    """One safe line for an exception: its message, else its type's name."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not fail the error path too
        text = ""
    return wire_text(text or type(exc).__name__)


@dataclass
class _Reply:
    """The reply to one command id: ``ok`` None while the command waits in the queue or runs
    (``started`` once it runs); ``repeats`` counts the deliveries of the same id that arrived
    meanwhile (each is answered once it is done)."""

    ok: bool | None = None
    result: Any = None
    error: str | None = None
    size: int = 0
    repeats: int = 0
    started: bool = False


class CommandRunner:
    """Runs the commands of one agent, at most once per id (see the module's docstring).

    ``handlers`` maps an action to its handler (the agent's ``command_handlers``, shared);
    ``enqueue(command)`` hands a command to the events thread, which calls :meth:`run`, and
    returns None, or why it could not (a full queue); ``errors`` is the agent's count of failed
    units of work (``commands``, ``replies``), shared. Replies go to :attr:`publisher`
    (``reply(payload)``) once the agent has one.
    """

    def __init__(
        self,
        *,
        device: str,
        boot: str,
        clock: Callable[[], float],
        handlers: dict[str, Callable[[msg.Command], Any]],
        enqueue: Callable[[msg.Command], str | None],
        errors: dict[str, int],
    ) -> None:
        self._device = device
        self._boot = boot
        self._clock = clock
        self.handlers = handlers
        self._enqueue = enqueue
        self._errors = errors
        self.publisher: Any = None
        self._replies: OrderedDict[str, _Reply] = OrderedDict()
        self._replies_bytes = 0
        self._replies_lock = threading.Lock()

    def __len__(self) -> int:
        """How many ids the reply cache knows (waiting, running or answered)."""
        return len(self._replies)

    def on_command(self, command: msg.Command) -> None:
        """Queue ``command`` for the events thread (called on the MQTT command worker). An id
        that is queued, running or answered already is not queued again (:meth:`_repeat`)."""
        key = command.id
        with self._replies_lock:
            known, again = self._repeat(key)
            if not known:
                # Known from now on: a repeat that arrives while this one waits is not queued.
                self._replies[key] = _Reply()
        if known:
            if again is not None:
                self._send_reply(key, again)
            return
        full = self._enqueue(command)
        if full is not None:
            repeats = 0
            with self._replies_lock:
                entry = self._replies.get(key)
                if entry is not None and entry.ok is None and not entry.started:
                    del self._replies[key]  # never ran: the same id may be sent again
                    repeats = entry.repeats
            for _ in range(1 + repeats):
                self._refuse_command(command, full)

    def on_overflow(self, command: msg.Command) -> None:
        """A command the MQTT layer has no room for (called on its network thread, so it must
        not block): a repeat of a known id is answered as any repeat is, others are refused."""
        with self._replies_lock:
            known, again = self._repeat(command.id)
        if again is not None:
            self._send_reply(command.id, again)
        if not known:
            self._refuse_command(command, "too many commands wait for the agent")

    def _repeat(self, key: str) -> tuple[bool, _Reply | None]:
        """Whether ``key`` is a known id (called under ``_replies_lock``), and the reply to send
        again when it is done. A repeat of one that waits or runs is counted instead: it is
        answered when that one is done."""
        entry = self._replies.get(key)
        if entry is None:
            return False, None
        self._replies.move_to_end(key)
        if entry.ok is None:
            entry.repeats += 1
            log.info("command %s arrived again before it was done; answered when done", key)
            return True, None
        log.info("command %s arrived again; sending its reply again, not running it", key)
        return True, entry

    def _refuse_command(self, command: msg.Command, why: str) -> None:
        """Answer ``command`` ``ok: false`` without running it (and without keeping the reply:
        the same id sent again later runs)."""
        log.error("command %s dropped: %s", command.id, why)
        self._send_reply(command.id, _Reply(ok=False, error=f"not run: {why}; send it again later"))

    def run(self, command: msg.Command) -> None:
        """Run one command and reply, at most once per id: a delivery of an id whose reply is
        kept (:data:`REPLY_CACHE_IDS`) gets that reply again without running anything, and one
        that arrives while the same id waits or runs is answered when it is done."""
        key = command.id
        with self._replies_lock:
            entry: _Reply | None = self._replies.get(key)
            again = None
            if entry is None:  # not queued by on_command (an id forgotten meanwhile)
                entry = self._replies[key] = _Reply()
            elif entry.started or entry.ok is not None:
                _, again = self._repeat(key)
                entry = None
            else:
                self._replies.move_to_end(key)
            if entry is not None:
                entry.started = True
        if entry is None:
            if again is not None:
                self._send_reply(key, again)
            return
        # Says when a long command (a benchmark) began, in the log and for tests that wait.
        log.info("command %s (%s) started", key, wire_text(str(command.action), 64))
        ok, result, error = self._execute(command)
        ok, result, error, size = self._checked_reply(command, ok, result, error)
        with self._replies_lock:
            entry.ok, entry.result, entry.error, entry.size = ok, result, error, size
            sends, entry.repeats = 1 + entry.repeats, 0
            if self._replies.get(key) is entry:
                self._replies_bytes += size
            self._evict_replies()
        for _ in range(sends):
            self._send_reply(key, entry)

    def _execute(self, command: msg.Command) -> tuple[bool, Any, str | None]:
        """Run ``command``'s handler: (ok, result, error). Never raises but to stop the
        process: any failure of the handler is this command's ``ok: false``."""
        action = wire_text(str(command.action), 64)
        try:
            now = self._clock()
            handler = self.handlers.get(command.action)
            if command.expires is not None and command.expires < now:
                return (
                    False,
                    None,
                    f"command expired {now - command.expires:.0f} s before it arrived",
                )
            if handler is None:
                known = sorted(self.handlers)
                return False, None, f"unknown action {action!r}; known: {known}"
            return True, handler(command), None
        except FATAL:
            raise
        except EdgeshipError as exc:
            return False, None, describe(exc)
        except MemoryError as exc:
            self._errors["commands"] += 1
            log.exception("command %s (%s) ran out of memory", command.id, action)
            return (
                False,
                None,
                f"{action}: out of memory ({describe(exc)}); the agent keeps running",
            )
        except BaseException as exc:
            self._errors["commands"] += 1
            log.exception("command %s (%s) failed unexpectedly", command.id, action)
            return (
                False,
                None,
                f"{action} failed inside the agent: {type(exc).__name__}: {describe(exc)} "
                "(a bug; the agent keeps running)",
            )

    def _reply_payload(
        self, command_id: str, seq: int, ok: bool, result: Any, error: str | None
    ) -> bytes:
        return msg.encode(
            msg.CommandReply(
                device=self._device,
                boot=self._boot,
                seq=seq,
                ts=self._clock(),
                id=command_id,
                ok=ok,
                result=result if ok else None,
                error=None if ok else (error or "failed"),
            )
        )

    def _checked_reply(
        self, command: msg.Command, ok: bool, result: Any, error: str | None
    ) -> tuple[bool, Any, str | None, int]:
        """The reply as it will be sent, and its size: as given if it encodes, else
        ``ok: false`` saying why (a result that is not JSON or too large, a bad string)."""
        if not ok:
            error = wire_text(error or "failed")
        try:
            return ok, result, error, len(self._reply_payload(command.id, 0, ok, result, error))
        except FATAL:
            raise
        except BaseException as exc:
            action = wire_text(str(command.action), 64)
            why = describe(exc)
            log.error("command %s (%s): the reply does not encode: %s", command.id, action, why)
            error = (
                f"{action} ran, but its result cannot be sent: {why}"
                if ok
                else f"{action} failed, and its reason cannot be sent: {why}"
            )
        try:
            return False, None, error, len(self._reply_payload(command.id, 0, False, None, error))
        except FATAL:
            raise
        except BaseException:
            return False, None, "the reply could not be encoded", 256

    def _evict_replies(self) -> None:
        """Forget the oldest finished replies beyond the cache's bounds (under its lock)."""
        replies = self._replies
        while len(replies) > REPLY_CACHE_IDS or self._replies_bytes > REPLY_CACHE_BYTES:
            for key, entry in replies.items():
                if entry.ok is not None:
                    del replies[key]
                    self._replies_bytes -= entry.size
                    break
            else:
                return

    def _send_reply(self, command_id: str, reply: _Reply) -> None:
        """Spool ``reply`` on ``cmd/reply``; a reply that cannot be spooled is counted and
        logged (a repeat of the command sends it again)."""
        publisher = self.publisher
        if publisher is None:
            log.warning("command %s: no broker configured to reply to", command_id)
            return
        ok = bool(reply.ok)

        def payload(seq: int) -> bytes:
            try:
                return self._reply_payload(command_id, seq, ok, reply.result, reply.error)
            except FATAL:
                raise
            except BaseException:
                return self._reply_payload(
                    command_id, seq, False, None, "the reply could not be encoded"
                )

        try:
            publisher.reply(payload)
        except FATAL:
            raise
        except BaseException as exc:
            self._errors["replies"] += 1
            log.error("the reply to command %s was not sent: %s", command_id, describe(exc))
