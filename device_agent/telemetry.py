"""Per-window inference statistics: the part of a telemetry message the predict path feeds.

:class:`WindowAggregator` owns the counters of the current window: inferences, errors, the
latency histogram in fixed buckets and the window's raw latencies (for exact percentiles),
outlier count and score histogram, and the prediction histogram. The agent calls
:meth:`~WindowAggregator.record` on every inference, so it is a handful of integer updates
under a lock; :meth:`~WindowAggregator.close_window` swaps the state out and does the sorting
outside the lock. Host metrics (:mod:`device_agent.sysinfo`) and spool figures
(:mod:`device_agent.spool`) make up the rest of a
:class:`~device_agent.contracts.messages.TelemetryMessage`.
"""

from __future__ import annotations

import itertools
import math
import operator
import random
import threading
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import SupportsIndex, TypedDict

from device_agent.contracts.messages import (
    LATENCY_BUCKETS_MS,
    SCORE_BUCKETS,
    Histogram,
    LatencySummary,
)
from device_agent.errors import ConfigError

__all__ = ["OTHER_LABEL", "WindowAggregator", "WindowFields", "percentile"]

# Predictions outside the known labels are counted under their own name, up to this many
# distinct names per window; the rest go to OTHER_LABEL so a model that emits garbage cannot
# grow the prediction histogram (and the telemetry payload) without bound.
OTHER_LABEL = "__other__"
_MAX_EXTRA_LABELS = 64
# What the wire contract accepts for the prediction histogram (messages._MAX_LABELS = 4096).
_MAX_LABEL_LEN = 128
_MAX_KNOWN_LABELS = 4096 - _MAX_EXTRA_LABELS - 1

# Latencies are clamped into [0, 1 day] so that a broken clock (negative, NaN or infinite
# durations) still yields an encodable message; the count stays right.
_MAX_LATENCY_MS = 86_400_000.0


class WindowFields(TypedDict):
    """The fields of a TelemetryMessage that a window's inferences determine.

    Unpack it into the message: ``TelemetryMessage(device=..., **fields, cpu_percent=...)``.
    """

    window_start: float
    window_s: float
    inferences: int
    errors: int
    latency_ms: LatencySummary
    outliers: int
    scores: Histogram
    predictions: dict[str, int]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) of an ascending, non-empty sequence.

    Nearest rank always returns an observed latency, and p100 is the max.
    """
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of an empty sequence")
    rank = max(1, math.ceil(q * n))
    return sorted_values[min(rank, n) - 1]


class WindowAggregator:
    """Accumulates one telemetry window at a time. Thread-safe.

    ``labels`` names the classes of an integer prediction (``labels[i]`` for class ``i``).
    Raw latencies are kept for exact percentiles up to ``max_samples`` per window; beyond that
    a uniform reservoir sample of that size is kept (percentiles become estimates, the
    histogram and max stay exact). ``start`` (unix seconds) opens the first window.

    Without ``start`` the aggregator runs in real time: a window's length is measured on the
    monotonic clock and its ``window_start`` is its end (``now``) minus that length, so a step
    of the wall clock (NTP setting the time of a board with no RTC, a manual ``date``) never
    gives a window a wrong or zero ``window_s``; it shows as a jump of ``window_start``
    between two windows. With ``start`` (synthetic times, for tests and replays) the length is
    ``now`` minus the window's start.
    """

    def __init__(
        self,
        latency_bounds_ms: Sequence[float] = LATENCY_BUCKETS_MS,
        labels: Sequence[str] = (),
        *,
        score_bounds: Sequence[float] = SCORE_BUCKETS,
        start: float | None = None,
        max_samples: int = 65_536,
        seed: int | None = None,
    ) -> None:
        self._lat_bounds = _check_bounds(latency_bounds_ms, "latency_bounds_ms")
        self._score_bounds = _check_bounds(score_bounds, "score_bounds")
        if len(set(labels)) != len(labels) or not all(
            isinstance(x, str) and 0 < len(x) <= _MAX_LABEL_LEN for x in labels
        ):
            raise ConfigError(
                f"labels: expected distinct strings of 1 to {_MAX_LABEL_LEN} characters"
            )
        if len(labels) > _MAX_KNOWN_LABELS:
            raise ConfigError(f"labels: {len(labels)} labels, at most {_MAX_KNOWN_LABELS}")
        if max_samples < 1:
            raise ConfigError(f"max_samples: {max_samples} must be at least 1")
        self._labels = tuple(labels)
        self._label_index = {label: i for i, label in enumerate(self._labels)}
        self._max_samples = max_samples
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._start = time.time() if start is None else float(start)
        self._began: float | None = time.monotonic() if start is None else None
        self._reset()

    def _reset(self) -> None:
        n_lat = len(self._lat_bounds) + 1
        self._n = 0
        self._errors = 0
        self._outliers = 0
        self._max_ms = 0.0
        self._lat_counts = [0] * n_lat
        self._score_counts = [0] * (len(self._score_bounds) + 1)
        self._label_counts = [0] * len(self._labels)
        self._extra_labels: dict[str, int] = {}
        self._samples: list[float] = []

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    @property
    def window_start(self) -> float:
        return self._start

    def record(
        self,
        latency_s: float,
        prediction: str | SupportsIndex | None = None,
        score: float | None = None,
        is_outlier: bool = False,
    ) -> None:
        """Count one successful inference that took ``latency_s`` seconds.

        ``prediction`` is a class index (an int or numpy integer, named through ``labels``) or
        a label; ``score`` the outlier score, if a detector ran; ``is_outlier`` whether it
        crossed the threshold.
        """
        ms = latency_s * 1000.0
        if not 0.0 <= ms <= _MAX_LATENCY_MS:  # also catches NaN
            ms = _MAX_LATENCY_MS if ms > 0.0 else 0.0
        lat_bucket = bisect_left(self._lat_bounds, ms)
        score_bucket = -1
        if score is not None and score == score:  # NaN scores are not binned
            score_bucket = bisect_left(self._score_bounds, score)
        with self._lock:
            self._n += 1
            self._lat_counts[lat_bucket] += 1
            if ms > self._max_ms:
                self._max_ms = ms
            samples = self._samples
            if len(samples) < self._max_samples:
                samples.append(ms)
            else:
                # Reservoir sampling (Algorithm R): each latency of the window is kept with
                # equal probability, so percentiles of the sample estimate the window's.
                j = int(self._rng.random() * self._n)
                if j < self._max_samples:
                    samples[j] = ms
            if score_bucket >= 0:
                self._score_counts[score_bucket] += 1
            if is_outlier:
                self._outliers += 1
            if prediction is not None:
                self._count_prediction(prediction)

    def _count_prediction(self, prediction: str | SupportsIndex) -> None:
        if type(prediction) is int and 0 <= prediction < len(self._label_counts):
            self._label_counts[prediction] += 1
            return
        if isinstance(prediction, str):
            i = self._label_index.get(prediction)
            if i is not None:
                self._label_counts[i] += 1
                return
            name = prediction
        else:
            try:
                index = operator.index(prediction)  # numpy integers from argmax
            except TypeError:
                name = str(prediction)
            else:
                if 0 <= index < len(self._label_counts):
                    self._label_counts[index] += 1
                    return
                name = str(index)
        if not name or len(name) > _MAX_LABEL_LEN:
            name = OTHER_LABEL
        extra = self._extra_labels
        if name in extra or len(extra) < _MAX_EXTRA_LABELS:
            extra[name] = extra.get(name, 0) + 1
        else:
            extra[OTHER_LABEL] = extra.get(OTHER_LABEL, 0) + 1

    def record_error(self, n: int = 1) -> None:
        """Count ``n`` failed inferences (they do not enter the latency histogram)."""
        with self._lock:
            self._errors += n

    def close_window(self, now: float | None = None) -> WindowFields:
        """End the current window at ``now`` (unix seconds), start the next, return the fields."""
        end = time.time() if now is None else float(now)
        with self._lock:
            start, self._start = self._start, end
            began = self._began
            if began is not None:
                self._began = time.monotonic()
                length = max(0.0, self._began - began)
                start = max(0.0, end - length)
            else:
                length = max(0.0, end - start)
            n, errors, outliers, max_ms = self._n, self._errors, self._outliers, self._max_ms
            lat_counts, score_counts = self._lat_counts, self._score_counts
            label_counts, extra, samples = self._label_counts, self._extra_labels, self._samples
            self._reset()
        # Sorting happens outside the lock so inference threads never wait for it.
        if n:
            samples.sort()
            p50, p95, p99 = (percentile(samples, q) for q in (0.50, 0.95, 0.99))
            latency = LatencySummary(
                Histogram(self._lat_bounds, tuple(lat_counts)), p50, p95, p99, max(max_ms, p99)
            )
        else:
            latency = LatencySummary(
                Histogram(self._lat_bounds, tuple(lat_counts)), None, None, None, None
            )
        predictions = {label: c for label, c in zip(self._labels, label_counts, strict=True) if c}
        for name, c in extra.items():
            predictions[name] = predictions.get(name, 0) + c
        return WindowFields(
            window_start=start,
            window_s=length,
            inferences=n,
            errors=errors,
            latency_ms=latency,
            outliers=outliers,
            scores=Histogram(self._score_bounds, tuple(score_counts)),
            predictions=predictions,
        )


def _check_bounds(bounds: Sequence[float], name: str) -> tuple[float, ...]:
    out = tuple(float(b) for b in bounds)
    if not out:
        raise ConfigError(f"{name}: needs at least one bound")
    if not all(math.isfinite(b) for b in out):
        raise ConfigError(f"{name}: bounds must be finite")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ConfigError(f"{name}: bounds must be strictly increasing")
    return out
