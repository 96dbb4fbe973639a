"""Outlier events: which flagged inputs become an ``outliers`` message, and the message.

An input the detector flags is queued for the agent's events thread as one event, at most
``outlier_events_per_min`` of them (a token bucket with bursts of up to 10 s worth); the
others are counted, and the next event reports how many were held back (``suppressed``). A
full work queue holds an event back the same way. Publishing happens on the events thread.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from device_agent.contracts import messages as msg
from device_agent.contracts.bundle import ModelInfo
from device_agent.slot import LoadedModel

__all__ = ["OutlierEvents"]


class _TokenBucket:
    """``per_min`` tokens a minute, at most 10 s worth saved up."""

    def __init__(self, per_min: float, clock: Callable[[], float]) -> None:
        self._rate = per_min / 60.0
        self._cap = max(1.0, per_min / 6.0)  # bursts of up to 10 s worth
        self._tokens = self._cap
        self._clock = clock
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._cap, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class OutlierEvents:
    """The outlier events of one agent: :meth:`queue` on the caller's thread (a
    :class:`~device_agent.slot.OutlierSink`), :meth:`publish` on the events thread, to
    :attr:`publisher` once the agent has one. ``put`` hands an event to the events thread
    (raising :class:`queue.Full` when it has no room)."""

    def __init__(
        self,
        *,
        device: str,
        boot: str,
        per_min: float,
        sample_values: int,
        clock: Callable[[], float],
        put: Callable[[tuple[str, Any]], None],
    ) -> None:
        self._device = device
        self._boot = boot
        self._sample_values = sample_values
        self._clock = clock
        self._put = put
        self._bucket = _TokenBucket(per_min, time.monotonic)
        self.suppressed = 0
        self.publisher: Any = None

    def queue(
        self,
        loaded: LoadedModel,
        feed: Mapping[str, np.ndarray],
        scores: np.ndarray | None,
        flags: np.ndarray,
        classes: np.ndarray | None,
    ) -> None:
        assert scores is not None and loaded.detector is not None
        first_input = loaded.io.inputs[0].name
        labels_of = loaded.labels
        model = loaded.model
        threshold = loaded.detector.threshold
        for i in np.flatnonzero(flags):
            if not self._bucket.take():
                self.suppressed += 1
                continue
            label = None
            if classes is not None and labels_of is not None:
                label = labels_of[int(classes[i])]
            sample = feed[first_input][i].copy()
            item = (float(scores[i]), label, sample, self._clock(), model, threshold)
            try:
                self._put(("outlier", item))
            except queue.Full:
                self.suppressed += 1

    def publish(
        self,
        score: float,
        label: str | None,
        sample: np.ndarray,
        ts: float,
        model: ModelInfo,
        threshold: float,
    ) -> None:
        if self.publisher is None:
            return
        suppressed, self.suppressed = self.suppressed, 0
        try:
            self._publish_event(score, label, sample, ts, model, threshold, suppressed)
        except BaseException:
            # This event is lost: the next one reports it as held back, with the others.
            self.suppressed += suppressed + 1
            raise

    def _publish_event(
        self,
        score: float,
        label: str | None,
        sample: np.ndarray,
        ts: float,
        model: ModelInfo,
        threshold: float,
        suppressed: int,
    ) -> None:
        assert self.publisher is not None
        summary = msg.InputSummary.of(sample, sample=self._sample_values)

        def payload(seq: int) -> bytes:
            return msg.encode(
                msg.OutlierEvent(
                    device=self._device,
                    boot=self._boot,
                    seq=seq,
                    ts=ts,
                    score=score,
                    threshold=threshold,
                    prediction=label,
                    input=summary,
                    model=model.name,
                    model_version=model.version,
                    suppressed=suppressed,
                )
            )

        self.publisher.publish("outliers", payload)
