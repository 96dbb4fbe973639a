"""Outlier detectors that score every inference on the board (see ``docs/outliers.md``).

A detector turns one batch of model inputs and the model's outputs into one score per
sample; higher means more anomalous, everywhere. Scoring is separate from thresholding
(:class:`ThresholdedDetector` adds the threshold from the bundle manifest), and fitting lives
on the host (``sdk.detect``): this module only scores, with a few small numpy products, and
imports nothing but numpy and the standard library.

Detectors are registered by name in :data:`DETECTORS`. Each one can write its parameters as a
flat ``{name: array}`` mapping (:meth:`Detector.params`, saved with ``numpy.savez``) and be
rebuilt from it (``from_params``, loaded with ``allow_pickle=False``), so a bundle carries no
pickled code. Registered kinds:

``mahalanobis``
    Probabilistic-PCA distance of a (flattened, optionally average-pooled) input or output
    tensor: Mahalanobis distance inside the top-k principal subspace plus the residual energy
    outside it, divided by the mean residual variance.
``max_softmax``
    ``1 - max softmax(logits / T)`` of a classifier's logits.
``energy``
    ``-T * logsumexp(logits / T)`` of a classifier's logits.
``combined``
    Several of the above, each mapped to a tail "surprise" ``-log P(score >= s)`` under its own
    calibration distribution, then combined by max or sum, so input- and output-based signals
    both count on one scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from device_agent.contracts.bundle import DetectorSpec
from device_agent.errors import BundleError, ConfigError, InputError

__all__ = [
    "DETECTORS",
    "CombinedDetector",
    "Detector",
    "EnergyDetector",
    "FeatureSource",
    "MahalanobisDetector",
    "MaxSoftmaxDetector",
    "Scores",
    "TailCalibration",
    "ThresholdedDetector",
    "load_detector",
    "load_params",
    "save_params",
]

Scores = npt.NDArray[np.float64]
Array = npt.NDArray[Any]
Params = dict[str, Array]


@runtime_checkable
class Detector(Protocol):
    """What the agent calls on every batch. Scores are float64, shape ``(batch,)``."""

    kind: ClassVar[str]

    def score(self, inputs: Mapping[str, Array], outputs: Sequence[Array]) -> Scores: ...

    def params(self) -> Params: ...


# --------------------------------------------------------------------------------------------
# Where a detector reads its features from


@dataclass(frozen=True)
class FeatureSource:
    """A model input (by name) or output (by index) flattened to one row per sample.

    ``pool`` > 1 average-pools the two spatial axes by that factor first (images only):
    axes 2 and 3 for NCHW tensors, 1 and 2 for NHWC ones (``channels_last``).
    """

    kind: str  # "input" or "output"
    name: str = ""  # input name, for kind == "input"
    index: int = 0  # output index, for kind == "output"
    pool: int = 1
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("input", "output"):
            raise ConfigError(f"feature source kind must be 'input' or 'output', not {self.kind!r}")
        if self.kind == "input" and not self.name:
            raise ConfigError("an input feature source needs the input's name")
        if self.index < 0:
            raise ConfigError(f"output index must be >= 0, got {self.index}")
        if self.pool < 1:
            raise ConfigError(f"pool must be >= 1, got {self.pool}")

    @classmethod
    def parse(cls, text: str, *, pool: int = 1, channels_last: bool = False) -> FeatureSource:
        """``"input:image"`` or ``"output:0"``."""
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise ConfigError(f"feature source {text!r}: expected 'input:NAME' or 'output:INDEX'")
        if kind == "output":
            if not rest.isdigit():
                raise ConfigError(f"feature source {text!r}: the output index must be an integer")
            return cls("output", index=int(rest), pool=pool, channels_last=channels_last)
        return cls(kind, name=rest, pool=pool, channels_last=channels_last)

    def __str__(self) -> str:
        return f"input:{self.name}" if self.kind == "input" else f"output:{self.index}"

    def tensor(self, inputs: Mapping[str, Array], outputs: Sequence[Array]) -> Array:
        if self.kind == "input":
            if self.name not in inputs:
                raise InputError(
                    f"the outlier detector reads input {self.name!r}, which is not among "
                    f"the inputs {sorted(inputs)}"
                )
            return np.asarray(inputs[self.name])
        if self.index >= len(outputs):
            raise InputError(
                f"the outlier detector reads output {self.index}, but the model gave "
                f"{len(outputs)} output(s)"
            )
        return np.asarray(outputs[self.index])

    def features(self, inputs: Mapping[str, Array], outputs: Sequence[Array]) -> Scores:
        """``(batch, features)`` float64."""
        x = np.asarray(self.tensor(inputs, outputs), dtype=np.float64)
        if x.ndim == 0:
            raise InputError(f"the outlier detector's source {self} is a scalar, not a batch")
        if self.pool > 1:
            x = _avg_pool(x, self.pool, self.channels_last)
        return x.reshape(x.shape[0], -1)

    def to_params(self, prefix: str = "") -> Params:
        return {
            f"{prefix}source": np.array(str(self)),
            f"{prefix}pool": np.array(self.pool, dtype=np.int64),
            f"{prefix}channels_last": np.array(self.channels_last),
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Array], prefix: str = "") -> FeatureSource:
        return cls.parse(
            _str_param(params, f"{prefix}source"),
            pool=_int_param(params, f"{prefix}pool"),
            channels_last=bool(_array(params, f"{prefix}channels_last")),
        )


def _avg_pool(x: Scores, factor: int, channels_last: bool) -> Scores:
    if x.ndim < 3:
        raise InputError(f"pooling needs an image batch (rank >= 3), got shape {x.shape}")
    ax_h, ax_w = (x.ndim - 3, x.ndim - 2) if channels_last else (x.ndim - 2, x.ndim - 1)
    h, w = x.shape[ax_h] // factor, x.shape[ax_w] // factor
    if h == 0 or w == 0:
        raise InputError(f"pool factor {factor} is larger than the image ({x.shape})")
    crop: list[slice] = [slice(None)] * x.ndim
    crop[ax_h], crop[ax_w] = slice(0, h * factor), slice(0, w * factor)
    x = x[tuple(crop)]
    shape = list(x.shape)
    shape[ax_w : ax_w + 1] = [w, factor]
    shape[ax_h : ax_h + 1] = [h, factor]
    pooled: Scores = x.reshape(shape).mean(axis=(ax_h + 1, ax_w + 2))
    return pooled


# --------------------------------------------------------------------------------------------
# Detectors


class MahalanobisDetector:
    """Probabilistic-PCA distance (Tipping & Bishop) of a flattened tensor.

    With mean ``mu``, the top-``k`` principal directions ``W`` (d x k, orthonormal), their
    variances ``lam`` and the mean variance of the discarded directions ``sigma2``::

        z     = W.T (x - mu)                      coordinates in the principal subspace
        T2    = sum_i z_i^2 / lam_i               Mahalanobis distance inside the subspace
        Q     = ||x - mu||^2 - ||z||^2            residual energy off the subspace
        score = (T2 + Q / sigma2) / d

    which is ``(x - mu)^T C^-1 (x - mu) / d`` for the PPCA covariance
    ``C = W diag(lam) W^T + sigma2 (I - W W^T)``. In-distribution samples score about 1; an
    input that leaves the subspace (noise, random pixels) is caught by the residual term even
    when its projection looks ordinary.
    """

    kind: ClassVar[str] = "mahalanobis"

    def __init__(
        self,
        source: FeatureSource,
        mean: Array,
        components: Array,
        variances: Array,
        residual_variance: float,
    ) -> None:
        self.source = source
        self.mean = np.asarray(mean, dtype=np.float64)
        self.components = np.ascontiguousarray(components, dtype=np.float64)
        self.variances = np.asarray(variances, dtype=np.float64)
        self.residual_variance = float(residual_variance)
        d, k = self.components.shape if self.components.ndim == 2 else (0, -1)
        if self.mean.shape != (d,) or self.variances.shape != (k,):
            raise BundleError(
                f"mahalanobis parameters do not fit together: mean {self.mean.shape}, "
                f"components {self.components.shape}, variances {self.variances.shape}"
            )
        if np.any(self.variances <= 0) or not self.residual_variance > 0:
            raise BundleError("mahalanobis variances must all be positive")
        self._inv_var = 1.0 / self.variances
        self._inv_res = 1.0 / self.residual_variance

    def score(self, inputs: Mapping[str, Array], outputs: Sequence[Array]) -> Scores:
        x = self.source.features(inputs, outputs)
        if x.shape[1] != self.mean.shape[0]:
            raise InputError(
                f"the mahalanobis detector expects {self.mean.shape[0]} features from "
                f"{self.source}, got {x.shape[1]}"
            )
        centred = x - self.mean
        z = centred @ self.components
        z2 = z * z
        t2 = z2 @ self._inv_var
        residual = np.maximum(np.einsum("ij,ij->i", centred, centred) - z2.sum(axis=1), 0.0)
        out: Scores = (t2 + residual * self._inv_res) / self.mean.shape[0]
        return out

    def params(self) -> Params:
        return {
            **self.source.to_params(),
            "mean": self.mean,
            "components": self.components,
            "variances": self.variances,
            "residual_variance": np.array(self.residual_variance),
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Array]) -> MahalanobisDetector:
        return cls(
            FeatureSource.from_params(params),
            _array(params, "mean"),
            _array(params, "components"),
            _array(params, "variances"),
            float(_array(params, "residual_variance")),
        )


class _LogitDetector:
    """Shared by the detectors that read a classifier's logits (one output, ``(batch, C)``)."""

    kind: ClassVar[str] = ""

    def __init__(self, output: int = 0, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ConfigError(f"temperature must be positive, got {temperature}")
        if output < 0:
            raise ConfigError(f"output index must be >= 0, got {output}")
        self.output = int(output)
        self.temperature = float(temperature)

    def _scaled_logits(self, outputs: Sequence[Array]) -> Scores:
        if self.output >= len(outputs):
            raise InputError(
                f"the {self.kind} detector reads output {self.output}, but the model gave "
                f"{len(outputs)} output(s)"
            )
        logits = np.asarray(outputs[self.output], dtype=np.float64)
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise InputError(
                f"the {self.kind} detector needs (batch, classes) logits, got shape {logits.shape}"
            )
        scaled: Scores = logits / self.temperature
        return scaled

    def params(self) -> Params:
        return {
            "output": np.array(self.output, dtype=np.int64),
            "temperature": np.array(self.temperature),
        }

    @classmethod
    def _from_params(cls, params: Mapping[str, Array]) -> tuple[int, float]:
        return _int_param(params, "output"), float(_array(params, "temperature"))


class MaxSoftmaxDetector(_LogitDetector):
    """``1 - max_c softmax(logits / T)_c`` (Hendrycks & Gimpel): 0 when the model is sure."""

    kind: ClassVar[str] = "max_softmax"

    def score(self, inputs: Mapping[str, Array], outputs: Sequence[Array]) -> Scores:
        s = self._scaled_logits(outputs)
        # max softmax = 1 / sum_c exp(s_c - max s)
        out: Scores = 1.0 - 1.0 / np.exp(s - s.max(axis=1, keepdims=True)).sum(axis=1)
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Array]) -> MaxSoftmaxDetector:
        output, temperature = cls._from_params(params)
        return cls(output, temperature)


class EnergyDetector(_LogitDetector):
    """Free energy ``-T * logsumexp(logits / T)`` (Liu et al. 2020): low for confident inputs."""

    kind: ClassVar[str] = "energy"

    def score(self, inputs: Mapping[str, Array], outputs: Sequence[Array]) -> Scores:
        s = self._scaled_logits(outputs)
        top = s.max(axis=1)
        lse = top + np.log(np.exp(s - top[:, None]).sum(axis=1))
        out: Scores = -self.temperature * lse
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Array]) -> EnergyDetector:
        output, temperature = cls._from_params(params)
        return cls(output, temperature)


@dataclass(frozen=True)
class TailCalibration:
    """Maps a raw score to its surprise ``-log P(S >= s)`` under calibration scores ``S``.

    ``quantiles`` ``q_0 <= ... <= q_{m-1}`` are the calibration scores' quantiles at the
    probabilities ``p_j = j / (m-1)``, from ``n = count`` samples. At ``q_j`` the surprise is
    ``-log(1 - p_j * n / (n+1))``: the survival probability shrunk so that the largest
    calibration score has ``1/(n+1)`` (a conformal p-value), not 0. Between the quantiles it is
    interpolated linearly; above ``q_{m-1}`` it grows by ``(s - q_{m-1}) / tail_scale``, an
    exponential tail whose scale is the mean excess over the 90th percentile (a
    peaks-over-threshold fit), so far outliers keep their order instead of tying.
    In-distribution surprise is about Exp(1)-distributed, whatever the raw score's scale.
    """

    quantiles: Array
    count: int
    tail_scale: float
    _nodes: Scores = field(init=False, repr=False, compare=False)
    _inv_tail: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        q = np.asarray(self.quantiles, dtype=np.float64)
        if q.ndim != 1 or q.shape[0] < 2 or np.any(np.diff(q) < 0):
            raise BundleError("tail calibration quantiles must be a sorted 1-D array of >= 2")
        if self.count < 1 or not self.tail_scale > 0:
            raise BundleError("tail calibration needs count >= 1 and a positive tail scale")
        # Precomputed once: at batch size 1, each numpy call costs about a microsecond.
        shrink = self.count / (self.count + 1.0)
        object.__setattr__(self, "quantiles", q)
        object.__setattr__(self, "_nodes", -np.log1p(-np.linspace(0.0, shrink, q.shape[0])))
        object.__setattr__(self, "_inv_tail", 1.0 / self.tail_scale)

    @classmethod
    def from_scores(cls, scores: Array, points: int = 129) -> TailCalibration:
        s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
        if s.size < 2 or not np.all(np.isfinite(s)):
            raise ConfigError("tail calibration needs at least 2 finite scores")
        q = np.quantile(s, np.linspace(0.0, 1.0, min(points, s.size)))
        q90 = float(np.quantile(s, 0.9))
        excess = s[s > q90] - q90
        spread = float(s[-1] - s[0])
        floor = max(1e-9 * spread, 1e-12 * max(1.0, abs(float(s[-1]))), 1e-300)
        scale = float(excess.mean()) if excess.size else 0.0
        return cls(q, int(s.size), max(scale, floor))

    def surprise(self, scores: Scores) -> Scores:
        inside = np.interp(scores, self.quantiles, self._nodes)
        out: Scores = inside + np.maximum(scores - self.quantiles[-1], 0.0) * self._inv_tail
        return out

    def to_params(self, prefix: str) -> Params:
        return {
            f"{prefix}quantiles": self.quantiles,
            f"{prefix}count": np.array(self.count, dtype=np.int64),
            f"{prefix}tail_scale": np.array(self.tail_scale),
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Array], prefix: str) -> TailCalibration:
        return cls(
            _array(params, f"{prefix}quantiles").astype(np.float64),
            _int_param(params, f"{prefix}count"),
            float(_array(params, f"{prefix}tail_scale")),
        )


class CombinedDetector:
    """Several detectors on one scale: ``reduce_c(w_c * surprise_c(score_c))``.

    Each component's raw score goes through its :class:`TailCalibration` (fitted on scores
    the component did not train on), so "3" means "as rare as exp(-3) of in-distribution data"
    for every component. ``reduce`` is ``"max"`` (any one signal can flag an input) or
    ``"sum"`` (Fisher-style: weak signals add up).
    """

    kind: ClassVar[str] = "combined"
    REDUCTIONS: ClassVar[tuple[str, ...]] = ("max", "sum")

    def __init__(
        self,
        components: Sequence[Detector],
        calibrations: Sequence[TailCalibration],
        weights: Sequence[float] | None = None,
        reduce: str = "max",
    ) -> None:
        if not components:
            raise ConfigError("a combined detector needs at least one component")
        if len(calibrations) != len(components):
            raise ConfigError("a combined detector needs one calibration per component")
        if any(isinstance(c, CombinedDetector) for c in components):
            raise ConfigError("combined detectors cannot be nested")
        if reduce not in self.REDUCTIONS:
            raise ConfigError(f"reduce must be one of {list(self.REDUCTIONS)}, not {reduce!r}")
        w = np.ones(len(components)) if weights is None else np.asarray(weights, np.float64)
        if w.shape != (len(components),) or np.any(w < 0) or not np.any(w > 0):
            raise ConfigError("combined weights: one non-negative weight per component, not all 0")
        self.components = tuple(components)
        self.calibrations = tuple(calibrations)
        self.weights = w
        self.reduce = reduce

    def component_scores(self, inputs: Mapping[str, Array], outputs: Sequence[Array]) -> Scores:
        """``(batch, components)`` weighted surprises, before the reduction."""
        cols = [
            w * cal.surprise(c.score(inputs, outputs))
            for c, cal, w in zip(self.components, self.calibrations, self.weights, strict=True)
        ]
        out: Scores = np.stack(cols, axis=1)
        return out

    def score(self, inputs: Mapping[str, Array], outputs: Sequence[Array]) -> Scores:
        combine = np.maximum if self.reduce == "max" else np.add
        out: Scores | None = None
        for c, cal, w in zip(self.components, self.calibrations, self.weights, strict=True):
            part = w * cal.surprise(c.score(inputs, outputs))
            out = part if out is None else combine(out, part)
        assert out is not None  # the constructor refuses an empty component list
        return out

    def params(self) -> Params:
        out: Params = {
            "kinds": np.array([c.kind for c in self.components]),
            "weights": self.weights,
            "reduce": np.array(self.reduce),
        }
        for i, (c, cal) in enumerate(zip(self.components, self.calibrations, strict=True)):
            out.update({f"c{i}.{k}": v for k, v in c.params().items()})
            out.update(cal.to_params(f"cal{i}."))
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Array]) -> CombinedDetector:
        kinds = [str(k) for k in _array(params, "kinds").ravel()]
        components: list[Detector] = []
        for i, kind in enumerate(kinds):
            prefix = f"c{i}."
            sub = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
            if kind == cls.kind:
                raise BundleError("combined detectors cannot be nested")
            components.append(_from_params(kind, sub))
        calibrations = [TailCalibration.from_params(params, f"cal{i}.") for i in range(len(kinds))]
        return cls(
            components,
            calibrations,
            [float(w) for w in _array(params, "weights").ravel()],
            _str_param(params, "reduce"),
        )


DETECTORS: dict[str, type[Any]] = {
    MahalanobisDetector.kind: MahalanobisDetector,
    MaxSoftmaxDetector.kind: MaxSoftmaxDetector,
    EnergyDetector.kind: EnergyDetector,
    CombinedDetector.kind: CombinedDetector,
}


# --------------------------------------------------------------------------------------------
# Thresholds, saving and loading


class ThresholdedDetector:
    """A detector and the threshold it was calibrated with: ``is_outlier = score > threshold``."""

    def __init__(self, detector: Detector, threshold: float) -> None:
        if not math.isfinite(threshold):
            raise ConfigError(f"threshold must be a finite number, got {threshold}")
        self.detector = detector
        self.threshold = float(threshold)

    @property
    def kind(self) -> str:
        return self.detector.kind

    def score(self, inputs: Mapping[str, Array], outputs: Sequence[Array]) -> Scores:
        return self.detector.score(inputs, outputs)

    def is_outlier(self, scores: Scores) -> npt.NDArray[np.bool_]:
        flags: npt.NDArray[np.bool_] = np.asarray(scores) > self.threshold
        return flags

    def flag(
        self, inputs: Mapping[str, Array], outputs: Sequence[Array]
    ) -> tuple[Scores, npt.NDArray[np.bool_]]:
        """Scores and outlier flags for one batch."""
        scores = self.score(inputs, outputs)
        return scores, self.is_outlier(scores)


def save_params(detector: Detector, path: str | Path) -> Path:
    """Write ``detector.params()`` to ``path`` (an ``.npz`` file) with ``numpy.savez``."""
    out = Path(path)
    params = detector.params()
    if any(np.asarray(v).dtype.kind == "O" for v in params.values()):
        raise ConfigError(f"{detector.kind} parameters hold Python objects; they must be arrays")
    arrays: dict[str, Any] = {"kind": np.array(detector.kind), **params}
    with out.open("wb") as fh:
        np.savez(fh, **arrays)
    return out


def load_params(path: str | Path) -> tuple[str, Params]:
    """The ``(kind, params)`` in a detector file written by :func:`save_params`."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as npz:
            params = {k: npz[k] for k in npz.files}
    except FileNotFoundError as exc:
        raise BundleError(f"detector parameters not found: {p}") from exc
    except Exception as exc:  # OSError, ValueError, zipfile.BadZipFile, MemoryError...: a bad file
        raise BundleError(
            f"cannot read detector parameters {p.name}: {type(exc).__name__}: {exc}"
        ) from exc
    kind = _str_param(params, "kind") if "kind" in params else ""
    params.pop("kind", None)
    return kind, params


def load_detector(spec: DetectorSpec, params_path: str | Path) -> Detector:
    """Rebuild the detector a bundle's manifest describes from its parameters file."""
    kind, params = load_params(params_path)
    if kind and kind != spec.kind:
        raise BundleError(
            f"detector file {Path(params_path).name} holds a {kind!r} detector, but the "
            f"manifest says {spec.kind!r}"
        )
    return _from_params(spec.kind, params)


def _from_params(kind: str, params: Mapping[str, Array]) -> Detector:
    cls = DETECTORS.get(kind)
    if cls is None:
        raise BundleError(
            f"unknown outlier detector kind {kind!r}; this agent knows {sorted(DETECTORS)} "
            "(upgrade edgeship on the device)"
        )
    try:
        detector: Detector = cls.from_params(params)
    except (KeyError, ValueError, TypeError, ConfigError) as exc:
        raise BundleError(f"{kind} detector parameters are malformed: {exc}") from exc
    return detector


def _array(params: Mapping[str, Array], key: str) -> Array:
    if key not in params:
        raise BundleError(f"detector parameters lack {key!r}")
    return np.asarray(params[key])


def _str_param(params: Mapping[str, Array], key: str) -> str:
    value = _array(params, key)
    if value.dtype.kind != "U" or value.ndim != 0:
        raise BundleError(f"detector parameter {key!r} must be a string")
    return str(value)


def _int_param(params: Mapping[str, Array], key: str) -> int:
    value = _array(params, key)
    if value.dtype.kind not in "iu" or value.ndim != 0:
        raise BundleError(f"detector parameter {key!r} must be an integer")
    return int(value)
