"""The commit pipeline: deliveries wait in a pending list, committer threads take them in
batches, a worker ingests and stores each batch in one transaction, and only then is the batch
acknowledged to the broker (see :mod:`collector.service` for why it is shaped this way).

It keeps the counters of what was committed and the reasons a batch cannot be (the store
cannot write, a worker died, a store call does not return), which ``/api/health`` reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from collector.config import CollectorConfig
from collector.errors import CollectorError, StoreError
from collector.worker import BatchOutcome, Delivery, InlineSink, ProcessSink, Sink
from device_agent.contracts.messages import safe_text

__all__ = [
    "COMMIT_STALL_S",
    "MAX_DEAD_FIELDS",
    "OTHER_DEAD_FIELD",
    "CommitPipeline",
    "Pending",
    "brief",
]

log = logging.getLogger("collector")

# A store call (one batch: insert, or the splits of a refused one) that lasts this long is a
# problem in /api/health: a database link that went silent (a partition, a dropped route) gives
# no error for as long as the kernel keeps retransmitting, and the batch waits all that time.
COMMIT_STALL_S = 60.0

# dead_by_field counts at most this many field names; the rest are counted as OTHER_DEAD_FIELD
# (a field can be a key of the message, which its sender picks).
MAX_DEAD_FIELDS = 100
OTHER_DEAD_FIELD = "(other)"


class Pending(NamedTuple):
    """One delivery waiting for its commit (a tuple: the receive path makes one a message)."""

    topic: str
    payload: bytes
    received_at: float
    mid: int
    qos: int
    generation: int


class CommitPipeline:
    """Pending deliveries -> batches -> sinks -> acks. ``ack(batch)`` acknowledges a committed
    batch to the broker and returns how many it acknowledged; ``committed()`` hears that the
    store changed; ``fail(exc)`` stops the collector on a bug (nothing un-stored is acked)."""

    def __init__(
        self,
        config: CollectorConfig,
        *,
        clock: Callable[[], float],
        stopping: threading.Event,
        ack: Callable[[list[Pending]], int],
        committed: Callable[[], None],
        fail: Callable[[BaseException], None],
    ) -> None:
        self.config = config
        self._clock = clock
        self._stopping = stopping
        self._ack = ack
        self._committed = committed
        self._fail = fail
        self._cond = threading.Condition()
        self._pending: list[Pending] = []
        self._uncommitted = 0  # guarded by _cond, like _pending
        self._redelivered = 0
        self._sinks: list[Sink | None] = []
        self._threads: list[threading.Thread] = []
        self._dead_log = _RateLimitedLog(10, 60.0)
        self._lock = threading.Lock()
        self._counters: dict[str, Any] = {
            "first_received_at": None,
            "received": 0,
            "stored": 0,
            "duplicates": 0,
            "dead_letters": 0,
            "ignored": 0,
            "batches": 0,
            "acked": 0,
            "redelivered": 0,
            "store_errors": 0,
            "last_commit_at": None,
            "last_error": None,
        }
        self._dead_by_field: dict[str, int] = {}
        self._ignored_by_reason: dict[str, int] = {}
        # committer index -> (since, why) while its batch cannot be committed; guarded by _lock
        self._trouble: dict[int, tuple[float, str]] = {}
        # committer index -> (since, messages) while a store call is in progress; guarded by
        # _lock. A call that does not return (a PostgreSQL link that went silent: no error ever
        # comes) is a problem once it has lasted commit_stall_s.
        self._committing: dict[int, tuple[float, int]] = {}
        self.commit_stall_s = COMMIT_STALL_S

    # --- lifecycle ---

    def start(self) -> None:
        """Start the workers (``workers`` processes, or one in-thread) and their committers."""
        cfg = self.config
        n = cfg.workers if cfg.worker == "process" else 1
        for _ in range(n):
            self._sinks.append(self._make_sink())
        for i in range(n):
            committer = threading.Thread(
                target=self._commit_loop, args=(i,), name=f"edgeship-commit-{i}", daemon=True
            )
            committer.start()
            self._threads.append(committer)

    def stop(self, timeout_s: float) -> None:
        """Wake the committers (``stopping`` is set): each commits what it took and ends."""
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout_s)

    def close(self) -> None:
        """Stop the workers."""
        for sink in self._sinks:
            if sink is not None:
                sink.close()

    def sink(self, index: int) -> Sink | None:
        """Committer ``index``'s worker (None between a failure and the next batch)."""
        return self._sinks[index]

    def _make_sink(self) -> Sink:
        if self.config.worker == "process":
            return ProcessSink(self.config.store_url, self.config.fleet)
        return InlineSink(self.config.store_url, self.config.fleet)

    # --- what the session hands over ---

    def offer(self, item: Pending, dup: bool) -> None:
        """A delivery to commit (``dup``: the broker flagged it as re-sent)."""
        with self._cond:
            self._pending.append(item)
            self._uncommitted += 1
            self._redelivered += dup
            n = len(self._pending)
            if n == 1 or n >= self.config.batch_max:
                self._cond.notify()

    # --- what /api/health reads ---

    def counters(self) -> dict[str, Any]:
        """The counters of :class:`~collector.service.CollectorStats` this pipeline keeps."""
        with self._lock:
            counters = dict(self._counters)
            by_field = dict(self._dead_by_field)
            by_reason = dict(self._ignored_by_reason)
        with self._cond:
            pending = len(self._pending)
            uncommitted = self._uncommitted
        return {
            **counters,
            "pending": pending,
            "uncommitted": uncommitted,
            "dead_by_field": by_field,
            "ignored_by_reason": by_reason,
        }

    def problems(self) -> list[str]:
        """Why batches are not being committed now, one line each."""
        out: list[str] = []
        now = self._clock()
        with self._lock:
            trouble = sorted(self._trouble.items())
            committing = sorted(self._committing.items())
        for index, (since, why) in trouble:
            out.append(f"committer {index}: {why} (for {max(0.0, now - since):.0f} s)")
        for index, (since, n) in committing:
            if now - since >= self.commit_stall_s and index not in dict(trouble):
                out.append(
                    f"committer {index}: a batch of {n} messages has been committing for "
                    f"{now - since:.0f} s; the store does not answer"
                )
        for index, sink in enumerate(list(self._sinks)):
            code = None if sink is None else sink.exit_code()
            if code is not None:
                out.append(
                    f"worker {index} exited with code {code}; a new one starts with the next batch"
                )
        return out

    def note_error(self, message: str, *, store: bool = False) -> None:
        """Keep ``message`` as the last error (``store``: count it as a store error)."""
        with self._lock:
            self._counters["last_error"] = message
            if store:
                self._counters["store_errors"] += 1

    # --- batching ---

    def _take_batch(self) -> list[Pending]:
        cfg = self.config
        with self._cond:
            while not self._pending and not self._stopping.is_set():
                self._cond.wait(0.5)
            if not self._stopping.is_set():
                deadline = time.monotonic() + cfg.batch_interval_s
                while len(self._pending) < cfg.batch_max:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stopping.is_set():
                        break
                    self._cond.wait(left)
            batch = self._pending[: cfg.batch_max]
            del self._pending[: cfg.batch_max]
            return batch

    def _commit_loop(self, index: int) -> None:
        backoff = 0.5
        while True:
            batch = self._take_batch()
            if not batch:
                if self._stopping.is_set():
                    return
                continue
            deliveries = [p[:3] for p in batch]
            while True:
                try:
                    with self._lock:
                        self._committing[index] = (self._clock(), len(deliveries))
                    try:
                        outcome = self._process(index, deliveries)
                    finally:
                        with self._lock:
                            self._committing.pop(index, None)
                    backoff = 0.5
                    break
                except StoreError as exc:
                    self.note_error(str(exc), store=True)
                    self._set_trouble(
                        index, f"a batch of {len(batch)} messages is not stored (retried every "
                        f"{backoff:g} s or more): {brief(exc)}",
                    )  # fmt: skip
                    log.error("batch of %d not stored (will retry): %s", len(batch), exc)
                except CollectorError as exc:
                    self.note_error(str(exc))
                    self._set_trouble(
                        index, f"worker failed on a batch of {len(batch)} messages, starting a "
                        f"new one: {brief(exc)}",
                    )  # fmt: skip
                    log.error("%s; starting a new worker", exc)
                    self._restart_sink(index)
                except Exception as exc:  # a bug: stop rather than ack what was not stored
                    self._fail(exc)
                    return
                if self._stopping.wait(backoff):
                    return  # stopping with the store down: leave the batch un-acknowledged
                backoff = min(backoff * 2, 30.0)
            acked = self._ack(batch)
            with self._lock:
                self._counters["acked"] += acked
            self._account(len(batch), outcome, batch[0].received_at)
            self._set_trouble(index, None)

    def _process(self, index: int, deliveries: list[Delivery]) -> BatchOutcome:
        sink = self._sinks[index]
        if sink is None:
            sink = self._sinks[index] = self._make_sink()
        return sink.process(deliveries, lambda text: self._set_trouble(index, text))

    def _set_trouble(self, index: int, why: str | None) -> None:
        """Record why committer ``index`` cannot commit its batch now (None: it committed)."""
        with self._lock:
            if why is None:
                self._trouble.pop(index, None)
            else:
                since = self._trouble.get(index, (self._clock(), ""))[0]
                self._trouble[index] = (since, why)

    def _restart_sink(self, index: int) -> None:
        sink, self._sinks[index] = self._sinks[index], None
        if sink is not None:
            try:
                sink.close()
            except Exception:  # the old worker is already broken; a new one replaces it
                log.debug("closing the old worker failed", exc_info=True)

    def _account(self, n: int, outcome: BatchOutcome, first_received: float) -> None:
        stored = outcome.stored
        with self._cond:
            self._uncommitted -= n
            redelivered = self._redelivered
        with self._lock:
            c = self._counters
            c["received"] += n
            c["redelivered"] = redelivered
            if c["first_received_at"] is None:
                c["first_received_at"] = first_received
            c["stored"] += stored.new
            c["duplicates"] += stored.duplicates
            c["dead_letters"] += stored.dead_letters
            c["ignored"] += outcome.ignored
            c["batches"] += 1
            c["last_commit_at"] = self._clock()
            for name, count in outcome.dead_by_field.items():
                # A field can name a key of the message (a key given twice, a bad label): the
                # sender picks it, so past MAX_DEAD_FIELDS names the rest count as one.
                if name not in self._dead_by_field and len(self._dead_by_field) >= MAX_DEAD_FIELDS:
                    name = OTHER_DEAD_FIELD
                self._dead_by_field[name] = self._dead_by_field.get(name, 0) + count
            for reason, count in outcome.ignored_by_reason.items():
                self._ignored_by_reason[reason] = self._ignored_by_reason.get(reason, 0) + count
        if outcome.splits:
            log.warning(
                "the store refused a batch of %d messages: split into %d smaller ones; %d "
                "message(s) it refused alone kept as dead letters (field 'store'), the rest "
                "stored", n, outcome.splits, outcome.refused,
            )  # fmt: skip
        for topic, fld, error in outcome.dead_samples:
            self._dead_log.warning("dead letter on %r (%s): %s", topic[:200], fld, error[:300])
        hidden = stored.dead_letters - len(outcome.dead_samples)
        if hidden > 0:
            self._dead_log.skipped(hidden)
        self._committed()


def brief(exc: BaseException) -> str:
    """The last line of an error's message (a worker's traceback ends with the error itself),
    escaped and at most 300 characters, for ``/api/health``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = safe_text(lines[-1] if lines else type(exc).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


class _RateLimitedLog:
    """At most ``limit`` dead-letter lines per ``period_s``; then one line saying how many
    more there were, so a flood of garbage cannot flood the log."""

    def __init__(self, limit: int, period_s: float) -> None:
        self._limit = limit
        self._period = period_s
        self._window_start = time.monotonic()
        self._lines = 0
        self._skipped = 0

    def _roll(self) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._period:
            if self._skipped:
                log.warning(
                    "%d more dead letters in the last %.0f s (see the dead_letters table)",
                    self._skipped, self._period,
                )  # fmt: skip
            self._window_start, self._lines, self._skipped = now, 0, 0

    def warning(self, fmt: str, *args: Any) -> None:
        self._roll()
        if self._lines < self._limit:
            self._lines += 1
            log.warning(fmt, *args)
        else:
            self._skipped += 1

    def skipped(self, n: int) -> None:
        self._roll()
        self._skipped += n
