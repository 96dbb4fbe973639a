"""Fitting outlier detectors on the host and calibrating their thresholds.

:func:`fit_detector` splits in-distribution calibration data in two: it fits the detector on
one part and sets the threshold on the other (held-out) part, so that about ``target_fpr`` of
in-distribution inputs score above it. The result is a :class:`DetectorSpec` for the bundle
manifest and an ``.npz`` parameters file that ``device_agent.detectors`` scores with on the
board. Output-based detectors need the model's outputs; they come from the same runtime the
device uses (``device_agent.runtime.open_session``). See ``docs/outliers.md``.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.contracts.bundle import DetectorSpec, IOSpec, TensorSpec
from device_agent.detectors import (
    DETECTORS,
    CombinedDetector,
    Detector,
    EnergyDetector,
    FeatureSource,
    MahalanobisDetector,
    MaxSoftmaxDetector,
    TailCalibration,
    save_params,
)
from device_agent.runtime import ModelSession, open_session
from sdk.artifact import ModelArtifact
from sdk.data import Dataset, DataSource, load_dataset
from sdk.errors import ConfigError, DataError

__all__ = [
    "FITTERS",
    "DetectorChoice",
    "DetectorOptions",
    "OutputsFn",
    "calibrate_threshold",
    "default_detector",
    "fit_detector",
    "fit_unthresholded",
    "model_outputs",
]

Arrays = Mapping[str, np.ndarray]
OutputsFn = Callable[[Arrays], Sequence[np.ndarray]]
ModelSource = ModelArtifact | ModelSession | str | Path | OutputsFn


@dataclass(frozen=True)
class DetectorOptions:
    """How to fit a detector. Fields a kind does not use are ignored.

    ``source``: what ``mahalanobis`` reads, ``"input:NAME"`` or ``"output:INDEX"``; ``None``
    means the model's first floating-point input. ``pool``: average-pooling factor for image
    sources; ``None`` picks the smallest one that leaves at most ``max_features`` features.
    ``components``: principal components kept, a count (int) or the fraction of variance to
    explain (float in (0, 1)). ``regularization``: variance floor, as a fraction of the mean
    per-feature variance. ``output`` and ``temperature``: the logits output index and the
    softmax temperature of ``max_softmax`` and ``energy``. ``combine``, ``weights``,
    ``reduce``: the components of ``combined`` and how their surprises are combined;
    ``folds``: cross-fitting folds used to calibrate fitted components on scores of data they
    were not fitted on.
    """

    source: str | None = None
    pool: int | None = None
    max_features: int = 4096
    components: int | float = 0.9
    regularization: float = 1e-3
    output: int = 0
    temperature: float = 1.0
    combine: tuple[str, ...] = ("mahalanobis", "energy")
    weights: tuple[float, ...] | None = None
    reduce: str = "max"
    folds: int = 5

    def __post_init__(self) -> None:
        c = self.components
        if isinstance(c, bool) or (isinstance(c, int) and c < 1):
            raise ConfigError(f"components must be a count >= 1 or a fraction, got {c!r}")
        if isinstance(c, float) and not 0.0 < c < 1.0:
            raise ConfigError(f"components as a fraction of variance must be in (0, 1), got {c}")
        if self.pool is not None and self.pool < 1:
            raise ConfigError(f"pool must be >= 1, got {self.pool}")
        if self.max_features < 1:
            raise ConfigError(f"max_features must be >= 1, got {self.max_features}")
        if self.regularization < 0:
            raise ConfigError(f"regularization must be >= 0, got {self.regularization}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        unknown = [k for k in self.combine if k not in DETECTORS or k == CombinedDetector.kind]
        if not self.combine or unknown:
            raise ConfigError(
                f"combine needs detector kinds other than 'combined' from {sorted(DETECTORS)}; "
                f"got {list(self.combine)}"
            )
        if self.weights is not None and len(self.weights) != len(self.combine):
            raise ConfigError("weights needs one weight per entry of combine")
        if self.reduce not in CombinedDetector.REDUCTIONS:
            raise ConfigError(f"reduce must be one of {list(CombinedDetector.REDUCTIONS)}")


@dataclass(frozen=True)
class DetectorChoice:
    """The detector :func:`default_detector` recommends for a model, and why."""

    kind: str
    options: DetectorOptions = field(default_factory=DetectorOptions)
    reason: str = ""


# --------------------------------------------------------------------------------------------
# Choosing a default

_EMBEDDING_NAME = re.compile(r"embed|pool|feature|hidden|encod|represent", re.IGNORECASE)


def default_detector(io: IOSpec) -> DetectorChoice | None:
    """A sensible detector for a model with inputs and outputs ``io``, or ``None``.

    * a floating-point input and a classifier output (``(batch, classes)`` floats, not named
      like an embedding): ``combined`` = PCA distance of the input + energy of the logits;
    * a floating-point input and no classifier output: ``mahalanobis`` on the input;
    * integer inputs only (token ids): distances between ids mean nothing, so ``mahalanobis``
      on an embedding output (``(batch, D)`` floats named like ``embedding``/``pooled``) if
      there is one, otherwise ``None`` (ask for ``max_softmax`` or ``energy`` explicitly to
      use a token classifier's confidence).
    """
    float_inputs = [t for t in io.inputs if np.dtype(t.dtype).kind == "f"]
    rank2 = [
        (i, t)
        for i, t in enumerate(io.outputs)
        if np.dtype(t.dtype).kind == "f" and len(t.shape) == 2
    ]
    embeddings = [(i, t) for i, t in rank2 if _EMBEDDING_NAME.search(t.name)]
    classifiers = [(i, t) for i, t in rank2 if (i, t) not in embeddings and _is_classifier(t)]
    if float_inputs:
        source = f"input:{float_inputs[0].name}"
        if classifiers:
            index, out = classifiers[0]
            return DetectorChoice(
                "combined",
                DetectorOptions(source=source, output=index),
                f"float input {float_inputs[0].name!r} and classifier output {out.name!r}: "
                "input-space PCA distance plus logit energy",
            )
        return DetectorChoice(
            "mahalanobis",
            DetectorOptions(source=source),
            f"float input {float_inputs[0].name!r} and no classifier output: PCA distance",
        )
    if embeddings:
        index, emb = embeddings[0]
        return DetectorChoice(
            "mahalanobis",
            DetectorOptions(source=f"output:{index}"),
            f"integer inputs; PCA distance of the embedding output {emb.name!r}",
        )
    return None


def _is_classifier(t: TensorSpec) -> bool:
    classes = t.shape[1]
    return t.labels is not None or (isinstance(classes, int) and classes >= 2)


# --------------------------------------------------------------------------------------------
# Fitting


def model_outputs(model: ModelSource, inputs: Arrays, *, batch_size: int = 256) -> list[np.ndarray]:
    """Run ``model`` over ``inputs`` in batches; the outputs, concatenated, in model order."""
    run = _runner(model)
    n = _count(inputs)
    parts: list[list[np.ndarray]] = []
    for start in range(0, n, batch_size):
        outs = run({k: v[start : start + batch_size] for k, v in inputs.items()})
        if not parts:
            parts = [[] for _ in outs]
        for store, out in zip(parts, outs, strict=True):
            store.append(np.asarray(out))
    return [np.concatenate(p, axis=0) for p in parts]


def calibrate_threshold(scores: np.ndarray, target_fpr: float) -> float:
    """The threshold that about ``target_fpr`` of these in-distribution scores exceed.

    It is the ``ceil((n + 1)(1 - target_fpr))``-th smallest of the ``n`` scores (the
    conformal quantile): for a new sample exchangeable with them, ``P(score > threshold) <=
    target_fpr``. With too few scores for that rank (``n < 1/target_fpr - 1``) it is the
    largest score.
    """
    if not 0.0 < target_fpr < 1.0:
        raise ConfigError(f"target_fpr must be between 0 and 1, got {target_fpr}")
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise DataError("threshold calibration needs finite scores of held-out data")
    rank = min(math.ceil((s.size + 1) * (1.0 - target_fpr)), s.size)
    return float(s[rank - 1])


Fitter = Callable[[Arrays, Sequence[np.ndarray], DetectorOptions, np.random.Generator], Detector]


def _fit_mahalanobis(
    inputs: Arrays, outputs: Sequence[np.ndarray], opts: DetectorOptions, rng: np.random.Generator
) -> Detector:
    source = _feature_source(inputs, outputs, opts)
    x = source.features(inputs, outputs)
    n, d = x.shape
    if n < 3:
        raise DataError(f"fitting a mahalanobis detector needs at least 3 samples, got {n}")
    mean = x.mean(axis=0)
    _, sing, vt = np.linalg.svd(x - mean, full_matrices=False)
    lam = sing**2 / (n - 1)
    total = float(lam.sum())
    floor = max(opts.regularization * total / d, 1e-12)
    k_max = max(1, min(n - 2, d - 1))
    if isinstance(opts.components, float):
        explained = np.cumsum(lam) / max(total, 1e-300)
        k = int(np.searchsorted(explained, opts.components) + 1)
    else:
        k = opts.components
    k = min(k, k_max)
    residual = max((total - float(lam[:k].sum())) / (d - k), floor)
    return MahalanobisDetector(source, mean, vt[:k].T, np.maximum(lam[:k], floor), residual)


def _fit_max_softmax(
    inputs: Arrays, outputs: Sequence[np.ndarray], opts: DetectorOptions, rng: np.random.Generator
) -> Detector:
    return MaxSoftmaxDetector(opts.output, opts.temperature)


def _fit_energy(
    inputs: Arrays, outputs: Sequence[np.ndarray], opts: DetectorOptions, rng: np.random.Generator
) -> Detector:
    return EnergyDetector(opts.output, opts.temperature)


def _fit_combined(
    inputs: Arrays, outputs: Sequence[np.ndarray], opts: DetectorOptions, rng: np.random.Generator
) -> Detector:
    n = _count(inputs)
    components: list[Detector] = []
    calibrations: list[TailCalibration] = []
    for kind in opts.combine:
        fitter = FITTERS[kind]
        fitted = fitter(inputs, outputs, opts, rng)
        if kind in _DATA_FREE:
            held_out = fitted.score(inputs, outputs)
        else:
            # Cross-fitting: each sample's score comes from a detector fitted without it, so the
            # calibration sees the scores unseen data will get, not the optimistic in-sample ones.
            folds = min(opts.folds, n)
            held_out = np.empty(n)
            for idx in np.array_split(rng.permutation(n), folds):
                keep = np.ones(n, dtype=bool)
                keep[idx] = False
                part = fitter(_take(inputs, keep), [o[keep] for o in outputs], opts, rng)
                held_out[idx] = part.score(_take(inputs, idx), [o[idx] for o in outputs])
        components.append(fitted)
        calibrations.append(TailCalibration.from_scores(held_out))
    return CombinedDetector(components, calibrations, opts.weights, opts.reduce)


FITTERS: dict[str, Fitter] = {
    MahalanobisDetector.kind: _fit_mahalanobis,
    MaxSoftmaxDetector.kind: _fit_max_softmax,
    EnergyDetector.kind: _fit_energy,
    CombinedDetector.kind: _fit_combined,
}
# Kinds whose fit does not look at the data, so in-sample scores are honest.
_DATA_FREE = frozenset({MaxSoftmaxDetector.kind, EnergyDetector.kind})
# Kinds that read the model's outputs (and so need a model to fit).
_READS_OUTPUTS = frozenset({MaxSoftmaxDetector.kind, EnergyDetector.kind})


def fit_unthresholded(
    kind: str,
    inputs: Arrays,
    outputs: Sequence[np.ndarray],
    options: DetectorOptions | None = None,
    *,
    seed: int = 0,
) -> Detector:
    """Fit a detector of ``kind`` on in-memory inputs and model outputs (no threshold)."""
    fitter = FITTERS.get(kind)
    if fitter is None:
        raise ConfigError(f"unknown detector kind {kind!r}; choose one of {sorted(FITTERS)}")
    return fitter(inputs, outputs, options or DetectorOptions(), np.random.default_rng(seed))


def fit_detector(
    kind: str,
    calibration: Dataset | DataSource,
    model: ModelSource | None = None,
    *,
    holdout_fraction: float = 0.5,
    target_fpr: float = 0.01,
    options: DetectorOptions | None = None,
    out: str | Path | None = None,
    params_file: str = "detector.npz",
    seed: int = 0,
    batch_size: int = 256,
) -> tuple[DetectorSpec, Path]:
    """Fit a detector on in-distribution data and calibrate its threshold on held-out data.

    ``calibration`` is in-distribution data for the model (a :class:`~sdk.data.Dataset`, an
    ``.npz`` path, a dict of arrays, ...). ``model`` (an ONNX/TFLite artifact or path, an open
    session, or a function from inputs to outputs) is run over it when the detector reads
    the model's outputs, or when ``calibration`` needs the model's input spec to be read.
    A random ``holdout_fraction`` of the samples is kept out of fitting; the threshold is the
    conformal ``1 - target_fpr`` quantile of their scores (:func:`calibrate_threshold`).

    Returns the manifest's :class:`DetectorSpec` (``threshold``, ``target_fpr``, and in
    ``options`` the held-out false-positive rate actually measured, the sample counts and the
    fitting options) and the path of the parameters file (``out``, or a new temporary file),
    ready for ``sdk.package(..., detector=(spec, path))``.
    """
    if kind not in FITTERS:
        raise ConfigError(f"unknown detector kind {kind!r}; choose one of {sorted(FITTERS)}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be between 0 and 1, got {holdout_fraction}")
    if not 0.0 < target_fpr < 1.0:
        raise ConfigError(f"target_fpr must be between 0 and 1, got {target_fpr}")
    opts = options or DetectorOptions()
    if isinstance(model, str | Path):
        model = open_session(model)  # once, for both its input spec and its outputs
    run = None if model is None else _runner(model)
    inputs = _calibration_inputs(calibration, model)
    n = _count(inputs)
    n_hold = round(n * holdout_fraction)
    if n_hold < 1 or n - n_hold < 3:
        raise DataError(
            f"calibration data: {n} samples are too few to fit on {n - n_hold} and "
            f"calibrate on {n_hold}; give more data or change holdout_fraction"
        )
    needs_outputs = kind in _READS_OUTPUTS or (
        kind == CombinedDetector.kind and any(k in _READS_OUTPUTS for k in opts.combine)
    )
    needs_outputs = needs_outputs or (opts.source or "").startswith("output:")
    if needs_outputs and run is None:
        raise ConfigError(f"the {kind} detector reads the model's outputs; pass the model")
    outputs = model_outputs(run, inputs, batch_size=batch_size) if needs_outputs and run else []

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    hold, fit = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    detector = FITTERS[kind](_take(inputs, fit), [o[fit] for o in outputs], opts, rng)
    held_scores = detector.score(_take(inputs, hold), [o[hold] for o in outputs])
    threshold = calibrate_threshold(held_scores, target_fpr)
    fpr_holdout = float(np.mean(held_scores > threshold))

    path = Path(out) if out is not None else _temp_path(params_file)
    save_params(detector, path)
    quantiles = np.quantile(held_scores, [0.5, 0.9, 0.99])
    spec = DetectorSpec(
        kind=kind,
        params_file=params_file,
        threshold=threshold,
        target_fpr=target_fpr,
        options={
            "fpr_holdout": fpr_holdout,
            "n_fit": int(fit.size),
            "n_holdout": int(n_hold),
            "holdout_fraction": holdout_fraction,
            "seed": seed,
            "holdout_score_quantiles": {
                "p50": float(quantiles[0]),
                "p90": float(quantiles[1]),
                "p99": float(quantiles[2]),
            },
            "fit": _jsonable_options(opts),
        },
    )
    return spec, path


# --------------------------------------------------------------------------------------------
# Helpers


def _runner(model: ModelSource) -> OutputsFn:
    if isinstance(model, ModelArtifact):
        if model.format not in ("onnx", "tflite"):
            raise ConfigError(f"cannot run a {model.format} model; export it to ONNX or TFLite")
        return open_session(model.path, runtime=model.runtime).run
    if isinstance(model, str | Path):
        return open_session(model).run
    run = getattr(model, "run", None)
    if callable(run) and hasattr(model, "io"):
        fn: OutputsFn = run
        return fn
    if callable(model):
        return model
    raise ConfigError(
        f"model: expected a model artifact or path, a session or a function, "
        f"not {type(model).__name__}"
    )


def _calibration_inputs(calibration: Dataset | DataSource, model: ModelSource | None) -> Arrays:
    if isinstance(calibration, Dataset):
        return dict(calibration.inputs)
    io = _io_of(model)
    if io is not None:
        return dict(load_dataset(calibration, io, what="calibration data").inputs)
    if isinstance(calibration, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in calibration.items() if k != "labels"}
        if not arrays or len({a.shape[0] if a.ndim else -1 for a in arrays.values()}) != 1:
            raise DataError("calibration data: arrays must share their first (sample) axis")
        return arrays
    raise DataError(
        "calibration data: pass a Dataset or a dict of arrays keyed by input name "
        "(without a model, there is no input spec to read other sources with)"
    )


def _io_of(model: ModelSource | None) -> IOSpec | None:
    if isinstance(model, ModelArtifact):
        return model.io
    if isinstance(model, str | Path):
        return open_session(model).io
    io = getattr(model, "io", None)
    return io if isinstance(io, IOSpec) else None


def _feature_source(
    inputs: Arrays, outputs: Sequence[np.ndarray], opts: DetectorOptions
) -> FeatureSource:
    if opts.source is not None:
        base = FeatureSource.parse(opts.source)
    else:
        floats = [k for k, v in inputs.items() if np.asarray(v).dtype.kind == "f"]
        if not floats:
            raise ConfigError(
                "the model has no floating-point input to measure distances on; set "
                "options.source to an embedding output ('output:INDEX')"
            )
        base = FeatureSource("input", name=floats[0])
    shape = base.tensor(inputs, outputs).shape
    channels_last = len(shape) == 4 and shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4)
    pool = opts.pool
    if pool is None:
        pool = 1
        if len(shape) >= 3:
            while _pooled_size(shape, pool, channels_last) > opts.max_features:
                pool += 1
    return FeatureSource(base.kind, base.name, base.index, pool, channels_last)


def _pooled_size(shape: tuple[int, ...], pool: int, channels_last: bool) -> int:
    dims = list(shape[1:])
    h, w = (len(dims) - 3, len(dims) - 2) if channels_last else (len(dims) - 2, len(dims) - 1)
    if dims[h] // pool == 0 or dims[w] // pool == 0:
        return 0
    dims[h] //= pool
    dims[w] //= pool
    return int(np.prod(dims))


def _count(inputs: Arrays) -> int:
    if not inputs:
        raise DataError("calibration data holds no inputs")
    return int(next(iter(inputs.values())).shape[0])


def _take(inputs: Arrays, index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in inputs.items()}


def _temp_path(params_file: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="edgeship-detector-"))
    return directory / Path(params_file).name


def _jsonable_options(opts: DetectorOptions) -> dict[str, Any]:
    out = asdict(opts)
    out["combine"] = list(opts.combine)
    out["weights"] = None if opts.weights is None else list(opts.weights)
    return out
