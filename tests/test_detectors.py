"""Contract tests run over every registered outlier detector, plus threshold calibration.

The toy world: three Gaussian classes in 8-D whose means span a plane, and a "model" that
returns prototype logits ``-||x - mu_c||^2 / 2``. Obvious outliers sit far off the plane at
the same distance from every class mean, so every detector (input- or output-based) should
score them above typical samples.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.contracts.bundle import DetectorSpec, IOSpec, TensorSpec
from device_agent.detectors import (
    DETECTORS,
    CombinedDetector,
    Detector,
    FeatureSource,
    MahalanobisDetector,
    TailCalibration,
    ThresholdedDetector,
    load_detector,
    load_params,
    save_params,
)
from device_agent.errors import BundleError, ConfigError, InputError
from sdk.detect import (
    FITTERS,
    DetectorOptions,
    calibrate_threshold,
    default_detector,
    fit_detector,
    fit_unthresholded,
)
from sdk.errors import DataError

KINDS = sorted(DETECTORS)
DIM = 8
MEANS = np.zeros((3, DIM))
MEANS[0, 0], MEANS[1, 1], MEANS[2, 2] = 4.0, 4.0, 4.0
SCALES = np.array([0.6, 0.6, 0.6, 0.6, 0.1, 0.1, 0.1, 0.1])


def toy_inputs(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = MEANS[labels] + rng.normal(size=(n, DIM)) * SCALES
    return {"x": x.astype(np.float32)}


def toy_outliers(n: int, seed: int) -> dict[str, np.ndarray]:
    """Off the class plane, equidistant from all three means."""
    rng = np.random.default_rng(seed)
    x = np.tile(MEANS.mean(axis=0), (n, 1))
    x[:, 4:] += rng.choice([-1.0, 1.0], size=(n, DIM - 4)) * rng.uniform(2.0, 4.0, (n, DIM - 4))
    return {"x": x.astype(np.float32)}


def toy_model(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    x = np.asarray(inputs["x"], dtype=np.float64)
    d2 = ((x[:, None, :] - MEANS[None, :, :]) ** 2).sum(axis=2)
    return [(-0.5 * d2).astype(np.float32)]


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(positive scores above negative), ties counted half."""
    neg, pos = np.asarray(negatives)[:, None], np.asarray(positives)[None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def fitted(kind: str, n: int = 600, seed: int = 0) -> Detector:
    inputs = toy_inputs(n, seed)
    return fit_unthresholded(kind, inputs, toy_model(inputs), DetectorOptions(components=2))


def scores(detector: Detector, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    return detector.score(inputs, toy_model(inputs))


# --------------------------------------------------------------------------------------------
# The contract every registered detector keeps


def test_every_registered_detector_has_a_fitter() -> None:
    assert set(FITTERS) == set(DETECTORS)


@pytest.mark.parametrize("kind", KINDS)
def test_is_a_registered_detector(kind: str) -> None:
    det = fitted(kind)
    assert isinstance(det, Detector)
    assert det.kind == kind
    assert DETECTORS[kind] is type(det)


@pytest.mark.parametrize("kind", KINDS)
def test_obvious_outliers_score_higher(kind: str) -> None:
    det = fitted(kind)
    typical = scores(det, toy_inputs(400, seed=1))
    odd = scores(det, toy_outliers(100, seed=2))
    assert auroc(typical, odd) >= 0.99
    assert np.median(odd) > np.quantile(typical, 0.99)


@pytest.mark.parametrize("kind", KINDS)
def test_scores_are_float64_one_per_sample_and_finite(kind: str) -> None:
    det = fitted(kind)
    for n in (1, 7):
        s = scores(det, toy_inputs(n, seed=3))
        assert s.dtype == np.float64
        assert s.shape == (n,)
        assert np.all(np.isfinite(s))


@pytest.mark.parametrize("kind", KINDS)
def test_batch_scores_equal_per_sample_scores(kind: str) -> None:
    det = fitted(kind)
    batch = toy_inputs(50, seed=4)
    together = scores(det, batch)
    one_by_one = np.concatenate([scores(det, {"x": batch["x"][i : i + 1]}) for i in range(50)])
    # Equal up to BLAS summation order (matrix-matrix vs matrix-vector kernels).
    np.testing.assert_allclose(together, one_by_one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic(kind: str) -> None:
    a, b = fitted(kind), fitted(kind)
    for key, value in a.params().items():
        np.testing.assert_array_equal(value, b.params()[key])
    data = toy_inputs(30, seed=5)
    np.testing.assert_array_equal(scores(a, data), scores(a, data))
    np.testing.assert_array_equal(scores(a, data), scores(b, data))


@pytest.mark.parametrize("kind", KINDS)
def test_params_round_trip_through_npz_exactly(kind: str, tmp_path: Path) -> None:
    det = fitted(kind)
    path = save_params(det, tmp_path / "det.npz")
    spec = DetectorSpec(kind=kind, params_file="det.npz", threshold=1.0, target_fpr=0.05)
    loaded = load_detector(spec, path)
    assert type(loaded) is type(det)
    before, after = det.params(), loaded.params()
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        assert np.asarray(value).dtype == after[key].dtype, key
        np.testing.assert_array_equal(value, after[key], err_msg=key)
    data = toy_inputs(40, seed=6)
    np.testing.assert_array_equal(scores(det, data), scores(loaded, data))
    with np.load(path, allow_pickle=False) as npz:  # no pickled objects in a bundle
        assert all(npz[k].dtype.kind != "O" for k in npz.files)


# --------------------------------------------------------------------------------------------
# Threshold calibration


def test_calibrate_threshold_is_the_conformal_quantile() -> None:
    s = np.arange(1.0, 100.0)  # 99 scores 1..99
    # ceil(100 * 0.95) = 95th smallest: 4 of the 99 lie above it.
    assert calibrate_threshold(s, 0.05) == 95.0
    assert calibrate_threshold(s[::-1], 0.05) == 95.0
    assert calibrate_threshold(np.array([3.0, 1.0, 2.0]), 0.01) == 3.0  # too few: the max
    with pytest.raises(ConfigError):
        calibrate_threshold(s, 0.0)
    with pytest.raises(DataError):
        calibrate_threshold(np.array([1.0, np.nan]), 0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_threshold_hits_target_fpr_on_fresh_in_distribution_data(kind: str) -> None:
    target = 0.05
    spec, path = fit_detector(
        kind,
        toy_inputs(4000, seed=10),
        toy_model,
        target_fpr=target,
        holdout_fraction=0.5,
        options=DetectorOptions(components=2),
    )
    assert spec.kind == kind and spec.target_fpr == target
    assert spec.options["n_holdout"] == 2000 and spec.options["n_fit"] == 2000
    assert abs(spec.options["fpr_holdout"] - target) <= 0.005
    det = ThresholdedDetector(load_detector(spec, path), spec.threshold)
    fresh = toy_inputs(20000, seed=11)
    _, flags = det.flag(fresh, toy_model(fresh))
    # 2,000 held-out scores: the threshold's true FPR has a standard deviation of about 0.005.
    assert abs(float(flags.mean()) - target) <= 0.02
    _, odd_flags = det.flag(toy_outliers(200, seed=12), toy_model(toy_outliers(200, seed=12)))
    assert odd_flags.mean() >= 0.95
    DetectorSpec.from_dict(spec.to_dict())  # the options are valid manifest JSON


def test_thresholded_detector_flags_strictly_above() -> None:
    det = ThresholdedDetector(fitted("energy"), threshold=2.0)
    flags = det.is_outlier(np.array([1.0, 2.0, 2.5]))
    assert flags.tolist() == [False, False, True]
    with pytest.raises(ConfigError):
        ThresholdedDetector(fitted("energy"), float("nan"))


def test_fit_detector_needs_a_model_for_output_detectors() -> None:
    with pytest.raises(ConfigError, match="outputs"):
        fit_detector("energy", toy_inputs(50, seed=0))
    spec, _ = fit_detector("mahalanobis", toy_inputs(50, seed=0), target_fpr=0.1)
    assert spec.kind == "mahalanobis"
    with pytest.raises(DataError):
        fit_detector("mahalanobis", toy_inputs(4, seed=0))
    with pytest.raises(ConfigError, match="unknown detector"):
        fit_detector("isolation_forest", toy_inputs(50, seed=0))


def test_fit_through_onnx_runtime_and_package(tmp_path: Path) -> None:
    """Fitted from an ONNX file run by the device's runtime, shipped in a bundle, loaded back."""
    from device_agent.runtime import open_session
    from sdk.artifact import read_artifact
    from sdk.package import package
    from tests.helpers import write_mlp_onnx

    model = write_mlp_onnx(tmp_path / "mlp.onnx", features=DIM, classes=3)
    rng = np.random.default_rng(0)
    cal = {"x": rng.normal(size=(300, DIM)).astype(np.float32)}
    choice = default_detector(read_artifact(model).io)
    assert choice is not None and choice.kind == "combined"
    spec, path = fit_detector(choice.kind, cal, model, target_fpr=0.05, options=choice.options)
    bundle = package(read_artifact(model), tmp_path / "bundle", detector=(spec, path))
    shipped = bundle.manifest.detector
    assert shipped is not None and shipped.threshold == spec.threshold
    det = load_detector(shipped, bundle.path_of(shipped.params_file))
    session = open_session(bundle.model_path)
    odd = {"x": np.full((5, DIM), 25.0, dtype=np.float32)}
    assert np.all(det.score(odd, session.run(odd)) > shipped.threshold)


# --------------------------------------------------------------------------------------------
# Pieces


def test_mahalanobis_score_is_the_ppca_distance() -> None:
    rng = np.random.default_rng(0)
    det = fit_unthresholded(
        "mahalanobis", {"x": rng.normal(size=(500, 6)) * [3, 2, 1, 0.5, 0.5, 0.5]}, []
    )
    assert isinstance(det, MahalanobisDetector)
    w, lam, s2 = det.components, det.variances, det.residual_variance
    cov = w @ np.diag(lam) @ w.T + s2 * (np.eye(6) - w @ w.T)
    x = rng.normal(size=(10, 6))
    c = x - det.mean
    expected = np.einsum("ij,jk,ik->i", c, np.linalg.inv(cov), c) / 6
    np.testing.assert_allclose(det.score({"x": x}, []), expected, rtol=1e-9)


def test_components_by_count_and_by_variance() -> None:
    rng = np.random.default_rng(0)
    x = {"x": rng.normal(size=(400, 6)) * [10, 5, 0.1, 0.1, 0.1, 0.1]}
    by_count = fit_unthresholded("mahalanobis", x, [], DetectorOptions(components=3))
    by_share = fit_unthresholded("mahalanobis", x, [], DetectorOptions(components=0.99))
    assert isinstance(by_count, MahalanobisDetector) and isinstance(by_share, MahalanobisDetector)
    assert by_count.components.shape == (6, 3)
    assert by_share.components.shape == (6, 2)


def test_pooling_nchw_and_nhwc() -> None:
    img = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    nchw = FeatureSource("input", name="im", pool=2).features({"im": img}, [])
    expected = img.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(2, -1)
    np.testing.assert_allclose(nchw, expected)
    nhwc = FeatureSource("input", name="im", pool=2, channels_last=True)
    np.testing.assert_allclose(
        nhwc.features({"im": img.transpose(0, 2, 3, 1)}, []),
        expected.reshape(2, 3, 2, 2).transpose(0, 2, 3, 1).reshape(2, -1),
    )


def test_automatic_pooling_caps_the_feature_count() -> None:
    rng = np.random.default_rng(0)
    images = {"im": rng.uniform(size=(60, 1, 16, 16)).astype(np.float32)}
    det = fit_unthresholded("mahalanobis", images, [], DetectorOptions(max_features=20))
    assert isinstance(det, MahalanobisDetector)
    assert det.source.pool == 4 and det.mean.shape == (16,)
    nhwc = {"im": rng.uniform(size=(60, 16, 16, 3)).astype(np.float32)}
    det = fit_unthresholded("mahalanobis", nhwc, [], DetectorOptions(max_features=200))
    assert isinstance(det, MahalanobisDetector)
    assert det.source.channels_last and det.source.pool == 2 and det.mean.shape == (192,)


def test_tail_calibration_is_monotone_and_keeps_far_outliers_apart() -> None:
    cal = TailCalibration.from_scores(np.random.default_rng(0).exponential(size=500))
    grid = np.linspace(-1.0, 50.0, 400)
    surprise = cal.surprise(grid)
    assert np.all(np.diff(surprise) >= 0)
    assert surprise[0] == pytest.approx(0.0)
    assert cal.surprise(np.array([20.0]))[0] < cal.surprise(np.array([40.0]))[0]


def test_combined_needs_every_component_to_count() -> None:
    det = fitted("combined")
    assert isinstance(det, CombinedDetector)
    assert [c.kind for c in det.components] == ["mahalanobis", "energy"]
    parts = det.component_scores(toy_outliers(20, seed=0), toy_model(toy_outliers(20, seed=0)))
    assert parts.shape == (20, 2) and np.all(parts > 3.0)
    with pytest.raises(ConfigError):
        DetectorOptions(combine=("combined",))


def test_feature_source_parsing() -> None:
    assert FeatureSource.parse("input:image") == FeatureSource("input", name="image")
    assert FeatureSource.parse("output:2") == FeatureSource("output", index=2)
    for bad in ("image", "output:x", "weights:1", "input:"):
        with pytest.raises(ConfigError):
            FeatureSource.parse(bad)


def test_scoring_errors_name_the_problem() -> None:
    det = fitted("mahalanobis")
    with pytest.raises(InputError, match="'x'"):
        det.score({"image": np.zeros((1, DIM))}, [])
    with pytest.raises(InputError, match="features"):
        det.score({"x": np.zeros((1, DIM + 1))}, [])
    with pytest.raises(InputError, match="output 0"):
        fitted("energy").score({"x": np.zeros((1, DIM))}, [])


# --------------------------------------------------------------------------------------------
# Loading what a bundle carries


def test_load_rejects_unknown_kinds_and_mismatches(tmp_path: Path) -> None:
    path = save_params(fitted("energy"), tmp_path / "det.npz")
    assert load_params(path)[0] == "energy"
    with pytest.raises(BundleError, match="manifest says"):
        load_detector(DetectorSpec("max_softmax", "det.npz", 0.5, 0.05), path)
    other: dict[str, Any] = {"kind": np.array("isolation_forest")}
    np.savez(tmp_path / "odd.npz", **other)
    with pytest.raises(BundleError, match="unknown outlier detector kind"):
        load_detector(DetectorSpec("isolation_forest", "odd.npz", 0.5, 0.05), tmp_path / "odd.npz")


def test_load_rejects_damaged_parameters(tmp_path: Path) -> None:
    params = fitted("mahalanobis").params()
    del params["variances"]
    partial: dict[str, Any] = params
    np.savez(tmp_path / "partial.npz", **partial)
    spec = DetectorSpec("mahalanobis", "partial.npz", 1.0, 0.05)
    with pytest.raises(BundleError, match="variances"):
        load_detector(spec, tmp_path / "partial.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(BundleError, match=r"junk\.npz"):
        load_detector(spec, tmp_path / "junk.npz")
    with pytest.raises(BundleError, match="not found"):
        load_detector(spec, tmp_path / "missing.npz")


# --------------------------------------------------------------------------------------------
# Defaults


def _io(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> IOSpec:
    return IOSpec(inputs=tuple(inputs), outputs=tuple(outputs))


def test_default_detector_choices() -> None:
    image = TensorSpec("image", "float32", ("batch", 1, 8, 8))
    tokens = TensorSpec("input_ids", "int64", ("batch", "seq"))
    logits = TensorSpec("logits", "float32", ("batch", 10))
    emb = TensorSpec("sentence_embedding", "float32", ("batch", 384))
    mask = TensorSpec("mask", "float32", ("batch", 1, 8, 8))

    classifier = default_detector(_io([image], [logits]))
    assert classifier is not None and classifier.kind == "combined"
    assert classifier.options.source == "input:image" and classifier.options.output == 0

    regressor = default_detector(_io([image], [mask]))
    assert regressor is not None and regressor.kind == "mahalanobis"

    encoder = default_detector(_io([tokens], [TensorSpec("last", "float32", ("b", 7, 384)), emb]))
    assert encoder is not None and encoder.kind == "mahalanobis"
    assert encoder.options.source == "output:1"

    assert default_detector(_io([tokens], [logits])) is None


def test_detectors_module_stays_light() -> None:
    probe = (
        "import device_agent.detectors, sys; "
        "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "numpy" in loaded
    assert not loaded & {"torch", "sdk", "sklearn", "onnx", "onnxruntime", "scipy"}
