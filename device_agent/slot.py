"""The agent's model slot: the model that runs now, how it is swapped, and predict on it.

:class:`ModelSlot` is what :class:`~device_agent.agent.Agent` and the remote deploy code
(:mod:`device_agent.deploy`) share: the agent predicts through it, the deployer swaps a newly
deployed model in (and back out on a rollback) through it. :class:`LoadedModel` is one verified
bundle ready to run. Nothing here touches the disk or the network: the slot records each call
in its telemetry window and hands flagged inputs to a callback (the agent queues them).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Protocol

import numpy as np

from device_agent.agent_config import AgentConfig
from device_agent.bundle import Bundle
from device_agent.contracts.bundle import IOSpec, ModelInfo
from device_agent.detectors import ThresholdedDetector, load_detector
from device_agent.errors import BundleError, EdgeshipError
from device_agent.runtime import FeedChecker, ModelSession
from device_agent.telemetry import WindowAggregator

__all__ = [
    "CallWatch",
    "LoadedModel",
    "ModelSlot",
    "OutlierSink",
    "Prediction",
    "Probation",
    "describe_failure",
]


# The is_outlier array of a batch of one, shared by every such result (read-only).
_FLAGGED = np.ones(1, dtype=bool)
_NOT_FLAGGED = np.zeros(1, dtype=bool)
_FLAGGED.flags.writeable = _NOT_FLAGGED.flags.writeable = False


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 0.3 us more per call
class Prediction:
    """The result of one :meth:`Agent.predict` call (a batch of ``n`` samples).

    ``scores`` and ``is_outlier`` have one entry per sample (``scores`` is None without a
    detector, and ``is_outlier`` then all False). ``labels`` holds the predicted class label
    per sample when output 0 is a classifier's (batch, classes) output. For a batch of one,
    ``is_outlier`` is a shared read-only array (copy it to change it).
    """

    outputs: list[np.ndarray]
    scores: np.ndarray | None
    is_outlier: np.ndarray
    labels: list[str] | None
    latency_s: float

    @property
    def score(self) -> float | None:
        """The first sample's score (the common batch-of-one case)."""
        return None if self.scores is None else float(self.scores[0])


class LoadedModel:
    """One verified bundle ready to run: its session, input checker, detector and labels.

    A :class:`ModelSlot` reads its's current ``LoadedModel`` once per call, so a remote
    deploy swaps models by replacing that one reference: calls in flight finish on the model
    they started with, and no call ever sees the new session with the old detector. ``trial``
    is set while a newly deployed bundle is on probation (a :class:`Probation`, see
    :mod:`device_agent.deploy`).
    """

    __slots__ = (
        "bundle",
        "check",
        "detector",
        "labels",
        "run",
        "run_lock",
        "score_in_graph",
        "session",
        "threshold",
        "trial",
    )

    def __init__(self, bundle: Bundle, session: ModelSession) -> None:
        self.bundle = bundle
        self.session = session
        m = bundle.manifest
        self.check = FeedChecker(m.io)
        self.labels = _classifier_labels(m.io)
        self.detector: ThresholdedDetector | None = None
        if m.detector is not None:
            det = load_detector(m.detector, bundle.path_of(m.detector.params_file))
            self.detector = ThresholdedDetector(det, m.detector.threshold)
        self.threshold = math.inf if self.detector is None else self.detector.threshold
        # A bundle whose model computes the detector's score itself (detector.graph_output):
        # one run gives the outputs and, last, the score; numpy scoring is the fallback.
        graph_output = None if m.detector is None else m.detector.graph_output
        self.score_in_graph = graph_output is not None and graph_output in getattr(
            session, "hidden_outputs", ()
        )
        runner = getattr(session, "runner", None)  # ONNX Runtime: skips a second name check
        self.run: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]] = (
            session.run if runner is None else runner(hidden=self.score_in_graph)
        )
        # LiteRT interpreters are not safe to call from two threads; ORT sessions are.
        self.run_lock: threading.Lock | None = (
            threading.Lock() if session.runtime == "litert" else None
        )
        self.trial: Probation | None = None

    @classmethod
    def open(cls, bundle: Bundle, config: AgentConfig) -> LoadedModel:
        """Open ``bundle``'s model with the runtime its manifest names."""
        session = bundle.open_model(
            model_key_file=config.model_key_file,
            threads=config.threads,
            providers=config.providers,
        )
        return cls(bundle, session)

    @classmethod
    def open_tested(cls, bundle: Bundle, config: AgentConfig) -> LoadedModel:
        """:meth:`open`, then one inference on generated inputs of the manifest's shapes:
        BundleError unless it succeeds, gives the manifest's outputs and finite floats (a
        remote deploy swaps in only a model that passed this)."""
        from device_agent.benchmark import sample_inputs

        new = cls.open(bundle, config)
        io = bundle.manifest.io
        # The same steps as Agent.predict: the checker, the run predict uses (with the score
        # output when the detector is in the graph), then the score.
        try:
            feed = new.check(sample_inputs(io))
            outputs = new.run(feed)
            if new.score_in_graph:
                scores = outputs.pop()
            elif new.detector is not None:
                scores = new.detector.score(feed, outputs)
            else:
                scores = np.zeros(1)
        except Exception as exc:  # MemoryError, a detector's numpy error...: all a refusal
            raise BundleError(f"the self-test inference failed: {describe_failure(exc)}") from exc
        if not np.isfinite(scores).all():
            raise BundleError("the self-test gave a non-finite outlier score")
        if len(outputs) != len(io.outputs):
            raise BundleError(
                f"the self-test gave {len(outputs)} outputs; the manifest lists {len(io.outputs)}"
            )
        for spec, out in zip(io.outputs, outputs, strict=True):
            if out.dtype.kind == "f" and not np.isfinite(out).all():
                raise BundleError(f"the self-test gave non-finite values in output {spec.name!r}")
        return new

    @property
    def io(self) -> IOSpec:
        return self.bundle.manifest.io

    @property
    def model(self) -> ModelInfo:
        return self.bundle.manifest.model


def describe_failure(exc: BaseException) -> str:
    """An exception as one line: an EdgeshipError's message, else its type and first line."""
    if isinstance(exc, EdgeshipError):
        return str(exc)
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    kind = type(exc).__name__
    return f"{kind}: {lines[0]}" if lines else kind


def _classifier_labels(io: IOSpec) -> tuple[str, ...] | None:
    out = io.outputs[0]
    if len(out.shape) != 2 or not isinstance(out.shape[1], int) or out.shape[1] < 2:
        return None
    if out.labels is not None and len(out.labels) == out.shape[1]:
        return tuple(out.labels)
    return tuple(str(i) for i in range(out.shape[1]))


class Probation(Protocol):
    """A newly deployed model's probation (:mod:`device_agent.probation`), as the slot sees it."""

    def passed(self, feed: Mapping[str, np.ndarray], result: Prediction) -> None:
        """One inference on the new model succeeded with ``result`` on the checked ``feed``
        (called on the caller's thread, after the call's outliers were handed on): the
        probation counts it and judges the model's health on its own thread."""

    def failed(self, inputs: Mapping[str, Any], exc: EdgeshipError) -> Prediction:
        """The new model failed on ``inputs``: answer with the previous model (rolling back)
        or re-raise ``exc`` when that one fails too."""


class OutlierSink(Protocol):
    """Takes the flagged samples of one call: the model, its feed, scores, flags, classes."""

    def __call__(
        self,
        loaded: LoadedModel,
        feed: Mapping[str, np.ndarray],
        scores: np.ndarray | None,
        flags: np.ndarray,
        classes: np.ndarray | None,
    ) -> None: ...


class CallWatch:
    """The application's calls as the agent sees them while something else runs beside them
    (a candidate being timed): each call's latency (the first :attr:`MAX_SAMPLES`) and the
    failed calls. Set as :attr:`ModelSlot.watch`; thread-safe."""

    MAX_SAMPLES = 200_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self.calls = 0
        self.failed = 0
        self._started = perf_counter()

    def record(self, latency_s: float) -> None:
        with self._lock:
            self.calls += 1
            if len(self._latencies) < self.MAX_SAMPLES:
                self._latencies.append(latency_s)

    def fail(self) -> None:
        with self._lock:
            self.calls += 1
            self.failed += 1

    def summary(self) -> dict[str, Any]:
        """``calls``, ``failed``, ``seconds`` watched and ``latency_ms`` (p50, p95, max; None
        without a successful call)."""
        with self._lock:
            lat = np.asarray(self._latencies, dtype=np.float64) * 1e3
            calls, failed = self.calls, self.failed
        latency = None
        if lat.size:
            p50, p95 = (float(v) for v in np.percentile(lat, [50, 95]))
            latency = {"p50": p50, "p95": p95, "max": float(lat.max())}
        return {
            "calls": calls,
            "failed": failed,
            "seconds": perf_counter() - self._started,
            "latency_ms": latency,
        }


class ModelSlot:
    """The model that runs now: predict on it, swap another in. Thread-safe.

    :meth:`predict` reads :attr:`loaded` once per call and :meth:`swap` replaces that one
    reference, so calls in flight finish on the model they started with. Every call is counted
    in :attr:`aggregator` (the telemetry window); flagged samples go to :attr:`on_outliers` when
    it is set. :attr:`on_relabel` is called before a swap to a model with other class labels,
    to close the window under the old labels and set a new :attr:`aggregator`; without it the
    window starts over.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.aggregator = WindowAggregator(labels=loaded.labels or ())
        self.on_outliers: OutlierSink | None = None
        self.on_relabel: Callable[[LoadedModel], None] | None = None
        self.watch: CallWatch | None = None

    def swap(self, new: LoadedModel) -> LoadedModel:
        """Make ``new`` the model every following :meth:`predict` uses; return the old one.

        One reference assignment: calls in flight finish on the model they started with. When
        the classes' labels differ, the window is closed first (:attr:`on_relabel`) so no
        window names one model's predictions with the other's labels.
        """
        old = self.loaded
        if new.labels != old.labels:
            relabel = self.on_relabel
            if relabel is None:
                self.aggregator = WindowAggregator(labels=new.labels or ())
            else:
                relabel(new)
        self.loaded = new
        return old

    def predict(self, inputs: Mapping[str, Any], loaded: LoadedModel | None = None) -> Prediction:
        """Run the current model (or ``loaded``: the previous one, which a deploy on probation
        falls back to) on ``inputs`` (input name -> array with a batch axis), score them and
        count the call in the window. A model on probation that fails is handed to its
        :class:`Probation`, which answers or re-raises."""
        # The hot path: every line here costs on each call (about 0.1 us per attribute or
        # numpy scalar operation), so the common case avoids loops, copies and numpy calls,
        # and the agent's predict calls this directly (one Python frame less per call).
        if loaded is None:
            loaded = self.loaded
        try:
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
        except EdgeshipError as exc:
            self.aggregator.record_error()
            watch = self.watch
            if watch is not None:
                watch.fail()
            trial = loaded.trial
            if trial is None:
                raise
            # A deployed bundle on probation failed: the deployer answers with the previous
            # model when it can, and rolls back if that one succeeds where the new one failed.
            return trial.failed(inputs, exc)
        watch = self.watch
        if watch is not None:
            watch.record(latency)
        first = outputs[0]
        labels_of = loaded.labels
        classes = first.argmax(axis=1) if labels_of is not None and first.ndim == 2 else None
        record = self.aggregator.record
        if scores is not None and scores.shape[0] == 1:
            # A batch of one, the common case: scalar work, no loop, one small array.
            score = float(scores[0])
            outlier = score > loaded.threshold
            flags = _FLAGGED if outlier else _NOT_FLAGGED
            if classes is None or labels_of is None:
                record(latency, None, score, outlier)
                labels = None
            else:
                cls = int(classes[0])
                record(latency, cls, score, outlier)
                labels = [labels_of[cls]]
        else:
            if scores is None:
                flags = np.zeros(first.shape[0] if first.ndim else 1, dtype=bool)
            else:
                flags = scores > loaded.threshold
            outlier = bool(flags.any())
            class_list = None if classes is None else classes.tolist()
            score_list = None if scores is None else scores.tolist()
            for i, flag in enumerate(flags.tolist()):
                record(
                    latency,
                    None if class_list is None else class_list[i],
                    None if score_list is None else score_list[i],
                    flag,
                )
            labels = (
                None
                if class_list is None or labels_of is None
                else [labels_of[c] for c in class_list]
            )
        if outlier:
            sink = self.on_outliers
            if sink is not None:
                sink(loaded, feed, scores, flags, classes)
        result = Prediction(outputs, scores, flags, labels, latency)
        trial = loaded.trial  # read once: another thread may end the probation meanwhile
        if trial is not None:
            trial.passed(feed, result)
        return result
