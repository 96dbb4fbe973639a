"""A bundle's reference statistics: what in-distribution traffic looks like, for drift checks.

:func:`reference_stats` runs the model (through :func:`device_agent.runtime.open_session`, the
session the agent uses on the board) and its outlier detector over in-distribution data and
summarizes what the collector later compares the fleet's telemetry with:

* the **prediction histogram**: label -> fraction of samples, counted the way the agent counts
  them (argmax of the first output when it is ``(batch, classes)``, named by the bundle's
  labels or by the class index), every known label listed, zeros included;
* the **outlier-score histogram** on the protocol's fixed :data:`SCORE_BUCKETS` (``le``
  semantics, the last count above the last bound: the same binning as telemetry), score
  quantiles and the share of samples over the detector's threshold.

:func:`write_reference` writes it as ``reference.json`` (format ``edgeship.reference``, version
1; documented in ``docs/collector.md``), which ``sdk.package(..., reference=path)`` copies into
the bundle and records as the manifest's ``reference_file``. The file's format,
:class:`ReferenceStats` and :func:`load_reference` (reading and validating it), is
:mod:`device_agent.contracts.reference`, re-exported here; the collector reads it from there.
numpy and the runtime are imported when statistics are computed, not when a file is read.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent.contracts.bundle import DetectorSpec
from device_agent.contracts.messages import SCORE_BUCKETS
from device_agent.contracts.reference import (
    QUANTILES,
    REFERENCE_FORMAT,
    REFERENCE_NAME,
    REFERENCE_VERSION,
    ReferenceStats,
    load_reference,
)
from sdk.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sdk.data import DataSource

__all__ = [
    "QUANTILES",
    "REFERENCE_FORMAT",
    "REFERENCE_NAME",
    "REFERENCE_VERSION",
    "ReferenceStats",
    "load_reference",
    "reference_stats",
    "write_reference",
]


def reference_stats(
    model_path: str | Path,
    detector: tuple[DetectorSpec, str | Path] | None,
    dataset: DataSource,
    labels: Sequence[str] | None = None,
    *,
    model: str | None = None,
    model_version: str | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Reference statistics of ``model_path`` (and its detector) on in-distribution ``dataset``.

    ``detector`` is ``(spec, params_path)`` as for ``sdk.package`` (None: no score histogram);
    ``dataset`` anything :func:`sdk.data.load_dataset` reads (held-out eval data is best: the
    detector was fitted on the calibration data, whose scores are optimistic). ``labels`` names
    the classes (default: the model's output labels, else the class index, as on the board).
    Returns the ``reference.json`` document; :func:`write_reference` writes it.
    """
    import numpy as np

    from device_agent.detectors import load_detector
    from device_agent.runtime import FeedChecker, open_session
    from sdk.data import load_dataset, take_samples

    session = open_session(model_path)
    io = session.io
    data = load_dataset(dataset, io, what="reference data")
    n = len(data)
    if n == 0:
        raise DataError("reference data: no samples")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    det = None if detector is None else load_detector(detector[0], detector[1])
    class_names = _class_names(io.outputs[0].shape, io.outputs[0].labels, labels)
    fixed = io.fixed_batch
    chunk = fixed or batch_size
    check = FeedChecker(io)
    classes: list[Any] = []
    scores: list[Any] = []
    for start in range(0, n, chunk):
        part = take_samples(data.inputs, start, start + chunk)  # rank-0 constants stay as they are
        real = min(chunk, n - start)
        if fixed is not None and real < fixed:
            # Repeat the last sample to fill a fixed batch axis; the padding is sliced off.
            part = {
                k: v
                if v.ndim == 0
                else np.concatenate([v, np.repeat(v[-1:], fixed - real, axis=0)])
                for k, v in part.items()
            }
        feed = check(part)
        outputs = session.run(feed)
        if class_names is not None:
            out0 = np.asarray(outputs[0])
            if out0.ndim == 2:
                classes.append(out0.argmax(axis=1)[:real])
        if det is not None:
            scores.append(np.asarray(det.score(feed, outputs), dtype=np.float64)[:real])
    counts: dict[str, int] = {}
    if class_names is not None and classes:
        per_class = np.bincount(np.concatenate(classes), minlength=len(class_names))
        counts = {name: int(c) for name, c in zip(class_names, per_class, strict=True)}
    predicted = sum(counts.values())
    doc: dict[str, Any] = {
        "format": REFERENCE_FORMAT,
        "version": REFERENCE_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "model_version": model_version,
        "dataset": data.name,
        "samples": n,
        "predictions": {k: (c / predicted if predicted else 0.0) for k, c in counts.items()},
        "prediction_counts": counts,
        "scores": None,
    }
    if not predicted:
        doc["predictions"] = {}
    if det is not None and detector is not None:
        s = np.concatenate(scores) if scores else np.zeros(0)
        s = s[np.isfinite(s)]  # the agent does not bin NaN scores either
        bounds = np.asarray(SCORE_BUCKETS, dtype=np.float64)
        # side="left" is bisect_left: a score equal to a bound falls in that bound's bucket.
        buckets = np.bincount(np.searchsorted(bounds, s, side="left"), minlength=len(bounds) + 1)
        spec = detector[0]
        doc["scores"] = {
            "detector": spec.kind,
            "threshold": spec.threshold,
            "bounds": list(SCORE_BUCKETS),
            "counts": [int(c) for c in buckets],
            "quantiles": {repr(q): float(np.quantile(s, q)) for q in QUANTILES} if s.size else {},
            "outlier_rate": float(np.mean(s > spec.threshold)) if s.size else None,
        }
    ReferenceStats.from_dict(doc)  # what we write is always what we can read
    return doc


def write_reference(path: str | Path, stats: Mapping[str, Any] | ReferenceStats) -> Path:
    """Write reference statistics (the dict :func:`reference_stats` returns, or a
    :class:`ReferenceStats`) to ``path`` as JSON, after validating them. Returns the path."""
    doc = stats.to_dict() if isinstance(stats, ReferenceStats) else dict(stats)
    ReferenceStats.from_dict(doc)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return out


def _class_names(
    shape: Sequence[int | str], spec_labels: Sequence[str] | None, labels: Sequence[str] | None
) -> tuple[str, ...] | None:
    """The agent's rule (``Agent._classifier_labels``): a ``(batch, C >= 2)`` first output is a
    classifier, named by the labels when there is one per class, else by the index."""
    if len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 2:
        if labels is not None:
            raise ConfigError(
                f"labels were given, but the model's first output {tuple(shape)} is not "
                "(batch, classes)"
            )
        return None
    classes = shape[1]
    for names in (labels, spec_labels):
        if names is not None:
            if len(names) != classes:
                if names is labels:
                    raise ConfigError(f"{len(names)} labels for a model with {classes} classes")
                continue
            if len(set(names)) != len(names):
                raise ConfigError("labels must be distinct")
            return tuple(names)
    return tuple(str(i) for i in range(classes))
