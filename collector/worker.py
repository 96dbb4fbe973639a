"""One batch, ingested and stored, and the workers that do it (see :mod:`collector.service`).

:func:`process_batch` is what every worker runs per batch: validate each delivery, store the
batch in one transaction, and split a batch the store refuses for a value in it until the
refused record is alone. A :class:`Sink` runs it either in the calling thread
(:class:`InlineSink`) or in a child process, ``python -m collector.worker --worker``
(:class:`ProcessSink`), so that decoding and SQL run on other cores than paho's receive loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from collector.errors import CollectorError, StoreError
from collector.ingest import DeadLetter, Ignored, Record, RolloutRecord, dead_letter, ingest
from collector.store import InsertResult, RecordError, Store, open_store
from device_agent.contracts.messages import safe_text

__all__ = [
    "BatchOutcome",
    "Delivery",
    "InlineSink",
    "ProcessSink",
    "Sink",
    "process_batch",
]

Delivery = tuple[str, bytes, float]  # (topic, payload, received_at): what the worker gets


# --- one batch: ingest + store (runs in the worker) -----------------------------------------


@dataclass(frozen=True)
class BatchOutcome:
    """What happened to one batch: the store's counts, plus what ingest set aside.
    ``dead_samples`` holds (topic, field, error) of up to 20 dead letters, for the log.
    ``splits``: how many smaller batches were tried because the store refused one (0 when the
    batch went in whole); ``refused``: records the store refused alone, now dead letters."""

    stored: InsertResult
    ignored: int
    dead_by_field: dict[str, int]
    dead_samples: tuple[tuple[str, str, str], ...]
    ignored_by_reason: dict[str, int] = field(default_factory=dict)
    splits: int = 0
    refused: int = 0


# One delivery and what ingest made of it: the delivery is kept to dead-letter the record.
_Entry = tuple[Delivery, Record | RolloutRecord | DeadLetter]


def process_batch(
    store: Store,
    deliveries: list[Delivery],
    fleet: str | None = None,
    note: Callable[[str], None] | None = None,
) -> BatchOutcome:
    """Validate every delivery and store the batch in one transaction.

    If the store refuses the batch for a value in it (:class:`RecordError`, or an error that
    is not a :class:`StoreError`), the batch is split until the refused record is alone; that
    one becomes a dead letter (``field="store"``), everything else is stored once. ``note``
    hears, once, that a batch is being split and why. Raises StoreError when the store cannot
    write at all: then nothing of the batch is acknowledged and it is tried again whole.
    """
    entries: list[_Entry] = []
    ignored: dict[str, int] = {}
    for delivery in deliveries:
        result = ingest(*delivery, fleet=fleet)
        if isinstance(result, Ignored):
            ignored[result.reason] = ignored.get(result.reason, 0) + 1
        else:
            entries.append((delivery, result))
    splitter = _Splitter(store, note)
    stored, dead = splitter.store(entries)
    by_field: dict[str, int] = {}
    for d in dead:
        by_field[d.field] = by_field.get(d.field, 0) + 1
    samples = tuple((d.topic, d.field, d.error) for d in dead[:20])
    return BatchOutcome(
        stored, sum(ignored.values()), by_field, samples, ignored, splitter.splits,
        splitter.refused,
    )  # fmt: skip


class _Splitter:
    """Stores entries in one transaction, or splits them (see :func:`process_batch`)."""

    def __init__(self, store: Store, note: Callable[[str], None] | None) -> None:
        self._store = store
        self._note = note
        self.splits = 0
        self.refused = 0

    def store(self, entries: list[_Entry]) -> tuple[InsertResult, list[DeadLetter]]:
        """(what the store did, the dead letters stored or already there)."""
        records: list[Record] = []
        rollouts: list[RolloutRecord] = []
        dead: list[DeadLetter] = []
        for _, e in entries:
            if isinstance(e, DeadLetter):
                dead.append(e)
            elif isinstance(e, RolloutRecord):
                rollouts.append(e)
            else:
                records.append(e)
        try:
            return self._store.insert_batch(records, dead, rollouts), dead
        except RecordError as exc:
            error = str(exc)
        except StoreError:
            raise
        except Exception as exc:  # an error tied to a record, not to the database's state
            error = safe_text(f"{type(exc).__name__}: {exc}")
        if len(entries) == 1:
            (topic, payload, received_at), _ = entries[0]
            refused = dead_letter(
                topic, payload, received_at, "store", f"the store refused it: {error}"
            )
            self.refused += 1
            return self._store.insert_batch([], [refused]), [refused]
        if self.splits == 0 and self._note is not None:
            self._note(f"the store refused a batch of {len(entries)} messages ({error}); "
                       "splitting it to find the refused one")  # fmt: skip
        self.splits += 2
        half = len(entries) // 2
        first, first_dead = self.store(entries[:half])
        second, second_dead = self.store(entries[half:])
        return first + second, first_dead + second_dead


class Sink(Protocol):
    """Where a committer thread sends its batches: ingest and store, here or in a worker."""

    def process(self, deliveries: list[Delivery], note: Callable[[str], None]) -> BatchOutcome:
        """Ingest and store one batch; ``note`` hears what the collector's health must show
        while the call lasts (a batch being split)."""
        ...

    def exit_code(self) -> int | None:
        """The worker's exit status if it has exited, else None."""
        ...

    def close(self) -> None: ...


class InlineSink:
    """The work in the calling thread (``worker="thread"``)."""

    def __init__(self, store_url: str, fleet: str | None) -> None:
        self._store = open_store(store_url, migrate=False)
        self._fleet = fleet

    def process(self, deliveries: list[Delivery], note: Callable[[str], None]) -> BatchOutcome:
        return process_batch(self._store, deliveries, self._fleet, note)

    def exit_code(self) -> int | None:
        return None

    def close(self) -> None:
        self._store.close()


def _worker_main(conn: Any, store_url: str, fleet: str | None) -> None:
    """The worker process: batches in, outcomes out, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM are the parent's
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        store = open_store(store_url, migrate=False)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    try:
        while True:
            try:
                deliveries = conn.recv()
            except (EOFError, OSError):
                break  # the collector is gone (stopped or killed): nothing to acknowledge
            if deliveries is None:
                break
            try:
                outcome = process_batch(
                    store, deliveries, fleet, lambda text: conn.send(("note", text))
                )
                conn.send(("ok", outcome))
            except StoreError as exc:
                conn.send(("store", str(exc)))
            except Exception:
                conn.send(("bug", traceback.format_exc()))
    except (BrokenPipeError, EOFError, OSError):
        pass
    finally:
        store.close()


class ProcessSink:
    """The worker as ``python -m collector.worker --worker``: a plain child process (not
    multiprocessing's spawn, which would re-import the caller's ``__main__``), talking over a
    socketpair with multiprocessing's framing. Closing our end, or dying, stops it."""

    def __init__(self, store_url: str, fleet: str | None) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])  # the directory holding collector/
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            # The store URL goes over the socket, not the command line: it may hold the
            # database's password, and every user of the machine can read a command line.
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "collector.worker", "--worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise CollectorError(f"cannot start the collector worker: {exc}") from exc
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send((store_url, fleet))
        except OSError as exc:
            self.close()
            raise CollectorError(f"cannot start the collector worker: {exc}") from exc
        kind, detail = self._receive(timeout=120.0)
        if kind != "ready":
            self.close()
            raise StoreError(f"collector worker could not open the store: {detail}")

    def _receive(self, timeout: float | None = None) -> tuple[str, Any]:
        try:
            if timeout is not None and not self._conn.poll(timeout):
                raise CollectorError(f"collector worker did not answer in {timeout:.0f} s")
            reply: tuple[str, Any] = self._conn.recv()
            return reply
        except (EOFError, OSError) as exc:
            raise CollectorError(
                f"collector worker process exited (code {self._proc.poll()})"
            ) from exc

    def process(self, deliveries: list[Delivery], note: Callable[[str], None]) -> BatchOutcome:
        try:
            self._conn.send(deliveries)
        except OSError as exc:
            raise CollectorError("collector worker process is gone") from exc
        kind, detail = self._receive()
        while kind == "note":
            note(str(detail))
            kind, detail = self._receive()
        if kind == "ok":
            outcome: BatchOutcome = detail
            return outcome
        if kind == "store":
            raise StoreError(str(detail))
        raise CollectorError(f"collector worker failed:\n{detail}")

    def exit_code(self) -> int | None:
        return self._proc.poll()

    @property
    def pid(self) -> int:
        """The worker process's id (a test kills it to see the collector replace it)."""
        return self._proc.pid

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._conn.close()


def worker_entry(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's, from the start
    conn = Connection(int(argv[0]))
    try:  # the first message: what the command line must not show
        store_url, fleet = conn.recv()
    except (EOFError, OSError):
        return 1  # the parent went away before sending it
    _worker_main(conn, store_url, fleet)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        # Through the package, not __main__: the outcomes' classes must pickle under their
        # real module name for the parent to read them.
        from collector import worker

        sys.exit(worker.worker_entry(sys.argv[2:]))
    sys.exit("usage: python -m collector.worker --worker FD (internal)")
