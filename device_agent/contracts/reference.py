"""The ``reference.json`` format: what in-distribution traffic looks like, for drift checks.

A bundle may carry reference statistics (the manifest's ``reference_file``), computed on the
host by :func:`sdk.reference.reference_stats`: the prediction histogram (label -> fraction of
samples, every known label listed, zeros included) and the outlier-score histogram on the
protocol's fixed :data:`~device_agent.contracts.messages.SCORE_BUCKETS` (``le`` semantics, the
last count above the last bound: the same binning as telemetry), with score quantiles and the
share of samples over the detector's threshold. The collector compares the fleet's telemetry
with it (:mod:`collector.drift`).

This module owns the file's schema (format ``edgeship.reference``, version 1; documented in
``docs/collector.md``): :class:`ReferenceStats` and :func:`load_reference` read and validate it
with the standard library alone, so the collector reads it without numpy or a runtime.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.contracts.errors import ConfigError
from device_agent.contracts.messages import SCORE_BUCKETS

__all__ = [
    "QUANTILES",
    "REFERENCE_FORMAT",
    "REFERENCE_NAME",
    "REFERENCE_VERSION",
    "ReferenceStats",
    "load_reference",
]

REFERENCE_FORMAT = "edgeship.reference"
REFERENCE_VERSION = 1
REFERENCE_NAME = "reference.json"
# Score quantiles recorded in the file (keys are these numbers written with repr()).
QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)


@dataclass(frozen=True)
class ReferenceStats:
    """The parsed ``reference.json``. ``predictions`` maps every label to its fraction of
    ``samples`` (empty for a model that is not a classifier); ``score_counts`` has one more
    entry than ``score_bounds`` and is empty without a detector."""

    samples: int
    predictions: Mapping[str, float]
    prediction_counts: Mapping[str, int]
    score_bounds: tuple[float, ...] = tuple(SCORE_BUCKETS)
    score_counts: tuple[int, ...] = ()
    score_quantiles: Mapping[str, float] = field(default_factory=dict)
    detector: str | None = None
    threshold: float | None = None
    outlier_rate: float | None = None
    model: str | None = None
    model_version: str | None = None
    dataset: str = ""
    created: str = ""

    @property
    def scored(self) -> int:
        """How many samples the score histogram holds (0 without a detector)."""
        return sum(self.score_counts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REFERENCE_FORMAT,
            "version": REFERENCE_VERSION,
            "created": self.created,
            "model": self.model,
            "model_version": self.model_version,
            "dataset": self.dataset,
            "samples": self.samples,
            "predictions": dict(self.predictions),
            "prediction_counts": dict(self.prediction_counts),
            "scores": None
            if not self.score_counts
            else {
                "detector": self.detector,
                "threshold": self.threshold,
                "bounds": list(self.score_bounds),
                "counts": list(self.score_counts),
                "quantiles": dict(self.score_quantiles),
                "outlier_rate": self.outlier_rate,
            },
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "reference") -> ReferenceStats:
        """Validate a parsed ``reference.json``; raises ConfigError naming the field."""
        obj = _obj(data, where)
        if obj.get("format") != REFERENCE_FORMAT:
            raise ConfigError(
                f"{where}.format: expected {REFERENCE_FORMAT!r}, got {obj.get('format')!r}; "
                "this is not an edgeship reference file"
            )
        version = obj.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"{where}.version: expected a positive integer, got {version!r}")
        if version > REFERENCE_VERSION:
            raise ConfigError(
                f"{where}.version {version} is newer than this edgeship ({REFERENCE_VERSION}); "
                "upgrade edgeship"
            )
        samples = _count(obj.get("samples"), f"{where}.samples")
        preds = _obj(obj.get("predictions", {}), f"{where}.predictions")
        fractions = {
            _label(k, f"{where}.predictions"): _fraction(v, f"{where}.predictions.{k}")
            for k, v in preds.items()
        }
        if fractions and abs(sum(fractions.values()) - 1.0) > 1e-6:
            raise ConfigError(
                f"{where}.predictions: fractions add up to {sum(fractions.values()):.6g}, not 1"
            )
        counts_raw = _obj(obj.get("prediction_counts", {}), f"{where}.prediction_counts")
        counts = {
            _label(k, f"{where}.prediction_counts"): _count(v, f"{where}.prediction_counts.{k}")
            for k, v in counts_raw.items()
        }
        scores = obj.get("scores")
        if scores is None:
            return cls(
                samples=samples,
                predictions=fractions,
                prediction_counts=counts,
                score_counts=(),
                model=_opt_str(obj.get("model"), f"{where}.model"),
                model_version=_opt_str(obj.get("model_version"), f"{where}.model_version"),
                dataset=str(obj.get("dataset") or ""),
                created=str(obj.get("created") or ""),
            )
        s = _obj(scores, f"{where}.scores")
        bounds = tuple(_num(b, f"{where}.scores.bounds") for b in _list(s.get("bounds"), where))
        if any(b <= a for a, b in itertools.pairwise(bounds)):
            raise ConfigError(f"{where}.scores.bounds: must be strictly increasing")
        score_counts = tuple(
            _count(c, f"{where}.scores.counts") for c in _list(s.get("counts"), where)
        )
        if len(score_counts) != len(bounds) + 1:
            raise ConfigError(
                f"{where}.scores.counts: {len(score_counts)} counts for {len(bounds)} bounds; "
                f"expected {len(bounds) + 1}"
            )
        quantiles = {
            str(k): _num(v, f"{where}.scores.quantiles.{k}")
            for k, v in _obj(s.get("quantiles", {}), f"{where}.scores.quantiles").items()
        }
        threshold = s.get("threshold")
        rate = s.get("outlier_rate")
        return cls(
            samples=samples,
            predictions=fractions,
            prediction_counts=counts,
            score_bounds=bounds,
            score_counts=score_counts,
            score_quantiles=quantiles,
            detector=_opt_str(s.get("detector"), f"{where}.scores.detector"),
            threshold=None if threshold is None else _num(threshold, f"{where}.scores.threshold"),
            outlier_rate=None if rate is None else _fraction(rate, f"{where}.scores.outlier_rate"),
            model=_opt_str(obj.get("model"), f"{where}.model"),
            model_version=_opt_str(obj.get("model_version"), f"{where}.model_version"),
            dataset=str(obj.get("dataset") or ""),
            created=str(obj.get("created") or ""),
        )


def load_reference(path: str | Path) -> ReferenceStats:
    """Read and validate a ``reference.json``; raises ConfigError naming the file and field."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"reference statistics not found: {p}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: cannot read reference statistics: {exc}") from exc
    return ReferenceStats.from_dict(data, where=p.name)


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _fraction(value: Any, where: str) -> float:
    out = _num(value, where)
    if not 0.0 <= out <= 1.0:
        raise ConfigError(f"{where}: {out} is not a fraction in [0, 1]")
    return out


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _label(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise ConfigError(f"{where}: {value!r} is not a label of 1 to 128 characters")
    return value


def _opt_str(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string or null, got {value!r}")
    return value
