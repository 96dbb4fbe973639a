"""A deployed bundle's probation: its model health judged against the previous model's.

After a remote deploy swaps a bundle in (:mod:`device_agent.deploy`), a :class:`Trial` watches
it until probation ends: after a number of calls or a time, whichever the deploy
asked for (:class:`~device_agent.contracts.commands.ProbationArgs`). Each call on the new
model is counted on the caller's thread (a few additions under a lock); a copy of its input
goes to the trial's own thread, which runs the previous model (still in memory) on it. So both
models are seen on the same inputs, at the same time and under the same load, and nothing
outside a probation pays for it. When the application calls faster than the previous model
keeps up, inputs are skipped, never queued without bound: at most :data:`_QUEUE` copies and
:data:`_QUEUE_BYTES` bytes of them wait (an application that sends huge batches must not make
the agent hold gigabytes).

:func:`judge` compares the two, line by line: calls that fail on the new bundle alone (the
error rate), the p95 and median latency, the outlier rate and the share of the most frequent
predicted class. Without the previous model's view (the new bundle takes other inputs, or by
the end fewer than ``min_calls`` calls were compared: a slow previous model) the outlier rate
and the class shares of every call are compared with the new bundle's ``reference.json``. A
failing line rolls back at once; the bundle is applied when probation ends with every line
within its limits. The verdict names the line and its figures, and the lines not judged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import Any, Protocol

import numpy as np

from device_agent.contracts.commands import ProbationArgs
from device_agent.contracts.reference import ReferenceStats
from device_agent.errors import EdgeshipError
from device_agent.slot import LoadedModel, ModelSlot, Prediction, describe_failure
from device_agent.telemetry import percentile

__all__ = ["Side", "Trial", "TrialOwner", "judge", "observe", "unjudged"]

log = logging.getLogger(__name__)

# Inputs waiting for the previous model: beyond this many, or this many bytes of copies, a call
# is not shadowed.
_QUEUE = 16
_QUEUE_BYTES = 64 << 20
# The most calls compared side by side in one probation (their latencies are kept).
_MAX_PAIRED = 5000
# The trial's thread looks at the clock (and at an outcome decided elsewhere) this often.
_TICK_S = 0.25
# Between two early judgements, at least this many more calls.
_JUDGE_EVERY = 10
# The new model's first calls run on a cold session: their latency is not compared.
_WARMUP = 3
_END = object()


@dataclass
class Side:
    """What one model did on the calls of a probation: counts, class counts, latencies."""

    calls: int = 0
    errors: int = 0
    samples: int = 0
    scored: int = 0
    outliers: int = 0
    labelled: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def add(
        self, latency_s: float | None, labels: list[str] | None, outliers: int, n: int, scored: bool
    ) -> None:
        self.calls += 1
        self.samples += n
        if scored:
            self.scored += n
            self.outliers += outliers
        if labels is not None:
            self.labelled += len(labels)
            classes = self.classes
            for label in labels:
                classes[label] = classes.get(label, 0) + 1
        if latency_s is not None:
            self.latencies_ms.append(latency_s * 1000.0)

    def copy(self) -> Side:
        return replace(self, classes=dict(self.classes), latencies_ms=list(self.latencies_ms))

    def top(self) -> tuple[str, float]:
        """The most frequent class and its share of the labelled samples."""
        label = max(self.classes, key=lambda k: self.classes[k])
        return label, self.classes[label] / self.labelled


@dataclass(frozen=True)
class Observation:
    """One run of a model outside the slot: its latency, class labels and outlier count."""

    latency_s: float
    labels: list[str] | None
    outliers: int
    samples: int
    scored: bool


def observe(loaded: LoadedModel, inputs: Mapping[str, Any]) -> Observation:
    """Run ``loaded`` on ``inputs`` as :meth:`ModelSlot.predict` does, without counting the
    call in telemetry or handing on its outliers (the previous model's shadow runs)."""
    feed = loaded.check(inputs)
    start = perf_counter()
    if loaded.run_lock is None:
        outputs = loaded.run(feed)
    else:
        with loaded.run_lock:
            outputs = loaded.run(feed)
    if loaded.score_in_graph:
        scores: np.ndarray | None = outputs.pop()
    elif loaded.detector is None:
        scores = None
    else:
        scores = loaded.detector.score(feed, outputs)
    latency = perf_counter() - start
    first = outputs[0]
    n = first.shape[0] if first.ndim else 1
    labels = None
    if loaded.labels is not None and first.ndim == 2:
        names = loaded.labels
        labels = [names[c] for c in first.argmax(axis=1).tolist()]
    outliers = 0 if scores is None else int((scores > loaded.threshold).sum())
    return Observation(latency, labels, outliers, n, scores is not None)


def _ratio(new: float, base: float) -> float:
    return new / max(base, 1e-6)


def judge(
    limits: ProbationArgs, new: Side, base: Side | None, reference: ReferenceStats | None
) -> str | None:
    """The first line of model health that ``new`` fails, in words, or None.

    ``base`` is the previous model on the same calls as ``new`` (None: it could not run them);
    ``reference`` the new bundle's reference statistics. A line is judged only once both
    sides have ``limits.min_calls`` calls (samples for outliers and classes).
    """
    least = limits.min_calls
    tried = new.calls + new.errors
    if new.errors and tried >= least and new.errors / tried > limits.max_error_rate:
        return (
            f"{new.errors} of {tried} calls failed on the new bundle and not on the previous "
            f"one ({new.errors / tried:.1%}, limit {limits.max_error_rate:.1%})"
        )
    if base is not None and min(len(new.latencies_ms), len(base.latencies_ms)) >= least:
        new_lat, base_lat = sorted(new.latencies_ms), sorted(base.latencies_ms)
        pairs = [(percentile(new_lat, q), percentile(base_lat, q)) for q in (0.95, 0.5)]
        p95, p50 = (_ratio(n, b) for n, b in pairs)
        slower = min(n - b for n, b in pairs)
        # Both the median and the tail: a burst of load on a busy board moves the tail alone,
        # and a few microseconds more on a model that takes a few is the scheduler's doing.
        if min(p95, p50) > limits.max_latency_ratio and slower > limits.latency_floor_ms:
            return (
                f"p95 latency {p95:.1f}x the previous model's (median {p50:.1f}x; limit "
                f"{limits.max_latency_ratio:g}x) over {len(new_lat)} calls"
            )
    line = _outlier_line(limits, new, base, reference)
    return line if line is not None else _class_line(limits, new, base, reference)


def _outlier_line(
    limits: ProbationArgs, new: Side, base: Side | None, reference: ReferenceStats | None
) -> str | None:
    if new.scored < limits.min_calls:
        return None
    if base is not None and base.scored >= limits.min_calls:
        rate, whose = base.outliers / base.scored, "the previous model's"
    elif reference is not None and reference.outlier_rate is not None:
        rate, whose = reference.outlier_rate, "the reference's"
    else:
        return None
    expected = rate * new.scored
    k = new.outliers
    if k < limits.min_outliers or k <= limits.max_outlier_ratio * expected:
        return None
    times = f"{k / expected:.1f}x {whose} {rate:.1%}" if expected > 0 else f"{whose} 0%"
    return (
        f"outlier rate {k / new.scored:.1%} ({k} of {new.scored} samples), {times} "
        f"(limit {limits.max_outlier_ratio:g}x, at least {limits.min_outliers})"
    )


def _class_line(
    limits: ProbationArgs, new: Side, base: Side | None, reference: ReferenceStats | None
) -> str | None:
    if new.labelled < limits.min_calls or not new.classes:
        return None
    if base is not None and base.labelled >= limits.min_calls and base.classes:
        base_share, whose = base.top()[1], "the previous model's"
    elif reference is not None and reference.predictions:
        base_share, whose = max(reference.predictions.values()), "the reference's"
    else:
        return None
    label, share = new.top()
    if share - base_share <= limits.max_class_shift:
        return None
    return (
        f"class {label!r} predicted for {share:.0%} of {new.labelled} samples, where "
        f"{whose} most frequent class had {base_share:.0%} (limit +{limits.max_class_shift:.0%})"
    )


def unjudged(
    limits: ProbationArgs, new: Side, base: Side | None, reference: ReferenceStats | None
) -> list[str]:
    """The lines :func:`judge` could not judge on these sides: too few calls, or nothing to
    compare with (outliers and classes only where the new bundle has them)."""
    least = limits.min_calls
    out = []
    if base is None or min(len(new.latencies_ms), len(base.latencies_ms)) < least:
        out.append("latency")
    ref_rate = reference is not None and reference.outlier_rate is not None
    if new.scored and (
        new.scored < least or not (ref_rate or (base is not None and base.scored >= least))
    ):
        out.append("outliers")
    ref_classes = reference is not None and bool(reference.predictions)
    if new.labelled and (
        new.labelled < least or not (ref_classes or (base is not None and base.labelled >= least))
    ):
        out.append("classes")
    return out


def summary(calls: int, new: Side, base: Side | None) -> str:
    """The figures of a probation that passed ``calls`` calls, for the deploy's record."""
    parts = [f"healthy over {calls} calls"]
    if base is not None and base.latencies_ms and new.latencies_ms:
        p95 = _ratio(
            percentile(sorted(new.latencies_ms), 0.95), percentile(sorted(base.latencies_ms), 0.95)
        )
        parts.append(f"p95 latency {p95:.1f}x the previous model's")
    if new.scored:
        parts.append(f"outlier rate {new.outliers / new.scored:.1%}")
    if new.labelled and new.classes:
        label, share = new.top()
        parts.append(f"top class {label!r} {share:.0%}")
    return ", ".join(parts)


class TrialOwner(Protocol):
    """What a :class:`Trial` reports to (:class:`~device_agent.deploy.Deployer`)."""

    def rollback(self, trial: Trial, reason: str) -> None: ...

    def probation_passed(self, trial: Trial, reason: str) -> None: ...


class Trial:
    """A swapped-in bundle's probation (a :class:`~device_agent.slot.Probation`).

    ``inferences`` and ``seconds`` end it (None: not by that); :meth:`start` begins its
    thread. A call that fails on the new model is answered by ``previous`` through ``slot``.
    ``outcome`` is ``applied`` or ``rolled_back`` once decided, by whichever thread decides
    first, or ``stopped`` (:meth:`stop`: the agent closed).
    """

    def __init__(
        self,
        owner: TrialOwner,
        slot: ModelSlot,
        deploy_id: str,
        new: LoadedModel,
        previous: LoadedModel,
        limits: ProbationArgs,
        *,
        inferences: int | None,
        seconds: float | None,
        reference: ReferenceStats | None,
    ) -> None:
        self.owner = owner
        self.slot = slot
        self.id = deploy_id
        # Cleared on a rollback: ``new.trial`` stays set (a call in flight on the rejected
        # model that fails is still answered by the previous one), so this side of the cycle
        # goes, and the rejected session is freed with the last call on it, not by the GC.
        self.new: LoadedModel | None = new
        self.previous: LoadedModel | None = previous
        self.limits = limits
        self.inferences = inferences
        self.seconds = seconds
        self.reference = reference
        self.outcome: str | None = None
        # The previous model can run the application's inputs only if it takes the same ones.
        self._shadow = previous.io.inputs == new.io.inputs
        self._lock = threading.Lock()
        self._all = Side()  # every call on the new model (caller threads)
        self._new = Side()  # the shadowed calls, on the new model (the trial's thread)
        self._base = Side()  # the same calls, on the previous model (the trial's thread)
        self._queued = 0
        # Bytes of input copies held for the previous model (waiting or being run), the most
        # held at once, and the calls not shadowed because the queue was full.
        self.max_waiting_bytes = _QUEUE_BYTES
        self.waiting_bytes = 0
        self.peak_waiting_bytes = 0
        self.skipped = 0
        self._ending = False
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._began = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"probation-{deploy_id}")
        self._thread.daemon = True

    def start(self) -> None:
        self._began = time.monotonic()
        self._thread.start()

    @property
    def left(self) -> int | None:
        """Calls still to go when a count ends the probation."""
        if self.inferences is None:
            return None
        return max(0, self.inferences - self._all.calls - self._all.errors)

    def describe_left(self) -> str:
        parts = [] if self.left is None else [f"{self.left} inferences"]
        if self.seconds is not None:
            seconds = max(0.0, self.seconds - (time.monotonic() - self._began))
            parts.append(f"{seconds:.0f} s")
        return " or ".join(parts) + " to go"

    # --- the caller's thread ------------------------------------------------------------

    def passed(self, feed: Mapping[str, np.ndarray], result: Prediction) -> None:
        labels, scored = result.labels, result.scores is not None
        flags = result.is_outlier
        outliers = int(flags[0]) if flags.shape[0] == 1 else int(flags.sum())
        size = sum(value.nbytes for value in feed.values()) if self._shadow else 0
        with self._lock:
            if self.outcome is not None or self._ending:
                return
            self._all.add(None, labels, outliers, flags.shape[0], scored)
            end = self._ending = self._counted_out()
            shadow = self._shadow and self._new.calls < _MAX_PAIRED
            if shadow and (
                self._queued >= _QUEUE or self.waiting_bytes + size > self.max_waiting_bytes
            ):
                shadow = False
                self.skipped += 1
            if shadow:
                self._queued += 1
                self.waiting_bytes += size
                self.peak_waiting_bytes = max(self.peak_waiting_bytes, self.waiting_bytes)
        if shadow:
            copy = {name: np.array(value, copy=True) for name, value in feed.items()}
            item = (copy, size, result.latency_s, labels, outliers, flags.shape[0], scored)
            self._queue.put(item)
        if end:
            self._queue.put(_END)

    def failed(self, inputs: Mapping[str, Any], exc: EdgeshipError) -> Prediction:
        """The new bundle failed on ``inputs``: the previous model answers (or ``exc`` is
        raised again when it fails too: the input is at fault). With ``max_error_rate`` 0
        the first such failure rolls back; else it is counted and judged."""
        previous = self.previous
        if previous is None:
            raise exc
        try:
            result = self.slot.predict(inputs, previous)
        except EdgeshipError:
            raise exc from None  # both models refuse it: the input is at fault, not the deploy
        if self.limits.max_error_rate == 0:
            self.owner.rollback(self, f"inference failed on the new bundle: {exc}")
            return result
        # Judged by the error line, and counted toward the calls that end the probation: a
        # bundle that fails every call must not run both models until ``seconds`` is out.
        with self._lock:
            if self.outcome is not None or self._ending:
                return result
            self._all.errors += 1
            end = self._ending = self._counted_out()
        if end:
            self._queue.put(_END)
        return result

    def _counted_out(self) -> bool:
        """Whether the calls so far, failed ones included, end the probation (under _lock)."""
        every = self._all
        return self.inferences is not None and every.calls + every.errors >= self.inferences

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the probation without a verdict (the agent is closing): no verdict is taken
        after this, and the trial's thread has exited when it returns (or ``timeout_s``
        passed: it was running the previous model). A verdict taken before stands."""
        self.decide("stopped")
        self._queue.put(_END)  # wake the thread now rather than at its next tick
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def decide(self, outcome: str) -> bool:
        """Take ``outcome`` unless another one was decided first."""
        with self._lock:
            if self.outcome is not None:
                return False
            self.outcome = outcome
            return True

    # --- the trial's thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._watch()
        except Exception as exc:  # a bug here must not leave the bundle on probation forever
            log.exception("probation of deploy %s failed", self.id)
            self.owner.rollback(self, f"probation failed: {describe_failure(exc)}")

    def _watch(self) -> None:
        judged_at = 0
        while self.outcome is None:
            wait = _TICK_S
            if self.seconds is not None:
                wait = min(wait, self.seconds - (time.monotonic() - self._began))
            try:
                item = self._queue.get(timeout=max(0.0, wait))
            except queue.Empty:
                item = None
            if self.outcome is not None:
                return
            timed_out = self.seconds is not None and time.monotonic() - self._began >= self.seconds
            if item is _END or timed_out:
                self._finish()
                return
            if item is not None:
                self._compare(item)
                item = None  # the copy is released now, not at the next get
            seen = self._new.calls + self._all.calls + self._all.errors
            if seen - judged_at >= _JUDGE_EVERY:
                judged_at = seen
                line = self._judge(final=False)
                if line is not None:
                    self.owner.rollback(self, f"model health: {line}")
                    return

    def _compare(self, item: Any) -> None:
        feed, size, latency_s, labels, outliers, n, scored = item
        previous = self.previous
        try:
            seen = None if previous is None else observe(previous, feed)
        except Exception:  # the previous model refuses it: nothing to compare with
            seen = None
        finally:
            del feed, item  # the caller's reference goes too (see _watch)
            with self._lock:
                self._queued -= 1
                self.waiting_bytes -= size
        if seen is None:
            return
        warm = self._new.calls >= _WARMUP
        self._new.add(latency_s if warm else None, labels, outliers, n, scored)
        self._base.add(
            seen.latency_s if warm else None, seen.labels, seen.outliers, seen.samples, seen.scored
        )

    def _paired(self) -> bool:
        """Whether enough calls were compared with the previous model to judge against it."""
        return self._shadow and self._base.calls >= self.limits.min_calls

    def _judge(self, *, final: bool) -> str | None:
        """Against the previous model on the calls both ran while pairing may still reach
        ``min_calls`` (so a device whose traffic is one class is not judged against the
        reference meanwhile); else, and when the previous model takes other inputs, every
        call against the reference."""
        with self._lock:
            every = self._all.copy()
        if self._shadow and (self._paired() or not final):
            paired = replace(self._new, errors=every.errors, calls=every.calls)
            return judge(self.limits, paired, self._base, self.reference)
        return judge(self.limits, every, None, self.reference)

    def _verdict(self, calls: int) -> str:
        """A passed probation's reason: its figures and the lines it could not judge."""
        paired = self._paired()
        new, base = (self._new, self._base) if paired else (self._all, None)
        reason = summary(calls, new, base)
        missing = unjudged(self.limits, new, base, self.reference)
        if not missing:
            return reason
        if not self._shadow:
            why = ["the previous model takes other inputs"]
        else:
            timed = min(len(new.latencies_ms), len(self._base.latencies_ms))
            why = [
                f"{self._base.calls} of {calls} calls compared with the previous model, "
                f"{timed} of them timed after {_WARMUP} warm-up calls; min_calls "
                f"{self.limits.min_calls}"
            ]
        if self.reference is None and missing != ["latency"]:
            why.append("no reference statistics")
        return f"{reason}; not judged: {', '.join(missing)} ({'; '.join(why)})"

    def _finish(self) -> None:
        # The inputs already queued are compared before the verdict.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _END:
                self._compare(item)
        line = self._judge(final=True)
        if line is not None:
            self.owner.rollback(self, f"model health: {line}")
            return
        calls, least = self._all.calls, self.limits.min_calls
        if calls + self._all.errors >= least:
            self.owner.probation_passed(self, self._verdict(calls))
            return
        waited = time.monotonic() - self._began
        quiet = f"only {calls} calls in {waited:.0f} s, fewer than min_calls {least}"
        if self.limits.quiet == "rollback":
            self.owner.rollback(
                self, f"{quiet}: too few to judge, and the deploy asked to roll back"
            )
        else:
            self.owner.probation_passed(self, f"applied without a health verdict: {quiet}")
