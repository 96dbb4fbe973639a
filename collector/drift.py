"""Drift: does a device's recent traffic still look like the traffic its model was made for?

Per device and per model version, the prediction histogram and the outlier-score histogram of
the newest telemetry windows are compared with an expected distribution by the **population
stability index**::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

    e_i = max(E_i / sum(E), epsilon)      expected share of bin i (a label, or a score bucket)
    a_i = max(A_i / sum(A), epsilon)      actual share of bin i in the recent windows

over the union of the bins either side has (every label of the reference, every label the
device predicted; the protocol's fixed score buckets). ``epsilon`` (1e-4) stands in for an
empty bin, whose share would otherwise make the logarithm infinite; a bin empty on both sides
adds nothing. PSI is the symmetrised Kullback-Leibler divergence, 0 for identical
distributions. The usual reading, used for the thresholds here: **below 0.1 stable, 0.1 to
0.25 moderate shift, 0.25 and above significant shift**. A drift alert fires at
``significant`` and resolves only below ``moderate`` (hysteresis, so it does not flap).

**What the recent traffic is.** The newest ``windows`` (K, default 3) telemetry windows of the
device's current model version, extended back (up to ``max_windows``) until they hold
``min_samples`` predictions (default 300); with fewer, there is no verdict (``insufficient``).
Why the floor: on ``n`` samples over ``k`` bins an unshifted device still shows PSI of about
``(k - 1) / n`` on average (sampling noise, a chi-square with k - 1 degrees of freedom over n),
so ``n`` must be large against ``k / 0.25`` for a quiet fleet to raise no false alarms.

**What the expected distribution is.** The bundle's reference statistics (``reference.json``,
made on the host by :func:`sdk.reference.reference_stats`) when the collector was given them
(:class:`ReferenceSet`: ``edgeship collect --reference``); otherwise the device's **own first
windows** of that model version: the first ``baseline_windows`` (N, default 10) windows this
collector process saw, extended until they hold ``baseline_samples`` (1000). That fallback
only notices a change *after* the collector started watching: a device that was already
drifting when first seen looks stable, and a restarted collector learns its baselines again.
A new model version starts over (new baseline, new window).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from collector.errors import ConfigError
from collector.ingest import TelemetryRecord
from device_agent.contracts.messages import SCORE_BUCKETS
from device_agent.contracts.reference import REFERENCE_NAME, ReferenceStats, load_reference

__all__ = [
    "EPSILON",
    "MODERATE_PSI",
    "SIGNIFICANT_PSI",
    "DriftConfig",
    "DriftLevel",
    "DriftMonitor",
    "DriftResult",
    "Reference",
    "ReferenceSet",
    "load_reference_spec",
    "psi",
]

EPSILON = 1e-4
MODERATE_PSI = 0.1
SIGNIFICANT_PSI = 0.25
_STD_SCORES = tuple(SCORE_BUCKETS)

DriftLevel: TypeAlias = Literal["ok", "moderate", "significant", "insufficient", "learning"]
Basis: TypeAlias = Literal["reference", "baseline"]


def psi(
    expected: Mapping[str, float] | Sequence[float],
    actual: Mapping[str, float] | Sequence[float],
    *,
    epsilon: float = EPSILON,
) -> float:
    """The population stability index of ``actual`` against ``expected``.

    Both are counts or shares (each side is normalised to sum 1), either as sequences over the
    same bins or as mappings of bin name to value (a name missing on one side is 0 there).
    Shares below ``epsilon`` are raised to it. Raises ConfigError for negative values, bins
    that do not line up, or a side that is all zeros.
    """
    if isinstance(expected, Mapping) or isinstance(actual, Mapping):
        if not (isinstance(expected, Mapping) and isinstance(actual, Mapping)):
            raise ConfigError("psi: pass two mappings or two sequences, not one of each")
        names = sorted(set(expected) | set(actual))
        e_vals = [float(expected.get(n, 0.0)) for n in names]
        a_vals = [float(actual.get(n, 0.0)) for n in names]
    else:
        if len(expected) != len(actual):
            raise ConfigError(f"psi: {len(expected)} expected bins but {len(actual)} actual ones")
        e_vals = [float(v) for v in expected]
        a_vals = [float(v) for v in actual]
    if not 0.0 < epsilon < 1.0:
        raise ConfigError(f"psi: epsilon {epsilon} is not in (0, 1)")
    if any(v < 0 or not math.isfinite(v) for v in (*e_vals, *a_vals)):
        raise ConfigError("psi: counts and shares must be finite and non-negative")
    e_total, a_total = sum(e_vals), sum(a_vals)
    if e_total <= 0 or a_total <= 0:
        raise ConfigError("psi: a distribution with no mass has no shares to compare")
    out = 0.0
    for e_raw, a_raw in zip(e_vals, a_vals, strict=True):
        if e_raw == 0.0 and a_raw == 0.0:
            continue
        e = max(e_raw / e_total, epsilon)
        a = max(a_raw / a_total, epsilon)
        out += (a - e) * math.log(a / e)
    return out


# --- references -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """Reference statistics for ``model`` at ``version`` (None: any version of ``model``).
    ``p95_budget_ms`` is the bundle's p95 latency budget, when it came from a bundle that has
    one (the ``p95_latency`` alert uses it)."""

    model: str
    version: str | None
    stats: ReferenceStats
    source: str
    p95_budget_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_version": self.version,
            "source": self.source,
            "samples": self.stats.samples,
            "labels": len(self.stats.predictions),
            "scored": self.stats.scored,
            "detector": self.stats.detector,
            "p95_budget_ms": self.p95_budget_ms,
        }


def load_reference_spec(spec: str) -> Reference:
    """Read one ``--reference`` argument. Forms:

    * ``path/to/bundle`` — a bundle directory (verified): its manifest names the model and
      version and its ``reference_file``; its budget's p95 becomes the latency threshold;
    * ``NAME=path/to/bundle`` — the same, registered under model name ``NAME``;
    * ``NAME=path/reference.json`` — a bare reference file for every version of ``NAME``;
    * ``NAME@VERSION=path/reference.json`` — for that version only.

    Raises ConfigError (or BundleError for a bundle that fails verification).
    """
    name: str | None = None
    version: str | None = None
    target = spec
    if "=" in spec:
        key, _, target = spec.partition("=")
        name, _, ver = key.partition("@")
        version = ver or None
        if not name:
            raise ConfigError(f"--reference {spec!r}: expected NAME[@VERSION]=PATH or a bundle")
    path = Path(target)
    if path.is_dir():
        from device_agent.bundle import load_bundle

        bundle = load_bundle(path)
        m = bundle.manifest
        if m.reference_file is None:
            raise ConfigError(
                f"--reference {spec!r}: bundle {path} has no reference statistics (make them "
                "with sdk.reference.reference_stats and package(..., reference=...))"
            )
        if version is not None and version != m.model.version:
            raise ConfigError(
                f"--reference {spec!r}: the bundle holds version {m.model.version!r}, "
                f"not {version!r}"
            )
        stats = load_reference(bundle.path_of(m.reference_file))
        budget = (m.budget or {}).get("p95_ms")
        return Reference(
            model=name or m.model.name,
            version=m.model.version,
            stats=stats,
            source=str(path),
            p95_budget_ms=float(budget) if isinstance(budget, int | float) else None,
        )
    if name is None:
        raise ConfigError(
            f"--reference {spec!r}: not a bundle directory; a bare {REFERENCE_NAME} needs the "
            "model's name: NAME[@VERSION]=path/reference.json"
        )
    return Reference(model=name, version=version, stats=load_reference(path), source=str(path))


class ReferenceSet:
    """References by model and version; thread-safe. :meth:`lookup` prefers an exact version
    and falls back to a reference registered for every version of the model."""

    def __init__(self, references: Sequence[Reference] = ()) -> None:
        self._lock = threading.Lock()
        self._refs: dict[tuple[str, str | None], Reference] = {}
        for r in references:
            self.add(r)

    @classmethod
    def from_specs(cls, specs: Sequence[str]) -> ReferenceSet:
        return cls([load_reference_spec(s) for s in specs])

    def add(self, reference: Reference) -> None:
        with self._lock:
            self._refs[(reference.model, reference.version)] = reference

    def lookup(self, model: str | None, version: str | None) -> Reference | None:
        if model is None:
            return None
        with self._lock:
            return self._refs.get((model, version)) or self._refs.get((model, None))

    def __iter__(self) -> Iterator[Reference]:
        with self._lock:
            return iter(list(self._refs.values()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._refs)


# --- the monitor ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftConfig:
    """``windows`` (K): the recent windows compared; extended back up to ``max_windows`` until
    they hold ``min_samples`` predictions (or scores). ``baseline_windows`` (N): the first
    windows of a device that serve as its expected distribution when there is no reference,
    extended until they hold ``baseline_samples`` predictions (a baseline is itself a sample:
    its noise adds ``(k - 1) / baseline_samples`` to the PSI of an unshifted device).
    ``moderate``/``significant``: PSI levels (a drift alert fires at ``significant`` and
    resolves below ``moderate``)."""

    windows: int = 3
    min_samples: int = 300
    max_windows: int = 30
    baseline_windows: int = 10
    baseline_samples: int = 1000
    epsilon: float = EPSILON
    moderate: float = MODERATE_PSI
    significant: float = SIGNIFICANT_PSI

    def __post_init__(self) -> None:
        if not 1 <= self.windows <= self.max_windows <= 10_000:
            raise ConfigError("drift: need 1 <= windows <= max_windows <= 10000")
        if min(self.min_samples, self.baseline_windows, self.baseline_samples) < 1:
            raise ConfigError("drift: min_samples, baseline_windows, baseline_samples must be >= 1")
        if not 0.0 < self.epsilon < 0.01:
            raise ConfigError("drift: epsilon must be in (0, 0.01)")
        if not 0.0 < self.moderate <= self.significant:
            raise ConfigError("drift: need 0 < moderate <= significant")


@dataclass(frozen=True)
class DriftResult:
    """The newest verdict for one device. ``psi`` is the larger of the two histograms' PSI
    (None where a histogram had too few samples or nothing to compare with)."""

    fleet: str
    device: str
    model: str | None
    model_version: str | None
    basis: Basis | None
    level: DriftLevel
    reason: str
    predictions_psi: float | None
    scores_psi: float | None
    windows: int
    samples: int
    observed_windows: int
    at: float | None

    @property
    def psi(self) -> float | None:
        values = [v for v in (self.predictions_psi, self.scores_psi) if v is not None]
        return max(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "device": self.device,
            "model": self.model,
            "model_version": self.model_version,
            "basis": self.basis,
            "level": self.level,
            "reason": self.reason,
            "psi": self.psi,
            "predictions_psi": self.predictions_psi,
            "scores_psi": self.scores_psi,
            "windows": self.windows,
            "samples": self.samples,
            "observed_windows": self.observed_windows,
            "at": self.at,
        }


@dataclass
class _Window:
    predictions: dict[str, int]
    n_predictions: int
    scores: tuple[int, ...] | None
    n_scores: int


@dataclass
class _Track:
    model: str | None
    version: str | None
    recent: deque[_Window]
    observed: int = 0
    baseline_windows: int = 0
    baseline_predictions: dict[str, int] = field(default_factory=dict)
    baseline_scores: list[int] = field(default_factory=lambda: [0] * (len(_STD_SCORES) + 1))
    baseline_done: bool = False
    result: DriftResult | None = None


class DriftMonitor:
    """Feed it every telemetry window (:meth:`observe`, in arrival order); read verdicts with
    :meth:`result` / :meth:`results`. Thread-safe."""

    def __init__(
        self, config: DriftConfig = DriftConfig(), references: ReferenceSet | None = None
    ) -> None:
        self.config = config
        self.references = references if references is not None else ReferenceSet()
        self._lock = threading.Lock()
        self._tracks: dict[tuple[str, str], _Track] = {}

    def observe(self, w: TelemetryRecord) -> DriftResult | None:
        """Add one window and return the device's new verdict (None for an empty window)."""
        with self._lock:
            key = (w.fleet, w.device)
            track = self._tracks.get(key)
            if track is None or (track.model, track.version) != (w.model, w.model_version):
                track = _Track(w.model, w.model_version, deque(maxlen=self.config.max_windows))
                self._tracks[key] = track
            if w.inferences == 0:
                return track.result
            window = _window(w)
            track.observed += 1
            ref = self.references.lookup(w.model, w.model_version)
            if not track.baseline_done:
                self._learn(track, window)
                if ref is None:
                    track.result = self._verdict(w, track, None, at=w.received_at)
                    return track.result
            track.recent.append(window)
            track.result = self._verdict(w, track, ref, at=w.received_at)
            return track.result

    def result(self, fleet: str, device: str) -> DriftResult | None:
        with self._lock:
            track = self._tracks.get((fleet, device))
            return None if track is None else track.result

    def results(self) -> list[DriftResult]:
        with self._lock:
            return [t.result for t in self._tracks.values() if t.result is not None]

    def forget(self, fleet: str, device: str) -> None:
        with self._lock:
            self._tracks.pop((fleet, device), None)

    # --- internals ---

    def _learn(self, track: _Track, window: _Window) -> None:
        cfg = self.config
        track.baseline_windows += 1
        for label, count in window.predictions.items():
            track.baseline_predictions[label] = track.baseline_predictions.get(label, 0) + count
        if window.scores is not None:
            for i, c in enumerate(window.scores):
                track.baseline_scores[i] += c
        n_pred = sum(track.baseline_predictions.values())
        n_scores = sum(track.baseline_scores)
        need = cfg.baseline_samples
        enough = n_pred >= need or (n_pred == 0 and n_scores >= need)
        if track.baseline_windows >= cfg.baseline_windows and enough:
            track.baseline_done = True

    def _verdict(
        self, w: TelemetryRecord, track: _Track, ref: Reference | None, *, at: float
    ) -> DriftResult:
        cfg = self.config

        def result(
            basis: Basis | None,
            level: DriftLevel,
            reason: str,
            pred_psi: float | None = None,
            score_psi: float | None = None,
            windows: int = 0,
            samples: int = 0,
        ) -> DriftResult:
            return DriftResult(
                fleet=w.fleet, device=w.device, model=w.model, model_version=w.model_version,
                basis=basis, level=level, reason=reason, predictions_psi=pred_psi,
                scores_psi=score_psi, windows=windows, samples=samples,
                observed_windows=track.observed, at=at,
            )  # fmt: skip

        if ref is None and not track.baseline_done:
            return result(
                None,
                "learning",
                f"no reference for {w.model}@{w.model_version}: learning the device's baseline "
                f"({track.baseline_windows}/{cfg.baseline_windows} windows, "
                f"{sum(track.baseline_predictions.values())}/{cfg.baseline_samples} predictions)",
            )
        basis: Basis = "reference" if ref is not None else "baseline"
        if not track.recent:
            return result(basis, "insufficient", "the baseline is learned; no window since")
        if ref is not None:
            exp_preds: Mapping[str, float] = ref.stats.predictions
            exp_scores: Sequence[float] | None = (
                ref.stats.score_counts
                if ref.stats.scored and ref.stats.score_bounds == _STD_SCORES
                else None
            )
        else:
            exp_preds = {k: float(v) for k, v in track.baseline_predictions.items()}
            exp_scores = (
                [float(c) for c in track.baseline_scores] if sum(track.baseline_scores) else None
            )
        # The newest windows: at least K, more until min_samples are in (or none are left).
        preds: dict[str, int] = {}
        scores = [0] * (len(_STD_SCORES) + 1)
        n_pred = n_scores = used = 0
        newest = track.recent[-1]
        want_preds = bool(exp_preds) and newest.n_predictions > 0
        want_scores = exp_scores is not None and newest.scores is not None
        for window in reversed(track.recent):
            if (
                used >= cfg.windows
                and (not want_preds or n_pred >= cfg.min_samples)
                and (not want_scores or n_scores >= cfg.min_samples)
            ):
                break
            used += 1
            for label, count in window.predictions.items():
                preds[label] = preds.get(label, 0) + count
            n_pred += window.n_predictions
            if window.scores is not None:
                for i, c in enumerate(window.scores):
                    scores[i] += c
                n_scores += window.n_scores
        pred_psi = score_psi = None
        if exp_preds and sum(exp_preds.values()) > 0 and n_pred >= cfg.min_samples:
            pred_psi = psi(exp_preds, {k: float(v) for k, v in preds.items()}, epsilon=cfg.epsilon)
        if exp_scores is not None and n_scores >= cfg.min_samples:
            score_psi = psi(exp_scores, scores, epsilon=cfg.epsilon)
        samples = max(n_pred, n_scores)
        values = [v for v in (pred_psi, score_psi) if v is not None]
        if not values:
            return result(
                basis,
                "insufficient",
                f"{samples} samples in the newest {used} windows; {cfg.min_samples} needed",
                windows=used,
                samples=samples,
            )
        worst = max(values)
        which = "predictions" if worst == pred_psi else "outlier scores"
        if worst >= cfg.significant:
            level: DriftLevel = "significant"
        elif worst >= cfg.moderate:
            level = "moderate"
        else:
            level = "ok"
        against = "the bundle's reference" if basis == "reference" else "the device's first windows"
        reason = (
            f"PSI {worst:.3f} of {which} over {used} windows ({samples} samples) against {against}"
        )
        return result(basis, level, reason, pred_psi, score_psi, used, samples)


def _window(w: TelemetryRecord) -> _Window:
    preds = dict(w.predictions)
    scores: tuple[int, ...] | None = None
    n_scores = 0
    if w.score_bounds == _STD_SCORES:
        n_scores = sum(w.score_counts)
        if n_scores:
            scores = tuple(w.score_counts)
    return _Window(preds, sum(preds.values()), scores, n_scores)
